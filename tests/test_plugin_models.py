"""Models from plugins work everywhere (issues 16 and 20): a backbone from a plugin file written
here trains from its own weights file, the export records the plugin and the weights (with
sha256), predict / export --onnx / load_model / retrain load it with --plugin (or say exactly
what to pass), a changed plugin gives a warning naming both, and a weights file from another
network is refused once before the first trial."""

from __future__ import annotations

import json
import sqlite3
import textwrap

import pytest

from .conftest import needs, run_cli, write_study

pytestmark = pytest.mark.slow  # each path runs a real (tiny) search in a subprocess

PLUGIN = """
from torch import nn

import automl_tl
from automl_tl.weights import load_weights


class TinyCNN(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.body(self.stem(x))).flatten(1))


class TinyBackbone(automl_tl.Backbone):
    name = "team_cnn"

    def create(self, num_classes, weights="none", image_size=None):
        model = TinyCNN(num_classes)
        if weights != "none":
            load_weights(model, weights, self.head_parameters(model))
        return model

    def head_parameters(self, model):
        return ["head.weight", "head.bias"]

    def layer_groups(self, model):
        return [[f"{m}.{n}" for n, _ in getattr(model, m).named_parameters()] for m in ("stem", "body")]

    def data_config(self, model):
        return automl_tl.DataConfig((3, 16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@automl_tl.hookimpl
def register_backbones(register):
    register(TinyBackbone())


@automl_tl.hookimpl
def model_exported(study_name, trial_number, model_dir, metrics, best):
    import json, pathlib

    line = {"study": study_name, "trial": trial_number, "dir": model_dir, "best": best}
    with open(pathlib.Path(model_dir).parent / "exported.jsonl", "a") as f:
        f.write(json.dumps(line) + "\\n")
"""

STUDY = """
plugins = ["team_backbone.py"]

[data]
source = "digits"
image_size = 16
seed = 0

[search]
n_trials = 2
backbones = ["team_cnn"]
augmentations = ["none"]
unfreeze = ["top_k"]
epochs = 1
batch_size = 64
pruner = "none"

[weights]
team_cnn = "team.safetensors"
"""


def _write_plugin_and_weights(folder, other_network=False):
    import importlib.util

    import torch
    from safetensors.torch import save_file

    plugin = folder / "team_backbone.py"
    plugin.write_text(PLUGIN)
    spec = importlib.util.spec_from_file_location("_team_backbone_for_weights", plugin)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if other_network:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5), torch.nn.Linear(4, 10))
    else:
        model = module.TinyCNN(5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "team.safetensors"))
    return plugin


@pytest.fixture(scope="module")
def team_study(tmp_path_factory):
    """A study on a plugin-file backbone with its own weights file, searched and exported."""
    folder = tmp_path_factory.mktemp("team")
    _write_plugin_and_weights(folder)
    study = write_study(folder, STUDY, name="team")
    result = run_cli("search", str(study), "-q")
    assert result.returncode == 0, result.stderr
    return folder, study


def test_the_export_records_the_plugin_file_and_the_weights_file(team_study):
    from automl_tl._util import sha256_file

    folder, _ = team_study
    best = folder / "team" / "best"
    weights_sha = sha256_file(folder / "team.safetensors")
    plugin_sha = sha256_file(folder / "team_backbone.py")
    config = json.loads((best / "config.json").read_text())["automl_tl"]
    metrics = json.loads((best / "metrics.json").read_text())
    for record in (config, metrics):
        assert record["backbone_origin"]["source"] == "file"
        assert record["backbone_origin"]["path"] == str((folder / "team_backbone.py").resolve())
        assert record["backbone_origin"]["sha256"] == plugin_sha
        assert record["weights"]["source"] == "team.safetensors"
        assert record["weights"]["kind"] == "file"
        assert record["weights"]["sha256"] == weights_sha


def test_the_model_exported_hook_names_the_best_model(team_study):
    folder, _ = team_study
    lines = [json.loads(x) for x in (folder / "team" / "exported.jsonl").read_text().splitlines()]
    best = json.loads((folder / "team" / "best" / "metrics.json").read_text())["trial"]
    assert lines[0] == {
        "study": "team",
        "trial": best,
        "dir": str(folder / "team" / "best"),
        "best": True,
    }


def test_every_trial_shows_its_weights_file_in_leaderboard_catalog_and_index(team_study):
    from automl_tl._util import sha256_file

    folder, study = team_study
    short = sha256_file(folder / "team.safetensors")[:12]
    expected = f"team.safetensors (sha256 {short})"
    result = run_cli("report", str(study), "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["trials"]
    assert rows and all(r["weights"] == expected for r in rows)
    table = run_cli("report", str(study), "--no-files")
    assert expected in table.stdout
    html = (folder / "team" / "report" / "index.html").read_text()
    assert expected in html
    with sqlite3.connect(folder / "team" / "catalog.db") as db:
        trial_weights = {w for (w,) in db.execute("select weights from trials")}
        model = db.execute("select weights, weights_sha256, backbone_origin from models").fetchone()
    assert trial_weights == {expected}
    assert model[0] == "team.safetensors" and model[1].startswith(short)
    assert json.loads(model[2])["source"] == "file"


def test_predict_without_the_plugin_names_the_file_to_pass(team_study):
    folder, _ = team_study
    result = run_cli("predict", str(folder / "team" / "best"), str(folder / "team.safetensors"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "team_cnn" in lines[0] and "--plugin" in lines[0]
    assert str((folder / "team_backbone.py").resolve()) in lines[0]
    assert "[search] backbones" not in lines[0]


def test_predict_load_model_and_onnx_with_the_plugin(team_study, tmp_path):
    needs("onnxruntime")
    import numpy as np
    from PIL import Image

    import automl_tl

    folder, study = team_study
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    plugin = str(folder / "team_backbone.py")
    best = folder / "team" / "best"
    result = run_cli("predict", str(best), str(image), "--plugin", plugin, "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["label"] in [str(i) for i in range(10)]
    model = automl_tl.load_model(best, plugins=[plugin])
    assert model.predict([str(image)])[0][0][0] in model.label_names
    result = run_cli("export", str(study), "--onnx")  # the study's plugins = [...]
    assert result.returncode == 0, result.stderr
    assert "timm export" not in result.stdout and "load_model" in result.stdout
    assert (best / "model.onnx").is_file()


def test_a_changed_plugin_file_warns_naming_both_hashes(team_study, tmp_path):
    import warnings

    import automl_tl

    folder, _ = team_study
    changed = tmp_path / "team_backbone.py"
    changed.write_text(PLUGIN + "\n# a later edit\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        automl_tl.load_model(folder / "team" / "best", plugins=[str(changed)])
    messages = [str(w.message) for w in caught if "sha256" in str(w.message)]
    assert len(messages) == 1
    from automl_tl._util import sha256_file

    assert sha256_file(folder / "team_backbone.py")[:12] in messages[0]
    assert sha256_file(changed)[:12] in messages[0]


def test_a_weights_file_of_another_network_is_refused_before_the_first_trial(tmp_path):
    _write_plugin_and_weights(tmp_path, other_network=True)
    study = write_study(tmp_path, STUDY.replace("n_trials = 2", "n_trials = 4"), name="team")
    result = run_cli("search", str(study), "-q")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert '[weights] team_cnn = "team.safetensors" does not fit backbone' in lines[0]
    assert "missing keys" in lines[0] or "unexpected keys" in lines[0]
    assert not (tmp_path / "team" / "catalog.db").exists() or not _trials(tmp_path)


def _trials(folder):
    with sqlite3.connect(folder / "team" / "catalog.db") as db:
        return db.execute("select count(*) from trials").fetchone()[0]


def test_a_timm_export_still_says_timm_export(tmp_path):
    """The built-in timm backbones: recorded as automl-tl's, loaded by plain timm."""
    from automl_tl.export import plain_timm_loads

    study = write_study(
        tmp_path,
        textwrap.dedent(STUDY)
        .replace('plugins = ["team_backbone.py"]', "")
        .replace('"team_cnn"', '"test_resnet"')
        .replace('team_cnn = "team.safetensors"', 'default = "none"'),
        name="plain",
    )
    result = run_cli("search", str(study), "-q", "--n-trials", "1")
    assert result.returncode == 0, result.stderr
    best = tmp_path / "plain" / "best"
    assert plain_timm_loads(best)
    record = json.loads((best / "config.json").read_text())["automl_tl"]
    assert record["backbone_origin"]["source"] == "automl-tl"
    assert record["weights"] == {"source": "none", "kind": "none"}
    assert run_cli("export", str(study)).stdout.startswith("timm export:")
