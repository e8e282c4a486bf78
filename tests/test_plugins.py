"""The plugin manager: defaults, entry points, explicit modules and files, clear errors."""

import json
import textwrap

import pytest

from automl_tl import PluginError, Registry, get_plugin_manager, hookspecs
from automl_tl.plugins import DEFAULT_PLUGINS

from .conftest import run_cli

BACKBONE_PLUGIN = """
import automl_tl
from automl_tl.default_plugins.timm_backbones import TimmBackbone


class Renamed(TimmBackbone):
    def __init__(self):
        super().__init__("test_resnet")
        self.name = "{name}"


@automl_tl.hookimpl
def register_backbones(register):
    register(Renamed())
"""


def _plugin_file(tmp_path, name="team_backbone", body=None):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body or BACKBONE_PLUGIN.format(name="team_resnet")))
    return path


def test_default_plugins_register_every_kind():
    pm, infos = get_plugin_manager()
    registry = Registry.from_plugin_manager(pm)
    assert [i for i in infos if infos[i].source == "default"] == list(DEFAULT_PLUGINS)
    assert {"test_resnet", "test_vit", "test_convnext", "test_efficientnet"} <= set(
        registry.list_backbones("test_*")
    )
    assert set(registry.names("augmentation_policies")) >= {
        "none",
        "flip_crop",
        "color",
        "randaugment",
        "trivialaugment",
        "autoaugment",
    }
    assert set(registry.names("unfreeze_strategies")) == {
        "top_k",
        "gradual",
        "lp_ft",
        "layer_decay",
    }
    assert set(registry.names("datasets")) == {"digits", "folder", "csv"}
    assert (
        registry.plugin_of("backbones", "test_resnet") == "automl_tl.default_plugins.timm_backbones"
    )


def test_plugin_file_is_loaded_and_attributed(tmp_path):
    path = _plugin_file(tmp_path)
    pm, infos = get_plugin_manager([str(path)])
    registry = Registry.from_plugin_manager(pm)
    assert registry.plugin_of("backbones", "team_resnet") == "team_backbone"
    assert infos["team_backbone"].source == "file"


def test_duplicate_name_names_both_plugins(tmp_path):
    path = _plugin_file(tmp_path, body=BACKBONE_PLUGIN.format(name="test_resnet"))
    pm, _ = get_plugin_manager([str(path)])
    with pytest.raises(PluginError) as info:
        Registry.from_plugin_manager(pm)
    message = str(info.value)
    assert "backbone 'test_resnet' is registered twice" in message
    assert "automl_tl.default_plugins.timm_backbones" in message and "team_backbone" in message


def test_misspelt_hook_fails_loudly(tmp_path):
    path = _plugin_file(
        tmp_path,
        body="""
        import automl_tl

        @automl_tl.hookimpl
        def register_backbone(register):
            pass
        """,
    )
    with pytest.raises(PluginError, match="register_backbone"):
        get_plugin_manager([str(path)])


def test_plugin_that_fails_to_import_is_named(tmp_path):
    path = _plugin_file(tmp_path, name="broken", body="raise RuntimeError('boom')\n")
    with pytest.raises(
        PluginError, match=r"plugin .*broken.py failed to import: RuntimeError: boom"
    ):
        get_plugin_manager([str(path)])


def test_registering_a_non_component_is_rejected(tmp_path):
    path = _plugin_file(
        tmp_path,
        name="wrong",
        body="""
        import automl_tl

        @automl_tl.hookimpl
        def register_augmentation_policies(register):
            register(object())
        """,
    )
    pm, _ = get_plugin_manager([str(path)])
    with pytest.raises(PluginError, match="not an instance of automl_tl.AugmentationPolicy"):
        Registry.from_plugin_manager(pm)


def test_entry_point_plugin_is_found_when_allowed(monkeypatch):
    pytest.importorskip("automl_tl_example_backbone", reason="make test installs plugins/*")
    monkeypatch.setenv("AUTOML_TL_LOAD_PLUGINS", "example_backbone")
    pm, infos = get_plugin_manager()
    assert infos["example_backbone"].source == "entry point"
    assert "example_cnn" in Registry.from_plugin_manager(pm).names("backbones")
    monkeypatch.setenv("AUTOML_TL_LOAD_PLUGINS", "")
    pm, infos = get_plugin_manager()
    assert "example_backbone" not in infos


def test_plugins_command_json(tmp_path):
    path = _plugin_file(tmp_path)
    result = run_cli("plugins", "--format", "json", "--plugin", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= {"backbones", "augmentation_policies", "unfreeze_strategies", "datasets"}
    assert {"name": "team_resnet", "plugin": "team_backbone"} in data["backbones"]
    assert {"name": "lp_ft", "plugin": "automl_tl.default_plugins.unfreeze"} in data[
        "unfreeze_strategies"
    ]


def test_every_hook_is_tested_and_documented():
    """Every hookspec is exercised somewhere in tests/ and documented (as datasette does)."""
    from pathlib import Path

    hooks = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "automl_tl_spec")]
    assert len(hooks) == 8
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    docs = (Path(__file__).parent.parent / "docs" / "writing-plugins.md").read_text()
    for hook in hooks:
        assert f"def {hook}(" in tests, f"hook {hook} has no test implementing it"
        assert f"`{hook}" in docs, f"hook {hook} is not documented in docs/writing-plugins.md"


def test_third_party_dataset_and_strategy_are_searched(tmp_path):
    """A plugin file adds a dataset source and an unfreeze strategy; a study uses both."""
    (tmp_path / "team.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            import automl_tl


            class Stripes(automl_tl.DatasetSource):
                name = "stripes"

                def load(self, argument, base_dir):
                    rng = np.random.default_rng(0)
                    records = []
                    for i in range(60):
                        label = i % 2
                        img = (rng.random((12, 12)) * 60).astype(np.uint8)
                        if label:
                            img[:, ::3] = 255
                        else:
                            img[::3, :] = 255
                        records.append(automl_tl.Record(img, ["horizontal", "vertical"][label]))
                    return automl_tl.Dataset(records)


            class HeadOnly(automl_tl.UnfreezeStrategy):
                name = "head_only"

                def param_groups(self, groups, head, depth):
                    return [automl_tl.ParamGroup(list(head))]


            @automl_tl.hookimpl
            def register_datasets(register):
                register(Stripes())


            @automl_tl.hookimpl
            def register_unfreeze_strategies(register):
                register(HeadOnly())
            """
        )
    )
    study = tmp_path / "s.toml"
    study.write_text(
        textwrap.dedent(
            """
            name = "s"
            plugins = ["team.py"]
            [data]
            source = "stripes"
            image_size = 32
            [search]
            n_trials = 2
            backbones = ["test_resnet"]
            augmentations = ["none"]
            unfreeze = ["head_only"]
            epochs = 1
            pruner = "none"
            """
        )
    )
    result = run_cli("search", str(study), "--no-retrain")
    assert result.returncode == 0, result.stderr
    report = json.loads(run_cli("report", str(study), "--format", "json").stdout)
    assert [t["params"]["unfreeze"] for t in report["trials"]] == ["head_only", "head_only"]
    assert all(t["state"] == "COMPLETE" for t in report["trials"])
