"""automl-tl: automated transfer learning for image classification.

Search with Optuna over timm backbones, Kornia augmentation policies and unfreeze depth;
retrain the winner; export it in timm's format. Everything pluggable is registered through
pluggy hooks (see :mod:`automl_tl.hookspecs`).
"""

from .hookspecs import hookimpl  # noqa: I001  (first: default plugins import it from here)
from .components import (
    AugmentationPolicy,
    Backbone,
    DataConfig,
    Dataset,
    DatasetSource,
    Metric,
    ParamGroup,
    Record,
    UnfreezeStrategy,
)
from .config import StudyConfig, config_from_dict, load_config
from .errors import ConfigError, DataError, PluginError, UnknownNameError, UserError
from .export import LoadedModel, load_model
from .plugins import get_plugin_manager
from .registry import Registry
from .train import Choice, FitResult, fit

__version__ = "0.1.0"

__all__ = [
    "AugmentationPolicy",
    "Backbone",
    "Choice",
    "ConfigError",
    "DataConfig",
    "DataError",
    "Dataset",
    "DatasetSource",
    "FitResult",
    "LoadedModel",
    "Metric",
    "ParamGroup",
    "PluginError",
    "Record",
    "Registry",
    "StudyConfig",
    "UnfreezeStrategy",
    "UnknownNameError",
    "UserError",
    "config_from_dict",
    "fit",
    "get_plugin_manager",
    "hookimpl",
    "load_config",
    "load_model",
    "registry_for",
]


def registry_for(plugins: list[str] | tuple[str, ...] = ()) -> Registry:
    """The registry of the default plugins, installed entry points and ``plugins``."""
    pm, _ = get_plugin_manager(plugins)
    return Registry.from_plugin_manager(pm)
