"""`automl-tl report` writes <output>/report/: PNG plots, the best model's mistakes, index.html.

The study is made by hand (trials added to Optuna, an untrained model exported), so these
tests check the report, not the training, in a few seconds.
"""

import base64
import datetime as dt
import io
import json
import re

import matplotlib
import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from PIL import Image

from automl_tl import load_config
from automl_tl.data import load_splits
from automl_tl.export import export_model
from automl_tl.report import build_report, figures_for
from automl_tl.retrain import score_predictions
from automl_tl.storage import open_study
from automl_tl.train import evaluate

from .conftest import create_study, run_main, write_study

matplotlib.use("Agg")

STUDY = """
[data]
source = "digits:0-2"
image_size = 16
seed = 0

[search]
n_trials = 6
backbones = ["test_resnet", "test_convnext"]
augmentations = ["none", "flip_crop"]
unfreeze = ["top_k", "layer_decay"]
epochs = 3
pruner = "none"
"""

DISTRIBUTIONS = {
    "backbone": CategoricalDistribution(["test_resnet", "test_convnext"]),
    "augmentation": CategoricalDistribution(["none", "flip_crop"]),
    "aug_strength": FloatDistribution(0.0, 1.0),
    "unfreeze": CategoricalDistribution(["top_k", "layer_decay"]),
    "unfreeze_depth": FloatDistribution(0.0, 1.0),
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
}


def _add_trial(study, number, state, backbone, augmentation, depth, curve, seconds, **attrs):
    params = {
        "backbone": backbone,
        "augmentation": augmentation,
        "unfreeze": "top_k" if number % 2 else "layer_decay",
        "unfreeze_depth": depth,
        "lr": 10 ** (-2.0 - number / 4),
        "weight_decay": 1e-4,
    }
    if augmentation != "none":
        params["aug_strength"] = 0.2 + 0.1 * number
    trial = optuna.trial.create_trial(
        state=state,
        value=curve[-1] if state == TrialState.COMPLETE else None,
        params=params,
        distributions={k: DISTRIBUTIONS[k] for k in params},
        intermediate_values={i + 1: v for i, v in enumerate(curve)},
        user_attrs={"epochs_run": len(curve), **attrs},
    )
    trial.datetime_start = dt.datetime(2025, 1, 1, 12, 0, number)
    trial.datetime_complete = trial.datetime_start + dt.timedelta(seconds=seconds)
    study.add_trial(trial)


def _make_study(folder, registry, *, with_model=True, trials=True):
    path = write_study(folder, STUDY)
    config = load_config(path)
    splits = load_splits(config, registry)
    study = create_study(config)
    study.set_user_attr("data", splits.summary())
    if trials:
        _add_trial(study, 0, TrialState.COMPLETE, "test_resnet", "none", 0.5, [0.5, 0.7, 0.8], 9)
        _add_trial(
            study, 1, TrialState.COMPLETE, "test_convnext", "flip_crop", 1.0, [0.6, 0.9, 0.95], 14
        )
        _add_trial(study, 2, TrialState.PRUNED, "test_resnet", "flip_crop", 0.2, [0.3], 3)
        _add_trial(
            study,
            3,
            TrialState.FAIL,
            "test_convnext",
            "none",
            0.7,
            [],
            1,
            fail_reason="out of memory",
        )
        _add_trial(study, 4, TrialState.COMPLETE, "test_convnext", "none", 0.0, [0.4, 0.5, 0.6], 5)
    if with_model:
        backbone = registry.get("backbones", "test_resnet")
        torch.manual_seed(0)
        model = backbone.create(len(splits.class_names), image_size=16)
        cfg = backbone.data_config(model)
        from automl_tl import DataConfig

        cfg = DataConfig((3, 16, 16), cfg.mean, cfg.std)
        log_probs = []
        test = evaluate(
            model,
            splits.test,
            len(splits.class_names),
            cfg,
            torch.device("cpu"),
            log_probs=log_probs,
        )
        scored = score_predictions(  # intervals and calibration, as a retrain records them
            torch.cat(log_probs), splits.test.y, len(splits.class_names), (1.5, "validation")
        )
        metrics = {"trial": 1, "test": test, "data": splits.summary(), **scored}
        export_model(model, backbone, config.output_dir / "best", splits.class_names, cfg, metrics)
    return config, splits


@pytest.fixture(scope="module")
def made(tmp_path_factory, registry):
    """A study with its report built once; read-only for the tests (a test that changes the
    study works on a copy: ``made_copy``)."""
    folder = tmp_path_factory.mktemp("report")
    config, splits = _make_study(folder, registry)
    return config, splits, build_report(config, registry)


@pytest.fixture
def made_copy(made, tmp_path):
    """The ``made`` study's folder copied, with its config and report re-read from the copy."""
    import shutil

    config, splits, report = made
    shutil.copytree(config.base_dir, tmp_path / "copy")
    copy = load_config(tmp_path / "copy" / config.path.name)
    return copy, splits, report


def _embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_every_figure_is_written_as_a_png(made):
    config, _, report = made
    assert report.directory == config.output_dir / "report"
    assert [f.file for f in report.files] == [name for name, *_ in figures_for(config)]
    assert [f.file for f in report.skipped] == []
    for f in report.files:
        with Image.open(report.directory / f.file) as image:
            assert image.format == "PNG"
            assert image.width > 300 and image.height > 200


def test_index_html_is_self_contained_and_holds_the_leaderboard(made):
    config, _, report = made
    page = report.index.read_text()
    images = _embedded_images(page)
    assert len(images) == len(figures_for(config))
    # the embedded images are the PNG files, byte for byte, in the order of the figures
    assert images == [(report.directory / f.file).read_bytes() for f in report.files]
    # nothing is fetched from elsewhere: no external scripts, styles or images
    assert not re.search(r'<(script|link)\b|src="(?!data:)|url\(', page)
    rows = re.findall(r'<tr class="(\w+)"><td>(\d+)</td><td>(\w+)</td>', page)
    assert {int(n): (css, state) for css, n, state in rows} == {
        1: ("best", "COMPLETE"),
        0: ("complete", "COMPLETE"),
        4: ("complete", "COMPLETE"),
        2: ("pruned", "PRUNED"),
        3: ("fail", "FAIL"),
    }
    assert [int(n) for _, n, _ in rows[:3]] == [1, 0, 4]  # best first
    assert "out of memory" in page
    assert "#1: 0.9500" in page  # the best trial in the summary
    for _, title, description, _ in figures_for(config):
        assert title.replace("×", "&#215;") in page or title in page
        assert description.split(" ")[0] in page


def test_confusion_matrix_and_misclassified_use_the_exported_model(made, registry):
    """The report's predictions are the model's own: same counts as evaluate() on test."""
    from automl_tl.report import ReportContext, predict_test

    config, splits, _ = made
    study = open_study(config)
    ctx = ReportContext(config, registry, study, study.get_trials(), {"metric": "accuracy"})
    pred = predict_test(ctx)
    assert len(pred.truth) == len(splits.test)
    n = len(splits.class_names)
    confusion = torch.zeros(n, n, dtype=torch.int64)
    for t, p in zip(pred.truth, pred.predicted):
        confusion[t, p] += 1
    metrics = json.loads((config.output_dir / "best" / "metrics.json").read_text())
    assert confusion.tolist() == metrics["test"]["confusion_matrix"]
    assert all(0.0 < c <= 1.0 for c in pred.confidence)


def test_report_is_rebuilt_only_when_the_study_changed(made_copy):
    config, _, first = made_copy
    again = build_report(config, None)
    assert not again.rebuilt
    assert [f.file for f in again.written] == [f.file for f in first.written]
    study = open_study(config)
    _add_trial(study, 5, TrialState.COMPLETE, "test_resnet", "flip_crop", 0.9, [0.1, 0.2], 4)
    rebuilt = build_report(config, None)  # without plugins the model figures are skipped
    assert rebuilt.rebuilt
    skipped = {f.file: f.reason for f in rebuilt.skipped}
    assert set(skipped) == {"confusion_matrix.png", "misclassified.png"}
    assert not (rebuilt.directory / "misclassified.png").exists()
    manifest = json.loads((rebuilt.directory / "manifest.json").read_text())
    assert {f["file"]: f["reason"] for f in manifest["files"] if not f["written"]} == skipped


def test_a_study_with_nothing_finished_says_why_each_figure_is_missing(tmp_path, registry):
    config, _ = _make_study(tmp_path, registry, with_model=False, trials=False)
    study = open_study(config)
    _add_trial(study, 0, TrialState.FAIL, "test_resnet", "none", 0.5, [], 1, fail_reason="boom")
    report = build_report(config, registry)
    reasons = {f.file: f.reason for f in report.skipped}
    assert set(reasons) == {name for name, *_ in figures_for(config)}
    assert reasons["optimization_history.png"] == "no trial has completed yet"
    assert "needs at least 2 complete trials" in reasons["param_importances.png"]
    assert "no exported best model" in reasons["confusion_matrix.png"]
    page = report.index.read_text()
    assert page.count('class="skipped"') == len(figures_for(config))
    assert "run `automl-tl search`" in page
    assert not list(report.directory.glob("*.png"))


def test_model_figures_are_skipped_when_the_data_changed(tmp_path, registry):
    config, _ = _make_study(tmp_path, registry)
    metrics_path = config.output_dir / "best" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["data"]["split_hash"] = "something-else"
    metrics_path.write_text(json.dumps(metrics))
    report = build_report(config, registry)
    reasons = {f.file: f.reason for f in report.skipped}
    assert set(reasons) == {"confusion_matrix.png", "misclassified.png"}
    assert "the data changed since the best model was trained" in reasons["misclassified.png"]


def test_report_command_writes_the_folder_and_keeps_stdout_for_data(tmp_path, registry):
    config, _ = _make_study(tmp_path, registry)
    study_file = str(config.path)
    result = run_main("report", study_file, "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # stdout is only the JSON
    assert data["report"]["index"] == str(config.output_dir / "report" / "index.html")
    assert [f["file"] for f in data["report"]["files"] if f["written"]] == [
        name for name, *_ in figures_for(config)
    ]
    assert f"report written: {config.output_dir / 'report' / 'index.html'}" in result.stderr
    image = Image.open(
        io.BytesIO((config.output_dir / "report" / "misclassified.png").read_bytes())
    )
    assert image.width > 300

    (config.output_dir / "report" / "index.html").unlink()
    quiet = run_main("report", study_file, "--no-files", "--format", "csv")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.startswith("trial,state,accuracy")
    assert not (config.output_dir / "report" / "index.html").exists()


def _scored(values, n_val):
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("data", {"sizes": {"train": 100, "val": n_val, "test": 50}})
    for v in values:
        study.add_trial(optuna.trial.create_trial(value=v))
    return study


def test_a_validation_split_too_small_to_rank_by_is_pointed_out():
    from automl_tl.leaderboard import selection_note

    # 12 images: one standard error of 0.75 is 0.125, so 0.75, 0.6667 and 0.6667 are a tie
    note = selection_note(_scored([0.75, 0.6667, 0.6667, 0.4167, 0.25], 12))
    assert note.startswith("3 trials score within one standard error (±0.125) of the best on")
    assert "only 12 validation images" in note and "[data] val_fraction" in note
    assert selection_note(_scored([0.95, 0.90, 0.85, 0.50], 1000)) is None  # told apart
    assert selection_note(_scored([0.75, 0.74], 12)) is None  # two trials: nothing to rank
    assert selection_note(_scored([1.0, 1.0, 0.95], 20)) is not None  # perfect: one image
    assert selection_note(optuna.create_study()) is None  # no data recorded


def test_the_leaderboard_shows_every_searched_parameter_some_trial_has():
    # the LoRA rank, a searched image size and the recipe's regularizers are columns when a
    # trial has them (a lora trial's rank; the other trial's cell is empty), else left out
    from automl_tl.report import _leaderboard_html

    base = {"backbone": "test_vit", "augmentation": "none", "unfreeze": "top_k", "lr": 1e-3}
    data = {
        "metric": "accuracy",
        "direction": "maximize",
        "best": {"number": 1},
        "trials": [
            {"number": 0, "state": "COMPLETE", "value": 0.5, "params": {**base}},
            {
                "number": 1,
                "state": "COMPLETE",
                "value": 0.75,
                "params": {
                    **base,
                    "unfreeze": "lora",
                    "lora_rank": 16,
                    "image_size": 24,
                    "label_smoothing": 0.1,
                },
            },
        ],
    }
    page = _leaderboard_html(data)
    head = re.findall(r"<th>(\w+)</th>", page)
    assert head == [
        "trial", "state", "accuracy", "backbone", "weights", "augmentation", "unfreeze", "lr",
        "lora_rank", "image_size", "label_smoothing", "epochs", "seconds", "fail_reason",
    ]  # fmt: skip
    rows = re.findall(r"<tr[^>]*>((?:<td>[^<]*</td>)+)</tr>", page)
    cells = [re.findall(r"<td>([^<]*)</td>", r) for r in rows]
    at = head.index("lora_rank")
    assert [(c[0], c[at], c[at + 1], c[at + 2]) for c in cells] == [
        ("1", "16", "24", "0.1000"),
        ("0", "", "", ""),
    ]
