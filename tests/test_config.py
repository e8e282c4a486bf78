"""The study file: defaults, overrides, and one clear message per bad key or value."""

import pytest

from automl_tl import ConfigError, config_from_dict, load_config

from .conftest import REPO, run_main, write_study


def test_embedded_study_is_valid():
    config = load_config(REPO / "studies" / "digits.toml")
    assert config.name == "digits"
    assert config.data.source == "digits:5-9"  # the target task; digits 0-4 are the source
    assert config.weight_choices("test_resnet") == ["pretrain:digits:0-4", "none"]
    assert config.output_dir == REPO / "studies" / "digits"
    assert config.storage_url == f"sqlite:///{REPO / 'studies' / 'digits' / 'optuna.db'}"


def test_defaults_and_overrides(tmp_path):
    path = write_study(tmp_path, "[search]\nn_trials = 3\n")
    config = load_config(path, {"search.n_trials": 7, "search.storage": None, "data.seed": 5})
    assert config.search.n_trials == 7
    assert config.data.seed == 5
    assert config.search.lr == [1e-4, 1e-2]
    assert config.retrain.on == "train+val"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"serch": {}}, "unknown top-level key 'serch' (did you mean \"search\"?)"),
        (
            {"search": {"n_trail": 3}},
            "unknown key 'n_trail' in [search] (did you mean \"n_trials\"?)",
        ),
        (
            {"search": {"n_trials": "ten"}},
            "[search] n_trials must be an integer, got a string 'ten'",
        ),
        ({"search": {"n_trials": 0}}, "[search] n_trials = 0 is too small"),
        ({"search": {"backbones": []}}, "[search] backbones is empty"),
        ({"search": {"lr": [0.1, 0.001]}}, "[search] lr = [0.1, 0.001]: low > high"),
        ({"search": {"lr": [0, 0.1]}}, "log scale"),
        (
            {"search": {"sampler": "tpee"}},
            "[search] sampler = 'tpee' is not allowed (did you mean \"tpe\"?)",
        ),
        ({"data": {"image_size": 2}}, "[data] image_size = 2 is too small"),
        ({"retrain": {"on": "all"}}, "[retrain] on = 'all' is not allowed"),
        (
            {"weights": {"resnet": "none"}},
            "[weights] names backbone 'resnet', which is not in [search] backbones",
        ),
        ({"weights": {"test_resnet": "missing.safetensors"}}, "does not exist"),
        ({"search": "x"}, "[search] must be a table"),
    ],
)
def test_bad_values_name_the_key(tmp_path, raw, message):
    raw = {"name": "t", **raw}
    if "weights" in raw and "search" not in raw:
        raw["search"] = {"backbones": ["test_resnet"]}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, tmp_path / "t.toml")
    assert message in str(info.value)


def test_cli_reports_a_bad_key_without_traceback(tmp_path):
    path = write_study(tmp_path, "[search]\nbackbone = ['test_resnet']\n")
    result = run_main("search", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown key 'backbone' in [search] (did you mean \"backbones\"?)" in result.stderr
    assert result.stderr.count("\n") == 1


def test_cli_reports_unknown_backbone_with_close_names(tmp_path):
    path = write_study(tmp_path, "[search]\nbackbones = ['test_resnett']\n")
    result = run_main("search", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "unknown backbone 'test_resnett'" in result.stderr
    assert 'did you mean "test_resnet"' in result.stderr


def test_cli_reports_unknown_policy_listing_the_known_ones(tmp_path):
    path = write_study(tmp_path, "[search]\naugmentations = ['mixup']\n")
    result = run_main("search", str(path))
    assert result.returncode == 2
    assert (
        "unknown augmentation policy 'mixup' in [search] augmentations; known: autoaugment, color, crop, flip_crop, none, randaugment, trivialaugment"
        in result.stderr
    )


def test_missing_study_file(tmp_path):
    result = run_main("report", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "study file" in result.stderr and "does not exist" in result.stderr


def test_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_backbone_that_cannot_run_at_the_image_size(tmp_path):
    path = write_study(
        tmp_path, "[data]\nimage_size = 16\n[search]\nbackbones = ['test_convnext']\n"
    )
    result = run_main("search", str(path))
    assert result.returncode == 2
    assert "backbone 'test_convnext' cannot run at [data] image_size = 16" in result.stderr
    assert not (tmp_path / "tiny" / "optuna.db").exists()
