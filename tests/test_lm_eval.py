"""The lm-eval evaluator, offline, on a task defined over a local jsonl file (skipped without lm_eval)."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch

from workbench.errors import UsageError
from workbench.events import PROGRESS, CancelToken, EventBus
from workbench.api import EvalContext
from workbench_evaluators.choice import Question, answer_questions
from workbench_evaluators.lm_eval_harness import DEFAULT_TASKS, LmEvalEvaluator

WORDS = "the cat dog runs fast slow red blue green house tree river stone light dark old new big small".split()
TASK = "workbench_tiny_choice"


def _ctx(events=None):
    return EvalContext(device=torch.device("cpu"), events=EventBus([events.append] if events is not None else []),
                       cancel=CancelToken())


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A 0-shot multiple-choice lm-eval task over a jsonl file, and the same questions as Questions."""
    root = tmp_path_factory.mktemp("lm_eval_task")
    rng = random.Random(0)
    rows = []
    for _ in range(24):
        options = rng.sample(WORDS, 4)
        rows.append({"question": " ".join(rng.choice(WORDS) for _ in range(5)), "choices": options,
                     "answer": rng.randrange(4)})
    (root / "tiny.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'tiny.jsonl'}
  cache_dir: {root / 'hf_cache'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    questions = [Question(r["question"], tuple(r["choices"]), r["answer"]) for r in rows]
    return tasks, questions


@pytest.fixture(scope="module")
def tiny_lm(tiny_workspace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_workspace / "tiny-llama"
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_runs_offline_on_a_local_task_and_agrees_with_our_own_scoring(local_task, tiny_lm):
    pytest.importorskip("lm_eval")
    tasks, questions = local_task
    model, tokenizer = tiny_lm
    events = []
    result = LmEvalEvaluator().evaluate(model, tokenizer, {"tasks": [TASK], "include_path": str(tasks),
                                                           "batch_size": 8}, _ctx(events))
    scores = result.details["tasks"][TASK]
    assert (result.metric, result.dataset) == ("average accuracy", TASK)
    assert result.value == scores["acc"] and scores["samples"] == 24
    assert {"acc_norm", "acc_stderr"} <= set(scores)
    assert result.details["figures"] == {f"{TASK} acc": scores["acc"], f"{TASK} acc_norm": scores["acc_norm"]}
    # lm-eval's acc picks the highest summed log-likelihood: what our own scorer calls unnormalized.
    ours = answer_questions(model, tokenizer, questions)
    assert scores["acc"] == pytest.approx(ours["accuracy_unnormalized"])
    assert [(e.current, e.total) for e in events if e.kind == PROGRESS] == [(0, 1), (1, 1)]
    assert model.training is False


def test_limit_and_the_average_over_tasks(local_task, tiny_lm):
    pytest.importorskip("lm_eval")
    tasks, _ = local_task
    model, tokenizer = tiny_lm
    result = LmEvalEvaluator().evaluate(model, tokenizer, {"tasks": [TASK, TASK], "include_path": str(tasks),
                                                           "limit": 5}, _ctx())
    assert result.details["tasks"][TASK]["samples"] == 5
    assert result.value == result.details["tasks"][TASK]["acc"]  # the mean of two equal runs
    assert "first 5 examples" in result.details["protocol"]


def test_unknown_task_names_the_nearest_and_the_default_tasks_are_known(local_task, tiny_lm):
    pytest.importorskip("lm_eval")
    tasks, _ = local_task
    with pytest.raises(UsageError, match="unknown task\\(s\\) 'arc_easyy' \\(did you mean 'arc_easy'\\?\\);"):
        LmEvalEvaluator().evaluate(*tiny_lm, {"tasks": [*DEFAULT_TASKS, "arc_easyy"], "include_path": str(tasks)}, _ctx())


def test_without_lm_eval_the_message_says_how_to_install(monkeypatch, tiny_lm):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(UsageError, match=r"pip install 'workbench\[lm-eval\]'"):
        LmEvalEvaluator().evaluate(*tiny_lm, {}, _ctx())


def test_declared_defaults_are_the_papers_tasks():
    opts = {o.name: o.default for o in LmEvalEvaluator.options}
    assert opts["tasks"] == list(DEFAULT_TASKS) == ["openbookqa", "arc_easy", "arc_challenge", "winogrande",
                                                     "hellaswag", "piqa", "mathqa"]
    assert opts["limit"] == 0 and LmEvalEvaluator.cacheable


def test_a_run_evaluates_the_compressed_model_in_memory(local_task, tiny_workspace, tmp_path):
    pytest.importorskip("lm_eval")
    from typer.testing import CliRunner

    from conftest import tiny_profile
    from workbench.cli import app

    tasks, _ = local_task
    out = tmp_path / "out"
    extra = f'save_model = false\n[[evaluate]]\nevaluator = "lm-eval"\ntasks = ["{TASK}"]\ninclude_path = "{tasks}"\n'
    (tmp_path / "p.toml").write_text(tiny_profile(tiny_workspace, out, ratio=0.5, extra=extra))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "p.toml"), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    metric = report["metrics"][1]
    assert metric["evaluator"] == "lm-eval" and "error" not in metric
    assert metric["details"]["compressed"]["tasks"][TASK]["samples"] == 24
    assert 0 <= metric["compressed"] <= 1 and f"{TASK} acc" in (out / "report.md").read_text()
