"""torchvision backbones: every model's layer groups, the contract on one model per family,
torchvision's weights enums (from a pre-filled cache: nothing is downloaded), and a search."""

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import warnings

import pytest
import torch
import torchvision
from automl_tl_torchvision import TorchvisionBackbone, model_names

import automl_tl
from automl_tl.testing import (
    assert_plugin_passes,
    check_backbone,
    check_backbone_weight_sources,
    check_backbone_weights,
)

# one model per family, small enough to build in a moment and to run at 32 px
FAMILIES = [
    "resnet18",  # stem + stages
    "squeezenet1_1",  # a convolutional head
    "mnasnet0_5",  # refuses state dicts without torchvision's metadata, unless fixed
    "googlenet",  # auxiliary classifiers off
]


@pytest.fixture(autouse=True)
def _only_the_plugins_a_test_names(monkeypatch):
    # installed plugins stay out unless a test loads them (as in automl-tl's own tests)
    monkeypatch.setenv("AUTOML_TL_LOAD_PLUGINS", "")


def _build(backbone, image_size=224):
    """The model without its weights' memory where torchvision allows it (meta tensors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return backbone.create(5, image_size=image_size)
        except NotImplementedError:  # RegNet's init copies tensors
            return backbone.create(5, image_size=image_size)


def test_every_classification_model_is_registered():
    registry = automl_tl.registry_for(["automl_tl_torchvision"])
    names = registry.list_backbones("tv_*")
    assert names == [f"tv_{n}" for n in model_names()]
    assert {"tv_resnet50", "tv_vit_b_16", "tv_convnext_tiny", "tv_swin_t"} <= set(names)
    assert not any("rcnn" in n or "deeplab" in n or "r3d" in n for n in names)
    assert registry.plugin_of("backbones", "tv_resnet18") == "automl_tl_torchvision"


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in model_names()
        if torchvision.models.get_model_weights(n).DEFAULT.meta["num_params"] < 100e6
    ],
)
def test_layer_groups_of_every_model(name):
    """Ordered input -> output, disjoint, head excluded, everything covered, several groups."""
    backbone = TorchvisionBackbone(name)
    model = _build(backbone)
    names = [n for n, _ in model.named_parameters()]
    head = backbone.head_parameters(model)
    groups = backbone.layer_groups(model)
    flat = [n for g in groups for n in g]
    assert head and all(n.endswith((".weight", ".bias")) for n in head)
    assert sorted(flat + head) == sorted(names)
    assert len(flat) == len(set(flat))
    order = {n: i for i, n in enumerate(names)}
    firsts = [min(order[n] for n in g) for g in groups]
    assert firsts == sorted(firsts)
    assert len(groups) >= 4, [g[0] for g in groups]
    out_features = getattr(model.get_submodule(head[0].rsplit(".", 1)[0]), "out_features", 5)
    assert out_features == 5


def test_groups_follow_the_architecture():
    resnet = TorchvisionBackbone("resnet18")
    model = resnet.create(3)
    stems = [g[0].split(".")[0] for g in resnet.layer_groups(model)]
    assert stems == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert "bn1.weight" in resnet.layer_groups(model)[0]  # the stem's norm with its conv
    assert resnet.head_parameters(model) == ["fc.weight", "fc.bias"]
    vit = TorchvisionBackbone("vit_b_32")
    groups = vit.layer_groups(_build(vit, 64))
    assert len(groups) == 14  # patch embedding + 12 encoder blocks + final norm
    assert groups[0][:2] == ["class_token", "conv_proj.weight"]
    assert groups[1][0] == "encoder.pos_embedding"
    assert groups[-1] == ["encoder.ln.weight", "encoder.ln.bias"]


@pytest.mark.parametrize("name", FAMILIES)
def test_contract(name):
    backbone = TorchvisionBackbone(name)
    check_backbone(backbone)
    check_backbone_weights(backbone)
    check_backbone_weight_sources(backbone)


def test_whole_plugin_passes_the_contract_check():
    registry = automl_tl.registry_for(["automl_tl_torchvision"])
    assert len(registry.list_backbones("tv_*")) > 70
    results = assert_plugin_passes("automl_tl_torchvision", only="tv_squeezenet1_1")
    assert [r.name for r in results if r.kind == "backbone"] == ["tv_squeezenet1_1"] * 3


def _fill_cache(tmp_path, monkeypatch, name, tag="DEFAULT"):
    """Put a checkpoint where torchvision keeps downloaded weights, as a connected machine would."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.get_model_weights(name)[tag]
    torch.manual_seed(123)
    state = torchvision.models.get_model(name, weights=None).state_dict()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / os.path.basename(weights.url))
    return weights, state


def test_torchvision_weights_come_from_the_enum(tmp_path, monkeypatch):
    weights, state = _fill_cache(tmp_path, monkeypatch, "mobilenet_v3_small")
    backbone = TorchvisionBackbone("mobilenet_v3_small")
    assert backbone.torchvision_weights("torchvision") is weights
    assert backbone.torchvision_weights("torchvision:IMAGENET1K_V1") is weights
    model = backbone.create(4, weights="torchvision", image_size=32)
    own = model.state_dict()
    head = set(backbone.head_parameters(model))
    assert all(torch.equal(own[k], v) for k, v in state.items() if k not in head)
    assert own["classifier.3.weight"].shape == (4, 1024)
    cfg = backbone.data_config(model)
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.input_size == (3, 224, 224)


def test_weights_errors_say_what_to_do(monkeypatch, tmp_path):
    backbone = TorchvisionBackbone("resnet18")
    with pytest.raises(automl_tl.UserError, match="torchvision:IMAGENET1K_V1"):
        backbone.create(3, weights="torchvision:IMAGENET9K")
    with pytest.raises(automl_tl.UserError, match='tv_resnet18 = "torchvision"'):
        backbone.create(3, weights="timm")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(automl_tl.UserError) as info:
        backbone.create(3, weights="torchvision")
    message = str(info.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in message and "checkpoints" in message
    assert "[weights] tv_resnet18" in message


def test_weight_sources_are_checked_against_the_enum_before_anything_runs(tmp_path):
    """check_weights looks the tag up in the weights enum (nothing downloaded, nothing built);
    a search's check_names turns a refusal into one message naming the [weights] entry."""
    from automl_tl.config import config_from_dict
    from automl_tl.search import check_names

    backbone = TorchvisionBackbone("resnet18")
    for source in ("none", "torchvision", "torchvision:IMAGENET1K_V1", "torchvision:DEFAULT"):
        backbone.check_weights(source)
    with pytest.raises(automl_tl.UserError, match='did you mean "torchvision"'):
        backbone.check_weights("torchvison:IMAGENET1K_V1")
    with pytest.raises(automl_tl.UserError, match='tv_resnet18 = "torchvision"'):
        backbone.check_weights("timm:a1_in1k")

    registry = automl_tl.registry_for(["automl_tl_torchvision"])

    def config(weights):
        raw = {
            "name": "tv",
            "data": {"source": "digits:0-2", "image_size": 32},
            "search": {"backbones": ["tv_resnet18", "test_resnet"]},
            "weights": weights,
        }
        return config_from_dict(raw, tmp_path / "tv.toml")

    check_names(
        config({"tv_resnet18": "torchvision:IMAGENET1K_V1", "test_resnet": "timm"}), registry
    )
    with pytest.raises(automl_tl.UserError) as info:
        check_names(config({"tv_resnet18": "torchvision:IMAGENET1K_V9"}), registry)
    assert str(info.value) == (
        '[weights] tv_resnet18 = "torchvision:IMAGENET1K_V9": tv_resnet18 has no torchvision '
        "weights 'IMAGENET1K_V9' (did you mean \"IMAGENET1K_V1\"?); choose one of "
        'torchvision:IMAGENET1K_V1, torchvision:DEFAULT (or use "none", a file, '
        '"local-dir:DIR", "pretrain:SOURCE")'
    )
    with pytest.raises(
        automl_tl.UserError, match='^\\[weights\\] default = "torchvision": test_resnet'
    ):
        check_names(config({"default": "torchvision"}), registry)  # not a timm source


def test_a_study_searches_exports_and_reports_a_torchvision_backbone(tmp_path, monkeypatch):
    """Loaded through its entry point, with [weights] from torchvision's enum (cached)."""
    _fill_cache(tmp_path, monkeypatch, "squeezenet1_1")
    study = tmp_path / "tv.toml"
    study.write_text(
        textwrap.dedent(
            """
            name = "tv"
            [data]
            source = "digits:0-2"
            image_size = 32
            [search]
            n_trials = 1
            backbones = ["tv_squeezenet1_1"]
            augmentations = ["none"]
            unfreeze = ["top_k"]
            epochs = 1
            pruner = "none"
            [weights]
            tv_squeezenet1_1 = "torchvision:IMAGENET1K_V1"
            """
        )
    )
    env = {**os.environ, "AUTOML_TL_LOAD_PLUGINS": "torchvision", "OMP_NUM_THREADS": "1"}

    def cli(*args):
        result = subprocess.run(
            [sys.executable, "-m", "automl_tl.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
        return result

    cli("search", str(study))
    best = tmp_path / "tv" / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["automl_tl"]["backbone"] == "tv_squeezenet1_1"
    report = json.loads(cli("report", str(study), "--format", "json", "--no-files").stdout)
    assert report["trials"][0]["params"]["backbone"] == "tv_squeezenet1_1"
    loaded = automl_tl.load_model(best, registry=automl_tl.registry_for(["automl_tl_torchvision"]))
    assert loaded.label_names == ["0", "1", "2"]
    assert loaded.predict(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))[0][0][0] in "012"


def test_a_hub_cache_file_that_would_run_code_is_refused(tmp_path, monkeypatch):
    """torchvision unpickles its hub cache in full; the plugin reads it with weights_only=True."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    backbone = TorchvisionBackbone("squeezenet1_1")
    weights = backbone.torchvision_weights("torchvision")
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"w": Evil()}, checkpoints / os.path.basename(weights.url))
    with pytest.raises(automl_tl.UserError, match="cannot get torchvision weights"):
        backbone.create(3, weights="torchvision", image_size=64)
    assert not marker.exists()
