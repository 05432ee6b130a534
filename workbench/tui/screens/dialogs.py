"""Small modal dialogs: yes/no, and a name prompt checked as you type."""

from __future__ import annotations

from typing import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from workbench.render.literal import literal


class ConfirmDialog(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "answer(False)", "No"), Binding("y", "answer(True)", "Yes", show=False),
                Binding("n", "answer(False)", "No", show=False)]

    def __init__(self, question: str, yes: str = "Yes", no: str = "No") -> None:
        super().__init__()
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(literal(self.question), classes="question")  # paths and names, never markup
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes} (y)", variant="error", id="yes")
                yield Button(f"{self.no} (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()  # the safe answer is the default

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class NameDialog(ModalScreen[str | None]):
    """Ask for a profile name; `check(name)` returns why it is not allowed, or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, check: Callable[[str], str | None], initial: str = "") -> None:
        super().__init__()
        self.title_text, self.check, self.initial = title, check, initial

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(literal(self.title_text), classes="question")
            yield Input(self.initial, placeholder="profile name (the file is NAME.toml)", id="name")
            yield Static("", id="name-problem", classes="problem")
            yield Static("enter: OK   escape: cancel", classes="hint")

    def on_input_changed(self, event: Input.Changed) -> None:
        problem = self.check(event.value) if event.value else None
        self.query_one("#name-problem", Static).update(literal(problem or ""))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        problem = self.check(event.value)
        if problem:
            self.query_one("#name-problem", Static).update(literal(problem))
            return
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
