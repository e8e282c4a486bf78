"""MLflow tracking for automl-tl, written from the lifecycle hooks.

Installed, it is loaded through its ``automl_tl`` entry point (``mlflow``); nothing in
automl-tl knows it. One MLflow experiment per study (its name), one parent run for the study,
one nested run per trial with its parameters and per-epoch metrics, and the exported best
model logged as an MLflow pyfunc model (input signature: a float32 batch ``(N, 3, S, S)`` in
[0, 1]; output: the label and one probability column per class; the class names in the
model's metadata), loadable with ``mlflow.pyfunc.load_model``.

Where runs go: ``$AUTOML_TL_MLFLOW_TRACKING_URI``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<study folder>/mlflow.db`` with artifacts in ``<study folder>/mlartifacts``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

import automl_tl

__version__ = "0.1.0"

#: Track here instead of the study folder's SQLite store.
TRACKING_URI_ENV = "AUTOML_TL_MLFLOW_TRACKING_URI"
#: the tag that marks a study's parent run (several workers share one)
STUDY_TAG = "automl_tl.study_run"

# study -> (client, experiment id, parent run id) in this process
_studies: dict[str, tuple[MlflowClient, str, str]] = {}
# (study, trial number) -> run id of the trials this process is training
_runs: dict[tuple[str, int], str] = {}


def tracking_uri(output_dir: str) -> str:
    """``$AUTOML_TL_MLFLOW_TRACKING_URI``, ``$MLFLOW_TRACKING_URI``, or the study folder's
    ``mlflow.db``."""
    uri = os.environ.get(TRACKING_URI_ENV) or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def _study(study_name: str, output_dir: str) -> tuple[MlflowClient, str, str]:
    """The client, experiment and parent run of a study (created on first use, found again
    by its tag when another worker or an earlier run created it)."""
    if study_name in _studies:
        return _studies[study_name]
    client = MlflowClient(tracking_uri=tracking_uri(output_dir))
    experiment = client.get_experiment_by_name(study_name)
    if experiment is None:
        artifacts = (Path(output_dir).resolve() / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(study_name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{STUDY_TAG}` = 'true'", max_results=1
    )
    if found:
        parent = found[0].info.run_id
    else:
        parent = client.create_run(
            experiment_id, run_name=study_name, tags={STUDY_TAG: "true"}
        ).info.run_id
    _studies[study_name] = (client, experiment_id, parent)
    return _studies[study_name]


def _param(value: Any) -> str:
    return (
        value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    )


@automl_tl.hookimpl
def trial_started(study_name: str, trial_number: int, params: dict[str, Any], output_dir: str):
    client, experiment_id, parent = _study(study_name, output_dir)
    run = client.create_run(
        experiment_id,
        run_name=f"trial-{trial_number:04d}",
        tags={"mlflow.parentRunId": parent, "automl_tl.trial": str(trial_number)},
    )
    for key, value in params.items():
        client.log_param(run.info.run_id, key, _param(value))
    _runs[(study_name, trial_number)] = run.info.run_id


@automl_tl.hookimpl
def epoch_finished(study_name: str, trial_number: int, epoch: int, metrics: dict[str, Any]):
    run_id = _runs.get((study_name, trial_number))
    if run_id is None:
        return
    client = _studies[study_name][0]
    step = epoch + 1
    for key in ("train_loss", "lr", "images_per_s", "seconds"):
        if metrics.get(key) is not None:
            client.log_metric(run_id, key, float(metrics[key]), step=step)
    for key, value in (metrics.get("val") or {}).items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            client.log_metric(run_id, f"val_{key}", float(value), step=step)


_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


@automl_tl.hookimpl
def trial_finished(
    study_name: str, trial_number: int, state: str, value: float | None, attrs: dict[str, Any]
):
    run_id = _runs.pop((study_name, trial_number), None)
    if run_id is None:
        return
    client = _studies[study_name][0]
    client.set_tag(run_id, "automl_tl.state", state)
    if value is not None and state == "COMPLETE":
        client.log_metric(run_id, "score", float(value))
    if attrs.get("fail_reason"):
        client.set_tag(run_id, "automl_tl.fail_reason", str(attrs["fail_reason"])[:5000])
    client.set_terminated(run_id, _STATUS.get(state, "FINISHED"))


@automl_tl.hookimpl
def study_finished(study_name: str, best: dict[str, Any] | None, output_dir: str):
    client, _, parent = _study(study_name, output_dir)
    for key in [k for k in _runs if k[0] == study_name]:  # trials that never reported an end
        client.set_terminated(_runs.pop(key), "KILLED")
    if best is not None:
        client.log_metric(parent, "best_score", float(best["value"]))
        client.set_tag(parent, "automl_tl.best_trial", str(best["number"]))
    client.set_terminated(parent, "FINISHED")  # model_exported reopens it for the best model


class AutomlTlModel(mlflow.pyfunc.PythonModel):
    """An automl-tl export as an MLflow pyfunc model: a float32 batch (N, 3, S, S) in [0, 1]
    in; a DataFrame with ``label`` and one probability column per class out."""

    def load_context(self, context):
        self.model = automl_tl.load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            logits = self.model.model(self.model.preprocess(batch))
        probs = logits.float().softmax(-1).numpy()
        names = self.model.label_names
        frame = pd.DataFrame(probs, columns=[f"p_{n}" for n in names])
        frame.insert(0, "label", [names[i] for i in probs.argmax(1)])
        return frame


@automl_tl.hookimpl
def model_exported(
    study_name: str, trial_number: int, model_dir: str, metrics: dict[str, Any], best: bool
):
    """The study's best model as an MLflow model in the study's run."""
    if not best:
        return
    import json

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    output_dir = str(Path(model_dir).parent)
    client, _, parent = _study(study_name, output_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    size = config["pretrained_cfg"]["input_size"]
    names = [str(n) for n in config["label_names"]]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *size))]),
        outputs=Schema([ColSpec("string", "label"), *(ColSpec("float", f"p_{n}") for n in names)]),
    )
    for key, value in (metrics.get("test") or {}).items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            client.log_metric(parent, f"test_{key}", float(value))
    mlflow.set_tracking_uri(client.tracking_uri)
    with mlflow.start_run(run_id=parent):
        info = mlflow.pyfunc.log_model(
            "model",
            python_model=AutomlTlModel(),
            artifacts={"model_dir": str(model_dir)},
            signature=signature,
            metadata={"class_names": names, "trial": trial_number, "study": study_name},
        )
    client.set_tag(parent, "automl_tl.model_uri", info.model_uri)
    client.set_terminated(parent, "FINISHED")
