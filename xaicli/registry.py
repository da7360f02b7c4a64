"""The plugin registry: loads the ``xaicli`` entry-point group and indexes plugins by kind and name."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Iterable

import pluggy

from . import hookspecs
from .descriptors import Analysis, Loader, Method, Metric, Writer
from .errors import UsageError
from .suggest import did_you_mean

KINDS = {
    "loader": "xai_loaders", "method": "xai_methods", "metric": "xai_metrics", "writer": "xai_writers",
    "engine": "xai_engines", "analysis": "xai_analyses",
}


@dataclass
class Origin:
    """Where a plugin came from: its distribution and module."""

    module: str
    distribution: str = ""
    version: str = ""


@dataclass
class Registry:
    """Every plugin by kind and name, with where each came from."""

    plugins: dict[str, dict[str, object]] = field(default_factory=lambda: {k: {} for k in KINDS})
    origins: dict[tuple[str, str], Origin] = field(default_factory=dict)

    def add(self, kind: str, descriptor: object, origin: Origin) -> None:
        name = descriptor.name  # type: ignore[attr-defined]
        table = self.plugins[kind]
        if name in table:
            first = self.origins[(kind, name)]
            raise UsageError(
                f"two plugins register the {kind} {name!r}: {first.module} ({first.distribution or 'local'}) "
                f"and {origin.module} ({origin.distribution or 'local'}); uninstall one of them"
            )
        table[name] = descriptor
        self.origins[(kind, name)] = origin

    def get(self, kind: str, name: str) -> object:
        table = self.plugins[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "none installed"
            raise UsageError(f"unknown {kind} {name!r}{did_you_mean(name, table)}; known: {known}")
        return table[name]

    def method(self, name: str) -> Method:
        return self.get("method", name)  # type: ignore[return-value]

    def metric(self, name: str) -> Metric:
        return self.get("metric", name)  # type: ignore[return-value]

    def writer(self, name: str) -> Writer:
        return self.get("writer", name)  # type: ignore[return-value]

    def analysis(self, name: str) -> Analysis:
        return self.get("analysis", name)  # type: ignore[return-value]

    def loader_for(self, spec: str) -> Loader:
        """The first loader (in name order) that claims `spec`."""
        for name in sorted(self.plugins["loader"]):
            loader: Loader = self.plugins["loader"][name]  # type: ignore[assignment]
            if loader.claims(spec):
                return loader
        names = ", ".join(sorted(self.plugins["loader"]))
        raise UsageError(
            f"no model loader handles {spec!r} (loaders: {names}); use a TorchScript file (.pt/.ts), "
            "an ONNX file (.onnx) or timm:NAME"
        )

    def find(self, name: str) -> tuple[str, object]:
        """Look a plugin up by name across all kinds: (kind, descriptor)."""
        for kind, table in self.plugins.items():
            if name in table:
                return kind, table[name]
        every = [n for table in self.plugins.values() for n in table]
        raise UsageError(f"no plugin named {name!r}{did_you_mean(name, every)}")


def create_registry(extra: Iterable[ModuleType | object] = (), entry_points: bool = True) -> Registry:
    """Build a registry from the entry-point group (and `extra` plugin objects, for tests and notebooks)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    origins: dict[int, Origin] = {}
    if entry_points:
        for ep in metadata.entry_points(group=hookspecs.PROJECT):
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not hide the others' names
                raise UsageError(f"plugin entry point {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
            if pm.is_registered(plugin):
                continue
            pm.register(plugin, name=f"{ep.value}")
            dist = ep.dist
            origins[id(plugin)] = Origin(ep.value, dist.name if dist else "", dist.version if dist else "")
    for plugin in extra:
        if not pm.is_registered(plugin):
            pm.register(plugin)
            origins[id(plugin)] = Origin(getattr(plugin, "__name__", type(plugin).__name__))
    registry = Registry()
    for kind, hook_name in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            origin = origins.get(id(impl.plugin), Origin(impl.plugin_name))
            for descriptor in getattr(impl.plugin, hook_name)() or []:
                registry.add(kind, descriptor, origin)
    return registry


@functools.cache
def default_registry() -> Registry:
    """The registry of installed plugins, built once per process."""
    return create_registry()
