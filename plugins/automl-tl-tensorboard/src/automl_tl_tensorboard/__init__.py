"""TensorBoard tracking for automl-tl: one run per trial, written from the lifecycle hooks.

Installed, it is loaded through its ``automl_tl`` entry point (``tensorboard``); nothing in
automl-tl knows it. Each worker process writes the runs of the trials it trains, so any number
of workers can share one log folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

import automl_tl

__version__ = "0.1.0"

#: Write the runs here instead of ``<study folder>/tensorboard``.
LOG_DIR_ENV = "AUTOML_TL_TENSORBOARD_DIR"

# (study, trial number) -> (writer, parameters) of the trials this process is training
_runs: dict[tuple[str, int], tuple[SummaryWriter, dict[str, Any]]] = {}


def log_dir(output_dir: str) -> Path:
    """Where the runs go: ``$AUTOML_TL_TENSORBOARD_DIR`` or ``<output_dir>/tensorboard``."""
    return Path(os.environ.get(LOG_DIR_ENV) or Path(output_dir) / "tensorboard")


def _hparam(value: Any) -> Any:
    # HParams take numbers, strings and booleans only
    return value if isinstance(value, (bool, int, float, str)) else str(value)


@automl_tl.hookimpl
def trial_started(study_name: str, trial_number: int, params: dict[str, Any], output_dir: str):
    writer = SummaryWriter(log_dir=str(log_dir(output_dir) / f"trial-{trial_number:04d}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
    writer.add_text("params", f"| parameter | value |\n|---|---|\n{table}", 0)
    old = _runs.pop((study_name, trial_number), None)
    if old is not None:  # a retried trial number: close the earlier run
        old[0].close()
    _runs[(study_name, trial_number)] = (writer, dict(params))


@automl_tl.hookimpl
def epoch_finished(study_name: str, trial_number: int, epoch: int, metrics: dict[str, Any]):
    run = _runs.get((study_name, trial_number))
    if run is None:
        return
    writer, step = run[0], epoch + 1
    for key, tag in (
        ("train_loss", "train/loss"),
        ("lr", "train/lr"),
        ("images_per_s", "train/images_per_s"),
        ("seconds", "train/epoch_seconds"),
    ):
        if metrics.get(key) is not None:
            writer.add_scalar(tag, float(metrics[key]), step)
    for key, value in (metrics.get("val") or {}).items():
        if isinstance(value, (int, float)):
            writer.add_scalar(f"val/{key}", float(value), step)
    writer.flush()


@automl_tl.hookimpl
def trial_finished(
    study_name: str, trial_number: int, state: str, value: float | None, attrs: dict[str, Any]
):
    run = _runs.pop((study_name, trial_number), None)
    if run is None:
        return
    writer, params = run
    hparams = {k: _hparam(v) for k, v in params.items()}
    hparams["state"] = state
    score = float(value) if value is not None and state == "COMPLETE" else math.nan
    writer.add_hparams(
        hparams,
        {"hparam/score": score, "hparam/epochs_run": float(attrs.get("epochs_run") or 0)},
        run_name=".",  # in the trial's own run, not a new timestamped folder
    )
    if attrs.get("fail_reason"):
        writer.add_text("fail_reason", str(attrs["fail_reason"]), 0)
    writer.close()


@automl_tl.hookimpl
def study_finished(study_name: str, best: dict[str, Any] | None, output_dir: str):
    for key in [k for k in _runs if k[0] == study_name]:  # trials that never reported an end
        _runs.pop(key)[0].close()
    with SummaryWriter(log_dir=str(log_dir(output_dir) / "study")) as writer:
        if best is None:
            writer.add_text("best", "no trial completed", 0)
        else:
            params = ", ".join(f"{k}={v}" for k, v in sorted(best["params"].items()))
            writer.add_text("best", f"trial {best['number']}: {best['value']:.4f} ({params})", 0)
            writer.add_scalar("best/score", float(best["value"]), best["number"])
