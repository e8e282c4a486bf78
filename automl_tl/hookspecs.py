"""Every hook a plugin can implement. Mark implementations with ``@automl_tl.hookimpl``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

from .components import AugmentationPolicy, Backbone, DatasetSource, Metric, UnfreezeStrategy

hookspec = pluggy.HookspecMarker("automl_tl")
hookimpl = pluggy.HookimplMarker("automl_tl")


@hookspec
def register_backbones(register: Callable[[Backbone], None]) -> None:
    """Call ``register(backbone)`` for each Backbone this plugin provides."""


@hookspec
def register_augmentation_policies(register: Callable[[AugmentationPolicy], None]) -> None:
    """Call ``register(policy)`` for each AugmentationPolicy this plugin provides."""


@hookspec
def register_unfreeze_strategies(register: Callable[[UnfreezeStrategy], None]) -> None:
    """Call ``register(strategy)`` for each UnfreezeStrategy this plugin provides."""


@hookspec
def register_datasets(register: Callable[[DatasetSource], None]) -> None:
    """Call ``register(source)`` for each DatasetSource this plugin provides."""


@hookspec
def register_metrics(register: Callable[[Metric], None]) -> None:
    """Call ``register(metric)`` for each Metric this plugin provides."""


@hookspec
def trial_started(
    study_name: str, trial_number: int, params: dict[str, Any], output_dir: str
) -> None:
    """A trial is about to train with these parameters; output_dir is the study's folder."""


@hookspec
def epoch_finished(
    study_name: str, trial_number: int, epoch: int, metrics: dict[str, float]
) -> None:
    """A trial finished an epoch (0-based); metrics hold train_loss, val scores, lr, seconds."""


@hookspec
def trial_finished(
    study_name: str, trial_number: int, state: str, value: float | None, attrs: dict[str, Any]
) -> None:
    """A trial ended as COMPLETE, PRUNED or FAIL; attrs are its user attributes."""


@hookspec
def study_finished(study_name: str, best: dict[str, Any] | None, output_dir: str) -> None:
    """A search run ended; best is {number, value, params} or None when no trial completed."""


@hookspec
def model_exported(
    study_name: str, trial_number: int, model_dir: str, metrics: dict[str, Any], best: bool
) -> None:
    """A retrained model was exported to model_dir (best: it is the study's best/)."""
