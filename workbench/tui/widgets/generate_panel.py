"""The Generate tab of a run's details: a prompt, the compressed model's continuation and, when asked,
the dense model's beside it (what `workbench generate --dense` prints).

Models load and decode in a thread worker, once per panel (kept for the next prompt), so the app
stays responsive; results come back through `call_from_thread`. Model output is shown literally:
it is data, and a stray "[/]" in it must not be read as markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Checkbox, Input, Static

from workbench.errors import WorkbenchError
from workbench.render.literal import literal

HINT = "greedy, {n} new tokens · Enter or Generate · a model loads on first use"


class GeneratePanel(Vertical):
    DEFAULT_CSS = """
    GeneratePanel { height: 1fr; }
    GeneratePanel #gen-row { height: 3; }
    GeneratePanel #gen-prompt { width: 1fr; }
    GeneratePanel #gen-dense { width: auto; }
    GeneratePanel #gen-status { height: 1; padding: 0 1; color: $text-muted; }
    GeneratePanel #gen-status.failed { color: $error; }
    GeneratePanel #gen-outputs { height: 1fr; }
    GeneratePanel .gen-column { width: 1fr; height: 1fr; border: round $primary; padding: 0 1; }
    GeneratePanel #gen-dense-column { display: none; }
    GeneratePanel.with-dense #gen-dense-column { display: block; }
    """

    def __init__(self, run_dir: Path, max_new_tokens: int = 40, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_dir = Path(run_dir)
        self.max_new_tokens = max_new_tokens
        self._models: dict[str, tuple[Any, Any]] = {}  # "compressed" / "dense" -> (model, tokenizer)
        self._run: Any = None  # the checked run directory, once the compressed model is loaded

    def compose(self) -> ComposeResult:
        with Horizontal(id="gen-row"):
            yield Input(placeholder="Text for the model to continue", id="gen-prompt")
            yield Checkbox("dense too", id="gen-dense")
            yield Button("Generate", id="gen-go", variant="primary")
        yield Static(literal(HINT.format(n=self.max_new_tokens)), id="gen-status")
        with Horizontal(id="gen-outputs"):
            with VerticalScroll(classes="gen-column", id="gen-compressed-column"):
                yield Static("", id="gen-compressed")
            with VerticalScroll(classes="gen-column", id="gen-dense-column"):
                yield Static("", id="gen-dense-text")

    def on_mount(self) -> None:
        self.query_one("#gen-compressed-column").border_title = "compressed"
        self.query_one("#gen-dense-column").border_title = "dense"

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self.set_class(event.value, "with-dense")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.start()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "gen-go":
            event.stop()
            self.start()

    def start(self) -> None:
        prompt = self.query_one("#gen-prompt", Input).value
        if not prompt.strip():
            self._status("type a prompt first", failed=True)
            return
        with_dense = self.query_one("#gen-dense", Checkbox).value
        for target in ("#gen-compressed", "#gen-dense-text"):
            self.query_one(target, Static).update("")
        self._status("generating…")
        self._generate(prompt, with_dense)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def _generate(self, prompt: str, with_dense: bool) -> None:
        from workbench.export.generation import Decoding, continuation

        decoding = Decoding(max_new_tokens=self.max_new_tokens)
        try:
            for kind, target in [("compressed", "#gen-compressed")] + ([("dense", "#gen-dense-text")] if with_dense else []):
                model, tokenizer = self._model(kind)
                text = continuation(model, tokenizer, prompt, decoding)
                self.app.call_from_thread(self._show, target, prompt, text)
            self.app.call_from_thread(self._status, HINT.format(n=self.max_new_tokens))
        except WorkbenchError as exc:
            self.app.call_from_thread(self._status, str(exc), True)
        except Exception as exc:  # noqa: BLE001 - the panel reports any failure instead of crashing the app
            self.app.call_from_thread(self._status, f"generation failed: {type(exc).__name__}: {exc}", True)

    def _model(self, kind: str) -> tuple[Any, Any]:
        """Loaded on first use, in the worker thread; kept for the next prompt."""
        from workbench.export.generation import load_dense_model, load_run_model

        if kind not in self._models:
            self.app.call_from_thread(self._status, f"loading the {kind} model…")
            if kind == "compressed":
                loaded = load_run_model(self.run_dir)
                self._models[kind] = (loaded.model, loaded.tokenizer)
                self._run = loaded.run
            else:
                if "compressed" not in self._models:
                    self._model("compressed")
                model, tokenizer, _ = load_dense_model(self._run)
                self._models[kind] = (model, tokenizer)
            self.app.call_from_thread(self._status, f"generating with the {kind} model…")
        return self._models[kind]

    def _show(self, target: str, prompt: str, text: str) -> None:
        self.query_one(target, Static).update(literal(prompt, "dim") + literal(text))

    def _status(self, message: str, failed: bool = False) -> None:
        status = self.query_one("#gen-status", Static)
        status.set_class(failed, "failed")
        status.update(literal(message))
