"""Artifacts: load_model + predict in two lines, and `automl-tl export STUDY --onnx`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from automl_tl import UserError, load_model
from automl_tl.components import DataConfig
from automl_tl.export import export_model, export_onnx

from .conftest import run_cli, write_study

LABELS = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, registry):
    """A test_resnet exported as a study's best/ (random weights: the files are what matters)."""
    folder = tmp_path_factory.mktemp("export")
    backbone = registry.get("backbones", "test_resnet")
    torch.manual_seed(0)
    model = backbone.create(len(LABELS), image_size=32)
    with torch.no_grad():  # make the classes distinguishable so top-k order is stable
        model.fc.bias.copy_(torch.tensor([0.3, 0.0, -0.3]))
    cfg = DataConfig((3, 32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    export_model(model, backbone, folder / "tiny" / "best", LABELS, cfg, {"trial": 0})
    return folder


def _images(n=4):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)) for _ in range(n)]


def test_load_model_predicts_pil_images_and_tensors_in_two_lines(exported):
    m = load_model(exported / "tiny" / "best")
    top = m.predict(_images(), top_k=3)
    assert len(top) == 4
    for row in top:
        assert [label for label, _ in row] != [] and {label for label, _ in row} == set(LABELS)
        probs = [p for _, p in row]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
    # preprocessing: resize to the export's size, then its own mean/std
    assert m.data_config.mean == (0.5, 0.4, 0.3) and m.image_size == 32
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = m.preprocess(batch)
    expected = (
        batch.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    ) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)
    assert m.predict(batch, top_k=1)[0][0][0] in LABELS


def test_onnx_export_matches_pytorch(exported):
    pytest.importorskip("onnxruntime", reason="pip install 'automl-tl[onnx]' (in the dev extra)")
    pytest.importorskip("onnxscript", reason="pip install 'automl-tl[onnx]' (in the dev extra)")
    import onnx
    import onnxruntime

    best = exported / "tiny" / "best"
    result = export_onnx(best, batch=5)
    assert result.path == best / "model.onnx" and result.path.is_file()
    assert result.max_abs_diff < 1e-4 and result.batch == 5
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert json.loads(meta["label_names"]) == LABELS
    assert json.loads(meta["mean"]) == [0.5, 0.4, 0.3]
    # a user's view: ONNX Runtime on the same preprocessing gives the same top-1 as PyTorch
    m = load_model(best)
    x = m.preprocess(_images(3))
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": x.numpy()})
    assert logits.shape == (3, 3)
    expected = [row[0][0] for row in m.predict(_images(3))]
    assert [LABELS[i] for i in logits.argmax(1)] == expected
    # the timm export beside it is untouched and still loads with plain timm
    import timm

    timm.create_model(f"local-dir:{best}", pretrained=True)


def test_cli_export_onnx_prints_the_difference(exported):
    pytest.importorskip("onnxruntime", reason="pip install 'automl-tl[onnx]' (in the dev extra)")
    study = write_study(exported, "[search]\nbackbones = ['test_resnet']\n")
    result = run_cli("export", str(study), "--onnx")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"timm export: {exported / 'tiny' / 'best'} (")
    assert "max abs difference vs PyTorch on a batch of 8:" in lines[1]
    assert float(lines[1].rsplit(":", 1)[1]) < 1e-4


def test_export_without_a_model_is_one_clear_line(tmp_path):
    study = write_study(tmp_path, "[search]\nbackbones = ['test_resnet']\n")
    result = run_cli("export", str(study), "--onnx")
    assert result.returncode == 2
    assert "is not an exported model" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_missing_onnx_packages_say_how_to_install(exported, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'automl-tl\[onnx\]'"):
        export_onnx(exported / "tiny" / "best")


def test_exported_files_are_readable_as_the_umask_allows(exported):
    """Written through private temporaries, the model ends with the modes a plain write gives
    (a serving container running as another user can read it)."""
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    best = exported / "tiny" / "best"
    assert stat.S_IMODE(best.stat().st_mode) == 0o777 & ~umask
    for name in ("model.safetensors", "config.json", "metrics.json"):
        assert stat.S_IMODE((best / name).stat().st_mode) == 0o666 & ~umask, name
