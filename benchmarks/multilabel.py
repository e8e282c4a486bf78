#!/usr/bin/env python
"""Multi-label: does the search find a better model than a textbook configuration or random
search at the same budget, and do per-label thresholds tuned on validation beat 0.5?

    nice -n 5 python benchmarks/multilabel.py --seeds 3 --trials 6 --epochs 3 --json out.json

For each task (the embedded ``digit_pairs`` study and its harder variant ``digit_pairs:hard``)
and each seed (the split's seed, the sampler's and every trial's), on the search space of
``studies/digit_pairs.toml``:

- ``textbook``: one fit of the portfolio's first entry (test_resnet, no augmentation, the lr
  range's centre): what one would train without a search;
- ``search``: the study's sampler (TPE with the portfolio first) for ``--trials`` trials;
- ``random``: Optuna's random sampler for the same number of trials.

Every trial trains on train and is scored by validation mAP (as a search trial is); the
found model is the trial with the best validation mAP, and its test mAP is reported (the
trial's own model, not a retrain, so the arms differ only in how they choose). For the
found model, test micro F1 at per-label thresholds tuned on validation is compared with
micro F1 at a fixed 0.5. ``--quick`` is the smoke run the test suite uses (a few images,
one seed, two trials of one epoch). The figures in RESULTS.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import torch

from automl_tl import registry_for
from automl_tl.config import load_config
from automl_tl.data import Split, load_splits
from automl_tl.portfolio import portfolio
from automl_tl.samplers import make_sampler
from automl_tl.space import choice_from_params, suggest
from automl_tl.tasks import multilabel_metrics, tune_thresholds
from automl_tl.train import evaluate, fit

REPO = Path(__file__).resolve().parent.parent
TASKS = {"pairs": "digit_pairs", "hard": "digit_pairs:hard"}
ARMS = ("textbook", "search", "random")
CPU = torch.device("cpu")


def _head(split: Split, n: int | None) -> Split:
    if n is None or len(split) <= n:
        return split
    return Split(split.x[:n], split.y[:n], split.names[:n])


def _scored(result, splits, registry) -> dict:
    """Validation mAP (as the search scores), and test metrics at validation-tuned thresholds."""
    val_lp: list = []
    test_lp: list = []
    n = len(splits.class_names)
    evaluate(result.model, splits.val, n, result.data_config, CPU, log_probs=val_lp)
    evaluate(result.model, splits.test, n, result.data_config, CPU, log_probs=test_lp)
    val_probs = torch.cat(val_lp).exp().numpy()
    test_probs = torch.cat(test_lp).exp().numpy()
    val = multilabel_metrics(val_probs, splits.val.y.numpy())
    thresholds = tune_thresholds(val_probs, splits.val.y.numpy() > 0.5)
    test = multilabel_metrics(test_probs, splits.test.y.numpy(), thresholds)
    return {
        "val_map": val["map"],
        "test_map": test["map"],
        "test_micro_f1_tuned": test["micro_f1"],
        "test_micro_f1_at_0.5": test["micro_f1_at_0.5"],
    }


def run_arm(arm: str, config, splits, registry) -> dict:
    seed = config.data.seed
    t0 = time.perf_counter()
    if arm == "textbook":
        choice = choice_from_params(portfolio(config, 1)[0], config)
        result = fit(choice, splits, registry, device="cpu", seed=seed, metric="map")
        scores = _scored(result, splits, registry)
        return {**scores, "trials": 1, "seconds": round(time.perf_counter() - t0, 1)}
    sampler = make_sampler(config) if arm == "search" else optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    found: dict = {}

    def objective(trial):
        choice = suggest(trial, config, registry)
        result = fit(choice, splits, registry, device="cpu", seed=seed + trial.number, metric="map")
        scores = _scored(result, splits, registry)
        trial.set_user_attr("scores", scores)
        return scores["val_map"]

    study.optimize(objective, n_trials=config.search.n_trials)
    found = study.best_trial.user_attrs["scores"]
    return {
        **found,
        "best_params": study.best_params,
        "trials": config.search.n_trials,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"of {list(TASKS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, help="at most this many images per split")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, one seed")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out", type=Path, help="where the decoded caches go")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        print(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}", file=sys.stderr)
        return 2
    if args.quick:
        args.seeds, args.trials, args.epochs, args.limit = 1, 2, 1, args.limit or 64
    logging.getLogger("automl_tl").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    registry = registry_for()
    out = args.out or Path(tempfile.mkdtemp(prefix="multilabel-bench-"))
    results: dict = {"settings": vars(args) | {"json": None, "out": None}, "runs": []}
    for task in args.tasks:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            config = load_config(
                REPO / "studies" / "digit_pairs.toml",
                {
                    "data.source": TASKS[task],
                    "data.seed": seed,
                    "search.n_trials": args.trials,
                    "search.epochs": args.epochs,
                    "search.output": str(out / task),
                },
            )
            splits = load_splits(config, registry)
            for part in ("train", "val", "test"):
                setattr(splits, part, _head(getattr(splits, part), args.limit))
            for arm in ARMS:
                row = {
                    "task": task,
                    "seed": seed,
                    "arm": arm,
                    **run_arm(arm, config, splits, registry),
                }
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for task in args.tasks:
        rows = [r for r in results["runs"] if r["task"] == task]
        by_arm = {a: [r for r in rows if r["arm"] == a] for a in ARMS}
        summary[task] = {a: _spread([r["test_map"] for r in by_arm[a]]) for a in ARMS}
        summary[task]["search - textbook"] = _spread(
            [s["test_map"] - t["test_map"] for s, t in zip(by_arm["search"], by_arm["textbook"])]
        )
        summary[task]["search - random"] = _spread(
            [s["test_map"] - r["test_map"] for s, r in zip(by_arm["search"], by_arm["random"])]
        )
        found = by_arm["search"]
        summary[task]["micro F1 tuned"] = _spread([r["test_micro_f1_tuned"] for r in found])
        summary[task]["micro F1 at 0.5"] = _spread([r["test_micro_f1_at_0.5"] for r in found])
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
