"""Accuracy against latency and size (issue 12, deliverable 3): ``[search] objectives`` runs a
multi-objective study, latency measured on a declared target, ``[search] constraints``,
``[selection] pick``, the Pareto front in the report."""

from __future__ import annotations

import json

import optuna
import pytest
import timm
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from automl_tl import latency, selection
from automl_tl.config import config_from_dict, load_config, parse_constraint
from automl_tl.errors import ConfigError
from automl_tl.samplers import make_pruner, pruner_warning
from automl_tl.trials import CONSTRAINTS, MEASURED, STUDY_METRIC, best_trial

from .conftest import create_study, run_main, write_study

MO_STUDY = """
[data]
source = "digits:0-2"
image_size = 32
seed = 0

[search]
n_trials = 3
backbones = ["test_resnet", "test_vit"]
augmentations = ["none"]
unfreeze = ["top_k"]
epochs = 1
batch_size = 64
objectives = ["accuracy", "latency_ms"]
constraints = ["latency_ms <= 1000"]
latency = {device = "cpu", threads = 1, batch_size = 1}

[selection]
pick = "fastest within 5 points"
"""


def _config(search=None, selection_=None):
    return config_from_dict({"name": "t", "search": search or {}, "selection": selection_ or {}})


def _mo_study(rows):
    """A two-objective study (accuracy up, latency down) from (accuracy, latency, feasible)."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr(STUDY_METRIC, {"name": "accuracy", "direction": "maximize"})
    for acc, ms, ok in rows:
        study.add_trial(
            create_trial(
                values=[acc, ms],
                params={"x": 0.5},
                distributions={"x": FloatDistribution(0, 1)},
                user_attrs={MEASURED: {"latency_ms": ms}, CONSTRAINTS: [0.0 if ok else 3.0]},
            )
        )
    return study


@pytest.mark.parametrize(
    "search, says",
    [
        (
            {"objectives": ["accuracy", "latncy_ms"]},
            "unknown objective 'latncy_ms' in [search] objectives (did you mean \"latency_ms\"?)",
        ),
        ({"objectives": ["latency_ms", "accuracy"]}, "the first objective is the metric"),
        (
            {"objectives": ["accuracy", "params_m"], "constraints": ["latency_ms <= 20"]},
            "bounds 'latency_ms', which is not measured",
        ),
        ({"constraints": ["latency_ms < 20"]}, "is not NAME <= NUMBER or NAME >= NUMBER"),
        ({"latency": {"runtime": "tensorrt"}}, "[search] latency runtime = 'tensorrt'"),
        ({"latency": {"thread": 2}}, "unknown key 'thread' in [search] latency"),
    ],
)
def test_bad_objectives_are_one_message_exit_2(tmp_path, search, says):
    body = "[search]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in search.items())
    body = body.replace('{"runtime": "tensorrt"}', '{runtime = "tensorrt"}')
    body = body.replace('{"thread": 2}', "{thread = 2}")
    path = write_study(tmp_path, body)
    result = run_main("search", str(path))
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "tiny").exists()  # nothing created, no trial


def test_a_pick_needs_its_measure():
    with pytest.raises(ConfigError, match="needs 'latency_ms' measured"):
        _config(selection_={"pick": "fastest within 1 point"})
    with pytest.raises(ConfigError, match='is not "best" or "WORD within N points"'):
        _config({"objectives": ["accuracy", "latency_ms"]}, {"pick": "quickest within 1"})


def test_constraints_follow_optunas_sign():
    c = parse_constraint("latency_ms <= 20")
    assert (c.violation(15.0), c.violation(25.0)) == (-5.0, 5.0)
    assert parse_constraint("accuracy >= 0.9").violation(0.8) == pytest.approx(0.1)


def test_the_objectives_set_the_metric_and_the_measures():
    config = _config({"objectives": ["macro_f1", "latency_ms", "model_mb"]})
    assert config.search.metric == "macro_f1" and config.search.multi_objective
    assert config.search.measures == ["latency_ms", "model_mb"]
    assert config.search.latency_target() == {
        "device": "cpu",
        "threads": 1,
        "batch_size": 1,
        "runtime": "torch",
    }


def test_a_multi_objective_study_is_not_pruned_and_says_so():
    config = _config({"objectives": ["accuracy", "latency_ms"], "pruner": "hyperband"})
    assert isinstance(make_pruner(config), optuna.pruners.NopPruner)
    assert "Optuna prunes only single-objective studies" in pruner_warning(config)
    assert (
        pruner_warning(_config({"objectives": ["accuracy", "latency_ms"], "pruner": "none"}))
        is None
    )


def test_size_is_counted_exactly_and_latency_is_timed_on_the_target():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    params = sum(p.numel() for p in model.parameters())
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    target = {"device": "cpu", "threads": 1, "batch_size": 2, "runtime": "torch"}
    before = torch.get_num_threads()
    got = latency.measure(model, 32, ["latency_ms", "params_m", "model_mb"], target)
    assert got["params_m"] == pytest.approx(params / 1e6, abs=1e-6)
    assert got["model_mb"] == pytest.approx(stored / 1e6, abs=1e-6)
    assert 0 < got["latency_ms"] < 1000
    assert torch.get_num_threads() == before  # the thread count is put back
    assert latency.measure(model, 32, ["params_m"], target).keys() == {"params_m"}


def test_the_pick_is_the_fastest_feasible_trial_within_the_points():
    study = _mo_study(
        [
            (0.90, 10.0, True),  # the best accuracy
            (0.895, 4.0, True),  # within 1 point, faster
            (0.895, 2.0, False),  # faster still, but breaks a constraint
            (0.85, 1.0, True),  # fastest, 5 points worse
            (0.95, 30.0, False),  # best accuracy of all, infeasible
        ]
    )
    assert best_trial(study).number == 0  # feasible only
    config = _config({"objectives": ["accuracy", "latency_ms"]})
    assert selection.pick_trial(study, config)[0].number == 0  # "best"
    config.selection.pick = "fastest within 1 point"
    chosen, why = selection.pick_trial(study, config)
    assert chosen.number == 1 and "against the best trial 0" in why
    config.selection.pick = "fastest within 5 points"
    assert selection.pick_trial(study, config)[0].number == 3


def test_a_study_with_other_objectives_is_refused(tmp_path):
    body = MO_STUDY.replace(
        'objectives = ["accuracy", "latency_ms"]',
        'objectives = ["accuracy", "latency_ms", "params_m"]',
    )
    path = write_study(tmp_path, body, name="mo")
    create_study(load_config(path))  # a single-objective study of that name
    result = run_main("search", str(path), "-q")
    assert result.returncode == 2, result.stderr
    assert "a study keeps its objectives" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_multi_objective_search_ships_the_pick_and_its_latency_holds(tmp_path):
    path = write_study(tmp_path, MO_STUDY, name="mo")
    result = run_main("search", str(path), "-q")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "mo"
    data = json.loads(run_main("report", str(path), "--format", "json").stdout)
    assert data["objectives"] == ["accuracy", "latency_ms"] and data["pareto"]
    complete = [t for t in data["trials"] if t["state"] == "COMPLETE"]
    assert all(t["measured"]["latency_ms"] > 0 and t["feasible"] for t in complete)
    assert set(data["pareto"]) <= {t["number"] for t in complete}
    assert "pareto_front.png" in {f["file"] for f in data["report"]["files"] if f["written"]}
    chosen = json.loads((out / "selection.json").read_text())["selection"]
    by_number = {t["number"]: t for t in complete}
    best = max(complete, key=lambda t: (t["value"], -t["measured"]["latency_ms"]))
    near = [t for t in complete if t["value"] >= best["value"] - 0.05 - 1e-12]
    fastest = min(near, key=lambda t: (t["measured"]["latency_ms"], -t["value"], t["number"]))
    assert chosen["winner"] == fastest["number"] and chosen["runs"] == 0
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert metrics["trial"] == chosen["winner"]
    lat = metrics["latency"]
    assert lat["trial_ms"] == pytest.approx(by_number[chosen["winner"]]["measured"]["latency_ms"])
    # the export timed on its own against its trial: 10 % on a quiet machine (benchmarks/
    # latency.py); a shared CI machine only bounds it loosely
    assert 0.25 < lat["export_ms"] / lat["trial_ms"] < 4
    table = run_main("report", str(path), "--no-files").stdout
    assert "latency_ms" in table.splitlines()[1] and "Pareto front (accuracy, latency_ms)" in table
    other = next(t["number"] for t in complete if t["number"] != chosen["winner"])
    again = run_main("retrain", str(path), "--trial", str(other))  # another point to ship
    assert again.returncode == 0, again.stderr
    assert (
        json.loads((out / "models" / f"trial-{other}" / "metrics.json").read_text())["trial"]
        == other
    )
