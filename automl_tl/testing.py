"""Contract checks every component must pass — built-in or third-party.

Like Optuna's ``BasicSamplerTestCase`` and Kornia's ``CommonTests``: one suite, run over every
registered implementation. Use them in a plugin's own tests::

    from automl_tl.testing import check_backbone
    from my_plugin import MyBackbone

    def test_contract():
        check_backbone(MyBackbone())

Each check raises ``AssertionError`` with a sentence a plugin author can act on.
"""

from __future__ import annotations

import torch

from .components import AugmentationPolicy, Backbone, DatasetSource, UnfreezeStrategy

NUM_CLASSES = 3
IMAGE_SIZE = 32


def check_backbone(backbone: Backbone, image_size: int = IMAGE_SIZE) -> None:
    """create() gives a fresh head of the right size; groups are ordered, disjoint, head-free."""
    assert isinstance(backbone, Backbone), f"{backbone!r} must subclass automl_tl.Backbone"
    assert backbone.name, "a backbone needs a non-empty name"
    torch.manual_seed(0)
    model = backbone.create(NUM_CLASSES, weights="none", image_size=image_size)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, image_size, image_size))
    assert tuple(out.shape) == (2, NUM_CLASSES), (
        f"{backbone.name}: create(num_classes={NUM_CLASSES}) must give logits of shape (B, {NUM_CLASSES}), "
        f"got {tuple(out.shape)}"
    )
    names = [n for n, _ in model.named_parameters()]
    head = backbone.head_parameters(model)
    assert head, (
        f"{backbone.name}: head_parameters() is empty; return the classifier's parameter names"
    )
    assert set(head) <= set(names), f"{backbone.name}: head_parameters() names unknown parameters"
    groups = backbone.layer_groups(model)
    assert groups, f"{backbone.name}: layer_groups() is empty; return at least one body group"
    flat = [n for g in groups for n in g]
    assert len(flat) == len(set(flat)), f"{backbone.name}: a parameter appears in two layer groups"
    assert not set(flat) & set(head), f"{backbone.name}: layer_groups() must not include the head"
    assert set(flat) | set(head) == set(names), (
        f"{backbone.name}: parameters in no group and not in the head: "
        f"{sorted(set(names) - set(flat) - set(head))[:5]}"
    )
    order = {n: i for i, n in enumerate(names)}
    firsts = [min(order[n] for n in g) for g in groups]
    assert firsts == sorted(firsts), (
        f"{backbone.name}: layer groups must be ordered input -> output"
    )
    cfg = backbone.data_config(model)
    assert len(cfg.mean) == 3 and len(cfg.std) == 3, (
        f"{backbone.name}: data_config needs 3-channel mean/std"
    )
    assert all(s > 0 for s in cfg.std), f"{backbone.name}: data_config std must be positive"


def check_policy(policy: AugmentationPolicy, image_size: int = IMAGE_SIZE) -> None:
    """Strength 0 is the identity; shape, dtype and [0, 1] range are kept; same seed, same output."""
    assert isinstance(policy, AugmentationPolicy), (
        f"{policy!r} must subclass automl_tl.AugmentationPolicy"
    )
    torch.manual_seed(0)
    x = torch.rand(8, 3, image_size, image_size)
    identity = policy.build(0.0, image_size)
    assert torch.equal(identity(x), x), (
        f"policy {policy.name!r}: strength 0.0 must return the batch unchanged"
    )
    for strength in (0.5, 1.0):
        aug = policy.build(strength, image_size)
        torch.manual_seed(1)
        a = aug(x.clone())
        torch.manual_seed(1)
        b = aug(x.clone())
        assert a.shape == x.shape and a.dtype == x.dtype, (
            f"policy {policy.name!r} at strength {strength}: output {tuple(a.shape)} {a.dtype} must match "
            f"the input {tuple(x.shape)} {x.dtype}"
        )
        assert torch.equal(a, b), (
            f"policy {policy.name!r}: the same seed must give the same augmentation"
        )
        assert float(a.min()) >= -1e-4 and float(a.max()) <= 1 + 1e-4, (
            f"policy {policy.name!r} at strength {strength}: values left [0, 1] "
            f"({float(a.min()):.3f}..{float(a.max()):.3f}); clamp the output"
        )


def check_strategy(strategy: UnfreezeStrategy) -> None:
    """Depth 0 trains only the head; every parameter group is known; full depth reaches the input."""
    assert isinstance(strategy, UnfreezeStrategy), (
        f"{strategy!r} must subclass automl_tl.UnfreezeStrategy"
    )
    groups = [[f"g{i}.w", f"g{i}.b"] for i in range(4)]
    head = ["head.w", "head.b"]
    everything = {n for g in groups for n in g} | set(head)
    epochs = 4
    for epoch in range(epochs):
        probe = strategy.trainable(epoch, epochs, groups, head, 0)
        assert probe == set(head), (
            f"strategy {strategy.name!r}: depth 0 is a linear probe, so only the head may train "
            f"(epoch {epoch} trains {sorted(probe)})"
        )
    for depth in range(len(groups) + 1):
        pgs = strategy.param_groups(groups, head, depth)
        named = [n for pg in pgs for n in pg.names]
        assert len(named) == len(set(named)), (
            f"strategy {strategy.name!r}: a parameter is in two param groups"
        )
        assert set(named) <= everything, (
            f"strategy {strategy.name!r}: param_groups() names unknown parameters"
        )
        assert set(head) <= set(named), (
            f"strategy {strategy.name!r}: the head must always be in param_groups()"
        )
        assert all(pg.lr_scale > 0 for pg in pgs), (
            f"strategy {strategy.name!r}: lr_scale must be positive"
        )
        for epoch in range(epochs):
            trainable = strategy.trainable(epoch, epochs, groups, head, depth)
            assert trainable <= set(named), (
                f"strategy {strategy.name!r}: trainable() at epoch {epoch} names parameters that are not in "
                "param_groups(), so the optimizer would never update them"
            )
            assert set(head) <= trainable, (
                f"strategy {strategy.name!r}: the head must train at every epoch"
            )
        top = set(groups[-1]) if depth else set()
        assert top <= set(named), (
            f"strategy {strategy.name!r}: depth {depth} must include the top group"
        )
    final = strategy.trainable(epochs - 1, epochs, groups, head, len(groups))
    assert set(groups[0]) <= final, (
        f"strategy {strategy.name!r}: at full depth the lowest group must train by the last epoch"
    )


def check_dataset_source(source: DatasetSource) -> None:
    """The source has a name and says whether it needs an argument."""
    assert isinstance(source, DatasetSource), f"{source!r} must subclass automl_tl.DatasetSource"
    assert source.name and ":" not in source.name, (
        f"dataset source name {source.name!r} must be non-empty, without ':'"
    )
    assert isinstance(source.needs_argument, bool), (
        f"dataset source {source.name!r}: needs_argument must be a bool"
    )
