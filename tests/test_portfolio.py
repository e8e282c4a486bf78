"""[search] portfolio: the model-based sampler's first trials are one textbook configuration
per backbone (automl_tl/portfolio.py), then its random start-up and the model as before."""

import math

import optuna
import pytest

from automl_tl import ConfigError, config_from_dict, registry_for
from automl_tl.portfolio import portfolio
from automl_tl.samplers import AlternatingSampler, PortfolioSampler, make_sampler
from automl_tl.space import suggest

SPACE = {
    "backbones": ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"],
    "augmentations": ["none", "flip_crop", "randaugment"],
    "unfreeze": ["top_k", "gradual"],
    "lr": [3e-4, 3e-2],
    "weight_decay": [1e-6, 1e-2],
}


REGISTRY = registry_for()


def _config(**search):
    return config_from_dict({"name": "p", "search": {**SPACE, "n_trials": 12, **search}})


def _params(config, n):
    """The parameters of the first ``n`` trials the study's sampler gives (no training)."""
    study = optuna.create_study(sampler=make_sampler(config), direction="maximize")
    for i in range(n):
        trial = study.ask()
        suggest(trial, config, REGISTRY)
        study.tell(trial, float(i % 3))
    return [t.params for t in study.trials]


def test_the_flag_is_on_by_default_and_checked():
    assert config_from_dict({"name": "x"}).search.portfolio is True
    assert _config(portfolio=False).search.portfolio is False
    with pytest.raises(ConfigError, match=r"\[search\] portfolio must be true or false"):
        config_from_dict({"name": "x", "search": {"portfolio": "yes"}})


def test_the_default_study_starts_with_the_textbook_recipe():
    entries = portfolio(config_from_dict({"name": "x"}), 10)
    assert [e["backbone"] for e in entries] == ["test_resnet", "test_efficientnet", "test_convnext"]
    for e in entries:  # default ranges: their log-centres are AdamW's textbook values
        assert math.isclose(e["lr"], 1e-3) and math.isclose(e["weight_decay"], 1e-4)
        assert e["augmentation"] == "flip_crop" and e["aug_strength"] == 0.5
        # random init: full training, in the space's random-init branch (no depth)
        assert e["unfreeze_scratch"] == "top_k" and "unfreeze_depth" not in e
        assert "unfreeze" not in e


def test_entries_follow_the_study_space():
    entries = portfolio(_config(augmentations=["randaugment", "color"], unfreeze=["lp_ft"]), 2)
    assert [e["backbone"] for e in entries] == ["test_resnet", "test_efficientnet"]  # size 2
    assert entries[0]["augmentation"] == "randaugment"  # no flip_crop, no none: the first
    assert entries[0]["unfreeze_scratch"] == "top_k"  # not searched: the base sampler decides
    assert math.isclose(entries[0]["lr"], 3e-3)  # the log-centre of [3e-4, 3e-2]
    tuned = _config(unfreeze=["lp_ft"])
    tuned.weights = {"default": "timm"}
    assert portfolio(tuned, 1)[0]["unfreeze"] == "lp_ft"
    none = portfolio(_config(augmentations=["randaugment", "none"]), 1)[0]
    assert none["augmentation"] == "none" and "aug_strength" not in none


def test_tpe_runs_the_portfolio_first_then_its_own_trials():
    config = _config()
    params = _params(config, 7)
    entries = portfolio(config, 4)  # n_trials 12: a start-up of 4 trials, 4 backbones
    assert params[:4] == entries
    assert all(p not in entries for p in params[4:])
    off = _params(_config(portfolio=False), 4)
    assert all(p not in entries for p in off)
    assert _params(_config(sampler="random"), 4) == _params(
        _config(sampler="random", portfolio=False), 4
    )  # random search stays random search


def test_portfolio_is_capped_by_the_startup_and_wraps_searched_weights():
    config = config_from_dict(
        {
            "name": "w",
            "search": {
                **SPACE,
                "n_trials": 3,
                "backbones": [f"b{i}" for i in range(6)],
                "pruner": "none",
            },
            "weights": {"default": ["none", "pretrain:digits:0-4"]},
        }
    )
    sampler = make_sampler(config)
    assert isinstance(sampler, AlternatingSampler) and isinstance(sampler.base, PortfolioSampler)
    assert len(sampler.base.entries) == 4  # the start-up's size, not one per listed backbone
    params = _params(config, 4)
    assert [p["weights"] for p in params] == ["none", "pretrain:digits:0-4"] * 2
    assert [p["backbone"] for p in params] == ["b0", "b1", "b2", "b3"]


def test_a_value_outside_the_distribution_comes_from_the_base_sampler():
    """An entry value the distribution cannot hold is not used (nor clipped into it): the
    base sampler's own value is, exactly what the base sampler alone gives."""

    def first(sampler):
        trial = optuna.create_study(sampler=sampler).ask()
        return trial.suggest_float("x", 0, 1), trial.suggest_categorical("c", ["a", "b"])

    entries = [{"x": 5.0, "c": "z"}]
    portfolio_first = first(PortfolioSampler(optuna.samplers.RandomSampler(seed=0), entries))
    assert portfolio_first == first(optuna.samplers.RandomSampler(seed=0))
    inside = first(PortfolioSampler(optuna.samplers.RandomSampler(seed=0), [{"x": 0.25, "c": "b"}]))
    assert inside == (0.25, "b")  # one the distribution holds is used


def test_pretrained_weights_start_from_lp_ft_at_a_lower_lr():
    """From pretrained weights the recipe is a linear probe then full fine-tuning, with the lr a
    third of the way up its range; a searched source gives each entry its trial's source."""
    config = config_from_dict(
        {
            "name": "t",
            "search": {**SPACE, "unfreeze": ["top_k", "lp_ft"], "n_trials": 12, "pruner": "none"},
            "weights": {"default": ["pretrain:digits:0-4", "none"]},
        }
    )
    entries = portfolio(config, 4)
    pretrained, scratch = entries[0], entries[1]  # trials 0, 2: pretrained; 1, 3: none
    assert pretrained["unfreeze"] == "lp_ft" and pretrained["unfreeze_depth"] == 1.0
    assert math.isclose(pretrained["lr"], (3e-4**2 * 3e-2) ** (1 / 3))  # ~1.4e-3
    assert scratch["unfreeze_scratch"] == "top_k" and math.isclose(scratch["lr"], 3e-3)
    assert entries[2]["unfreeze"] == "lp_ft" and entries[3]["unfreeze_scratch"] == "top_k"
    params = _params(config, 4)
    assert [p["weights"] for p in params] == ["pretrain:digits:0-4", "none"] * 2
    assert [{k: v for k, v in p.items() if k != "weights"} for p in params] == entries

    fixed = portfolio(config_from_dict({"name": "f", "weights": {"default": "timm"}}), 1)[0]
    assert fixed["unfreeze"] == "lp_ft"
    # no [search] lr: the fine-tuning range's own parameter, at its log-centre
    assert "lr" not in fixed and math.isclose(fixed["lr_finetune"], 3e-4)
    no_lp_ft = {"name": "f", "search": {"unfreeze": ["gradual", "top_k"]}}
    no_lp_ft["weights"] = {"default": "timm"}
    assert portfolio(config_from_dict(no_lp_ft), 1)[0]["unfreeze"] == "top_k"  # full fine-tuning


def test_reading_a_study_does_not_warn_as_a_search_does(tmp_path):
    """The pruner warning of a searched weight source belongs to the search; report and the
    live display open the study read-only, without the search's sampler."""
    import warnings

    from automl_tl.samplers import pruner_warning
    from automl_tl.storage import open_study

    config = config_from_dict(
        {
            "name": "w",
            "search": {"output": str(tmp_path), "backbones": ["test_resnet"]},
            "weights": {"default": ["timm", "none"]},
        }
    )
    assert "cuts scratch trials short" in pruner_warning(config)
    optuna.create_study(study_name="w", storage=config.storage_url)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        study = open_study(config)
    assert study.study_name == "w"
