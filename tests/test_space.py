"""The conditional search space (automl_tl/space.py), orientation-safe augmentation and the
dead-trial guard (automl_tl/samplers.py): issue 18."""

import math

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from automl_tl import AugmentationPolicy, ConfigError, UserError, config_from_dict
from automl_tl.cli import _format_data_check
from automl_tl.data import check_source, looks_orientation_sensitive
from automl_tl.portfolio import portfolio
from automl_tl.samplers import GuardedHyperbandPruner, GuardedMedianPruner, make_pruner
from automl_tl.space import (
    FINETUNE_LR,
    check_space,
    choice_from_params,
    effective_params,
    suggest,
)
from automl_tl.testing import check_policy_orientation, check_strategy
from automl_tl.trials import DEAD_AT_CHANCE

from .conftest import run_cli, write_study

ALL_STRATEGIES = ["top_k", "gradual", "lp_ft", "layer_decay"]


def _config(weights="none", data=None, **search):
    return config_from_dict(
        {
            "name": "s",
            "data": data or {},
            "search": {"unfreeze": ALL_STRATEGIES, **search},
            "weights": {"default": weights},
        }
    )


def _trials(config, registry, n=24):
    """(params, Choice) of ``n`` random trials of the study's space (nothing trains)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for i in range(n):
        trial = study.ask()
        choice = suggest(trial, config, registry)
        out.append((dict(trial.params), choice))
        study.tell(trial, float(i % 5))
    return out


def test_random_init_trials_train_the_whole_body(registry):
    for params, choice in _trials(_config("none"), registry):
        assert "unfreeze_depth" not in params and "unfreeze" not in params
        assert params["unfreeze_scratch"] == "top_k"  # the only from_scratch built-in
        assert choice.unfreeze == "top_k" and choice.unfreeze_depth == 1.0
        assert "lr" in params and "lr_finetune" not in params
        assert 1e-4 <= choice.lr <= 1e-2  # [search] lr's default range


def test_pretrained_trials_search_the_whole_space_at_a_lower_lr(registry):
    trials = _trials(_config("timm"), registry, 30)
    strategies = {p["unfreeze"] for p, _ in trials}
    assert strategies == set(ALL_STRATEGIES)
    for params, choice in trials:
        assert "unfreeze_scratch" not in params and 0 <= params["unfreeze_depth"] <= 1
        assert "lr" not in params and FINETUNE_LR[0] <= params["lr_finetune"] <= FINETUNE_LR[1]
        assert choice.lr == params["lr_finetune"]


def test_a_study_that_sets_lr_keeps_one_lr_for_both_sources(registry):
    config = _config(["pretrain:digits:0-4", "none"], lr=[1e-3, 2e-3], pruner="none")
    for params, choice in _trials(config, registry, 8):
        assert "lr_finetune" not in params and 1e-3 <= choice.lr <= 2e-3
        scratch = params["weights"] == "none"
        assert ("unfreeze_scratch" in params) == scratch
        assert ("unfreeze_depth" in params) == (not scratch)


def test_unfreeze_depth_can_be_narrowed_for_pretrained_trials(registry):
    config = _config("timm", unfreeze_depth=[0.5, 0.5])
    assert all(p["unfreeze_depth"] == 0.5 for p, _ in _trials(config, registry, 5))


def test_stored_params_of_both_forms_rebuild_the_choice():
    config = _config("none")
    old = {  # a study from before the conditional space
        "backbone": "test_resnet",
        "augmentation": "none",
        "unfreeze": "gradual",
        "unfreeze_depth": 0.25,
        "lr": 1e-3,
        "weight_decay": 1e-4,
    }
    choice = choice_from_params(old, config)
    assert (choice.unfreeze, choice.unfreeze_depth, choice.lr) == ("gradual", 0.25, 1e-3)
    new = {**old, "unfreeze_scratch": "top_k"}
    del new["unfreeze"], new["unfreeze_depth"]
    choice = choice_from_params(new, config)
    assert (choice.unfreeze, choice.unfreeze_depth) == ("top_k", 1.0)
    tuned = {**old, "lr_finetune": 3e-4}
    del tuned["lr"]
    assert choice_from_params(tuned, config).lr == 3e-4
    assert effective_params(new)["unfreeze"] == "top_k" and "unfreeze_scratch" not in (
        effective_params(new)
    )
    with pytest.raises(UserError, match="lack"):
        choice_from_params({"backbone": "test_resnet"}, config)


def test_the_portfolio_follows_the_branches():
    scratch = portfolio(_config("none"), 1)[0]
    assert scratch["unfreeze_scratch"] == "top_k" and "unfreeze_depth" not in scratch
    assert math.isclose(scratch["lr"], 1e-3)
    tuned = portfolio(_config("timm"), 1)[0]
    assert tuned["unfreeze"] == "lp_ft" and tuned["unfreeze_depth"] == 1.0
    assert math.isclose(tuned["lr_finetune"], 3e-4)  # the centre of the fine-tuning range
    fixed = portfolio(_config("none", data={"orientation": "fixed"}), 1)[0]
    assert fixed["augmentation"] == "crop" and fixed["aug_strength"] == 0.5


def test_built_in_strategies_declare_whether_they_train_from_scratch(registry):
    declared = {
        n: registry.get("unfreeze_strategies", n).from_scratch
        for n in registry.names("unfreeze_strategies")
    }
    assert declared == {
        "top_k": True,
        "gradual": False,
        "lp_ft": False,
        "layer_decay": False,
        "bitfit": False,
        "norm_fit": False,
        "lora": False,
    }


def test_contract_catches_a_freezing_strategy_that_claims_from_scratch(registry):
    gradual = type(registry.get("unfreeze_strategies", "gradual"))()
    gradual.from_scratch = True
    with pytest.raises(AssertionError, match="declares from_scratch = True"):
        check_strategy(gradual)


# ---------------------------------------------------------------------------------------------
# bad input


def test_no_strategy_from_scratch_is_refused(registry):
    config = _config("none", unfreeze=["lp_ft", "gradual"])
    with pytest.raises(ConfigError, match=r'no strategy that trains from random init.*add "top_k"'):
        check_space(config, registry)
    check_space(_config("timm", unfreeze=["lp_ft"]), registry)  # nothing starts from scratch


def test_unfreeze_depth_for_scratch_only_backbones_is_refused():
    with pytest.raises(ConfigError, match=r"unfreeze_depth .* has no effect: every backbone"):
        _config("none", unfreeze_depth=[0.2, 0.4])
    _config(["none", "timm"], unfreeze_depth=[0.2, 0.4])  # pretrained trials use it
    with pytest.raises(ConfigError, match=r"both ends must lie in \[0, 1\]"):
        _config("timm", unfreeze_depth=[0.2, 1.5])


def test_unknown_orientation_is_refused():
    with pytest.raises(ConfigError, match=r"\[data\] orientation = 'upright' is not allowed"):
        _config(data={"orientation": "upright"})


def test_fixed_orientation_swaps_the_default_flip_and_refuses_a_listed_one(registry):
    config = _config(data={"orientation": "fixed"})
    assert config.search.augmentations == ["none", "crop", "randaugment", "trivialaugment"]
    check_space(config, registry)
    listed = _config(data={"orientation": "fixed"}, augmentations=["none", "flip_crop"])
    with pytest.raises(ConfigError, match=r"'flip_crop', which flips images.*use a policy"):
        check_space(listed, registry)
    check_space(_config(augmentations=["flip_crop"]), registry)  # free: anything goes


class _SecretFlip(AugmentationPolicy):
    """Declares no geometry (the defaults) but mirrors half the images."""

    name = "secret_flip"

    def build(self, strength, image_size):
        class Flip(nn.Module):
            def forward(self, x):
                flip = torch.rand(x.shape[0]) < 0.5 * strength
                return torch.where(flip[:, None, None, None], x.flip(-1), x)

        return nn.Identity() if strength == 0 else Flip()


def test_contract_catches_a_policy_that_flips_while_declared_safe(registry):
    with pytest.raises(AssertionError, match=r"secret_flip.* came out mirrored"):
        check_policy_orientation(_SecretFlip())
    honest = _SecretFlip()
    honest.flips = True  # declared: no longer orientation-safe, nothing to check
    check_policy_orientation(honest)
    for name in registry.names("augmentation_policies"):  # the built-ins' declarations hold
        check_policy_orientation(registry.get("augmentation_policies", name))


def test_search_refuses_a_declared_safe_policy_that_flips(registry):
    registry.add("augmentation_policies", _SecretFlip(), "test")
    try:
        config = _config(data={"orientation": "fixed"}, augmentations=["secret_flip"])
        with pytest.raises(UserError, match=r"'secret_flip' declares .* but mirrored"):
            check_space(config, registry)
    finally:
        del registry.tables["augmentation_policies"]["secret_flip"]


@pytest.mark.slow  # a CLI process each (~5 s)
@pytest.mark.parametrize(
    "data, search, message",
    [
        ('orientation = "sideways"', "", "[data] orientation = 'sideways' is not allowed"),
        ('orientation = "fixed"', 'augmentations = ["flip_crop"]', "which flips images"),
        ("", 'unfreeze = ["lp_ft"]', "no strategy that trains from random init"),
        ("", "unfreeze_depth = [0.5, 0.5]", "has no effect: every backbone"),
    ],
)
def test_the_cli_says_what_is_wrong_and_exits_2(tmp_path, data, search, message):
    study = write_study(
        tmp_path,
        f"""
        [data]
        source = "digits"
        {data}
        [search]
        n_trials = 1
        backbones = ["test_resnet"]
        {search}
        """,
    )
    result = run_cli("search", str(study), "--no-retrain")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "tiny" / "optuna.db").exists()  # refused before anything ran


# ---------------------------------------------------------------------------------------------
# check-data


def test_check_data_suggests_fixed_orientation_for_digits(registry, tmp_path):
    assert looks_orientation_sensitive(["0", "1", "7"])
    assert looks_orientation_sensitive(["digit_3", "letter-B"])
    assert not looks_orientation_sensitive(["cat", "dog"])
    assert not looks_orientation_sensitive(["class_1", "class_2"])
    found = check_source(registry, "digits:0-2", image_size=8, base_dir=tmp_path)
    assert any('orientation = "fixed"' in s for s in found.suggestions)
    assert "suggestions:" in _format_data_check(found) and found.to_dict()["suggestions"]
    fixed = check_source(
        registry, "digits:0-2", image_size=8, base_dir=tmp_path, orientation="fixed"
    )
    assert not fixed.suggestions


# ---------------------------------------------------------------------------------------------
# the dead-trial guard


def _guarded_study(pruner, classes=10):
    study = optuna.create_study(direction="maximize", pruner=pruner)
    study.set_user_attr("data", {"classes": [str(i) for i in range(classes)]})
    return study


def _report(study, values):
    """A trial reporting ``values`` per epoch; returns (pruned at step or None, trial)."""
    trial = study.ask()
    for step, value in enumerate(values, start=1):
        trial.report(value, step)
        if trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return step, study.trials[trial.number]
    study.tell(trial, values[-1])
    return None, study.trials[trial.number]


def test_a_trial_at_chance_is_pruned_from_epoch_2_once_another_left_chance():
    # the base never prunes here (no start-up ends), so only the guard acts
    study = _guarded_study(GuardedMedianPruner(n_startup_trials=100, epochs=5))
    # alone at chance: nothing to compare with, it runs to the end
    assert _report(study, [0.1, 0.1, 0.1, 0.1, 0.1])[0] is None
    assert _report(study, [0.3, 0.6, 0.8, 0.9, 0.9])[0] is None  # left chance
    step, trial = _report(study, [0.1, 0.12, 0.1, 0.1, 0.1])  # 0.12 <= 1.5 / 10
    assert step == 2 and trial.user_attrs[DEAD_AT_CHANCE] == 2
    assert _report(study, [0.1, 0.16, 0.1, 0.1, 0.1])[0] == 3  # left at 2, back at 3
    assert _report(study, [0.1, 0.2, 0.3, 0.4, 0.5])[0] is None  # a slow starter
    late = _report(study, [0.2, 0.2, 0.2, 0.2, 0.1])  # at chance only at the last epoch
    assert late[0] is None and DEAD_AT_CHANCE not in late[1].user_attrs


def test_the_guard_waits_until_another_trial_has_clearly_learned():
    # 6 classes: the line is 0.25, "clearly learned" is above 0.5 (twice the line)
    study = _guarded_study(GuardedMedianPruner(n_startup_trials=100, epochs=5), classes=6)
    assert _report(study, [0.2, 0.3, 0.35, 0.4, 0.45])[0] is None  # past the line, slowly
    # a hard task: nobody has clearly learned, so a trial at chance may be a slow start
    slow = _report(study, [0.17, 0.22, 0.26, 0.3, 0.31])
    assert slow[0] is None and DEAD_AT_CHANCE not in slow[1].user_attrs
    assert _report(study, [0.3, 0.45, 0.55, 0.7, 0.8])[0] is None  # clearly learned
    assert _report(study, [0.17, 0.22, 0.26, 0.3, 0.31])[0] == 2  # now it is behind
    assert [GuardedMedianPruner.clear(1.5 / c) for c in (10, 6, 2)] == pytest.approx(
        [0.3, 0.5, 0.875]
    )


def test_the_guard_waits_for_the_class_count():
    study = optuna.create_study(direction="maximize", pruner=GuardedMedianPruner(epochs=4))
    _report(study, [0.9, 0.9, 0.9, 0.9])
    assert _report(study, [0.0, 0.0, 0.0, 0.0])[0] is None  # classes unknown: no rule


def test_the_study_pruners_carry_the_guard():
    hyperband = make_pruner(_config(pruner="hyperband", epochs=6))
    assert isinstance(hyperband, GuardedHyperbandPruner)
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)  # samplers see brackets
    assert isinstance(make_pruner(_config(pruner="median")), GuardedMedianPruner)
    assert isinstance(make_pruner(_config(pruner="none")), optuna.pruners.NopPruner)
    study = _guarded_study(hyperband)
    _report(study, [0.5] * 6)
    assert _report(study, [0.1] * 6)[0] is not None
