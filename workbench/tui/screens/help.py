"""The help screen: what each screen is for and its keys (also always shown in the footer)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# workbench

Compress a model in three steps: **pick a profile**, **run it**, **compare the results**.

| key | anywhere |
|---|---|
| `1` `2` `3` | profiles, run, results screens |
| `?` / `F1` | this help |
| `q` / `ctrl+q` | quit (asks first while a run is going) |
| `tab` / arrows | move between widgets and rows |

| key | profiles |
|---|---|
| `r` | run the selected profile (asks before replacing an existing output) |
| `e` / `enter` | edit it: a form checked as you type, `ctrl+t` for the raw TOML, `ctrl+s` saves |
| `n` `c` `m` `x` | new, duplicate (copy), rename (move), delete |

| key | run |
|---|---|
| `c` | cancel the run; its output directory is left as it was |
| `d` | drop the last queued run |

| key | results |
|---|---|
| `space` | mark a run; `c` compares the marked runs (two or more) side by side |
| `d` / `enter` | the run's ranks per layer, effective ranks and report |

Runs go on while you switch screens; one runs at a time, the others wait in the queue.
The app runs the same pipeline as `workbench run` and writes the same `report.json`.
Set `NO_COLOR=1` for a monochrome display.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)
