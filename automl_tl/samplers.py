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
