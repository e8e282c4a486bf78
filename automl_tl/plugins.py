"""The one plugin manager: default plugins, entry points, then explicit modules or files.

Loading order (later plugins see earlier ones, names must stay unique across all of them):

1. the default plugins in :mod:`automl_tl.default_plugins`;
2. the ``automl_tl`` entry-point group, restricted by ``AUTOML_TL_LOAD_PLUGINS``
   (a comma-separated list of plugin names; empty loads none; unset loads all);
3. the study file's ``plugins = [...]`` and each ``--plugin MODULE_OR_FILE``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from . import hookspecs
from ._util import sha256_file
from .errors import PluginError
from .registry import Registry

DEFAULT_PLUGINS = (
    "automl_tl.default_plugins.timm_backbones",
    "automl_tl.default_plugins.kornia_policies",
    "automl_tl.default_plugins.unfreeze",
    "automl_tl.default_plugins.datasets",
)

ENTRY_POINT_GROUP = "automl_tl"
LOAD_PLUGINS_ENV = "AUTOML_TL_LOAD_PLUGINS"


@dataclass(frozen=True)
class PluginInfo:
    """Where a loaded plugin came from: ``default``, ``entry point``, ``module`` or ``file``."""

    name: str
    source: str
    version: str | None = None
    location: str | None = None


_FILE_MODULE_PREFIX = "automl_tl_plugin_"


def _import_file(path: Path):
    module_name = f"{_FILE_MODULE_PREFIX}{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import plugin file {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _describe_import_failure(what: str, exc: BaseException) -> PluginError:
    return PluginError(
        f"plugin {what} failed to import: {type(exc).__name__}: {exc}. "
        "Fix or remove it (study file `plugins = [...]`, --plugin, or uninstall its package)."
    )


def is_plugin_file(spec: str) -> bool:
    """Whether a plugin spec names a ``.py`` file (else a module name)."""
    return spec.endswith(".py") or os.sep in spec or "/" in spec


def load_plugin(pm: pluggy.PluginManager, spec: str, base_dir: Path | None = None) -> PluginInfo:
    """Register a plugin given as a module name or a path to a ``.py`` file.

    A relative file path is taken relative to ``base_dir`` (the study file's folder) when
    given, never the current directory first: a same-named file where the command happens to
    run must not run instead. Two plugin files with the same name (stem) are refused.
    """
    if is_plugin_file(spec):
        path = Path(spec).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise PluginError(
                f"plugin file {path} does not exist; give a module name or a .py path"
            )
        name = f"{path.stem}"
        existing = pm.get_plugin(name)
        location = getattr(existing, "__file__", None)
        if existing is not None and location and Path(location).resolve() != path.resolve():
            raise PluginError(
                f"two plugin files are named {path.name}: {location} and {path.resolve()}; "
                "rename one (a plugin file is registered by its name)"
            )
        try:
            module = _import_file(path.resolve())
        except PluginError:
            raise
        except Exception as exc:
            raise _describe_import_failure(str(path), exc) from exc
        info = PluginInfo(name=path.stem, source="file", location=str(path.resolve()))
    else:
        try:
            module = importlib.import_module(spec)
        except Exception as exc:
            raise _describe_import_failure(spec, exc) from exc
        info = PluginInfo(
            name=spec,
            source="module",
            version=_module_version(spec),
            location=getattr(module, "__file__", None),
        )
    check_compatible(module, info.name)
    if pm.get_plugin(info.name) is None and not pm.is_registered(module):
        _register(pm, module, info.name)
    return info


def _stale_egg_info(ep: importlib.metadata.EntryPoint, exc: BaseException) -> str | None:
    """A hint when the entry point comes from a ``*.egg-info`` folder whose module is gone:
    metadata copied along with a plugin template (``cp -r``) and found before the real one."""
    path = getattr(ep.dist, "_path", None)
    if not isinstance(exc, ImportError) or path is None or not str(path).endswith(".egg-info"):
        return None
    return (
        f"Its metadata comes from {path}, which names a module that does not import: if the "
        "package was copied from a template, that egg-info is stale: delete it (rm -rf "
        f"{path}) and run `pip install -e .` again"
    )


def _module_version(module_name: str) -> str | None:
    """The version of the installed distribution that provides ``module_name``, if any."""
    top = module_name.split(".")[0]
    try:
        dists = importlib.metadata.packages_distributions().get(top) or []
        return importlib.metadata.version(dists[0]) if dists else None
    except Exception:  # metadata of odd installs must never stop loading
        return None


def _register(pm: pluggy.PluginManager, module, name: str) -> None:
    try:
        pm.register(module, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r} does not match the hook specifications: {exc}") from exc


def _own_version() -> str:
    from . import __version__

    return __version__


def automl_tl_version() -> str:
    """The installed automl-tl's version (what a plugin's ``automl_tl_requires`` is checked
    against)."""
    return _own_version()


#: What changed in the plugin contract, by the automl-tl version that changed it: the message
#: for a plugin whose ``automl_tl_requires`` excludes this version names the changes it missed.
CONTRACT_CHANGES: dict[str, str] = {
    "0.1.0": "Backbone.check_weights(source) refuses unknown named weight sources before a "
    "search; exported models record their plugin (config.json automl_tl.backbone_origin); "
    "register_metrics(register) adds metrics",
}

#: the module attribute a plugin declares its supported automl-tl versions in (PEP 440)
REQUIRES_ATTR = "automl_tl_requires"


def check_compatible(module: object, name: str) -> None:
    """Refuse a plugin whose ``automl_tl_requires`` (a PEP 440 specifier such as ``">=0.1,<0.3"``)
    excludes this automl-tl, with one message naming the plugin and what changed."""
    declared = getattr(module, REQUIRES_ATTR, None)
    if declared is None:
        return
    try:
        spec = SpecifierSet(str(declared))
    except InvalidSpecifier as exc:
        raise PluginError(
            f"plugin {name!r}: {REQUIRES_ATTR} = {declared!r} is not a version specifier; "
            'write e.g. ">=0.1,<0.3"'
        ) from exc
    current = Version(_own_version())
    if spec.contains(current, prereleases=True):
        return
    newer = any(
        s.operator in (">=", ">", "==", "~=", "===") and Version(s.version) > current
        for s in spec
        if "*" not in s.version
    )
    missed = [
        f"{version}: {change}"
        for version, change in CONTRACT_CHANGES.items()
        if Version(version) <= current and not spec.contains(version, prereleases=True)
    ]
    if missed and not newer:
        why = "it was written for an older plugin contract; since then " + "; ".join(missed)
        fix = "install a release of the plugin that supports this automl-tl"
    else:
        why = "it needs a newer automl-tl"
        fix = f"pip install 'automl-tl{spec}'"
    raise PluginError(
        f"plugin {name!r} supports automl-tl {spec}, but this is automl-tl {current}: {why}. "
        f"Fix: {fix}, or update its {REQUIRES_ATTR} after checking it with "
        f"`automl-tl plugins --check {name}`"
    )


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def get_plugin_manager(
    extra: Iterable[str] = (), base_dir: Path | None = None
) -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    """Build the plugin manager and return it with where each plugin came from."""
    pm = pluggy.PluginManager("automl_tl")
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}

    for name in DEFAULT_PLUGINS:
        module = importlib.import_module(name)
        pm.register(module, name=name)
        infos[name] = PluginInfo(
            name=name, source="default", version=_own_version(), location=module.__file__
        )

    allowed = os.environ.get(LOAD_PLUGINS_ENV)
    allowed_names = (
        None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    )
    for ep in _entry_points():
        if allowed_names is not None and ep.name not in allowed_names:
            continue
        try:
            module = ep.load()
        except Exception as exc:
            error = _describe_import_failure(f"{ep.name!r} (entry point {ep.value})", exc)
            stale = _stale_egg_info(ep, exc)
            raise (PluginError(f"{error} {stale}") if stale else error) from exc
        check_compatible(module, ep.name)
        if pm.get_plugin(ep.name) is None:
            _register(pm, module, ep.name)
        dist = ep.dist
        infos[ep.name] = PluginInfo(
            name=ep.name,
            source="entry point",
            version=dist.version if dist else None,
            location=dist.name if dist else ep.value,
        )

    for spec in extra:
        info = load_plugin(pm, spec, base_dir)
        infos[info.name] = info

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc}. Hook names are listed in docs/writing-plugins.md.") from exc
    return pm, infos


# ---------------------------------------------------------------------------------------------
# where a component came from, as an exported model records it


def component_origin(plugin: str, component: object) -> dict[str, str | None]:
    """Where the component a plugin registered came from, for an exported model's record:

    - ``{"source": "automl-tl", "plugin", "version"}`` for the built-in plugins;
    - ``{"source": "entry point", "plugin", "entry_point", "distribution", "version"}``;
    - ``{"source": "file", "plugin", "path", "sha256"}`` for a ``--plugin my_backbone.py``;
    - ``{"source": "module", "plugin", "module", "version"}`` for ``--plugin package.module``.
    """
    if plugin in DEFAULT_PLUGINS:
        return {"source": "automl-tl", "plugin": plugin, "version": _own_version()}
    module = sys.modules.get(type(component).__module__)
    path = getattr(module, "__file__", None)
    if type(component).__module__.startswith(_FILE_MODULE_PREFIX) and path:
        return {"source": "file", "plugin": plugin, "path": path, "sha256": sha256_file(path)}
    for ep in _entry_points():
        if ep.name == plugin:
            dist = ep.dist
            return {
                "source": "entry point",
                "plugin": plugin,
                "entry_point": f"{ENTRY_POINT_GROUP}:{ep.name} = {ep.value}",
                "distribution": dist.name if dist else None,
                "version": dist.version if dist else None,
            }
    return {
        "source": "module",
        "plugin": plugin,
        "module": plugin,
        "version": _module_version(plugin),
    }


def missing_plugin_message(backbone: str, origin: dict | None, where: str) -> str:
    """What to install or pass when the plugin that built a model is not loaded."""
    restricted = os.environ.get(LOAD_PLUGINS_ENV)
    extra = (
        f" ({LOAD_PLUGINS_ENV}={restricted!r} restricts the installed plugins that load)"
        if restricted is not None
        else ""
    )
    head = f"{where} was trained with backbone {backbone!r}"
    source = (origin or {}).get("source")
    if source == "entry point":
        dist, version = origin.get("distribution"), origin.get("version")
        pin = f"{dist}=={version}" if dist and version else dist or origin.get("plugin")
        return (
            f"{head} from the plugin package {dist} {version or ''}".rstrip()
            + f", which is not installed{extra}: pip install '{pin}' (or pass --plugin "
            "MODULE_OR_FILE with a plugin that registers it)"
        )
    if source == "file":
        return (
            f"{head} from the plugin file {origin.get('path')} (sha256 "
            f"{(origin.get('sha256') or '')[:12]}), which is not loaded: pass --plugin "
            f"{origin.get('path')}"
        )
    if source == "module":
        version = f" {origin['version']}" if origin.get("version") else ""
        return (
            f"{head} from the plugin module {origin.get('module')}{version}, which is not "
            f"loaded{extra}: pass --plugin {origin.get('module')} (install its package first)"
        )
    return (
        f"{head}, which no loaded plugin registers{extra}: install the plugin package that "
        "provides it, or pass --plugin MODULE_OR_FILE (a module or a .py file)"
    )


def origin_mismatch(backbone: str, recorded: dict | None, current: dict, where: str) -> str | None:
    """A warning when the plugin loaded now is not the one that trained the model (another
    version, another file content), naming both; None when they agree or nothing is known."""
    if not recorded or recorded.get("source") == "automl-tl":
        return None
    if recorded.get("source") == "file" or current.get("source") == "file":
        old, new = recorded.get("sha256"), current.get("sha256")
        if old and new and old != new:
            return (
                f"{where} was trained with backbone {backbone!r} from plugin file "
                f"{recorded.get('path')} (sha256 {old[:12]}); the loaded "
                f"{current.get('path')} has sha256 {new[:12]}: predictions may differ"
            )
        return None
    old, new = recorded.get("version"), current.get("version")
    if old and new and old != new:
        name = recorded.get("distribution") or recorded.get("module") or recorded.get("plugin")
        return (
            f"{where} was trained with backbone {backbone!r} from {name} {old}; {new} is "
            f"loaded now: predictions may differ (pip install '{name}=={old}' to match)"
        )
    return None


def registry_needing(
    study_plugins: Iterable[str],
    extra: Iterable[str] = (),
    needs: dict[str, Iterable[str]] | None = None,
    base_dir: Path | None = None,
) -> Registry:
    """The registry for a command that only reads (``report``, ``check-data``).

    A study file's ``plugins = [...]`` are code that runs when loaded, so they are loaded
    only when a component the command needs (``needs``: kind -> names) is not registered
    without them. ``extra`` (``--plugin``, given on the command line) always loads.
    """
    extra = list(extra)
    pm, _ = get_plugin_manager(extra, base_dir=base_dir)
    registry = Registry.from_plugin_manager(pm)
    study_plugins = list(study_plugins)
    missing = [
        name
        for kind, names in (needs or {}).items()
        for name in names
        if name not in registry.names(kind)
    ]
    if study_plugins and missing:
        pm, _ = get_plugin_manager([*study_plugins, *extra], base_dir=base_dir)
        registry = Registry.from_plugin_manager(pm)
    return registry


LIFECYCLE_HOOKS = (
    "trial_started",
    "epoch_finished",
    "trial_finished",
    "study_finished",
    "model_exported",
)


def describe_plugins(
    pm: pluggy.PluginManager, infos: dict[str, PluginInfo], registry
) -> list[dict]:
    """Each loaded plugin: name, version, source, location, what it registers, its lifecycle hooks."""
    from .registry import KINDS

    owners: dict[str, dict[str, list[str]]] = {}
    for kind in KINDS:
        for component in registry.names(kind):
            owners.setdefault(registry.plugin_of(kind, component), {}).setdefault(kind, []).append(
                component
            )
    described = []
    for info in infos.values():
        plugin = pm.get_plugin(info.name)
        callers = (pm.get_hookcallers(plugin) or []) if plugin is not None else []
        described.append(
            {
                "name": info.name,
                "source": info.source,
                "version": info.version,
                "location": info.location,
                "registers": owners.get(info.name, {}),
                "hooks": [h for h in LIFECYCLE_HOOKS if h in {c.name for c in callers}],
            }
        )
    return described


def format_plugins(described: list[dict]) -> str:
    """The ``automl-tl plugins`` table: one block per plugin."""
    lines = []
    for p in described:
        version = p["version"] or "-"
        lines.append(f"{p['name']} {version} [{p['source']}] {p['location'] or ''}".rstrip())
        for kind, names in p["registers"].items():
            shown = ", ".join(names) if len(names) <= 12 else ", ".join(names[:6]) + ", …"
            label = kind.replace("_", " ")
            lines.append(f"  {label} ({len(names)}): {shown}")
        if p["hooks"]:
            lines.append(f"  lifecycle hooks: {', '.join(p['hooks'])}")
        if not p["registers"] and not p["hooks"]:
            lines.append("  (registers nothing)")
    return "\n".join(lines)
