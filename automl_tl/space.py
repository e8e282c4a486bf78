"""The search space: registry + study config -> Optuna suggestions, and params -> a Choice.

Parameter names (stable; reports and the catalog use them): ``backbone``, ``weights`` (the
weight source as written in ``[weights]``, only when it lists several for the backbone, e.g.
``"pretrain:digits:0-4"`` or ``"none"``), ``augmentation``, ``aug_strength`` (only when the
policy is not ``none``), ``unfreeze``, ``unfreeze_depth`` (a fraction of the backbone's layer
groups, so it means the same for every backbone), ``lr``, ``weight_decay``.
"""

from __future__ import annotations

from typing import Any

import optuna

from .config import StudyConfig
from .train import Choice

PARAM_NAMES = (
    "backbone",
    "weights",
    "augmentation",
    "aug_strength",
    "unfreeze",
    "unfreeze_depth",
    "lr",
    "weight_decay",
)


def suggest(trial: optuna.Trial, config: StudyConfig) -> Choice:
    """Sample one configuration (define-by-run) from the study's space."""
    s = config.search
    backbone = trial.suggest_categorical("backbone", s.backbones)
    sources = config.weight_choices(backbone)
    source = trial.suggest_categorical("weights", sources) if sources else None
    augmentation = trial.suggest_categorical("augmentation", s.augmentations)
    strength = 0.0 if augmentation == "none" else trial.suggest_float("aug_strength", 0.0, 1.0)
    unfreeze = trial.suggest_categorical("unfreeze", s.unfreeze)
    depth = trial.suggest_float("unfreeze_depth", 0.0, 1.0)
    lr = trial.suggest_float("lr", s.lr[0], s.lr[1], log=True)
    weight_decay = trial.suggest_float(
        "weight_decay", s.weight_decay[0], s.weight_decay[1], log=True
    )
    return Choice(
        backbone=backbone,
        weights=config.weights_for(backbone, source),
        augmentation=augmentation,
        aug_strength=strength,
        unfreeze=unfreeze,
        unfreeze_depth=depth,
        lr=lr,
        weight_decay=weight_decay,
        epochs=s.epochs,
        batch_size=s.batch_size,
    )


def choice_from_params(params: dict[str, Any], config: StudyConfig) -> Choice:
    """Rebuild the Choice of a finished trial (for retrain) from its parameters."""
    known = set(PARAM_NAMES)
    return Choice(
        backbone=params["backbone"],
        weights=config.weights_for(params["backbone"], params.get("weights")),
        augmentation=params["augmentation"],
        aug_strength=float(params.get("aug_strength", 0.0)),
        unfreeze=params["unfreeze"],
        unfreeze_depth=float(params["unfreeze_depth"]),
        lr=float(params["lr"]),
        weight_decay=float(params["weight_decay"]),
        epochs=config.search.epochs,
        batch_size=config.search.batch_size,
        extra={k: v for k, v in params.items() if k not in known},
    )
