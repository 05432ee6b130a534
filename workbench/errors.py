"""Exceptions and exit codes shared by the CLI, the app and the engine."""

from __future__ import annotations

import enum
from contextlib import contextmanager
from dataclasses import dataclass


class ExitCode(enum.IntEnum):
    """Public exit codes of `workbench run` and friends (README.md, "Exit codes"): a stable contract."""

    OK = 0
    FAILED = 1
    USAGE = 2
    INTERRUPTED = 130


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a profile or an option, phrased for the user."""

    file: str
    key: str
    message: str
    line: int | None = None
    allowed: str | None = None
    suggestion: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
        text = f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
        if self.allowed:
            text += f" (allowed: {self.allowed})"
        if self.suggestion:
            text += f"; did you mean '{self.suggestion}'?"
        return text


class WorkbenchError(Exception):
    """Base class: an error with a message meant for the user, no traceback needed."""

    exit_code = ExitCode.FAILED
    checkpoint = None  # the work directory an interrupted or failed run left to resume from, if any


class UsageError(WorkbenchError):
    """Bad input that the user must change (exit 2)."""

    exit_code = ExitCode.USAGE


class ProfileError(UsageError):
    """A profile with one or more problems."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RunFailed(WorkbenchError):
    """The run failed somewhere; the message says where (exit 1)."""


class PluginError(RunFailed):
    """A plugin misbehaved; the message names it."""


class Interrupted(WorkbenchError):
    """The run was cancelled (Ctrl-C, SIGTERM, the app's cancel) at a safe point."""

    exit_code = ExitCode.INTERRUPTED


@contextmanager
def blame(culprit: str, doing: str):
    """Turn an unexpected error (or sys.exit) inside a plugin's code into a PluginError naming it.

    `culprit` says whose code runs ("adapter 'llama'"), `doing` what it was asked to do.
    """
    try:
        yield
    except (WorkbenchError, KeyboardInterrupt):
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - contained and named
        raise PluginError(f"{culprit} failed while {doing}: {type(exc).__name__}: {exc}") from exc
