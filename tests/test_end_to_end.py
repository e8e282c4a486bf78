"""search -> report -> predict from the command line, as a user runs it; export loads with timm.

One tiny study is searched once per session (``searched``, tests/shared.py) and only read by
the tests below; a test that changes a study (resume, retrain) works on its own copy.
"""

import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from .conftest import SMALL_STUDY, needs, run_cli, run_main, write_study


def _copy(searched, tmp_path):
    """The searched study's folder copied, for a test that changes it: (folder, study file)."""
    tmp, study, *_ = searched
    copy = tmp_path / "copy"
    shutil.copytree(tmp, copy)
    return copy, copy / study.name


def _accuracy(confusion) -> float:
    return sum(row[i] for i, row in enumerate(confusion)) / sum(map(sum, confusion))


def test_search_retrains_and_exports(searched):
    tmp, study, result, _ = searched
    assert result.stdout.startswith("study tiny: 4 trials finished (4 run now); best trial #")
    best = tmp / "tiny" / "best"
    assert {p.name for p in best.iterdir()} == {"model.safetensors", "config.json", "metrics.json"}
    metrics = json.loads((best / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test", "trial", "params"}
    test = metrics["test"]
    assert set(test) >= {"accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix"}
    # the reported accuracy is the confusion matrix's, over the whole test split
    assert test["accuracy"] == pytest.approx(_accuracy(test["confusion_matrix"]))
    assert sum(map(sum, test["confusion_matrix"])) == metrics["data"]["sizes"]["test"]
    assert test["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert (
        f"retrained on train+val: test accuracy {test['accuracy']:.4f}, balanced "
        f"{test['balanced_accuracy']:.4f}, macro F1 {test['macro_f1']:.4f} -> {best}"
    ) in result.stdout
    config = json.loads((best / "config.json").read_text())
    assert config["label_names"] == [str(i) for i in range(10)]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]


def test_export_loads_with_plain_timm(searched):
    """In a fresh interpreter without automl_tl (so a subprocess): the same logits."""
    import torch

    from automl_tl import load_model

    tmp, *_ = searched
    best = tmp / "tiny" / "best"
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    torch.save(x, best.parent / "probe.pt")
    code = textwrap.dedent(
        f"""
        import sys, timm, torch
        m = timm.create_model("local-dir:{best}", pretrained=True).eval()
        assert "automl_tl" not in sys.modules
        with torch.no_grad():
            torch.save(m(torch.load("{best.parent / "probe.pt"}")), "{best.parent / "timm.pt"}")
        print(m.pretrained_cfg["label_names"][:3])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "['0', '1', '2']\n"
    with torch.no_grad():
        ours = load_model(best).model(x)
    torch.testing.assert_close(torch.load(best.parent / "timm.pt"), ours)


def test_report_json_and_table(searched):
    tmp, study, *_ = searched
    result = run_main("report", str(study), "--format", "json", "--no-files")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["study"] == "tiny" and data["metric"] == "accuracy"
    assert [t["number"] for t in data["trials"]] == [0, 1, 2, 3]
    assert [t["state"] for t in data["trials"]] == ["COMPLETE"] * 4  # pruner "none"
    for t in data["trials"]:
        assert set(t) >= {"number", "state", "value", "params", "duration_s", "fail_reason"}
        assert t["fail_reason"] is None and t["epochs_run"] == 2
        # random init (the study's weights): the space's random-init branch, no depth
        assert set(t["params"]) >= {
            "backbone",
            "augmentation",
            "unfreeze_scratch",
            "lr",
            "weight_decay",
        }
        assert "unfreeze_depth" not in t["params"] and "unfreeze" not in t["params"]
    best = max(data["trials"], key=lambda t: t["value"])
    assert data["best"]["value"] == best["value"] and data["best"]["number"] == best["number"]
    metrics = json.loads((tmp / "tiny" / "best" / "metrics.json").read_text())
    assert metrics["trial"] == best["number"]
    table = run_main("report", str(study), "--no-files")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "study tiny (4 trials, metric accuracy)"
    assert lines[1].split()[:4] == ["trial", "state", "accuracy", "backbone"]
    assert lines[3].split()[:2] == [str(best["number"]), "COMPLETE"]  # best first
    assert f"best model (trial {best['number']}): test accuracy " in table.stdout
    csv_out = run_main("report", str(study), "--format", "csv", "--no-files")
    rows = csv_out.stdout.splitlines()
    assert rows[0].startswith("trial,state,accuracy,backbone,")
    assert len(rows) == 5 and rows[1].startswith(f"{best['number']},COMPLETE,{best['value']}")


def _digit_images(folder, n=3):
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).save(folder / f"{i}.png")


@pytest.fixture
def images(tmp_path):
    """Three digits in a nested folder, and a file with an image suffix that is not one."""
    _digit_images(tmp_path / "imgs" / "nested")
    return tmp_path / "imgs"


def _expected(best, paths, top_k=1):
    from automl_tl import load_model

    m = load_model(best)
    return [m.predict([p], top_k=top_k)[0] for p in paths]


def test_predict_csv(searched, images):
    tmp, *_ = searched
    best = tmp / "tiny" / "best"
    result = run_main("predict", str(best), str(images), "--format", "csv")
    assert result.returncode == 0, result.stderr
    paths = sorted((images / "nested").glob("*.png"))
    expected = ["path,label,score"] + [
        f"{p},{top[0][0]},{round(top[0][1], 6)}" for p, top in zip(paths, _expected(best, paths))
    ]
    assert result.stdout.splitlines() == expected


def test_predict_json_top_k_and_table(searched, images):
    tmp, *_ = searched
    best = tmp / "tiny" / "best"
    paths = sorted((images / "nested").glob("*.png"))
    tops = _expected(best, paths, top_k=3)
    result = run_main("predict", str(best), str(images), "--format", "json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {
            "path": str(p),
            "label": top[0][0],
            "score": round(top[0][1], 6),
            "top_k": [{"label": label, "score": round(s, 6)} for label, s in top],
        }
        for p, top in zip(paths, tops)
    ]
    for top in tops:
        scores = [s for _, s in top]
        assert len(top) == 3 and scores == sorted(scores, reverse=True)
    table = run_main("predict", str(best), str(paths[0]))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["path", "label", "score"]
    path, label, score = lines[2].split()
    assert [path, label] == [str(paths[0]), tops[0][0][0]]
    # one image alone vs in a batch: float sums differ in the last bits, so the 4th digit may too
    assert float(score) == pytest.approx(tops[0][0][1], abs=2e-4) and len(score) <= 6


def test_predict_an_unreadable_image_is_listed_and_exits_1(searched, images):
    tmp, *_ = searched
    best = tmp / "tiny" / "best"
    (images / "broken.png").write_bytes(b"not a png")
    result = run_main("predict", str(best), str(images), "--format", "csv")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "path,label,score,error"
    assert len(lines) == 5  # the three digits are still predicted
    broken = [line for line in lines if line.startswith(str(images / "broken.png"))]
    assert broken == [
        f"{images / 'broken.png'},,,DataError: not an image (no image format recognises it)"
    ] or (len(broken) == 1 and broken[0].startswith(f"{images / 'broken.png'},,,"))
    missing = run_main("predict", str(best), str(images / "nowhere.png"))
    assert missing.returncode == 2
    assert (
        missing.stderr
        == f"error: {images / 'nowhere.png'} does not exist; give image files or folders\n"
    )


def test_catalog_tables(searched):
    tmp, *_ = searched
    db = sqlite3.connect(tmp / "tiny" / "catalog.db")
    assert db.execute("select number, state from trials order by number").fetchall() == [
        (n, "COMPLETE") for n in range(4)
    ]
    assert db.execute("select trial, epoch from epochs order by trial, epoch").fetchall() == [
        (t, e)
        for t in range(4)
        for e in range(2)  # pruner "none": 4 trials x 2 epochs
    ]
    metrics = json.loads((tmp / "tiny" / "best" / "metrics.json").read_text())
    rows = db.execute(
        "select study, trial, backbone, sha256, test_accuracy, path from models"
    ).fetchall()
    from automl_tl.export import sha256_file

    best = tmp / "tiny" / "best"
    assert rows == [
        (
            "tiny",
            metrics["trial"],
            metrics["params"]["backbone"],
            sha256_file(best / "model.safetensors"),
            metrics["test"]["accuracy"],
            str(best),
        )
    ]


def test_lifecycle_hooks_fire_in_order(searched):
    tmp, *_, log = searched
    events = [json.loads(line) for line in log.read_text().splitlines()]
    lifecycle = [e for e in events if not e["event"].startswith("register_")]
    kinds = [e["event"] for e in lifecycle]
    # pruner "none": 4 trials x 2 epochs, each trial started, its epochs, finished, in turn
    one_trial = ["trial_started", "epoch_finished", "epoch_finished", "trial_finished"]
    # then the study ends, and the model chosen is exported (retrained into best/)
    assert kinds == one_trial * 4 + ["study_finished", "model_exported"]
    assert [e["trial"] for e in lifecycle[:-2]] == [n for n in range(4) for _ in one_trial]
    assert [e["epoch"] for e in lifecycle if e["event"] == "epoch_finished"] == [0, 1] * 4
    assert all(e["output_dir"] == str(tmp / "tiny") for e in lifecycle if "output_dir" in e)
    finished = [e for e in lifecycle if e["event"] == "trial_finished"]
    best = max(finished, key=lambda e: e["value"])
    study_finished = next(e for e in events if e["event"] == "study_finished")
    assert study_finished["best"]["number"] == best["trial"]
    assert study_finished["best"]["value"] == best["value"]
    exported = events[-1]
    chosen = json.loads((tmp / "tiny" / "best" / "metrics.json").read_text())["trial"]
    assert exported["event"] == "model_exported" and exported["trial"] == chosen


def test_every_hookspec_is_called_in_a_real_search(searched):
    """The recorder plugin implements every hook (with every argument of its spec): in one
    real search each of them is called. A new hookspec fails here until the host calls it."""
    from automl_tl import hookspecs

    *_, log = searched
    specs = {n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "automl_tl_spec")}
    called = {json.loads(line)["event"] for line in log.read_text().splitlines()}
    assert called == specs
    assert len(specs) == 10


def test_resume_runs_no_completed_trial_again(searched, tmp_path):
    folder, study = _copy(searched, tmp_path)
    again = run_main("search", str(study), "--no-retrain", "--device", "cpu")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("study tiny: 4 trials finished (0 run now)")
    more = run_main("search", str(study), "--no-retrain", "--n-trials", "5", "--device", "cpu")
    assert more.returncode == 0, more.stderr
    assert more.stdout.startswith("study tiny: 5 trials finished (1 run now)")
    data = json.loads(run_main("report", str(study), "--format", "json", "--no-files").stdout)
    assert [t["number"] for t in data["trials"]] == [0, 1, 2, 3, 4]
    original = json.loads(
        run_main("report", str(searched[1]), "--format", "json", "--no-files").stdout
    )
    assert data["trials"][:4] == original["trials"]  # untouched: same values, same times


def test_same_seed_gives_the_same_first_trial(tmp_path):
    from automl_tl import load_config, registry_for
    from automl_tl.plugins import get_plugin_manager
    from automl_tl.search import search

    values = []
    for run in ("a", "b"):
        path = write_study(tmp_path / run, SMALL_STUDY.replace("n_trials = 4", "n_trials = 1"))
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
    body = SMALL_STUDY.replace(
        'augmentations = ["none", "flip_crop"]', 'augmentations = ["exploding", "none"]'
    )
    study = write_study(
        tmp_path, 'plugins = ["flaky.py"]\n' + body.replace("n_trials = 4", "n_trials = 3")
    )
    result = run_main("search", str(study), "--no-retrain", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    data = json.loads(run_main("report", str(study), "--format", "json", "--no-files").stdout)
    failed = [t for t in data["trials"] if t["state"] == "FAIL"]
    assert failed and all(t["fail_reason"] == "RuntimeError: policy exploded" for t in failed)
    assert all(t["params"]["augmentation"] == "exploding" for t in failed)
    assert sum(t["state"] == "COMPLETE" for t in data["trials"]) == 3
    assert len(data["trials"]) == 3 + len(failed)


def test_entry_point_template_backbone_is_searched(tmp_path):
    needs("automl_tl_example_backbone")
    body = SMALL_STUDY.replace(
        'backbones = ["test_resnet", "test_convnext"]', 'backbones = ["example_cnn"]'
    )
    study = write_study(tmp_path, body.replace("n_trials = 4", "n_trials = 2"))
    plugins = {"AUTOML_TL_LOAD_PLUGINS": "example_backbone"}
    result = run_main("search", str(study), "--device", "cpu", env=plugins)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "tiny" / "best" / "config.json").read_text())
    assert config["architecture"] == "example_cnn"
    best = tmp_path / "tiny" / "best"
    pred = run_main("predict", str(best), str(best), env=plugins)
    assert pred.returncode == 2 and pred.stderr == f"error: no images found in {best}\n"


def test_retrain_any_trial_from_the_command_line(searched, tmp_path):
    folder, study = _copy(searched, tmp_path)
    result = run_main("retrain", str(study), "--trial", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = folder / "tiny" / "models" / "trial-0"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trial"] == 0 and metrics["retrained_on"] == "train+val"
    assert result.stdout == (
        f"trial 0 retrained on train+val: test accuracy {metrics['test']['accuracy']:.4f} -> {out}\n"
    )
    missing = run_main("retrain", str(study), "--trial", "99", "--device", "cpu")
    assert missing.returncode == 2 and "has no trial 99" in missing.stderr
    assert missing.stderr.count("\n") == 1


def test_retrain_without_a_trial_replaces_best_with_the_best_trial(searched, tmp_path):
    """`retrain` without --trial: the chosen trial again (the race's winner when the search
    raced, else the best), into best/, replacing it whole."""
    folder, study = _copy(searched, tmp_path)
    best = folder / "tiny" / "best"
    before = json.loads((best / "metrics.json").read_text())
    (best / "stale.txt").write_text("left from an older export")
    result = run_main("retrain", str(study), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    after = json.loads((best / "metrics.json").read_text())
    assert after["trial"] == before["trial"] and after["params"] == before["params"]
    assert {p.name for p in best.iterdir()} == {"model.safetensors", "config.json", "metrics.json"}
    assert result.stdout.startswith(f"trial {before['trial']} retrained on train+val: ")
    assert result.stdout.endswith(f" -> {best}\n")
    assert not [p for p in best.parent.iterdir() if p.name.startswith(".best")]  # no leftovers
    db = sqlite3.connect(folder / "tiny" / "catalog.db")
    assert db.execute("select trial from models order by id").fetchall() == [
        (before["trial"],),
        (before["trial"],),
    ]


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
    test = metrics["test"]
    assert test["accuracy"] == pytest.approx(_accuracy(test["confusion_matrix"]))
    assert sum(map(sum, test["confusion_matrix"])) == metrics["data"]["sizes"]["test"]
    assert f"test accuracy {test['accuracy']:.4f}" in result.stdout
