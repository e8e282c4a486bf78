"""Selection you can trust: after the search's budget, the configurations that cannot be told
apart from the best are raced again before one is retrained; ensembles and soups of them are
built and scored; scores are calibrated.

- :func:`finalists` — complete trials within one binomial standard error of the best on the
  validation split (as :func:`automl_tl.leaderboard.selection_note` computes it), at most
  ``[selection] finalists``.
- :func:`plan_runs` — each finalist again with ``[selection] repeats`` other seeds on the
  study's split, or on k folds of train+val (``[selection] folds``; by default when the
  validation split has fewer than 10 images per class), trimmed to ``[selection] budget``
  extra runs (trial-equivalents).
- :func:`race` — runs them. Each run is claimed atomically (a marker study
  ``<study>:race:<key>`` in the study's storage, as the retrain claim does) so several
  workers and nodes share the work; a finished run is a COMPLETE trial of the study
  ``<study>:race`` (its user attributes say which finalist, repeat and fold) and a row of
  the catalog's ``races`` table, so an interrupted race resumes with the runs not done.
- :func:`select` — the above, then the winner by ``[selection] rule`` (``mean`` or ``lcb``,
  the mean minus one standard error), the retrain's epoch count (the finalists' median best
  epoch with ``[search] patience``), and the temperature fitted on the winner's held-out
  predictions.
- :func:`build_extras` — after the winner is retrained into ``best/``: the ensemble of
  finalists (``[selection] ensemble_rule``: all at equal weight, or Caruana et al.'s 2004
  greedy selection) into ``ensemble/`` and the greedy soup
  (Wortsman et al., 2022) of finalists sharing backbone and weights into ``soup/``, each
  scored on test beside the single best with its inference cost, in ``selection.json``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from . import trials
from ._util import write_atomic
from .budget import claim_expiry, claim_marker, holder_gone, worker_identity
from .catalog import Catalog, catalog_path
from .config import StudyConfig, metric_direction, parse_pick
from .data import Split, Splits, splits_at
from .errors import UserError
from .export import (
    Averaged,
    LoadedModel,
    check_single_label,
    export_ensemble,
    export_model,
    load_model,
)
from .leaderboard import weights_label
from .registry import Registry
from .retrain import retrain, retrain_once, score_predictions
from .scores import (
    average_state_dicts,
    caruana_selection,
    fit_temperature,
    metrics_from_predictions,
    pack,
    standard_error,
    unpack,
)
from .space import choice_from_params
from .storage import storage_of
from .train import evaluate, fit, plugin_metrics, resolve_device
from .trials import Direction

log = logging.getLogger("automl_tl")

#: below this many validation images per class, racing uses k-fold cross-validation
FOLDS_BELOW_PER_CLASS = 10
#: the most folds chosen automatically
MAX_AUTO_FOLDS = 5
SELECTION_FILE = "selection.json"


# ---------------------------------------------------------------------------------------------
# finalists


@dataclass
class Finalists:
    numbers: list[int]
    best: float | None
    standard_error: float
    val_images: int
    #: within one standard error of the best, before the ``[selection] finalists`` cap
    within: int
    note: str | None = None


def finalists(study: optuna.Study, limit: int, val_images: int | None = None) -> Finalists:
    """The complete trials within one standard error of the best (binomial, on the
    validation split's size), best first (in the study's direction), at most ``limit``."""
    if val_images is None:
        val_images = ((study.user_attrs.get("data") or {}).get("sizes") or {}).get("val") or 0
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if trials.value_of(t) is not None
    ]
    direction = Direction.of(study)
    complete.sort(key=lambda t: (direction.key(trials.value_of(t)), t.number))
    if not complete:
        return Finalists([], None, 0.0, val_images, 0, "no complete trial")
    best = trials.value_of(complete[0])
    se = standard_error(best, val_images, direction.range)
    within = [t.number for t in complete if direction.within(trials.value_of(t), best, se)]
    note = None
    if len(within) > limit:
        note = (
            f"{len(within)} trials are within one standard error (±{se:.3f}) of the best; "
            f"racing the top {limit} ([selection] finalists)"
        )
    return Finalists(within[:limit], best, se, val_images, len(within), note)


# ---------------------------------------------------------------------------------------------
# folds and the plan


def smallest_class(splits: Splits) -> int:
    """Images of the smallest class in train+val."""
    counts = torch.bincount(
        torch.cat([splits.train.y, splits.val.y]), minlength=len(splits.class_names)
    )
    return int(counts.min())


def folds_for(config: StudyConfig, splits: Splits) -> int:
    """The number of folds racing uses (0: none, the study's own split). A folds count
    larger than the smallest class in train+val is refused with a clear message."""
    asked = config.selection.folds
    if not splits.task.supports_folds:  # a multi-label study races on its own split
        if asked > 0:
            raise UserError(
                f"[selection] folds = {asked}: k-fold racing stratifies by one class per image, "
                "which a multi-label study does not have; use 0 or -1 (it races repeats on "
                "the study's split)"
            )
        return 0
    smallest = smallest_class(splits)
    if asked > 0:
        if asked < 2:
            raise UserError(
                "[selection] folds = 1 is not cross-validation; use 0 (off), -1 (automatic) or 2 or more"
            )
        if asked > smallest:
            raise UserError(
                f"[selection] folds = {asked} is more than the {smallest} images of the smallest "
                f"class in train+val, so some fold would miss that class; set [selection] folds "
                f"to at most {smallest}, 0 (off) or -1 (automatic)"
            )
        return asked
    if asked == 0:
        return 0
    per_class = torch.bincount(splits.val.y, minlength=len(splits.class_names))
    if int(per_class.min()) >= FOLDS_BELOW_PER_CLASS:
        return 0
    k = min(MAX_AUTO_FOLDS, smallest)
    return k if k >= 2 else 0


def check_selection(config: StudyConfig, splits: Splits) -> None:
    """Bad ``[selection]`` input that needs the data, before anything trains."""
    if config.selection.race:
        folds_for(config, splits)


@dataclass(frozen=True)
class Run:
    """One extra training run of the race."""

    finalist: int  # trial number
    repeat: int
    fold: int  # -1: the study's own split
    folds: int  # 0: the study's own split

    @property
    def key(self) -> str:
        where = f"f{self.fold}of{self.folds}" if self.folds else "split"
        return f"trial-{self.finalist}:r{self.repeat}:{where}"

    def seed(self, base: int) -> int:
        return base + 1000 * (self.repeat + 1) + 100 * max(self.fold, 0) + self.finalist


@dataclass
class Plan:
    finalists: list[int]
    runs: list[Run]
    folds: int
    repeats: int
    budget: int
    notes: list[str] = field(default_factory=list)


def plan_runs(config: StudyConfig, numbers: list[int], folds: int) -> Plan:
    """Every finalist ``repeats`` times on each fold (or on the study's split), trimmed to
    ``[selection] budget`` runs: finalists are dropped from the last (down to two), then
    runs per finalist are cut."""
    sel = config.selection
    budget = sel.race_budget(config.search.n_trials)
    per = sel.repeats * (folds or 1)
    notes = []
    kept = list(numbers)
    while len(kept) > 2 and len(kept) * per > budget:
        kept.pop()
    if len(kept) < len(numbers):
        notes.append(
            f"racing {len(kept)} of {len(numbers)} finalists: {len(numbers)} x {per} runs would "
            f"exceed [selection] budget = {budget}"
        )
    runs = [
        Run(n, r, f if folds else -1, folds)
        for n in kept
        for r in range(sel.repeats)
        for f in range(folds or 1)
    ]
    if len(runs) > budget:
        keep_per = max(1, budget // max(1, len(kept)))
        notes.append(
            f"{keep_per} of {per} runs per finalist to stay within [selection] budget = {budget}"
        )
        runs = [r for n in kept for r in [x for x in runs if x.finalist == n][:keep_per]]
    return Plan(kept, runs, folds, sel.repeats, budget, notes)


def race_size(config: StudyConfig, splits: Splits) -> tuple[int, int]:
    """(runs, training images per run) of the largest race this study can run after its
    search: ``[selection] finalists`` finalists planned as :func:`plan_runs` plans them
    (within ``[selection] budget``); (0, 0) when it does not race."""
    sel = config.selection
    if not sel.race or config.search.multi_objective or sel.finalists < 2:
        return 0, 0
    folds = folds_for(config, splits)
    runs = len(plan_runs(config, list(range(sel.finalists)), folds).runs)
    pool = len(splits.train) + len(splits.val)
    return runs, (pool - pool // folds if folds else len(splits.train))


def fold_indices(splits: Splits, repeat: int, folds: int, seed: int) -> list[torch.Tensor]:
    """Stratified k folds of train+val (indices into ``splits.part("train+val")``), a
    different assignment for each repeat, the same on every worker."""
    y = torch.cat([splits.train.y, splits.val.y])
    generator = torch.Generator().manual_seed(seed * 7919 + repeat)
    parts: list[list[torch.Tensor]] = [[] for _ in range(folds)]
    for c in range(len(splits.class_names)):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        for f in range(folds):
            parts[f].append(idx[f::folds])
    return [torch.sort(torch.cat(p)).values for p in parts]


def _take(split: Split, index: torch.Tensor) -> Split:
    names = [split.names[i] for i in index.tolist()] if split.names else []
    return Split(split.x[index], split.y[index], names)


def run_splits(splits: Splits, run: Run, seed: int) -> tuple[Splits, torch.Tensor]:
    """The data of one run and the indices (into train+val) of the images it is scored on."""
    if not run.folds:
        offset = len(splits.train)
        return splits, torch.arange(offset, offset + len(splits.val))
    pool = splits.part("train+val")
    parts = fold_indices(splits, run.repeat, run.folds, seed)
    held = parts[run.fold]
    rest = torch.sort(torch.cat([p for i, p in enumerate(parts) if i != run.fold])).values
    data = Splits(
        class_names=splits.class_names,
        train=_take(pool, rest),
        val=_take(pool, held),
        test=splits.test,
        image_size=splits.image_size,
        fingerprint=splits.fingerprint,
        # the feature cache keys on it: each fold is other data
        split_hash=f"{splits.split_hash}:race:r{run.repeat}:f{run.fold}of{run.folds}",
        class_hashes=splits.class_hashes,
    )
    return data, held


# ---------------------------------------------------------------------------------------------
# claims and records


def race_study_name(study_name: str) -> str:
    return f"{study_name}:race"


def open_race_study(study: optuna.Study) -> optuna.Study:
    """The study holding the race's runs as COMPLETE trials (created on first use, in the
    study's direction)."""
    return optuna.create_study(
        study_name=race_study_name(study.study_name),
        storage=storage_of(study),
        direction=Direction.of(study).name,
        load_if_exists=True,
    )


def _mine(holder: dict[str, Any]) -> bool:
    me = worker_identity()
    return all(holder.get(k) == me.get(k) for k in ("host", "pid", "started", "boot"))


def _stale_run(attrs: dict[str, Any], expiry_s: float | None = None) -> str | None:
    """Why a race run's claim may be taken again, or None while its holder works on it."""
    holder = attrs.get("claimed_by")
    if not holder:
        return "its holder never recorded itself"
    if attrs.get("released"):
        return "its holder was interrupted"
    if _mine(holder):
        return "an earlier, interrupted call of this process held it"
    return holder_gone(holder, expiry_s)


def claim(study: optuna.Study, name: str, expiry_s: float | None = None) -> bool:
    """True for exactly one caller across workers (:func:`automl_tl.budget.claim_marker`);
    taken again when its holder released it (interrupted), died, is this very process (an
    earlier, interrupted call) or, on another node, has held it longer than ``expiry_s``."""
    return claim_marker(study, name, lambda attrs: _stale_run(attrs, expiry_s)).won


def release(study: optuna.Study, name: str) -> None:
    """Give a claim up (an interrupt): the next caller takes it at once."""
    try:
        optuna.load_study(study_name=name, storage=storage_of(study)).set_user_attr(
            "released", True
        )
    except Exception:  # the storage itself is gone: the claim's holder will be seen dead
        log.debug("could not release %s", name, exc_info=True)


def done_runs(race_study: optuna.Study) -> dict[str, FrozenTrial]:
    """Finished race runs by key."""
    out = {}
    for t in race_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = t.user_attrs.get("key")
        if key and key not in out:
            out[key] = t
    return out


# ---------------------------------------------------------------------------------------------
# the race


def run_one(
    config: StudyConfig,
    registry: Registry,
    study: optuna.Study,
    race_study: optuna.Study,
    splits: Splits,
    run: Run,
    *,
    device: Any,
    catalog: Catalog | None = None,
) -> FrozenTrial:
    """Train one run and record it (race study + catalog)."""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == run.finalist)
    choice = choice_from_params(trial.params, config)
    splits = splits_at(config, registry, splits, choice.image_size)  # a searched size
    data, held = run_splits(splits, run, config.data.seed)
    metric = config.search.metric
    started = datetime.datetime.now()
    t0 = time.perf_counter()
    result = fit(
        choice,
        data,
        registry,
        device=device,
        seed=run.seed(config.data.seed),
        patience=config.search.patience,
        metric=metric,
        keep_predictions=True,
    )
    val = result.best_val if config.search.patience else result.val
    score = float(val[metric])
    attrs = {
        "key": run.key,
        "finalist": run.finalist,
        "repeat": run.repeat,
        "fold": run.fold,
        "folds": run.folds,
        "seed": run.seed(config.data.seed),
        "images": len(held),
        "best_epoch": (result.best_epoch or 0) + 1,
        "seconds": round(time.perf_counter() - t0, 3),
        "worker": worker_identity(),
        trials.VAL_METRICS: {k: v for k, v in val.items() if k != "confusion_matrix"},
    }
    if result.val_log_probs is not None:
        attrs[trials.VAL_LOG_PROBS] = pack(result.val_log_probs)
    frozen = optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=score, params={}, distributions={}, user_attrs=attrs
    )
    frozen.datetime_start = started
    race_study.add_trial(frozen)
    (catalog or Catalog(catalog_path(config))).record_race(
        config.name,
        {
            "key": run.key,
            "finalist": run.finalist,
            "repeat": run.repeat,
            "fold": run.fold,
            "folds": run.folds,
            "seed": attrs["seed"],
            "value": score,
            "images": len(held),
            "best_epoch": attrs["best_epoch"],
            "seconds": attrs["seconds"],
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        },
    )
    log.info(
        "race %-24s %s=%.4f  (trial %d's configuration, %d held-out images, %.1fs)",
        run.key,
        metric,
        score,
        run.finalist,
        len(held),
        attrs["seconds"],
    )
    return frozen


def race(
    config: StudyConfig,
    registry: Registry,
    study: optuna.Study,
    splits: Splits,
    plan: Plan,
    *,
    device: Any = "auto",
    poll: float = 1.0,
) -> dict[str, FrozenTrial]:
    """Run every run of ``plan`` not done yet — this worker takes those it can claim and
    waits for those other workers hold — and return all of them by key."""
    device = resolve_device(device)
    race_study = open_race_study(study)
    catalog = Catalog(catalog_path(config))
    expiry = claim_expiry(study)  # a run held by a dead node is taken again after this
    while True:
        done = done_runs(race_study)
        todo = [r for r in plan.runs if r.key not in done]
        if not todo:
            return done
        took = False
        for run in todo:
            if run.key in done_runs(race_study):
                continue
            name = f"{study.study_name}:race:{run.key}"
            if not claim(study, name, expiry):
                continue
            took = True
            try:
                if run.key not in done_runs(race_study):  # done while we were claiming
                    run_one(
                        config,
                        registry,
                        study,
                        race_study,
                        splits,
                        run,
                        device=device,
                        catalog=catalog,
                    )
            except BaseException:
                release(study, name)
                raise
        if not took:
            time.sleep(poll)  # other workers hold the rest


# ---------------------------------------------------------------------------------------------
# choosing


def _pool_labels(splits: Splits) -> torch.Tensor:
    return torch.cat([splits.train.y, splits.val.y])


def held_out_predictions(
    config: StudyConfig,
    splits: Splits,
    trial: FrozenTrial,
    runs: list[FrozenTrial],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(indices into train+val, log-probabilities) of every held-out prediction of one
    finalist: its search trial's on the validation split, and each race run's."""
    out = []
    offset = len(splits.train)
    own = unpack(trial.user_attrs.get(trials.VAL_LOG_PROBS))
    if own is not None and len(own) == len(splits.val):
        out.append((torch.arange(offset, offset + len(splits.val)), own))
    for r in runs:
        lp = unpack(r.user_attrs.get(trials.VAL_LOG_PROBS))
        if lp is None:
            continue
        a = r.user_attrs
        if a.get("folds"):
            held = fold_indices(splits, a["repeat"], a["folds"], config.data.seed)[a["fold"]]
        else:
            held = torch.arange(offset, offset + len(splits.val))
        if len(held) == len(lp):
            out.append((held, lp))
    return out


def mean_probabilities(
    predictions: list[tuple[torch.Tensor, torch.Tensor]], pool_size: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean probabilities per pool image, how many predictions each image has)."""
    total = torch.zeros(pool_size, num_classes, dtype=torch.float64)
    count = torch.zeros(pool_size, dtype=torch.float64)
    for idx, lp in predictions:
        total.index_add_(0, idx, lp.exp().double())
        count.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))
    return total / count.clamp(min=1).unsqueeze(1), count


@dataclass
class Selection:
    """What the selection decided (JSON in ``selection.json`` and ``best/metrics.json``)."""

    winner: int
    argmax: int
    rule: str
    finalists: list[dict[str, Any]]
    standard_error: float
    val_images: int
    folds: int
    repeats: int
    budget: int
    runs: int
    run_seconds: float
    epochs: int | None
    temperature: list[Any] | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median_epochs(values: list[int]) -> int | None:
    values = [int(v) for v in values if v]
    return max(1, int(round(statistics.median(values)))) if values else None


def _temperature(
    config: StudyConfig, splits: Splits, trial: FrozenTrial, runs: list[FrozenTrial]
) -> list[Any] | None:
    """``[T, what it was fitted on]`` from the trial's held-out predictions (its search
    trial's and its race runs'), with ``[selection] calibrate``; else None."""
    if not (config.selection.calibrate and splits.task.supports_calibration):
        return None
    preds = held_out_predictions(config, splits, trial, runs)
    if not preds:
        return None
    labels = _pool_labels(splits)
    lp = torch.cat([p for _, p in preds])
    y = torch.cat([labels[i] for i, _ in preds])
    return [
        round(fit_temperature(lp, y), 4),
        f"held-out predictions of trial {trial.number} ({len(y)})",
    ]


def pick_trial(study: optuna.Study, config: StudyConfig) -> tuple[FrozenTrial, str]:
    """The trial ``[selection] pick`` ships from a multi-objective study, and why: "best" is
    the feasible trial with the best metric; "fastest within 1 point" the lowest
    ``latency_ms`` among feasible trials whose metric is within 1 point (a hundredth of the
    metric's range) of that best ("smallest": ``params_m``, "lightest": ``model_mb``)."""
    best = trials.best_trial(study)
    rule = parse_pick(config.selection.pick)
    metric = config.search.metric
    if rule is None:
        return best, f"the best {metric} among the feasible trials"
    measure, points = rule
    direction = Direction.of(study)
    margin = points * (direction.range[1] - direction.range[0]) / 100

    def measured(t: FrozenTrial) -> float:
        return float((t.user_attrs.get(trials.MEASURED) or {}).get(measure, math.inf))

    top = trials.value_of(best)
    candidates = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if trials.value_of(t) is not None
        and trials.feasible(t)
        and direction.within(trials.value_of(t), top, margin)
    ]
    chosen = min(
        candidates, key=lambda t: (measured(t), direction.key(trials.value_of(t)), t.number)
    )
    return chosen, (
        f'[selection] pick = "{config.selection.pick}": trial {chosen.number} ({measure} '
        f"{measured(chosen):.4g}, {metric} {trials.value_of(chosen):.4f}) against the best "
        f"trial {best.number} ({measure} {measured(best):.4g}, {metric} {top:.4f})"
    )


def _picked(
    config: StudyConfig, study: optuna.Study, splits: Splits, argmax: FrozenTrial
) -> Selection:
    """The :class:`Selection` of a multi-objective study: the picked trial, not raced."""
    chosen, why = pick_trial(study, config)
    temperature = _temperature(config, splits, chosen, [])
    value = float(trials.value_of(chosen))
    row = {
        "trial": chosen.number,
        "value": value,
        "scores": [round(value, 4)],
        "mean": round(value, 4),
        "lcb": round(value, 4),
        "standard_error": 0.0,
        "best_epochs": [e for e in [chosen.user_attrs.get(trials.BEST_EPOCH)] if e],
        "params": dict(chosen.params),
        "run_seconds": 0.0,
        "measured": chosen.user_attrs.get(trials.MEASURED),
    }
    epochs = _median_epochs(row["best_epochs"]) if config.search.patience else None
    return Selection(
        winner=chosen.number,
        argmax=argmax.number,
        rule=f"pick: {config.selection.pick}",
        finalists=[row],
        standard_error=0.0,
        val_images=len(splits.val),
        folds=0,
        repeats=0,
        budget=0,
        runs=0,
        run_seconds=0.0,
        epochs=epochs,
        temperature=temperature,
        notes=[why, "a multi-objective study is not raced: the race ranks by the metric alone"],
    )


def race_winner(rows: list[dict[str, Any]], rule: str, direction: Direction) -> dict[str, Any]:
    """The finalist row with the best ``rule`` value (``mean``, or ``lcb``: the mean one
    standard error towards worse) in the study's direction; ties go to the better search
    score, then the earlier trial."""
    key = "lcb" if rule == "lcb" else "mean"
    return min(rows, key=lambda r: (direction.key(r[key]), direction.key(r["value"]), r["trial"]))


def select(
    config: StudyConfig,
    registry: Registry,
    study: optuna.Study,
    splits: Splits,
    *,
    device: Any = "auto",
) -> Selection | None:
    """Race the finalists and choose; None when the study has no complete trial.

    With ``[selection] race = false`` or a single finalist the argmax is kept (still with
    the epoch count and temperature). A multi-objective study is not raced: ``[selection]
    pick`` chooses a point of it (:func:`pick_trial`)."""
    sel = config.selection
    try:
        argmax = trials.best_trial(study)
    except ValueError:
        return None
    if config.search.multi_objective:
        return _picked(config, study, splits, argmax)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    direction = Direction.of(study)
    found = finalists(study, sel.finalists, len(splits.val))
    notes = [found.note] if found.note else []
    folds = folds_for(config, splits)
    numbers = found.numbers if sel.race else [argmax.number]
    if sel.race and len(numbers) < 2:
        notes.append(
            "only the best trial is within one standard error of the best: nothing to race"
        )
    done: dict[str, FrozenTrial] = {}
    plan = Plan(numbers, [], folds, sel.repeats, sel.race_budget(config.search.n_trials))
    if sel.race and len(numbers) >= 2:
        plan = plan_runs(config, numbers, folds)
        notes += plan.notes
        log.info(
            "racing %d finalists (trials %s, within ±%.3f of the best on %d validation images): "
            "%d extra runs (%s, %d repeat(s)) of [selection] budget %d",
            len(plan.finalists),
            ", ".join(map(str, plan.finalists)),
            found.standard_error,
            found.val_images,
            len(plan.runs),
            f"{folds} folds of train+val" if folds else "the study's split",
            sel.repeats,
            sel.race_budget(config.search.n_trials),
        )
        done = race(config, registry, study, splits, plan, device=device)
    numbers = plan.finalists
    rows = []
    for n in numbers:
        t = by_number[n]
        runs = [
            r
            for r in done.values()
            if r.user_attrs.get("finalist") == n
            and r.user_attrs.get("key") in {x.key for x in plan.runs}
        ]
        scores = [float(r.value) for r in runs]
        if not folds or not runs:  # the search's own score is a sample of the same split
            scores = [float(trials.value_of(t)), *scores]
        mean = statistics.fmean(scores)
        if len(scores) > 1:
            se = statistics.stdev(scores) / math.sqrt(len(scores))
        else:
            se = standard_error(mean, len(splits.val), direction.range)
        epochs = [t.user_attrs.get(trials.BEST_EPOCH)] + [
            r.user_attrs.get("best_epoch") for r in runs
        ]
        rows.append(
            {
                "trial": n,
                "value": float(trials.value_of(t)),
                "scores": [round(s, 4) for s in scores],
                "mean": round(mean, 4),
                # the pessimistic bound: mean - se (+ se for a lower-is-better metric)
                "lcb": round(direction.pessimistic(mean, se), 4),
                "standard_error": round(se, 4),
                "best_epochs": [e for e in epochs if e],
                "params": dict(t.params),
                "run_seconds": round(sum(float(r.user_attrs.get("seconds") or 0) for r in runs), 3),
            }
        )
    key = "lcb" if sel.rule == "lcb" else "mean"
    best_row = race_winner(rows, sel.rule, direction)
    winner = best_row["trial"]
    epochs = None
    if config.search.patience:
        epochs = _median_epochs([e for r in rows for e in r["best_epochs"]])
        if epochs is not None:
            notes.append(
                f"retraining for {epochs} epochs: the median best epoch of the finalists' runs"
            )
    temperature = _temperature(
        config,
        splits,
        by_number[winner],
        [r for r in done.values() if r.user_attrs.get("finalist") == winner],
    )
    if winner != argmax.number:
        notes.append(
            f"the race chose trial {winner} ({sel.rule} {best_row[key]:.4f}) over the search's "
            f"best trial {argmax.number}"
        )
    return Selection(
        winner=winner,
        argmax=argmax.number,
        rule=sel.rule,
        finalists=rows,
        standard_error=round(found.standard_error, 4),
        val_images=found.val_images,
        folds=folds,
        repeats=sel.repeats,
        budget=sel.race_budget(config.search.n_trials),
        runs=len(plan.runs),
        run_seconds=round(sum(r["run_seconds"] for r in rows), 3),
        epochs=epochs,
        temperature=temperature,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# ensembles and soups


def _retrained(config: StudyConfig, trial_number: int, selection: Selection) -> Path | None:
    """The retrained model of a finalist: best/ for the winner, else models/trial-N."""
    for folder in (config.paths.best, config.paths.model(trial_number)):
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        if metrics.get("trial") == trial_number and (folder / "model.safetensors").is_file():
            return folder
    return None


def _member(
    config: StudyConfig,
    registry: Registry,
    study: optuna.Study,
    splits: Splits,
    number: int,
    selection: Selection,
    device: str,
) -> Path:
    folder = _retrained(config, number, selection)
    if folder is None:
        log.info("retraining finalist trial %d for the ensemble / soup", number)
        folder, _ = retrain(
            config,
            registry,
            trial_number=number,
            device=device,
            study=study,
            splits=splits,
            epochs=selection.epochs,
        )
    return folder


#: image size -> the study's splits decoded at that size (the same images in the same order)
SizedSplits = Callable[[int], Splits]


def sized_splits(config: StudyConfig, registry: Registry, splits: Splits) -> SizedSplits:
    """The study's splits at any of its image sizes (:func:`automl_tl.data.splits_at`)."""
    return lambda size: splits_at(config, registry, splits, size)


@torch.inference_mode()
def model_log_probs(
    loaded: LoadedModel, split: str, at_size: SizedSplits, limit: int | None = None
) -> torch.Tensor:
    """Calibrated log-probabilities of an exported model or ensemble on ``split`` ("val",
    "test"; its first ``limit`` images), each model on the split decoded at its own input
    size: an ensemble's members each at theirs (:meth:`Averaged.forward_each`), so members
    trained at different searched sizes see the images they were trained to see, and their
    predictions align per image."""
    module = loaded.calibrated_module()
    if isinstance(loaded.model, Averaged) and loaded.model.sizes:
        xs = [getattr(at_size(s), split).x[:limit] for s in loaded.model.sizes]
        run = lambda part: loaded.model.forward_each([loaded.normalize(x[part]) for x in xs])  # noqa: E731
    else:
        x = getattr(at_size(loaded.image_size), split).x[:limit]
        xs = [x]
        run = lambda part: module(loaded.preprocess(x[part])).float().log_softmax(-1)  # noqa: E731
    parts = [run(slice(s, s + 128)).float().cpu() for s in range(0, len(xs[0]), 128)]
    return torch.cat(parts) if parts else torch.empty(0)


@torch.inference_mode()
def score_model(
    model_dir: Path,
    splits: Splits,
    *,
    seed: int = 0,
    device: Any = "cpu",
    registry=None,
    at_size: SizedSplits | None = None,
) -> dict[str, Any]:
    """Test metrics with intervals and calibration, inference cost (ms per image on
    ``device``, parameters) of an exported model or ensemble. ``at_size`` (the study's
    :func:`sized_splits`): each model is scored on the test split at its own image size;
    without it on ``splits`` as they are (resized to the model's size)."""
    device = resolve_device(device)
    # the study's registry: a plugin file's backbone is not in the default one
    loaded = load_model(model_dir, device=str(device), registry=registry)
    at_size = at_size or (lambda size: splits)
    test = splits.test
    model_log_probs(loaded, "test", at_size, limit=2)  # warm-up: not the steady cost
    t0 = time.perf_counter()
    log_probs = model_log_probs(loaded, "test", at_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    num_classes = len(loaded.label_names)
    pred = log_probs.argmax(1)
    test_metrics = metrics_from_predictions(test.y, pred, num_classes)
    if registry is not None:  # the plugins' metrics too: the study's may be one
        probs = log_probs.exp().numpy()
        for metric in plugin_metrics(registry):
            test_metrics[metric.name] = metric.checked(test.y.numpy(), probs)
    # log_probs already include the temperature: score them as they are
    scored = score_predictions(log_probs, test.y, num_classes, None, seed=seed)
    return {
        "path": str(model_dir),
        "test": {k: v for k, v in test_metrics.items() if k != "confusion_matrix"},
        "test_interval": scored["test_interval"],
        "ece": scored["calibration"]["ece_before"],
        "ms_per_image": round(1000 * seconds / max(1, len(test)), 3),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "members": len(loaded.members) if loaded.members else 1,
    }


def input_size(config: dict[str, Any]) -> list[int] | None:
    """An export's input size (config.json's ``pretrained_cfg``), as ``[3, H, W]``."""
    size = (config.get("pretrained_cfg") or {}).get("input_size")
    return list(size) if size else None


def check_soup(folders: list[Path]) -> None:
    """A soup's ingredients share architecture, classes and input size, or a clear error."""
    check_single_label(folders, "soups")
    first = json.loads((folders[0] / "config.json").read_text())
    for f in folders[1:]:
        other = json.loads((f / "config.json").read_text())
        if input_size(first) != input_size(other):
            raise UserError(
                f"cannot average models trained at different image sizes: {folders[0]} takes "
                f"{input_size(first)}, {f} takes {input_size(other)}; a soup needs models of "
                "one size (ensemble them instead: each member sees its own size)"
            )
        a = (first.get("architecture"), first.get("automl_tl", {}).get("backbone"))
        b = (other.get("architecture"), other.get("automl_tl", {}).get("backbone"))
        if a != b:
            raise UserError(
                f"cannot average weights across architectures: {folders[0]} is {a[0]}, {f} is "
                f"{b[0]}; a soup needs models of one backbone fine-tuned from the same weights"
            )
        if first.get("label_names") != other.get("label_names"):
            raise UserError(
                f"cannot average models with different class lists ({folders[0]}, {f}); "
                "a soup needs models of one study"
            )


def soup_models(folders: list[Path], weights: list[float] | None = None, registry=None):
    """The loaded first model with the (weighted) average of all their weights."""
    check_soup(folders)
    loaded = [load_model(f, device="cpu", registry=registry) for f in folders]
    states = [m.model.state_dict() for m in loaded]
    shapes = {k: tuple(v.shape) for k, v in states[0].items()}
    for f, s in zip(folders[1:], states[1:]):
        if {k: tuple(v.shape) for k, v in s.items()} != shapes:
            raise UserError(
                f"cannot average {folders[0]} and {f}: their weights differ in shape; a soup "
                "needs models of one backbone"
            )
    base = loaded[0]
    base.model.load_state_dict(average_state_dicts(states, weights))
    return base


def metric_to_maximize(config: StudyConfig, registry: Registry, num_classes: int):
    """The study's metric as a function of (probabilities, labels) to maximize: a built-in
    one or a plugin's (``register_metrics``), negated when lower is better."""
    metric = config.search.metric
    sign = metric_direction(metric, registry).sign
    plugin = next((m for m in plugin_metrics(registry) if m.name == metric), None)
    if plugin is not None:
        return lambda probs, y: sign * plugin.checked(y.numpy(), probs.float().numpy())
    return lambda probs, y: sign * metrics_from_predictions(y, probs.argmax(1), num_classes)[metric]


def _val_score(loaded: LoadedModel, splits: Splits, metric: str, registry: Registry) -> float:
    metrics = evaluate(
        loaded.model,
        splits.val,
        len(splits.class_names),
        loaded.data_config,
        torch.device("cpu"),
        metrics=plugin_metrics(registry),  # the study's metric may be a plugin's
    )
    return float(metrics[metric])


def ensemble_counts(
    rule: str, held_out: list[torch.Tensor], labels: torch.Tensor, score
) -> list[int]:
    """Each finalist's weight in the ensemble from its held-out probabilities (the images every
    finalist has predictions for): ``"uniform"``, one each; ``"greedy"``, Caruana's forward
    selection with replacement hill-climbing ``score`` (ties by likelihood)."""
    if rule == "uniform":
        return [1] * len(held_out)
    log_probs = [p.clamp(min=1e-12).log().float() for p in held_out]
    return caruana_selection(log_probs, labels, score=score)


def build_extras(
    config: StudyConfig,
    registry: Registry,
    study: optuna.Study,
    splits: Splits,
    selection: Selection,
    *,
    device: str = "auto",
) -> dict[str, Any]:
    """Ensemble and soup of the finalists, each scored on test beside the single best;
    written to ``selection.json`` and returned."""
    paths = config.paths
    sel = config.selection
    out: dict[str, Any] = {"selection": selection.to_dict()}
    if not splits.task.supports_ensembles:
        # the members' mean softmax, Caruana's hill-climb and the soup's check are defined on
        # one class per image: a multi-label study keeps its single best model
        out["note"] = "ensembles and soups are not built for a multi-label study"
        write_atomic(paths.selection, json.dumps(out, indent=2))
        return out
    best_dir = paths.best
    scoring = resolve_device(device)
    at_size = sized_splits(config, registry, splits)  # each model at its own image size
    out["single"] = score_model(
        best_dir, splits, seed=config.data.seed, device=scoring, registry=registry, at_size=at_size
    )
    numbers = [r["trial"] for r in selection.finalists]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    labels = _pool_labels(splits)
    num_classes = len(splits.class_names)
    if config.search.multi_objective:  # a mix of models has another latency and size
        out["ensemble_note"] = "multi-objective study: no ensemble or soup of the picked model"
    elif sel.ensemble and len(numbers) >= 2:
        done = done_runs(open_race_study(study))
        preds = {
            n: held_out_predictions(
                config,
                splits,
                by_number[n],
                [r for r in done.values() if r.user_attrs.get("finalist") == n],
            )
            for n in numbers
        }
        usable = [n for n in numbers if preds[n]]
        if len(usable) >= 2:
            pooled = {n: mean_probabilities(preds[n], len(labels), num_classes) for n in usable}
            common = torch.ones(len(labels), dtype=torch.bool)
            for _, count in pooled.values():
                common &= count > 0
            counts = ensemble_counts(
                sel.ensemble_rule,
                [pooled[n][0][common] for n in usable],
                labels[common],
                metric_to_maximize(config, registry, num_classes),
            )
            members = [(n, c) for n, c in zip(usable, counts) if c]
            total = sum(c for _, c in members)
            mix = sum(c * pooled[n][0][common] for n, c in members) / total
            temperature = (
                fit_temperature(mix.clamp(min=1e-12).log().float(), labels[common])
                if sel.calibrate
                else 1.0
            )
            folders = [
                _member(config, registry, study, splits, n, selection, device) for n, _ in members
            ]
            export_ensemble(
                folders,
                paths.ensemble,
                weights=[c for _, c in members],
                temperature=temperature,
                metrics={
                    "study": config.name,
                    "kind": "ensemble",
                    "rule": sel.ensemble_rule,
                    "members": [{"trial": n, "weight": c} for n, c in members],
                    "selected_on": int(common.sum()),
                    "temperature": round(temperature, 4),
                },
            )
            out["ensemble"] = score_model(
                paths.ensemble,
                splits,
                seed=config.data.seed,
                device=scoring,
                registry=registry,
                at_size=at_size,
            )
            out["ensemble"]["member_trials"] = {str(n): c for n, c in members}
            log.info(
                "ensemble of trials %s (weights %s) -> %s",
                [n for n, _ in members],
                [c for _, c in members],
                paths.ensemble,
            )
    if sel.soup and not config.search.multi_objective:
        winner = by_number[selection.winner]
        skipped = {
            str(n): why
            for n in numbers
            if n != selection.winner
            and (why := soup_mismatch(config, by_number[n].params, winner.params, splits))
        }
        same = [n for n in numbers if n != selection.winner and str(n) not in skipped]
        if skipped:
            out["soup_skipped"] = skipped
        if weights_label(config, winner.params) == "none":
            # from random init each trial starts from other weights (its own seed): averaging
            # them is no soup
            out["soup_note"] = "the winner trained from random init: no shared weights to soup"
        elif same:
            size = trained_size(winner.params, splits)
            out["soup"] = _greedy_soup(
                config, registry, study, at_size(size), selection, [selection.winner, *same], device
            )
        else:
            out["soup_note"] = (
                "no other finalist shares the winner's backbone, weights and image size"
            )
    write_atomic(paths.selection, json.dumps(out, indent=2))
    return out


def trained_size(params: dict[str, Any], splits: Splits) -> int:
    """The image size a trial trained at: its searched ``image_size``, else the study's."""
    return int(params.get("image_size") or splits.image_size)


def soup_mismatch(
    config: StudyConfig, params: dict[str, Any], winner: dict[str, Any], splits: Splits
) -> str | None:
    """Why a finalist (its parameters) cannot be an ingredient of the winner's soup, or None:
    weights are averaged only across models of one backbone, fine-tuned from the same
    weights at the same image size."""
    if params.get("backbone") != winner.get("backbone"):
        return f"another backbone ({params.get('backbone')}; the winner: {winner.get('backbone')})"
    mine, theirs = weights_label(config, params), weights_label(config, winner)
    if mine != theirs:
        return f"other weights ({mine}; the winner: {theirs})"
    size, winner_size = trained_size(params, splits), trained_size(winner, splits)
    if size != winner_size:
        return (
            f"trained at {size} px, the winner at {winner_size} px: weights trained at "
            "another image size are not averaged"
        )
    return None


def _greedy_soup(
    config: StudyConfig,
    registry: Registry,
    study: optuna.Study,
    splits: Splits,
    selection: Selection,
    order: list[int],
    device: str,
) -> dict[str, Any]:
    """Greedy soup (Wortsman et al., 2022): ingredients in race order, each kept when the
    soup's validation score (the study's metric, in its direction) does not get worse. With
    ``[retrain] on = "train+val"`` the validation images were trained on, so this only
    rejects ingredients that break the soup. ``splits``: at the ingredients' image size."""
    folders = [_member(config, registry, study, splits, n, selection, device) for n in order]
    check_soup(folders)
    kept = [0]
    metric = config.search.metric
    direction = metric_direction(metric, registry)
    current = _val_score(
        load_model(folders[0], device="cpu", registry=registry), splits, metric, registry
    )
    for i in range(1, len(folders)):
        trial_soup = soup_models([folders[j] for j in [*kept, i]], registry=registry)
        score = _val_score(trial_soup, splits, metric, registry)
        if not direction.better(current, score):  # as good or better: keep it
            kept.append(i)
            current = score
    soup = soup_models([folders[j] for j in kept], registry=registry)
    winner_metrics = json.loads((folders[0] / "metrics.json").read_text())
    temperature = float(winner_metrics.get("calibration", {}).get("temperature") or 1.0)
    name = json.loads((folders[0] / "config.json").read_text()).get("automl_tl", {}).get("backbone")
    backbone = registry.get("backbones", name)
    metrics = {
        "study": config.name,
        "kind": "soup",
        "trial": selection.winner,
        "ingredients": [order[j] for j in kept],
        "tried": order,
        f"val_{metric}": current,
        "temperature": temperature,
    }
    export_model(
        soup.model,
        backbone,
        config.paths.soup,
        splits.class_names,
        soup.data_config,
        metrics,
        extra={"temperature": temperature},
    )
    scored = score_model(
        config.paths.soup,
        splits,
        seed=config.data.seed,
        device=resolve_device(device),
        registry=registry,
    )
    scored["ingredients"] = metrics["ingredients"]
    log.info("soup of trials %s -> %s", metrics["ingredients"], config.paths.soup)
    return scored


def select_and_retrain(
    config: StudyConfig,
    registry: Registry,
    study: optuna.Study,
    splits: Splits,
    *,
    device: str = "auto",
) -> tuple[tuple[Path, dict[str, Any]] | None, dict[str, Any] | None]:
    """After the budget: race the finalists (every worker helps), retrain the winner into
    ``best/`` (one worker), then build and score the ensemble and the soup (that worker).
    Returns (``(best dir, metrics)`` or None when another worker retrains, selection.json)."""
    chosen = select(config, registry, study, splits, device=device)
    if chosen is None:
        return None, None
    return retrain_selected(config, registry, study, splits, chosen, device=device)


def retrain_selected(
    config: StudyConfig,
    registry: Registry,
    study: optuna.Study,
    splits: Splits,
    chosen: Selection,
    *,
    device: str = "auto",
) -> tuple[tuple[Path, dict[str, Any]] | None, dict[str, Any] | None]:
    """:func:`select_and_retrain` once the race has chosen: the winner's retrain into
    ``best/`` (claimed: one worker), then the ensemble and the soup."""
    for note in chosen.notes:
        log.debug("selection: %s", note)
    retrained = retrain_once(
        config, registry, study, splits, device=device, selected=chosen.to_dict()
    )
    if retrained is None:
        return None, None
    extras = build_extras(config, registry, study, splits, chosen, device=device)
    return retrained, extras


def recorded_selection(config: StudyConfig) -> dict[str, Any] | None:
    """What the study's race decided (winner, epochs, temperature …), as recorded in
    ``selection.json`` or in ``best/metrics.json``; None when the search did not race."""
    recorded = (read_selection(config) or {}).get("selection")
    if recorded and "winner" in recorded:
        return recorded
    try:
        metrics = json.loads((config.paths.best / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    recorded = metrics.get("selection")
    return recorded if isinstance(recorded, dict) and "winner" in recorded else None


def read_selection(config: StudyConfig) -> dict[str, Any] | None:
    """``selection.json`` of the study, if any."""
    try:
        return json.loads((config.paths.selection).read_text())
    except (OSError, ValueError):
        return None
