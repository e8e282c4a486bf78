"""The plugin manager: defaults, entry points, explicit modules and files, clear errors."""

import json
import re
import textwrap

import pytest

from automl_tl import PluginError, Registry, get_plugin_manager, hookspecs
from automl_tl.plugins import DEFAULT_PLUGINS

from .conftest import REPO, needs, run_main

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
        "crop",
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
        "bitfit",
        "norm_fit",
        "lora",
    }
    assert set(registry.names("datasets")) == {"digits", "digit_pairs", "folder", "csv"}
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
    needs("automl_tl_example_backbone")
    monkeypatch.setenv("AUTOML_TL_LOAD_PLUGINS", "example_backbone")
    pm, infos = get_plugin_manager()
    assert infos["example_backbone"].source == "entry point"
    assert "example_cnn" in Registry.from_plugin_manager(pm).names("backbones")
    monkeypatch.setenv("AUTOML_TL_LOAD_PLUGINS", "")
    pm, infos = get_plugin_manager()
    assert "example_backbone" not in infos


def test_plugins_command_json(tmp_path):
    path = _plugin_file(tmp_path)
    result = run_main("plugins", "--format", "json", "--plugin", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= {"backbones", "augmentation_policies", "unfreeze_strategies", "datasets"}
    assert {"name": "team_resnet", "plugin": "team_backbone"} in data["backbones"]
    assert {"name": "lp_ft", "plugin": "automl_tl.default_plugins.unfreeze"} in data[
        "unfreeze_strategies"
    ]


def test_every_hook_is_documented():
    """Every hookspec is documented with its signature and an example implementation (as
    datasette does). That each is called by a real search, with every argument of its spec,
    is tests/test_end_to_end.py::test_every_hookspec_is_called_in_a_real_search."""
    import inspect

    hooks = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "automl_tl_spec")]
    assert len(hooks) == 10
    docs = (REPO / "docs" / "writing-plugins.md").read_text()
    examples = "".join(re.findall(r"```python\n(.*?)```", docs, flags=re.S))
    for hook in hooks:
        args = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
        assert f"### `{hook}({args})`" in docs, (
            f"docs/writing-plugins.md needs a section `{hook}({args})`"
        )
        assert f"def {hook}(" in examples, f"docs/writing-plugins.md has no example of {hook}"


def test_every_contract_check_is_documented():
    import automl_tl.testing as testing

    docs = (REPO / "docs" / "writing-plugins.md").read_text()
    public = [
        name
        for name, obj in vars(testing).items()
        if callable(obj) and not name.startswith("_") and obj.__module__ == testing.__name__
    ]
    assert {"check_backbone", "check_plugin", "assert_plugin_passes"} <= set(public)
    for name in public:
        assert f"`{name}" in docs, f"automl_tl.testing.{name} is not in docs/writing-plugins.md"


@pytest.mark.parametrize("package", sorted(p.name for p in (REPO / "plugins").iterdir()))
def test_plugin_packages_are_separately_installable_and_tested(package):
    """Each plugins/* package: own pyproject with an automl_tl entry point, README, tests,
    and installed (make test installs every one, so CI runs their tests)."""
    import importlib.metadata

    import tomllib

    folder = REPO / "plugins" / package
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    assert project["name"] == package
    (entry_point,) = project["entry-points"]["automl_tl"].items()
    assert (folder / "README.md").is_file()
    assert list((folder / "tests").glob("test_*.py")), f"{package} has no tests"
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="automl_tl")}
    assert installed.get(entry_point[0]) == entry_point[1], f"{package} is not installed"


TINY = """
import torch
from torch import nn

import automl_tl
from automl_tl.weights import load_weights


class Tiny(automl_tl.Backbone):
    name = "tiny_cnn"

    def create(self, num_classes, weights="none", image_size=None):
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(8, num_classes),
        )
        if weights != "none":
            load_weights(model, weights, self.head_parameters(model))
        return model
"""

GOOD = (
    TINY
    + """

@automl_tl.hookimpl
def register_backbones(register):
    register(Tiny())
"""
)

BROKEN = (
    TINY
    + """

class Forgetful(Tiny):  # ignores its weights file
    name = "forgetful"

    def create(self, num_classes, weights="none", image_size=None):
        return super().create(num_classes, "none", image_size)


class Shifty(automl_tl.AugmentationPolicy):  # not the identity at strength 0
    name = "shifty"

    def build(self, strength, image_size):
        return _Add(0.1)


class _Add(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x):
        return (x + self.v).clamp(0, 1)


@automl_tl.hookimpl
def register_backbones(register):
    register(Forgetful())


@automl_tl.hookimpl
def register_augmentation_policies(register):
    register(Shifty())


@automl_tl.hookimpl
def register_backbone(register):  # misspelt
    pass


@automl_tl.hookimpl
def epoch_finished(study_name, trial_number, epoch, metrics):
    metrics["val"]["top5"]  # a key that does not exist


@automl_tl.hookimpl
def trial_finished(study_name, trial_number, state, value, attrs):
    print(f"{value:.3f}")  # value is None for failed and pruned trials
"""
)


def test_check_plugin_names_each_problem_in_words_an_author_can_act_on(tmp_path):
    from automl_tl.testing import check_plugin

    path = _plugin_file(tmp_path, name="broken_plugin", body=BROKEN)
    results = {(r.kind, r.name, r.check): r for r in check_plugin(str(path))}
    failed = {k: r.problem for k, r in results.items() if not r.ok}
    assert failed.keys() == {
        ("plugin", "broken_plugin", "hook register_backbone exists"),
        ("backbone", "forgetful", "loads a weights file saved from itself"),
        ("augmentation policy", "shifty", "contract (identity at 0, shape, range, seed)"),
        ("hook", "epoch_finished", "runs through a miniature search"),
        ("hook", "trial_finished", "runs through a miniature search"),
    }
    assert (
        'did you mean "register_backbones"'
        in failed[("plugin", "broken_plugin", "hook register_backbone exists")]
    )
    assert "unloaded" in failed[("backbone", "forgetful", "loads a weights file saved from itself")]
    assert (
        "load_weights"
        in failed[("backbone", "forgetful", "loads a weights file saved from itself")]
    )
    assert (
        "strength 0.0 must return the batch unchanged"
        in failed[("augmentation policy", "shifty", "contract (identity at 0, shape, range, seed)")]
    )
    epoch = failed[("hook", "epoch_finished", "runs through a miniature search")]
    assert "raised KeyError: 'top5' at broken_plugin.py:" in epoch
    trial = failed[("hook", "trial_finished", "runs through a miniature search")]
    assert "raised TypeError" in trial and "NoneType" in trial
    assert results[
        ("backbone", "forgetful", "contract (shape, head, layer groups, data config)")
    ].ok


def test_check_plugin_reports_import_failures_and_empty_plugins(tmp_path):
    from automl_tl.testing import check_plugin

    (result,) = check_plugin(str(_plugin_file(tmp_path, name="boom", body="raise OSError('x')\n")))
    assert not result.ok and "failed to import: OSError: x" in result.problem
    empty = check_plugin(str(_plugin_file(tmp_path, name="empty", body="import automl_tl\n")))
    assert [r.check for r in empty if not r.ok] == ["does something"]


def test_plugins_check_command(tmp_path):
    good = _plugin_file(tmp_path, name="good", body=GOOD)
    ok = run_main("plugins", "--check", str(good))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [
        f"checking plugin {good}",
        "  ok    plugin good: loads (file)",
        "  ok    backbone tiny_cnn: contract (shape, head, layer groups, data config)",
        "  ok    backbone tiny_cnn: loads a weights file saved from itself",
        "  ok    backbone tiny_cnn: refuses a weight source it does not know",
        "4 passed, 0 failed",
    ]
    broken = _plugin_file(tmp_path, name="broken_plugin", body=BROKEN)
    bad = run_main("plugins", "--check", str(broken))
    assert bad.returncode == 1, bad.stderr
    assert "5 failed" in bad.stdout.splitlines()[-1]
    assert "  FAIL  augmentation policy shifty: contract" in bad.stdout
    assert "        policy 'shifty': strength 0.0 must return the batch unchanged" in bad.stdout


def test_plugins_command_shows_version_source_and_hooks(tmp_path):
    tracker = _plugin_file(
        tmp_path,
        name="tracker",
        body="""
        import automl_tl

        @automl_tl.hookimpl
        def trial_started(study_name, trial_number, params, output_dir):
            pass

        @automl_tl.hookimpl
        def study_finished(study_name, best):
            pass
        """,
    )
    result = run_main("plugins", "--plugin", str(tracker), "--plugin", "automl_tl_example_backbone")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    version = __import__("automl_tl").__version__
    assert f"automl_tl.default_plugins.unfreeze {version} [default] " in result.stdout
    assert (
        "  unfreeze strategies (7): bitfit, gradual, layer_decay, lora, lp_ft, norm_fit, top_k"
        in lines
    )
    assert f"tracker - [file] {tracker}" in lines
    assert lines[lines.index(f"tracker - [file] {tracker}") + 1] == (
        "  lifecycle hooks: trial_started, study_finished"
    )
    assert any(line.startswith("automl_tl_example_backbone 0.1.0 [module] ") for line in lines)
    data = json.loads(run_main("plugins", "--format", "json", "--plugin", str(tracker)).stdout)
    (entry,) = [p for p in data["plugins"] if p["name"] == "tracker"]
    assert entry == {
        "name": "tracker",
        "source": "file",
        "version": None,
        "location": str(tracker),
        "registers": {},
        "hooks": ["trial_started", "study_finished"],
    }


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
    # a linear probe needs features to probe: from random init the search offers only
    # from_scratch strategies (automl_tl/space.py), so the body starts from a weights file
    from safetensors.torch import save_file

    from automl_tl import registry_for

    body = registry_for().get("backbones", "test_resnet").create(2, image_size=32)
    save_file(
        {k: v.contiguous() for k, v in body.state_dict().items()}, str(tmp_path / "w.safetensors")
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
            [weights]
            default = "w.safetensors"
            """
        )
    )
    result = run_main("search", str(study), "--no-retrain")
    assert result.returncode == 0, result.stderr
    report = json.loads(run_main("report", str(study), "--format", "json", "--no-files").stdout)
    assert [t["params"]["unfreeze"] for t in report["trials"]] == ["head_only", "head_only"]
    assert all(t["state"] == "COMPLETE" for t in report["trials"])
