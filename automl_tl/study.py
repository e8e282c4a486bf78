"""Create or resume the Optuna study, run trials, retrain the winner, and summarize.

Optuna's storage is the single source of truth: the budget (``n_trials``) counts finished
trials (COMPLETE or PRUNED) already in the storage, so re-running the same command resumes
and never re-runs a completed trial.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pluggy
from optuna.trial import TrialState

from .catalog import Catalog
from .config import StudyConfig
from .data import Splits, describe_changes, prepare_data
from .errors import DataError, UserError
from .export import export_model
from .pretrain import ensure_study_weights
from .registry import Registry
from .samplers import DEAD_AT_CHANCE, GuardedHyperbandPruner, GuardedMedianPruner
from .space import check_space, choice_from_params, effective_params, suggest
from .train import EpochResult, evaluate, expected_seconds, fit, resolve_device
from .transfer import alternate_weights, comparison, retrain_per_weights
from .workers import (
    Budget,
    RetryStaleTrial,
    TrialSkipped,
    join_study,
    open_storage,
    retrain_once,
    worker_identity,
)

log = logging.getLogger("automl_tl")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class TrialFailed(Exception):
    """A trial failed for a reason recorded in its ``fail_reason`` attribute; the study goes on."""


class _OneLinePerFailure(logging.Filter):
    """Optuna logs each failed trial with a traceback; a failed or interrupted trial of ours is
    already one log line with its reason (``-v`` shows the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (TrialFailed, KeyboardInterrupt)):
            return False
        # Optuna's second line for the same failure (our objective never returns None)
        return not record.getMessage().endswith("failed with value None.")


_ONE_LINE_PER_FAILURE = _OneLinePerFailure()


class TooManyFailures(UserError):
    """Several trials in a row failed; the search stops and shows the common reason."""


# ---------------------------------------------------------------------------------------------
# storage, sampler, pruner


def redact(url: str) -> str:
    """A storage URL with its password hidden, for logs and messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def make_storage(config: StudyConfig) -> optuna.storages.BaseStorage:
    """SQLite, journal file or database server (with heartbeats): see :mod:`automl_tl.workers`."""
    return open_storage(config.storage_url, heartbeat_interval=config.search.heartbeat_interval)


def make_sampler(config: StudyConfig) -> optuna.samplers.BaseSampler:
    """The study's sampler; a searched [weights] source takes turns (automl_tl.transfer)."""
    return alternate_weights(config, _base_sampler(config))


def _base_sampler(config: StudyConfig) -> optuna.samplers.BaseSampler:
    seed = config.data.seed
    name = config.search.sampler
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=_startup_trials(config))
    else:
        sampler = optuna.samplers.TPESampler(
            multivariate=True,
            group=True,
            constant_liar=True,
            seed=seed,
            n_startup_trials=_startup_trials(config),
        )
    if not config.search.portfolio:
        return sampler
    from .portfolio import PortfolioSampler, portfolio

    # the first start-up trials: one textbook configuration per backbone, then random ones
    return PortfolioSampler(sampler, portfolio(config, _startup_trials(config)))


def _startup_trials(config: StudyConfig) -> int:
    # Optuna's default (10) would make a 20-trial study half random; a third is enough.
    return max(4, min(10, config.search.n_trials // 3))


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    # issue 18: both pruners carry the dead-trial guard (samplers.DeadTrialGuard: pruned at
    # <= 1.5x chance from epoch 2 while another trial has left chance); "none" prunes nothing
    name, epochs = config.search.pruner, config.search.epochs
    if name == "hyperband":
        return GuardedHyperbandPruner(
            min_resource=1, max_resource=epochs, reduction_factor=3, epochs=epochs
        )
    if name == "median":
        return GuardedMedianPruner(n_startup_trials=5, n_warmup_steps=1, epochs=epochs)
    return optuna.pruners.NopPruner()


def open_study(config: StudyConfig, *, create: bool = True) -> optuna.Study:
    storage = make_storage(config)
    if create:
        return optuna.create_study(
            study_name=config.name,
            storage=storage,
            sampler=make_sampler(config),
            pruner=make_pruner(config),
            direction="maximize",
            load_if_exists=True,
        )
    try:
        return optuna.load_study(
            study_name=config.name,
            storage=storage,
            sampler=make_sampler(config),
            pruner=make_pruner(config),
        )
    except KeyError as exc:
        raise UserError(
            f"no study named {config.name!r} in {redact(config.storage_url)}; run `automl-tl search` first"
        ) from exc


# ---------------------------------------------------------------------------------------------
# data, checked against the study


def load_splits(config: StudyConfig, registry: Registry) -> Splits:
    d = config.data
    return prepare_data(
        registry,
        d.source,
        image_size=d.image_size,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=d.seed,
        base_dir=config.base_dir,
        cache_dir=config.output_dir / "cache",
        on_bad_image=d.on_bad_image,
        max_per_class=d.max_per_class,
    )


def check_data(study: optuna.Study, splits: Splits) -> None:
    """Store the data identity on a new study; refuse data that differs from a stored one."""
    summary = splits.summary()
    stored = study.user_attrs.get("data")
    if stored is None:
        study.set_user_attr("data", summary)
        return
    changes = describe_changes(stored, summary)
    if changes:
        raise DataError(
            f"the data no longer matches study {study.study_name!r}: "
            + "; ".join(changes)
            + ". Restore the original data, or give the study a new name to start over."
        )


# ---------------------------------------------------------------------------------------------
# the search


def _is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError (CPU), torch.cuda.OutOfMemoryError / torch.OutOfMemoryError, or a CUDA
    runtime error that says so."""
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or "out of memory" in str(exc).lower()
    )


def _reason(exc: BaseException) -> str:
    if _is_out_of_memory(exc):
        return f"out of memory: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _describe(params: dict[str, Any]) -> str:
    params = effective_params(params)  # issue 18: a random-init trial's own names
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


class _Interrupts:
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

    def __enter__(self) -> _Interrupts:
        import signal

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
        import signal

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


class _Search:
    def __init__(
        self,
        config: StudyConfig,
        registry: Registry,
        pm: pluggy.PluginManager,
        splits: Splits,
        device,
    ) -> None:
        self.config, self.registry, self.hook, self.splits = config, registry, pm.hook, splits
        self.device = resolve_device(device)
        self.catalog = Catalog(config.output_dir / "catalog.db")
        self.metric = config.search.metric
        self.consecutive_failures: list[str] = []
        self.stopped_for: str | None = None
        self.ran = 0
        self.started: list[int] = []  # trial numbers this process ran (or is running)
        self.budget: Budget | None = None  # the global budget, shared with other workers
        self.recorded: set[int] = set()  # ... of which after_trial saw the end
        self.interrupts = _Interrupts()

    def objective(self, trial: optuna.Trial) -> float:
        """One trial; an interrupt is recorded as its reason, memory is given back after OOM."""
        self.started.append(trial.number)  # first: an interrupt from here on fails it cleanly
        try:
            self.interrupts.deliver()  # one that came while Optuna created this trial
            trial.set_user_attr("worker", worker_identity())  # a dead worker's trial is known
            if self.budget is not None:
                self.budget.admit(trial)  # TrialSkipped when other workers covered the budget
            return self._trial(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        except TrialFailed as exc:
            if _is_out_of_memory(exc.__cause__ or exc):
                _free_memory()
            raise

    def _trial(self, trial: optuna.Trial) -> float:
        name = self.config.name
        choice = suggest(trial, self.config, self.registry)
        trial.set_user_attr("device", str(self.device))
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
            trial.set_user_attr("epochs_run", r.epoch + 1)
            if r.cached_features:  # head on cached features: not the backbone's speed
                trial.set_user_attr("feature_cache", "used")  # "hit" / "miss" once complete
            else:  # pruned trials count too in backbone_throughput()
                trial.set_user_attr("images_per_s", round(r.images_per_s, 1))
            trial.report(r.val[self.metric], r.epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {r.epoch + 1}")

        too_slow = self._too_slow(trial, choice)
        if too_slow:
            trial.set_user_attr("too_slow", too_slow)
            raise optuna.TrialPruned(too_slow)
        try:
            result = fit(
                choice,
                self.splits,
                self.registry,
                device=self.device,
                seed=self.config.data.seed + trial.number,
                on_epoch=on_epoch,
                compile=self.config.search.compile,
            )
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        except Exception as exc:
            reason = _reason(exc)
            trial.set_user_attr("fail_reason", reason)
            log.debug("trial %d failed", trial.number, exc_info=True)
            raise TrialFailed(reason) from exc
        val = {k: v for k, v in result.val.items()}
        trial.set_user_attr("seconds", round(result.seconds, 3))
        if result.feature_cache is None:
            trial.set_user_attr("images_per_s", round(result.images_per_s, 1))
        else:
            trial.set_user_attr("feature_cache", result.feature_cache)
        trial.set_user_attr("batch_size", result.batch_size)  # halved on out-of-memory
        trial.set_user_attr("val_metrics", val)
        return float(val[self.metric])

    def _too_slow(self, trial: optuna.Trial, choice) -> str | None:
        """Why ``choice`` cannot finish within ``[search] timeout`` at the training speed its
        backbone showed in earlier trials on this kind of device (None if it can)."""
        timeout = self.config.search.timeout
        if not timeout:
            return None
        rate = backbone_throughput(trial.study, device=str(self.device)).get(choice.backbone)
        if not rate:
            return None
        seconds = expected_seconds(choice, self.splits, self.registry, rate)
        if seconds <= timeout:
            return None
        return (
            f"{choice.backbone} trains at {rate:.0f} images/s here: this trial would take "
            f"~{seconds:.0f}s, more than [search] timeout = {timeout:.0f}s"
        )

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get("skipped"):  # nothing ran: the budget was covered elsewhere
            log.info("trial %3d skipped: %s", trial.number, trial.user_attrs.get("fail_reason"))
            return
        self.ran += 1
        self.recorded.add(trial.number)
        name = self.config.name
        self.catalog.record_trial(name, trial)
        self.hook.trial_finished(
            study_name=name,
            trial_number=trial.number,
            state=trial.state.name,
            value=trial.value if trial.values else None,
            attrs=dict(trial.user_attrs),
        )
        try:
            best = study.best_trial
            best_text = f"best {best.value:.4f} (#{best.number})"
        except ValueError:
            best_text = "no complete trial yet"
        if trial.state == TrialState.COMPLETE:
            outcome = f"{self.metric}={trial.value:.4f}"
        elif trial.state == TrialState.PRUNED:
            outcome = f"pruned at epoch {trial.user_attrs.get('epochs_run', '?')}"
        else:
            outcome = f"failed: {trial.user_attrs.get('fail_reason', 'unknown')}"
        duration = (
            (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete
            else 0.0
        )
        log.info(
            "trial %3d %-8s %s  %s  %.1fs  %s",
            trial.number,
            trial.state.name,
            outcome,
            _describe(trial.params),
            duration,
            best_text,
        )
        if trial.state == TrialState.FAIL:
            self.consecutive_failures.append(trial.user_attrs.get("fail_reason", "unknown"))
            limit = self.config.search.max_consecutive_failures
            if len(self.consecutive_failures) >= limit:
                from collections import Counter

                common, count = Counter(self.consecutive_failures).most_common(1)[0]
                self.stopped_for = f"{len(self.consecutive_failures)} trials in a row failed ({count} with: {common})"
                study.stop()
        else:
            self.consecutive_failures.clear()

    def interrupted(self, study: optuna.Study) -> None:
        """After Ctrl-C / SIGTERM: this process's unfinished trial ends as FAIL "interrupted"
        (Optuna has usually done so already), and the catalog and the lifecycle hooks see it."""
        storage = study._storage
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        for number in self.started:
            trial = trials.get(number)
            if trial is None or number in self.recorded:
                continue
            if trial.state == TrialState.RUNNING:
                storage.set_trial_user_attr(trial._trial_id, "fail_reason", "interrupted")
                study.tell(number, state=TrialState.FAIL)
                trial = storage.get_trial(trial._trial_id)
            if trial.user_attrs.get("fail_reason") == "interrupted":
                # a preempted trial is not a verdict on its configuration: it runs again first
                # when the search resumes (here or on another worker)
                RetryStaleTrial().queue_again(study, trial, "was interrupted")
            self.ran += 1
            self.catalog.record_trial(self.config.name, trial)
            self.hook.trial_finished(
                study_name=self.config.name,
                trial_number=number,
                state=trial.state.name,
                value=trial.value if trial.values else None,
                attrs=dict(trial.user_attrs),
            )
            log.info(
                "trial %3d %-8s interrupted  %s", number, trial.state.name, _describe(trial.params)
            )

    def sync_catalog(self, study: optuna.Study) -> None:
        """Record finished trials the catalog lacks (a worker killed between the two writes)."""
        recorded = self.catalog.trial_states(self.config.name)
        for trial in study.get_trials(deepcopy=False):
            if trial.state != TrialState.RUNNING and recorded.get(trial.number) != trial.state.name:
                self.catalog.record_trial(self.config.name, trial)


def _free_memory() -> None:
    """Give memory back after an out-of-memory trial, so the next one starts clean."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and check a file can be written there, before hours of work."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(
            f"output folder {folder} is not writable ({exc.strerror or exc}); set [search] "
            "output to a folder you can write to, or fix its permissions"
        ) from exc


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def search(
    config: StudyConfig,
    registry: Registry,
    pm: pluggy.PluginManager,
    *,
    device: str = "auto",
    retrain_best: bool = True,
) -> SearchOutcome:
    """Run (or resume) the study until ``n_trials`` trials have finished; then retrain the best."""
    check_names(config, registry)
    check_backbones_run(config, registry)
    ensure_writable(config.output_dir)
    ensure_study_weights(config, registry, device=device)  # pretrain:SOURCE, built once
    splits = load_splits(config, registry)
    study = join_study(config, splits)  # refuses to join if this worker's data differ
    runner = _Search(config, registry, pm, splits, device)
    logging.getLogger("optuna.study._optimize").addFilter(_ONE_LINE_PER_FAILURE)
    runner.catalog.record_skipped(config.name, splits.skipped)
    runner.sync_catalog(study)
    already = count_finished(study)
    budget = config.search.n_trials
    log.info(
        "study %r: %d classes, %d/%d/%d train/val/test images, %d of %d trials already finished, storage %s",
        config.name,
        len(splits.class_names),
        len(splits.train),
        len(splits.val),
        len(splits.test),
        already,
        budget,
        redact(config.storage_url),
    )
    # n_trials finished trials across every worker sharing the storage, exactly
    runner.budget = Budget(
        study,
        budget,
        url=config.storage_url,
        timeout=config.search.timeout,
        heartbeat_interval=config.search.heartbeat_interval,
    )
    if runner.budget.room():
        interrupts = runner.interrupts
        try:
            with interrupts:
                interrupts.hold(study)
                study.optimize(
                    runner.objective,
                    n_trials=None,
                    timeout=config.search.timeout,
                    catch=(TrialFailed, TrialSkipped),
                    # the last callback holds signals until the next trial is ours
                    callbacks=[runner.after_trial, runner.budget, interrupts.hold],
                    gc_after_trial=False,
                )
                interrupts.deliver()
        except KeyboardInterrupt:
            runner.interrupted(study)
            raise
    best = best_summary(study)
    note = selection_note(study)
    if note:
        log.warning("note: %s", note)
    pm.hook.study_finished(study_name=config.name, best=best, output_dir=str(config.output_dir))
    if runner.stopped_for:
        raise TooManyFailures(
            f"search stopped: {runner.stopped_for}. Completed trials are kept; fix the cause and run "
            "the same command again to resume (raise [search] max_consecutive_failures to tolerate more)."
        )
    outcome = SearchOutcome(study, count_finished(study), runner.ran, best)
    if retrain_best and best is not None:  # once per study, however many workers end here
        retrained = retrain_once(config, registry, study, splits, device=device)
        if retrained is not None:
            outcome.model_dir, outcome.metrics = retrained
            # [weights] searched: retrain each source's best too (transferred vs scratch)
            outcome.comparison = retrain_per_weights(config, registry, study, splits, device=device)
    return outcome


def best_summary(study: optuna.Study) -> dict[str, Any] | None:
    try:
        t = study.best_trial
    except ValueError:
        return None
    return {"number": t.number, "value": t.value, "params": dict(t.params)}


def selection_note(study: optuna.Study) -> str | None:
    """A warning when the validation split is too small to tell the best trials apart.

    Validation scores are fractions of ``n`` images, so one standard error of the best score
    ``p`` is about ``sqrt(p (1 - p) / n)`` (binomial; at least one image). When three or more
    complete trials lie within it of the best, picking "the best" among them is mostly chance,
    and its test score will say so; the user should know before trusting the ranking.
    """
    n = ((study.user_attrs.get("data") or {}).get("sizes") or {}).get("val")
    values = sorted(
        (
            t.value
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)
        ),
        reverse=True,
    )
    if not n or len(values) < 3:
        return None
    best = values[0]
    error = math.sqrt(max(best * (1 - best), 1 / n) / n)
    close = sum(v >= best - error for v in values)
    if close < 3:
        return None
    return (
        f"{close} trials score within one standard error (±{error:.3f}) of the best on only {n} "
        "validation images, so which of them is best is mostly chance; more validation images "
        "([data] val_fraction, or more labelled data) make the choice reliable"
    )


def check_names(config: StudyConfig, registry: Registry) -> None:
    """Every backbone, policy, strategy and the dataset are known, and every backbone takes
    the named weight sources ``[weights]`` gives it, before anything runs."""
    from .config import check_named_weights
    from .data import parse_source

    s = config.search
    for kind, names in (
        ("backbones", s.backbones),
        ("augmentation_policies", s.augmentations),
        ("unfreeze_strategies", s.unfreeze),
    ):
        for name in names:
            registry.get(kind, name)
    registry.get("datasets", parse_source(config.data.source)[0])
    check_named_weights(config, registry)
    check_space(config, registry)  # issue 18: no empty branch, no flips under fixed orientation


def check_backbones_run(config: StudyConfig, registry: Registry) -> None:
    """Each backbone takes a batch at the study's image size (before hours of failed trials)."""
    import torch

    size = config.data.image_size
    for name in config.search.backbones:
        try:
            model = (
                registry.get("backbones", name).create(2, weights="none", image_size=size).eval()
            )
            with torch.no_grad():
                model(torch.zeros(2, 3, size, size))
        except Exception as exc:
            raise UserError(
                f"backbone {name!r} cannot run at [data] image_size = {size}: {_reason(exc)}. "
                "Raise image_size or remove the backbone from [search] backbones."
            ) from exc


# ---------------------------------------------------------------------------------------------
# retrain and export


def retrain(
    config: StudyConfig,
    registry: Registry,
    *,
    trial_number: int | None = None,
    device: str = "auto",
    study: optuna.Study | None = None,
    splits: Splits | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train a finished trial's configuration afresh (from its weights, not the trial's
    checkpoint) on ``[retrain] on``, evaluate on test, export, and add it to the catalog."""
    ensure_writable(config.output_dir)
    study = study or open_study(config, create=False)
    if splits is None:
        splits = load_splits(config, registry)
        check_data(study, splits)
    if trial_number is None:
        try:
            trial = study.best_trial
        except ValueError as exc:
            raise UserError(f"study {config.name!r} has no complete trial to retrain yet") from exc
        directory = config.output_dir / "best"
    else:
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        if trial_number not in trials or not trials[trial_number].params:
            raise UserError(
                f"study {config.name!r} has no trial {trial_number}; see `automl-tl report`"
            )
        trial = trials[trial_number]
        directory = config.output_dir / "models" / f"trial-{trial_number}"
    choice = choice_from_params(trial.params, config)
    ensure_study_weights(config, registry, device=device)
    device_t = resolve_device(device)
    on = config.retrain.on
    log.info("retraining trial %d on %s: %s", trial.number, on, _describe(trial.params))
    started = time.perf_counter()
    result = fit(
        choice,
        splits,
        registry,
        device=device_t,
        seed=config.data.seed + trial.number,
        train_on=on,
        evaluate_on=None,
    )
    num_classes = len(splits.class_names)
    test = evaluate(result.model, splits.test, num_classes, result.data_config, device_t)
    if on == "train":
        val = evaluate(result.model, splits.val, num_classes, result.data_config, device_t)
    else:
        val = dict(trial.user_attrs.get("val_metrics") or {})
    metrics = {
        "study": config.name,
        "trial": trial.number,
        "metric": config.search.metric,
        "params": dict(trial.params),
        "retrained_on": on,
        "epochs": choice.epochs,
        "seconds": round(time.perf_counter() - started, 3),
        "val": val,
        "test": test,
        "data": splits.summary(),
    }
    digest = export_model(
        result.model, result.backbone, directory, splits.class_names, result.data_config, metrics
    )
    Catalog(config.output_dir / "catalog.db").record_model(
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


# ---------------------------------------------------------------------------------------------
# report


def backbone_throughput(study: optuna.Study, device: str | None = None) -> dict[str, float]:
    """Median training images/s per backbone over finished trials (on ``device`` if given).

    Trials whose head trained on cached features are left out: their speed is not the
    backbone's.
    """
    import statistics

    rates: dict[str, list[float]] = {}
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        rate, backbone = t.user_attrs.get("images_per_s"), t.params.get("backbone")
        if not rate or backbone is None or t.user_attrs.get("feature_cache"):
            continue
        if device is not None and t.user_attrs.get("device") != device:
            continue
        rates.setdefault(backbone, []).append(float(rate))
    return {b: round(statistics.median(r), 1) for b, r in sorted(rates.items())}


def report(config: StudyConfig) -> dict[str, Any]:
    """The leaderboard of every trial as plain data (``automl-tl report --format json``)."""
    study = open_study(config, create=False)
    trials = []
    for t in study.get_trials(deepcopy=False):
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        value = t.value if t.values else None
        if value is not None and not math.isfinite(value):
            value = None
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": value,
                "params": dict(t.params),
                "duration_s": round(duration, 3) if duration is not None else None,
                "epochs_run": t.user_attrs.get("epochs_run"),
                "fail_reason": t.user_attrs.get("fail_reason"),
                "images_per_s": t.user_attrs.get("images_per_s"),
                "batch_size": t.user_attrs.get("batch_size"),
            }
        )
    out = {
        "study": config.name,
        "metric": config.search.metric,
        "best": best_summary(study),
        "trials": trials,
        "throughput": backbone_throughput(study),  # training images/s per backbone
        "selection_note": selection_note(study),  # a validation split too small to rank by
        # issue 18: trials the dead-trial guard pruned at chance (samplers.DeadTrialGuard)
        "dead_at_chance": sum(
            DEAD_AT_CHANCE in t.user_attrs for t in study.get_trials(deepcopy=False)
        ),
    }
    catalog_path = config.output_dir / "catalog.db"
    if catalog_path.is_file():
        out["skipped_images"] = Catalog(catalog_path).skipped(config.name)
    metrics_path = config.output_dir / "best" / "metrics.json"
    if metrics_path.is_file():
        import json

        m = json.loads(metrics_path.read_text())
        out["best_model"] = {
            "path": str(metrics_path.parent),
            "trial": m.get("trial"),
            "test": {k: v for k, v in m.get("test", {}).items() if k != "confusion_matrix"},
        }
    rows = comparison(config, study)  # transferred vs scratch, when [weights] is searched
    if rows is not None:
        out["weights"] = rows
    return out
