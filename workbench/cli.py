"""The headless command line: `workbench run`, `workbench inspect`, `workbench profile validate`, `workbench plugins`.

Imports nothing from Textual. Exit codes are `workbench.errors.ExitCode`.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from workbench import __version__
from workbench.errors import ExitCode, Interrupted, ProfileError, WorkbenchError

app = typer.Typer(add_completion=False, help="Compress LLMs with whitened, low-rank SVD.", rich_markup_mode=None)
profile_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Work with profiles.")
app.add_typer(profile_app, name="profile")

err = Console(stderr=True, highlight=False, soft_wrap=True)  # messages stay whole lines for grep


def _fail(exc: WorkbenchError) -> "typer.Exit":
    if isinstance(exc, ProfileError):
        err.print(f"[bold red]profile error[/] ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}):")
        for problem in exc.problems:
            err.print(f"  {problem}", markup=False)
    elif isinstance(exc, Interrupted):
        err.print(f"[yellow]interrupted[/]: {exc}; nothing was written to the output directory", highlight=False)
    else:
        label = "error" if exc.exit_code == ExitCode.USAGE else "run failed"
        err.print(f"[bold red]{label}[/]: ", end="")
        err.print(str(exc), markup=False)
    return typer.Exit(int(exc.exit_code))


def _warn_plugin_failures(registry) -> None:
    for failure in registry.failures:
        err.print("[yellow]warning[/]: ", end="")
        err.print(str(failure), markup=False)  # a plugin's message may contain [brackets]


def _version(value: bool) -> None:
    if value:
        print(f"workbench {__version__}")
        raise typer.Exit(0)


@app.callback(invoke_without_command=True)
def _main(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")) -> None:
    """Compress LLMs with whitened, low-rank SVD (SVD-LLM, Basis Sharing, D-Rank).

    With no command, opens the interactive app on ./profiles (same as `workbench tui`).
    """
    if ctx.invoked_subcommand is None:
        _open_app(Path("profiles"), None)


def _open_app(profiles: Path, runs: Optional[Path]) -> None:
    # Imported here so the headless commands never load Textual.
    try:
        from workbench.tui import main as app_main
    except ImportError as exc:
        err.print(f"[bold red]error[/]: the interactive app needs Textual ({exc}); "
                  "`pip install textual` or use `workbench run PROFILE`")
        raise typer.Exit(int(ExitCode.USAGE)) from None
    app_main(profiles, runs)


@app.command()
def tui(profiles: Path = typer.Option(Path("profiles"), "--profiles", help="Folder of profiles to manage."),
        runs: Optional[Path] = typer.Option(None, "--runs", help="Folder of run outputs (default ./runs).")) -> None:
    """Open the interactive app: manage profiles, launch runs, watch them live, compare results."""
    _open_app(profiles, runs)


class _Interrupts:
    """First Ctrl-C / SIGTERM asks the engine to stop at its next safe point; a second one forces it."""

    def __init__(self, cancel) -> None:
        self.cancel = cancel
        self._previous = {}

    def _handler(self, signum, frame):
        if self.cancel.cancelled:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        self.cancel.cancel(f"{name} received")
        err.print(f"[yellow]{name}: stopping at the next safe point (again to force)[/]")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@app.command()
def run(
    profile_path: Path = typer.Argument(..., metavar="PROFILE", help="The profile (TOML) to run."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory (overrides [output] dir)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory (atomically); "
                               "without --resume, also start over from an interrupted run's checkpoint."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint an interrupted run left in "
                                "<output dir>.work/ (from the beginning if there is none)."),
    skip_preflight: bool = typer.Option(False, "--skip-preflight", help="Run even when the disk or memory "
                                        "estimate says the run will not fit."),
    log_format: str = typer.Option("auto", "--log-format", help="auto | live | plain | json"),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback when the run fails."),
) -> None:
    """Compress, evaluate and write report.json (and the model) into the output directory."""
    from workbench.render.display import make_renderer, print_summary
    from workbench.events import CancelToken, EventBus
    from workbench.run.pipeline import run_safely
    from workbench.registry import get_registry
    from workbench.profile.schema import load_profile

    out = Console(highlight=False)
    try:
        registry = get_registry()
        _warn_plugin_failures(registry)
        profile = load_profile(profile_path, registry)
        renderer = make_renderer(log_format, out if log_format != "json" else Console(file=sys.stdout))
        cancel = CancelToken()
        with _Interrupts(cancel), renderer:
            bus = EventBus([renderer])
            try:
                report = run_safely(profile, output_dir=output, force=force, events=bus, cancel=cancel,
                                    registry=registry, resume=resume, preflight=not skip_preflight)
            except KeyboardInterrupt as exc:
                forced = Interrupted("forced by a second interrupt")
                forced.checkpoint = getattr(exc, "checkpoint", None)
                raise forced from None
        if log_format != "json":
            print_summary(out, report)
    except WorkbenchError as exc:
        if debug and exc.__cause__ is not None:
            err.print_exception()
        exit_ = _fail(exc)
        if exc.checkpoint is not None:
            again = f"workbench run {profile_path}" + (f" --output {output}" if output else "") + " --resume" + (
                " --force" if force else "")
            err.print(f"progress so far is checkpointed in {exc.checkpoint}; continue with: {again}", markup=False)
        raise exit_ from None


@app.command()
def inspect(
    profile_path: Path = typer.Argument(..., metavar="PROFILE", help="The profile (TOML) whose model and calibration to use."),
    allocators: Optional[str] = typer.Option(None, "--allocators", help="Comma-separated allocators (default: all installed)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Ratio to allocate for (default: the profile's)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the rank map as a PNG (needs matplotlib)."),
) -> None:
    """Per layer and matrix type: effective rank and the ranks each allocator would give, without compressing."""
    from workbench.registry import get_registry
    from workbench.profile.schema import load_profile
    from workbench.run.rank_map import plot_png, rank_map, render_table

    try:
        registry = get_registry()
        profile = load_profile(profile_path, registry)
        names = [n.strip() for n in allocators.split(",") if n.strip()] if allocators else None
        data = rank_map(profile, registry, names, ratio)
    except WorkbenchError as exc:
        raise _fail(exc) from None
    typer.echo(json.dumps(data, indent=2) if as_json else render_table(data))
    if plot is not None:
        try:
            plot_png(data, plot)
        except ImportError as exc:
            err.print(f"[bold red]error[/]: {exc}", markup=True)
            raise typer.Exit(int(ExitCode.USAGE)) from None


@profile_app.command("validate")
def validate(files: list[Path] = typer.Argument(..., metavar="FILE...", help="Profiles to check.")) -> None:
    """Check profiles against the schema and the options each plugin declares."""
    from workbench.registry import get_registry
    from workbench.profile.schema import load_profile

    try:
        registry = get_registry()
    except WorkbenchError as exc:  # a broken plugin under WORKBENCH_STRICT_PLUGINS
        raise _fail(exc) from None
    _warn_plugin_failures(registry)  # a profile naming a plugin that failed would read "unknown" otherwise
    worst = ExitCode.OK
    for path in files:
        try:
            load_profile(path, registry)
            typer.echo(f"{path}: ok")
        except WorkbenchError as exc:
            _fail(exc)
            worst = max(worst, exc.exit_code)
    raise typer.Exit(int(worst))


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List loaded plugins, what each provides, and plugins that failed to load."""
    from workbench.registry import get_registry

    try:
        registry = get_registry()
    except WorkbenchError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps({
            "plugins": [vars(p) for p in registry.plugins],
            "failures": [vars(f) for f in registry.failures],
        }, indent=2))
        return
    table = Table(title="workbench plugins")
    for column in ("plugin", "distribution", "version", "provides"):
        table.add_column(column)
    for p in registry.plugins:
        table.add_row(p.name, p.distribution, p.version, ", ".join(p.provides))
    console = Console(highlight=False)
    console.print(table)
    for kind in ("allocator", "adapter", "evaluator"):
        items = registry.table(kind)
        if items:
            console.print(f"\n[bold]{kind}s[/]")
            for name, obj in items.items():
                console.print(f"  {name:<18} {obj.description}", markup=False)
    for failure in registry.failures:
        console.print("[red]failed[/]: ", end="")
        console.print(str(failure), markup=False, soft_wrap=True)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(int(ExitCode.INTERRUPTED))


if __name__ == "__main__":
    main()
