"""The linear-probe feature cache: same result as training through the whole model, shared
only between identical bodies, refused where it would change the result."""

import dataclasses

import pytest
import torch
from torch import nn

from automl_tl import Choice, fit
from automl_tl.data import prepare_data
from automl_tl.features import FeatureCache, body_digest, extract, head_module, static_body

from .conftest import TEST_BACKBONES


@pytest.fixture(scope="module")
def digits(registry):
    data = prepare_data(registry, "digits", image_size=32, seed=0)
    for split, n in ((data.train, 192), (data.val, 128)):  # small and fast
        split.x, split.y, split.names = split.x[:n], split.y[:n], split.names[:n]
    return data


def _probe(backbone: str, **kw) -> Choice:
    return Choice(backbone=backbone, unfreeze_depth=0.0, lr=3e-3, epochs=2, batch_size=64, **kw)


@pytest.mark.parametrize("backbone", TEST_BACKBONES)
def test_cached_probe_matches_the_full_model(registry, digits, backbone):
    choice = _probe(backbone)
    full = fit(choice, digits, registry, device="cpu", seed=1, feature_cache=False)
    cache = FeatureCache()
    cold = fit(choice, digits, registry, device="cpu", seed=1, feature_cache=cache)
    warm = fit(choice, digits, registry, device="cpu", seed=1, feature_cache=cache)
    assert (full.feature_cache, cold.feature_cache, warm.feature_cache) == (None, "miss", "hit")
    assert cache.hits == 2 and len(cache) == 2  # train and val features of one body
    for result in (cold, warm):
        assert result.val["confusion_matrix"] == full.val["confusion_matrix"]
        for a, b in zip(full.history, result.history):
            assert b.cached_features and not a.cached_features
            assert b.train_loss == pytest.approx(a.train_loss, rel=1e-5, abs=1e-6)
        head = result.backbone.head_parameters(result.model)
        state, reference = result.model.state_dict(), full.model.state_dict()
        for name in head:
            torch.testing.assert_close(state[name], reference[name], rtol=1e-4, atol=1e-5)
        # the returned model is whole: evaluating it without the cache gives the same answer
        for name, value in reference.items():
            if name not in head:
                assert torch.equal(state[name], value), name


def test_random_bodies_of_other_seeds_never_share(registry, digits):
    cache = FeatureCache()
    fit(_probe("test_vit"), digits, registry, device="cpu", seed=1, feature_cache=cache)
    other = fit(_probe("test_vit"), digits, registry, device="cpu", seed=2, feature_cache=cache)
    assert other.feature_cache == "miss" and len(cache) == 4


@pytest.mark.parametrize(
    "change",
    [
        {"augmentation": "flip_crop", "aug_strength": 0.5},  # inputs differ every epoch
        {"unfreeze_depth": 1.0},  # the body trains
        {"unfreeze": "lp_ft", "unfreeze_depth": 1.0},  # probes first, then trains the body
    ],
)
def test_no_cache_when_the_body_sees_other_inputs_or_trains(registry, digits, change):
    choice = dataclasses.replace(_probe("test_vit"), epochs=2, **change)
    cache = FeatureCache()
    result = fit(choice, digits, registry, device="cpu", seed=0, feature_cache=cache)
    assert result.feature_cache is None and len(cache) == 0
    assert not any(r.cached_features for r in result.history)


def test_strength_zero_is_the_identity_so_the_cache_applies(registry, digits):
    choice = _probe("test_vit", augmentation="randaugment", aug_strength=0.0)
    result = fit(choice, digits, registry, device="cpu", seed=0, feature_cache=FeatureCache())
    assert result.feature_cache == "miss"


def test_lru_bound_and_oversized_entries():
    cache = FeatureCache(max_bytes=3 * 400)
    for key in "abc":
        assert cache.put(key, torch.zeros(100))  # 400 bytes each
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(100))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 3
    assert not cache.put("huge", torch.zeros(1000))
    assert cache.get("huge") is None
    cache.clear("cpu")
    assert len(cache) == 0


def test_digest_covers_the_body_not_the_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    head = ["3.weight", "3.bias"]
    before = body_digest(model, head)
    with torch.no_grad():
        model[3].weight.add_(1.0)
    assert body_digest(model, head) == before
    with torch.no_grad():
        model[1].running_mean.add_(1.0)  # buffers are part of the body
    assert body_digest(model, head) != before


class _Net(nn.Module):
    def __init__(self, body_dropout: float = 0.0, after_head: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Dropout(body_dropout))
        self.fc = nn.Linear(8, 3)
        self.after_head = after_head

    def forward(self, x):
        return self.fc(self.body(x)) * self.after_head


def test_a_random_body_is_not_static():
    net = _Net(body_dropout=0.5).train()
    assert head_module(net, ["fc.weight", "fc.bias"]) is net.fc
    assert not static_body(net, net.fc)
    assert static_body(_Net(body_dropout=0.0).train(), net.fc)
    assert static_body(net.eval(), net.fc)


def test_extract_refuses_a_model_that_works_after_its_head():
    x = [torch.randn(4, 3, 2, 2), torch.randn(2, 3, 2, 2)]
    foreign = extract(_Net(), _Net().fc, x, autocast=torch.no_grad)  # never called: no features
    assert foreign is None
    net = _Net()
    features = extract(net, net.fc, x, autocast=torch.no_grad)
    assert features.shape == (6, 8)
    scaled = _Net(after_head=2.0)
    assert extract(scaled, scaled.fc, x, autocast=torch.no_grad) is None
