"""Built-in evaluators, registered through the same hook as any third-party plugin.

lm-eval is registered even when lm-evaluation-harness is not installed: it imports the harness
only when it runs, and then says how to install it.
"""

from __future__ import annotations

from workbench.api import hookimpl
from workbench_evaluators.choice import ChoiceEvaluator
from workbench_evaluators.lm_eval_harness import LmEvalEvaluator
from workbench_evaluators.memory import MemoryEvaluator
from workbench_evaluators.perplexity import PerplexityEvaluator, perplexity
from workbench_evaluators.throughput import ThroughputEvaluator

__all__ = [
    "ChoiceEvaluator",
    "LmEvalEvaluator",
    "MemoryEvaluator",
    "PerplexityEvaluator",
    "ThroughputEvaluator",
    "perplexity",
    "register_evaluators",
]


@hookimpl
def register_evaluators(register):
    for evaluator in (PerplexityEvaluator(), ChoiceEvaluator(), ThroughputEvaluator(), MemoryEvaluator(),
                      LmEvalEvaluator()):
        register(evaluator)
