"""Built-in evaluators, registered through the same hook as any third-party plugin."""

from __future__ import annotations

from workbench.hookspecs import hookimpl
from workbench_evaluators.perplexity import PerplexityEvaluator, perplexity

__all__ = ["PerplexityEvaluator", "perplexity", "register_evaluators"]


@hookimpl
def register_evaluators(register):
    register(PerplexityEvaluator())
