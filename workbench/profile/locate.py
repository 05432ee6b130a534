"""Find the line where a dotted profile key is written, so error messages can point at it.

tomllib returns plain dicts without positions, so the TOML text is scanned line by line: the
current `[table]` / `[[array]]` header is tracked and every `key =` is recorded under its full
dotted path (dotted keys and one-line inline tables included). Arrays of tables are numbered from 0,
as in the keys of `Problem`s: the second `[[evaluate]]` is `evaluate[1]`.

It only has to be good enough to point at the right line, and it must work on text that is not
valid TOML (for syntax errors), so it is a forgiving scan rather than a parser. A key that was never
written (a missing option, a default) falls back to its nearest written parent.
"""

from __future__ import annotations

import re

_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"' + r"|'[^']*'"
_PART = rf"(?:{_BARE}|{_QUOTED})"
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"

_ARRAY_HEADER = re.compile(rf"\s*\[\[\s*({_DOTTED})\s*\]\]")
_TABLE_HEADER = re.compile(rf"\s*\[\s*({_DOTTED})\s*\]")
_KEY = re.compile(rf"\s*({_DOTTED})\s*=")
# Inside a value: a `key =` (tried first), a word or string to skip, or a bracket that opens/closes
# a level. Words and strings are consumed whole, an unterminated string up to the end of the line:
# scanning restarted inside them, a long line (a pasted token, a run of escaped quotes) took time
# quadratic in its length (16k characters: 15 s).
_STRING = r'"(?:[^"\\]|\\.)*"?' + r"|'[^']*'?"
_INLINE = re.compile(rf"(?P<key>{_DOTTED})\s*=|{_DOTTED}|{_STRING}|[{{}}\[\]]")
_LAST_STEP = re.compile(r"(\.[^.\[\]]*|\[\d+\])$")


def _parts(dotted: str) -> list[str]:
    return [p.strip().strip("\"'") for p in re.findall(_PART, dotted)]


def _join(prefix: str, parts: list[str]) -> str:
    return ".".join([prefix, *parts]) if prefix else ".".join(parts)


def _indexed(parts: list[str], arrays: dict[str, int]) -> str:
    """Dotted path of a header, with the current index after each array-of-tables component."""
    raw: list[str] = []
    path: list[str] = []
    for part in parts:
        raw.append(part)
        path.append(part)
        count = arrays.get(".".join(raw))
        if count:
            path[-1] += f"[{count - 1}]"
    return ".".join(path)


def _scan_value(value: str, path: str, lineno: int, found: dict[str, int]) -> None:
    """Record the keys inside inline tables (and arrays of inline tables) on one line."""
    stack: list[list] = []  # frames: [bracket, path, tables seen so far (arrays only)]
    pending = path  # the path that the next '{' or '[' belongs to
    for m in _INLINE.finditer(value):
        token = m.group()
        if m.group("key") is not None:
            # Outside braces a `x =` is inside a comment or garbage: ignore it.
            if stack and stack[-1][0] == "{":
                pending = _join(stack[-1][1], _parts(m.group("key")))
                found.setdefault(pending, lineno)
        elif token in "{[":
            if stack and stack[-1][0] == "[":
                frame = stack[-1]
                pending = f"{frame[1]}[{frame[2]}]"
                frame[2] += 1
            found.setdefault(pending, lineno)
            stack.append([token, pending, 0])
        elif token in "}]" and stack:
            stack.pop()


def key_lines(text: str) -> dict[str, int]:
    """Map each dotted key written in `text` to the (1-based) line of its first appearance."""
    found: dict[str, int] = {}
    table = ""
    arrays: dict[str, int] = {}  # array-of-tables path without indexes -> tables seen
    open_string = None  # the delimiter of a multi-line string we are inside
    # tomllib counts "\n" only; str.splitlines() would also split on \x0c, \u2028, ...
    for lineno, line in enumerate(text.split("\n"), 1):
        if open_string:
            if line.count(open_string) % 2:
                open_string = None
            continue
        if m := _ARRAY_HEADER.match(line):
            parts = _parts(m.group(1))
            raw = ".".join(parts)
            arrays[raw] = arrays.get(raw, 0) + 1
            table = _indexed(parts, arrays)
            found.setdefault(raw, lineno)
            found.setdefault(table, lineno)
        elif m := _TABLE_HEADER.match(line):
            table = _indexed(_parts(m.group(1)), arrays)
            found.setdefault(table, lineno)
        elif m := _KEY.match(line):
            parts = _parts(m.group(1))
            for i in range(1, len(parts) + 1):  # `a.b.c = 1` also writes a and a.b
                found.setdefault(_join(table, parts[:i]), lineno)
            _scan_value(line[m.end():], _join(table, parts), lineno, found)
        for delim in ('"""', "'''"):
            if line.count(delim) % 2:
                open_string = delim
    return found


def parent_key(key: str) -> str:
    """`a.b[2].c` -> `a.b[2]` -> `a.b` -> `a` -> ``."""
    shorter = _LAST_STEP.sub("", key)
    return "" if shorter == key else shorter


def find_line(found: dict[str, int], key: str) -> int | None:
    """Line of `key`, or of its nearest written parent; None when nothing matches."""
    while key:
        if key in found:
            return found[key]
        key = parent_key(key)
    return None


def key_at(found: dict[str, int], lineno: int | None) -> str:
    """The most specific key written on a line ('' when none), to name the key of a syntax error."""
    keys = [k for k, n in found.items() if n == lineno]
    return max(keys, key=len) if keys else ""
