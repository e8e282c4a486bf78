"""Every registered component passes the same contract suite (automl_tl.testing)."""

import pytest

from automl_tl import registry_for
from automl_tl.testing import (
    check_backbone,
    check_backbone_weight_sources,
    check_backbone_weights,
    check_dataset_source,
    check_policy,
    check_policy_orientation,
    check_strategy,
)

from .conftest import TEST_BACKBONES

_registry = registry_for()


@pytest.mark.parametrize("name", TEST_BACKBONES)
def test_backbone_contract(registry, name):
    check_backbone(registry.get("backbones", name))


@pytest.mark.parametrize("name", TEST_BACKBONES)
def test_backbone_loads_its_own_weights_file(registry, name):
    check_backbone_weights(registry.get("backbones", name))


def test_contract_catches_a_backbone_that_ignores_its_weights_file(registry):
    from automl_tl.default_plugins.timm_backbones import TimmBackbone

    class Forgetful(TimmBackbone):
        def create(self, num_classes, weights="none", image_size=None):
            return super().create(num_classes, "none", image_size)

    with pytest.raises(AssertionError, match=r"left \d+ of \d+ tensors unloaded"):
        check_backbone_weights(Forgetful("test_resnet"))


@pytest.mark.parametrize("name", TEST_BACKBONES)
def test_backbone_refuses_a_weight_source_it_does_not_know(registry, name):
    check_backbone_weight_sources(registry.get("backbones", name))


def test_contract_catches_a_backbone_that_takes_any_weight_source(registry):
    from automl_tl.default_plugins.timm_backbones import TimmBackbone

    class Credulous(TimmBackbone):
        def check_weights(self, source):
            return None

    with pytest.raises(AssertionError, match="accepted a source nobody defines"):
        check_backbone_weight_sources(Credulous("test_resnet"))


@pytest.mark.parametrize("name", _registry.names("augmentation_policies"))
def test_policy_contract(registry, name):
    check_policy(registry.get("augmentation_policies", name))


@pytest.mark.parametrize("name", _registry.names("augmentation_policies"))
def test_policy_keeps_orientation_when_it_says_so(registry, name):
    check_policy_orientation(registry.get("augmentation_policies", name))


@pytest.mark.parametrize("name", _registry.names("unfreeze_strategies"))
def test_strategy_contract(registry, name):
    check_strategy(registry.get("unfreeze_strategies", name))


@pytest.mark.parametrize("name", _registry.names("datasets"))
def test_dataset_source_contract(registry, name):
    check_dataset_source(registry.get("datasets", name))


def test_contract_catches_a_broken_policy():
    """The suite can fail: a policy that changes the batch at strength 0 is rejected."""
    import torch
    from torch import nn

    from automl_tl import AugmentationPolicy

    class Broken(AugmentationPolicy):
        name = "broken"

        def build(self, strength, image_size):
            return nn.Identity() if strength else _AddOne()

    class _AddOne(nn.Module):
        def forward(self, x):
            return x + 1

    with pytest.raises(AssertionError, match="strength 0.0"):
        check_policy(Broken())
    assert torch.equal(Broken().build(1.0, 8)(torch.zeros(1)), torch.zeros(1))


def test_contract_catches_a_strategy_that_trains_the_body_at_depth_zero():
    from automl_tl import ParamGroup, UnfreezeStrategy

    class Leaky(UnfreezeStrategy):
        name = "leaky"

        def param_groups(self, groups, head, depth):
            return [ParamGroup(list(head) + [n for g in groups for n in g])]

    with pytest.raises(AssertionError, match="linear probe"):
        check_strategy(Leaky())
