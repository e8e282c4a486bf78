"""benchmarks/run.py keeps working: its tiny mode runs every benchmark end to end.

Timings are not asserted (they belong to benchmarks/RESULTS.md); what is asserted is that each
figure is produced, is a finite ratio, and that the table and the JSON say how it was made.
"""

import json
import math
import subprocess
import sys

import pytest

from .conftest import REPO

KEYS = (
    "trial_loop_vs_bare",
    "augment_share",
    "cached_vs_pil_epoch",
    "linear_probe_cached_speedup",
    "frozen_backward_saving",
    "search_efficiency",
)


def bench(script: str, *args: str, timeout: int = 900, **kwargs) -> subprocess.CompletedProcess:
    """benchmarks/SCRIPT.py run as a user runs it: its own process, the output captured."""
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def quick(script: str, tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """benchmarks/SCRIPT.py --quick (studies under tmp_path): its output and its JSON."""
    out = tmp_path / f"{script}.json"
    proc = bench(
        script, "--quick", *extra, "--json", out, "--out", tmp_path / "studies", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def assert_refused(script: str, *args: str, message: str) -> None:
    """An unknown name is one message on stderr and exit 2."""
    proc = bench(script, *args, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_tiny_mode_produces_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = bench("run", "--tiny", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for key in KEYS:
        assert math.isfinite(results[key]) and results[key] >= 0, key
        assert key in proc.stdout  # the table
        assert results["details"][key]["wall_seconds"] >= 0
    assert 0 <= results["augment_share"] < 1
    details = results["details"]
    assert set(details["augment_share"]["policies"]) == {"none", "randaugment"}
    assert details["augment_share"]["policies"]["none"]["share"] == 0.0
    assert details["linear_probe_cached_speedup"]["same_result"] is True
    assert details["search_efficiency"]["seeds"][0]["random_epochs_to_best"] >= 1
    meta = results["meta"]
    assert meta["profile"] == "tiny" and meta["device"] == "cpu"
    assert "--tiny" in meta["command"] and meta["date"] and meta["machine"]["cpus"]


def test_unknown_benchmark_is_refused():
    assert_refused("run", "--tiny", "--only", "nope", message="unknown ['nope']")


@pytest.mark.slow
def test_search_space_benchmark_quick_mode(tmp_path):
    """benchmarks/search_space.py --quick: both tasks, both arms, one seed, every figure."""
    proc, results = quick("search_space", tmp_path)
    rows = results["seeds"]
    assert {(r["task"], r["arm"]) for r in rows} == {
        (t, a) for t in ("shapes", "digits") for a in ("before", "after")
    }
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert 0 <= r["complete_at_chance"] <= r["complete"]
        if r["arm"] == "before":  # the flat space: every trial has a depth
            assert "unfreeze_depth" in r["best_params"]
        else:  # random init: the conditional space's own branch
            assert "unfreeze_scratch" in r["best_params"]
            assert "unfreeze_depth" not in r["best_params"]
    for task in ("shapes", "digits"):
        summary = results["summary"][task]
        assert math.isfinite(summary["difference"]["mean_sd"][0])
        assert f"{task} after - before" in proc.stdout
    assert "--quick" in results["command"]


@pytest.mark.slow
def test_selection_benchmark_quick_mode_reports_every_arm(tmp_path):
    proc, results = quick("selection", tmp_path, "--markdown")
    (row,) = results["rows"]
    for arm in ("argmax", "raced", "soup", "ensemble", "oracle"):
        assert 0 <= row[arm] <= 1, arm
    assert row["oracle"] == max(row["finalists"].values())
    assert row["regret_argmax"] >= 0 and row["regret_raced"] >= 0
    assert "| task | argmax | raced | soup | ensemble |" in proc.stdout
    assert "--quick" in results["command"]


def test_selection_benchmark_refuses_an_unknown_task():
    assert_refused("selection", "--tasks", "nope", message="unknown task(s) ['nope']")


@pytest.mark.slow
def test_multilabel_benchmark_quick_mode(tmp_path):
    """benchmarks/multilabel.py --quick: every arm on one task, the threshold comparison."""
    _, results = quick("multilabel", tmp_path, "--tasks", "pairs")
    assert [r["arm"] for r in results["runs"]] == ["textbook", "search", "random"]
    for row in results["runs"]:
        assert 0.0 <= row["test_map"] <= 1.0 and row["trials"] == (
            1 if row["arm"] == "textbook" else 2
        )
        # what a searched arm chose (a difference between the arms can be read from it)
        assert ("best_params" in row) == (row["arm"] != "textbook")
    assert set(results["summary"]["pairs"]) >= {"search - random", "micro F1 at 0.5"}


def test_multilabel_benchmark_refuses_an_unknown_task():
    assert_refused("multilabel", "--tasks", "nope", message="unknown task(s) ['nope']")


def _benchmark(stem: str):
    """benchmarks/STEM.py as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(stem, REPO / "benchmarks" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_check():
    return _benchmark("gpu_check")


def test_gpu_check_keeps_to_its_budget_and_records_what_it_skipped(tmp_path):
    """With no time left every part is recorded as skipped (nothing lost, nothing run), and
    the JSON and the table are written all the same."""
    gpu_check = _gpu_check()
    assert gpu_check.main(["--device", "cpu", "--seconds", "5", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["parts"]) == [name for name, _, _ in gpu_check.PARTS]
    assert {p["status"] for p in report["parts"].values()} == {"skipped: the time budget is spent"}
    assert report["figures"] == [] and report["meta"]["budget_seconds"] == 5.0
    assert (
        "| loop | skipped: the time budget is spent | 0 |"
        in (tmp_path / "gpu_check.md").read_text()
    )


@pytest.mark.slow
def test_gpu_check_script_runs_its_python_parts_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh end to end on the CPU (tiny sizes): the parts that need no GPU
    produce their figures; the GPU-only ones say so."""
    import os

    env = {
        **os.environ,
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_TINY": "1",
        "GPU_CHECK_PARTS": "fit,packing,peft,sync-test,search",
        "PYTHON": sys.executable,
        "GPU_CHECK_SECONDS": "560",
    }
    proc = subprocess.run(
        [str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert statuses == {
        "fit": "ok",
        "packing": "ok",
        "peft": "ok",
        "sync-test": "skipped: needs a GPU",
        "search": "skipped: needs a GPU",
    }, report["parts"]
    peft = {
        f"{arm}_speedup_{model}"
        for arm in ("bitfit", "norm_fit", "lora")
        for model in ("test_resnet", "test_vit")
    }
    assert {r["figure"] for r in report["figures"]} == {"fit_train_share", "packing_speedup"} | peft
    for row in report["figures"]:
        assert math.isfinite(row["value"]) and row["value"] > 0, row
    per_k = report["parts"]["packing"]["results"]["details"]["packing_speedup"]["models"]
    (model,) = per_k.values()
    assert set(model["per_k"]) == {"1", "2"}
    assert "| fit_train_share |" in (tmp_path / "gpu_check.md").read_text()


def test_recipe_benchmark_builds_its_tasks_and_arms(tmp_path):
    """benchmarks/recipe.py without training: the imbalanced task's folder (one class 10x,
    a balanced test split), the two arms' spaces and the summary of a difference."""
    recipe = _benchmark("recipe")
    counts = recipe.write_imbalanced(tmp_path / "imb", seed=0, minority=5, test_per_class=7)
    assert counts["test"] == {str(d): 7 for d in range(5, 10)}
    labelled = {d: counts["train"][d] + counts["val"][d] for d in counts["train"]}
    assert labelled == {"5": 50, "6": 5, "7": 5, "8": 5, "9": 5}
    assert len(list((tmp_path / "imb" / "train" / "5").glob("*.png"))) == counts["train"]["5"]
    args = recipe.main.__globals__["argparse"].Namespace(
        target="digits:5-9", per_class=20, n_trials=3, backbones=["test_resnet"], epochs=1,
        batch_size=8, image_size=16,
    )  # fmt: skip
    today = recipe.study_dict(args, "imbalanced", "today", 0, {}, tmp_path)
    recipe_space = recipe.study_dict(args, "imbalanced", "recipe", 0, {}, tmp_path)
    assert today["search"]["imbalance"] == ["none"] and "label_smoothing" not in today["search"]
    assert "imbalance" not in recipe_space["search"]  # the rule: logit_adjust on this task
    assert recipe_space["search"]["metric"] == today["search"]["metric"] == "balanced_accuracy"
    adjust = recipe.study_dict(args, "imbalanced", "adjust", 0, {}, tmp_path)["search"]
    assert adjust["imbalance"] == ["logit_adjust"] and "label_smoothing" not in adjust
    short = recipe.study_dict(args, "balanced", "short", 0, {}, tmp_path)["search"]
    assert short["ema_decay"] == 0.998 and short["mixup_alpha"] == [0.1, 0.4]
    counts = recipe.write_generated(tmp_path / "g", "shapes-imbalanced", 0, 4, 2, 3)
    labelled = {c: counts["train"][c] + counts["val"][c] for c in counts["train"]}
    assert labelled == {"class0": 20, **{f"class{c}": 2 for c in range(1, 6)}}
    assert counts["test"] == {f"class{c}": 3 for c in range(6)}
    shapes = recipe.study_dict(args, "textures", "today", 0, {}, tmp_path)
    assert shapes["search"]["metric"] == "accuracy"
    assert shapes["data"]["source"] == f"folder:{tmp_path / 'textures-0'}"
    rows = [
        {"task": "imbalanced", "arm": arm, "seed": seed, "seconds": 1.0, "test_accuracy": 0.5,
         "test_balanced_accuracy": value}
        for arm, seed, value in (("today", 0, 0.5), ("recipe", 0, 0.6), ("today", 1, 0.4),
                                 ("recipe", 1, 0.42))
    ]  # fmt: skip
    d = recipe.summarize(rows)["imbalanced"]["difference"]
    assert d["per_seed"] == pytest.approx([0.1, 0.02]) and d["worst"] == pytest.approx(0.02)
    assert d["target_met"] is True and d["recipe_better"] == 2


@pytest.mark.slow
def test_recipe_benchmark_quick_mode(tmp_path):
    """benchmarks/recipe.py --quick: both tasks, both arms, one seed, every figure."""
    proc, results = quick("recipe", tmp_path, "--markdown")
    assert {(r["task"], r["arm"]) for r in results["rows"]} == {
        (t, a) for t in ("balanced", "imbalanced") for a in ("today", "recipe")
    }
    for r in results["rows"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["test_balanced_accuracy"] <= 1.0
        assert ("label_smoothing" in r["best_params"]) == (r["arm"] == "recipe")
    for task in ("balanced", "imbalanced"):
        assert math.isfinite(results["summary"][task]["difference"]["mean_sd"][0])
    assert "| task | figure | today | arm |" in proc.stdout
