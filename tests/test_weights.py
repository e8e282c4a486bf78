"""Local weight files: safetensors or weights_only torch checkpoints; heads replaced; clear errors."""

import pytest
import torch
from safetensors.torch import save_file

from automl_tl import UserError
from automl_tl.weights import read_state_dict

from .conftest import TEST_BACKBONES


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


@pytest.fixture
def empty_hf_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache, whatever this machine's own cache holds: the variables for
    new processes, and huggingface_hub's constant (read once at import) for this one."""
    import huggingface_hub.constants

    cache = tmp_path / "empty-hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache / "hub"))
    return cache


def test_hub_weights_offline_give_one_clear_message(registry, empty_hf_cache):
    with pytest.raises(UserError) as info:
        registry.get("backbones", "resnet18").create(10, weights="timm", image_size=32)
    message = str(info.value)
    assert "cannot get timm hub weights for 'resnet18'" in message
    assert "[weights] resnet18" in message and "\n" not in message


def _export(backbone, model, folder, labels):
    from automl_tl.components import DataConfig

    cfg = DataConfig((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    backbone.export(model, folder, labels, cfg)
    return folder


def test_local_dir_export_seeds_a_model_with_another_head(registry, tmp_path):
    backbone = registry.get("backbones", "test_resnet")
    torch.manual_seed(2)
    source = backbone.create(10, image_size=32)
    folder = _export(backbone, source, tmp_path / "best", [str(i) for i in range(10)])
    model = backbone.create(4, weights=f"local-dir:{folder}", image_size=32)
    body = [k for k in source.state_dict() if not k.startswith("fc.")]
    assert all(torch.equal(model.state_dict()[k], source.state_dict()[k]) for k in body)
    assert model.fc.out_features == 4
    # same class count: the head loads too (a study's best model seeding a sibling study)
    same = backbone.create(10, weights=f"local-dir:{folder}", image_size=32)
    assert torch.equal(same.fc.weight, source.fc.weight)


def test_local_dir_of_another_architecture_names_both(registry, tmp_path):
    convnext = registry.get("backbones", "test_convnext")
    folder = _export(convnext, convnext.create(3, image_size=32), tmp_path / "cx", ["a", "b", "c"])
    with pytest.raises(UserError, match="holds a test_convnext model, not test_resnet"):
        registry.get("backbones", "test_resnet").create(3, weights=f"local-dir:{folder}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a timm export"):
        registry.get("backbones", "test_resnet").create(
            3, weights=f"local-dir:{tmp_path / 'empty'}"
        )


def test_input_channels_are_adapted_as_timm_does(registry, tmp_path):
    import timm
    from timm.models import adapt_input_conv

    gray = timm.create_model("test_resnet", in_chans=1, num_classes=7)
    path = tmp_path / "gray.safetensors"
    save_file({k: v.contiguous() for k, v in gray.state_dict().items()}, str(path))
    backbone = registry.get("backbones", "test_resnet")
    model = backbone.create(5, weights=str(path), image_size=32)
    conv = gray.pretrained_cfg["first_conv"] + ".weight"
    expected = adapt_input_conv(3, gray.state_dict()[conv], base_chans=1)
    assert model.state_dict()[conv].shape[1] == 3
    assert torch.allclose(model.state_dict()[conv], expected)
    assert torch.allclose(model.state_dict()[conv].sum(1), gray.state_dict()[conv].sum(1))
    others = [k for k in gray.state_dict() if k != conv and not k.startswith("fc.")]
    assert all(torch.equal(model.state_dict()[k], gray.state_dict()[k]) for k in others)


def test_load_weights_reports_what_it_changed(registry, tmp_path):
    from automl_tl.weights import load_weights

    backbone = registry.get("backbones", "test_resnet")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.create(5).state_dict().items()}, str(path))
    model = backbone.create(3)
    changed = load_weights(model, path, backbone.head_parameters(model))
    assert sorted(changed["replaced_head"]) == ["fc.bias", "fc.weight"]
    assert changed["adapted_input"] == []


def test_unknown_hub_tag_lists_the_known_ones(registry):
    with pytest.raises(
        UserError, match='resnet18 has no pretrained tag "bogus"; known tags: a1_in1k, a2_in1k'
    ):
        registry.get("backbones", "resnet18").create(10, weights="timm:bogus")


def test_hub_error_names_the_file_and_both_ways_to_supply_it(registry, empty_hf_cache):
    with pytest.raises(UserError) as info:
        registry.get("backbones", "test_resnet").create(10, weights="timm", image_size=32)
    message = str(info.value)
    assert "model.safetensors from https://huggingface.co/timm/test_resnet.r160_in1k" in message
    assert "HF_HUB_OFFLINE=1" in message and "HF_HOME" in message
    assert '[weights] test_resnet = "/path/model.safetensors"' in message
    assert "\n" not in message


def test_hub_weights_load_offline_from_a_prefilled_cache(tmp_path):
    """`weights = "timm"` with HF_HUB_OFFLINE=1 reads the Hugging Face cache: no network."""
    import subprocess
    import sys

    import timm

    source = timm.create_model("test_resnet", num_classes=1000)
    snapshot = tmp_path / "hf" / "hub" / "models--timm--test_resnet.r160_in1k"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    files = snapshot / "snapshots" / ("0" * 40)
    files.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()},
        str(files / "model.safetensors"),
    )
    torch.save(source.state_dict(), tmp_path / "expected.pth")
    code = f"""
import torch
from automl_tl import registry_for
model = registry_for().get("backbones", "test_resnet").create(4, weights="timm", image_size=32)
expected = torch.load({str(tmp_path / "expected.pth")!r}, weights_only=True)
body = [k for k in expected if not k.startswith("fc.")]
assert all(torch.equal(model.state_dict()[k], expected[k]) for k in body)
assert model.fc.out_features == 4
print("loaded from cache")
"""
    env = {
        **__import__("os").environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "AUTOML_TL_LOAD_PLUGINS": "",
    }
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded from cache" in result.stdout


# ---------------------------------------------------------------------------------------------
# named weight sources are checked before anything trains (Backbone.check_weights)


@pytest.fixture
def no_model_is_built(monkeypatch):
    """The checks look names up in timm's registry: building (or downloading) is an error."""
    import timm

    def refuse(*args, **kwargs):
        raise AssertionError("a weight-source check must not build a model")

    monkeypatch.setattr(timm, "create_model", refuse)


@pytest.mark.parametrize("name", TEST_BACKBONES)
def test_every_hub_tag_timm_knows_passes_the_check(registry, name, no_model_is_built):
    import timm

    backbone = registry.get("backbones", name)
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{name}.*")]
    assert tags == backbone.pretrained_tags() and tags  # e.g. test_resnet.r160_in1k
    for source in ["none", "timm", *(f"timm:{tag}" for tag in tags)]:
        backbone.check_weights(source)
    with pytest.raises(UserError, match=f'{name} has no pretrained tag "in1k_typo"; known tags: '):
        backbone.check_weights("timm:in1k_typo")


def test_unknown_sources_are_refused_listing_what_the_backbone_takes(registry, no_model_is_built):
    resnet = registry.get("backbones", "test_resnet")
    with pytest.raises(UserError) as info:
        resnet.check_weights("timn")
    assert str(info.value) == (
        'test_resnet has no weight source "timn" (did you mean "timm"?); it takes "timm" '
        '(default tag r160_in1k) or "timm:TAG"; known tags: r160_in1k'
    )
    with pytest.raises(UserError, match='no weight source "torchvison:IMAGENET1K_V1"; it takes'):
        resnet.check_weights("torchvison:IMAGENET1K_V1")
    with pytest.raises(UserError, match='did you mean "a1_in1k"'):
        registry.get("backbones", "resnet50").check_weights("timm:a1_in1kk")
    with pytest.raises(UserError, match="^resnet200 has no pretrained weights in timm$"):
        registry.get("backbones", "resnet200").check_weights("timm")  # an architecture only


def test_a_backbone_without_named_sources_refuses_them():
    from torch import nn

    from automl_tl import Backbone

    class Plain(Backbone):
        name = "plain"

        def create(self, num_classes, weights="none", image_size=None):
            return nn.Linear(4, num_classes)

    Plain().check_weights("none")
    with pytest.raises(UserError, match='^plain has no weight source "timm": it defines no named'):
        Plain().check_weights("timm")


def _config(tmp_path, weights: str):
    from automl_tl.config import load_config

    from .conftest import write_study

    return load_config(
        write_study(
            tmp_path,
            f"""
            [data]
            source = "digits:0-2"
            image_size = 32
            [search]
            backbones = ["test_resnet", "test_vit"]
            [weights]
            {weights}
            """,
        )
    )


def test_check_names_asks_each_backbone_about_each_named_source(registry, tmp_path):
    from automl_tl.errors import ConfigError
    from automl_tl.search import check_names

    (tmp_path / "w.safetensors").write_bytes(b"")  # files are checked when the file is read
    good = 'test_resnet = "timm:r160_in1k"\ndefault = "timm"'
    check_names(_config(tmp_path, good), registry)
    check_names(_config(tmp_path, 'default = ["timm", "none", "w.safetensors"]'), registry)
    with pytest.raises(ConfigError) as info:
        check_names(_config(tmp_path, 'default = ["none", "timm:in1k_typo"]'), registry)
    assert str(info.value) == (
        '[weights] default = "timm:in1k_typo": test_resnet has no pretrained tag "in1k_typo"; '
        'known tags: r160_in1k (or use "none", a file, "local-dir:DIR", "pretrain:SOURCE")'
    )
    with pytest.raises(
        ConfigError, match='^\\[weights\\] test_vit = "timn": test_vit has no weight'
    ):
        check_names(_config(tmp_path, 'test_vit = "timn"'), registry)


def test_a_mistyped_hub_tag_stops_the_search_before_any_trial(tmp_path):
    from .conftest import run_main, write_study

    study = write_study(
        tmp_path,
        """
        [data]
        source = "digits:0-2"
        image_size = 32
        [search]
        n_trials = 2
        backbones = ["test_resnet"]
        augmentations = ["none"]
        unfreeze = ["top_k"]
        epochs = 1
        pruner = "none"
        [weights]
        test_resnet = "timm:in1k_typo"
        """,
    )
    result = run_main("search", str(study), "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (
        'error: [weights] test_resnet = "timm:in1k_typo": test_resnet has no pretrained tag '
        '"in1k_typo"; known tags: r160_in1k (or use "none", a file, "local-dir:DIR", '
        '"pretrain:SOURCE")\n'
    )
    assert not (tmp_path / "tiny" / "optuna.db").exists()  # no study, so no trial
    retrain = run_main("retrain", str(study), "--device", "cpu")  # the same check, the same words
    assert retrain.returncode == 2 and retrain.stderr == result.stderr


def test_pretrain_init_is_checked_before_the_data_is_read(registry, tmp_path, no_model_is_built):
    from automl_tl.errors import ConfigError
    from automl_tl.pretrain import PretrainSpec, pretrain

    spec = PretrainSpec(backbone="test_resnet", source="digits:0-4", init="timm:bogus")
    with pytest.raises(ConfigError, match='^--init "timm:bogus": test_resnet has no pretrained'):
        pretrain(spec, tmp_path / "w.safetensors", registry, base_dir=tmp_path)
    assert not list(tmp_path.iterdir())
