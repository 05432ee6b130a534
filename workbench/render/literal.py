"""The one way text from a user, a file or a plugin enters rich and Textual: literally.

Both libraries read plain `str` as console markup: `[b]` turns bold, a stray `[/]` raises
MarkupError. Profile names, paths, dataset names, plugin names and messages, metric names and
report fields are data, never markup, so they go through `literal` (a `rich.text.Text`, accepted by
rich tables and consoles and by Textual's Static, Label, DataTable, RichLog, ...) or, inside a
markup string workbench writes itself, through `escaped`.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.text import Text


def literal(value: Any, style: str = "") -> Text:
    """`value` as text shown exactly as written (str() of anything that is not a str)."""
    return Text(value if isinstance(value, str) else str(value), style=style, end="")


def escaped(value: Any) -> str:
    """`value` made safe to put inside a markup string: '[b]' is shown as '[b]', not bold."""
    return escape(value if isinstance(value, str) else str(value))
