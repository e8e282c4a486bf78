"""The fine-tuning recipe (automl_tl/recipe.py): regularizers as searched dimensions, the
answer to class imbalance, and their bad input (issue 14, part A)."""

import dataclasses
import sqlite3

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F

from automl_tl import Choice, ConfigError, config_from_dict, fit, registry_for
from automl_tl.data import Split, prepare_data
from automl_tl.portfolio import portfolio
from automl_tl.recipe import (
    BatchMixer,
    Recipe,
    RecipeLoss,
    balanced_order,
    class_weights,
    imbalance_ratio,
    logit_offsets,
    resolve_imbalance,
    training_loss,
    warmup_steps,
    weight_average,
)
from automl_tl.space import check_recipe, choice_from_params, suggest
from automl_tl.train import create_model

from .conftest import run_main, write_study
from .test_bad_inputs import STUDY
from .test_plugin_models import PLUGIN


@pytest.fixture(scope="module")
def few(registry):
    """96 training and 48 validation images of three digits at 16 px: quick to train."""
    data = prepare_data(registry, "digits:0-2", image_size=16, seed=0)

    def first(split, n):
        return Split(split.x[:n], split.y[:n], split.names[:n])

    return dataclasses.replace(data, train=first(data.train, 96), val=first(data.val, 48))


# ---------------------------------------------------------------------------------------------
# losses and imbalance


def test_plain_loss_is_torch_cross_entropy_exactly():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    loss = training_loss(Recipe(), "none", [2, 2, 2, 2])
    assert torch.equal(loss(logits, y), F.cross_entropy(logits, y))


def test_weighted_loss_on_soft_targets_matches_torch_on_one_hot():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 3), torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])
    counts = [6, 1, 1]
    weight = class_weights(counts)
    assert weight.tolist() == pytest.approx([3 / 13, 18 / 13, 18 / 13])  # 1/count, mean 1
    loss = training_loss(Recipe(), "weighted", counts)
    expected = F.cross_entropy(logits, y, weight=weight)
    assert loss(logits, y) == pytest.approx(float(expected), rel=1e-6)
    assert loss(logits, F.one_hot(y, 3).float()) == pytest.approx(float(expected), rel=1e-6)


def test_focal_loss_down_weights_easy_examples():
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 0])
    focal = training_loss(Recipe(), "focal", [1, 1])
    p = torch.softmax(logits, 1)[:, 0]
    expected = (-((1 - p) ** 2) * p.log()).mean()
    assert focal(logits, y) == pytest.approx(float(expected), rel=1e-6)
    assert RecipeLoss(2, gamma=0.0)(logits, y) == pytest.approx(float(F.cross_entropy(logits, y)))


def test_label_smoothing_on_hard_and_mixed_targets():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    recipe = Recipe(label_smoothing=0.1, mixup_alpha=0.2)
    loss = training_loss(recipe, "none", [1] * 5)
    expected = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert loss(logits, y) == pytest.approx(float(expected), rel=1e-5)


def test_logit_adjusted_loss_is_cross_entropy_of_shifted_logits_by_hand():
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, -1.0]])
    y = torch.tensor([1, 2])
    counts = [6, 3, 1]  # prior 0.6, 0.3, 0.1
    offset = logit_offsets(counts)
    assert offset.tolist() == pytest.approx([np.log(0.6), np.log(0.3), np.log(0.1)], rel=1e-6)
    # by hand: -log softmax(z + log π)[y] = -log(π_y e^{z_y} / Σ_j π_j e^{z_j})
    e = np.e
    row0 = -np.log(0.3 * 1 / (0.6 * e + 0.3 + 0.1))
    row1 = -np.log(0.1 * e**-1 / (0.6 + 0.3 * e**2 + 0.1 * e**-1))
    loss = training_loss(Recipe(), "logit_adjust", counts)
    assert float(loss(logits, y)) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # soft targets (a mixed batch) take the same shift; one-hot rows give the same loss
    mixed = training_loss(Recipe(mixup_alpha=0.2), "logit_adjust", counts)
    assert float(mixed(logits, F.one_hot(y, 3).float())) == pytest.approx((row0 + row1) / 2)
    # a balanced split shifts every logit alike: the plain loss
    even = training_loss(Recipe(), "logit_adjust", [4, 4, 4])
    assert float(even(logits, y)) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert torch.isfinite(logit_offsets([5, 0, 1])).all()  # an empty class: still finite


def test_logit_adjustment_moves_predictions_towards_the_small_classes():
    """On a tiny imbalanced set of overlapping classes, a linear model trained with plain
    cross entropy predicts the large class almost everywhere; the logit-adjusted loss (plain
    logits at prediction) predicts the small classes more often and raises the balanced
    accuracy on a balanced test set drawn from the same classes."""
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])

    def draw(n_per_class):
        x = torch.cat(
            [means[c] + torch.randn(n, 2, generator=gen) for c, n in enumerate(n_per_class)]
        )
        return x, torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])

    x, y = draw([200, 10, 10])
    test_x, test_y = draw([300, 300, 300])

    def train(imbalance):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 3)
        loss_fn = training_loss(Recipe(), imbalance, [200, 10, 10])
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(300):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            pred = model(test_x).argmax(1)
        recall = [float((pred[test_y == c] == c).float().mean()) for c in range(3)]
        return float((pred != 0).float().mean()), sum(recall) / 3

    small_plain, balanced_plain = train("none")
    small_adjusted, balanced_adjusted = train("logit_adjust")
    assert small_adjusted > small_plain + 0.2
    assert balanced_adjusted > balanced_plain + 0.1


def test_imbalance_rule_is_five_times():
    assert imbalance_ratio([10, 2]) == 5.0
    assert resolve_imbalance("auto", [10, 2]) == "logit_adjust"
    assert resolve_imbalance("auto", [9, 2]) == "none"
    assert resolve_imbalance("focal", [9, 2]) == "focal"  # a chosen answer is kept


def test_balanced_sampler_draws_classes_equally():
    y = torch.tensor([0] * 90 + [1] * 10)
    order = balanced_order(y, 2, torch.Generator().manual_seed(0))
    assert len(order) == 100
    share = float((y[order] == 1).float().mean())
    assert 0.35 < share < 0.65  # 0.1 without the sampler


def test_warmup_epochs():
    assert warmup_steps(Recipe(), 10, 50) == 5  # a tenth of the steps, as before
    assert warmup_steps(Recipe(warmup_epochs=2.0), 10, 50) == 20
    assert warmup_steps(Recipe(warmup_epochs=0.0), 10, 50) == 1


# ---------------------------------------------------------------------------------------------
# mixing


def test_mixer_is_seeded_mixes_odd_batches_and_leaves_numpy_alone():
    torch.manual_seed(0)
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    recipe = Recipe(mixup_alpha=1.0, label_smoothing=0.1)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a_x, a_t = BatchMixer(recipe, 3, seed=7)(x.clone(), y)
    b_x, b_t = BatchMixer(recipe, 3, seed=7)(x.clone(), y)
    assert np.array_equal(np.random.get_state()[1], before)  # the global generator untouched
    assert torch.equal(a_x, b_x) and torch.equal(a_t, b_t)
    assert a_t.shape == (5, 3) and torch.allclose(a_t.sum(1), torch.ones(5))
    assert not torch.equal(a_x[:4], x[:4])  # mixed
    assert torch.equal(a_x[4], x[4])  # the odd one out is left as it is, smoothed one-hot
    assert a_t[4].tolist() == pytest.approx([0.1 / 3, 1 - 0.1 + 0.1 / 3, 0.1 / 3])


# ---------------------------------------------------------------------------------------------
# fit with the recipe


@pytest.mark.slow
def test_fit_with_every_regularizer_is_deterministic(registry, few):
    recipe = Recipe(
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        label_smoothing=0.1,
        ema_decay=0.9,
        drop_path=0.1,
        clip_grad=1.0,
        warmup_epochs=0.5,
        imbalance="sampler",
    )
    choice = Choice(backbone="test_resnet", lr=3e-3, epochs=1, batch_size=32, recipe=recipe)
    a = fit(choice, few, registry, device="cpu", seed=1)
    b = fit(choice, few, registry, device="cpu", seed=1)
    assert [h.train_loss for h in a.history] == [h.train_loss for h in b.history]
    assert a.val == b.val and a.ema_won == b.ema_won and a.ema_won is not None
    assert a.imbalance == "sampler"


def test_ema_model_is_kept_when_it_scores_better(registry, few):
    choice = Choice(
        backbone="test_resnet", lr=3e-3, epochs=1, batch_size=32, recipe=Recipe(ema_decay=0.9)
    )
    raw = fit(choice, few, registry, device="cpu", seed=0, use_ema=False)
    scored = fit(choice, few, registry, device="cpu", seed=0)
    assert raw.ema_won is None and scored.ema_won is not None
    # the same training run, the raw model's score or the better average's
    if scored.ema_won:
        assert scored.val["accuracy"] > raw.val["accuracy"]
        raw_state = raw.model.state_dict()
        assert any(not torch.equal(v, raw_state[k]) for k, v in scored.model.state_dict().items())
    else:
        assert scored.val == raw.val


def test_drop_path_reaches_backbones_that_take_it(registry, tmp_path):
    backbone = registry.get("backbones", "test_vit")
    assert "drop_path" in backbone.regularizers()
    choice = Choice(backbone="test_vit", recipe=Recipe(drop_path=0.2))
    model = create_model(backbone, choice, 3, 32)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    (tmp_path / "team_backbone.py").write_text(PLUGIN)
    team = registry_for([str(tmp_path / "team_backbone.py")])
    plain = team.get("backbones", "team_cnn")
    assert plain.regularizers() == frozenset()  # says nothing: created as before
    assert create_model(plain, Choice(backbone="team_cnn", recipe=Recipe(drop_path=0.2)), 3, 16)


def test_imbalanced_train_split_gets_the_logit_adjusted_loss(registry, few):
    keep = torch.cat(
        [torch.nonzero(few.train.y == c).flatten()[: 30 if c == 0 else 5] for c in (0, 1, 2)]
    )
    data = dataclasses.replace(few, train=Split(few.train.x[keep], few.train.y[keep], []))
    choice = Choice(backbone="test_resnet", lr=3e-3, epochs=1, batch_size=32)
    assert fit(choice, data, registry, device="cpu", seed=0).imbalance == "logit_adjust"
    assert fit(choice, few, registry, device="cpu", seed=0, evaluate_on=None).imbalance == "none"


# ---------------------------------------------------------------------------------------------
# the space and the portfolio


def _config(**search):
    base = {"backbones": ["test_resnet"], "unfreeze": ["top_k"], "augmentations": ["none"]}
    return config_from_dict({"name": "r", "search": {**base, **search}})


def test_closed_recipe_adds_no_parameter(registry):
    study = optuna.create_study()
    trial = study.ask()
    choice = suggest(trial, _config(), registry)
    assert set(trial.params) == {
        "backbone",
        "augmentation",
        "unfreeze_scratch",
        "lr",
        "weight_decay",
    }
    assert choice.recipe == Recipe()


def test_opened_recipe_is_searched_and_rebuilt_for_retrain(registry):
    config = _config(
        mixup_alpha=[0.1, 0.4],
        cutmix_alpha=1.0,  # one number: fixed, not a parameter
        mix_prob=[0.0, 1.0],
        label_smoothing=[0.0, 0.2],
        ema_decay=[0.9, 0.99],
        drop_path=[0.0, 0.3],
        clip_grad=[0.5, 5.0],
        warmup_epochs=[0, 2],
        imbalance=["none", "focal"],
        epochs=10,  # not a short schedule: the portfolio's usual values
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    choice = suggest(trial, config, registry)
    expected = {"mixup_alpha", "mix_prob", "label_smoothing", "ema_decay", "drop_path"}
    expected |= {"clip_grad", "warmup_epochs", "imbalance"}
    assert expected <= set(trial.params) and "cutmix_alpha" not in trial.params
    assert "mix_switch_prob" not in trial.params  # fixed at 0.5 unless the study sets it
    assert choice.recipe.cutmix_alpha == 1.0 and choice.recipe.mix_switch_prob == 0.5
    assert 0.1 <= choice.recipe.mixup_alpha <= 0.4
    assert choice_from_params(dict(trial.params), config).recipe == choice.recipe
    entry = portfolio(config, 1)[0]
    assert entry["mixup_alpha"] == 0.2 and entry["label_smoothing"] == 0.1
    assert entry["ema_decay"] == 0.99 and entry["clip_grad"] == 1.0  # clamped into the range
    assert entry["warmup_epochs"] == 1.0 and entry["imbalance"] == "none"
    for listed, first in (
        (["none", "weighted", "logit_adjust"], "logit_adjust"),  # the rule's answer
        (["none", "focal", "weighted"], "weighted"),
        (["sampler", "focal"], "sampler"),
    ):
        assert portfolio(_config(imbalance=listed), 1)[0]["imbalance"] == first


def test_ema_decay_above_the_warm_up_cap_changes_nothing_on_a_short_trial():
    """timm's warm-up caps the decay at step t at 1 - (1 + t)^(-2/3): over 20 steps (cap
    0.87) decays of 0.9 and 0.999 average alike (the README's advice to fix it), while
    decays under the cap differ."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    averages = {d: weight_average(model, Recipe(ema_decay=d)) for d in (0.5, 0.9, 0.999)}
    for step in range(20):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        for ema in averages.values():
            ema.update(model, step=step)
    weight = {d: ema.module.weight for d, ema in averages.items()}
    assert torch.equal(weight[0.9], weight[0.999])
    assert not torch.allclose(weight[0.5], weight[0.9])
    assert 1 - (1 + 19) ** (-2 / 3) < 0.9


def test_a_short_schedule_starts_the_portfolio_without_mixing_or_drop_path():
    """Below 10 epochs (portfolio.SHORT_SCHEDULE_EPOCHS) the entry starts mild: mixing and
    drop-path at the low end of their ranges; smoothing and EMA as timm's usual values."""
    space = {
        "mixup_alpha": [0.1, 0.4],
        "mix_prob": [0.0, 1.0],
        "drop_path": [0.0, 0.3],
        "label_smoothing": [0.0, 0.2],
        "ema_decay": [0.9, 0.999],
    }
    short = portfolio(_config(epochs=9, **space), 1)[0]
    assert {k: short[k] for k in space} == {
        "mixup_alpha": 0.1,  # 0 is outside the range: its low end
        "mix_prob": 0.0,
        "drop_path": 0.0,
        "label_smoothing": 0.1,
        "ema_decay": 0.998,
    }
    long = portfolio(_config(epochs=10, **space), 1)[0]
    assert {k: long[k] for k in space} == {
        "mixup_alpha": 0.2,
        "mix_prob": 1.0,
        "drop_path": 0.1,
        "label_smoothing": 0.1,
        "ema_decay": 0.998,
    }


def test_drop_path_is_a_note_for_a_backbone_without_it(tmp_path):
    (tmp_path / "team_backbone.py").write_text(PLUGIN)
    registry = registry_for([str(tmp_path / "team_backbone.py")])
    config = _config(drop_path=[0.0, 0.2], backbones=["team_cnn", "test_resnet"])
    assert check_recipe(config, registry) == [
        "team_cnn takes no drop-path rate: its trials train without drop-path ([search] drop_path)"
    ]
    with pytest.raises(ConfigError, match=r"no backbone of \[search\] backbones takes a drop-path"):
        check_recipe(_config(drop_path=[0.0, 0.2], backbones=["team_cnn"]), registry)


# ---------------------------------------------------------------------------------------------
# bad input: one message naming the key and the fix, exit 2, no trial

BAD_RECIPES = {
    "mixup alpha 0": (
        "mixup_alpha = [0.0, 0.4]",
        "error: [search] mixup_alpha = [0.0, 0.4]: both ends must be > 0 (0 would switch it "
        "off: leave the key out instead)",
    ),
    "negative cutmix alpha": (
        "cutmix_alpha = -1",
        "error: [search] cutmix_alpha = [-1, -1]: both ends must be > 0",
    ),
    "smoothing of 1": (
        "label_smoothing = [0.0, 1.0]",
        "error: [search] label_smoothing = [0.0, 1.0]: both ends must be in [0, 1)",
    ),
    "negative smoothing": (
        "label_smoothing = -0.1",
        "error: [search] label_smoothing = [-0.1, -0.1]: both ends must be in [0, 1)",
    ),
    "ema decay of 1": (
        "ema_decay = 1.0",
        "error: [search] ema_decay = [1.0, 1.0]: both ends must be in (0, 1), e.g. [0.9, 0.999]",
    ),
    "unknown imbalance answer": (
        'imbalance = ["wieghted"]',
        "error: [search] imbalance lists 'wieghted' (did you mean \"weighted\"?); choose from: "
        "none, weighted, focal, sampler, logit_adjust",
    ),
    "drop-path for a backbone without it": (
        'drop_path = [0.0, 0.2]\nbackbones = ["team_cnn"]',
        "error: [search] drop_path = [0.0, 0.2], but no backbone of [search] backbones takes a "
        "drop-path rate (team_cnn declare none); remove drop_path, or add a backbone that "
        "takes it",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe_is_one_message(case, tmp_path):
    line, expected = BAD_RECIPES[case]
    (tmp_path / "team_backbone.py").write_text(PLUGIN)
    body = STUDY.replace("[search]", f"[search]\n{line}").replace(
        'backbones = ["test_resnet"]\n',
        "" if "backbones" in line else 'backbones = ["test_resnet"]\n',
    )
    study = write_study(tmp_path, 'plugins = ["team_backbone.py"]\n' + body)
    result = run_main("search", str(study), "--no-retrain", "--device", "cpu")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(expected), lines[0]
    assert not (tmp_path / "tiny" / "optuna.db").exists()  # nothing ran


# ---------------------------------------------------------------------------------------------
# presets


def test_preset_fills_what_the_study_leaves_out():
    config = config_from_dict(
        {"name": "p", "preset": "fast", "search": {"epochs": 2}, "data": {"orientation": "fixed"}}
    )
    s = config.search
    assert s.backbones == ["mobilenetv3_large_100", "resnet18"] and s.n_trials == 12
    assert s.epochs == 2  # the study's own key wins
    assert s.augmentations == ["none", "crop"]  # a preset's flip_crop keeps orientation fixed
    assert s.label_smoothing == [0.1, 0.1] and s.mixup_alpha is None
    assert config.weights["default"] == "timm" and config.selection.finalists == 3
    assert not config.sets("search.backbones") and config.sets("search.epochs")
    best = config_from_dict({"name": "p", "preset": "best", "weights": {"default": "none"}})
    assert best.search.imbalance == ["none", "weighted", "focal", "sampler", "logit_adjust"]
    assert best.weights["default"] == "none"


def test_unknown_preset_is_one_message(tmp_path):
    study = write_study(tmp_path, STUDY)
    result = run_main("search", str(study), "--preset", "fastest", "--no-retrain")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: preset = 'fastest' is not a preset (did you mean \"fast\"?); choose one of: "
        "fast, balanced, best, or remove preset and set [search] yourself"
    ]
    assert not (tmp_path / "tiny" / "optuna.db").exists()


@pytest.mark.slow
def test_search_with_a_preset(tmp_path):
    """`automl-tl search data.toml --preset balanced`: the preset's recipe is searched; the
    study's own keys (a tiny backbone, one short trial, no download) win."""
    study = write_study(
        tmp_path,
        """
        [data]
        source = "digits:0-2"
        image_size = 16
        [search]
        backbones = ["test_resnet"]
        n_trials = 1
        epochs = 1
        [weights]
        default = "none"
        """,
    )
    result = run_main(
        "search", str(study), "--preset", "balanced", "--no-retrain", "--device", "cpu"
    )
    assert result.returncode == 0, result.stderr
    trial = optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny' / 'optuna.db'}"
    ).trials[0]
    assert {"label_smoothing", "mixup_alpha", "mix_prob", "ema_decay"} <= set(trial.params)
    assert trial.params["backbone"] == "test_resnet"


# ---------------------------------------------------------------------------------------------
# input resolution as a searched choice


def test_searched_image_sizes_in_the_study_file():
    config = config_from_dict({"name": "r", "data": {"image_size": [16, 24]}})
    assert config.data.sizes == [16, 24] and config.data.image_size == 16
    assert config_from_dict({"name": "r", "data": {"image_size": [24]}}).data.sizes == [24]
    assert config_from_dict({"name": "r"}).data.sizes == [32]
    for sizes, message in (
        ([16, 16], "[data] image_size lists a size twice: [16, 16]"),
        ([4, 16], "[data] image_size = 4 is too small; it must be at least 8"),
        ([], "[data] image_size = []: give one size, or a list of sizes to search"),
    ):
        with pytest.raises(ConfigError) as info:
            config_from_dict({"name": "r", "data": {"image_size": sizes}})
        assert str(info.value) == message
    with pytest.raises(ConfigError, match="unknown key 'searched_sizes' in \\[data\\]"):
        config_from_dict({"name": "r", "data": {"searched_sizes": [16, 24]}})


def test_image_size_is_a_parameter_and_each_size_has_its_splits(registry, tmp_path):
    from automl_tl.data import load_splits, splits_at

    config = config_from_dict(
        {
            "name": "r",
            "data": {"source": "digits:0-2", "image_size": [16, 24]},
            "search": {"backbones": ["test_resnet"], "output": str(tmp_path / "out")},
        },
        tmp_path / "r.toml",
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sizes = set()
    for _ in range(6):
        trial = study.ask()
        choice = suggest(trial, config, registry)
        assert choice.image_size == trial.params["image_size"]
        assert choice_from_params(dict(trial.params), config).image_size == choice.image_size
        sizes.add(choice.image_size)
        study.tell(trial, 0.5)
    assert sizes == {16, 24}
    splits = load_splits(config, registry)
    assert splits.image_size == 16
    big = splits_at(config, registry, splits, 24)
    assert big.train.x.shape[-2:] == (24, 24) and torch.equal(big.train.y, splits.train.y)
    assert big.test.names == splits.test.names  # the same split, decoded at another size
    assert splits_at(config, registry, splits, 24) is big  # decoded once per process
    assert splits_at(config, registry, splits, None) is splits
    assert len(list((tmp_path / "out" / "cache").glob("images-*.npy"))) == 2  # one cache a size


def test_sizes_whose_caches_exceed_memory_are_one_message(tmp_path):
    study = write_study(tmp_path, STUDY.replace("image_size = 32", "image_size = [32, 64]"))
    result = run_main(
        "search", str(study), "--no-retrain", "--device", "cpu", env={"AUTOML_TL_IN_MEMORY_MB": "1"}
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # the log lines of decoding the first size's cache come before it
    (line,) = [x for x in result.stderr.strip().splitlines() if x.startswith("error:")]
    assert line.startswith(
        "error: [data] image_size = [32, 64]: the 537 images decoded at every size take 8 MB "
        "together, more than the 1 MB a process keeps in memory (AUTOML_TL_IN_MEMORY_MB"
    ), line
    assert line.endswith("search fewer or smaller sizes, or raise AUTOML_TL_IN_MEMORY_MB")
    db = tmp_path / "tiny" / "optuna.db"  # may exist: the study's direction is checked first
    if db.exists():  # but no trial was created
        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from trials").fetchone() == (0,)
