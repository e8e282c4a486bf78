"""A lower-is-better plugin metric as ``[search] metric`` (issue 16): the study minimizes it,
and every ranking — pruning, finalists, the race, ensembles, best/, the leaderboard, the
progress line, the report — follows the study's direction (``automl_tl.trials.Direction``)."""

from __future__ import annotations

import json
import sqlite3

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from automl_tl import selection
from automl_tl.config import config_from_dict, load_config, metric_direction
from automl_tl.errors import UnknownNameError
from automl_tl.leaderboard import selection_note, transfer_difference
from automl_tl.progress import study_state
from automl_tl.registry import Registry
from automl_tl.retrain import best_dir_for
from automl_tl.samplers import GuardedMedianPruner, make_pruner
from automl_tl.scores import caruana_selection
from automl_tl.trials import MAXIMIZE, MINIMIZE, STUDY_METRIC, Direction

from .conftest import create_study, run_main, write_study
from .test_metrics import METRIC_PLUGIN, STUDY


def _plugin_metric(name: str):
    """A metric of the plugin file the tests write (tests/test_metrics.py)."""
    namespace: dict = {}
    exec(compile(METRIC_PLUGIN, "team_metrics.py", "exec"), namespace)
    return namespace[name]()


@pytest.fixture
def costs() -> Registry:
    registry = Registry()
    registry.add("metrics", _plugin_metric("CostWeightedError"), "test")
    return registry


def _study(direction: Direction, values, val_images: int = 100) -> optuna.Study:
    study = optuna.create_study(direction=direction.name)
    study.set_user_attr("data", {"sizes": {"val": val_images}, "classes": ["a", "b", "c"]})
    study.set_user_attr(STUDY_METRIC, direction.record("m"))
    for v in values:
        study.add_trial(
            create_trial(value=v, params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)})
        )
    return study


def test_a_direction_ranks_either_way():
    assert MINIMIZE.better(0.1, 0.3) and not MAXIMIZE.better(0.1, 0.3)
    assert sorted([0.3, None, 0.1], key=MINIMIZE.key) == [0.1, 0.3, None]
    assert sorted([0.3, None, 0.1], key=MAXIMIZE.key) == [0.3, 0.1, None]
    assert MINIMIZE.better(5.0, None) and not MINIMIZE.better(None, 5.0)
    assert MINIMIZE.within(0.29, 0.2, 0.1) and not MINIMIZE.within(0.31, 0.2, 0.1)
    assert MINIMIZE.pessimistic(0.2, 0.05) == pytest.approx(0.25)  # the race's "lcb" rule
    assert MAXIMIZE.pessimistic(0.8, 0.05) == pytest.approx(0.75)
    assert MINIMIZE.sign == -1.0 and MINIMIZE.name == "minimize"


def test_the_metric_declares_the_direction_and_range(costs):
    assert metric_direction("accuracy") == MAXIMIZE
    assert metric_direction("cost_error", costs) == Direction(False, (0.0, 5.0))
    with pytest.raises(UnknownNameError):
        metric_direction("cost_eror", costs)
    # the study records it; a reader takes it from the study alone
    study = _study(Direction(False, (0.0, 5.0)), [0.4])
    assert Direction.of(study) == Direction(False, (0.0, 5.0))


def test_finalists_of_a_lower_is_better_study_are_the_lowest():
    # best 0.2 on 100 images of a metric in [0, 5]: SE = 5 * sqrt(0.04 * 0.96 / 100) = 0.098
    study = _study(Direction(False, (0.0, 5.0)), [0.5, 0.2, 0.25, 0.9, 0.29])
    found = selection.finalists(study, limit=5)
    assert found.best == 0.2 and found.standard_error == pytest.approx(0.098, abs=1e-3)
    assert found.numbers == [1, 2, 4]  # lowest first; 0.5 and 0.9 are out


def test_the_selection_note_counts_near_ties_at_the_low_end():
    values = [0.1, 0.1, 0.12, 0.9]  # SE at 0.1 on 100 images: 0.03
    assert "3 trials score within one standard error" in selection_note(_study(MINIMIZE, values))
    assert selection_note(_study(MAXIMIZE, values)) is None  # 0.9 stands alone


def test_best_is_not_replaced_by_a_costlier_trial(tmp_path):
    config = load_config(write_study(tmp_path, "[search]\nbackbones = ['test_resnet']\n"))
    study = _study(MINIMIZE, [0.1, 0.2, 0.05])
    trials = study.get_trials()
    paths = config.paths
    paths.best.mkdir(parents=True)
    (paths.best / "metrics.json").write_text(json.dumps({"trial": 0}))
    assert best_dir_for(config, study, trials[1]) == paths.model(1)  # 0.2 is worse than 0.1
    assert best_dir_for(config, study, trials[2]) == paths.best  # 0.05 replaces it


def test_the_progress_line_shows_the_lowest_as_best():
    state = study_state(_study(MINIMIZE, [0.3, 0.1, 0.2]))
    assert (state.best_number, state.best_value) == (1, 0.1)


def test_transfer_pays_when_the_transferred_cost_is_lower():
    rows = [
        {"weights": "timm", "scratch": False, "test": {"cost_error": 0.2}, "test_images": 100},
        {"weights": "none", "scratch": True, "test": {"cost_error": 0.6}, "test_images": 100},
    ]
    diff = transfer_difference(rows, "cost_error", Direction(False, (0.0, 5.0)))
    assert diff["pays"] is True and diff["difference"] == pytest.approx(-0.4)
    assert transfer_difference(rows, "cost_error", MAXIMIZE)["pays"] is False


def test_a_plugin_metric_is_pruned_in_its_direction_without_the_chance_guard():
    config = config_from_dict(
        {"name": "t", "search": {"metric": "cost_error", "pruner": "median", "epochs": 4}}
    )
    pruner = make_pruner(config)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert not isinstance(pruner, GuardedMedianPruner)  # chance is unknown for a plugin metric
    study = optuna.create_study(direction="minimize", pruner=pruner)
    for _ in range(5):  # five trials that cost 0.1 at epoch 2
        t = study.ask()
        t.report(0.3, 1)
        t.report(0.1, 2)
        study.tell(t, 0.1)
    cheap, costly = study.ask(), study.ask()
    for trial, value in ((cheap, 0.05), (costly, 0.9)):
        trial.report(value, 1)
        trial.report(value, 2)
    assert not cheap.should_prune() and costly.should_prune()
    # the guard itself never prunes a lower-is-better study at "chance"
    guard = GuardedMedianPruner(epochs=4)
    study = _study(MINIMIZE, [])
    assert guard.threshold(study) is None


def test_ensembles_hill_climb_a_cost_downwards(costs):
    config = config_from_dict({"name": "t", "search": {"metric": "cost_error"}})
    score = selection.metric_to_maximize(config, costs, 3)
    y = torch.tensor([0, 0, 1, 2])
    right = torch.nn.functional.one_hot(y, 3).float() * 0.9 + 0.05
    wrong_zeros = right.clone()
    wrong_zeros[:2] = torch.tensor([0.05, 0.9, 0.05])  # misses both 0s: cost 10 / 4
    assert score(right, y) == 0.0 and score(wrong_zeros, y) == pytest.approx(-2.5)
    assert caruana_selection([wrong_zeros.log(), right.log()], y, score=score) == [0, 1]


def test_a_study_created_for_the_other_direction_is_refused(tmp_path):
    (tmp_path / "team_metrics.py").write_text(METRIC_PLUGIN)
    body = """
plugins = ["team_metrics.py"]
[data]
source = "digits:0-2"
image_size = 16
[search]
n_trials = 1
metric = "cost_error"
backbones = ["test_resnet"]
augmentations = ["none"]
unfreeze = ["top_k"]
epochs = 1
"""
    path = write_study(tmp_path, body, name="team")
    create_study(load_config(path))  # made earlier to maximize (as searched by accuracy)
    result = run_main("search", str(path), "-q")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert (
        "[search] metric = 'cost_error' is lower-is-better, but study 'team' was created to "
        in (result.stderr)
    )
    assert "give the study a new name" in result.stderr
    assert create_study(load_config(path)).get_trials() == []  # no trial created


@pytest.mark.slow
def test_a_lower_is_better_plugin_metric_is_searched_raced_and_the_lowest_exported(tmp_path):
    """A cost-weighted error as [search] metric: the study minimizes it, early stopping keeps
    each trial's cheapest epoch, the race and best/ take the lowest, the report lists it
    first."""
    (tmp_path / "team_metrics.py").write_text(METRIC_PLUGIN)
    body = STUDY.replace("@METRIC@", "cost_error").replace("n_trials = 2", "n_trials = 4")
    body += "patience = 2\n\n[selection]\nensemble = false\n"  # ensembles: unit-tested above
    path = write_study(tmp_path, body, name="team")
    result = run_main("search", str(path), "-q")
    assert result.returncode == 0, result.stderr
    data = json.loads(run_main("report", str(path), "--format", "json", "--no-files").stdout)
    assert data["metric"] == "cost_error" and data["direction"] == "minimize"
    complete = {t["number"]: t["value"] for t in data["trials"] if t["state"] == "COMPLETE"}
    assert len(set(complete.values())) > 1  # a maximizing study would pick another trial
    assert data["best"]["value"] == min(complete.values())
    assert data["best"]["number"] == min(complete, key=lambda n: (complete[n], n))
    out = tmp_path / "team"
    with sqlite3.connect(out / "catalog.db") as db:
        epochs: dict[int, list[float]] = {}
        for trial, cost in db.execute("select trial, val_cost_error from epochs order by epoch"):
            epochs.setdefault(trial, []).append(cost)
        recorded = set(db.execute("select metric, direction from trials"))
        model = db.execute("select trial, direction from models order by id").fetchall()
    for number, value in complete.items():  # fit() kept the cheapest epoch, not the dearest
        assert value == pytest.approx(min(epochs[number]))
    assert recorded == {("cost_error", "minimize")}
    chosen = json.loads((out / "selection.json").read_text())["selection"]
    rows = {r["trial"]: r for r in chosen["finalists"]}
    assert chosen["argmax"] == data["best"]["number"]
    assert chosen["winner"] == min(rows, key=lambda n: (rows[n]["mean"], rows[n]["value"], n))
    for r in rows.values():  # finalists: within one SE above the lowest; "lcb" is mean + SE
        assert r["value"] <= data["best"]["value"] + chosen["standard_error"] + 1e-9
        assert r["lcb"] == pytest.approx(r["mean"] + r["standard_error"], abs=1e-4)
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert metrics["trial"] == chosen["winner"] and metrics["direction"] == "minimize"
    assert model[0] == (chosen["winner"], "minimize")
    assert 0.0 <= metrics["test"]["cost_error"] <= 5.0
    table = run_main("report", str(path), "--no-files")
    assert "metric cost_error, lower is better" in table.stdout
    first_row = table.stdout.splitlines()[3]  # header, title row, rule, then the best trial
    assert first_row.split()[0] == str(data["best"]["number"]), table.stdout
    again = run_main("retrain", str(path))  # without --trial: the race's winner again
    assert again.returncode == 0, again.stderr
    assert f"trial {chosen['winner']} retrained" in again.stdout


def test_the_race_winner_is_the_lowest_mean_or_the_lowest_pessimistic_bound():
    rows = [
        {"trial": 0, "value": 0.20, "mean": 0.30, "lcb": 0.40},  # lcb: mean + SE when minimized
        {"trial": 1, "value": 0.25, "mean": 0.28, "lcb": 0.45},
        {"trial": 2, "value": 0.22, "mean": 0.28, "lcb": 0.42},
    ]
    assert selection.race_winner(rows, "mean", MINIMIZE)["trial"] == 2  # tie: better search score
    assert selection.race_winner(rows, "lcb", MINIMIZE)["trial"] == 0
    assert selection.race_winner(rows, "mean", MAXIMIZE)["trial"] == 0
