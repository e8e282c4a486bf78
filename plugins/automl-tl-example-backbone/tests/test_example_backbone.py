"""The template's own tests: a team keeps these when it copies the package."""

import os
import subprocess
import sys

import pytest
import torch
from automl_tl_example_backbone import ExampleBackbone
from automl_tl_example_backbone.make_weights import SOURCE_CLASSES, source_task

from automl_tl.testing import (
    assert_plugin_passes,
    check_backbone,
    check_backbone_weight_sources,
    check_backbone_weights,
)


@pytest.fixture(autouse=True)
def _only_the_plugins_a_test_names(monkeypatch):
    monkeypatch.setenv("AUTOML_TL_LOAD_PLUGINS", "")


def test_contract():
    check_backbone(ExampleBackbone())
    check_backbone_weights(ExampleBackbone())
    check_backbone_weight_sources(ExampleBackbone())


def test_the_whole_plugin_passes_the_checks():
    """What `automl-tl plugins --check example_backbone` runs."""
    results = assert_plugin_passes("example_backbone")  # the entry point's name
    assert {r.check for r in results if r.kind == "backbone"} == {
        "contract (shape, head, layer groups, data config)",
        "loads a weights file saved from itself",
        "refuses a weight source it does not know",
    }


def test_make_weights_writes_a_file_the_backbone_loads(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "weights" / "example_cnn.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "automl_tl_example_backbone.make_weights",
            str(out),
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a tiny model: one thread is plenty
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    saved = load_file(str(out))
    assert saved["head.weight"].shape == (SOURCE_CLASSES, 64)
    # trained, not random: it recognizes its source task
    backbone = ExampleBackbone()
    source = backbone.create(SOURCE_CLASSES, weights=str(out)).eval()
    x, y = source_task()
    with torch.no_grad():
        assert (source(x).argmax(1) == y).float().mean() > 0.6
    # loaded into a model for another task: body from the file, a new 3-class head
    model = backbone.create(3, weights=str(out))
    assert torch.equal(model.state_dict()["stage3.0.weight"], saved["stage3.0.weight"])
    assert model.head.weight.shape == (3, 64)
