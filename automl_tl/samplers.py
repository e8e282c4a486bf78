"""Samplers and pruners of a search: the study's sampler (TPE, GP or random) wrapped by what
automl-tl adds — the default portfolio first, weight sources taking turns, the cheapest of
several TPE proposals under a timeout (:class:`CostAwareSampler`) — and the pruner.

Each wrapper is a :class:`WrappingSampler` that forwards every call to the sampler it wraps
and overrides only what it changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import optuna

from .config import METRICS, StudyConfig
from .portfolio import portfolio
from .prior import Prior, study_params
from .storage import set_trial_attr, storage_of
from .trials import (
    DEAD_AT_CHANCE,
    EPOCHS_RUN,
    FINISHED,
    PRIOR,
    SECONDS,
    SKIPPED,
    TOO_SLOW,
    Direction,
    duration,
    trial_constraints,
)


class WrappingSampler(optuna.samplers.BaseSampler):
    """Forwards every call to ``base``; a subclass overrides the calls it changes."""

    def __init__(self, base: optuna.samplers.BaseSampler) -> None:
        self.base = base

    def infer_relative_search_space(self, study, trial):
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


class PortfolioSampler(WrappingSampler):
    """``base``, except that trial *n* < ``len(entries)`` takes ``entries[n]``.

    A parameter an entry does not name (``weights``, a plugin's own) comes from ``base``; a
    value its distribution does not allow (a study that changed its space) too. Every trial,
    the portfolio's included, reaches ``base``'s ``before_trial`` / ``after_trial``.
    """

    def __init__(self, base: optuna.samplers.BaseSampler, entries: list[dict[str, Any]]) -> None:
        super().__init__(base)
        self.entries = list(entries)

    def _entry(self, trial) -> dict[str, Any] | None:
        return self.entries[trial.number] if trial.number < len(self.entries) else None

    def infer_relative_search_space(self, study, trial):
        if self._entry(trial) is not None:
            return {}
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        if self._entry(trial) is not None:
            return {}
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        entry = self._entry(trial)
        if entry is not None and param_name in entry:
            value = entry[param_name]
            if _allowed(param_distribution, value):
                return value
        return self.base.sample_independent(study, trial, param_name, param_distribution)


class PriorSampler(PortfolioSampler):
    """A :class:`PortfolioSampler` whose entries come from the team prior
    (:mod:`automl_tl.prior`): trial *n* < ``len(labels)`` carries the attribute ``prior`` (where
    its configuration came from), so the leaderboard and report can say so."""

    def __init__(
        self, base: optuna.samplers.BaseSampler, entries: list[dict[str, Any]], labels: list[str]
    ) -> None:
        super().__init__(base, entries)
        self.labels = list(labels)

    def before_trial(self, study, trial) -> None:
        if trial.number < len(self.labels) and PRIOR not in trial.user_attrs:
            set_trial_attr(study, trial, PRIOR, self.labels[trial.number])
        super().before_trial(study, trial)


def prior_entries(
    config: StudyConfig, prior: Prior, size: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """The first ``size`` start-up trials' parameters with a prior: its portfolio, then (when
    it found fewer configurations) the default portfolio's for the slots left; and the label
    of each prior entry."""
    entries = [study_params(config, e.params, n) for n, e in enumerate(prior.entries[:size])]
    labels = [e.label(n + 1) for n, e in enumerate(prior.entries[:size])]
    covered = {e["backbone"] for e in entries}
    for entry in portfolio(config, size):
        if len(entries) >= size:
            break
        if entry["backbone"] not in covered:
            entries.append(entry)
    return entries, labels


def _allowed(distribution: optuna.distributions.BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return value in distribution.choices
    if isinstance(distribution, optuna.distributions.FloatDistribution):
        return (
            isinstance(value, (int, float))
            and math.isfinite(value)
            and distribution.low <= value <= distribution.high
        )
    return False


class AlternatingSampler(WrappingSampler):
    """``base`` samples every parameter but ``param``, which cycles through ``choices``.

    Trial *n* gets ``choices[n % len(choices)]``, so each choice gets every k-th trial of the
    budget, with any number of workers. ``base`` never models ``param`` (it is left out of
    its relative search space) but learns from every trial's other parameters.
    """

    def __init__(self, base: optuna.samplers.BaseSampler, param: str, choices: list) -> None:
        super().__init__(base)
        self.param, self.choices = param, list(choices)

    def infer_relative_search_space(self, study, trial):
        space = self.base.infer_relative_search_space(study, trial)
        return {name: d for name, d in space.items() if name != self.param}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name == self.param:
            return self.choices[trial.number % len(self.choices)]
        return self.base.sample_independent(study, trial, param_name, param_distribution)


# ---------------------------------------------------------------------------------------------
# cost awareness (issue 12): the cheapest of several TPE proposals under a timeout

#: TPE proposals a cost-aware trial chooses from (benchmarks/search.py, method "tpe/s")
COST_PROPOSALS = 4


class CostModel:
    """Predicted seconds per epoch of a configuration, fitted on the study's finished trials.

    A log-linear least-squares fit: log(seconds per epoch) = intercept + a term per backbone,
    per unfreeze strategy (``unfreeze`` or ``unfreeze_scratch``) + b x ``unfreeze_depth`` (the
    trained fraction; 1.0 when the trial has none) + c x 2 log(``image_size``) (when the
    size is searched). Batch size and epochs are the study's own, the same for every trial.
    The minimum-norm solution (``numpy.linalg.lstsq``) keeps it defined with fewer trials
    than terms; a backbone or strategy it has not seen gets no term of its own. Predictions
    stay within 4x of the fastest and slowest seconds per epoch seen.
    """

    def __init__(self, columns: list[str], coef: np.ndarray, means: np.ndarray, bounds) -> None:
        self.columns, self.coef, self.means, self.bounds = columns, coef, means, bounds

    @staticmethod
    def _features(params: dict[str, Any]) -> dict[str, float]:
        out = {"1": 1.0}
        if "backbone" in params:
            out[f"backbone={params['backbone']}"] = 1.0
        for name in ("unfreeze", "unfreeze_scratch"):
            if name in params:
                out[f"unfreeze={params[name]}"] = 1.0
        scratch = "unfreeze_scratch" in params
        depth = 1.0 if scratch else params.get("unfreeze_depth")
        if isinstance(depth, (int, float)):
            out["depth"] = float(depth)
        size = params.get("image_size")
        if isinstance(size, (int, float)) and size > 0:
            out["log_pixels"] = 2.0 * math.log(size)
        return out

    @classmethod
    def fit(cls, observations: Iterable[tuple[dict[str, Any], float]]) -> CostModel | None:
        """From (params, seconds per epoch) pairs; None with fewer than two, or when every
        one took the same time (nothing to prefer)."""
        rows = [(cls._features(p), s) for p, s in observations if s > 0 and math.isfinite(s)]
        if len(rows) < 2:
            return None
        y = np.log([s for _, s in rows])
        if np.ptp(y) == 0.0:
            return None
        columns = sorted({c for f, _ in rows for c in f})
        numeric = [c for c in columns if "=" not in c and c != "1"]
        means = {c: float(np.mean([f[c] for f, _ in rows if c in f])) for c in numeric}
        x = np.array([[f.get(c, means.get(c, 0.0)) for c in columns] for f, _ in rows])
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        bounds = (float(y.min()) - math.log(4.0), float(y.max()) + math.log(4.0))
        return cls(columns, coef, np.array([means.get(c, 0.0) for c in columns]), bounds)

    def predict(self, params: dict[str, Any], epochs: float = 1.0) -> float:
        """Seconds of ``epochs`` epochs of ``params`` (a numeric term it lacks: the mean)."""
        f = self._features(params)
        x = np.array(
            [f.get(c, self.means[i] if "=" not in c else 0.0) for i, c in enumerate(self.columns)]
        )
        log_s = min(max(float(x @ self.coef), self.bounds[0]), self.bounds[1])
        return math.exp(log_s) * epochs


def observed_costs(
    trials: Iterable[optuna.trial.FrozenTrial],
) -> list[tuple[dict[str, Any], float]]:
    """(params, seconds per epoch) of each finished trial that trained: a complete trial's
    ``seconds`` attribute (else its duration) over its epochs run; a pruned one's duration
    over the epochs it ran (its set-up counts in, so it reads a little slow). Trials skipped
    or pruned before training (``too_slow``) are left out."""
    out = []
    for t in trials:
        attrs = t.user_attrs
        epochs = attrs.get(EPOCHS_RUN)
        if t.state not in FINISHED or attrs.get(SKIPPED) or attrs.get(TOO_SLOW) or not epochs:
            continue
        seconds = attrs.get(SECONDS) if t.state == optuna.trial.TrialState.COMPLETE else None
        seconds = seconds if seconds is not None else duration(t)
        if seconds is not None and seconds > 0:
            out.append((dict(t.params), float(seconds) / float(epochs)))
    return out


class CostAwareSampler(WrappingSampler):
    """``base`` (TPE), except that once it models (after its start-up), each trial draws
    ``proposals`` configurations from it (TPE's ``sample_relative`` called again: each is
    TPE's best of its own candidates under its acquisition, with its seeded generator) and
    keeps the one the :class:`CostModel` of the study's finished trials predicts cheapest
    (ties: the earlier proposal). TPE's acquisition values are not public, so this is "the
    cheapest of several proposals TPE rates best", not expected improvement divided by
    seconds. Every proposal is TPE's own, so the space can produce it; multivariate, grouped
    and constant-liar sampling stay TPE's. Until the model can be fitted (fewer than two
    trials with seconds, or all equally fast) it is plain TPE: one proposal, the same random
    draws. With several workers, another worker's constant liar may see this trial at the last
    proposal rather than the chosen one until the trial suggests its parameters (Optuna then
    reads the trial's own)."""

    def __init__(self, base: optuna.samplers.BaseSampler, proposals: int = COST_PROPOSALS) -> None:
        super().__init__(base)
        self.proposals = proposals

    def sample_relative(self, study, trial, search_space):
        first = self.base.sample_relative(study, trial, search_space)
        if not first or self.proposals < 2:
            return first  # TPE's start-up (random, sampled independently) or nothing to choose
        model = CostModel.fit(observed_costs(study.get_trials(deepcopy=False, states=FINISHED)))
        if model is None:
            return first
        candidates = [first]
        for _ in range(self.proposals - 1):
            candidates.append(self.base.sample_relative(study, trial, search_space))
        costs = [model.predict(c) for c in candidates]
        return candidates[min(range(len(candidates)), key=lambda i: (costs[i], i))]


def cost_aware(config: StudyConfig, deadline: bool = False) -> bool:
    """Whether the study's TPE prefers cheaper proposals: ``[search] cost_aware`` true, or
    "auto" (the default) with a ``[search] timeout`` or a ``deadline`` (``--deadline``, a
    Slurm job's end); only single-objective TPE studies."""
    s = config.search
    if s.sampler != "tpe" or s.multi_objective:
        return False
    if s.cost_aware == "auto":
        return s.timeout is not None or deadline
    return bool(s.cost_aware)


def alternate_weights(
    config: StudyConfig, sampler: optuna.samplers.BaseSampler
) -> optuna.samplers.BaseSampler:
    """``sampler``, wrapped so a searched ``weights`` source takes turns (else unchanged)."""
    for backbone in config.search.backbones:
        choices = config.weight_choices(backbone)
        if choices:  # every list in [weights] is the same list (config.py checks)
            return AlternatingSampler(sampler, "weights", choices)
    return sampler


def pruner_warning(config: StudyConfig) -> str | None:
    """Why the study's pruner is not used (a multi-objective study), or makes a searched
    weight source's comparison unfair, if it does."""
    if config.search.multi_objective and config.search.pruner != "none":
        return (
            f'[search] pruner = "{config.search.pruner}" is not used: Optuna prunes only '
            "single-objective studies, so every trial of this multi-objective study "
            f"({', '.join(config.search.objectives)}) runs all its epochs"
        )
    if config.searches_weights() and config.search.pruner != "none":
        return (
            f'[search] pruner = "{config.search.pruner}" compares trials of every weight '
            "source at equal epochs, where pretrained ones lead early: it cuts scratch "
            'trials short and flatters transfer. Set pruner = "none" for an even '
            "comparison."
        )
    return None


def startup_trials(config: StudyConfig) -> int:
    """The model-based sampler's random start-up: a third of the budget, 4 to 10 trials
    (Optuna's default of 10 would make a 20-trial study half random)."""
    return max(4, min(10, config.search.n_trials // 3))


def make_sampler(
    config: StudyConfig, prior: Prior | None = None, deadline: bool = False
) -> optuna.samplers.BaseSampler:
    """The study's sampler: TPE (multivariate, grouped, constant liar), GP, NSGA-II or
    random (TPE and NSGA-II also for a multi-objective study); with TPE/GP/NSGA-II the default
    portfolio first (``[search] portfolio``); with a team ``prior`` (any sampler) its
    portfolio instead, in every start-up slot, so the model-based sampler models from the
    prior's trials rather than random ones; ``[search] constraints`` as Optuna's
    ``constraints_func``; TPE cost-aware under a timeout or a ``deadline``
    (``[search] cost_aware``); a searched ``[weights]`` source takes turns."""
    if prior is not None and prior.entries:
        entries, labels = prior_entries(config, prior, startup_trials(config))
        base = _base_sampler(config, len(entries), deadline)
        return alternate_weights(config, PriorSampler(base, entries, labels))
    sampler = _base_sampler(config, startup_trials(config), deadline)
    if config.search.sampler != "random" and config.search.portfolio:
        # the first start-up trials: one textbook configuration per backbone, then random
        sampler = PortfolioSampler(sampler, portfolio(config, startup_trials(config)))
    return alternate_weights(config, sampler)


def _base_sampler(
    config: StudyConfig, n_startup: int, deadline: bool = False
) -> optuna.samplers.BaseSampler:
    """Random, NSGA-II (a population of ``n_startup``), GP or TPE with ``n_startup`` start-up
    trials, with ``[search] constraints`` on Optuna < 5; TPE cost-aware (:func:`cost_aware`)."""
    seed, name = config.data.seed, config.search.sampler
    # [search] constraints: Optuna >= 5 reads what the objective set (Trial.set_constraint);
    # before, a constraints_func reads them back from the trial (trials.CONSTRAINTS)
    old_api = not hasattr(optuna.trial.Trial, "set_constraint")
    constraints = (
        {"constraints_func": trial_constraints} if config.search.constraints and old_api else {}
    )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":  # a population per generation: the start-up's size
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=n_startup, **constraints)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup, **constraints)
    tpe = optuna.samplers.TPESampler(
        multivariate=True,
        group=True,
        constant_liar=True,
        seed=seed,
        n_startup_trials=n_startup,
        **constraints,
    )
    return CostAwareSampler(tpe) if cost_aware(config, deadline) else tpe


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    """Hyperband over epochs (default), median, or none; the first two with the dead-trial
    guard (:class:`DeadTrialGuard`: pruned at <= 1.5x chance from epoch 2 while another trial
    has left chance) when ``[search] metric`` is a built-in one, whose chance level is known.
    Both prune in the study's direction (a lower-is-better plugin metric is minimized) and
    neither prunes a trial the team prior chose (:class:`SparePrior`) but by the guard."""
    name, epochs = config.search.pruner, config.search.epochs
    if config.search.multi_objective:  # Optuna prunes single-objective studies only
        return optuna.pruners.NopPruner()
    guarded = config.search.metric in METRICS  # a plugin's metric: no chance level to guard
    extra = {"epochs": epochs} if guarded else {}
    if name == "hyperband":
        hyperband = GuardedHyperbandPruner if guarded else PriorSparingHyperbandPruner
        return hyperband(min_resource=1, max_resource=epochs, reduction_factor=3, **extra)
    if name == "median":
        median = GuardedMedianPruner if guarded else PriorSparingMedianPruner
        return median(n_startup_trials=5, n_warmup_steps=1, **extra)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------------------------
# the team prior's trials run their epochs (issue 12)


class SparePrior:
    """Mixed into a pruner class: a trial whose configuration the team prior chose (the
    attribute ``prior``, set by :class:`PriorSampler`) is never pruned by the base pruner; it
    runs all its epochs and still counts as a competitor for the others. The prior's entries
    are the few configurations earlier studies give evidence for; judged at epoch 1 against
    each other, a full fine-tune at a high learning rate (often what wins, and slow to start)
    is cut, and what the prior knew is lost. On the tabular benchmark (benchmarks/RESULTS.md)
    sparing them cut the prior's misses from 32 to 11 of 600 runs at the same speed run by
    run. Without a prior, no trial has the attribute: nothing changes. The dead-trial guard,
    when mixed in before this, still applies to them."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if from_prior(study, trial):
            return False
        return super().prune(study, trial)  # type: ignore[misc]


def from_prior(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the team prior chose ``trial``. Read from the storage: the copy Optuna gives a
    pruner is the one it cached when the trial was created, before the sampler's
    ``before_trial`` set the attribute."""
    if PRIOR in trial.user_attrs:
        return True
    return PRIOR in storage_of(study).get_trial(trial._trial_id).user_attrs


class PriorSparingHyperbandPruner(SparePrior, optuna.pruners.HyperbandPruner):
    """Optuna's ``HyperbandPruner`` (same arguments) that spares the prior's trials."""


class PriorSparingMedianPruner(SparePrior, optuna.pruners.MedianPruner):
    """Optuna's ``MedianPruner`` (same arguments) that spares the prior's trials."""


# ---------------------------------------------------------------------------------------------
# the dead-trial guard (issue 18)


class DeadTrialGuard:
    """Prunes a trial still at chance after its first epochs while others have left chance.

    Mixed into a pruner class (:class:`GuardedHyperbandPruner`, :class:`GuardedMedianPruner`),
    so that Optuna still sees a ``HyperbandPruner`` (its samplers then model each bracket's
    trials, as without the guard). The rule, checked at each report from epoch ``after`` on
    (default 2), except the last epoch, which completes the trial as usual:

    - the trial's score is at most ``factor`` × chance (default 1.5 × 1 / classes: for 10
      classes, accuracy <= 0.15), and
    - some other trial of the study has clearly learned: reported a score above
      :meth:`clear`, twice that line or halfway from it to a perfect score, whichever is
      lower (10 classes: 0.3; 6 classes: 0.5; 2 classes: 0.875).

    On a task where every trial learns slowly, none has clearly learned, and a trial at chance
    at epoch 2 may be the slow start of the best one: the guard leaves them all to the base
    pruner. (Before, any trial just past the line armed it: on the search benchmark's
    textures task, where the best configuration ends at 0.31 on 6 classes after 0.22 at epoch
    2, it would have cut 118 of the 120 configurations, the best included; issue 12.)

    Then it is pruned, with the attribute ``dead_at_chance`` = the epoch; ``report`` counts
    them. A trial from random init with a frozen body, or a learning rate that diverged, stays
    there; a slow starter that has left chance by epoch 2 is not touched. Until the study knows
    its classes (``user_attrs["data"]``, stored when a search starts) the guard does nothing;
    in a multi-label study, where chance is no fraction of the labels, it does nothing either.
    The base pruner is asked first.
    """

    def _guard(self, epochs: int, after: int = 2, factor: float = 1.5) -> None:
        self.guard_epochs, self.guard_after, self.guard_factor = epochs, after, factor

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if super().prune(study, trial):  # type: ignore[misc]
            return True
        return self.dead(study, trial)

    def threshold(self, study: optuna.Study) -> float | None:
        data = study.user_attrs.get("data") or {}
        if data.get("task") == "multilabel":  # chance is no 1 / classes there (mAP: the
            return None  # labels' prevalence; subset accuracy: ~0): no guard
        if not Direction.of(study).higher_is_better:  # "chance" is a low accuracy-like score
            return None
        classes = data.get("classes") or []
        return self.guard_factor / len(classes) if len(classes) >= 2 else None

    @staticmethod
    def clear(limit: float) -> float:
        """The score another trial must pass for a trial at ``limit`` or below to count as
        dead: ``min(2 limit, (limit + 1) / 2)``, always above ``limit`` and below 1."""
        return min(2.0 * limit, (limit + 1.0) / 2.0)

    def dead(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or not (self.guard_after <= step < self.guard_epochs):
            return False
        limit = self.threshold(study)
        if limit is None or trial.intermediate_values[step] > limit:
            return False
        bar = self.clear(limit)
        states = (
            optuna.trial.TrialState.COMPLETE,
            optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.RUNNING,
        )
        left = any(
            t.number != trial.number and any(v > bar for v in t.intermediate_values.values())
            for t in study.get_trials(deepcopy=False, states=states)
        )
        if left:  # a pruner gets a frozen trial: the attribute goes through the storage
            set_trial_attr(study, trial, DEAD_AT_CHANCE, step)
        return left


class GuardedHyperbandPruner(DeadTrialGuard, PriorSparingHyperbandPruner):
    """Optuna's ``HyperbandPruner`` (same arguments) with the :class:`DeadTrialGuard`, sparing
    the prior's trials (:class:`SparePrior`)."""

    def __init__(self, *args, epochs: int, after: int = 2, factor: float = 1.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._guard(epochs, after, factor)


class GuardedMedianPruner(DeadTrialGuard, PriorSparingMedianPruner):
    """Optuna's ``MedianPruner`` (same arguments) with the :class:`DeadTrialGuard`, sparing
    the prior's trials (:class:`SparePrior`)."""

    def __init__(self, *args, epochs: int, after: int = 2, factor: float = 1.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._guard(epochs, after, factor)
