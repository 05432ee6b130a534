"""Profiles: parsing, defaults, round trips, and the messages users get for every kind of mistake."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import tomlkit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.errors import ProfileError
from workbench.api import Option
from workbench.profile.schema import (
    Profile,
    load_profile,
    parse_profile,
    validate_profile,
)
from workbench.profile.locate import find_line, key_lines

QUICKSTART = Path(__file__).resolve().parents[1] / "profiles" / "quickstart.toml"


def _plugin(name, *options):
    return SimpleNamespace(name=name, options=tuple(options))


# A stand-in for workbench.registry.Registry, so these tests do not depend on which built-ins exist.
REGISTRY = SimpleNamespace(
    allocators={
        "uniform": _plugin("uniform"),
        "loss-aware": _plugin("loss-aware", Option("fisher_windows", int, 8, min=1)),
        "rebalanced": _plugin(
            "rebalanced",
            Option("beta", float, 0.5, min=0.0, max=1.0),
            Option("iterations", int, 10, min=1),
        ),
    },
    evaluators={
        "perplexity": _plugin(
            "perplexity",
            Option("dataset", str, "embedded:wiki-vital"),
            Option("seq_len", int, 512, min=8),
            Option("max_windows", int, None, min=1),
            Option("batch_size", int, 4, min=1),
        ),
        "zeroshot": _plugin("zeroshot", Option("tasks", list, ["piqa"])),
    },
)


def parse(text: str, file: str = "p.toml"):
    return parse_profile(text, file, registry=REGISTRY)


def problems(text: str, file: str = "p.toml"):
    with pytest.raises(ProfileError) as info:
        parse(text, file)
    return info.value.problems


def only(text: str):
    """The single problem a text has (fails if there are more or none)."""
    found = problems(text)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


# --------------------------------------------------------------------------- happy paths


def test_quickstart_parses_with_the_documented_values():
    profile = load_profile(QUICKSTART, registry=REGISTRY)
    assert profile.name == "quickstart"
    assert profile.path == str(QUICKSTART)
    assert (profile.model.source, profile.model.dtype, profile.model.device) == ("embedded:smollm2-135m", "float32", "auto")
    cal = profile.calibration
    assert (cal.dataset, cal.samples, cal.seq_len, cal.seed) == ("embedded:wiki-vital", 32, 512, 0)
    comp = profile.compression
    assert (comp.ratio, comp.allocator, comp.group_size, comp.targets, comp.ignore) == (0.2, "loss-aware", 1, None, [])
    assert [e.evaluator for e in profile.evaluate] == ["perplexity"]
    # The evaluator's own defaults are filled in.
    assert profile.evaluate[0].options == {"dataset": "embedded:wiki-vital", "seq_len": 512, "max_windows": 16, "batch_size": 4}
    assert (profile.output.dir, profile.output.save_model) == ("runs/quickstart", True)


def test_empty_profile_takes_every_default_and_names_itself_after_the_file():
    profile = parse("", file="profiles/my-run.toml")
    assert profile.name == "my-run"
    assert profile.output.dir == "runs/my-run"
    assert profile.model.source == "embedded:smollm2-135m"
    assert profile.compression.whitening == "cholesky"
    # The default allocator, with its own option defaults filled in.
    assert profile.compression.allocator == "loss-aware"
    assert profile.compression.allocator_options == {"fisher_windows": 8}
    assert profile.evaluate == []
    assert parse_profile("", registry=REGISTRY).output.dir == "runs/profile"


def test_ints_are_accepted_for_floats_and_options_resolved():
    profile = parse('[compression]\nratio = 0\nallocator = "rebalanced"\n[compression.allocator_options]\nbeta = 1\n')
    assert profile.compression.ratio == 0.0 and isinstance(profile.compression.ratio, float)
    assert profile.compression.allocator_options == {"beta": 1.0, "iterations": 10}


def test_group_size_table_and_number():
    comp = parse("[compression]\ngroup_size = { q_proj = 2, k_proj = 3 }\n").compression
    assert comp.group_size == {"q_proj": 2, "k_proj": 3}
    assert parse("[compression]\ngroup_size = 4\n").compression.group_size == 4


def test_to_dict_is_resolved_and_has_no_none():
    data = parse("").to_dict()
    assert "targets" not in data["compression"]  # None means "adapter's defaults": omitted
    assert data["compression"]["ratio"] == 0.2
    assert data["evaluate"] == []
    assert data["output"] == {"dir": "runs/p", "save_model": True}


@pytest.mark.parametrize(
    "text",
    [
        QUICKSTART.read_text(),
        "",
        """
name = "full"
description = 'quotes " and \\\\ backslashes'
[model]
source = "org/name"
dtype = "bfloat16"
device = "cuda:1"
[compression]
ratio = 0.5
allocator = "rebalanced"
group_size = { q_proj = 2 }
targets = ["q_proj", "re:mlp\\\\..*"]
ignore = ["re:^lm_head$"]
whitening = "eigen"
[compression.allocator_options]
beta = 0.25
[[evaluate]]
evaluator = "perplexity"
max_windows = 3
[[evaluate]]
evaluator = "zeroshot"
[output]
dir = "out/x"
save_model = false
""",
    ],
)
def test_to_toml_round_trips(text):
    profile = parse(text)
    again = parse(profile.to_toml())
    assert again == profile
    assert again.to_dict() == profile.to_dict()


@pytest.mark.parametrize("path", sorted(QUICKSTART.parent.glob("quickstart*.toml")), ids=lambda p: p.name)
def test_quickstart_profiles_validate_and_round_trip(path):
    profile = load_profile(path)  # registry=None: the loaded plugins (the sweep names real allocators)
    assert parse_profile(profile.to_toml()).to_dict() == profile.to_dict()
    if path.stem.endswith("-sweep"):
        assert len(profile.sweep.cells()) == 12


def test_validate_profile_accepts_text_and_paths(tmp_path):
    assert validate_profile(QUICKSTART, registry=REGISTRY) == []
    assert validate_profile(str(QUICKSTART), registry=REGISTRY) == []
    assert validate_profile("[compression]\nratio = 0.3\n", registry=REGISTRY) == []
    [p] = validate_profile("[compression]\nratio = 3\n", registry=REGISTRY)
    assert p.key == "compression.ratio" and p.line == 2


# --------------------------------------------------------------------------- syntax and structure


def test_malformed_toml_names_line_and_key():
    p = only('[model]\nsource = "embedded:smollm2-135m"\n\n[compression]\nratio = 0.2.3\n')
    assert p.line == 5
    assert p.key == "compression.ratio"
    assert "invalid TOML" in p.message and "column" in p.message
    assert str(p).startswith("p.toml:5: compression.ratio: invalid TOML")


def test_unterminated_document_points_at_the_end():
    p = only("[model]\ndtype = [\n")
    assert p.line == 3 and "invalid TOML" in p.message


def test_unknown_section_suggests_the_nearest():
    p = only("[model]\n\n[compresion]\nratio = 0.3\n")
    assert (p.key, p.line, p.suggestion, p.message) == ("compresion", 3, "compression", "unknown section")
    assert "[compression]" in p.allowed


def test_unknown_key_suggests_the_nearest():
    p = only("[compression]\nallocator = 'uniform'\nratoi = 0.3\n")
    assert (p.key, p.line, p.suggestion) == ("compression.ratoi", 3, "ratio")
    assert "ratio" in p.allowed and "whitening" in p.allowed
    assert "did you mean 'ratio'?" in str(p)


def test_stray_top_level_key_points_to_its_section():
    p = only("ratio = 0.3\n")
    assert (p.key, p.line, p.suggestion) == ("ratio", 1, "compression.ratio")
    assert "[compression]" in p.message


def test_section_that_is_not_a_table():
    p = only('model = "gpt2"\n')
    assert (p.key, p.line) == ("model", 1) and "expected a table" in p.message


def test_evaluate_written_as_a_single_table():
    p = only("[evaluate]\nevaluator = 'perplexity'\n")
    assert (p.key, p.line) == ("evaluate", 1) and "[[evaluate]]" in p.message


# --------------------------------------------------------------------------- types and ranges


def test_bool_is_not_an_int():
    p = only("[calibration]\nsamples = true\n")
    assert (p.key, p.line) == ("calibration.samples", 2)
    assert "expected integer" in p.message and p.allowed == "integer >= 1"


def test_string_is_not_a_bool():
    p = only("[output]\nsave_model = 'yes'\n")
    assert (p.key, p.line) == ("output.save_model", 2) and "boolean" in p.message


@pytest.mark.parametrize("value", ["1.0", "1", "-0.1", "nan", "inf", "true", "'0.2'"])
def test_ratio_outside_zero_one(value):
    p = only(f"[compression]\nratio = {value}\n")
    assert (p.key, p.line) == ("compression.ratio", 2)
    assert "[0, 1)" in p.allowed


def test_samples_and_seq_len_bounds():
    found = problems("[calibration]\nsamples = 0\nseq_len = 4\n")
    by_key = {p.key: p for p in found}
    assert set(by_key) == {"calibration.samples", "calibration.seq_len"}
    assert by_key["calibration.samples"].line == 2 and "minimum 1" in by_key["calibration.samples"].message
    assert by_key["calibration.seq_len"].line == 3 and "minimum 8" in by_key["calibration.seq_len"].message


def test_group_size_below_one():
    p = only("[compression]\ngroup_size = 0\n")
    assert (p.key, p.line) == ("compression.group_size", 2) and "table" in p.allowed


def test_group_size_table_entry_below_one_is_found_inside_the_inline_table():
    p = only("[compression]\nratio = 0.3\ngroup_size = { q_proj = 2, k_proj = 0 }\n")
    assert (p.key, p.line) == ("compression.group_size.k_proj", 3)


def test_choice_keys_suggest_the_nearest_choice():
    p = only("[compression]\nwhitening = 'choleski'\n")
    assert (p.key, p.suggestion) == ("compression.whitening", "cholesky")
    assert "'eigen'" in p.allowed


def test_device_must_be_known():
    assert parse("[model]\ndevice = 'cuda:3'\n").model.device == "cuda:3"
    p = only("[model]\ndevice = 'cdua'\n")
    assert (p.key, p.line, p.suggestion) == ("model.device", 2, "cuda")
    assert "cuda:N" in p.allowed


# --------------------------------------------------------------------------- plugins


def test_unknown_allocator_suggests_the_nearest():
    p = only("[compression]\nallocator = 'unifrom'\n")
    assert (p.key, p.line, p.suggestion) == ("compression.allocator", 2, "uniform")
    assert p.allowed == "loss-aware, rebalanced, uniform"


def test_allocator_options_unknown_wrong_type_and_out_of_range():
    text = (
        "[compression]\nallocator = 'rebalanced'\n\n"
        "[compression.allocator_options]\nbeat = 0.3\niterations = 'many'\n"
    )
    by_key = {p.key: p for p in problems(text)}
    assert set(by_key) == {"compression.allocator_options.beat", "compression.allocator_options.iterations"}
    assert by_key["compression.allocator_options.beat"].line == 5
    assert by_key["compression.allocator_options.beat"].suggestion == "beta"
    assert by_key["compression.allocator_options.iterations"].line == 6
    p = only("[compression]\nallocator = 'rebalanced'\nallocator_options = { beta = 1.5 }\n")
    assert (p.key, p.line) == ("compression.allocator_options.beta", 3)
    assert "maximum" in p.message and p.allowed == "number in [0.0, 1.0]"


def test_options_for_an_allocator_without_options():
    p = only("[compression]\nallocator = 'uniform'\n[compression.allocator_options]\nbeta = 0.5\n")
    assert (p.key, p.line, p.allowed) == ("compression.allocator_options.beta", 4, "no options")


EVALUATE = """[model]
dtype = "float32"

[[evaluate]]
evaluator = "perplexity"

[[evaluate]]
evaluator = "perplexity"
dataset = "wikitext2"
max_windows = "all"
"""


def test_evaluator_option_names_the_entry_and_line():
    p = only(EVALUATE)
    assert (p.key, p.line) == ("evaluate[1].max_windows", 10)
    assert "expected integer" in p.message


def test_unknown_evaluator_suggests_the_nearest():
    p = only(EVALUATE.replace('"perplexity"\ndataset', '"perplexty"\ndataset').replace('"all"', "2"))
    assert (p.key, p.line, p.suggestion) == ("evaluate[1].evaluator", 8, "perplexity")
    assert p.allowed == "perplexity, zeroshot"


def test_evaluate_without_evaluator_points_at_its_header():
    p = only("[[evaluate]]\nevaluator = 'zeroshot'\n\n[[evaluate]]\nmax_windows = 3\n")
    assert (p.key, p.line) == ("evaluate[1].evaluator", 4)
    assert "missing" in p.message and "perplexity" in p.allowed


# --------------------------------------------------------------------------- sources and datasets


@pytest.mark.parametrize("source", ["./missing-model", "../missing", "/no/such/model", "~/no-such-model-dir", "missing.gguf", "a/b/c"])
def test_missing_model_path(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = only(f"[model]\nsource = '{source}'\n")
    assert (p.key, p.line) == ("model.source", 2)
    assert "does not exist" in p.message


def test_model_paths_resolve_against_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    for source in ["./models/mine", "models/mine", "m.gguf", str(tmp_path / "m.gguf")]:
        assert parse(f"[model]\nsource = '{source}'\n").model.source == source  # kept as written


def test_hub_ids_are_accepted_without_checking_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse("[model]\nsource = 'HuggingFaceTB/SmolLM2-135M'\n").model.source == "HuggingFaceTB/SmolLM2-135M"
    p = only("[model]\nsource = 'org/na me'\n")
    assert p.key == "model.source" and "neither" in p.message


def test_unknown_embedded_model():
    p = only("[model]\nsource = 'embedded:smollm2'\n")
    assert (p.key, p.suggestion) == ("model.source", "embedded:smollm2-135m")
    assert p.allowed == "embedded:smollm2-135m, embedded:smollm2-135m-mha"


def test_calibration_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.jsonl").write_text('{"text": "hi"}\n')
    for name in ["embedded:wiki-vital", "wikitext2", "ptb", "c4", "mine.jsonl"]:
        assert parse(f"[calibration]\ndataset = '{name}'\n").calibration.dataset == name
    p = only("[calibration]\ndataset = 'missing.txt'\n")
    assert (p.key, p.line) == ("calibration.dataset", 2)
    assert "does not exist" in p.message and str(tmp_path / "missing.txt") in p.message
    p = only("[calibration]\ndataset = 'wikitext'\n")
    assert (p.suggestion, p.key) == ("wikitext2", "calibration.dataset")
    assert "c4" in p.allowed


def test_targets_regex_must_compile():
    p = only("[compression]\ntargets = ['q_proj', 're:mlp\\\\.(up']\n")
    assert (p.key, p.line) == ("compression.targets[1]", 2)
    assert "invalid regular expression" in p.message


def test_targets_and_ignore_shapes():
    p = only("[compression]\ntargets = []\n")
    assert p.key == "compression.targets" and "empty" in p.message
    p = only("[compression]\nignore = 'lm_head'\n")
    assert p.key == "compression.ignore" and "expected a list" in p.message
    p = only("[compression]\nignore = ['ok', 3]\n")
    assert p.key == "compression.ignore[1]"


# --------------------------------------------------------------------------- many at once, files


def test_all_problems_are_reported_together():
    text = """name = 7
[model]
dtype = "fp32"
[calibration]
samples = -1
[compresion]
ratio = 0.3
[compression]
ratio = 1.2
allocator = "unifrom"
[[evaluate]]
evaluator = "perplexity"
max_windowz = 3
"""
    found = problems(text)
    # In file order, whatever order they were found in.
    assert [(p.key, p.line) for p in found] == [
        ("name", 1),
        ("model.dtype", 3),
        ("calibration.samples", 5),
        ("compresion", 6),
        ("compression.ratio", 9),
        ("compression.allocator", 10),
        ("evaluate[0].max_windowz", 13),
    ]
    message = str(ProfileError(found))
    assert message.count("\n") == len(found) - 1
    assert "p.toml:13: evaluate[0].max_windowz: unknown option" in message
    assert "did you mean 'max_windows'?" in message


def test_missing_file_is_one_problem_with_a_suggestion(tmp_path):
    (tmp_path / "quickstart.toml").write_text("")
    with pytest.raises(ProfileError) as info:
        load_profile(tmp_path / "quikstart.toml", registry=REGISTRY)
    [p] = info.value.problems
    assert p.file == str(tmp_path / "quikstart.toml") and "not found" in p.message
    assert p.suggestion == str(tmp_path / "quickstart.toml")
    with pytest.raises(ProfileError, match="directory"):
        load_profile(tmp_path, registry=REGISTRY)
    (tmp_path / "bad.toml").write_bytes(b"name = '\xff'\n")
    with pytest.raises(ProfileError, match="UTF-8"):
        load_profile(tmp_path / "bad.toml", registry=REGISTRY)


def test_problems_name_the_file_they_came_from(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[compression]\nratio = 2\n")
    [p] = validate_profile(path, registry=REGISTRY)
    assert (p.file, p.line) == (str(path), 2)


# --------------------------------------------------------------------------- locating keys


def test_key_lines_follow_headers_dotted_keys_and_inline_tables():
    text = """# comment = 1
compression.ratio = 0.1
description = '''
fake = 1
'''
[compression]
allocator_options.beta = 0.3
group_size = { q_proj = 2, nested = { k = 1 } }
[[evaluate]]
evaluator = "a"
[[evaluate]]
evaluator = "b"
[evaluate.extra]
x = 1
"""
    lines = key_lines(text)
    assert lines["compression.ratio"] == 2
    assert "fake" not in lines and "comment" not in lines
    assert lines["compression"] == 2  # its first appearance
    assert lines["compression.allocator_options.beta"] == 7
    assert lines["compression.group_size.nested.k"] == 8
    assert lines["evaluate[1].evaluator"] == 12
    assert lines["evaluate[1].extra.x"] == 14
    assert find_line(lines, "evaluate[1].missing") == 11
    assert find_line(lines, "output.dir") is None


# --------------------------------------------------------------------------- the real plugins


def test_quickstart_with_the_real_registry():
    pytest.importorskip("workbench_allocators")
    pytest.importorskip("workbench_evaluators")
    from workbench.registry import get_registry

    registry = get_registry()
    if "uniform" not in registry.allocators or "perplexity" not in registry.evaluators:
        pytest.skip("built-in uniform allocator / perplexity evaluator not registered yet")
    profile = load_profile(QUICKSTART)  # registry=None: the loaded plugins
    assert profile.evaluate[0].options["max_windows"] == 16
    assert parse_profile(profile.to_toml()) == profile
    with pytest.raises(ProfileError) as info:
        parse_profile("[compression]\nallocator = 'unifrom'\n")
    assert info.value.problems[0].suggestion == "uniform"


# --------------------------------------------------------------------------- never a traceback

_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["embedded:smollm2-135m", "re:(", "re:q_.*", "q_proj", "/", "~", "a/b", "x.gguf", "c4", "uniform", "perplexity", "cuda:0"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["q_proj", "beta", "x"]), inner, max_size=3),
    max_leaves=6,
)
# Per key: values that are valid (so some documents parse and must round-trip) or anything at all.
_NAMES = st.sampled_from(["q_proj", "k_proj", "re:mlp\\..*", "re:^o_"])
_GOOD = {
    "source": st.sampled_from(["embedded:smollm2-135m", "org/name", "gpt2"]),
    "dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
    "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:7"]),
    "dataset": st.sampled_from(["embedded:wiki-vital", "wikitext2", "ptb", "c4"]),
    "samples": st.integers(1, 10**6),
    "seq_len": st.integers(8, 10**6),
    "seed": st.integers(0, 2**32 - 1),
    "batch_size": st.integers(1, 64),
    "ratio": st.floats(0, 1, exclude_max=True) | st.integers(0, 0),
    "group_size": st.integers(1, 8) | st.dictionaries(_NAMES, st.integers(1, 8), max_size=2),
    "targets": st.lists(_NAMES, min_size=1, max_size=3),
    "ignore": st.lists(_NAMES, max_size=3),
    "whitening": st.sampled_from(["cholesky", "eigen"]),
    "dir": st.text("abc/_-. ", min_size=1, max_size=10).filter(str.strip),
    "save_model": st.booleans(),
    "name": st.text(max_size=10),
    "description": st.text(max_size=20),
}
_KEYS = {
    "model": ["source", "dtype", "device", "sourc"],
    "calibration": ["dataset", "samples", "seq_len", "seed", "batch_size"],
    "compression": ["ratio", "group_size", "targets", "ignore", "whitening"],
    "output": ["dir", "save_model"],
}


def _value(draw, key):
    return draw(_GOOD[key] | _VALUES) if key in _GOOD else draw(_VALUES)


@st.composite
def _documents(draw):
    doc = {}
    for section, keys in _KEYS.items():
        if draw(st.booleans()):
            doc[section] = {k: _value(draw, k) for k in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True))}
    if draw(st.booleans()):
        doc["compression"] = {**doc.get("compression", {}), "allocator": draw(st.sampled_from(["uniform", "rebalanced", "nope"]))}
        options = st.fixed_dictionaries({}, optional={"beta": st.floats(0, 1), "iterations": st.integers(1, 9)})
        doc["compression"]["allocator_options"] = draw(options | st.dictionaries(st.sampled_from(["beta", "b"]), _VALUES, max_size=2))
    if draw(st.booleans()):
        doc["evaluate"] = draw(
            st.lists(
                st.dictionaries(st.sampled_from(["evaluator", "dataset", "seq_len", "max_windows", "tasks"]), _VALUES, max_size=4)
                | st.fixed_dictionaries(
                    {"evaluator": st.sampled_from(["perplexity", "ppl"])},
                    optional={"seq_len": st.integers(8, 4096), "max_windows": st.integers(1, 99), "dataset": st.text(max_size=5)},
                ),
                max_size=3,
            )
        )
    for key in draw(st.lists(st.sampled_from(["name", "description", "ratio", "compresion"]), max_size=2, unique=True)):
        doc[key] = _value(draw, key) if key in ("name", "description") else draw(_VALUES)
    return tomlkit.dumps(doc)


def _never_a_traceback(text: str) -> None:
    try:
        profile = parse(text)
    except ProfileError as exc:
        assert exc.problems, "a ProfileError must carry at least one problem"
        for p in exc.problems:
            assert p.file == "p.toml" and isinstance(p.key, str) and str(p)
        return
    assert isinstance(profile, Profile)
    assert parse(profile.to_toml()) == profile


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents())
def test_random_documents_give_a_profile_or_a_profile_error(text):
    _never_a_traceback(text)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mangled_quickstart_gives_a_profile_or_a_profile_error(data):
    text = QUICKSTART.read_text()
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 20)))
    insert = data.draw(st.text(alphabet="[]{}=\"'.,#\n abc0123-:", max_size=8))
    _never_a_traceback(text[:start] + insert + text[end:])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_text_gives_a_profile_or_a_profile_error(text):
    _never_a_traceback(text)

