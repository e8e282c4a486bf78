"""Metric plugins (``register_metrics``): searched by, pruned on, reported; contract-checked
(NaN or outside the declared range is a clear failure) — issue 16."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

import automl_tl
from automl_tl.errors import UserError
from automl_tl.testing import check_metric

from .conftest import run_cli, write_study

METRIC_PLUGIN = '''
import numpy as np

import automl_tl


class RecallOfZero(automl_tl.Metric):
    """Recall of class 0: the share of its images found (a team's "never miss a 0")."""

    name = "recall_zero"
    range = (0.0, 1.0)

    def score(self, y_true, y_pred):
        mask = y_true == 0
        return float((y_pred[mask] == 0).mean()) if mask.any() else 0.0


class CostWeightedError(automl_tl.Metric):
    name = "cost_error"
    higher_is_better = False
    range = (0.0, 5.0)
    uses_probabilities = True

    def score(self, y_true, probs):
        wrong = probs.argmax(1) != y_true
        return float(np.where(y_true == 0, 5.0, 1.0)[wrong].sum() / len(y_true))


@automl_tl.hookimpl
def register_metrics(register):
    register(RecallOfZero())
    register(CostWeightedError())
'''

STUDY = """
plugins = ["team_metrics.py"]

[data]
source = "digits:0-2"
image_size = 16
seed = 0

[search]
n_trials = 2
metric = "@METRIC@"
backbones = ["test_resnet"]
augmentations = ["none"]
unfreeze = ["top_k"]
epochs = 2
batch_size = 64
pruner = "median"
"""


class _Returns(automl_tl.Metric):
    range = (0.0, 1.0)

    def __init__(self, value):
        self.name, self.value = f"returns_{value}", value

    def score(self, y_true, y_pred):
        return self.value


@pytest.mark.parametrize("value, says", [(float("nan"), "nan"), (1.5, "outside its declared")])
def test_a_metric_returning_nan_or_out_of_range_fails_clearly(value, says):
    metric = _Returns(value)
    with pytest.raises(UserError, match=says) as caught:
        metric.checked(np.array([0, 1]), np.eye(2, dtype="float32"))
    assert metric.name in str(caught.value) and "range [0.0, 1.0]" in str(caught.value)
    with pytest.raises(AssertionError, match=f"metric {metric.name!r} on perfect predictions"):
        check_metric(metric)


def test_a_good_metric_passes_the_contract_and_plugins_check(tmp_path):
    (tmp_path / "team_metrics.py").write_text(METRIC_PLUGIN)
    result = run_cli("plugins", "--check", str(tmp_path / "team_metrics.py"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "metric recall_zero: contract" in result.stdout
    assert "metric cost_error: contract" in result.stdout


def test_plugins_check_fails_a_metric_outside_its_range(tmp_path):
    bad = METRIC_PLUGIN.replace("range = (0.0, 5.0)", "range = (0.0, 0.5)")
    (tmp_path / "team_metrics.py").write_text(bad)
    result = run_cli("plugins", "--check", str(tmp_path / "team_metrics.py"))
    assert result.returncode == 1
    assert (
        "FAIL  metric cost_error" in result.stdout and "outside its declared range" in result.stdout
    )


@pytest.mark.slow
def test_a_plugin_metric_is_searched_pruned_on_and_reported(tmp_path):
    (tmp_path / "team_metrics.py").write_text(METRIC_PLUGIN)
    study = write_study(tmp_path, STUDY.replace("@METRIC@", "recall_zero"), name="team")
    result = run_cli("search", str(study), "-q")
    assert result.returncode == 0, result.stderr
    assert "val recall_zero" in result.stdout
    data = json.loads(run_cli("report", str(study), "--format", "json", "--no-files").stdout)
    assert data["metric"] == "recall_zero"
    best = data["best"]
    with sqlite3.connect(tmp_path / "team" / "catalog.db") as db:
        scores = dict(
            db.execute("select trial, val_recall_zero from epochs where epoch = 1").fetchall()
        )
        costs = [c for (c,) in db.execute("select val_cost_error from epochs")]
    assert scores[best["number"]] == pytest.approx(best["value"])  # the value Optuna maximized
    assert costs and all(0.0 <= c <= 5.0 for c in costs)  # every plugin metric, every epoch
    metrics = json.loads((tmp_path / "team" / "best" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["recall_zero"] <= 1.0 and "cost_error" in metrics["test"]
    assert "recall_zero" in data["best_model"]["test"]


def test_an_unknown_search_metric_is_one_message(tmp_path):
    (tmp_path / "team_metrics.py").write_text(METRIC_PLUGIN)
    study = write_study(tmp_path, STUDY.replace("@METRIC@", "recall_zer"), name="team")
    result = run_cli("search", str(study), "-q")
    assert result.returncode == 2
    says = "unknown metric 'recall_zer' in [search] metric (did you mean \"recall_zero\"?)"
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
