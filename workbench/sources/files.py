"""Reading a file that may be anything: the one place workbench opens profiles, text and JSON it did not write.

A path from a user can name a missing file, a broken symbolic link, a directory, a FIFO (reading
one waits forever), a device (`/dev/zero` never ends), a file far too large, bytes that are not
UTF-8 or JSON nested deeper than Python's parser can go. Each becomes a `UsageError` naming the
file and what is wrong, before anything is read where it can be checked first. Imports nothing
heavy, so profile validation can use it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from workbench.errors import UsageError

MiB = 1 << 20


def file_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a regular file ('file not found', 'is a directory', ...), or None."""
    try:
        info = os.stat(path)  # follows symbolic links
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)})"
        return "file not found"
    except NotADirectoryError:
        return "file not found (a part of the path is a file, not a folder)"
    except PermissionError:
        return "permission denied"
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        return f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else \
            "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else \
            "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file"
        return f"is {kind}, not a regular file"
    return None


def check_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path when it is a readable regular file, else UsageError '{what}: {path}: {why}'."""
    problem = file_problem(path)
    if problem:
        raise UsageError(f"{what}: {path}: {problem}")
    return Path(path)


def read_bytes(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """The bytes of a regular file no larger than `max_bytes` (UsageError naming it otherwise)."""
    check_file(path, what)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UsageError(f"{what}: {path}: {size / MiB:,.0f} MiB, more than the {max_bytes / MiB:,.0f} MiB "
                         "workbench reads from such a file; is it the right file?")
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)  # bounded even if the file grew since the check
    except MemoryError:
        raise UsageError(f"{what}: {path}: not enough memory to read {size / MiB:,.0f} MiB") from None
    except OSError as exc:
        raise UsageError(f"{what}: {path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise UsageError(f"{what}: {path}: grew past {max_bytes / MiB:,.0f} MiB while being read")
    return data


def decode_text(data: bytes, path: str | os.PathLike, what: str) -> str:
    """UTF-8 text (a leading BOM is dropped); binary data and other encodings are a UsageError."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(f"{what}: {path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "save it as UTF-8") from None
    nul = text.find("\0")
    if nul >= 0:
        raise UsageError(f"{what}: {path}:{text.count(chr(10), 0, nul) + 1}: a NUL character: this looks like "
                         "a binary file, not text")
    return text


def read_text(path: str | os.PathLike, what: str, max_bytes: int) -> str:
    """The UTF-8 text of a regular file (see `read_bytes` and `decode_text`)."""
    return decode_text(read_bytes(path, what, max_bytes), path, what)


def parse_json(text: str, where: str) -> Any:
    """json.loads with every way it can fail (bad syntax, nesting past the parser's depth, a number
    too long to convert) turned into a UsageError starting with `where` ('file:line')."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise UsageError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer longer than Python converts
        raise UsageError(f"{where}: not valid JSON ({exc})") from None


def read_json(path: str | os.PathLike, what: str, max_bytes: int = 64 * MiB) -> Any:
    """The parsed JSON of a regular file, every failure a UsageError naming it."""
    return parse_json(read_text(path, what, max_bytes), f"{what}: {path}")
