"""The MLflow plugin against a real local tracking store (SQLite backend): nested runs,
parameters, per-epoch metrics, and the best model as a pyfunc model loaded back."""

import os
import subprocess
import sys
import textwrap

import automl_tl_mlflow as mf
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

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


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(mf.TRACKING_URI_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mf._studies.clear()
    mf._runs.clear()


def test_contract(tmp_path, monkeypatch):
    monkeypatch.setenv(mf.TRACKING_URI_ENV, f"sqlite:///{tmp_path / 'contract.db'}")
    assert_plugin_passes("automl_tl_mlflow")


def test_each_trial_is_a_run_nested_under_the_study(tmp_path):
    mf.trial_started("s", 3, PARAMS, str(tmp_path))
    for epoch in range(2):
        mf.epoch_finished("s", 3, epoch, _metrics(epoch))
    mf.trial_finished("s", 3, "COMPLETE", 0.7, {"epochs_run": 2})
    mf.trial_started("s", 4, PARAMS, str(tmp_path))
    mf.trial_finished("s", 4, "FAIL", None, {"epochs_run": 0, "fail_reason": "out of memory"})
    mf.study_finished("s", {"number": 3, "value": 0.7, "params": PARAMS}, str(tmp_path))

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("s")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"s", "trial-0003", "trial-0004"}
    parent = runs["s"].info.run_id
    for name in ("trial-0003", "trial-0004"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent
    trial = runs["trial-0003"]
    assert trial.data.params == {k: str(v) for k, v in PARAMS.items()}
    history = client.get_metric_history(trial.info.run_id, "val_accuracy")
    assert [(m.step, round(m.value, 4)) for m in history] == [(1, 0.5), (2, 0.7)]
    assert trial.data.metrics["score"] == pytest.approx(0.7)
    assert trial.info.status == "FINISHED"
    failed = runs["trial-0004"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["automl_tl.fail_reason"] == "out of memory"
    assert runs["s"].data.metrics["best_score"] == pytest.approx(0.7)


@pytest.mark.slow
def test_a_search_logs_the_best_model_loadable_as_pyfunc(tmp_path):
    """Loaded through its entry point, as an installed plugin is."""
    study = tmp_path / "mf.toml"
    study.write_text(
        textwrap.dedent(
            """
            name = "mf"
            [data]
            source = "digits:0-2"
            image_size = 16
            [search]
            n_trials = 2
            backbones = ["test_resnet"]
            augmentations = ["none"]
            unfreeze = ["top_k"]
            epochs = 1
            pruner = "none"
            """
        )
    )
    env = {**os.environ, "AUTOML_TL_LOAD_PLUGINS": "mlflow", "OMP_NUM_THREADS": "1"}
    env.pop(mf.TRACKING_URI_ENV, None)
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "automl_tl.cli", "search", str(study)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mf' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mf")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get(mf.STUDY_TAG) == "true")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    assert parent.data.metrics["test_accuracy"] > 0
    uri = parent.data.tags["automl_tl.model_uri"]
    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pyfunc.load_model(uri)
    meta = model.metadata
    assert meta.metadata["class_names"] == ["0", "1", "2"]
    assert meta.get_input_schema().inputs[0].shape == (-1, 3, 16, 16)
    out = model.predict(np.zeros((4, 3, 16, 16), dtype=np.float32))
    assert list(out.columns) == ["label", "p_0", "p_1", "p_2"]
    assert len(out) == 4 and set(out["label"]) <= {"0", "1", "2"}
    assert np.allclose(out[["p_0", "p_1", "p_2"]].sum(axis=1), 1, atol=1e-4)
