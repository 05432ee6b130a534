"""Zero-shot tasks of EleutherAI's lm-evaluation-harness on the in-memory model.

An optional extra (`pip install 'workbench[lm-eval]'`). The model is handed to lm-eval as it is,
wrapped in its HFLM class: nothing is saved and reloaded, so the compressed model's LowRankLinear
modules are what gets evaluated. Tasks run one at a time (progress and cancellation between
tasks), 0-shot, with lm-eval's own prompts and metrics: `acc`, and `acc_norm` where a task has
it. The headline is the mean `acc` over the tasks, as the papers report it.

Datasets come from the local `datasets` cache only, as everywhere in workbench: `HF_DATASETS_OFFLINE`
is set unless you set it yourself (to 0, on a machine with network, to download them once).
`include_path` adds a folder of task YAML files, e.g. a task over a local jsonl file.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from workbench.api import EvalContext, EvalResult, Evaluator, Option, UsageError, nearest

DEFAULT_TASKS = ("openbookqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag", "piqa", "mathqa")
INSTALL = "pip install 'workbench[lm-eval]'"


def _import_lm_eval():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` reads its config
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise UsageError(f"evaluator 'lm-eval' needs the optional lm-evaluation-harness ({err}); {INSTALL}") from None
    return lm_eval, HFLM, TaskManager


def _check_tasks(tasks: Any, known: list[str]) -> list[str]:
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise UsageError(f"lm-eval: tasks must be a non-empty list of task names, got {tasks!r}")
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = [f"{t!r} (did you mean {nearest(t, known)!r}?)" if nearest(t, known) else repr(t) for t in unknown]
        raise UsageError(f"lm-eval: unknown task(s) {', '.join(hints)}; `lm-eval ls tasks` lists them, "
                         "and include_path adds a folder of your own task YAML files")
    return tasks


def _task_manager(task_manager_class: Any, include_path: str, tasks: Any) -> Any:
    """lm-eval's task index; only `include_path`'s when it holds every task asked for, which skips
    indexing the thousands of built-in task files (~10 s)."""
    if include_path:
        local = task_manager_class(include_path=include_path, include_defaults=False)
        if isinstance(tasks, list) and all(t in local.all_tasks for t in tasks):
            return local
    return task_manager_class(include_path=include_path or None)


def task_scores(result: Mapping[str, Any], task: str) -> dict[str, float | int]:
    """acc (and acc_norm, stderr, sample count) of one task from lm-eval's result dictionary."""
    row = result["results"][task]
    if "acc,none" not in row:
        raise RuntimeError(f"lm-eval task {task!r} reports no accuracy (metrics: {', '.join(sorted(row))})")
    scores: dict[str, float | int] = {"acc": float(row["acc,none"])}
    for metric in ("acc_norm", "acc_stderr", "acc_norm_stderr"):
        value = row.get(f"{metric},none")
        if isinstance(value, (int, float)):
            scores[metric] = float(value)
    samples = result.get("n-samples", {}).get(task, {})
    if "effective" in samples:
        scores["samples"] = int(samples["effective"])
    return scores


class LmEvalEvaluator(Evaluator):
    name = "lm-eval"
    description = ("lm-evaluation-harness tasks, 0-shot, on the in-memory model: accuracy per task and their mean "
                   f"(higher is better; optional extra: {INSTALL}).")
    cacheable = True
    options = (
        Option("tasks", list, list(DEFAULT_TASKS), "lm-eval task names"),
        Option("limit", int, 0, "examples per task (0: all)", min=0),
        Option("batch_size", int, 8, "requests per forward pass", min=1),
        Option("include_path", str, "", "a folder of extra task YAML files (e.g. tasks over local files)"),
    )

    def evaluate(self, model: Any, tokenizer: Any, options: Mapping[str, Any], ctx: EvalContext) -> EvalResult:
        lm_eval, HFLM, TaskManager = _import_lm_eval()  # noqa: N806 - classes
        opts = {o.name: o.default for o in self.options}
        opts.update(options)
        if opts["include_path"] and not os.path.isdir(opts["include_path"]):
            raise UsageError(f"lm-eval: include_path {opts['include_path']!r} is not a folder")
        manager = _task_manager(TaskManager, opts["include_path"], opts["tasks"])
        tasks = _check_tasks(list(opts["tasks"]), manager.all_tasks)

        was_training = model.training
        # trust_remote_code=False: never run code shipped with a model (docs/reliability.md)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=opts["batch_size"], trust_remote_code=False)
        per_task: dict[str, dict[str, float | int]] = {}
        try:
            for i, task in enumerate(tasks):
                ctx.cancel.check()
                ctx.events.progress("evaluate", i, len(tasks), message=f"lm-eval {task} ({ctx.label})",
                                    data={"unit": "task"})
                try:
                    # No global seeding (None): 0-shot needs no randomness, and the run's RNG stays ours.
                    result = lm_eval.simple_evaluate(
                        model=lm, tasks=[task], num_fewshot=0, limit=opts["limit"] or None, task_manager=manager,
                        log_samples=False, confirm_run_unsafe_code=False, random_seed=None, numpy_random_seed=None,
                        torch_random_seed=None,
                    )
                except Exception as err:  # noqa: BLE001 - a missing dataset surfaces as many types
                    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    raise RuntimeError(
                        f"lm-eval task {task!r} failed ({type(err).__name__}: {first}); if its dataset is not in the "
                        "local datasets cache, run once with HF_DATASETS_OFFLINE=0 on a machine with network"
                    ) from err
                per_task[task] = task_scores(result, task)
            ctx.events.progress("evaluate", len(tasks), len(tasks), message=f"lm-eval ({ctx.label})",
                                data={"unit": "task"})
        finally:
            model.train(was_training)  # HFLM switches the model to eval mode

        examples = f"the first {opts['limit']} examples" if opts["limit"] else "all examples"
        average = sum(s["acc"] for s in per_task.values()) / len(per_task)
        figures: dict[str, float] = {}
        for task, scores in per_task.items():
            figures[f"{task} acc"] = scores["acc"]
            if "acc_norm" in scores:
                figures[f"{task} acc_norm"] = scores["acc_norm"]
        return EvalResult(
            dataset=", ".join(tasks),
            metric="average accuracy",
            value=average,
            details={
                "tasks": per_task,
                "figures": figures,
                "lm_eval_version": getattr(lm_eval, "__version__", "?"),
                "limit": opts["limit"],
                "protocol": ("lm-evaluation-harness, 0-shot, its prompts and log-likelihood scoring; "
                             f"{examples} per task; the headline is the mean acc over tasks"),
            },
        )
