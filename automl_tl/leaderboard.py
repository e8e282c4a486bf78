"""What a finished or running study says, as plain data: the leaderboard of every trial, the
best trial, a note when the validation split is too small to rank by, training throughput per
backbone, and the transferred-vs-scratch comparison when the weight source is searched.

``automl-tl report`` prints it (the command line owns the text); ``report.py`` draws it.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import trials
from .catalog import Catalog, catalog_path
from .config import StudyConfig
from .scores import difference_in_noise, standard_error
from .space import effective_params
from .storage import open_study
from .trials import MAXIMIZE, Direction


def describe_params(params: dict[str, Any]) -> str:
    """A trial's configuration in one line: ``backbone[weights] policy(strength) strategy(depth) lr``
    (a random-init trial's ``unfreeze_scratch`` at depth 1.0, ``lr_finetune`` as lr)."""
    params = effective_params(params)
    aug = params.get("augmentation", "?")
    if "aug_strength" in params:
        aug += f"({params['aug_strength']:.2f})"
    backbone = params.get("backbone", "?")
    if "weights" in params:  # a searched weight source
        backbone += f"[{params['weights']}]"
    return (
        f"{backbone} {aug} {params.get('unfreeze', '?')}"
        f"(depth {params.get('unfreeze_depth', 0):.2f}) lr={params.get('lr', 0):.1e}"
    )


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards the budget (COMPLETE or PRUNED)."""
    return len(study.get_trials(deepcopy=False, states=trials.FINISHED))


def best_summary(study: optuna.Study) -> dict[str, Any] | None:
    """``{"number", "value", "params"}`` of the best complete trial, or None."""
    try:
        t = trials.best_trial(study)
    except ValueError:
        return None
    return {"number": t.number, "value": trials.value_of(t), "params": dict(t.params)}


def pareto_front(study: optuna.Study) -> list[int] | None:
    """The numbers of a multi-objective study's Pareto-optimal trials (feasible ones, when
    it has constraints), or None for a single-objective study."""
    if len(study.directions) == 1:
        return None
    return sorted(t.number for t in study.best_trials)


def selection_note(study: optuna.Study) -> str | None:
    """A warning when the validation split is too small to tell the best trials apart.

    Validation scores are fractions of ``n`` images, so one standard error of the best score
    ``p`` is about ``sqrt(p (1 - p) / n)`` (binomial; at least one image; a metric with
    another range is scaled to [0, 1] first). When three or more complete trials lie within it
    of the best, picking "the best" among them is mostly chance, and its test score will say
    so; the user should know before trusting the ranking.
    """
    n = ((study.user_attrs.get("data") or {}).get("sizes") or {}).get("val")
    direction = Direction.of(study)
    values = sorted(
        (
            v
            for v in map(
                trials.value_of, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            )
            if v is not None
        ),
        key=direction.key,
    )
    if not n or len(values) < 3:
        return None
    best = values[0]
    error = standard_error(best, n, direction.range)
    close = sum(direction.within(v, best, error) for v in values)
    if close < 3:
        return None
    return (
        f"{close} trials score within one standard error (±{error:.3f}) of the best on only {n} "
        "validation images, so which of them is best is mostly chance; more validation images "
        "([data] val_fraction, or more labelled data) make the choice reliable"
    )


def backbone_throughput(study: optuna.Study, device: str | None = None) -> dict[str, float]:
    """Median training images/s per backbone over finished trials (on ``device`` if given).

    Trials whose head trained on cached features are left out: their speed is not the
    backbone's.
    """
    rates: dict[str, list[float]] = {}
    for t in study.get_trials(deepcopy=False, states=trials.FINISHED):
        rate, backbone = t.user_attrs.get(trials.IMAGES_PER_S), t.params.get("backbone")
        if not rate or backbone is None or t.user_attrs.get(trials.FEATURE_CACHE):
            continue
        if device is not None and t.user_attrs.get(trials.DEVICE) != device:
            continue
        rates.setdefault(backbone, []).append(float(rate))
    return {b: round(statistics.median(r), 1) for b, r in sorted(rates.items())}


# ---------------------------------------------------------------------------------------------
# weight sources compared


def weights_label(config: StudyConfig, params: dict[str, Any]) -> str:
    """A trial's weight source as written in ``[weights]`` (searched or fixed)."""
    if "weights" in params:
        return str(params["weights"])
    value = config.weights_entry(params.get("backbone", ""))
    return value if isinstance(value, str) else "?"


def best_by_weights(config: StudyConfig, study: optuna.Study) -> dict[str, FrozenTrial]:
    """The best complete trial of each weight source (only sources with a complete trial)."""
    best: dict[str, FrozenTrial] = {}
    direction = Direction.of(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        label = weights_label(config, t.params)
        if label not in best or direction.better(trials.value_of(t), trials.value_of(best[label])):
            best[label] = t
    return best


def retrained_model(config: StudyConfig, trial_number: int) -> Path | None:
    """Where the retrained model of ``trial_number`` is (``best/`` or ``models/trial-N``), if
    it has been retrained: its ``metrics.json`` names that trial."""
    for folder in (config.paths.best, config.paths.model(trial_number)):
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        if metrics.get("trial") == trial_number:
            return folder
    return None


def comparison(config: StudyConfig, study: optuna.Study) -> list[dict[str, Any]] | None:
    """Per weight source: its best trial, val score and the retrained model's test metrics.

    None unless the study searched the weight source. Rows are sorted by test score (then val)
    so the first row is the source that paid most.
    """
    if not config.searches_weights():
        return None
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rows = []
    for label, t in best_by_weights(config, study).items():
        folder = retrained_model(config, t.number)
        test = interval = images = None
        if folder is not None:
            metrics = json.loads((folder / "metrics.json").read_text())
            test = _scalars(metrics.get("test", {}))
            interval, images = metrics.get("test_interval"), metrics.get("test_images")
        rows.append(
            {
                "weights": label,
                "scratch": label == "none",
                "trial": t.number,
                "backbone": t.params.get("backbone"),
                "val": trials.value_of(t),
                "trials": sum(1 for x in complete if weights_label(config, x.params) == label),
                "test": test,
                "test_interval": interval,  # 95 %
                "test_images": images,
                "path": str(folder) if folder else None,
            }
        )
    metric, direction = config.search.metric, Direction.of(study)
    rows.sort(key=lambda r: (direction.key((r["test"] or {}).get(metric)), direction.key(r["val"])))
    return rows


def transfer_difference(
    rows: list[dict[str, Any]], metric: str, direction: Direction = MAXIMIZE
) -> dict[str, Any] | None:
    """Best transferred minus best scratch test score, when both were retrained, whether
    transfer ``pays`` (the difference is better in ``direction``), the half-width of its 95 %
    interval (binomial, normal approximation, on the test split's size) and whether the
    difference lies inside it (``inside_noise``)."""
    scratch = [r for r in rows if r["scratch"] and r["test"]]
    transferred = [r for r in rows if not r["scratch"] and r["test"]]
    if not (scratch and transferred):
        return None
    a, b = transferred[0], scratch[0]
    out = {
        "weights": a["weights"],
        "difference": a["test"][metric] - b["test"][metric],
        "pays": direction.better(a["test"][metric], b["test"][metric]),
    }
    if a.get("test_images") and b.get("test_images"):
        half, inside = difference_in_noise(
            a["test"][metric],
            a["test_images"],
            b["test"][metric],
            b["test_images"],
            direction.range,
        )
        out.update(noise=round(half, 4), inside_noise=inside)
    return out


# ---------------------------------------------------------------------------------------------
# the leaderboard


def leaderboard(config: StudyConfig, study: optuna.Study | None = None) -> dict[str, Any]:
    """Every trial of the study and what is known about the outcome, as plain data
    (``automl-tl report --format json``)."""
    study = study or open_study(config)
    rows = []
    for t in study.get_trials(deepcopy=False):
        s = trials.TrialSummary.of(t)
        rows.append(
            {
                "number": s.number,
                "state": s.state,
                "value": s.value,
                "params": s.params,
                # the source each trial trained from, fixed or searched (a file: its sha256)
                "weights": s.weights or weights_label(config, s.params),
                "duration_s": s.duration_s,
                "epochs_run": s.epochs_run,
                "fail_reason": s.fail_reason,
                "images_per_s": s.images_per_s,
                "batch_size": s.batch_size,
                "best_epoch": t.user_attrs.get(trials.BEST_EPOCH),  # 1-based
                "prior": s.prior,  # where the team prior took it from, if it did
                # multi-objective: latency_ms / params_m / model_mb, and the constraints held
                "measured": t.user_attrs.get(trials.MEASURED),
                "feasible": trials.feasible(t) if trials.CONSTRAINTS in t.user_attrs else None,
            }
        )
    out: dict[str, Any] = {
        "study": config.name,
        "metric": config.search.metric,
        "direction": Direction.of(study).name,  # "minimize": a lower-is-better plugin metric
        "best": best_summary(study),
        "objectives": config.search.objectives or [config.search.metric],
        "pareto": pareto_front(study),  # trial numbers; None for one objective
        "trials": rows,
        "throughput": backbone_throughput(study),  # training images/s per backbone
        "selection_note": selection_note(study),  # a validation split too small to rank by
        # trials the dead-trial guard pruned at chance (samplers.DeadTrialGuard)
        "dead_at_chance": sum(
            trials.DEAD_AT_CHANCE in t.user_attrs for t in study.get_trials(deepcopy=False)
        ),
    }
    paths = config.paths
    catalog = catalog_path(config)
    if catalog.is_file():
        out["skipped_images"] = Catalog(catalog).skipped(config.name)
    metrics_path = paths.best / "metrics.json"
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        out["best_model"] = {
            "path": str(metrics_path.parent),
            "trial": m.get("trial"),
            "test": _scalars(m.get("test", {})),
            "test_interval": m.get("test_interval"),  # 95 %: Wilson / bootstrap
            "test_images": m.get("test_images"),
            "calibration": m.get("calibration"),
            "task": m.get("task", "multiclass"),
            "thresholds": m.get("thresholds"),  # a multi-label model's, tuned on validation
        }
    with contextlib.suppress(OSError, ValueError):  # the race; single vs ensemble vs soup
        out["selection"] = json.loads(paths.selection.read_text())
    rows = comparison(config, study)  # transferred vs scratch, when [weights] is searched
    if rows is not None:
        out["weights"] = rows
    return out


def _scalars(test: dict[str, Any]) -> dict[str, Any]:
    """A model's test metrics without the confusion matrix or per-label lists."""
    return {k: v for k, v in test.items() if not isinstance(v, (list, dict))}
