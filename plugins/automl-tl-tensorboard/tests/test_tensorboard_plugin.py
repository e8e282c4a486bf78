"""The TensorBoard plugin: event files a TensorBoard reads, from the hooks and from a search."""

import math
import os
import subprocess
import sys
import textwrap

import automl_tl_tensorboard as tb
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from automl_tl.testing import assert_plugin_passes

PARAMS = {"backbone": "test_resnet", "augmentation": "none", "unfreeze": "top_k", "lr": 0.01}


def _metrics(epoch):
    return {
        "train_loss": 1.0 / (epoch + 1),
        "lr": 0.01,
        "seconds": 2.0,
        "images_per_s": 100.0,
        "val": {"accuracy": 0.5 + 0.2 * epoch, "balanced_accuracy": 0.5, "macro_f1": 0.4},
    }


def _events(folder):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def test_contract():
    assert_plugin_passes("automl_tl_tensorboard")


def test_a_trial_becomes_a_run_with_curves_and_hparams(tmp_path, monkeypatch):
    monkeypatch.delenv(tb.LOG_DIR_ENV, raising=False)
    tb.trial_started("s", 3, PARAMS, str(tmp_path))
    for epoch in range(2):
        tb.epoch_finished("s", 3, epoch, _metrics(epoch))
    tb.trial_finished("s", 3, "COMPLETE", 0.7, {"epochs_run": 2})
    tb.trial_started("s", 4, PARAMS, str(tmp_path))
    tb.trial_finished("s", 4, "FAIL", None, {"epochs_run": 0, "fail_reason": "out of memory"})
    tb.study_finished("s", {"number": 3, "value": 0.7, "params": PARAMS}, str(tmp_path))

    run = _events(tmp_path / "tensorboard" / "trial-0003")
    assert set(run.Tags()["scalars"]) >= {
        "train/loss",
        "train/lr",
        "train/images_per_s",
        "train/epoch_seconds",
        "val/accuracy",
        "val/macro_f1",
    }
    accuracy = run.Scalars("val/accuracy")
    assert [e.step for e in accuracy] == [1, 2]
    assert [round(e.value, 4) for e in accuracy] == [0.5, 0.7]
    # add_hparams(run_name=".") writes the HParams summary and its metrics into the same run
    hparams = [
        f
        for f in os.listdir(tmp_path / "tensorboard" / "trial-0003")
        if f.startswith("events.out.tfevents")
    ]
    assert len(hparams) == 2
    assert run.Scalars("hparam/score")[0].value == pytest.approx(0.7)
    failed = _events(tmp_path / "tensorboard" / "trial-0004")
    assert math.isnan(failed.Scalars("hparam/score")[0].value)
    study = _events(tmp_path / "tensorboard" / "study")
    assert study.Scalars("best/score")[0].step == 3
    assert tb._runs == {}


def test_log_dir_can_be_moved(tmp_path, monkeypatch):
    monkeypatch.setenv(tb.LOG_DIR_ENV, str(tmp_path / "elsewhere"))
    tb.trial_started("s", 0, PARAMS, str(tmp_path / "study"))
    tb.trial_finished("s", 0, "PRUNED", None, {"epochs_run": 1})
    assert (tmp_path / "elsewhere" / "trial-0000").is_dir()
    assert not (tmp_path / "study").exists()


def test_off_unless_installed_and_allowed(monkeypatch):
    from automl_tl import get_plugin_manager

    monkeypatch.setenv("AUTOML_TL_LOAD_PLUGINS", "")
    assert "tensorboard" not in get_plugin_manager()[1]
    monkeypatch.setenv("AUTOML_TL_LOAD_PLUGINS", "tensorboard")
    info = get_plugin_manager()[1]["tensorboard"]
    assert (info.source, info.version, info.location) == (
        "entry point",
        "0.1.0",
        "automl-tl-tensorboard",
    )


def test_a_search_with_the_plugin_writes_one_run_per_trial(tmp_path):
    """Loaded through its entry point, as an installed plugin is."""
    study = tmp_path / "tb.toml"
    study.write_text(
        textwrap.dedent(
            """
            name = "tb"
            [data]
            source = "digits:0-1"
            image_size = 16
            [search]
            n_trials = 1
            backbones = ["test_resnet"]
            augmentations = ["none"]
            unfreeze = ["top_k"]
            epochs = 2
            pruner = "none"
            """
        )
    )
    env = {**os.environ, "AUTOML_TL_LOAD_PLUGINS": "tensorboard", "OMP_NUM_THREADS": "1"}
    env.pop(tb.LOG_DIR_ENV, None)
    cmd = [sys.executable, "-m", "automl_tl.cli", "search", str(study), "--no-retrain"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    run = _events(tmp_path / "tb" / "tensorboard" / "trial-0000")
    assert [e.step for e in run.Scalars("val/accuracy")] == [1, 2]
    assert run.Scalars("hparam/score")[0].value > 0
    assert _events(tmp_path / "tb" / "tensorboard" / "study").Scalars("best/score")
