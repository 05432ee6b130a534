"""The profiles screen: every profile in the folder with its key facts; create, copy, rename, delete,
edit, and run the selected one."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from workbench.render.literal import escaped, literal
from workbench.tui.profiles_store import (
    ProfileEntry,
    check_stem,
    create_profile,
    delete_profile,
    duplicate_profile,
    list_profiles,
    rename_profile,
)
from workbench.tui.screens.dialogs import ConfirmDialog, NameDialog

COLUMNS = ("profile", "model", "ratio", "allocator", "group", "evaluators")


class ProfilesScreen(Screen):
    BINDINGS = [
        Binding("r", "run", "Run"),
        Binding("e,enter", "edit", "Edit", key_display="e"),
        Binding("n", "new", "New"),
        Binding("c", "copy", "Dup"),
        Binding("m", "rename", "Rename"),
        Binding("x,delete", "delete", "Del", key_display="x"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[ProfileEntry] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="profiles-title", classes="title")
        yield DataTable(id="profiles", cursor_type="row", zebra_stripes=True)
        yield Static("", id="profile-detail", classes="detail")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "Profiles"
        self.query_one(DataTable).add_columns(*COLUMNS)
        self.reload()

    def on_screen_resume(self) -> None:
        self.reload()

    @property
    def folder(self) -> Path:
        return self.app.profiles_dir

    def reload(self, select: Path | None = None) -> None:
        table = self.query_one(DataTable)
        current = select or (self.selected.path if self.selected else None)
        self.entries = list_profiles(self.folder, self.app.registry)
        table.clear()
        for e in self.entries:
            name = f"{e.name} ⚠" if e.problem else e.name
            table.add_row(*map(literal, (name, e.model, e.ratio, e.allocator, e.group_size, e.evaluators)),
                          key=str(e.path))
        rows = [e.path for e in self.entries]
        if current in rows:
            table.move_cursor(row=rows.index(current))
        count = f"{len(self.entries)} profile{'s' if len(self.entries) != 1 else ''}"
        title = f"{count} in {self.folder}/" if self.entries else f"No profiles in {self.folder}/ — press n to create one"
        self.query_one("#profiles-title", Static).update(literal(title))
        self._show_detail()

    @property
    def selected(self) -> ProfileEntry | None:
        table = self.query_one(DataTable)
        if not self.entries or table.cursor_row is None or not 0 <= table.cursor_row < len(self.entries):
            return None
        return self.entries[table.cursor_row]

    def on_data_table_row_highlighted(self, _: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def on_data_table_row_selected(self, _: DataTable.RowSelected) -> None:
        self.action_edit()

    def _show_detail(self) -> None:
        e = self.selected
        if e is None:
            text = ""
        elif e.problem:
            text = f"[b]⚠ {escaped(e.path.name)}[/b] does not validate (e to fix it):\n{escaped(e.problem)}"
        else:
            text = (f"{escaped(e.path)}  →  output {escaped(e.output_dir)}/\n"
                    "[dim]r run · e edit · c copy · m rename · x delete[/dim]")
        self.query_one("#profile-detail", Static).update(text)

    # ------------------------------------------------------------------ actions

    def action_run(self) -> None:
        if self.selected:
            self.app.request_run(self.selected.path)

    def action_edit(self) -> None:
        if self.selected:
            from workbench.tui.screens.editor import EditorScreen

            try:
                editor = EditorScreen(self.selected.path)
            except ValueError as exc:  # not TOML (or not readable): say so instead of crashing the app
                self.notify(str(exc), severity="error", timeout=10, markup=False)
                return
            self.app.push_screen(editor)

    def _ask_name(self, title: str, initial: str, then) -> None:
        def done(name: str | None) -> None:
            if name:
                try:
                    path = then(name)
                except (OSError, ValueError) as exc:
                    self.notify(str(exc), severity="error", markup=False)
                    return
                self.reload(select=path)

        self.app.push_screen(NameDialog(title, lambda n: check_stem(n, self.folder), initial), done)

    def action_new(self) -> None:
        def create(name: str) -> Path:
            path = create_profile(self.folder, name)
            from workbench.tui.screens.editor import EditorScreen

            self.app.push_screen(EditorScreen(path))
            return path

        self._ask_name("New profile: its name", "", create)

    def action_copy(self) -> None:
        if self.selected:
            source = self.selected.path
            self._ask_name(f"Copy {source.name} as", f"{source.stem}-copy", lambda n: duplicate_profile(source, n))

    def action_rename(self) -> None:
        if self.selected:
            source = self.selected.path
            self._ask_name(f"Rename {source.name} to", source.stem, lambda n: rename_profile(source, n))

    def action_delete(self) -> None:
        entry = self.selected
        if entry is None:
            return

        def answer(yes: bool | None) -> None:
            if yes:
                delete_profile(entry.path)
                self.notify(f"deleted {entry.path.name}", markup=False)
                self.reload()

        self.app.push_screen(ConfirmDialog(f"Delete {entry.path}?\n(runs it produced are kept)", yes="Delete"), answer)
