"""A small default portfolio tried before the model-based sampler's random start-up.

A model-based sampler (TPE, GP) starts with a few random trials. When most of the space is
poor (a too-high learning rate, strong augmentation on a short budget, a frozen body), those
trials tell it little, and on a budget of a few dozen epochs the search spends much of it
there. AutoGluon's zero-shot presets and Auto-sklearn's meta-learned portfolios start instead
from configurations known to work in general; ``[search] portfolio = true`` does the same with
one configuration per backbone, the textbook recipe for its weights (not tuned to any dataset):

- random init (``none``): full training (``unfreeze_scratch = "top_k"``: the random-init
  branch of the space has no depth, see automl_tl/space.py), ``lr`` at the centre (log
  scale) of the study's range;
- pretrained weights (anything else): linear probe, then fine-tune everything (``lp_ft``,
  depth 1.0; Kumar et al. 2022: fine-tuning from a trained head distorts pretrained features
  less), ``top_k`` when the study does not search ``lp_ft``; ``lr`` at the centre of the
  fine-tuning range (``lr_finetune``, 3e-4) when the study leaves ``[search] lr`` out, else a
  third of the way up the study's range on a log scale, i.e. lower than from scratch, as
  fine-tuning wants;
- ``weight_decay`` at the centre of its range. The range is the user's prior; for the default
  ranges these are the textbook values (``lr = 1e-3`` from scratch, 3e-4 fine-tuning;
  ``weight_decay = 1e-4``);
- mild geometric augmentation: ``flip_crop`` at strength 0.5 (random-resized crop and flip,
  the standard ImageNet fine-tuning transform, at the middle of the strength range); under
  ``[data] orientation = "fixed"`` ``crop`` (the same without the flip).

The recipe's regularizers (automl_tl/recipe.py) the study opens start from timm's usual
fine-tuning values, each clamped into the study's range (:data:`RECIPE_DEFAULTS`): mixup
α 0.2, CutMix α 1.0, every batch mixed, CutMix for half of them, label smoothing 0.1, EMA
decay 0.998, drop-path 0.1, gradients clipped at norm 1.0, one warm-up epoch. Under a short
schedule (``[search] epochs`` below :data:`SHORT_SCHEDULE_EPOCHS` = 10) the entry starts mild:
no mixing (mixup / CutMix α and ``mix_prob`` at the low end of their ranges) and no
drop-path, label smoothing 0.1 and EMA as above. Why: both slow down fitting, and their gains
come from long schedules: timm's ResNet procedures (Wightman et al. 2021, "ResNet strikes
back") weaken the regularization as the schedule shortens (mixup α 0.2 at 600 epochs, 0.1 at
300 and 100; stochastic depth at 600 and 300 epochs, none at 100); at 4 epochs on
benchmarks/recipe.py the entry's every-batch mixup won on a 20-image validation split and
lost on test. For a searched ``imbalance``, ``logit_adjust`` when listed (the rule's answer to
imbalance), else ``weighted`` when listed, else the first listed.

When ``[weights]`` is searched (sources taking turns by trial number), entry *n* follows the
source trial *n* gets. A strategy or policy the study does not search is replaced by its first
listed one (``none`` first for the policy). The portfolio takes the first slots of the
start-up (at most ``n_startup`` trials, in ``[search] backbones`` order), so TPE models from
the same number of trials as before, and finished portfolio trials count as start-up trials
for the sampler. Trial *n* < the portfolio's size gets entry *n*, whichever worker runs it.
"""

from __future__ import annotations

import math
from typing import Any

from .config import StudyConfig
from .space import STRATEGY_OPTIONS, is_scratch, lr_dimension

#: the recipe a backbone starts with from random init (see the module docstring)
RECIPE: dict[str, Any] = {
    "augmentation": "flip_crop",
    "aug_strength": 0.5,
    "unfreeze": "top_k",
    "unfreeze_depth": 1.0,
    "lr_at": 0.5,  # where in the lr range, on a log scale (0 = low end, 1 = high end)
}
#: ... and from pretrained weights (``lr_at`` in a range the study set for both; in the
#: fine-tuning range of automl_tl.space, the centre)
PRETRAINED_RECIPE: dict[str, Any] = {
    **RECIPE,
    "unfreeze": "lp_ft",
    "lr_at": 1 / 3,
}
#: the recipe's regularizers a portfolio entry starts with, when the study opens them
RECIPE_DEFAULTS: dict[str, float] = {
    "mixup_alpha": 0.2,
    "cutmix_alpha": 1.0,
    "mix_prob": 1.0,
    "mix_switch_prob": 0.5,
    "label_smoothing": 0.1,
    "ema_decay": 0.998,
    "drop_path": 0.1,
    "clip_grad": 1.0,
    "warmup_epochs": 1.0,
}
#: a study whose trials train fewer epochs than this has a short schedule: its entries start
#: mild (:data:`SHORT_SCHEDULE_DEFAULTS`)
SHORT_SCHEDULE_EPOCHS = 10
#: what replaces :data:`RECIPE_DEFAULTS` under a short schedule (also clamped into the study's
#: ranges, i.e. the low end where 0 is outside): no mixing and no drop-path, which slow down
#: fitting that a few epochs cannot make up; label smoothing (a change of targets only) and
#: EMA (timm's warm-up shortens it to the run) stay
SHORT_SCHEDULE_DEFAULTS: dict[str, float] = {
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
    "mix_prob": 0.0,
    "drop_path": 0.0,
}
#: the options a strategy's entry starts with, when the study searches them (LoRA's usual rank)
STRATEGY_DEFAULTS: dict[str, Any] = {"lora_rank": 8}
#: the augmentation of both recipes under ``[data] orientation = "fixed"``
FIXED_ORIENTATION_AUGMENTATION = "crop"


def _log_at(bounds: list[float], at: float) -> float:
    lo, hi = bounds  # both > 0: config.py checks log ranges
    return math.exp(math.log(lo) + at * (math.log(hi) - math.log(lo)))


def _log_centre(bounds: list[float]) -> float:
    return _log_at(bounds, 0.5)


def _weights_of(config: StudyConfig, backbone: str, number: int) -> str | None:
    """The searched weight source trial ``number`` of ``backbone`` trains from (automl_tl.
    transfer's AlternatingSampler gives sources turns by trial number); None when fixed."""
    choices = config.weight_choices(backbone)
    return choices[number % len(choices)] if choices else None


def portfolio(config: StudyConfig, size: int) -> list[dict[str, Any]]:
    """The first ``size`` portfolio entries (one per backbone) as Optuna parameter values."""
    s = config.search
    entries = []
    for number, backbone in enumerate(s.backbones[: max(0, size)]):
        scratch = is_scratch(config, backbone, _weights_of(config, backbone, number))
        recipe = RECIPE if scratch else PRETRAINED_RECIPE
        wanted = recipe["augmentation"]
        if config.data.orientation == "fixed":
            wanted = FIXED_ORIENTATION_AUGMENTATION
        if wanted in s.augmentations:
            augmentation = wanted
        else:
            augmentation = "none" if "none" in s.augmentations else s.augmentations[0]
        lr_name, lr_range = lr_dimension(config, scratch)
        lr_at = recipe["lr_at"] if lr_name == "lr" else 0.5  # the fine-tuning range's centre
        params: dict[str, Any] = {"backbone": backbone, "augmentation": augmentation}
        if scratch:  # no depth: a value the space does not allow comes from the base sampler
            params["unfreeze_scratch"] = RECIPE["unfreeze"]
        else:
            params["unfreeze"] = next(
                (u for u in (recipe["unfreeze"], RECIPE["unfreeze"]) if u in s.unfreeze),
                s.unfreeze[0],
            )
            params["unfreeze_depth"] = recipe["unfreeze_depth"]
            params.update(strategy_defaults(config, params["unfreeze"]))
        params[lr_name] = _log_at(list(lr_range), lr_at)
        params["weight_decay"] = _log_centre(s.weight_decay)
        if augmentation != "none":
            params["aug_strength"] = recipe["aug_strength"]
        params.update(recipe_defaults(config))
        entries.append(params)
    return entries


def strategy_defaults(config: StudyConfig, strategy: str) -> dict[str, Any]:
    """:data:`STRATEGY_DEFAULTS` for the options of ``strategy`` the study searches (the
    middle listed value when the study does not list the default)."""
    out: dict[str, Any] = {}
    for key in STRATEGY_OPTIONS.get(strategy, {}).values():
        values = getattr(config.search, key)
        if len(values) > 1:
            wanted = STRATEGY_DEFAULTS.get(key)
            out[key] = wanted if wanted in values else values[len(values) // 2]
    return out


def recipe_defaults(config: StudyConfig) -> dict[str, Any]:
    """:data:`RECIPE_DEFAULTS` for the recipe keys the study searches, clamped into its
    ranges (a dimension that is not a parameter gets none: Optuna ignores it anyway); under
    a short schedule (``epochs`` < :data:`SHORT_SCHEDULE_EPOCHS`) with
    :data:`SHORT_SCHEDULE_DEFAULTS` instead where it has one."""
    s = config.search
    defaults = dict(RECIPE_DEFAULTS)
    if s.epochs < SHORT_SCHEDULE_EPOCHS:
        defaults.update(SHORT_SCHEDULE_DEFAULTS)
    out: dict[str, Any] = {}
    for key, value in defaults.items():
        bounds = getattr(s, key)
        if bounds is not None and bounds[0] < bounds[1]:
            out[key] = min(max(value, bounds[0]), bounds[1])
    if s.imbalance is not None and len(s.imbalance) > 1:
        listed = [k for k in ("logit_adjust", "weighted") if k in s.imbalance]
        out["imbalance"] = (listed or s.imbalance)[0]
    return out
