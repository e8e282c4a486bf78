"""optuna-dashboard reads a study's storage as automl-tl leaves it (README: the one command).

The test starts the dashboard on loopback, exactly as the README says, and reads the study
through the dashboard's HTTP API: the trials, their parameters, values, epochs and the best.
"""

import datetime as dt
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from automl_tl import load_config

from .conftest import REPO, create_study, needs, write_study

STUDY = """
[data]
source = "digits"
[search]
n_trials = 3
backbones = ["test_resnet", "test_vit"]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _fill(study) -> None:
    distributions = {
        "backbone": CategoricalDistribution(["test_resnet", "test_vit"]),
        "unfreeze_depth": FloatDistribution(0.0, 1.0),
    }
    for number, (backbone, state, curve) in enumerate(
        [
            ("test_resnet", TrialState.COMPLETE, [0.5, 0.8]),
            ("test_vit", TrialState.COMPLETE, [0.6, 0.9]),
            ("test_vit", TrialState.PRUNED, [0.2]),
        ]
    ):
        trial = optuna.trial.create_trial(
            state=state,
            value=curve[-1] if state == TrialState.COMPLETE else None,
            params={"backbone": backbone, "unfreeze_depth": 0.25 * (number + 1)},
            distributions=distributions,
            intermediate_values={i + 1: v for i, v in enumerate(curve)},
            user_attrs={"epochs_run": len(curve)},
        )
        trial.datetime_start = dt.datetime(2025, 1, 1, 12, 0, number)
        trial.datetime_complete = trial.datetime_start + dt.timedelta(seconds=5)
        study.add_trial(trial)


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_dashboard_serves_the_study_from_its_storage(tmp_path, storage):
    needs("optuna_dashboard")  # a dev dependency: in CI a failure when missing, never a skip
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    assert dashboard, f"optuna_dashboard is installed but not its command in {sys.executable}"
    body = STUDY
    if storage == "journal":  # what `search --workers N` leaves behind
        body = body.replace("[search]", f'[search]\nstorage = "journal:{tmp_path}/j.log"')
    config = load_config(write_study(tmp_path, body, name="dash"))
    _fill(create_study(config))
    # README: optuna-dashboard sqlite:///studies/<name>/optuna.db (the journal: its file path)
    target = (
        f"sqlite:///{config.output_dir / 'optuna.db'}"
        if storage == "sqlite"
        else str(tmp_path / "j.log")
    )
    port = _free_port()
    server = subprocess.Popen(
        [dashboard, target, "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "the dashboard did not start within 60 s"
                time.sleep(0.3)
        (summary,) = [s for s in studies if s["study_name"] == "dash"]
        assert summary["directions"] == ["maximize"]
        detail = _get(f"{base}/api/studies/{summary['study_id']}")
        trials = detail["trials"]
        assert [t["state"] for t in trials] == ["Complete", "Complete", "Pruned"]
        params = {p["name"]: p["param_external_value"] for p in trials[1]["params"]}
        assert params == {"backbone": "test_vit", "unfreeze_depth": "0.5"}  # as text
        assert [v["value"] for v in trials[0]["intermediate_values"]] == [0.5, 0.8]
        assert {"key": "epochs_run", "value": "2"} in trials[0]["user_attrs"]
        (best,) = detail["best_trials"]
        assert best["number"] == 1 and best["values"] == [0.9]
        with urllib.request.urlopen(f"{base}/dashboard", timeout=10) as page:
            assert b"<html" in page.read().lower()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_readme_names_the_dashboard_command():
    readme = (REPO / "README.md").read_text()
    assert "optuna-dashboard sqlite:///studies/digits/optuna.db" in readme
