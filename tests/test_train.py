"""fit(): one configuration on one device, frozen layers, metrics, failures."""

import dataclasses
import math

import pytest
import torch

from automl_tl import Choice, fit, train
from automl_tl.components import Backbone
from automl_tl.data import Split, prepare_data
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
    confusion = torch.tensor(result.val["confusion_matrix"])
    assert confusion.shape == (10, 10) and int(confusion.sum()) == len(digits.val)
    assert result.val["accuracy"] == pytest.approx(float(confusion.trace() / confusion.sum()))


def test_depth_zero_is_a_linear_probe(registry, few_digits):
    backbone = registry.get("backbones", "test_resnet")
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in backbone.create(10, image_size=32).state_dict().items()}
    choice = Choice(backbone="test_resnet", unfreeze="top_k", unfreeze_depth=0.0, lr=1e-2, epochs=1)
    result = fit(choice, few_digits, registry, device="cpu", seed=0)
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


def test_non_finite_loss_raises(registry, few_digits):
    choice = Choice(backbone="test_resnet", lr=1e12, unfreeze_depth=1.0, epochs=3)
    with pytest.raises(NonFiniteLossError, match="training loss became"):
        fit(choice, few_digits, registry, device="cpu", seed=0)


def test_same_seed_same_result(registry, few_digits):
    choice = Choice(
        backbone="test_convnext", augmentation="randaugment", aug_strength=0.5, epochs=1
    )
    a = fit(choice, few_digits, registry, device="cpu", seed=3)
    b = fit(choice, few_digits, registry, device="cpu", seed=3)
    assert a.history[0].train_loss == b.history[0].train_loss
    assert a.val == b.val


def test_metrics_from_confusion_matrix():
    cm = torch.tensor([[8, 2], [1, 1]])
    m = classification_metrics(cm)
    assert m["accuracy"] == pytest.approx(9 / 12)
    assert m["balanced_accuracy"] == pytest.approx((0.8 + 0.5) / 2)
    f1_0 = 2 * (8 / 9) * 0.8 / (8 / 9 + 0.8)
    f1_1 = 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5)
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)


# ---------------------------------------------------------------------------------------------
# fast trials: out-of-memory halving, the peak-memory probe, torch.compile, slow backbones


class _RunsOutOfMemory(Backbone):
    """test_resnet that raises CUDA's out-of-memory error on training batches above ``limit``;
    with ``body_only``, only once its body trains (as memory grows with gradual unfreezing)."""

    name = "oom_resnet"

    def __init__(self, limit: int, body_only: bool = False) -> None:
        self.limit, self.body_only = limit, body_only

    def create(self, num_classes, weights="none", image_size=None):
        import timm

        model = timm.create_model("test_resnet", num_classes=num_classes)
        forward = model.forward

        def limited(x):
            body = any(p.requires_grad for n, p in model.named_parameters() if n[:3] != "fc.")
            if torch.is_grad_enabled() and x.shape[0] > self.limit and (body or not self.body_only):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return forward(x)

        model.forward = limited
        return model


@pytest.fixture(scope="module")
def few_digits(digits):
    """256 training and 128 validation images: enough to exercise the loop, quick to train."""

    def first(split, n):
        return Split(split.x[:n], split.y[:n], split.names[:n])

    return dataclasses.replace(
        digits,
        train=first(digits.train, 256),
        val=first(digits.val, 128),
        fingerprint=digits.fingerprint + "-few",
    )


def _with_backbone(registry, backbone: Backbone):
    from automl_tl.registry import Registry

    copy = Registry()
    copy.tables = {kind: dict(table) for kind, table in registry.tables.items()}
    copy.add("backbones", backbone, "tests")
    return copy


def test_out_of_memory_keeps_the_batch_and_accumulates_micro_batches(registry, few_digits):
    registry = _with_backbone(registry, _RunsOutOfMemory(limit=40))
    seen = []
    choice = Choice(backbone="oom_resnet", unfreeze_depth=1.0, epochs=2, batch_size=128)
    result = fit(choice, few_digits, registry, device="cpu", on_epoch=seen.append)
    assert (result.batch_size, result.micro_batch, result.oom_retries) == (128, 32, 2)
    assert [r.epoch for r in seen] == [0, 1]  # every epoch reported once


def test_out_of_memory_after_a_reported_epoch_ends_the_trial(registry, few_digits):
    registry = _with_backbone(registry, _RunsOutOfMemory(limit=16, body_only=True))
    choice = Choice(backbone="oom_resnet", unfreeze="gradual", unfreeze_depth=1.0, epochs=2)
    seen = []
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fit(choice, few_digits, registry, device="cpu", on_epoch=seen.append)
    assert len(seen) == 1  # epoch 1 was reported; a retry would report it again


def test_peak_memory_probe_halves_before_the_first_epoch(registry, few_digits, monkeypatch):
    monkeypatch.setattr(train, "MEMORY_PROBE_DEVICES", {"cpu", "cuda"})
    registry = _with_backbone(registry, _RunsOutOfMemory(limit=16, body_only=True))
    choice = Choice(backbone="oom_resnet", unfreeze="gradual", unfreeze_depth=1.0, epochs=2)
    result = fit(choice, few_digits, registry, device="cpu")
    assert (result.batch_size, result.micro_batch, len(result.history)) == (64, 16, 2)


def test_peak_memory_probe_leaves_no_trace(registry, few_digits, monkeypatch):
    choice = Choice(backbone="test_resnet", unfreeze="gradual", unfreeze_depth=1.0, epochs=2)
    plain = fit(choice, few_digits, registry, device="cpu", seed=0)
    monkeypatch.setattr(train, "MEMORY_PROBE_DEVICES", {"cpu"})
    probed = fit(choice, few_digits, registry, device="cpu", seed=0)
    assert [r.train_loss for r in probed.history] == [r.train_loss for r in plain.history]
    assert probed.val["confusion_matrix"] == plain.val["confusion_matrix"]


def test_compile_flag_runs_the_model_through_torch_compile(registry, few_digits):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    choice = Choice(backbone="test_vit", unfreeze_depth=1.0, epochs=1, batch_size=128)
    kwargs = dict(device="cpu", seed=0, feature_cache=False)
    result = fit(choice, few_digits, registry, compile="eager", **kwargs)
    assert counters["stats"]["unique_graphs"] > 0
    torch._dynamo.reset()
    plain = fit(choice, few_digits, registry, **kwargs)  # the same model, the same numbers
    assert result.history[0].train_loss == pytest.approx(plain.history[0].train_loss, rel=1e-5)
    assert result.val["confusion_matrix"] == plain.val["confusion_matrix"]


def test_compile_is_a_study_flag():
    from automl_tl import ConfigError, config_from_dict

    assert config_from_dict({"name": "x"}).search.compile is False
    assert config_from_dict({"name": "x", "search": {"compile": True}}).search.compile is True
    with pytest.raises(ConfigError, match=r"\[search\] compile must be true or false"):
        config_from_dict({"name": "x", "search": {"compile": "yes"}})


def test_backbone_too_slow_for_the_timeout_is_avoided(registry, digits, tmp_path):
    import optuna
    from optuna.distributions import CategoricalDistribution

    from automl_tl import config_from_dict
    from automl_tl.leaderboard import backbone_throughput
    from automl_tl.plugins import get_plugin_manager
    from automl_tl.search import Objective

    names = ["test_resnet", "test_vit", "test_convnext"]
    config = config_from_dict(
        {"name": "t", "search": {"timeout": 10, "output": str(tmp_path), "backbones": names}}
    )
    study = optuna.create_study(direction="maximize")
    for backbone, rate, attrs in [
        ("test_resnet", 100.0, {"device": "cpu"}),
        ("test_resnet", 300.0, {"device": "cuda"}),  # another device: not counted
        ("test_vit", 1e6, {"device": "cpu"}),
        ("test_convnext", 1e6, {"device": "cpu", "feature_cache": "hit"}),  # not the backbone's
    ]:
        study.add_trial(
            optuna.trial.create_trial(
                value=0.5,
                params={"backbone": backbone},
                distributions={"backbone": CategoricalDistribution(names)},
                user_attrs={"images_per_s": rate, **attrs},
            )
        )
    assert backbone_throughput(study, device="cpu") == {"test_resnet": 100.0, "test_vit": 1e6}
    assert backbone_throughput(study)["test_resnet"] == 200.0
    objective = Objective(config, registry, get_plugin_manager()[0], digits, "cpu")
    trial = study.ask()
    slow = Choice(backbone="test_resnet", unfreeze_depth=1.0, epochs=5)
    assert "test_resnet trains at 100 images/s" in objective.too_slow(trial, slow)
    probe = Choice(backbone="test_resnet", unfreeze_depth=0.0, epochs=5)  # one cached pass
    assert objective.too_slow(trial, probe) is None
    assert objective.too_slow(trial, Choice(backbone="test_vit", epochs=5)) is None
    assert objective.too_slow(trial, Choice(backbone="test_convnext", epochs=5)) is None
