"""Loading plugins: built-ins and third parties alike come through the `workbench` entry-point group.

Entry points are loaded one at a time so a broken plugin is reported by name and version and the
others keep working; `WORKBENCH_STRICT_PLUGINS=1` makes any such failure fatal.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from workbench import hookspecs
from workbench.errors import PluginError, UsageError
from workbench.api import Adapter, Allocator, Evaluator, Plugin, Signal, nearest
from workbench.registry_checks import check_declaration

ENTRY_POINT_GROUP = "workbench"
# Imported directly when the entry points are missing (running from a source tree without install).
BUILTIN_MODULES = ("workbench_allocators", "workbench_adapters", "workbench_evaluators", "workbench_signals")
KINDS = {"allocator": Allocator, "adapter": Adapter, "evaluator": Evaluator, "signal": Signal}


@dataclass
class LoadedPlugin:
    name: str  # entry-point name or module name
    module: str
    distribution: str
    version: str
    provides: list[str] = field(default_factory=list)  # "allocator:uniform", ...


@dataclass
class PluginFailure:
    name: str
    distribution: str
    version: str
    error: str

    def __str__(self) -> str:
        return f"plugin '{self.name}' ({self.distribution} {self.version}) failed to load: {self.error}"


class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    def __init__(self) -> None:
        self.allocators: dict[str, Allocator] = {}
        self.adapters: dict[str, Adapter] = {}
        self.evaluators: dict[str, Evaluator] = {}
        self.signals: dict[str, Signal] = {}
        self.plugins: list[LoadedPlugin] = []
        self.failures: list[PluginFailure] = []
        self.origin: dict[tuple[str, str], LoadedPlugin] = {}
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)

    def table(self, kind: str) -> dict[str, Plugin]:
        return {"allocator": self.allocators, "adapter": self.adapters, "evaluator": self.evaluators,
                "signal": self.signals}[kind]

    def get(self, kind: str, name: str) -> Any:
        table = self.table(kind)
        if name not in table:
            hint = nearest(name, list(table))
            msg = f"unknown {kind} '{name}'; available: {', '.join(sorted(table)) or 'none'}"
            if hint:
                msg += f"; did you mean '{hint}'?"
            raise UsageError(msg)
        return table[name]

    def describe(self, kind: str, name: str) -> str:
        """'name (distribution version)' for messages that must name a plugin."""
        origin = self.origin.get((kind, name))
        return f"{kind} '{name}'" + (f" from {origin.distribution} {origin.version}" if origin else "")

    def adapter_for(self, model: Any) -> Adapter:
        """Pick one adapter: the highest-priority one that claims the model."""
        for adapter in sorted(self.adapters.values(), key=lambda a: -a.priority):
            try:
                if adapter.claims(model):
                    return adapter
            except Exception as exc:  # noqa: BLE001
                raise PluginError(f"{self.describe('adapter', adapter.name)} raised while checking the model: {exc}") from exc
        arch = type(model).__name__
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        supported = "; ".join(f"{a.name}: {a.description}" for a in self.adapters.values()) or "none"
        raise UsageError(
            f"no architecture adapter claims this model ({arch}, model_type '{model_type}'). "
            f"Supported: {supported}. To add one, see docs/plugins.md (architecture adapters)."
        )

    # ------------------------------------------------------------------ loading

    def _registrar(self, kind: str, owner: LoadedPlugin):
        base = KINDS[kind]

        def register(obj: Any) -> None:
            if isinstance(obj, type):
                obj = obj()
            if not isinstance(obj, base):
                raise TypeError(f"register() expects a {base.__name__}, got {type(obj).__name__}")
            check_declaration(kind, obj)
            table = self.table(kind)
            if obj.name in table:
                raise ValueError(f"{kind} '{obj.name}' is already registered by {self.origin[(kind, obj.name)].distribution}")
            table[obj.name] = obj
            self.origin[(kind, obj.name)] = owner
            owner.provides.append(f"{kind}:{obj.name}")

        return register

    def add_module(self, module: ModuleType, name: str, distribution: str, version: str) -> LoadedPlugin:
        """Register one plugin module; raises on any problem (the caller decides what to do)."""
        owner = LoadedPlugin(name=name, module=module.__name__, distribution=distribution, version=version)
        self.pm.register(module, name=name)
        try:
            # tox-style: an implementation whose name matches no hook is a typo, not a no-op.
            self.pm.check_pending()
            for kind, hook in (
                ("allocator", self.pm.hook.register_allocators),
                ("adapter", self.pm.hook.register_adapters),
                ("evaluator", self.pm.hook.register_evaluators),
                ("signal", self.pm.hook.register_signals),
            ):
                impls = [i for i in hook.get_hookimpls() if i.plugin is module]
                for impl in impls:
                    impl.function(register=self._registrar(kind, owner))
        except (Exception, SystemExit):
            # Undo a half-registered plugin so the registry stays consistent.
            self.pm.unregister(module)
            for entry in owner.provides:
                kind, pname = entry.split(":", 1)
                self.table(kind).pop(pname, None)
                self.origin.pop((kind, pname), None)
            raise
        self.plugins.append(owner)
        return owner


def _strict() -> bool:
    return os.environ.get("WORKBENCH_STRICT_PLUGINS", "").strip() not in ("", "0", "false", "no")


def load_registry(strict: bool | None = None, entry_points: list[md.EntryPoint] | None = None) -> Registry:
    """Load every plugin, one at a time; collect failures instead of dying on the first."""
    strict = _strict() if strict is None else strict
    registry = Registry()
    if entry_points is None:
        entry_points = list(md.entry_points(group=ENTRY_POINT_GROUP))
    seen_modules = set()
    for ep in entry_points:
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        try:
            module = ep.load()
            if not isinstance(module, ModuleType):
                raise TypeError(f"entry point must name a module, got {type(module).__name__}")
            if module.__name__ in seen_modules:
                continue
            seen_modules.add(module.__name__)
            registry.add_module(module, ep.name, dist_name, version)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one broken plugin (even sys.exit) must not kill the CLI
            failure = PluginFailure(ep.name, dist_name, version, f"{type(exc).__name__}: {exc}")
            if strict:
                raise PluginError(str(failure) + " (WORKBENCH_STRICT_PLUGINS is set)") from exc
            registry.failures.append(failure)
    # A source checkout that was never installed has no entry points: load the built-ins directly.
    from workbench import __version__

    for mod_name in BUILTIN_MODULES:
        if mod_name in seen_modules:
            continue
        try:
            module = importlib.import_module(mod_name)
            registry.add_module(module, mod_name, "workbench", __version__)
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            failure = PluginFailure(mod_name, "workbench", __version__, f"{type(exc).__name__}: {exc}")
            if strict:
                raise PluginError(str(failure)) from exc
            registry.failures.append(failure)
    return registry


_cached: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, loaded once."""
    global _cached
    if _cached is None or refresh:
        _cached = load_registry()
    return _cached
