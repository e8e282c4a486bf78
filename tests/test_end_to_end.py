"""search -> report -> predict from the command line, as a user runs it; export loads with timm."""

import json
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from .conftest import TINY_STUDY, run_cli, write_study

RECORDER = """
import json, os
import automl_tl

LOG = os.environ.get("RECORDER_LOG", os.devnull)


def _write(event, **fields):
    with open(LOG, "a") as f:
        f.write(json.dumps({"event": event, **fields}) + "\\n")


@automl_tl.hookimpl
def trial_started(study_name, trial_number, params):
    _write("trial_started", trial=trial_number, params=params)


@automl_tl.hookimpl
def epoch_finished(study_name, trial_number, epoch, metrics):
    _write("epoch_finished", trial=trial_number, epoch=epoch, val=metrics["val"])


@automl_tl.hookimpl
def trial_finished(study_name, trial_number, state, value, attrs):
    _write("trial_finished", trial=trial_number, state=state, value=value)


@automl_tl.hookimpl
def study_finished(study_name, best):
    _write("study_finished", best=best)
"""


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One tiny study searched once through the CLI, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "recorder.py").write_text(RECORDER)
    study = write_study(tmp, 'plugins = ["recorder.py"]\n' + TINY_STUDY)
    log = tmp / "events.jsonl"
    result = run_cli("search", str(study), env={"RECORDER_LOG": str(log)})
    assert result.returncode == 0, result.stderr
    return tmp, study, result, log


def test_search_retrains_and_exports(searched):
    tmp, study, result, _ = searched
    assert "4 trials finished" in result.stdout
    best = tmp / "tiny" / "best"
    assert {p.name for p in best.iterdir()} >= {"model.safetensors", "config.json", "metrics.json"}
    metrics = json.loads((best / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test", "trial", "params"}
    assert set(metrics["test"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix"}
    assert metrics["test"]["accuracy"] > 0.3
    config = json.loads((best / "config.json").read_text())
    assert config["label_names"] == [str(i) for i in range(10)]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]


def test_export_loads_with_plain_timm(searched):
    tmp, *_ = searched
    code = textwrap.dedent(
        f"""
        import sys, timm, torch
        m = timm.create_model("local-dir:{tmp / "tiny" / "best"}", pretrained=True).eval()
        assert "automl_tl" not in sys.modules
        print(tuple(m(torch.zeros(1, 3, 32, 32)).shape), m.pretrained_cfg["label_names"][:3])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "(1, 10) ['0', '1', '2']" in out.stdout


def test_report_json_and_table(searched):
    _, study, *_ = searched
    result = run_cli("report", str(study), "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["study"] == "tiny" and data["metric"] == "accuracy"
    assert len(data["trials"]) == 4
    for t in data["trials"]:
        assert set(t) >= {"number", "state", "value", "params", "duration_s", "fail_reason"}
        assert t["state"] in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
        # random init (the study's weights): the space's random-init branch, no depth
        assert set(t["params"]) >= {
            "backbone",
            "augmentation",
            "unfreeze_scratch",
            "lr",
            "weight_decay",
        }
        assert "unfreeze_depth" not in t["params"] and "unfreeze" not in t["params"]
    assert data["best"]["value"] == max(
        t["value"] for t in data["trials"] if t["state"] == "COMPLETE"
    )
    table = run_cli("report", str(study))
    assert table.returncode == 0 and "backbone" in table.stdout and "best model" in table.stdout
    csv_out = run_cli("report", str(study), "--format", "csv")
    assert csv_out.stdout.splitlines()[0].startswith("trial,state,accuracy,backbone")


def test_predict_csv(searched, tmp_path):
    tmp, *_ = searched
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).save(folder / f"{i}.png")
    result = run_cli(
        "predict", str(tmp / "tiny" / "best"), str(tmp_path / "imgs"), "--format", "csv"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "path,label,score"
    assert len(lines) == 4
    for line in lines[1:]:
        path, label, score = line.split(",")
        assert label in [str(i) for i in range(10)] and 0 < float(score) <= 1


def test_catalog_tables(searched):
    tmp, *_ = searched
    db = sqlite3.connect(tmp / "tiny" / "catalog.db")
    assert db.execute("select count(*) from trials").fetchone()[0] == 4
    assert db.execute("select count(*) from epochs").fetchone()[0] >= 4
    row = db.execute(
        "select study, trial, backbone, data_fingerprint, sha256, test_accuracy from models"
    ).fetchone()
    assert row[0] == "tiny" and len(row[4]) == 64 and row[5] > 0.3


def test_lifecycle_hooks_fire_in_order(searched):
    *_, log = searched
    events = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("trial_started") == 4 and kinds.count("trial_finished") == 4
    assert kinds[-1] == "study_finished" and events[-1]["best"]["number"] in range(4)
    assert kinds.count("epoch_finished") == 8  # pruner "none": 4 trials x 2 epochs
    assert kinds[0] == "trial_started" and kinds[1] == "epoch_finished"


def test_resume_runs_no_completed_trial_again(searched):
    tmp, study, *_ = searched
    again = run_cli("search", str(study), "--no-retrain")
    assert again.returncode == 0, again.stderr
    assert "4 trials finished (0 run now)" in again.stdout
    more = run_cli("search", str(study), "--no-retrain", "--n-trials", "5")
    assert "5 trials finished (1 run now)" in more.stdout
    data = json.loads(run_cli("report", str(study), "--format", "json").stdout)
    assert [t["number"] for t in data["trials"]] == [0, 1, 2, 3, 4]


def test_same_seed_gives_the_same_first_trial(tmp_path):
    from automl_tl import load_config, registry_for
    from automl_tl.plugins import get_plugin_manager
    from automl_tl.search import search

    values = []
    for run in ("a", "b"):
        path = write_study(tmp_path / run, TINY_STUDY.replace("n_trials = 4", "n_trials = 1"))
        config = load_config(path)
        pm, _ = get_plugin_manager()
        outcome = search(config, registry_for(), pm, device="cpu", retrain_best=False)
        values.append((outcome.study.trials[0].params, outcome.study.trials[0].value))
    assert values[0] == values[1]


def test_failing_plugin_trial_is_recorded_and_the_study_goes_on(tmp_path):
    (tmp_path / "flaky.py").write_text(
        textwrap.dedent(
            """
            import automl_tl


            class Exploding(automl_tl.AugmentationPolicy):
                name = "exploding"

                def build(self, strength, image_size):
                    raise RuntimeError("policy exploded")


            @automl_tl.hookimpl
            def register_augmentation_policies(register):
                register(Exploding())
            """
        )
    )
    body = TINY_STUDY.replace(
        'augmentations = ["none", "flip_crop"]', 'augmentations = ["exploding", "none"]'
    )
    study = write_study(
        tmp_path, 'plugins = ["flaky.py"]\n' + body.replace("n_trials = 4", "n_trials = 3")
    )
    result = run_cli("search", str(study), "--no-retrain")
    assert result.returncode == 0, result.stderr
    data = json.loads(run_cli("report", str(study), "--format", "json").stdout)
    failed = [t for t in data["trials"] if t["state"] == "FAIL"]
    assert failed and all(t["fail_reason"] == "RuntimeError: policy exploded" for t in failed)
    assert sum(t["state"] == "COMPLETE" for t in data["trials"]) == 3


def test_entry_point_template_backbone_is_searched(tmp_path):
    pytest.importorskip("automl_tl_example_backbone", reason="make test installs plugins/*")
    body = TINY_STUDY.replace(
        'backbones = ["test_resnet", "test_convnext"]', 'backbones = ["example_cnn"]'
    )
    study = write_study(tmp_path, body.replace("n_trials = 4", "n_trials = 2"))
    result = run_cli("search", str(study), env={"AUTOML_TL_LOAD_PLUGINS": "example_backbone"})
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "tiny" / "best" / "config.json").read_text())
    assert config["architecture"] == "example_cnn"
    pred = run_cli(
        "predict",
        str(tmp_path / "tiny" / "best"),
        str(tmp_path / "tiny" / "best"),
        env={"AUTOML_TL_LOAD_PLUGINS": "example_backbone"},
    )
    assert "no images found" in pred.stderr and pred.returncode == 2


def test_retrain_any_trial_from_the_command_line(searched):
    tmp, study, *_ = searched
    result = run_cli("retrain", str(study), "--trial", "0")
    assert result.returncode == 0, result.stderr
    out = tmp / "tiny" / "models" / "trial-0"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trial"] == 0 and metrics["retrained_on"] == "train+val"
    assert "trial 0 retrained on train+val" in result.stdout
    missing = run_cli("retrain", str(study), "--trial", "99")
    assert missing.returncode == 2 and "has no trial 99" in missing.stderr


@pytest.mark.slow
def test_the_readme_demo_study_runs(tmp_path):
    """`automl-tl search studies/digits.toml` (the README's main command) on a copy, small budget."""
    from .conftest import REPO

    study = tmp_path / "digits.toml"
    study.write_text((REPO / "studies" / "digits.toml").read_text())
    result = run_cli("search", str(study), "--n-trials", "2")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "digits" / "best" / "metrics.json").read_text())
    assert metrics["data"]["classes"] == ["5", "6", "7", "8", "9"]
    assert 0.0 < metrics["test"]["accuracy"] <= 1.0
