"""Retrain a finished trial's configuration afresh on ``[retrain] on``, score it on the test
split, export it, and record it in the catalog — once per study however many workers end
together, and again when the worker that claimed it died or its model went missing.

- :func:`retrain` — any trial (the best by default) into ``best/`` or ``models/trial-N/``.
- :func:`retrain_once` — the best trial, claimed so exactly one worker retrains it.
- :func:`retrain_per_weights` — each weight source's best, for transferred vs scratch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import optuna
import torch

from . import latency, trials
from ._util import write_atomic
from .budget import claim_expiry, claim_marker, describe_worker, holder_gone
from .catalog import Catalog, catalog_path
from .config import StudyConfig
from .data import Splits, load_splits, splits_at
from .errors import UserError
from .export import export_model, load_model
from .leaderboard import best_by_weights, comparison, describe_params, retrained_model
from .paths import ensure_writable
from .plugins import component_origin
from .pretrain import ensure_study_weights
from .registry import Registry
from .scores import (
    calibrated,
    fit_temperature,
    metric_intervals,
    multilabel_intervals,
    reliability,
    unpack,
)
from .space import choice_from_params
from .storage import check_data, open_study, storage_of
from .tasks import multilabel_metrics, tune_thresholds
from .train import evaluate, fit, plugin_metrics, resolve_device
from .trials import Direction

log = logging.getLogger("automl_tl")


def retrain(
    config: StudyConfig,
    registry: Registry,
    *,
    trial_number: int | None = None,
    device: str = "auto",
    study: optuna.Study | None = None,
    splits: Splits | None = None,
    to_best: bool = False,
    epochs: int | None = None,
    temperature: tuple[float, str] | None = None,
    selection: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train a finished trial's configuration afresh (from its weights, not the trial's
    checkpoint) on ``[retrain] on``, evaluate on test, export, and add it to the catalog.

    The best trial (``trial_number`` None) goes to ``best/``, any other to
    ``models/trial-N/``. ``best/`` is never replaced by a trial that scores lower than the
    one it holds (two workers retraining at once): that one goes to ``models/trial-N/``.

    Args:
        to_best: write ``trial_number`` to ``best/`` (the raced winner of
            :mod:`automl_tl.selection`, which need not have the best search score).
        epochs: train this many epochs instead of ``[search] epochs`` (the best epoch the
            finalists agree on, with early stopping).
        temperature: ``(T, what it was fitted on)`` for temperature scaling; None: fitted on
            held-out validation predictions when there are some (``[selection] calibrate``).
        selection: what the selection decided, stored in ``metrics.json``.

    Test metrics carry 95 % intervals (``test_interval``; a multi-label model's: a bootstrap
    over test images) and the calibration (``calibration``: temperature, expected
    calibration error before and after, bins; multiclass only).
    """
    paths = config.paths
    ensure_writable(paths.root)
    study = study or open_study(config)
    if splits is None:
        splits = load_splits(config, registry)
        check_data(study, splits)
    if trial_number is None:
        try:
            trial = trials.best_trial(study)
        except ValueError as exc:
            raise UserError(f"study {config.name!r} has no complete trial to retrain yet") from exc
        directory = paths.best
    else:
        known = {t.number: t for t in study.get_trials(deepcopy=False)}
        if trial_number not in known or not known[trial_number].params:
            raise UserError(
                f"study {config.name!r} has no trial {trial_number}; see `automl-tl report`"
            )
        trial = known[trial_number]
        directory = paths.best if to_best else paths.model(trial_number)
    choice = choice_from_params(trial.params, config)
    splits = splits_at(config, registry, splits, choice.image_size)  # a searched size
    if epochs is not None:
        choice.epochs = int(epochs)
    ensure_study_weights(config, registry, device=device)
    device_t = resolve_device(device)
    on = config.retrain.on
    log.info("retraining trial %d on %s: %s", trial.number, on, describe_params(trial.params))
    started = time.perf_counter()
    result = fit(
        choice,
        splits,
        registry,
        device=device_t,
        seed=config.data.seed + trial.number,
        train_on=on,
        evaluate_on=None,
        use_ema=trial.user_attrs.get(trials.EMA_WON),  # EMA: the model that won in the trial
    )
    num_classes = len(splits.class_names)
    plugin_scores = plugin_metrics(registry)  # metric plugins, beside the built-in ones
    test_log_probs: list = []
    test = evaluate(
        result.model,
        splits.test,
        num_classes,
        result.data_config,
        device_t,
        log_probs=test_log_probs,
        metrics=plugin_scores,
    )
    val_log_probs: list = []
    if on == "train":
        val = evaluate(
            result.model,
            splits.val,
            num_classes,
            result.data_config,
            device_t,
            log_probs=val_log_probs,
            metrics=plugin_scores,
        )
    else:
        val = dict(trial.user_attrs.get(trials.VAL_METRICS) or {})
    task = splits.task
    if task.multilabel:  # per-label thresholds from validation; no temperature (one softmax)
        thresholds = held_out_thresholds(trial, splits, val_log_probs, on)
        probs, y = torch.cat(test_log_probs).exp().numpy(), splits.test.y.numpy()
        cuts = thresholds[0] if thresholds else None
        test = multilabel_metrics(probs, y, cuts)
        test_scores = {
            "test_interval": multilabel_intervals(probs, y, cuts, seed=config.data.seed),
            "test_images": len(splits.test),
            "thresholds": {
                "values": [round(float(t), 6) for t in thresholds[0]] if thresholds else None,
                "tuned_on": thresholds[1] if thresholds else "test (no validation predictions)",
            },
        }
    else:
        if temperature is None and config.selection.calibrate:
            temperature = held_out_temperature(trial, splits, val_log_probs, on)
        test_scores = score_predictions(
            torch.cat(test_log_probs),
            splits.test.y,
            num_classes,
            temperature,
            seed=config.data.seed,
        )
    metrics = {
        "study": config.name,
        "trial": trial.number,
        "metric": config.search.metric,
        "task": task.name,
        "direction": Direction.of(study).name,  # which way the metric is better
        "params": dict(trial.params),
        "retrained_on": on,
        "epochs": choice.epochs,
        "seconds": round(time.perf_counter() - started, 3),
        "val": val,
        "test": test,
        **test_scores,
        "data": splits.summary(),
        # where the model came from: the backbone's plugin and the weights it started from
        "backbone_origin": component_origin(
            registry.plugin_of("backbones", choice.backbone), result.backbone
        ),
        "weights": config.weights_record(choice.backbone, trial.params.get("weights")),
    }
    if selection is not None:
        metrics["selection"] = selection
    if directory == paths.best and not to_best:  # another worker may have exported a better trial
        directory = best_dir_for(config, study, trial)
    digest = export_model(
        result.model,
        result.backbone,
        directory,
        splits.class_names,
        result.data_config,
        metrics,
        extra={
            **task_export(metrics, config.data.label_separator),
            "backbone_origin": metrics["backbone_origin"],
            "weights": metrics["weights"],
        },
    )
    if "latency_ms" in (trial.user_attrs.get(trials.MEASURED) or {}):
        metrics["latency"] = export_latency(config, registry, directory, trial)
        write_atomic(directory / "metrics.json", json.dumps(metrics, indent=2))
    Catalog(catalog_path(config)).record_model(
        config.name,
        trial.number,
        directory,
        choice.backbone,
        dict(trial.params),
        splits.fingerprint,
        metrics,
        digest,
    )
    log.info(
        "test %s %.4f; model written to %s",
        config.search.metric,
        test[config.search.metric],
        directory,
    )
    return directory, metrics


#: the exported model's latency may differ from the trial's by this much (issue 12)
LATENCY_TOLERANCE = 0.10


def export_latency(
    config: StudyConfig, registry: Registry, directory: Path, trial: optuna.trial.FrozenTrial
) -> dict[str, Any]:
    """The exported model timed on its own (loaded from ``directory``) on the study's latency
    target, beside the latency its trial was chosen for: ``ratio`` = export / trial, and
    whether they agree within :data:`LATENCY_TOLERANCE`."""
    target = config.search.latency_target()
    loaded = load_model(directory, device="cpu", registry=registry)
    export_ms = latency.time_model(loaded.model, loaded.image_size, target)
    trial_ms = float(trial.user_attrs[trials.MEASURED]["latency_ms"])
    ratio = export_ms / trial_ms if trial_ms > 0 else math.inf
    return {
        "target": target,
        "trial_ms": round(trial_ms, 4),
        "export_ms": round(export_ms, 4),
        "ratio": round(ratio, 4),
        "within_tolerance": abs(ratio - 1) <= LATENCY_TOLERANCE,
    }


def held_out_temperature(
    trial: optuna.trial.FrozenTrial, splits: Splits, val_log_probs: list, on: str
) -> tuple[float, str] | None:
    """A temperature fitted on validation predictions the model did not train on: the
    retrained model's own when it trained on train only, else the search trial's (same
    configuration, trained on train). None when there are none."""
    if on == "train" and val_log_probs:
        return fit_temperature(
            torch.cat(val_log_probs), splits.val.y
        ), "validation (retrained model)"
    stored = unpack(trial.user_attrs.get(trials.VAL_LOG_PROBS))
    if stored is not None and len(stored) == len(splits.val):
        return fit_temperature(stored, splits.val.y), f"validation (trial {trial.number})"
    return None


def held_out_thresholds(
    trial: optuna.trial.FrozenTrial, splits: Splits, val_log_probs: list, on: str
) -> tuple[list[float], str] | None:
    """Per-label thresholds (:func:`automl_tl.tasks.tune_thresholds`) tuned on validation
    predictions the model did not train on, as :func:`held_out_temperature` chooses them."""
    y = splits.val.y.numpy()
    if on == "train" and val_log_probs:
        probs = torch.cat(val_log_probs).exp().numpy()
        return tune_thresholds(probs, y).tolist(), "validation (retrained model)"
    stored = unpack(trial.user_attrs.get(trials.VAL_LOG_PROBS))
    if stored is not None and tuple(stored.shape) == tuple(y.shape):
        return tune_thresholds(
            stored.exp().numpy(), y
        ).tolist(), f"validation (trial {trial.number})"
    return None


def task_export(metrics: dict[str, Any], label_separator: str = " ") -> dict[str, Any]:
    """What config.json's ``automl_tl`` table says of the task: the temperature of a
    multiclass model; ``task``, per-label ``thresholds`` and the CSV ``label_separator`` of
    a multi-label one."""
    if metrics.get("task") == "multilabel":
        return {
            "task": "multilabel",
            "thresholds": (metrics.get("thresholds") or {}).get("values"),
            "label_separator": label_separator,
        }
    return {"temperature": metrics["calibration"]["temperature"]}


def score_predictions(
    log_probs: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    temperature: tuple[float, str] | None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """``test_interval`` (95 %) and ``calibration`` of test predictions, for metrics.json."""
    pred = log_probs.argmax(1)
    t, fitted_on = temperature if temperature is not None else (1.0, None)
    before = reliability(log_probs, y)
    after = reliability(calibrated(log_probs, t), y)
    return {
        "test_interval": metric_intervals(y, pred, num_classes, seed=seed),
        "test_images": len(y),
        "calibration": {
            "temperature": round(float(t), 4),
            "fitted_on": fitted_on,
            "ece_before": before["ece"],
            "ece_after": after["ece"],
            "bins_before": before["bins"],
            "bins_after": after["bins"],
        },
    }


def best_dir_for(config: StudyConfig, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> Path:
    """``best/``, unless it holds a trial that scores better than ``trial`` (in the study's
    direction; then the trial's own ``models/trial-N/``)."""
    paths = config.paths
    try:
        held = json.loads((paths.best / "metrics.json").read_text()).get("trial")
    except (OSError, ValueError):
        return paths.best
    if held is None or held == trial.number:
        return paths.best
    other = next((t for t in study.get_trials(deepcopy=False) if t.number == held), None)
    if other is not None and Direction.of(study).better(
        trials.value_of(other), trials.value_of(trial)
    ):
        log.warning(
            "best/ holds trial %d (val %.4f), better than trial %d (val %.4f): writing trial %d "
            "to %s instead",
            held,
            trials.value_of(other),
            trial.number,
            trials.value_of(trial),
            trial.number,
            paths.model(trial.number),
        )
        return paths.model(trial.number)
    return paths.best


# ---------------------------------------------------------------------------------------------
# the retrain claim


def _claim_name(study_name: str, trial_number: int) -> str:
    return f"{study_name}:retrain:trial-{trial_number}"


def _stale(
    attrs: dict[str, Any], model_dir: Path | None, trial_number: int, expiry_s: float | None = None
) -> str | None:
    """Why a claim must be taken again (its holder never recorded itself, died before
    finishing or, on another node, outlived ``expiry_s``; or it finished but the model is
    missing), or None while it holds."""
    holder = attrs.get("claimed_by")
    if not holder:
        return "its holder never recorded itself"
    if attrs.get("done"):
        if model_dir is None or _holds(model_dir, trial_number):
            return None
        return f"its model {model_dir} is missing"
    return holder_gone(holder, expiry_s)


def _holds(directory: Path, trial_number: int) -> bool:
    try:
        metrics = json.loads((directory / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return metrics.get("trial") == trial_number and (directory / "model.safetensors").is_file()


def claim_retrain(
    study: optuna.Study, trial_number: int, model_dir: Path | None = None
) -> tuple[bool, dict[str, Any]]:
    """Claim the retrain of ``trial_number``: True for exactly one caller across all workers.

    The claim is the marker study ``<study>:retrain:trial-<n>``
    (:func:`automl_tl.budget.claim_marker`). A claim whose holder died before finishing (this
    host can tell; one on another host is assumed alive), or that finished without its model
    in ``model_dir``, is taken again. The loser gets the holder's identity (host, pid, time)
    to report.
    """
    claim = claim_marker(
        study,
        _claim_name(study.study_name, trial_number),
        lambda attrs: _stale(attrs, model_dir, trial_number, claim_expiry(study)),
    )
    if claim.taken_over:
        log.warning(
            "the retrain of trial %d was claimed but %s: retraining it",
            trial_number,
            claim.taken_over,
        )
    if claim.won:
        optuna.load_study(
            study_name=_claim_name(study.study_name, trial_number), storage=storage_of(study)
        ).set_user_attr("claim_of", study.study_name)
    return claim.won, claim.holder


def finish_claim(study: optuna.Study, trial_number: int) -> None:
    """Mark the claim of ``trial_number`` done: its model is exported."""
    claim = optuna.load_study(
        study_name=_claim_name(study.study_name, trial_number), storage=storage_of(study)
    )
    claim.set_user_attr("done", True)


def claim_best(config: StudyConfig, study: optuna.Study, number: int, hint: str = "") -> bool:
    """:func:`claim_retrain` of trial ``number`` into ``best/``; when another worker holds
    it, say who (and ``hint``) and return False."""
    won, holder = claim_retrain(study, number, config.paths.best)
    if not won:
        log.info(
            "trial %d is retrained by another worker (%s, %s)%s",
            number,
            describe_worker(holder),
            holder.get("at", "?"),
            hint,
        )
    return won


def retrain_chosen(
    config: StudyConfig,
    registry: Registry,
    selected: dict[str, Any],
    *,
    device: str = "auto",
    study: optuna.Study | None = None,
    splits: Splits | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Retrain what :func:`automl_tl.selection.select` chose (``winner``, ``epochs``,
    ``temperature``) into ``best/``, recording the selection in ``metrics.json``."""
    temperature = selected.get("temperature")
    return retrain(
        config,
        registry,
        trial_number=selected["winner"],
        device=device,
        study=study,
        splits=splits,
        to_best=True,
        epochs=selected.get("epochs"),
        temperature=tuple(temperature) if temperature else None,
        selection=selected,
    )


def retrain_once(
    config: StudyConfig,
    registry: Registry,
    study: optuna.Study,
    splits: Splits,
    *,
    device: str,
    selected: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """Retrain the best trial unless another worker holds the claim; (dir, metrics) or None.

    ``selected``: what :func:`automl_tl.selection.select` chose (``winner``, ``epochs``,
    ``temperature``): that trial goes to ``best/`` instead of the search's argmax.
    """
    if selected is not None:
        number = selected["winner"]
        if not claim_best(config, study, number):
            return None
        directory, metrics = retrain_chosen(
            config, registry, selected, device=device, study=study, splits=splits
        )
        finish_claim(study, number)
        return directory, metrics
    best = trials.best_trial(study)
    if not claim_best(config, study, best.number, "; `automl-tl retrain` retrains it again"):
        return None
    directory, metrics = retrain(config, registry, device=device, study=study, splits=splits)
    finish_claim(study, best.number)
    return directory, metrics


def retrain_per_weights(
    config: StudyConfig,
    registry: Registry,
    study: optuna.Study,
    splits: Splits,
    *,
    device: str = "auto",
    skip: Collection[int] = (),
) -> list[dict[str, Any]] | None:
    """Retrain the best trial of every weight source not yet retrained (but those in
    ``skip``: their retrain failed elsewhere); return
    :func:`automl_tl.leaderboard.comparison`."""
    if not config.searches_weights():
        return None
    for label, t in best_by_weights(config, study).items():
        if retrained_model(config, t.number) is None and t.number not in skip:
            log.info("retraining the best %r trial (#%d) for the comparison", label, t.number)
            retrain(
                config, registry, trial_number=t.number, device=device, study=study, splits=splits
            )
    return comparison(config, study)
