"""Name-keyed tables of everything the plugins registered.

Mirrors timm's registry: ``list_backbones("convnext*")`` and ``create_backbone(name, ...)``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import pluggy

from .components import AugmentationPolicy, Backbone, DatasetSource, Metric, UnfreezeStrategy
from .errors import PluginError, UnknownNameError, did_you_mean

#: kind -> (hook name, component base class, user-facing name, study-file key)
KINDS: dict[str, tuple[str, type, str, str]] = {
    "backbones": ("register_backbones", Backbone, "backbone", "[search] backbones"),
    "augmentation_policies": (
        "register_augmentation_policies",
        AugmentationPolicy,
        "augmentation policy",
        "[search] augmentations",
    ),
    "unfreeze_strategies": (
        "register_unfreeze_strategies",
        UnfreezeStrategy,
        "unfreeze strategy",
        "[search] unfreeze",
    ),
    "datasets": ("register_datasets", DatasetSource, "dataset", "[data] source"),
    "metrics": ("register_metrics", Metric, "metric", "[search] metric"),
}


@dataclass(frozen=True)
class Entry:
    """A registered component and the plugin that registered it."""

    component: Any
    plugin: str


class Registry:
    """Everything registered by the loaded plugins, one table per kind."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Registry:
        """Call each plugin's register_* hooks one plugin at a time, so duplicates name both."""
        registry = cls()
        for kind, (hook_name, _, _, _) in KINDS.items():
            hook = getattr(pm.hook, hook_name)
            # get_hookimpls() is in call order reversed; register in load order.
            for impl in reversed(hook.get_hookimpls()):
                impl.function(register=registry._registrar(kind, impl.plugin_name))
        return registry

    def _registrar(self, kind: str, plugin: str):
        def register(component: Any) -> None:
            self.add(kind, component, plugin)

        return register

    def add(self, kind: str, component: Any, plugin: str) -> None:
        """Add one component; a second component with the same name is an error naming both."""
        _, base, label, _ = KINDS[kind]
        if not isinstance(component, base):
            raise PluginError(
                f"plugin {plugin!r} registered {component!r} as a {label}, "
                f"but it is not an instance of automl_tl.{base.__name__}"
            )
        name = getattr(component, "name", "")
        if not name or not isinstance(name, str):
            raise PluginError(f"plugin {plugin!r} registered a {label} without a name")
        table = self.tables[kind]
        if name in table:
            raise PluginError(
                f"{label} {name!r} is registered twice: by plugin {table[name].plugin!r} and by "
                f"plugin {plugin!r}. Rename one of them or stop loading one plugin: an installed "
                "package that is also passed as a file or module (--plugin, `plugins = [...]`) "
                "loads twice; drop the --plugin, or set AUTOML_TL_LOAD_PLUGINS to the installed "
                "plugins to load (empty: none)."
            )
        table[name] = Entry(component, plugin)

    def names(self, kind: str, pattern: str = "*") -> list[str]:
        """Sorted names of one kind matching a shell-style pattern."""
        return sorted(n for n in self.tables[kind] if fnmatch.fnmatchcase(n, pattern))

    def get(self, kind: str, name: str) -> Any:
        """The component of this kind called ``name``; an unknown name lists the known ones."""
        entry = self.tables[kind].get(name)
        if entry is None:
            raise self.unknown(kind, name)
        return entry.component

    def unknown(self, kind: str, name: str) -> UnknownNameError:
        _, _, label, key = KINDS[kind]
        known = self.names(kind)
        hint = did_you_mean(name, known)
        if len(known) <= 30:
            listing = "known: " + ", ".join(known)
        else:
            # timm alone registers over a thousand backbones: show the close ones.
            import difflib

            close = difflib.get_close_matches(name, known, n=8, cutoff=0.5)
            listing = (
                f"{len(known)} are known"
                + (f", closest: {', '.join(close)}" if close else "")
                + " (all: `automl-tl plugins --format json`)"
            )
        return UnknownNameError(f"unknown {label} {name!r} in {key}{hint}; {listing}")

    def plugin_of(self, kind: str, name: str) -> str:
        return self.tables[kind][name].plugin

    # timm-style conveniences
    def list_backbones(self, pattern: str = "*") -> list[str]:
        return self.names("backbones", pattern)

    def create_backbone(self, name: str, num_classes: int, **kwargs: Any):
        return self.get("backbones", name).create(num_classes, **kwargs)
