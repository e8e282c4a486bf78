"""A sampler that wraps the study's sampler and changes only what it says it changes."""

from __future__ import annotations

import optuna


class WrappingSampler(optuna.samplers.BaseSampler):
    """Forwards every call to ``base``; a subclass overrides the calls it changes.

    :class:`automl_tl.portfolio.PortfolioSampler` (the default start-up configurations) and
    :class:`automl_tl.transfer.AlternatingSampler` (weight sources taking turns) are two.
    """

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


# ---------------------------------------------------------------------------------------------
# the dead-trial guard (issue 18)

#: the user attribute a trial pruned by the guard carries: the epoch it was pruned after
DEAD_AT_CHANCE = "dead_at_chance"


class DeadTrialGuard:
    """Prunes a trial still at chance after its first epochs while others have left chance.

    Mixed into a pruner class (:class:`GuardedHyperbandPruner`, :class:`GuardedMedianPruner`),
    so that Optuna still sees a ``HyperbandPruner`` (its samplers then model each bracket's
    trials, as without the guard). The rule, checked at each report from epoch ``after`` on
    (default 2), except the last epoch, which completes the trial as usual:

    - the trial's score is at most ``factor`` × chance (default 1.5 × 1 / classes: for 10
      classes, accuracy <= 0.15), and
    - some other trial of the study has reported a score above that.

    Then it is pruned, with the attribute ``dead_at_chance`` = the epoch; ``report`` counts
    them. A trial from random init with a frozen body, or a learning rate that diverged, stays
    there; a slow starter that has left chance by epoch 2 is not touched. Until the study knows
    its classes (``user_attrs["data"]``, stored when a search starts) the guard does nothing.
    The base pruner is asked first.
    """

    def _guard(self, epochs: int, after: int = 2, factor: float = 1.5) -> None:
        self.guard_epochs, self.guard_after, self.guard_factor = epochs, after, factor

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if super().prune(study, trial):  # type: ignore[misc]
            return True
        return self.dead(study, trial)

    def threshold(self, study: optuna.Study) -> float | None:
        classes = ((study.user_attrs.get("data") or {}).get("classes")) or []
        return self.guard_factor / len(classes) if len(classes) >= 2 else None

    def dead(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or not (self.guard_after <= step < self.guard_epochs):
            return False
        limit = self.threshold(study)
        if limit is None or trial.intermediate_values[step] > limit:
            return False
        states = (
            optuna.trial.TrialState.COMPLETE,
            optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.RUNNING,
        )
        left = any(
            t.number != trial.number and any(v > limit for v in t.intermediate_values.values())
            for t in study.get_trials(deepcopy=False, states=states)
        )
        if left:
            # a pruner gets a frozen trial; the storage is where its attributes live
            study._storage.set_trial_user_attr(trial._trial_id, DEAD_AT_CHANCE, step)
        return left


class GuardedHyperbandPruner(DeadTrialGuard, optuna.pruners.HyperbandPruner):
    """Optuna's ``HyperbandPruner`` (same arguments) with the :class:`DeadTrialGuard`."""

    def __init__(self, *args, epochs: int, after: int = 2, factor: float = 1.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._guard(epochs, after, factor)


class GuardedMedianPruner(DeadTrialGuard, optuna.pruners.MedianPruner):
    """Optuna's ``MedianPruner`` (same arguments) with the :class:`DeadTrialGuard`."""

    def __init__(self, *args, epochs: int, after: int = 2, factor: float = 1.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._guard(epochs, after, factor)
