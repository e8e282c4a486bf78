"""automl-tl pretrain: source-task training, head-free weights, a JSON sidecar, a content cache."""

import json

import pytest
import torch
from safetensors.torch import load_file

from automl_tl import UserError, load_config
from automl_tl.pretrain import PretrainSpec, ensure_study_weights, pretrain, read_sidecar

from .conftest import run_main, write_study
from .shared import PRETRAIN_SPEC

SPEC = PretrainSpec(**PRETRAIN_SPEC)


@pytest.fixture
def pretrained(pretrained_digits):
    """Built once per session (tests/shared.py; test_transfer.py starts from it too)."""
    return pretrained_digits


def test_writes_head_free_weights_and_a_sidecar(pretrained, registry):
    assert not pretrained.cached
    meta = read_sidecar(pretrained.path)
    assert meta == pretrained.meta
    assert meta["backbone"] == "test_resnet" and meta["source"] == "digits:0-4"
    assert meta["classes"] == ["0", "1", "2", "3", "4"] and meta["epochs"] == 3
    assert 0.6 < meta["accuracy"] <= 1.0  # held out, 5 classes: far above chance (0.2)
    assert meta["images"]["train"] > 600 and meta["images"]["test"] > 50
    state = load_file(str(pretrained.path))
    assert not any(k.startswith("fc.") for k in state)  # head removed
    backbone = registry.get("backbones", "test_resnet")
    model = backbone.create(7, weights=str(pretrained.path), image_size=32)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.fc.out_features == 7
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(pretrained.path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_same_inputs_are_a_cache_hit_and_other_inputs_retrain(pretrained, registry, tmp_path):
    before = pretrained.path.stat().st_mtime_ns
    again = pretrain(SPEC, pretrained.path, registry, device="cpu")
    assert again.cached and again.meta["key"] == pretrained.meta["key"]
    assert pretrained.path.stat().st_mtime_ns == before
    # another source subset is another key: a fresh file, not the cached one
    other = pretrain(
        PretrainSpec("test_resnet", "digits:0-2", image_size=32, epochs=1),
        tmp_path / "other.safetensors",
        registry,
        device="cpu",
    )
    assert not other.cached and other.meta["key"] != pretrained.meta["key"]
    assert other.meta["classes"] == ["0", "1", "2"]


def test_a_changed_weights_file_is_not_trusted(registry, tmp_path):
    out = tmp_path / "w.safetensors"
    spec = PretrainSpec("test_vit", "digits:0-1", image_size=32, epochs=1)
    first = pretrain(spec, out, registry, device="cpu")
    state = load_file(str(out))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 1.0
    from safetensors.torch import save_file

    save_file(state, str(out))
    second = pretrain(spec, out, registry, device="cpu")
    assert not second.cached and second.meta["sha256"] == first.meta["sha256"]


def test_cli_pretrain_then_instant_rerun(tmp_path):
    args = [
        "pretrain",
        "--backbone",
        "test_efficientnet",
        "--data",
        "digits:0-1",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--out",
        str(tmp_path / "eff.safetensors"),
        "--device",
        "cpu",
    ]
    first = run_main(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(
        "pretrained: test_efficientnet on digits:0-1 (2 classes, 1 epochs)"
    )
    meta = json.loads((tmp_path / "eff.json").read_text())
    assert set(meta) >= {"source", "classes", "epochs", "accuracy", "key", "sha256"}
    second = run_main(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("up to date (cached): test_efficientnet")
    assert "pretrain epoch" not in second.stderr  # nothing trained


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "w.pt"], "written as a .safetensors file"),
        (["--data", "nope:0"], "unknown dataset 'nope'"),
        (["--epochs", "0"], "pretrain epochs = 0 is too small"),
    ],
)
def test_cli_pretrain_errors_are_one_line(tmp_path, extra, message):
    args = {"--backbone": "test_resnet", "--data": "digits:0-1", "--out": "w.safetensors"}
    args.update(dict(zip(extra[::2], extra[1::2])))
    result = run_main("pretrain", *[x for kv in args.items() for x in kv], cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_study_pretrain_source_is_built_once(registry, tmp_path):
    path = write_study(
        tmp_path,
        """
        [data]
        source = "digits:5-9"
        [search]
        backbones = ["test_resnet", "test_vit"]
        [pretrain]
        epochs = 1
        [weights]
        test_resnet = "pretrain:digits:0-1"
        """,
    )
    config = load_config(path)
    resolved = config.weights_for("test_resnet")
    assert resolved == str(tmp_path / "tiny" / "pretrained" / "test_resnet--digits-0-1.safetensors")
    assert config.weights_for("test_vit") == "none"
    built = ensure_study_weights(config, registry, device="cpu")
    assert [(r.path.name, r.cached) for r in built] == [
        ("test_resnet--digits-0-1.safetensors", False)
    ]
    assert built[0].meta["epochs"] == 1 and built[0].meta["image_size"] == 32
    again = ensure_study_weights(config, registry, device="cpu")
    assert [r.cached for r in again] == [True]


def test_pretrain_refuses_bad_settings(registry, tmp_path):
    with pytest.raises(UserError, match="lr > 0"):
        pretrain(
            PretrainSpec("test_resnet", "digits:0-1", lr=0.0), tmp_path / "w.safetensors", registry
        )


def test_a_same_size_edit_of_a_source_image_retrains(registry, tmp_path):
    """The pretrain cache key holds the images' bytes, not only their paths and sizes."""
    import os

    import numpy as np
    from PIL import Image

    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    spec = PretrainSpec("test_resnet", f"folder:{root}", image_size=16, epochs=1, batch_size=8)
    out = tmp_path / "w.safetensors"
    first = pretrain(spec, out, registry, device="cpu", cache_dir=tmp_path / "cache")
    assert not first.cached
    target = root / "a" / "0.png"
    size = target.stat().st_size
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(target)
    assert target.stat().st_size == size  # noise: the same size, other bytes
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    again = pretrain(spec, out, registry, device="cpu", cache_dir=tmp_path / "cache")
    assert not again.cached
