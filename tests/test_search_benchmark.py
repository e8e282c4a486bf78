"""benchmarks/search.py: search methods simulated on the tabular benchmark (issue 12)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math

import pytest

from .conftest import REPO

TABLE = REPO / "benchmarks" / "data" / "tabular.json"


def _module():
    spec = importlib.util.spec_from_file_location("search_bench", REPO / "benchmarks" / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BEST = ("b", "crop", 0.3, "top_k", 1.0, 0.01)


def _table(tasks: int) -> dict:
    """A full small grid on ``tasks`` identical tasks: one configuration (BEST) reaches 0.9,
    the others 0.1-0.6; every epoch takes one second."""
    rows = []
    grid = itertools.product(
        ("a", "b"),
        (("none", 0.0), ("crop", 0.3)),
        (("top_k", 0.0), ("top_k", 1.0), ("lp_ft", 1.0)),
        (1e-3, 1e-2),
    )
    for i, (backbone, (aug, strength), (unfreeze, depth), lr) in enumerate(grid):
        key = (backbone, aug, strength, unfreeze, depth, lr)
        final = 0.9 if key == BEST else 0.1 + (i * 7 % 11) / 20
        rows.append(
            {
                "backbone": backbone,
                "augmentation": aug,
                "aug_strength": strength,
                "unfreeze": unfreeze,
                "unfreeze_depth": depth,
                "lr": lr,
                "val_accuracy": [round(final * 0.5, 4), round(final * 0.8, 4), final],
                "seconds": [1.0, 1.0, 1.0],
            }
        )
    features = {
        "classes": 5,
        "images_per_class": 20.0,
        "resolution": 16,
        "weights": "none",
        **{f"{k}_{c}": 0.3 for k in ("mean", "std") for c in "rgb"},
    }
    return {
        "epochs": 3,
        "tasks": {f"t{n}": {"meta_features": features, "rows": rows} for n in range(tasks)},
    }


def test_the_prior_learned_on_the_other_tasks_starts_with_their_best():
    bench = _module()
    table = _table(3)
    results = bench.simulate(table, seeds=3, n_trials=8, cap=3.0)
    assert len(results) == 9 and {r["task"] for r in results} == {"t0", "t1", "t2"}
    for r in results:
        assert r["random"] == r["random_s"] and r["target"] <= 0.9
        # the other tasks' best is this task's best: the prior's first trial reaches it
        assert r["prior"] == 3.0 and r["prior/s"] == 3.0
    summary = bench.summarize(results)
    assert summary["random"]["median"] == 1.0 and summary["random"]["misses"] == 0
    assert summary["prior"]["median"] == pytest.approx(
        sorted(r["random_s"] / 3.0 for r in results)[4], abs=1e-3
    )
    text = bench.format_summary(summary, 3, 8, 3.0)
    assert "| prior |" in text and "| tpe+hyperband |" in text


def test_the_snapped_space_covers_the_grid():
    bench = _module()
    table = bench.Table(_table(1)["tasks"]["t0"]["rows"])
    point = {
        "backbone": "b",
        "augmentation": "crop",
        "aug_strength": 0.95,
        "unfreeze": "top_k",
        "unfreeze_depth": 0.7,
        "lr": 0.004,
    }
    assert table.key(table.snap(point)) == BEST
    assert table.snap({**point, "unfreeze": "lp_ft"})["unfreeze_depth"] == 1.0
    assert table.snap({**point, "augmentation": "none"})["aug_strength"] == 0.0


def test_the_shipped_table_is_complete_and_simulates(tmp_path):
    """The table in benchmarks/data: every task has the full grid and its meta-features; two
    seeds of every method run on it (the figures are RESULTS.md's, from 100 seeds)."""
    bench = _module()
    data = json.loads(TABLE.read_text())
    assert len(data["tasks"]) >= 4
    sizes = {len(t["rows"]) for t in data["tasks"].values()}
    assert len(sizes) == 1
    for task in data["tasks"].values():
        assert set(task["meta_features"]) >= {"classes", "images_per_class", "mean_r", "std_b"}
        for row in task["rows"]:
            assert len(row["val_accuracy"]) == len(row["seconds"]) == data["epochs"]
    some = dict(list(data["tasks"].items())[:3])
    results = bench.simulate({**data, "tasks": some}, seeds=2, n_trials=8, cap=2.0)
    summary = bench.summarize(results)
    for method in bench.METHODS:
        assert math.isfinite(summary[method]["geomean"]) and summary[method]["geomean"] > 0


def test_tpe_per_second_and_the_independent_reference():
    """tpe/s is tpe when every configuration costs the same (nothing to prefer); with
    ``reference="independent"`` the target is another seed's random search and random runs
    as a method (seed = the run's)."""
    import optuna

    bench = _module()
    data = _table(1)
    methods = ("random", "tpe", "tpe/s")
    for r in bench.simulate(data, seeds=2, n_trials=8, cap=3.0, methods=methods):
        assert r["tpe/s"] == r["tpe"] and r["random"] == r["random_s"]
    table = bench.Table(data["tasks"]["t0"]["rows"])
    runs = bench.simulate(
        data, seeds=2, n_trials=8, cap=3.0, methods=methods, reference="independent"
    )
    for r in runs:
        ref = optuna.samplers.RandomSampler(seed=r["seed"] + bench.REFERENCE_SEED)
        trace = bench.run(table, ref, None, math.inf, 8, None)
        assert r["target"] == max(v for _, v in trace) and r["random_s"] == bench.reached(
            trace, r["target"]
        )
        fresh = bench.run(
            table,
            optuna.samplers.RandomSampler(seed=r["seed"]),
            None,
            r["random_budget"],
            80,
            r["target"],
        )
        assert r["random"] == bench.reached(fresh, r["target"])
    scaled = bench.scale_seconds(_table(1), ["a=10"])["tasks"]["t0"]["rows"]
    assert {tuple(r["seconds"]) for r in scaled} == {(10.0,) * 3, (1.0,) * 3}
    assert all(r["seconds"][0] == (10.0 if r["backbone"] == "a" else 1.0) for r in scaled)
    text = bench.format_summary(bench.summarize(runs, methods), 2, 8, 3.0, "independent")
    assert "reference: an independent random search" in text and "| tpe/s |" in text


def test_paired_compares_two_methods_run_by_run():
    bench = _module()
    runs = [
        {"x": 1.0, "y": 2.0, "x_budget": 9.0, "y_budget": 9.0},  # x twice as fast
        {"x": None, "y": 2.0, "x_budget": 4.0, "y_budget": 4.0},  # x missed: 4 s, half as fast
        {"x": 3.0, "y": 3.0, "x_budget": 9.0, "y_budget": 9.0},
    ]
    p = bench.paired(runs, "x", "y")
    assert (p["geomean"], p["faster"], p["equal"], p["slower"]) == (1.0, 1, 1, 1)
    assert p["ci"][0] <= 1.0 <= p["ci"][1]
    assert bench.paired(runs[:1], "x", "y")["ci"] == (2.0, 2.0)


def test_a_simulation_repeats_exactly_with_hyperband():
    """Hyperband's brackets hash the study's name: the simulated studies have a fixed one."""
    bench = _module()
    methods = ("random", "tpe+hyperband", "portfolio")
    first = bench.simulate(_table(1), seeds=3, n_trials=8, cap=3.0, methods=methods)
    assert bench.simulate(_table(1), seeds=3, n_trials=8, cap=3.0, methods=methods) == first


def test_the_priors_trials_run_their_epochs_and_prior_prune_cuts_them():
    """``prior``: Hyperband spares the trials the prior chose (the package's pruner reads the
    attribute PriorSampler sets); ``prior+prune``: it may cut them, as before."""
    bench = _module()
    data = _table(3)
    table = bench.Table(data["tasks"]["t0"]["rows"])
    entries = {"prior": bench.prior_entries(data, "t0", 6, False)}
    traces = {}
    for method in ("prior", "prior+prune"):
        sampler = bench.sampler_for(method, 0, 20, table, entries)
        pruner = bench._hyperband(3, spare_prior=method == "prior")
        traces[method] = [v for _, v in bench.run(table, sampler, pruner, 1e9, 6, None)]
    assert traces["prior"] == pytest.approx([0.9, 0.6, 0.6, 0.55, 0.55, 0.15])  # all completed
    assert traces["prior+prune"][0] == 0.9 and traces["prior+prune"].count(None) == 4


def test_live_searches_are_measured_against_an_independent_random_search():
    """benchmarks/search_live.py's figures from designed traces: the reference's best is the
    target; a method that never reaches it counts 3x the reference's total seconds."""
    spec = importlib.util.spec_from_file_location(
        "search_live", REPO / "benchmarks" / "search_live.py"
    )
    live = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(live)

    def run(method, trace):
        return {"task": "t", "seed": 0, "method": method, "trace": trace}

    runs = [
        run("reference", [(1.0, 0.2), (3.0, 0.5), (4.0, 0.4)]),  # target 0.5 at 3 s of 4
        run("random", [(2.0, 0.3), (6.0, 0.5)]),
        run("default", [(1.0, None), (1.5, 0.6)]),  # a pruned trial, then past the target
        run("prior", [(1.0, 0.3), (2.0, 0.4)]),  # never: a miss at 3 x 4 s
    ]
    rows = {r["method"]: r for r in live.summarize(runs)}
    assert {m: rows[m]["speedup"] for m in rows} == {"random": 0.5, "default": 2.0, "prior": 0.25}
    assert rows["prior"]["miss"] and rows["prior"]["seconds"] == 12.0
    assert not rows["default"]["miss"] and rows["default"]["target"] == 0.5
    text = live.format_rows(list(rows.values()))
    assert "| t | 0 | 0.500 | 3.0 | 6.0 | 1.5 | 12.0* | 0.50 | 2.00 | 0.25 |" in text


@pytest.mark.slow  # pretrains two tiny backbones and runs 9 searches of 2 trials (~15 s)
def test_live_search_benchmark_smoke(tmp_path):
    """benchmarks/search_live.py end to end at a tiny size: the six tasks written, the random
    searches that feed the priors, then reference, default and prior on the live task, each a
    real search whose trace has its trials; the summary has a row per method."""
    spec = importlib.util.spec_from_file_location(
        "search_live", REPO / "benchmarks" / "search_live.py"
    )
    live = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(live)
    out = tmp_path / "live.json"
    argv = ["--tasks", "digits-few", "--trials", "2", "--epochs", "1", "--out", str(tmp_path)]
    import torch

    threads = torch.get_num_threads()
    try:
        assert live.main([*argv, "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script runs on one thread
    result = json.loads(out.read_text())
    methods = [(r["task"], r["method"]) for r in result["runs"]]
    assert methods == [(t, "random") for t in live.TASKS] + [
        ("digits-few", m) for m in ("reference", "default", "prior")
    ]
    assert all(len(r["trace"]) == 2 for r in result["runs"])
    assert {r["method"] for r in result["summary"]} == {"random", "default", "prior"}


def test_the_prior_learns_only_from_the_history_it_is_given(tmp_path, capsys):
    """``--history``: the prior of a left-out task learns from those tasks only (how the prior
    grows with a team's history); a task the table lacks is refused with one message."""
    bench = _module()
    data = _table(3)
    rows = data["tasks"]["t2"]["rows"]
    worse = dict(data["tasks"]["t2"], rows=[dict(r, val_accuracy=[0.1, 0.1, 0.1]) for r in rows])
    worse["rows"][0]["val_accuracy"] = [0.5, 0.7, 0.95]  # t2's best is another configuration
    data["tasks"]["t2"] = worse
    first = bench._params(worse["rows"][0])
    assert bench.prior_entries(data, "t0", 4, False, history=["t2"])[0] == first
    assert bench.prior_entries(data, "t0", 4, False, history=["t1"])[0] == bench._params(
        next(r for r in rows if bench.Table.key(r) == BEST)
    )
    assert bench.prior_entries(data, "t0", 4, False, history=["t0"]) == []  # no earlier task
    table = tmp_path / "table.json"
    table.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--table", str(table), "--history", "t1", "nope", "--seeds", "1"])
    assert exc.value.code == 2 and "no task nope in" in capsys.readouterr().err


def test_live_searches_compare_a_short_and_a_long_history():
    """With ``--history``, prior-six (the first six tasks' searches) runs beside prior: the
    table gets a column pair for it; without it the columns are as before."""
    spec = importlib.util.spec_from_file_location(
        "search_live", REPO / "benchmarks" / "search_live.py"
    )
    live = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(live)
    assert set(live.ALL_TASKS) >= set(live.TASKS) and len(live.ALL_TASKS) == 12

    def run(method, trace):
        return {"task": "t", "seed": 0, "method": method, "trace": trace}

    runs = [
        run("reference", [(1.0, 0.2), (3.0, 0.5)]),
        run("prior", [(1.0, 0.5)]),
        run("prior-six", [(1.0, 0.3), (6.0, 0.5)]),
    ]
    text = live.format_rows(live.summarize(runs))
    assert (
        "| task | seed | target | reference s | prior s | prior-six s | prior x | prior-six x |"
        in text
    )
    assert "| t | 0 | 0.500 | 3.0 | 1.0 | 6.0 | 3.00 | 0.50 |" in text
    assert "prior-six: median 0.50x" in text
