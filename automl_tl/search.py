"""The search: run (or resume) a study until ``n_trials`` trials have finished, then retrain
the best.

Optuna's storage is the single source of truth: the budget counts finished trials (COMPLETE
or PRUNED) already in the storage, so re-running the same command resumes and never re-runs
a completed trial. The pieces, each usable on its own in a hand-written Optuna loop:

- :class:`Objective` — one trial: suggest a configuration, train it, report every epoch to
  the pruner, return the validation score.
- :class:`TrialRecorder` — an ``optimize`` callback: the catalog row, the ``trial_finished``
  hook and the log line of every finished trial, from one place.
- :class:`FailureStreak` — an ``optimize`` callback that stops the search after
  ``[search] max_consecutive_failures`` failures in a row, with the common reason.
- :class:`Interrupts` — Ctrl-C and SIGTERM always land inside a trial this process knows.
- :func:`search` — checks, data, the study, the budget, the loop, the retrain.

Example (a hand-written loop on an in-memory study)::

    objective = Objective(config, registry, pm, splits, device="cpu")
    recorder = TrialRecorder(config, pm)
    study = optuna.create_study(
        direction=metric_direction(config.search.metric, registry).name,
        sampler=make_sampler(config),
    )
    study.optimize(objective, n_trials=8, callbacks=[recorder], catch=(TrialFailed,))
"""

from __future__ import annotations

import contextlib
import logging
import signal
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pluggy
from optuna.trial import FrozenTrial, TrialState

from . import latency, trials, weightsource
from ._util import failure_reason, is_out_of_memory
from .budget import (
    DEADLINE_SKIPS_TO_STOP,
    Budget,
    Deadline,
    RetryStaleTrial,
    TrialSkipped,
    after_search_reserve,
    deadline_skips,
    racing_workers,
    worker_identity,
)
from .catalog import Catalog, catalog_path
from .config import (
    METRICS,
    StudyConfig,
    check_named_weights,
    metric_direction,
    parse_constraint,
)
from .data import Splits, check_image_sizes, load_splits, parse_source, splits_at
from .errors import ConfigError, UnknownNameError, UserError, did_you_mean
from .leaderboard import (
    backbone_throughput,
    best_summary,
    count_finished,
    describe_params,
    selection_note,
)
from .paths import ensure_writable
from .pretrain import ensure_study_weights
from .prior import Prior, check_sources, meta_features, publish, study_prior, study_weights
from .registry import Registry
from .retrain import retrain_per_weights
from .samplers import make_pruner, make_sampler, pruner_warning, startup_trials
from .scores import pack
from .selection import check_selection, race_size, select, select_and_retrain
from .space import check_space, suggest
from .storage import (
    check_existing_direction,
    fail_trial,
    join_study,
    one_search_per_sqlite,
    open_storage,
    redact,
    scrub,
)
from .train import EpochResult, expected_seconds, fit, release_memory, resolve_device
from .trials import Direction

log = logging.getLogger("automl_tl")


class TrialFailed(Exception):
    """A trial failed for a reason recorded in its ``fail_reason`` attribute; the study goes on."""


class TooManyFailures(UserError):
    """Several trials in a row failed; the search stops and shows the common reason."""


# ---------------------------------------------------------------------------------------------
# checks before anything runs


def check_names(config: StudyConfig, registry: Registry) -> None:
    """Every backbone, policy, strategy and the dataset are known, and every backbone takes
    the named weight sources ``[weights]`` gives it, before anything runs."""
    s = config.search
    for kind, names in (
        ("backbones", s.backbones),
        ("augmentation_policies", s.augmentations),
        ("unfreeze_strategies", s.unfreeze),
    ):
        for name in names:
            registry.get(kind, name)
    registry.get("datasets", parse_source(config.data.source)[0])
    check_metric_name(config, registry)
    if "latency_ms" in config.search.measures:  # onnxruntime asked for and not installed
        latency.check_runtime(config.search.latency_target())
    check_named_weights(config, registry)
    check_space(config, registry)  # no empty branch; no flipping policy under fixed orientation


def announce_export(
    pm: pluggy.PluginManager, config: StudyConfig, directory: Path, metrics: dict[str, Any]
) -> None:
    """The ``model_exported`` hook for a model :func:`automl_tl.retrain.retrain` wrote."""
    pm.hook.model_exported(
        study_name=config.name,
        trial_number=int(metrics["trial"]),
        model_dir=str(directory),
        metrics=metrics,
        best=Path(directory) == config.paths.best,
    )


def check_metric_name(config: StudyConfig, registry: Registry) -> None:
    """``[search] metric`` is a built-in metric or one a plugin registered (a lower-is-better
    one is minimized: :func:`automl_tl.config.metric_direction`)."""
    name = config.search.metric
    task = config.task
    if name in task.metrics:
        return
    if task.multilabel:  # plugin metrics score one class per image (Metric's contract)
        raise ConfigError(
            f"[search] metric = {name!r} is not a multi-label metric; a multi-label study "
            f"is searched by one of: {', '.join(task.metrics)}"
        )
    known = [*METRICS, *registry.names("metrics")]
    if name not in registry.names("metrics"):
        raise UnknownNameError(
            f"unknown metric {name!r} in [search] metric{did_you_mean(name, known)}; known: "
            f"{', '.join(known)} (a plugin adds more with register_metrics)"
        )


def check_backbones_run(config: StudyConfig, registry: Registry) -> None:
    """Each backbone takes a batch at the study's image size (before hours of failed trials)."""
    import torch

    for name in config.search.backbones:
        try:
            for size in config.data.sizes:  # every searched size
                backbone = registry.get("backbones", name)
                model = backbone.create(2, weights="none", image_size=size).eval()
                with torch.no_grad():
                    model(torch.zeros(2, 3, size, size))
        except Exception as exc:
            raise UserError(
                f"backbone {name!r} cannot run at [data] image_size = {size}: {failure_reason(exc)}. "
                "Raise image_size or remove the backbone from [search] backbones."
            ) from exc
    check_weight_files(config, registry)


def check_weight_files(config: StudyConfig, registry: Registry) -> None:
    """Every weights file and ``local-dir:`` folder ``[weights]`` gives a backbone loads into
    it, once before the first trial: a file from another network is one message naming the
    entry, not a failure in every trial until the search gives up."""
    size = config.data.image_size
    for backbone, key, text in weightsource.entries(config.weights, config.search.backbones):
        source = weightsource.parse(text, config.base_dir)
        if source.kind not in ("file", "local-dir"):
            continue
        try:
            registry.get("backbones", backbone).create(
                2, weights=source.for_create(), image_size=size
            )
        except Exception as exc:
            raise UserError(
                f'[weights] {key} = "{text}" does not fit backbone {backbone!r}: '
                f"{failure_reason(exc)}"
                + (
                    ""
                    if isinstance(exc, UserError)
                    else ". Point it at weights saved from this backbone's network"
                )
            ) from exc


def open_search_study(
    config: StudyConfig,
    splits: Splits,
    registry: Registry | None = None,
    prior: Prior | None = None,
    deadline: bool = False,
) -> optuna.Study:
    """Create or join the study for a search: its storage with heartbeats and retries on a
    database server, the study's sampler (with the team ``prior``'s portfolio first; TPE
    cost-aware under a timeout or a ``deadline``, :func:`automl_tl.samplers.cost_aware`) and
    pruner, the direction of ``[search] metric`` (a plugin's metric needs ``registry``);
    refuses data that differ from the study's, and a study made for the other direction
    (:func:`automl_tl.storage.join_study`)."""
    warning = pruner_warning(config)
    if warning:
        warnings.warn(warning, stacklevel=2)
    storage = open_storage(
        config.storage_url,
        heartbeat_interval=config.search.heartbeat_interval,
        on_stale=RetryStaleTrial(),
    )
    return join_study(
        config,
        splits,
        storage=storage,
        sampler=make_sampler(config, prior, deadline),
        pruner=make_pruner(config),
        direction=metric_direction(config.search.metric, registry),
    )


# ---------------------------------------------------------------------------------------------
# one trial


class Objective:
    """One trial of the search, as Optuna calls it: ``value = objective(trial)``.

    Suggests a configuration from the study's space, trains it (:func:`automl_tl.train.fit`),
    records every epoch in the catalog and the ``epoch_finished`` hook, reports it to the
    pruner, and returns the validation score. A failure is recorded as the trial's
    ``fail_reason`` and raised as :class:`TrialFailed` (catch it in ``optimize``); an
    interrupt is recorded as "interrupted" and raised.

    Args:
        budget: the global :class:`automl_tl.budget.Budget` when workers share the study
            (a trial admitted after the budget is covered raises ``TrialSkipped``).
        deadline: when the search must be over: a trial that would not finish before it,
            with time left for the retrain, is skipped (``TrialSkipped``, attribute
            ``deadline_skip``); after a few in a row the search stops.
    """

    def __init__(
        self,
        config: StudyConfig,
        registry: Registry,
        pm: pluggy.PluginManager,
        splits: Splits,
        device: Any = "auto",
        *,
        budget: Budget | None = None,
        catalog: Catalog | None = None,
        interrupts: Interrupts | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        self.config, self.registry, self.hook, self.splits = config, registry, pm.hook, splits
        self.deadline = deadline
        self.late_in_a_row = 0
        self.device = resolve_device(device)
        self.catalog = catalog or Catalog(catalog_path(config))
        self.metric = config.search.metric
        self.budget = budget
        self.interrupts = interrupts
        self.started: list[int] = []  # trial numbers this process ran (or is running)

    def splits_for(self, choice) -> Splits:
        """The study's splits at the trial's searched image size (decoded once per size)."""
        return splits_at(self.config, self.registry, self.splits, choice.image_size)

    def __call__(self, trial: optuna.Trial) -> float | tuple:
        self.started.append(trial.number)  # first: an interrupt from here on fails it cleanly
        try:
            if self.interrupts is not None:
                self.interrupts.deliver()  # one that came while Optuna created this trial
            trial.set_user_attr(trials.WORKER, worker_identity())  # a dead worker's trial is known
            if self.budget is not None:
                self.budget.admit(trial)  # TrialSkipped when other workers covered the budget
            return self._train(trial)
        except KeyboardInterrupt:
            trial.set_user_attr(trials.FAIL_REASON, "interrupted")
            raise
        except TrialFailed as exc:
            if is_out_of_memory(exc.__cause__):
                release_memory(self.device)  # the next trial starts clean
            raise

    def _train(self, trial: optuna.Trial) -> float | tuple:
        name = self.config.name
        choice = suggest(trial, self.config, self.registry)
        self.admit_before_deadline(trial, choice)
        trial.set_user_attr(trials.DEVICE, str(self.device))
        # the source as trained from, a file with its sha256 (leaderboard, catalog, index.html)
        trial.set_user_attr(
            trials.WEIGHTS, self.config.weights_label(choice.backbone, trial.params.get("weights"))
        )
        self.hook.trial_started(
            study_name=name,
            trial_number=trial.number,
            params=dict(trial.params),
            output_dir=str(self.config.output_dir),
        )

        def on_epoch(r: EpochResult) -> None:
            metrics = {
                "train_loss": r.train_loss,
                "lr": r.lr,
                "seconds": r.seconds,
                "images_per_s": r.images_per_s,
                "val": r.val,
            }
            self.catalog.record_epoch(name, trial.number, r.epoch, metrics)
            self.hook.epoch_finished(
                study_name=name, trial_number=trial.number, epoch=r.epoch, metrics=metrics
            )
            trial.set_user_attr(trials.EPOCHS_RUN, r.epoch + 1)
            if r.cached_features:  # head on cached features: not the backbone's speed
                trial.set_user_attr(trials.FEATURE_CACHE, "used")  # "hit" / "miss" once complete
            else:  # pruned trials count too in backbone_throughput()
                trial.set_user_attr(trials.IMAGES_PER_S, round(r.images_per_s, 1))
            if self.config.search.multi_objective:
                return  # Optuna prunes single-objective studies only
            trial.report(r.val[self.metric], r.epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {r.epoch + 1}")

        too_slow = self.too_slow(trial, choice)
        if too_slow:
            trial.set_user_attr(trials.TOO_SLOW, too_slow)
            raise optuna.TrialPruned(too_slow)
        expected = None
        if self.config.search.compile:  # compiled only where it pays (train.compile_decision)
            rate = backbone_throughput(trial.study, device=str(self.device)).get(choice.backbone)
            expected = expected_seconds(choice, self.splits, self.registry, rate) if rate else None
        try:
            result = fit(
                choice,
                self.splits_for(choice),
                self.registry,
                device=self.device,
                seed=self.config.data.seed + trial.number,
                on_epoch=on_epoch,
                compile=self.config.search.compile,
                patience=self.config.search.patience,
                metric=self.metric,
                keep_predictions=True,  # for ensembles and calibration (automl_tl.selection)
                expected_seconds=expected,
            )
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr(trials.FAIL_REASON, "interrupted")
            raise
        except Exception as exc:
            reason = failure_reason(exc)
            trial.set_user_attr(trials.FAIL_REASON, reason)
            log.debug("trial %d failed", trial.number, exc_info=True)
            raise TrialFailed(reason) from exc
        # with early stopping the trial scores as its best epoch; without, as its last
        val = dict(result.best_val if self.config.search.patience else result.val)
        if result.best_epoch is not None:
            trial.set_user_attr(trials.BEST_EPOCH, result.best_epoch + 1)
        if result.stopped_early:
            trial.set_user_attr(trials.STOPPED_EARLY, True)
        if result.val_log_probs is not None:
            trial.set_user_attr(trials.VAL_LOG_PROBS, pack(result.val_log_probs))
        trial.set_user_attr(trials.SECONDS, round(result.seconds, 3))
        if result.feature_cache is None:
            trial.set_user_attr(trials.IMAGES_PER_S, round(result.images_per_s, 1))
        else:
            trial.set_user_attr(trials.FEATURE_CACHE, result.feature_cache)
        trial.set_user_attr(trials.BATCH_SIZE, result.batch_size)  # the searched one, always
        trial.set_user_attr(trials.IMBALANCE, result.imbalance)
        if result.ema_won is not None:  # a retrain keeps the model that won here
            trial.set_user_attr(trials.EMA_WON, result.ema_won)
        if result.compiled is not None:
            trial.set_user_attr(trials.COMPILED, result.compiled)
        if result.micro_batch and result.micro_batch < result.batch_size:  # out of memory
            trial.set_user_attr(trials.ACCUMULATION, result.batch_size // result.micro_batch)
        trial.set_user_attr(trials.VAL_METRICS, val)
        if self.config.search.multi_objective or self.config.search.constraints:
            return self._objectives(trial, result, float(val[self.metric]))
        return float(val[self.metric])

    def reserve(self, study: optuna.Study) -> float:
        """Seconds to keep after the search for the race (its most runs, shared by the
        workers racing) and the winner's retrain (:func:`after_search_reserve`)."""
        n_train = len(self.splits.train)
        n_retrain = n_train + (len(self.splits.val) if self.config.retrain.on == "train+val" else 0)
        runs, n_race = race_size(self.config, self.splits)
        return after_search_reserve(
            study, n_train, n_retrain, race_runs=runs, n_race=n_race, racers=racing_workers()
        )

    def expected(self, study: optuna.Study, choice) -> float:
        """Seconds ``choice`` should take here: at its backbone's measured speed on this kind
        of device, else the median completed trial (0 before any)."""
        rate = backbone_throughput(study, device=str(self.device)).get(choice.backbone)
        if rate:
            return expected_seconds(choice, self.splits, self.registry, rate)
        durations = sorted(
            d
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if (d := trials.duration(t)) is not None
        )
        return durations[len(durations) // 2] if durations else 0.0

    def late(self, trial: optuna.Trial, choice) -> str | None:
        """Why ``choice`` cannot start before the deadline (it would not finish with the
        retrain's time left over), or None when it can (or there is no deadline)."""
        if self.deadline is None:
            return None
        left = self.deadline.left()
        expected, reserve = self.expected(trial.study, choice), self.reserve(trial.study)
        if expected + reserve <= left:
            return None
        return (
            f"not started: {choice.backbone} would take ~{expected:.0f} s, {left:.0f} s are left "
            f"before the deadline ({self.deadline.source}, {self.deadline.iso()}) and "
            f"{reserve:.0f} s of them are kept for the "
            + ("race and the retrain" if race_size(self.config, self.splits)[0] else "retrain")
        )

    def admit_before_deadline(self, trial: optuna.Trial, choice) -> None:
        """Skip (``TrialSkipped``) a trial that would end after the deadline; stop the search
        after :data:`automl_tl.budget.DEADLINE_SKIPS_TO_STOP` of them in a row."""
        why = self.late(trial, choice)
        if why is None:
            self.late_in_a_row = 0
            return
        self.late_in_a_row += 1
        trial.set_user_attr(trials.SKIPPED, True)
        trial.set_user_attr(trials.DEADLINE_SKIP, True)
        trial.set_user_attr(trials.FAIL_REASON, why)
        if self.late_in_a_row >= DEADLINE_SKIPS_TO_STOP:
            trial.study.stop()  # nothing the sampler proposes fits any more
        raise TrialSkipped(why)

    def _objectives(self, trial: optuna.Trial, result, score: float) -> float | tuple:
        """The metric and the measures of ``[search] objectives`` (measured on the trained
        model: :mod:`automl_tl.latency`), with the ``[search] constraints`` values stored
        for Optuna's ``constraints_func``."""
        s = self.config.search
        measured = latency.measure(
            result.model, self.splits.image_size, s.measures, s.latency_target()
        )
        trial.set_user_attr(trials.MEASURED, measured)
        values = {s.metric: score, **measured}
        violations = [c.violation(values[c.name]) for c in map(parse_constraint, s.constraints)]
        trial.set_user_attr(trials.CONSTRAINTS, violations)
        if hasattr(trial, "set_constraint"):  # Optuna >= 5 (before: the sampler's constraints_func)
            for text, value in zip(s.constraints, violations):
                trial.set_constraint(text, value)
        if not s.multi_objective:
            return score
        return (score, *(measured[m] for m in s.measures))

    def too_slow(self, trial: optuna.Trial, choice) -> str | None:
        """Why ``choice`` cannot finish within ``[search] timeout`` at the training speed its
        backbone showed in earlier trials on this kind of device (None if it can)."""
        timeout = self.config.search.timeout
        if not timeout:
            return None
        rate = backbone_throughput(trial.study, device=str(self.device)).get(choice.backbone)
        if not rate:
            return None
        seconds = expected_seconds(choice, self.splits_for(choice), self.registry, rate)
        if seconds <= timeout:
            return None
        return (
            f"{choice.backbone} trains at {rate:.0f} images/s here: this trial would take "
            f"~{seconds:.0f}s, more than [search] timeout = {timeout:.0f}s"
        )


# ---------------------------------------------------------------------------------------------
# after each trial


class TrialRecorder:
    """Records finished trials: the catalog row, the ``trial_finished`` hook and one log line,
    from one place. Use the instance as an ``optimize`` callback; :meth:`record` for a trial
    that ended outside the loop (an interrupt)."""

    def __init__(
        self, config: StudyConfig, pm: pluggy.PluginManager, catalog: Catalog | None = None
    ) -> None:
        self.config, self.hook = config, pm.hook
        self.catalog = catalog or Catalog(catalog_path(config))
        self.ran = 0
        self.recorded: set[int] = set()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get(trials.SKIPPED):  # nothing ran: the budget was covered elsewhere
            log.info(
                "trial %3d skipped: %s", trial.number, trial.user_attrs.get(trials.FAIL_REASON)
            )
            return
        self.record(study, trial)

    def record(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.ran += 1
        self.recorded.add(trial.number)
        name = self.config.name
        self.catalog.record_trial(name, trial, self.config.search.metric, Direction.of(study))
        self.hook.trial_finished(
            study_name=name,
            trial_number=trial.number,
            state=trial.state.name,
            value=trials.value_of(trial),
            # (without the packed validation predictions: kilobytes no tracker wants)
            attrs={k: v for k, v in trial.user_attrs.items() if k != trials.VAL_LOG_PROBS},
        )
        reason = trial.user_attrs.get(trials.FAIL_REASON, "unknown")
        if trial.state == TrialState.COMPLETE:
            outcome = f"{self.config.search.metric}={trial.values[0]:.4f}"
            for name, value in (trial.user_attrs.get(trials.MEASURED) or {}).items():
                outcome += f" {name}={value:.4g}"
        elif trial.state == TrialState.PRUNED:
            outcome = f"pruned at epoch {trial.user_attrs.get(trials.EPOCHS_RUN, '?')}"
        elif reason == "interrupted":
            outcome = "interrupted"
        else:
            outcome = f"failed: {reason}"
        try:
            best = trials.best_trial(study)
            best_text = f"best {trials.value_of(best):.4f} (#{best.number})"
        except ValueError:
            best_text = "no complete trial yet"
        log.info(
            "trial %3d %-8s %s  %s  %.1fs  %s",
            trial.number,
            trial.state.name,
            outcome,
            describe_params(trial.params),
            trials.duration(trial) or 0.0,
            best_text,
        )

    def sync(self, study: optuna.Study) -> None:
        """Record finished trials the catalog lacks (a worker killed between the two writes)."""
        recorded = self.catalog.trial_states(self.config.name)
        for trial in study.get_trials(deepcopy=False):
            if trial.state != TrialState.RUNNING and recorded.get(trial.number) != trial.state.name:
                self.catalog.record_trial(
                    self.config.name, trial, self.config.search.metric, Direction.of(study)
                )


class FailureStreak:
    """An ``optimize`` callback: after ``limit`` failed trials in a row the search stops, and
    :attr:`stopped_for` says how many failed with which common reason."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reasons: list[str] = []
        self.stopped_for: str | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get(trials.SKIPPED):
            return
        if trial.state != TrialState.FAIL:
            self.reasons.clear()
            return
        self.reasons.append(trial.user_attrs.get(trials.FAIL_REASON, "unknown"))
        if len(self.reasons) >= self.limit:
            common, count = Counter(self.reasons).most_common(1)[0]
            self.stopped_for = (
                f"{len(self.reasons)} trials in a row failed ({count} with: {common})"
            )
            study.stop()


# ---------------------------------------------------------------------------------------------
# interrupts


class Interrupts:
    """Ctrl-C and SIGTERM during a search always land inside a trial this process knows about.

    Optuna creates a trial in the storage (``study.ask``) before it calls the objective; an
    interrupt in between would leave that trial RUNNING for ever, owned by no one. While
    Optuna is between trials the signal is held (and the loop told to stop), then raised at
    the objective's first line, where the trial is recorded and fails as "interrupted", or
    after ``optimize`` returns. Signals the process does not turn into exceptions, and
    searches outside the main thread, are left alone.
    """

    def __init__(self) -> None:
        self.holding = False
        self.pending: tuple[int, Any] | None = None
        self.study: optuna.Study | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if not callable(handler):
                continue
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                return self
            self.previous[sig] = handler
        return self

    def __exit__(self, *exc_info) -> None:
        self.holding = False
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.holding:
            self.pending = (signum, frame)
            if self.study is not None:
                # no further trial; one being created raises at its start (before Optuna's
                # loop began, stop() refuses: the signal is raised when optimize returns)
                with contextlib.suppress(RuntimeError):
                    self.study.stop()
            return
        self.previous[signum](signum, frame)

    def hold(self, study: optuna.Study | None = None, *_) -> None:
        """From here until :meth:`deliver`, a signal waits (an Optuna callback: the last one)."""
        if study is not None:
            self.study = study
        self.holding = True

    def deliver(self) -> None:
        """Stop holding; raise a signal that arrived meanwhile, as its own handler would."""
        self.holding = False
        if self.pending is not None:
            signum, frame = self.pending
            self.pending = None
            self.previous[signum](signum, frame)


def record_interrupted(study: optuna.Study, objective: Objective, recorder: TrialRecorder) -> None:
    """After Ctrl-C / SIGTERM: this process's unfinished trial ends as FAIL "interrupted"
    (Optuna has usually done so already), is queued again to run first on resume (it is no
    verdict on its configuration), and the catalog and the lifecycle hooks see it."""
    known = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number in objective.started:
        trial = known.get(number)
        if trial is None or number in recorder.recorded:
            continue
        if trial.state == TrialState.RUNNING:
            trial = fail_trial(study, trial, "interrupted") or trial
        if trial.user_attrs.get(trials.FAIL_REASON) == "interrupted":
            RetryStaleTrial().queue_again(study, trial, "was interrupted")
        recorder.record(study, trial)


class _OneLinePerFailure(logging.Filter):
    """Optuna logs each failed trial with a traceback; a failed or interrupted trial of ours is
    already one log line with its reason (``-v`` shows the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (TrialFailed, KeyboardInterrupt)):
            return False
        # Optuna's second line for the same failure (our objective never returns None)
        return not record.getMessage().endswith("failed with value None.")


@contextlib.contextmanager
def _one_line_per_failure():
    optuna_log = logging.getLogger("optuna.study._optimize")
    quiet = _OneLinePerFailure()
    optuna_log.addFilter(quiet)
    try:
        yield
    finally:
        optuna_log.removeFilter(quiet)


# ---------------------------------------------------------------------------------------------
# the search


def load_prior(config: StudyConfig, splits: Splits, catalog: Catalog) -> Prior | None:
    """Record the data's meta-features in the catalog (for later studies' priors); with
    ``[search] prior``, the study's prior (``prior.json``), its warnings logged."""
    features = meta_features(splits, study_weights(config))
    catalog.record_dataset(config.name, features)
    prior = study_prior(config, features, startup_trials(config))
    if prior is not None:
        for warning in prior.warnings:
            log.warning("%s", warning)
        log.info(
            "prior: %d configurations from %d earlier tasks first (nearest: %s%s)",
            len(prior.entries),
            len(prior.tasks),
            ", ".join(t["name"] for t in prior.tasks[:3]) or "none",
            "" if prior.neighbours is None else f"; trusting the {prior.neighbours} nearest",
        )
    return prior


def share_with_team(config: StudyConfig, catalog: Catalog) -> None:
    """The study's dataset and trials into each shared catalog of ``[search] prior`` (a
    database URL), so later studies on any node learn from it; a failure is a warning."""
    for url in config.search.prior:
        if "://" not in url:
            continue
        try:
            publish(catalog.db, url, [config.name])
        except Exception as exc:  # never stops a search: the local catalog has everything
            log.warning(
                "could not add this study to the shared catalog %s: %s",
                redact(url),
                scrub(failure_reason(exc), url),
            )


@dataclass
class SearchOutcome:
    study: optuna.Study
    finished: int
    ran: int
    best: dict[str, Any] | None
    model_dir: Path | None = None
    metrics: dict[str, Any] | None = None
    #: best trial of each weight source, retrained (when [weights] is searched)
    comparison: list[dict[str, Any]] | None = None
    #: what the race chose and the single / ensemble / soup test scores (selection.json)
    selection: dict[str, Any] | None = None
    #: trials not started because they would have ended after the deadline (number, reason)
    skipped: list[dict[str, Any]] = field(default_factory=list)


def search(
    config: StudyConfig,
    registry: Registry,
    pm: pluggy.PluginManager,
    *,
    device: str = "auto",
    retrain_best: bool = True,
    deadline: Deadline | None = None,
    race: bool = False,
) -> SearchOutcome:
    """Run (or resume) the study until ``n_trials`` trials have finished; then retrain the best.

    ``race`` without ``retrain_best`` (a worker of ``--workers N``): take part in the race of
    the finalists (:func:`automl_tl.selection.select`: its runs are claimed one by one, so
    the workers spread them over their GPUs) and leave the retrain to the parent.

    With a ``deadline`` (:func:`automl_tl.budget.search_deadline`) a trial starts only if it
    should finish before it with time left for the retrain; :attr:`SearchOutcome.skipped`
    lists those that did not."""
    check_names(config, registry)
    check_sources(config.search.prior, config.base_dir)  # [search] prior: catalogs, or exit 2
    check_backbones_run(config, registry)
    ensure_writable(config.output_dir)
    # an existing study made for the other direction: refused before any data loads
    check_existing_direction(config, metric_direction(config.search.metric, registry))
    with one_search_per_sqlite(config.storage_url):
        return _search(
            config,
            registry,
            pm,
            device=device,
            retrain_best=retrain_best,
            deadline=deadline,
            race=race,
        )


def _search(
    config: StudyConfig,
    registry: Registry,
    pm: pluggy.PluginManager,
    *,
    device: str,
    retrain_best: bool,
    deadline: Deadline | None = None,
    race: bool = False,
) -> SearchOutcome:
    ensure_study_weights(config, registry, device=device)  # pretrain:SOURCE, built once
    splits = load_splits(config, registry)
    check_image_sizes(config, splits)  # several searched sizes' caches must fit in memory
    check_selection(config, splits)  # e.g. more folds than the smallest class: before training
    catalog = Catalog(catalog_path(config))
    prior = load_prior(config, splits, catalog)
    # refuses to join if this worker's data differ
    study = open_search_study(config, splits, registry, prior, deadline=deadline is not None)
    interrupts = Interrupts()
    objective = Objective(
        config,
        registry,
        pm,
        splits,
        device,
        catalog=catalog,
        interrupts=interrupts,
        deadline=deadline,
    )
    # n_trials finished trials across every worker sharing the storage, exactly
    objective.budget = budget = Budget(
        study,
        config.search.n_trials,
        url=config.storage_url,
        timeout=config.search.timeout,
        heartbeat_interval=config.search.heartbeat_interval,
        stop_at=deadline,
        reserve=lambda: objective.reserve(study),
    )
    recorder = TrialRecorder(config, pm, catalog)
    streak = FailureStreak(config.search.max_consecutive_failures)
    catalog.record_skipped(config.name, splits.skipped)
    recorder.sync(study)
    log.info(
        "study %r: %d classes, %d/%d/%d train/val/test images, %d of %d trials already finished, storage %s",
        config.name,
        len(splits.class_names),
        len(splits.train),
        len(splits.val),
        len(splits.test),
        count_finished(study),
        config.search.n_trials,
        redact(config.storage_url),
    )
    if budget.room():
        try:
            with interrupts, _one_line_per_failure():
                interrupts.hold(study)
                study.optimize(
                    objective,
                    n_trials=None,
                    timeout=config.search.timeout,
                    catch=(TrialFailed, TrialSkipped),
                    # the last callback holds signals until the next trial is ours
                    callbacks=[recorder, streak, budget, interrupts.hold],
                    gc_after_trial=False,
                )
                interrupts.deliver()
        except KeyboardInterrupt:
            record_interrupted(study, objective, recorder)
            raise
    share_with_team(config, catalog)
    best = best_summary(study)
    note = selection_note(study)
    if note:
        log.warning("note: %s", note)
    pm.hook.study_finished(study_name=config.name, best=best, output_dir=str(config.output_dir))
    if streak.stopped_for:
        raise TooManyFailures(
            f"search stopped: {streak.stopped_for}. Completed trials are kept; fix the cause and run "
            "the same command again to resume (raise [search] max_consecutive_failures to tolerate more)."
        )
    outcome = SearchOutcome(
        study, count_finished(study), recorder.ran, best, skipped=deadline_skips(study)
    )
    if retrain_best and best is not None:  # once per study, however many workers end here
        retrained, outcome.selection = select_and_retrain(
            config, registry, study, splits, device=device
        )
        if retrained is not None:
            outcome.model_dir, outcome.metrics = retrained
            announce_export(pm, config, *retrained)
            # [weights] searched: retrain each source's best too (transferred vs scratch)
            outcome.comparison = retrain_per_weights(config, registry, study, splits, device=device)
    elif race and best is not None:  # a worker's share of the race; the parent retrains
        select(config, registry, study, splits, device=device)
    return outcome
