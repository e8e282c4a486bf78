"""Transfer pays: pretrained weights beat random init at the same budget on a few-label task.

Also the pieces that make the comparison: ``[data] max_per_class``, the ``weights`` search
parameter (``[weights]`` lists), ``[pretrain]``, and the transferred-vs-scratch report.
"""

import json

import optuna
import pytest

from automl_tl import ConfigError, config_from_dict, load_config, registry_for
from automl_tl.data import prepare_data
from automl_tl.plugins import get_plugin_manager
from automl_tl.search import search
from automl_tl.space import choice_from_params, suggest

from .conftest import run_main, write_study

# Source task digits 0-4, target task digits 5-9 with at most 10 labelled images per class
# (train + val), the same search budget for both weight sources.
FEW_LABELS = """
[data]
source = "digits:5-9"
image_size = 32
max_per_class = 10
seed = 0

[search]
n_trials = {n_trials}
sampler = "random"
pruner = "none"
backbones = ["test_resnet"]
augmentations = ["none"]
unfreeze = ["top_k"]
lr = [1e-3, 1e-2]
epochs = 4
batch_size = 16

[pretrain]
epochs = 3
batch_size = 32

[weights]
default = {weights}
"""


def _study(tmp_path, name, weights, n_trials):
    body = FEW_LABELS.format(weights=weights, n_trials=n_trials)
    return load_config(write_study(tmp_path, body, name=name))


@pytest.fixture
def source_weights(tmp_path, pretrained_digits):
    """The pretrain:digits:0-4 weights of FEW_LABELS: the session's (tests/shared.py), whose
    settings are the ones these studies ask for, so the study finds them up to date."""
    from automl_tl.pretrain import PretrainSpec, study_specs

    from .shared import PRETRAIN_SPEC

    config = _study(tmp_path / "src", "src", '"pretrain:digits:0-4"', 1)
    ((spec, path),) = study_specs(config)
    assert spec == PretrainSpec(**PRETRAIN_SPEC)
    assert path.name == pretrained_digits.path.name
    return pretrained_digits.path.parent


def _seed_cache(source_weights, study_output):
    """Copy the pretrained weights in: same inputs, same key, so the study finds them cached."""
    import shutil

    shutil.copytree(source_weights, study_output / "pretrained")


@pytest.mark.slow
def test_pretrained_beats_random_init_at_the_same_budget(tmp_path, source_weights):
    """The proof, small: the best retrained model of each study, on the same test split."""
    registry = registry_for()
    pm, _ = get_plugin_manager()
    tests = {}
    _seed_cache(source_weights, tmp_path / "transfer")
    for name, weights in (("transfer", '"pretrain:digits:0-4"'), ("scratch", '"none"')):
        config = _study(tmp_path, name, weights, n_trials=3)
        outcome = search(config, registry, pm, device="cpu")
        assert outcome.finished == 3
        data = outcome.metrics["data"]
        assert data["sizes"]["train"] + data["sizes"]["val"] <= 5 * 10  # <= 10 labels per class
        tests[name] = outcome.metrics["test"]["accuracy"]
    print(f"transfer {tests['transfer']:.4f} vs scratch {tests['scratch']:.4f}")
    assert tests["transfer"] > tests["scratch"] + 0.1, tests


def test_max_per_class_limits_labels_not_the_test_split(registry):
    full = prepare_data(registry, "digits:5-9", image_size=16, seed=3)
    few = prepare_data(registry, "digits:5-9", image_size=16, seed=3, max_per_class=10)
    assert few.test.names == full.test.names  # the score is measured on the same images
    for c in range(5):
        train, val = int((few.train.y == c).sum()), int((few.val.y == c).sum())
        assert train + val == 10 and val >= 1 and train >= 1
    assert set(few.train.names) <= set(full.train.names)
    assert set(few.val.names) <= set(full.val.names)
    assert few.split_hash != full.split_hash  # a capped study is another study


def test_weights_list_is_a_searched_parameter(tmp_path, registry):
    config = _study(tmp_path, "t", '["pretrain:digits:0-4", "none"]', n_trials=2)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        choice = suggest(trial, config, registry)
        source = trial.params["weights"]
        seen.add(source)
        expected = (
            "none" if source == "none" else str(config.pretrained_path("test_resnet", "digits:0-4"))
        )
        assert choice.weights == expected
        assert choice_from_params(trial.params, config).weights == expected
        study.tell(trial, 0.5)
    assert seen == {"pretrain:digits:0-4", "none"}


def test_a_fixed_source_adds_no_parameter(tmp_path, registry):
    config = _study(tmp_path, "t", '"none"', n_trials=2)
    trial = optuna.create_study().ask()
    assert suggest(trial, config, registry).weights == "none" and "weights" not in trial.params


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"default": []}, "list each source once, at least one"),
        ({"default": ["none", "none"]}, "list each source once"),
        (
            {"default": ["timm", "none"], "test_resnet": ["pretrain:digits:0-4", "none"]},
            "[weights] lists differ",
        ),
        ({"default": "pretrain:"}, "write pretrain:SOURCE"),
        ({"default": "local-dir:nowhere"}, "is not a timm export (no config.json)"),
        ({"default": ["none", "missing.safetensors"]}, "file"),
        ({"default": 3}, "[weights] must map backbone names to"),
    ],
)
def test_bad_weight_sources_name_the_fix(tmp_path, weights, message):
    raw = {"name": "t", "search": {"backbones": ["test_resnet"]}, "weights": weights}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, tmp_path / "t.toml")
    assert message in str(info.value)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"data": {"max_per_class": 1}}, "[data] max_per_class = 1 is too small"),
        (
            {"pretrain": {"epoch": 3}},
            "unknown key 'epoch' in [pretrain] (did you mean \"epochs\"?)",
        ),
        ({"pretrain": {"aug_strength": 2.0}}, "[pretrain] aug_strength = 2.0 is too large"),
    ],
)
def test_few_label_and_pretrain_settings_are_validated(tmp_path, raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"name": "t", **raw}, tmp_path / "t.toml")
    assert message in str(info.value)


def test_local_dir_paths_resolve_against_the_study_folder(tmp_path, registry):
    from automl_tl.components import DataConfig

    backbone = registry.get("backbones", "test_resnet")
    backbone.export(
        backbone.create(10, image_size=32),
        tmp_path / "prev" / "best",
        [str(i) for i in range(10)],
        DataConfig((3, 32, 32), (0.5,) * 3, (0.25,) * 3),
    )
    raw = {
        "name": "t",
        "search": {"backbones": ["test_resnet"]},
        "weights": {"test_resnet": "local-dir:prev/best"},
    }
    config = config_from_dict(raw, tmp_path / "t.toml")
    assert config.weights_for("test_resnet") == f"local-dir:{tmp_path / 'prev' / 'best'}"
    # a plain folder path means the same
    raw["weights"]["test_resnet"] = "prev/best"
    config = config_from_dict(raw, tmp_path / "t.toml")
    assert config.weights_for("test_resnet") == f"local-dir:{tmp_path / 'prev' / 'best'}"


@pytest.mark.slow
def test_searched_weights_report_transferred_next_to_scratch(tmp_path, source_weights):
    path = write_study(
        tmp_path,
        FEW_LABELS.format(weights='["pretrain:digits:0-4", "none"]', n_trials=4),
    )
    _seed_cache(source_weights, tmp_path / "tiny")
    result = run_main("search", str(path), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "pretraining test_resnet" not in result.stderr  # found by content, not rebuilt
    assert "best per weight source (retrained, same budget):" in result.stdout
    assert "transfer pays: best transferred (pretrain:digits:0-4) - scratch = +" in result.stdout
    report = run_main("report", str(path), "--format", "json", "--no-files")
    assert report.returncode == 0, report.stderr
    rows = {r["weights"]: r for r in json.loads(report.stdout)["weights"]}
    assert set(rows) == {"pretrain:digits:0-4", "none"}
    assert rows["none"]["scratch"] and not rows["pretrain:digits:0-4"]["scratch"]
    assert sum(r["trials"] for r in rows.values()) == 4
    for r in rows.values():  # each source's best trial was retrained and tested
        metrics = json.loads((tmp_path / r["path"] / "metrics.json").read_text())
        assert metrics["trial"] == r["trial"]
        assert r["test"]["accuracy"] == metrics["test"]["accuracy"]
    table = run_main("report", str(path), "--no-files")
    assert "pretrain:digits:0-4" in table.stdout and "transfer pays" in table.stdout
    assert (tmp_path / "tiny" / "pretrained" / "test_resnet--digits-0-4.json").is_file()
