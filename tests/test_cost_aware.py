"""Cost awareness without a prior (issue 12): under ``[search] timeout`` TPE keeps the
cheapest of several of its own proposals, by a cost model of the study's finished trials
(automl_tl/samplers.py: CostModel, observed_costs, CostAwareSampler)."""

import datetime
import math

import optuna
import pytest

from automl_tl import ConfigError, config_from_dict, registry_for
from automl_tl.samplers import (
    CostAwareSampler,
    CostModel,
    make_sampler,
    observed_costs,
)
from automl_tl.space import suggest
from automl_tl.trials import EPOCHS_RUN, SECONDS, SKIPPED, TOO_SLOW

from .conftest import run_main, write_study

BACKBONE = optuna.distributions.CategoricalDistribution(["a", "b"])
UNFREEZE = optuna.distributions.CategoricalDistribution(["top_k", "lp_ft"])
DEPTH = optuna.distributions.FloatDistribution(0.0, 1.0)
SPACE = {"backbone": BACKBONE, "unfreeze": UNFREEZE, "unfreeze_depth": DEPTH}
START = datetime.datetime(2026, 12, 1, 2, 0, 0)


def _trial(number, state, params, seconds=None, epochs=None, took=None, **attrs):
    """A finished trial: ``seconds`` (attribute), ``epochs`` run, ``took`` (its duration)."""
    user_attrs = dict(attrs)
    if seconds is not None:
        user_attrs[SECONDS] = seconds
    if epochs is not None:
        user_attrs[EPOCHS_RUN] = epochs
    return optuna.trial.FrozenTrial(
        number=number,
        state=state,
        value=0.5 if state == optuna.trial.TrialState.COMPLETE else None,
        datetime_start=START,
        datetime_complete=START + datetime.timedelta(seconds=took or 1.0),
        params=params,
        distributions={k: SPACE[k] for k in params},
        user_attrs=user_attrs,
        system_attrs={},
        intermediate_values={},
        trial_id=number,
    )


def _p(backbone, unfreeze, depth):
    return {"backbone": backbone, "unfreeze": unfreeze, "unfreeze_depth": depth}


COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
# seconds per epoch = 0.1 x (1 for a, 3 for b) x (1 for top_k, 2 for lp_ft) x 4 ** depth
DESIGNED = [
    _trial(0, COMPLETE, _p("a", "top_k", 0.0), seconds=0.5, epochs=5, took=9.0),  # 0.1 / epoch
    _trial(1, COMPLETE, _p("a", "top_k", 1.0), seconds=2.0, epochs=5),  # 0.4
    _trial(2, PRUNED, _p("b", "top_k", 0.5), epochs=2, took=1.2),  # 0.6, from its duration
    _trial(3, COMPLETE, _p("a", "lp_ft", 0.5), seconds=2.0, epochs=5),  # 0.4
    # none of these counts: skipped, pruned before training, and pruned with no epoch run
    _trial(4, PRUNED, _p("b", "lp_ft", 1.0), epochs=1, took=500.0, **{SKIPPED: True}),
    _trial(5, PRUNED, _p("b", "lp_ft", 1.0), epochs=1, took=500.0, **{TOO_SLOW: "slow"}),
    _trial(6, PRUNED, _p("b", "lp_ft", 1.0), took=500.0),
]


def test_the_cost_model_predicts_a_designed_study_exactly():
    observed = observed_costs(DESIGNED)
    assert [round(s, 9) for _, s in observed] == [0.1, 0.4, 0.6, 0.4]
    model = CostModel.fit(observed)
    # a combination no trial ran: b (3x), lp_ft (2x), depth 0.5 (2x): 1.2 s per epoch
    assert model.predict(_p("b", "lp_ft", 0.5), epochs=5) == pytest.approx(6.0, rel=1e-9)
    assert model.predict(_p("b", "top_k", 1.0)) == pytest.approx(1.2, rel=1e-9)
    assert model.predict(_p("a", "top_k", 0.25)) == pytest.approx(0.1 * math.sqrt(2), rel=1e-9)
    # nothing to learn from: one trial, or every trial equally fast
    assert CostModel.fit(observed[:1]) is None
    assert CostModel.fit([(_p("a", "top_k", 0.0), 1.0), (_p("b", "lp_ft", 1.0), 1.0)]) is None


class Proposals(optuna.samplers.BaseSampler):
    """A base sampler whose relative proposals are ``proposals`` in turn (TPE's role)."""

    def __init__(self, proposals):
        self.proposals, self.calls = proposals, 0

    def infer_relative_search_space(self, study, trial):
        return dict(SPACE)

    def sample_relative(self, study, trial, search_space):
        self.calls += 1
        return dict(self.proposals[(self.calls - 1) % len(self.proposals)])

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise AssertionError(f"{param_name} should come from the relative proposal")


def _ask(sampler, trials):
    study = optuna.create_study(sampler=sampler, direction="maximize")
    for t in trials:
        study.add_trial(t)
    trial = study.ask()
    return {
        name: trial.suggest_categorical(name, d.choices)
        for name, d in SPACE.items()
        if name != "unfreeze_depth"
    } | {"unfreeze_depth": trial.suggest_float("unfreeze_depth", 0.0, 1.0)}


@pytest.mark.parametrize("order", [0, 1])
def test_the_cheaper_of_two_equally_likely_proposals_runs(order):
    cheap, dear = _p("a", "top_k", 0.5), _p("b", "lp_ft", 0.5)  # 0.2 vs 1.2 s per epoch
    proposals = [cheap, dear] if order == 0 else [dear, cheap]
    base = Proposals(proposals)
    assert _ask(CostAwareSampler(base, proposals=2), DESIGNED[:4]) == cheap
    assert base.calls == 2
    # no seconds known yet: TPE's own first proposal, asked once (plain TPE)
    base = Proposals(proposals)
    assert _ask(CostAwareSampler(base, proposals=2), []) == proposals[0]
    assert base.calls == 1


SEARCH = {
    "backbones": ["test_resnet", "test_efficientnet", "test_convnext"],
    "augmentations": ["none", "flip_crop"],
    "unfreeze": ["top_k", "lp_ft"],
    "n_trials": 12,
}


def _config(**search):
    return config_from_dict({"name": "c", "search": {**SEARCH, **search}})


def _chain(sampler):
    out = [type(sampler).__name__]
    while hasattr(sampler, "base"):
        sampler = sampler.base
        out.append(type(sampler).__name__)
    return out


def test_on_under_a_timeout_when_auto_and_as_the_key_says():
    assert _config().search.cost_aware == "auto"
    assert "CostAwareSampler" not in _chain(make_sampler(_config()))
    assert _chain(make_sampler(_config(timeout=600))) == [
        "PortfolioSampler",
        "CostAwareSampler",
        "TPESampler",
    ]
    assert "CostAwareSampler" not in _chain(make_sampler(_config(timeout=600, cost_aware=False)))
    assert "CostAwareSampler" in _chain(make_sampler(_config(cost_aware=True)))
    # a --deadline (or a Slurm job's end) counts as a time budget too
    assert "CostAwareSampler" in _chain(make_sampler(_config(), deadline=True))
    assert "CostAwareSampler" not in _chain(make_sampler(_config(cost_aware=False), deadline=True))
    # auto never applies to another sampler
    assert _chain(make_sampler(_config(timeout=600, sampler="random"))) == ["RandomSampler"]


def _search(config, n):
    """``n`` trials of the real space with made-up seconds (test_convnext 10x test_resnet):
    the parameters and the seconds per epoch each trial got."""
    registry = registry_for()
    speed = {"test_resnet": 1.0, "test_efficientnet": 3.0, "test_convnext": 10.0}
    study = optuna.create_study(sampler=make_sampler(config), direction="maximize")
    for i in range(n):
        trial = study.ask()
        choice = suggest(trial, config, registry)
        trial.set_user_attr(SECONDS, speed[choice.backbone] * (1 + choice.unfreeze_depth) * 5)
        trial.set_user_attr(EPOCHS_RUN, 5)
        study.tell(trial, math.sin(i) + choice.lr)
    return [t.params for t in study.trials]


def test_a_cost_aware_search_is_reproducible_and_plain_tpe_during_its_start_up():
    config = _config(timeout=600, portfolio=False)
    first = _search(config, 9)
    assert _search(config, 9) == first
    plain = _search(_config(timeout=600, portfolio=False, cost_aware=False), 9)
    assert plain[:4] == first[:4]  # the random start-up (4 trials) is TPE's own
    assert plain[4:] != first[4:]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"yes"', "[search] cost_aware must be \"auto\", true or false, got a string 'yes'"),
        ("1", '[search] cost_aware must be "auto", true or false, got an integer 1'),
    ],
)
def test_a_bad_cost_aware_is_one_message(tmp_path, value, message):
    path = write_study(tmp_path, f"[search]\ncost_aware = {value}\n")
    result = run_main("search", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "tiny").exists()  # no study, no trial


def test_cost_aware_true_needs_single_objective_tpe():
    with pytest.raises(ConfigError, match='not to sampler = "random"; set sampler = "tpe"'):
        _config(cost_aware=True, sampler="random")
