"""Fuzzed input: whatever a profile file holds, `workbench profile validate` answers exit 0 or exit 2
with messages, never a traceback; the editor's form survives any document and any typed text.

Documents are generated from the schema itself (`SECTIONS`, `TOP_LEVEL`) and from the options the
installed allocators and evaluators declare, so a new key or plugin is fuzzed without editing
this file. Each key gets values that are valid, at and past its bounds, of the wrong type, or junk;
then the bytes may be mangled (non-UTF-8, a BOM, NUL, truncation, deep nesting).
"""

from __future__ import annotations

import math

import pytest
import tomlkit
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from workbench.cli import app
from workbench.errors import ProfileError
from workbench.api import Option
from workbench.registry import get_registry
from workbench.profile.schema import SECTIONS, TOP_LEVEL, load_profile
from workbench.tui import form_model

REGISTRY = get_registry()  # the CLI's own registry: the same plugins, the same declared options
runner = CliRunner()

# --------------------------------------------------------------------------- values

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_STRINGS = st.sampled_from([
    "", " ", "embedded:smollm2-135m", "embedded:nope", "org/name", "a/b/c", "/", "~", "~nobody/x", "x.gguf",
    "x.txt", "x.jsonl", "c4", "wikitext2", "cuda:0", "cuda:x", "re:(", "re:q_.*", "q_proj", "\x00", "é", "../..",
    *sorted(REGISTRY.allocators), *sorted(REGISTRY.evaluators),
])
_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 1, 2**31, 2**64, -(2**70)]),
    st.floats(allow_nan=True, allow_infinity=True),
    _TEXT,
    _STRINGS,
    st.dates(), st.times(), st.datetimes(),
)
_JUNK = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT | _STRINGS, inner, max_size=3),
    max_leaves=6,
)
_KEYS = _TEXT | st.sampled_from(["ratoi", "sample", "source ", "allocator_option", "evaluator", "dir"])


def _near_bounds(option: Option) -> list:
    values = [math.nan, math.inf, -math.inf]
    for bound in (option.min, option.max):
        if bound is not None:
            values += [bound, bound - 1, bound + 1, bound - 0.5, bound + 0.5, int(bound) - 1, int(bound) + 1]
    return values


def _values_for(option: Option) -> st.SearchStrategy:
    """Valid values of `option`, values at and just past its bounds, wrong types, and junk."""
    if option.choices:
        good = st.sampled_from(list(option.choices))
    elif option.type is bool:
        good = st.booleans()
    elif option.type is int:
        lo = int(option.min) if option.min is not None else -(2**63)
        hi = int(option.max) if option.max is not None else 2**63 - 1
        good = st.integers(lo, hi)
    elif option.type is float:
        good = st.floats(option.min, option.max, allow_nan=False)
    elif option.type is list:
        good = st.lists(_TEXT | _STRINGS, max_size=3)
    else:
        good = _TEXT | _STRINGS
    return st.one_of(good, st.sampled_from(_near_bounds(option)), _JUNK)


def _table(options, extra_keys=True) -> st.SearchStrategy:
    """A table with a random subset of `options` (each with its values) and maybe unknown keys."""
    by_name = {o.name: _values_for(o) for o in options}
    table = st.fixed_dictionaries({}, optional=by_name)
    if extra_keys:
        table = st.tuples(table, st.dictionaries(_KEYS, _JUNK, max_size=2)).map(lambda t: {**t[1], **t[0]})
    return table


def _plugin_options(table, name):
    plugin = table.get(name)
    return plugin.options if plugin is not None else ()


@st.composite
def documents(draw) -> dict:
    doc = draw(_table(TOP_LEVEL))
    for section, options in SECTIONS.items():
        if not draw(st.booleans()):
            continue
        if draw(st.integers(0, 15)) == 0:
            doc[section] = draw(_JUNK)  # not a table at all
            continue
        values = draw(_table([o for o in options if o.name != "allocator_options"]))
        if section == "compression":
            allocator = values.get("allocator")
            if draw(st.booleans()):
                allocator = values["allocator"] = draw(st.sampled_from(sorted(REGISTRY.allocators)))
            if draw(st.booleans()):
                declared = _plugin_options(REGISTRY.allocators, allocator) if isinstance(allocator, str) else ()
                values["allocator_options"] = draw(_table(declared) | _JUNK)
            if draw(st.booleans()):
                sizes = st.dictionaries(st.sampled_from(["q_proj", "down_proj", "nope"]) | _TEXT, _SCALARS, max_size=3)
                values["group_size"] = draw(sizes)
        doc[section] = values
    if draw(st.booleans()):
        entries = []
        for _ in range(draw(st.integers(0, 3))):
            name = draw(st.sampled_from(sorted(REGISTRY.evaluators)) | _SCALARS)
            entry = draw(_table(_plugin_options(REGISTRY.evaluators, name) if isinstance(name, str) else ()))
            if draw(st.integers(0, 5)):
                entry["evaluator"] = name
            entries.append(entry if draw(st.integers(0, 10)) else draw(_JUNK))
        doc["evaluate"] = entries if draw(st.integers(0, 10)) else draw(_JUNK)
    return doc


def _dump(doc: dict) -> str:
    try:
        return tomlkit.dumps(doc)
    except Exception:  # noqa: BLE001 - tomlkit cannot write every generated value; not our bug
        assume(False)


_MANGLES = st.sampled_from(["none", "none", "insert", "truncate", "bom", "latin1", "nest", "replace"])


@st.composite
def files(draw) -> bytes:
    """Bytes of a profile file: generated TOML, possibly mangled."""
    data = _dump(draw(documents())).encode("utf-8")
    how = draw(_MANGLES)
    at = draw(st.integers(0, len(data)))
    if how == "insert":  # raw bytes: invalid UTF-8, NUL, control characters, stray brackets
        data = data[:at] + draw(st.binary(max_size=6) | st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x00",
                                                                          b"[", b"]]", b"=", b'"""', b"\r"])) + data[at:]
    elif how == "truncate":
        data = data[:at]
    elif how == "bom":
        data = b"\xef\xbb\xbf" + data
    elif how == "latin1":
        data = data.decode("utf-8").encode("latin-1", errors="replace") + "ratio = 0.2 # déjà".encode("latin-1")
    elif how == "nest":  # deeper than tomllib's recursion can follow
        depth = draw(st.sampled_from([50, 2000]))
        data += b"\n[deep]\nv = " + b"[" * depth + b"1" + b"]" * depth + b"\n"
    elif how == "replace":
        data = data[:at] + draw(st.binary(max_size=8)) + data[at + draw(st.integers(0, 8)):]
    return data


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "p.toml"


def _validate(path, data: bytes):
    path.write_bytes(data)
    result = runner.invoke(app, ["profile", "validate", str(path)])
    shown = f"exit {result.exit_code}\n{result.output}\n{data!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (shown, result.exception)
    assert result.exit_code in (0, 2), shown
    assert "Traceback" not in result.output, shown
    if result.exit_code == 0:
        assert f"{path}: ok" in result.output, shown
    else:
        assert "profile error" in result.output and str(path) in result.output, shown
    return result


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=files())
def test_validate_answers_0_or_2_for_any_file(scratch, data):
    _validate(scratch, data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents())
def test_validate_agrees_with_load_profile(scratch, doc):
    """Exit 0 exactly when the profile loads, and exit 2 lists exactly its problems."""
    data = _dump(doc).encode("utf-8")
    result = _validate(scratch, data)
    try:
        load_profile(scratch, REGISTRY)
    except ProfileError as exc:
        assert result.exit_code == 2
        for problem in exc.problems:
            if str(problem).isprintable():  # rich drops some control characters a quoted key may hold
                assert str(problem) in result.output
        return
    assert result.exit_code == 0


@pytest.mark.parametrize("data", [
    b"[model\n", b"\xff\xfe\x00", b"v = " + b"[" * 5000, b"a = {" * 3000, b"\xef\xbb\xbf[model]\nsource = 1\n",
    b"[compression]\nratio = nan\n", b"[compression.allocator_options]\nbeta = nan\n",
    b'[compression]\nallocator = "drank-rebalanced"\n[compression.allocator_options]\nbeta = nan\n',
    b"[[evaluate]]\nevaluator = [1]\n", b"evaluate = 5\n", b"[output]\ndir = \"\\u0000\"\n",
    b"[calibration]\nsamples = " + b"9" * 5000 + b"\n",  # past Python's 4300-digit int limit: a ValueError
], ids=["unclosed-header", "utf16-bytes", "deep-array", "deep-inline-table", "bom", "nan-ratio", "nan-option",
        "nan-beta", "evaluator-list", "evaluate-int", "nul-dir", "5000-digits"])
def test_known_nasty_files(scratch, data):
    _validate(scratch, data)


def test_nan_is_refused_for_a_bounded_option(scratch):
    """NaN compares false with every bound, so it used to pass `beta` in [0, 0.9]."""
    text = b'[compression]\nallocator = "drank-rebalanced"\n[compression.allocator_options]\nbeta = nan\n'
    result = _validate(scratch, text)
    assert result.exit_code == 2 and "compression.allocator_options.beta: expected number, got nan" in result.output


# --------------------------------------------------------------------------- the editor's form


def _as_typed(value) -> str:
    try:
        return form_model.format_value(value)
    except Exception:  # noqa: BLE001 - a generated value TOML cannot hold; the user would type its str
        return str(value)


def _typed(option: Option) -> st.SearchStrategy:
    """What a user might type (or paste) into the field of `option`."""
    literal = _values_for(option).map(_as_typed)
    return st.one_of(
        _TEXT, literal,
        st.sampled_from(["1", "-1", "1e400", "nan", "inf", "-inf", "0x10", "0b2", "1_000", "[1, 2]", "[", "]",
                         "{a = 1}", "{", "true", "'x'", '"x', '"""', "1979-05-27", "07:32:00", "1979-05-27T07:32:00Z",
                         "3.0", "99999999999999999999999", "1\nv = 2", "[[1], [2]]", "# comment", "\\", "\x00"]),
        st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    )


def _fields(doc):
    """The form's fields, and the text each input shows, as the editor builds them."""
    fields = [f for s in form_model.build_sections(doc, REGISTRY) for f in s.fields]
    for f in fields:
        assert isinstance(form_model.format_value(form_model.get_value(doc, f.key)), str)
    return fields


def _assert_messages(doc):
    text = tomlkit.dumps(doc)
    found = form_model.problems(text, "p.toml", REGISTRY)
    assert isinstance(found, list) and all(isinstance(p, str) and p.startswith("p.toml") for p in found), found


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(doc=documents(), edits=st.data())
def test_the_form_survives_any_document_and_any_typed_text(doc, edits):
    """Build the form, type into its fields (and pick from its selects), check after each edit:
    the same functions the editor calls on every keystroke."""
    try:
        doc = tomlkit.parse(_dump(doc))
    except Exception:  # noqa: BLE001 - the editor refuses a file tomlkit cannot read (load_document)
        assume(False)
    _assert_messages(doc)
    for _ in range(edits.draw(st.integers(1, 4))):
        fields = _fields(doc)
        field = edits.draw(st.sampled_from(fields))
        if field.choices is not None and edits.draw(st.booleans()):
            value = edits.draw(st.sampled_from([*field.choices, form_model.REMOVE]))
        else:
            value = form_model.parse_input(edits.draw(_typed(field.option)), field.option)
        form_model.set_value(doc, field.key, value)
        _assert_messages(doc)


@pytest.mark.parametrize("text,key", [
    ('[compression]\nallocator = ["uniform"]\n', ("compression", "ratio")),  # unhashable plugin name
    ("[[evaluate]]\nevaluator = {a = 1}\n", ("evaluate", 0, "evaluator")),
    ("model = 5\n", ("model", "source")),  # a section that is not a table
    ("evaluate = [1]\n", ("evaluate", 0, "evaluator")),  # an entry that is not a table
])
def test_the_form_handles_documents_of_the_wrong_shape(text, key):
    doc = tomlkit.parse(text)
    _fields(doc)
    form_model.set_value(doc, key, "perplexity" if key[-1] == "evaluator" else "embedded:smollm2-135m")
    assert form_model.get_value(doc, key) in ("perplexity", "embedded:smollm2-135m")
    _assert_messages(doc)
    form_model.set_value(doc, key, form_model.REMOVE)
    assert form_model.get_value(doc, key) is None


def test_typing_a_deeply_nested_list_stays_text():
    option = Option("targets", list, None)
    assert form_model.parse_input("[" * 3000 + "]" * 3000, option) == "[" * 3000 + "]" * 3000


def test_a_file_the_editor_cannot_read_is_refused_with_a_message(tmp_path):
    path = tmp_path / "p.toml"
    for data, expected in ((b"[model\nsource = 1\n", "not valid TOML"), (b"v = " + b"[" * 5000, "not valid TOML"),
                           (b"ratio = 0.2 # d\xe9j\xe0\n", "not UTF-8")):
        path.write_bytes(data)
        with pytest.raises(ValueError, match=expected) as info:
            form_model.load_document(path)
        assert str(path) in str(info.value)
    path.write_text("# mine\n[compression]\nratio = 0.3\n")
    assert tomlkit.dumps(form_model.load_document(path)) == "# mine\n[compression]\nratio = 0.3\n"


@pytest.mark.parametrize("line", [
    "v = " + "1" * 100_000,  # a pasted token or a huge number
    'v = "' + '\\"' * 50_000,  # escaped quotes, never closed
    "v = " + "a." * 50_000,  # a dotted chain that is no key
], ids=["long-token", "escaped-quotes", "dotted-chain"])
def test_a_long_line_is_located_in_linear_time(scratch, line):
    """The key/line scan restarted inside words and strings: 16k characters took 15 s, 100k minutes."""
    import time

    from workbench.profile.locate import key_lines

    start = time.perf_counter()
    assert key_lines(line) == {"v": 1}
    _validate(scratch, line.encode())
    assert time.perf_counter() - start < 10  # ~0.1 s; quadratic would be minutes
