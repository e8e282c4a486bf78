"""fit(): one configuration on one device, frozen layers, metrics, failures."""

import math

import pytest
import torch

from automl_tl import Choice, fit
from automl_tl.data import prepare_data
from automl_tl.train import NonFiniteLossError, classification_metrics, set_trainable

from .conftest import TEST_BACKBONES


@pytest.fixture(scope="module")
def digits(registry):
    return prepare_data(registry, "digits", image_size=32, seed=0)


@pytest.mark.parametrize("backbone", TEST_BACKBONES)
def test_fit_learns_on_every_test_backbone(registry, digits, backbone):
    choice = Choice(
        backbone=backbone, unfreeze="top_k", unfreeze_depth=1.0, lr=3e-3, epochs=2, batch_size=64
    )
    seen = []
    result = fit(choice, digits, registry, device="cpu", seed=0, on_epoch=seen.append)
    assert [r.epoch for r in seen] == [0, 1]
    assert all(math.isfinite(r.train_loss) for r in seen)
    assert result.val["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert len(result.val["confusion_matrix"]) == 10


def test_depth_zero_is_a_linear_probe(registry, digits):
    backbone = registry.get("backbones", "test_resnet")
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in backbone.create(10, image_size=32).state_dict().items()}
    choice = Choice(backbone="test_resnet", unfreeze="top_k", unfreeze_depth=0.0, lr=1e-2, epochs=1)
    result = fit(choice, digits, registry, device="cpu", seed=0)
    after = result.model.state_dict()
    head = set(backbone.head_parameters(result.model))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == head, (
        "only the head may change in a linear probe (BatchNorm statistics included)"
    )
    assert result.depth == 0


def test_frozen_batchnorm_stays_in_eval_mode(registry):
    backbone = registry.get("backbones", "test_resnet")
    model = backbone.create(3, image_size=32)
    groups = backbone.layer_groups(model)
    trainable = set(backbone.head_parameters(model)) | set(groups[-1])
    set_trainable(model, trainable)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    top = groups[-1][0].split(".")[0]
    assert any(not m.training for n, m in bns.items() if not n.startswith(top))
    assert all(m.training for n, m in bns.items() if n.startswith(top))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in trainable)


def test_gradual_unfreezing_changes_the_trainable_set(registry, digits):
    strategy = registry.get("unfreeze_strategies", "gradual")
    groups = [["a"], ["b"], ["c"]]
    assert strategy.trainable(0, 4, groups, ["h"], 3) == {"h"}
    assert strategy.trainable(3, 4, groups, ["h"], 3) == {"h", "a", "b", "c"}
    assert strategy.trainable(1, 4, groups, ["h"], 3) == {"h", "c"}


def test_layer_decay_scales_lower_groups(registry):
    strategy = registry.get("unfreeze_strategies", "layer_decay")
    pgs = strategy.param_groups([["a"], ["b"], ["c"]], ["h"], 2)
    scales = {tuple(pg.names): pg.lr_scale for pg in pgs}
    assert (
        scales[("h",)] == 1.0
        and scales[("c",)] == pytest.approx(0.7)
        and scales[("b",)] == pytest.approx(0.49)
    )
    assert ("a",) not in scales


def test_non_finite_loss_raises(registry, digits):
    choice = Choice(backbone="test_resnet", lr=1e12, unfreeze_depth=1.0, epochs=3)
    with pytest.raises(NonFiniteLossError, match="training loss became"):
        fit(choice, digits, registry, device="cpu", seed=0)


def test_same_seed_same_result(registry, digits):
    choice = Choice(
        backbone="test_convnext", augmentation="randaugment", aug_strength=0.5, epochs=1
    )
    a = fit(choice, digits, registry, device="cpu", seed=3).val["accuracy"]
    b = fit(choice, digits, registry, device="cpu", seed=3).val["accuracy"]
    assert a == b


def test_metrics_from_confusion_matrix():
    cm = torch.tensor([[8, 2], [1, 1]])
    m = classification_metrics(cm)
    assert m["accuracy"] == pytest.approx(9 / 12)
    assert m["balanced_accuracy"] == pytest.approx((0.8 + 0.5) / 2)
    f1_0 = 2 * (8 / 9) * 0.8 / (8 / 9 + 0.8)
    f1_1 = 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5)
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)
