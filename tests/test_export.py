"""Artifacts: load_model + predict in two lines, and `automl-tl export STUDY --onnx`.

``exported`` is built once and only read; a test that writes into a model folder (the ONNX
export writes model.onnx beside it) works on its own copy.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from automl_tl import UserError, load_model
from automl_tl.components import DataConfig
from automl_tl.export import export_model, export_onnx

from .conftest import TEST_BACKBONES, needs, run_cli, run_main, write_study

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


@pytest.fixture
def exported_copy(exported, tmp_path):
    """The ``exported`` study folder copied, for a test that writes into it."""
    shutil.copytree(exported, tmp_path / "copy")
    return tmp_path / "copy"


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


def test_onnx_export_matches_pytorch(exported_copy):
    needs("onnxscript")
    onnx, onnxruntime = needs("onnx"), needs("onnxruntime")

    best = exported_copy / "tiny" / "best"
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


def test_cli_export_onnx_prints_the_difference(exported_copy):
    needs("onnxruntime")
    study = write_study(exported_copy, "[search]\nbackbones = ['test_resnet']\n")
    best = exported_copy / "tiny" / "best"
    result = run_main("export", str(study), "--onnx")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"timm export: {best} (config.json, metrics.json, model.safetensors)"
    assert lines[1].startswith(f"onnx: {best / 'model.onnx'} (opset ")
    assert "max abs difference vs PyTorch on a batch of 8:" in lines[1]
    assert float(lines[1].rsplit(":", 1)[1]) < 1e-4
    assert len(lines) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", [b for b in TEST_BACKBONES if b != "test_resnet"])
def test_onnx_export_of_every_test_backbone_gives_pytorchs_logits(registry, tmp_path, name):
    """Checked here, not through the export's own reported difference: ONNX Runtime's logits
    on a batch of another size than the export's example are PyTorch's."""
    needs("onnxscript")
    onnxruntime = needs("onnxruntime")
    backbone = registry.get("backbones", name)
    torch.manual_seed(0)
    model = backbone.create(len(LABELS), image_size=32).eval()
    cfg = DataConfig((3, 32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    export_model(model, backbone, tmp_path / "best", LABELS, cfg, {"trial": 0})
    result = export_onnx(tmp_path / "best", batch=3)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        expected = load_model(tmp_path / "best").model(x).numpy()
    assert logits.shape == (5, len(LABELS))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert result.max_abs_diff < 1e-4


def test_export_without_a_model_is_one_clear_line(tmp_path):
    study = write_study(tmp_path, "[search]\nbackbones = ['test_resnet']\n")
    result = run_cli("export", str(study), "--onnx")  # a real process: no traceback
    assert result.returncode == 2
    assert result.stderr == (
        f"error: {tmp_path / 'tiny' / 'best'} is not an exported model (needs config.json and "
        "model.safetensors); run `automl-tl search` (best/) or `automl-tl retrain --trial N` "
        "(models/trial-N/) first\n"
    )


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


# ---------------------------------------------------------------------------------------------
# best/ is replaced whole or not at all


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class _FailingExport:
    """test_resnet whose export writes its weights, then fails (a full disk, a crash)."""

    def __init__(self, backbone):
        self.backbone = backbone

    def export(self, model, directory, *args, **kwargs):
        self.backbone.export(model, directory, *args, **kwargs)
        raise OSError(28, "No space left on device")


def _model(registry, seed):
    torch.manual_seed(seed)
    return registry.get("backbones", "test_resnet").create(len(LABELS), image_size=32)


CFG = DataConfig((3, 32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def test_a_failure_mid_export_keeps_the_old_best(registry, exported_copy):
    best = exported_copy / "tiny" / "best"
    before = _snapshot(best)
    backbone = registry.get("backbones", "test_resnet")
    with pytest.raises(OSError, match="No space left"):
        export_model(_model(registry, 1), _FailingExport(backbone), best, LABELS, CFG, {"trial": 1})
    assert _snapshot(best) == before
    with pytest.raises(TypeError):  # metrics that are not JSON: written last, after the weights
        export_model(_model(registry, 1), backbone, best, LABELS, CFG, {"trial": object()})
    assert _snapshot(best) == before
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]  # no temporary left


def test_an_interruption_while_swapping_keeps_the_old_best(registry, exported_copy, monkeypatch):
    """Between moving the old best/ aside and moving the new one in, a Ctrl-C puts it back."""
    import os

    import automl_tl.export as export

    best = exported_copy / "tiny" / "best"
    before = _snapshot(best)
    real = os.replace

    def interrupted(src, dst):
        if str(dst) == str(best) and ".best.old." not in str(src):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(export.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(
            _model(registry, 1), registry.get("backbones", "test_resnet"), best, LABELS, CFG, {}
        )
    monkeypatch.setattr(export.os, "replace", real)
    assert _snapshot(best) == before
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]


def test_a_new_export_replaces_best_whole(registry, exported_copy):
    from automl_tl.export import sha256_file

    best = exported_copy / "tiny" / "best"
    (best / "model.onnx").write_bytes(b"the old model's ONNX file")  # would describe the old model
    model = _model(registry, 2)
    digest = export_model(
        model, registry.get("backbones", "test_resnet"), best, LABELS, CFG, {"trial": 2}
    )
    assert sorted(p.name for p in best.iterdir()) == [
        "config.json",
        "metrics.json",
        "model.safetensors",
    ]
    assert digest == sha256_file(best / "model.safetensors")
    assert json.loads((best / "metrics.json").read_text()) == {"trial": 2}
    loaded = load_model(best).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]
