"""The search space: registry + study config -> Optuna suggestions, and params -> a Choice.

The space is conditional, and this module is the one place that says how (Optuna's
define-by-run: a dimension that does not apply to a trial is never suggested, so TPE and GP
model each branch from the trials that have it). ``docs/architecture.md`` has the same table.

=================== ======================================= ====================================
parameter           exists when                             values
=================== ======================================= ====================================
``backbone``        always                                  ``[search] backbones``
``weights``         ``[weights]`` lists several sources     that list (sources take turns)
                    for the backbone
``augmentation``    always                                  ``[search] augmentations``; under
                                                            ``[data] orientation = "fixed"``
                                                            only orientation-safe policies
``aug_strength``    the policy is not ``none``              [0, 1]
``unfreeze``        pretrained weights                      ``[search] unfreeze``
``unfreeze_depth``  pretrained weights                      ``[search] unfreeze_depth``
                                                            (default [0, 1])
``lora_rank``       the trial's strategy is ``lora`` and    those ranks (default [4, 8, 16];
                    ``[search] lora_rank`` lists several    alpha = 2 x rank)
``unfreeze_scratch`` random init (``"none"``)               the ``from_scratch`` strategies of
                                                            ``[search] unfreeze``, at full depth
``lr``              random init, or any trial when the      ``[search] lr`` (default
                    study sets ``[search] lr``              [1e-4, 1e-2], log)
``lr_finetune``     pretrained weights, and the study       :data:`FINETUNE_LR` [3e-5, 3e-3],
                    leaves ``[search] lr`` out              log
``weight_decay``    always                                  ``[search] weight_decay`` (log)
``mixup_alpha``     the study sets ``[search] mixup_alpha`` that range (> 0)
``cutmix_alpha``    the study sets ``[search] cutmix_alpha`` that range (> 0)
``mix_prob``        mixup or CutMix is open and the study   that range in [0, 1] (left out:
                    sets ``[search] mix_prob``              1.0, every batch mixed)
``mix_switch_prob`` mixup and CutMix are open and the study that range in [0, 1] (left out: 0.5)
                    sets ``[search] mix_switch_prob``
``label_smoothing`` the study sets ``[search]               that range in [0, 1)
                    label_smoothing``
``ema_decay``       the study sets ``[search] ema_decay``   that range in (0, 1)
``drop_path``       the study sets ``[search] drop_path``   that range in [0, 1); backbones
                    and the backbone takes drop-path        that take none train without
                    (``Backbone.regularizers()``)
``clip_grad``       the study sets ``[search] clip_grad``   that range (log)
``warmup_epochs``   the study sets ``[search]               that range (>= 0)
                    warmup_epochs``
``imbalance``       the study lists several in ``[search]   those of none, weighted, focal,
                    imbalance``                             sampler, logit_adjust
``image_size``      ``[data] image_size`` lists several     those sizes (one decoded cache each)
=================== ======================================= ====================================

A recipe key the study leaves out is not a parameter: its piece is off (``imbalance``: the
rule of automl_tl/recipe.py, ``logit_adjust`` on a train split whose largest class has at least
5x the images of its smallest); one number (or ``[x, x]``, or one name) fixes it without a
parameter. What each piece does is automl_tl/recipe.py's table.

Why separate names: Optuna keeps one distribution per parameter name (a categorical's choices
may not change between trials), and a sampler models one name as one quantity; a random-init
trial's strategy (chosen from fewer strategies) and a fine-tuning lr (from another range) are
other quantities. A random-init trial trains its whole body from the first epoch: no depth,
no strategy that freezes (``UnfreezeStrategy.from_scratch``). Stored parameters of studies
from before this table (``unfreeze`` and ``unfreeze_depth`` on every trial) still load:
:func:`choice_from_params` and :func:`effective_params` read both forms.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import optuna

from .components import flipped_outputs
from .config import RECIPE_KEYS, StudyConfig
from .errors import ConfigError, UserError
from .recipe import Recipe, recipe_from_params
from .train import Choice

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger("automl_tl")

PARAM_NAMES = (
    "backbone",
    "weights",
    "augmentation",
    "aug_strength",
    "unfreeze",
    "unfreeze_depth",
    "unfreeze_scratch",
    "lr",
    "lr_finetune",
    "weight_decay",
)

#: the parameters as reports, the catalog and log lines show them (:func:`effective_params`):
#: a random-init trial's ``unfreeze_scratch`` as ``unfreeze`` at depth 1.0, ``lr_finetune`` as
#: ``lr``
SHOWN_PARAMS = (
    "backbone",
    "weights",
    "augmentation",
    "aug_strength",
    "unfreeze",
    "unfreeze_depth",
    "lr",
    "weight_decay",
)

#: the options a strategy takes per trial (:meth:`UnfreezeStrategy.configure`): strategy ->
#: option -> the ``[search]`` key that lists its values. The Optuna parameter has the key's
#: name and exists only in trials that choose the strategy, when the key lists several values
#: (one fixes it: no parameter, a retrain takes it from the study file)
STRATEGY_OPTIONS: dict[str, dict[str, str]] = {"lora": {"rank": "lora_rank"}}

#: the default lr range of trials from pretrained weights (when ``[search] lr`` is not set):
#: fine-tuning wants a lower lr than training from random init (``[search] lr``'s default,
#: [1e-4, 1e-2]); its log-centre, 3e-4, is the usual AdamW fine-tuning rate
FINETUNE_LR = (3e-5, 3e-3)


def is_scratch(config: StudyConfig, backbone: str, source: str | None) -> bool:
    """Whether a trial of ``backbone`` with searched source ``source`` starts from random init."""
    return config.weights_for(backbone, source) == "none"


def lr_dimension(config: StudyConfig, scratch: bool) -> tuple[str, tuple[float, float]]:
    """The lr parameter's name and range for a trial from random init or not."""
    if scratch or config.sets("search.lr"):
        return "lr", (config.search.lr[0], config.search.lr[1])
    return "lr_finetune", FINETUNE_LR


def scratch_strategies(config: StudyConfig, registry: Registry) -> list[str]:
    """The strategies of ``[search] unfreeze`` a random-init trial chooses from."""
    return [
        u
        for u in config.search.unfreeze
        if getattr(registry.get("unfreeze_strategies", u), "from_scratch", False)
    ]


def check_space(config: StudyConfig, registry: Registry) -> None:
    """Refuse, before anything trains, a space with an empty branch or an unsafe policy.

    - A backbone that trains from random init needs a ``from_scratch`` strategy in
      ``[search] unfreeze``.
    - Under ``[data] orientation = "fixed"``, every policy of ``[search] augmentations`` must
      be orientation-safe, and behave so: a policy that declares itself safe but flips an
      image (the contract suite's probe, :func:`automl_tl.components.flipped_outputs`) is refused.
    """
    s = config.search
    for note in check_recipe(config, registry):
        log.warning(note)
    can_scratch = [b for b in s.backbones if _can_be_scratch(config, b)]
    if can_scratch and not scratch_strategies(config, registry):
        raise ConfigError(
            f"[search] unfreeze = {s.unfreeze!r} has no strategy that trains from random init, "
            f'but {", ".join(can_scratch)} start(s) from random init ([weights] "none"), where '
            'freezing layers trains a head on random features; add "top_k" (full training) '
            "to [search] unfreeze, or give those backbones pretrained weights in [weights]"
        )
    if config.data.orientation != "fixed":
        return
    for name in s.augmentations:
        policy = registry.get("augmentation_policies", name)
        if not policy.orientation_safe:
            what = "flips images" if policy.flips else f"rotates up to {policy.max_rotation_deg}°"
            safe = [
                n
                for n in registry.names("augmentation_policies")
                if registry.get("augmentation_policies", n).orientation_safe
            ]
            raise ConfigError(
                f"[search] augmentations lists {name!r}, which {what}, but [data] orientation = "
                '"fixed" (the label depends on orientation); remove it, or use a policy that '
                f"keeps orientation: {', '.join(safe)}"
            )
        flipped = flipped_outputs(policy, config.data.image_size)
        if flipped:
            raise UserError(
                f"augmentation policy {name!r} declares that it keeps orientation (flips = False)"
                f" but mirrored {flipped} of the probe images; its plugin must set flips = True, "
                'or remove it from [search] augmentations while [data] orientation = "fixed"'
            )


def _can_be_scratch(config: StudyConfig, backbone: str) -> bool:
    choices = config.weight_choices(backbone)
    return any(is_scratch(config, backbone, c) for c in (choices or [None]))


def suggest(trial: optuna.Trial, config: StudyConfig, registry: Registry) -> Choice:
    """Sample one configuration (define-by-run) from the study's conditional space."""
    s = config.search
    backbone = trial.suggest_categorical("backbone", s.backbones)
    sources = config.weight_choices(backbone)
    source = trial.suggest_categorical("weights", sources) if sources else None
    scratch = is_scratch(config, backbone, source)
    augmentation = trial.suggest_categorical("augmentation", s.augmentations)
    strength = 0.0 if augmentation == "none" else trial.suggest_float("aug_strength", 0.0, 1.0)
    if scratch:
        choices = scratch_strategies(config, registry)
        if not choices:
            check_space(config, registry)  # raises, naming the fix
        unfreeze = trial.suggest_categorical("unfreeze_scratch", choices)
        depth = 1.0
    else:
        unfreeze = trial.suggest_categorical("unfreeze", s.unfreeze)
        depth = trial.suggest_float("unfreeze_depth", *s.unfreeze_depth)
    options = suggest_strategy_options(trial, config, unfreeze)
    lr_name, (lr_low, lr_high) = lr_dimension(config, scratch)
    lr = trial.suggest_float(lr_name, lr_low, lr_high, log=True)
    weight_decay = trial.suggest_float(
        "weight_decay", s.weight_decay[0], s.weight_decay[1], log=True
    )
    recipe = suggest_recipe(trial, config, registry, backbone)
    sizes = config.data.sizes
    return Choice(
        image_size=trial.suggest_categorical("image_size", sizes) if len(sizes) > 1 else None,
        recipe=recipe,
        backbone=backbone,
        weights=config.weights_for(backbone, source),
        augmentation=augmentation,
        aug_strength=strength,
        unfreeze=unfreeze,
        unfreeze_depth=depth,
        strategy_options=options,
        lr=lr,
        weight_decay=weight_decay,
        epochs=s.epochs,
        batch_size=s.batch_size,
    )


def suggest_strategy_options(
    trial: optuna.Trial, config: StudyConfig, strategy: str
) -> dict[str, Any]:
    """The options of ``strategy`` the study searches (:data:`STRATEGY_OPTIONS`): a
    categorical parameter per option whose key lists several values, else the one value."""
    options = {}
    for option, key in STRATEGY_OPTIONS.get(strategy, {}).items():
        values = getattr(config.search, key)
        options[option] = trial.suggest_categorical(key, values) if len(values) > 1 else values[0]
    return options


def strategy_options_from_params(
    params: dict[str, Any], config: StudyConfig, strategy: str
) -> dict[str, Any]:
    """The options a finished trial of ``strategy`` trained with: its parameters, or the one
    value the study fixes; an option neither has (a trial from before the key) is left to
    the strategy's own default (``lora``: rank 8, as such trials trained)."""
    options = {}
    for option, key in STRATEGY_OPTIONS.get(strategy, {}).items():
        values = getattr(config.search, key)
        if key in params:
            options[option] = params[key]
        elif len(values) == 1:
            options[option] = values[0]
    return options


def takes_drop_path(registry: Registry, backbone: str) -> bool:
    """Whether ``backbone`` declares drop-path (:meth:`Backbone.regularizers`)."""
    return "drop_path" in registry.get("backbones", backbone).regularizers()


def suggest_recipe(
    trial: optuna.Trial, config: StudyConfig, registry: Registry, backbone: str
) -> Recipe:
    """The recipe's parameters of the space table the study opened (the rest stay off)."""
    s = config.search
    values: dict[str, Any] = {}
    for key in ("mixup_alpha", "cutmix_alpha", "label_smoothing", "ema_decay", "warmup_epochs"):
        bounds = getattr(s, key)
        if bounds is not None:
            values[key] = _suggest_range(trial, key, bounds)
    if s.mixup_alpha is not None or s.cutmix_alpha is not None:
        if s.mix_prob is not None:
            values["mix_prob"] = _suggest_range(trial, "mix_prob", s.mix_prob)
        both = s.mixup_alpha is not None and s.cutmix_alpha is not None
        if both and s.mix_switch_prob is not None:
            values["mix_switch_prob"] = _suggest_range(trial, "mix_switch_prob", s.mix_switch_prob)
    if s.drop_path is not None and takes_drop_path(registry, backbone):
        values["drop_path"] = _suggest_range(trial, "drop_path", s.drop_path)
    if s.clip_grad is not None:
        values["clip_grad"] = _suggest_range(trial, "clip_grad", s.clip_grad, log=True)
    if s.imbalance is not None:
        values["imbalance"] = (
            trial.suggest_categorical("imbalance", s.imbalance)
            if len(s.imbalance) > 1
            else s.imbalance[0]
        )
    return Recipe(**values)


def _suggest_range(trial: optuna.Trial, name: str, bounds: list[float], log: bool = False):
    """A searched range, or its one value without a parameter when ``[x, x]``."""
    low, high = bounds
    if low == high:
        return low
    return trial.suggest_float(name, low, high, log=log)


def fixed_recipe(config: StudyConfig) -> dict[str, Any]:
    """The recipe values the study fixes (one number, ``[x, x]`` or one name): not
    parameters, so a retrain takes them from the study file."""
    s = config.search
    fixed: dict[str, Any] = {}
    for key in RECIPE_KEYS:
        value = getattr(s, key)
        if value is not None and (len(value) == 1 or value[0] == value[-1]):
            fixed[key] = value[0]
    return fixed


def check_recipe(config: StudyConfig, registry: Registry) -> list[str]:
    """Refuse a drop-path range no searched backbone can use; return a note per backbone
    that trains without it (it declares no drop-path)."""
    if config.search.drop_path is None:
        return []
    without = [b for b in config.search.backbones if not takes_drop_path(registry, b)]
    if len(without) == len(config.search.backbones):
        raise ConfigError(
            f"[search] drop_path = {config.search.drop_path!r}, but no backbone of [search] "
            f"backbones takes a drop-path rate ({', '.join(without)} declare none); remove "
            "drop_path, or add a backbone that takes it (most timm models do)"
        )
    return [
        f"{b} takes no drop-path rate: its trials train without drop-path ([search] drop_path)"
        for b in without
    ]


def effective_params(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters with the branch names folded into one form: ``unfreeze``,
    ``unfreeze_depth`` (1.0 for a random-init trial: its whole body trained) and ``lr``,
    whichever branch the trial took (reports and log lines show this form)."""
    out = {k: v for k, v in params.items() if k not in ("unfreeze_scratch", "lr_finetune")}
    if "unfreeze_scratch" in params:
        out["unfreeze"] = params["unfreeze_scratch"]
        out.setdefault("unfreeze_depth", 1.0)
    if "lr_finetune" in params:
        out["lr"] = params["lr_finetune"]
    return out


def choice_from_params(params: dict[str, Any], config: StudyConfig) -> Choice:
    """Rebuild the Choice of a finished trial (for retrain) from its parameters (either form:
    this module's conditional names, or the flat ones of older studies)."""
    known = set(PARAM_NAMES) | set(RECIPE_KEYS) | {"image_size"}
    known |= {key for keys in STRATEGY_OPTIONS.values() for key in keys.values()}
    p = effective_params(params)
    missing = [
        k for k in ("backbone", "augmentation", "unfreeze", "lr", "weight_decay") if k not in p
    ]
    if missing:
        raise UserError(f"the trial's parameters {sorted(params)} lack {missing}")
    recipe = recipe_from_params({**fixed_recipe(config), **params})
    return Choice(
        image_size=int(params["image_size"]) if "image_size" in params else None,
        recipe=recipe,
        backbone=p["backbone"],
        weights=config.weights_for(p["backbone"], p.get("weights")),
        augmentation=p["augmentation"],
        aug_strength=float(p.get("aug_strength", 0.0)),
        unfreeze=p["unfreeze"],
        unfreeze_depth=float(p.get("unfreeze_depth", 1.0)),
        strategy_options=strategy_options_from_params(params, config, p["unfreeze"]),
        lr=float(p["lr"]),
        weight_decay=float(p["weight_decay"]),
        epochs=config.search.epochs,
        batch_size=config.search.batch_size,
        extra={k: v for k, v in params.items() if k not in known},
    )
