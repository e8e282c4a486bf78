"""Local weight files: safetensors or weights_only torch checkpoints; heads replaced; clear errors."""

import pytest
import torch
from safetensors.torch import save_file

from automl_tl import UserError
from automl_tl.weights import read_state_dict


def test_safetensors_weights_load_and_head_is_replaced(registry, tmp_path):
    backbone = registry.get("backbones", "test_resnet")
    torch.manual_seed(1)
    source = backbone.create(5, image_size=32)  # e.g. pretrained on 5 classes
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = backbone.create(10, weights=str(path), image_size=32)
    body = [k for k in source.state_dict() if not k.startswith("fc.")]
    assert all(torch.equal(model.state_dict()[k], source.state_dict()[k]) for k in body)
    assert model.fc.out_features == 10


def test_torch_checkpoint_nested_under_state_dict(registry, tmp_path):
    backbone = registry.get("backbones", "test_convnext")
    source = backbone.create(10, image_size=32)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    model = backbone.create(10, weights=str(path), image_size=32)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(UserError, match="weights_only=True"):
        read_state_dict(path)


def test_weights_of_another_architecture_list_the_keys(registry, tmp_path):
    other = registry.get("backbones", "test_convnext").create(10, image_size=32)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(UserError, match="does not fit ResNet: missing keys"):
        registry.get("backbones", "test_resnet").create(10, weights=str(path), image_size=32)


def test_hub_weights_offline_give_one_clear_message(registry, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(UserError) as info:
        registry.get("backbones", "resnet18").create(10, weights="timm", image_size=32)
    message = str(info.value)
    assert "cannot get timm hub weights for 'resnet18'" in message
    assert "[weights] resnet18" in message and "\n" not in message
