"""The profile editor: a form built from the profile schema and the plugins' declared options,
checked as you type with the messages of `workbench profile validate`, and a raw TOML view.

Edits go into a tomlkit document, so saving keeps the file's comments and layout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import tomlkit
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, Select, Static, TabbedContent, TabPane, TextArea

from workbench.tui.form_model import (REMOVE, Field, build_sections, format_value, get_value, load_document, parse_input,
                                      problems, set_value)
from workbench.render.literal import literal
from workbench.tui.screens.dialogs import ConfirmDialog

# Changing one of these changes which option fields exist, so the form is rebuilt.
_SHAPING = re.compile(r"^(compression\.allocator|evaluate\[\d+\]\.evaluator)$")


def widget_id(field: Field) -> str:
    return "f-" + re.sub(r"[^A-Za-z0-9_-]", "_", field.dotted)


class EditorScreen(Screen):
    BINDINGS = [
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("ctrl+t", "toggle_view", "Form/TOML", priority=True),
        Binding("escape", "close", "Back"),
    ]

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.doc = load_document(self.path)  # ValueError for a file that is not TOML: the caller says so
        self.fields: dict[str, Field] = {}
        self.dirty = False
        self._from_raw = False  # the raw view was shown, so going back to the form must re-read it

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(id="editor-tabs"):
            with TabPane("Form", id="form-tab"):
                yield VerticalScroll(id="form")
            with TabPane("TOML", id="toml-tab"):
                yield TextArea(id="raw", show_line_numbers=True)
        yield Static("", id="field-help", classes="hint")
        yield Static("", id="problems")
        yield Footer(compact=True)

    async def on_mount(self) -> None:
        self.sub_title = f"Edit {self.path}"
        await self.build_form()
        self.validate()

    # ------------------------------------------------------------------ the form

    async def build_form(self) -> None:
        form = self.query_one("#form", VerticalScroll)
        focused = self.focused.id if self.focused else None
        await form.remove_children()
        self.fields = {}
        rows = []
        for section in build_sections(self.doc, self.app.registry):
            rows.append(Label(section.title, classes="section", markup=False))  # "[model]" is not markup
            for field in section.fields:
                self.fields[widget_id(field)] = field
                rows.append(Horizontal(Label(field.key[-1], classes="field-label", markup=False), self._input(field),
                                       classes="row"))
        await form.mount_all(rows)
        if focused and focused in self.fields:
            self.query_one(f"#{focused}").focus()

    def _input(self, field: Field) -> Any:
        value = get_value(self.doc, field.key)
        if field.choices is not None:
            options = [(literal(format_value(c) if not isinstance(c, str) else c), c) for c in field.choices]
            default = field.option.default
            return Select(options, value=value if value in field.choices else Select.NULL, allow_blank=True,
                          prompt=f"default ({format_value(default)})" if default is not None else "(unset)",
                          compact=True, id=widget_id(field), classes="field")
        default = field.option.default
        placeholder = f"default: {format_value(default)}" if default not in (None, "", [], {}) else field.option.help
        return Input(format_value(value), placeholder=placeholder[:60], compact=True, id=widget_id(field), classes="field")

    async def _changed(self, widget_id_: str | None, value: Any) -> None:
        field = self.fields.get(widget_id_ or "")
        if field is None:
            return
        old = get_value(self.doc, field.key)
        if (value is REMOVE and old is None) or (value is not REMOVE and old == value and type(old) is type(value)):
            return  # a widget echoing the document back, not an edit
        set_value(self.doc, field.key, value)
        self.dirty = True
        self.validate()
        if _SHAPING.match(field.dotted):
            await self.build_form()

    async def on_input_changed(self, event: Input.Changed) -> None:
        field = self.fields.get(event.input.id or "")
        if field is not None:
            await self._changed(event.input.id, parse_input(event.value, field.option))

    async def on_select_changed(self, event: Select.Changed) -> None:
        value = REMOVE if event.value is Select.NULL else event.value
        await self._changed(event.select.id, value)

    def on_descendant_focus(self, event: Any) -> None:
        field = self.fields.get(getattr(event.widget, "id", None) or "")
        if field is not None:
            o = field.option
            default = f"; default {format_value(o.default)}" if o.default not in (None, "") else ""
            self.query_one("#field-help", Static).update(literal(f"{field.dotted}: {o.help} ({o.describe()}{default})"))

    # ------------------------------------------------------------------ checking, raw view, saving

    @property
    def raw_active(self) -> bool:
        return self.query_one(TabbedContent).active == "toml-tab"

    def text(self) -> str:
        return self.query_one("#raw", TextArea).text if self.raw_active else tomlkit.dumps(self.doc)

    def validate(self) -> list[str]:
        found = problems(self.text(), str(self.path), self.app.registry)
        box = self.query_one("#problems", Static)
        box.set_class(bool(found), "has-problems")
        if found:
            shown = found[:3] + ([f"… and {len(found) - 3} more"] if len(found) > 3 else [])
            box.update(literal("\n".join(f"✗ {p}" for p in shown)))
        else:
            box.update("✓ valid" + (" · unsaved changes (ctrl+s)" if self.dirty else ""))
        return found

    async def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        raw = self.query_one("#raw", TextArea)
        if event.pane.id == "toml-tab":
            raw.load_text(tomlkit.dumps(self.doc))
            self._from_raw = True
            return
        if not self._from_raw:
            return  # the first activation, at mount: the form already shows the document
        self._from_raw = False
        try:  # back to the form: the raw text becomes the document
            self.doc = tomlkit.parse(raw.text)
        except tomlkit.exceptions.ParseError as exc:
            self.notify(f"not valid TOML, the form shows the last valid version: {exc}", severity="error", markup=False)
            return
        await self.build_form()
        self.validate()

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        if self.raw_active and event.text_area.text != tomlkit.dumps(self.doc):
            self.dirty = True
            self.validate()

    def action_toggle_view(self) -> None:
        tabs = self.query_one(TabbedContent)
        tabs.active = "form-tab" if tabs.active == "toml-tab" else "toml-tab"

    def action_save(self) -> None:
        text = self.text()
        self.path.write_text(text, encoding="utf-8")
        if self.raw_active:
            try:
                self.doc = tomlkit.parse(text)
            except tomlkit.exceptions.ParseError:
                pass
        self.dirty = False
        found = self.validate()
        if found:
            self.notify(f"saved {self.path.name} with {len(found)} problem(s)", severity="warning", markup=False)
        else:
            self.notify(f"saved {self.path.name}", markup=False)

    def action_close(self) -> None:
        if not self.dirty:
            self.dismiss()
            return

        def answer(discard: bool | None) -> None:
            if discard:
                self.dismiss()

        self.app.push_screen(ConfirmDialog(f"Discard the unsaved changes to {self.path.name}?", yes="Discard"), answer)
