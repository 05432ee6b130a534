"""The headless command line: `workbench run`, `workbench inspect`, `workbench profile validate`, `workbench plugins`.

Imports nothing from Textual. Exit codes are `workbench.errors.ExitCode`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys

# Signals first, before the imports below (about a third of a second): a Ctrl-C or SIGTERM that
# arrives while the program starts must end it as an interrupt (exit 130), not kill it by signal.
_INTERRUPTED = 130  # ExitCode.INTERRUPTED, known before anything else is imported


def _leave(code: int):
    """A handler for when nothing is left to stop cleanly: a signal ends the process with `code`, quietly."""
    def handler(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return handler


def _ignore_late_signals() -> None:
    """The last atexit handler: from here on Python resets its own handlers to the default action
    while it shuts down, so a signal would kill the process (exit 143) instead of keeping the code
    already decided. The process is about to end; ignoring them changes nothing else."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, signal.SIG_IGN)


def _handle_signals(handler) -> None:
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)


# started as the program: the `workbench` script, `python -m workbench.cli`, or `python -m workbench` (torchrun)
if os.path.basename(sys.argv[0]) == "workbench" or __name__ == "__main__" or sys.argv[0].endswith(
        os.path.join("workbench", "__main__.py")):
    _handle_signals(_leave(_INTERRUPTED))  # nothing is done yet: a signal simply ends it

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from workbench import __version__  # noqa: E402
from workbench.errors import ExitCode, Interrupted, ProfileError, UsageError, WorkbenchError  # noqa: E402
from workbench.render.literal import literal  # noqa: E402

app = typer.Typer(add_completion=False, help="Compress LLMs with whitened, low-rank SVD.", rich_markup_mode=None)
profile_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Work with profiles.")
app.add_typer(profile_app, name="profile")

err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)  # whole lines for grep; ":V:" stays


def _fail(exc: WorkbenchError) -> "typer.Exit":
    if isinstance(exc, ProfileError):
        err.print(f"[bold red]profile error[/] ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}):")
        for problem in exc.problems:
            err.print(f"  {problem}", markup=False)
    elif isinstance(exc, Interrupted):
        err.print("[yellow]interrupted[/]: ", end="")
        err.print(f"{exc}; nothing was written to the output directory", markup=False)
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
    code = app_main(profiles, runs)
    if code:  # the app crashed (Textual printed the error): never report success
        raise typer.Exit(int(ExitCode.FAILED))


@app.command()
def tui(profiles: Path = typer.Option(Path("profiles"), "--profiles", help="Folder of profiles to manage."),
        runs: Optional[Path] = typer.Option(None, "--runs", help="Folder of run outputs (default ./runs).")) -> None:
    """Open the interactive app: manage profiles, launch runs, watch them live, compare results."""
    _open_app(profiles, runs)


@contextlib.contextmanager
def _signals_meaning(handler):
    """SIGINT and SIGTERM go to `handler` for the duration, then back to what they did before."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _handle_signals(handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            if old is not None:  # None: set outside Python, cannot be restored from here
                signal.signal(sig, old)


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
    from workbench.run.live_memory import MemorySampler
    from workbench.run.pipeline import run_safely
    from workbench.run.distributed import launched_processes, start as start_processes, stop as stop_processes
    from workbench.registry import get_registry
    from workbench.profile.schema import load_profile

    out = Console(highlight=False, emoji=False)
    try:
        registry = get_registry()
        _warn_plugin_failures(registry)
        profile = load_profile(profile_path, registry)
        processes = start_processes(profile)  # under torchrun: join the job's other processes
        leader = processes is None or processes.leader  # process 0 alone shows the run
        renderer = make_renderer(log_format, out if log_format != "json" else Console(file=sys.stdout)) if leader \
            else contextlib.nullcontext()
        cancel = CancelToken()
        with _Interrupts(cancel), renderer:
            bus = EventBus([renderer] if leader else [])
            try:
                # Host RSS and each CUDA device's memory, once a second; a sample names its rank, so
                # other ranks' samples forwarded onto process 0's bus get a line each (run/live_memory.py).
                with MemorySampler(bus, rank=processes.rank if processes is not None else 0), \
                        _rank_relay(bus, processes):
                    report = run_safely(profile, output_dir=output, force=force, events=bus, cancel=cancel,
                                        registry=registry, resume=resume, preflight=not skip_preflight)
            except KeyboardInterrupt as exc:
                forced = Interrupted("forced by a second interrupt")
                forced.checkpoint = getattr(exc, "checkpoint", None)
                raise forced from None
        if log_format != "json" and leader:
            with _signals_meaning(_leave(int(ExitCode.OK))):  # published: a signal only cuts the summary short
                try:
                    if report.get("kind") == "sweep":
                        from workbench.render.sweep_table import print_sweep_summary

                        print_sweep_summary(out, report)
                    else:
                        print_summary(out, report)
                except Exception as exc:  # noqa: BLE001 - the run succeeded; a display bug must not make it exit 1
                    err.print(f"warning: could not show the summary ({type(exc).__name__}: {exc}); see the "
                              "report.md in the output directory", markup=False)
    except WorkbenchError as exc:
        if debug and exc.__cause__ is not None:
            err.print_exception()
        exit_ = _fail(exc)
        if exc.checkpoint is not None:
            again = f"workbench run {profile_path}" + (f" --output {output}" if output else "") + " --resume" + (
                " --force" if force else "")
            if launched_processes() > 1:
                again = f"torchrun <the same options> -m {again}"
            err.print(f"progress so far is checkpointed in {exc.checkpoint}; continue with: {again}", markup=False)
        raise exit_ from None
    finally:
        stop_processes()  # leave the torchrun job's process group, if this process joined one


def _rank_relay(bus, processes):
    """Under torchrun, the other processes' progress and memory shown by process 0 (run/rank_relay.py);
    nothing when running alone, or when the job's store cannot be reached (said once, the run goes on)."""
    if processes is None:
        return contextlib.nullcontext()
    from workbench.run.rank_relay import RankRelay, connect_store

    try:
        return RankRelay(bus, processes.rank, processes.world, connect_store())
    except Exception as exc:  # noqa: BLE001 - a display aid: the run does not depend on it
        if processes.leader:
            err.print(f"warning: the other processes' progress cannot be shown ({type(exc).__name__}: {exc})",
                      markup=False)
        return contextlib.nullcontext()


@app.command()
def inspect(
    profile_path: Path = typer.Argument(..., metavar="PROFILE", help="The profile (TOML) whose model and calibration to use."),
    allocators: Optional[str] = typer.Option(None, "--allocators", help="Comma-separated allocators (default: all installed but those that train, e.g. ara, unless the profile's)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Ratio to allocate for (default: the profile's)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the rank map as a PNG (needs matplotlib)."),
) -> None:
    """Per layer and matrix type: effective rank and the ranks each allocator would give, without compressing."""
    from workbench.registry import get_registry
    from workbench.profile.schema import load_profile
    from workbench.render.rank_charts import plot_png, render_table
    from workbench.run.rank_map import rank_map

    from workbench.sources.text import check_text_sources

    try:
        _check_inspect_options(ratio, plot)
        registry = get_registry()
        profile = load_profile(profile_path, registry)
        names = [n.strip() for n in allocators.split(",") if n.strip()] if allocators else None
        check_text_sources(profile)  # before the model is loaded and calibrated
        data = rank_map(profile, registry, names, ratio)
    except WorkbenchError as exc:
        raise _fail(exc) from None
    typer.echo(json.dumps(data, indent=2) if as_json else render_table(data))
    if plot is not None:
        try:
            plot_png(data, plot)
        except ImportError as exc:
            raise _fail(UsageError(str(exc))) from None
        except (OSError, ValueError) as exc:  # matplotlib: unwritable path, unknown image suffix
            why = getattr(exc, "strerror", None) or exc
            raise _fail(UsageError(f"--plot: cannot write {plot}: {why}")) from None


@app.command("plan")
def plan_command(
    profile_path: Optional[Path] = typer.Argument(None, metavar="PROFILE", help="The profile (TOML) to plan; "
                                                  "left out: the defaults, with --model."),
    model: Optional[str] = typer.Option(None, "--model", help="Plan for this model instead of model.source: a "
                                        "model directory, a config.json, a .gguf, or a hub id in the local cache."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the profile's)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Ratio to plan for (default: the profile's)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where the output would go (its disk is "
                                          "checked; default: the profile's [output] dir)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (bytes)."),
) -> None:
    """Memory and disk a run needs, per device and for the host, for each offload mode and number of
    processes, from the model's config alone (no weights); and which settings fit this machine."""
    from workbench.profile.schema import load_profile, parse_profile
    from workbench.registry import get_registry
    from workbench.render.plan_view import plan_data, plan_view
    from workbench.run.plan import settings
    from workbench.run.plan_config import plan_model, this_machine
    from workbench.sources.models import resolve_dtype

    try:
        if profile_path is None and model is None:
            raise UsageError("give a PROFILE, or --model with a model directory or a config.json")
        if dtype is not None:
            resolve_dtype(dtype)
        registry = get_registry()
        profile = load_profile(profile_path, registry) if profile_path else parse_profile("", "<plan>", registry)
        planned = plan_model(profile, registry, source=model, dtype=dtype, ratio=ratio)
        where = output or Path(profile.output.dir)
        machine = this_machine(where)
        rows = settings(planned.shapes)
    except WorkbenchError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(plan_data(planned, rows, machine), indent=2))
        return
    Console(highlight=False, emoji=False).print(plan_view(planned, rows, machine, profile.compression.allocator,
                                                          str(where)))


def _check_inspect_options(ratio: Optional[float], plot: Optional[Path]) -> None:
    """What cannot work is refused before the model is loaded and calibrated."""
    if ratio is not None and not 0 <= ratio < 1:  # also NaN
        raise UsageError(f"--ratio: {ratio} is outside [0, 1) (the fraction of the targeted parameters removed)")
    if plot is not None:
        folder = plot.parent if str(plot.parent) else Path(".")
        if not folder.is_dir():
            raise UsageError(f"--plot: the folder {folder} does not exist; create it or choose another path")
        if plot.is_dir():
            raise UsageError(f"--plot: {plot} is a directory; give a file name such as {plot / 'ranks.png'}")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"--plot: the folder {folder} cannot be written")


@app.command("sweep-plot")
def sweep_plot(
    output: Path = typer.Argument(..., metavar="OUTPUT", help="A sweep's output directory (one with sweep.json)."),
    metric: Optional[str] = typer.Option(None, "--metric", help="The metric to draw: its name (perplexity), "
                                         "its evaluator's, or evaluator:metric (default: the first)."),
    out: Optional[Path] = typer.Option(None, "--out", help="The PNG to write (default: OUTPUT/sweep.png)."),
    log_y: bool = typer.Option(False, "--log-y", help="A logarithmic metric axis."),
) -> None:
    """Draw a sweep's metric against the parameters kept, one line per allocator (needs matplotlib)."""
    from workbench.render.sweep_plot import plot_sweep_png
    from workbench.render.sweep_table import pick_metric
    from workbench.run.sweep import load_sweep

    target = out if out is not None else output / "sweep.png"
    try:
        summary = load_sweep(output)
        try:
            pick_metric(summary, metric)
        except ValueError as exc:
            raise UsageError(f"--metric: {exc}") from None
        folder = target.parent if str(target.parent) else Path(".")
        if not folder.is_dir() or target.is_dir():
            raise UsageError(f"--out: {target} cannot be written (" + ("a directory" if target.is_dir() else
                             f"the folder {folder} does not exist") + "); give a file name such as sweep.png")
        plot_sweep_png(summary, target, metric, log_y)
    except WorkbenchError as exc:
        raise _fail(exc) from None
    except ImportError as exc:
        raise _fail(UsageError(str(exc))) from None
    except (OSError, ValueError) as exc:  # matplotlib: unwritable path, unknown image suffix
        raise _fail(UsageError(f"--out: cannot write {target}: {getattr(exc, 'strerror', None) or exc}")) from None
    typer.echo(f"wrote {target}")


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
        table.add_row(*(literal(cell) for cell in (p.name, p.distribution, p.version, ", ".join(p.provides))))
    console = Console(highlight=False, emoji=False)
    console.print(table)
    for kind in ("allocator", "adapter", "evaluator", "signal"):
        items = registry.table(kind)
        if items:
            console.print(f"\n[bold]{kind}s[/]")
            for name, obj in items.items():
                console.print(f"  {name:<18} {obj.description}", markup=False)
    for failure in registry.failures:
        console.print("[red]failed[/]: ", end="")
        console.print(str(failure), markup=False, soft_wrap=True)


def _failed(doing: str, exc: Exception, debug: bool) -> "typer.Exit":
    """A WorkbenchError as usual; anything else as one line naming what was being done (exit 1)."""
    if isinstance(exc, WorkbenchError):
        return _fail(exc)
    if debug:
        err.print_exception()
    err.print(f"[bold red]{doing} failed[/]: ", end="")
    err.print(f"{type(exc).__name__}: {exc}", markup=False)
    return typer.Exit(int(ExitCode.FAILED))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run output directory (one with model/)."),
    to: Path = typer.Option(..., "--to", metavar="DIR", help="The folder to write; refused when it exists and is "
                            "not empty, unless --force."),
    fmt: str = typer.Option("hf", "--format", help="hf: the low-rank model, loads in plain transformers "
                            "(trust_remote_code=True); dense: factors multiplied back into the standard "
                            "architecture, full size."),
    force: bool = typer.Option(False, "--force", help="Replace DIR atomically (only a folder workbench wrote)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Split the weights into safetensors "
                                       "files of at most this size (e.g. 500MB)."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback when the export fails."),
) -> None:
    """Write a run's compressed model as a folder that loads without workbench (docs/export.md)."""
    try:
        from workbench.export.dense import export_dense
        from workbench.export.hf import export_hf
        from workbench.export.writing import parse_size

        writers = {"hf": export_hf, "dense": export_dense}
        if fmt not in writers:
            raise UsageError(f"--format: unknown format '{fmt}' (allowed: {', '.join(writers)})")
        written = writers[fmt](run_dir, to, force=force, max_shard_bytes=parse_size(max_shard_size))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message and an exit code
        raise _failed("export", exc, debug) from None
    typer.echo(f"exported {run_dir} ({fmt}) to {written}")
    if fmt == "hf":
        typer.echo(f"load it with AutoModelForCausalLM.from_pretrained({str(written)!r}, trust_remote_code=True)")
    else:
        typer.echo("the dense export is the standard architecture at full size: it saves no space")


def _show_continuations(out: Console, prompt: str, texts: list[tuple[str, str]]) -> None:
    """Each continuation after its prompt, side by side on a wide terminal, else one after the other.
    Model output is shown literally: never read as markup."""
    from rich.text import Text

    def block(text: str) -> Text:
        return Text.assemble((prompt, "dim"), text) if out.is_terminal else Text(prompt + text)

    if len(texts) == 1:
        out.print(block(texts[0][1]), soft_wrap=not out.is_terminal)
    elif out.is_terminal and out.width >= 100:
        table = Table(show_lines=False, expand=True)
        for title, _ in texts:
            table.add_column(Text(title), ratio=1)
        table.add_row(*(block(text) for _, text in texts))
        out.print(table)
    else:
        for i, (title, text) in enumerate(texts):
            out.print(("\n" if i else "") + f"── {title} ──", markup=False)
            out.print(block(text), soft_wrap=True)


@app.command()
def generate(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run output directory (one with model/)."),
    prompt: str = typer.Argument(..., metavar="PROMPT", help="The text to continue."),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", help="Tokens to add at most."),
    sample: bool = typer.Option(False, "--sample", help="Sample (with --temperature, --top-p) instead of greedy."),
    temperature: float = typer.Option(0.7, "--temperature", help="With --sample: below 1 sharpens, above flattens."),
    top_p: float = typer.Option(0.9, "--top-p", help="With --sample: keep the smallest set of tokens this likely."),
    seed: int = typer.Option(0, "--seed", help="With --sample: the same seed gives the same text."),
    dense: bool = typer.Option(False, "--dense", help="Also show the dense model's continuation beside it."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, mps or auto."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback when generation fails."),
) -> None:
    """Continue PROMPT with the compressed model (greedy by default), to read what it writes."""
    from workbench.export.generation import Decoding, continuation, load_dense_model, load_run_model

    out = Console(highlight=False, emoji=False)
    try:
        decoding = Decoding(max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p,
                            seed=seed)
        decoding.check()
        loaded = load_run_model(run_dir, device)
        texts = [(f"compressed ({run_dir})", continuation(loaded.model, loaded.tokenizer, prompt, decoding))]
        if dense:
            run = loaded.run
            del loaded  # one model in memory at a time
            model, tokenizer, source = load_dense_model(run, device)
            texts.append((f"dense ({source})", continuation(model, tokenizer, prompt, decoding)))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message and an exit code
        raise _failed("generate", exc, debug) from None
    _show_continuations(out, prompt, texts)


# Set by `_interrupt_now`: an interrupt raised where Python ignores exceptions (a destructor, a weakref
# callback) is printed and dropped, and the command would finish as if no signal had come.
_signalled = False


def _interrupt_now(signum, frame):
    """Outside a run's own handling: stop where the program is, as an interrupt (typer: exit 130)."""
    global _signalled
    _signalled = True
    raise KeyboardInterrupt


def _interrupted_exit() -> SystemExit:
    with contextlib.suppress(Exception):
        err.print("[yellow]interrupted[/]")
    return SystemExit(int(ExitCode.INTERRUPTED))


def main() -> None:
    _handle_signals(_interrupt_now)  # first, whoever imported this module
    atexit.register(_ignore_late_signals)  # registered first, so it runs last (atexit is LIFO)
    try:
        app()
        outcome = SystemExit(0)
    except KeyboardInterrupt:  # outside a command (typer turns those into exit 130)
        outcome = _interrupted_exit()
    except SystemExit as exc:
        outcome = exc
    if outcome.code in (0, None) and _signalled:  # the interrupt was swallowed on the way: still one
        outcome = _interrupted_exit()
    code = outcome.code if isinstance(outcome.code, int) else int(outcome.code is not None)
    _handle_signals(_leave(code))  # the exit is decided: a late signal hurries it (atexit too), never changes it
    raise outcome


if __name__ == "__main__":
    main()
