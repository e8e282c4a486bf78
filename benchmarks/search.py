#!/usr/bin/env python
"""Search methods compared on the tabular benchmark (``benchmarks/data/tabular.json``, built
by ``benchmarks/build_tabular.py``): each method runs on the table instead of training, so a
hundred seeds take seconds to minutes, as LCBench / YAHPO do it.

    python benchmarks/search.py                       # 100 seeds, every task left out in turn
    python benchmarks/search.py --seeds 5 --json out.json
    python benchmarks/search.py --tasks shapes --history digits-few textures   # a small history

The space is the study's (automl_tl/space.py's shape): backbone, augmentation policy,
strength in [0, 1], unfreeze strategy, depth in [0, 1] (``top_k``), lr (log, [1e-4, 3e-2]);
a sampled point runs as the nearest configuration of the table's grid (strength, depth and lr
snapped to the grid's values). A trial's cost is the seconds its epochs took when the table
was built; a pruned trial costs the epochs it ran.

Methods (each as the search builds it, on Optuna's samplers; seed = the run's seed):

- ``random``: Optuna's RandomSampler, ``--trials`` trials (the reference);
- ``tpe``: TPE (multivariate, grouped, constant liar), random start-up of
  :func:`automl_tl.samplers.startup_trials` trials, no portfolio;
- ``tpe/s``: the same TPE, cost-aware as under ``[search] timeout``
  (:class:`automl_tl.samplers.CostAwareSampler`: after the start-up, the cheapest of
  ``COST_PROPOSALS`` TPE proposals by the cost model of the trials so far, which record the
  table's seconds), no pruner;
- ``tpe+hyperband``: the same with Hyperband on the per-epoch validation accuracy;
- ``portfolio``: the default: the textbook portfolio (automl_tl/portfolio.py: one entry per
  backbone) first, then TPE, with Hyperband;
- ``prior``: the team prior learned on the *other* tasks (leave-one-task-out:
  :func:`automl_tl.prior.build_prior` on their rows and meta-features) in every start-up slot
  (:class:`automl_tl.samplers.PriorSampler`), then TPE, with Hyperband sparing the prior's
  trials (:class:`automl_tl.samplers.PriorSparingHyperbandPruner`): what ``[search] prior``
  does;
- ``prior+prune``: the same, but Hyperband may prune the prior's trials (as before the
  pruner spared them);
- ``prior/s``: the same as ``prior``, the portfolio chosen per expected second
  (``[search] timeout``).

Measured, per left-out task and seed: random's best final accuracy after ``--trials`` trials,
the seconds random spent until it first reached it, and the seconds each method spent until
it first reached it (at most ``--cap`` x random's total seconds; a run that never gets there
counts as the cap and is reported as a miss). The ratio random / method is the method's
speed-up (>1: faster than random); printed as the median and quartiles over seeds (all tasks
pooled) and the median per task.

``--reference independent``: the target and random's seconds come from a random search with
another seed (``seed + REFERENCE_SEED``) than the methods' (``seed``), and ``random`` is a
method like the others (a fresh random search). With the default (``shared``), random and
TPE share their seed, so TPE's random start-up trials are random's first trials: whenever
random found its best there, TPE's ratio is exactly 1.00.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402

from automl_tl.prior import Evaluation, Task, build_prior  # noqa: E402
from automl_tl.samplers import (  # noqa: E402
    COST_PROPOSALS,
    CostAwareSampler,
    PortfolioSampler,
    PriorSampler,
    PriorSparingHyperbandPruner,
)
from automl_tl.trials import EPOCHS_RUN, SECONDS  # noqa: E402

TABLE = REPO / "benchmarks" / "data" / "tabular.json"
METHODS = (
    "random",
    "tpe",
    "tpe/s",
    "tpe+hyperband",
    "portfolio",
    "prior",
    "prior+prune",
    "prior/s",
)
#: --reference independent: the reference random search's seed is the run's seed + this
REFERENCE_SEED = 100_003
#: tpe/s: TPE proposals per trial (--proposals)
PROPOSALS = [COST_PROPOSALS]
LR_RANGE = (1e-4, 3e-2)


class Table:
    """The table of one task: configuration key -> (final curve, seconds per epoch)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.grid = {
            k: sorted({r[k] for r in rows})
            for k in (
                "backbone",
                "augmentation",
                "aug_strength",
                "unfreeze",
                "unfreeze_depth",
                "lr",
            )
        }
        self.by_key = {self.key(r): r for r in rows}

    @staticmethod
    def key(p: dict) -> tuple:
        return (
            p["backbone"],
            p["augmentation"],
            p["aug_strength"],
            p["unfreeze"],
            p["unfreeze_depth"],
            p["lr"],
        )

    def snap(self, params: dict) -> dict:
        """The grid configuration nearest to a sampled point."""

        def nearest(name, value, log=False):
            values = [v for v in self.grid[name] if not (name == "aug_strength" and v == 0)]
            f = (lambda v: math.log(v)) if log else (lambda v: v)
            return min(values, key=lambda v: abs(f(v) - f(value)))

        aug = params["augmentation"]
        unfreeze = params["unfreeze"]
        return {
            "backbone": params["backbone"],
            "augmentation": aug,
            "aug_strength": 0.0
            if aug == "none"
            else nearest("aug_strength", params["aug_strength"]),
            "unfreeze": unfreeze,
            "unfreeze_depth": 1.0
            if unfreeze != "top_k"
            else nearest("unfreeze_depth", params["unfreeze_depth"]),
            "lr": nearest("lr", params["lr"], log=True),
        }

    def row(self, params: dict) -> dict:
        return self.by_key[self.key(self.snap(params))]


def suggest(trial: optuna.Trial, table: Table) -> dict:
    """The space, define-by-run as automl_tl.space.suggest draws it."""
    backbone = trial.suggest_categorical("backbone", table.grid["backbone"])
    augmentation = trial.suggest_categorical("augmentation", table.grid["augmentation"])
    strength = 0.0 if augmentation == "none" else trial.suggest_float("aug_strength", 0.0, 1.0)
    unfreeze = trial.suggest_categorical("unfreeze", table.grid["unfreeze"])
    depth = trial.suggest_float("unfreeze_depth", 0.0, 1.0) if unfreeze == "top_k" else 1.0
    lr = trial.suggest_float("lr", *LR_RANGE, log=True)
    return {
        "backbone": backbone,
        "augmentation": augmentation,
        "aug_strength": strength,
        "unfreeze": unfreeze,
        "unfreeze_depth": depth,
        "lr": lr,
    }


def startup(n_trials: int) -> int:
    """automl_tl.samplers.startup_trials for ``n_trials``."""
    return max(4, min(10, n_trials // 3))


def textbook(table: Table) -> list[dict]:
    """automl_tl/portfolio.py's entries for pretrained backbones: flip_crop at 0.5, lp_ft at
    depth 1, lr at the fine-tuning range's log-centre (3e-4)."""
    return [
        {
            "backbone": b,
            "augmentation": "flip_crop",
            "aug_strength": 0.5,
            "unfreeze": "lp_ft",
            "unfreeze_depth": 1.0,
            "lr": 3e-4,
        }
        for b in table.grid["backbone"]
    ]


def run(table: Table, sampler, pruner, budget_s: float, max_trials: int, stop_at: float | None):
    """One search on the table until ``budget_s`` seconds or ``max_trials`` trials (or a final
    score >= ``stop_at``). Returns [(cumulative seconds, final score or None)] per trial. Each
    trial records the table's seconds and its epochs run as the search's trials do (the
    ``seconds`` and ``epochs_run`` attributes), which the cost-aware sampler reads."""
    # a fixed name: Hyperband assigns a trial's bracket by a hash of the study's name and the
    # trial's number, and an unnamed study gets a random name (runs would not repeat)
    study = optuna.create_study(
        study_name="tabular", direction="maximize", sampler=sampler, pruner=pruner
    )
    trace: list[tuple[float, float | None]] = []
    spent = 0.0
    for _ in range(max_trials):
        if spent >= budget_s:
            break
        trial = study.ask()
        row = table.row(suggest(trial, table))
        cost, pruned = 0.0, False
        for epoch, (value, seconds) in enumerate(zip(row["val_accuracy"], row["seconds"])):
            cost += seconds
            trial.report(value, epoch + 1)
            if pruner is not None and epoch + 1 < len(row["val_accuracy"]) and trial.should_prune():
                pruned = True
                break
        spent += cost
        trial.set_user_attr(SECONDS, cost)
        trial.set_user_attr(EPOCHS_RUN, epoch + 1)
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            trace.append((spent, None))
        else:
            final = row["val_accuracy"][-1]
            study.tell(trial, final)
            trace.append((spent, final))
            if stop_at is not None and final >= stop_at:
                break
    return trace


def _tpe(seed: int, n_startup: int):
    return optuna.samplers.TPESampler(
        multivariate=True, group=True, constant_liar=True, seed=seed, n_startup_trials=n_startup
    )


def _hyperband(epochs: int, spare_prior: bool = True):
    """automl_tl.samplers.make_pruner's Hyperband (the dead-trial guard aside: the table's
    trials never sit at chance while others learn, and it needs the study's classes)."""
    pruner = PriorSparingHyperbandPruner if spare_prior else optuna.pruners.HyperbandPruner
    return pruner(min_resource=1, max_resource=epochs, reduction_factor=3)


def prior_entries(
    table_data: dict, task: str, size: int, per_second: bool, history=None
) -> list[dict]:
    """The team prior's portfolio for ``task``, learned on every other task of the table
    (``history``: only on these)."""
    others = []
    for name, t in table_data["tasks"].items():
        if name == task or (history and name not in history):
            continue
        evaluations = [
            Evaluation(_params(r), r["val_accuracy"][-1], sum(r["seconds"])) for r in t["rows"]
        ]
        others.append(Task(name, "table", t["meta_features"], evaluations))
    features = table_data["tasks"][task]["meta_features"]
    prior = build_prior(others, features, size, per_second=per_second)
    return [_params(e.params) for e in prior.entries]


def _params(r: dict) -> dict:
    return {
        k: r[k]
        for k in ("backbone", "augmentation", "aug_strength", "unfreeze", "unfreeze_depth", "lr")
    }


def sampler_for(method: str, seed: int, n_trials: int, table: Table, entries: dict):
    n = startup(n_trials)
    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if method in ("tpe", "tpe+hyperband"):
        return _tpe(seed, n)
    if method == "tpe/s":
        return CostAwareSampler(_tpe(seed, n), PROPOSALS[0])
    if method == "portfolio":
        return PortfolioSampler(_tpe(seed, n), textbook(table)[:n])
    chosen = entries["prior" if method == "prior+prune" else method]
    labels = [f"#{n + 1}" for n in range(len(chosen))]  # trials carry the attribute "prior"
    return PriorSampler(_tpe(seed, len(chosen)), chosen, labels)


def reached(trace, target: float) -> float | None:
    """Seconds until the first final score >= target (None: never)."""
    for spent, value in trace:
        if value is not None and value >= target - 1e-9:
            return spent
    return None


def simulate(
    table_data: dict,
    seeds: int,
    n_trials: int,
    cap: float,
    methods=METHODS,
    only=None,
    reference: str = "shared",
    first_seed: int = 0,
    history=None,
) -> list[dict]:
    """Every method on every left-out task (``only``: these) for ``seeds`` seeds; one dict
    per (task, seed). The prior learns from every other task of the table either way.
    ``reference``: "shared" (random's run is the reference) or "independent" (the reference
    is a random search with seed ``seed + REFERENCE_SEED``; ``random`` runs as a method).
    Seeds ``first_seed`` .. ``first_seed + seeds - 1`` (others than those a setting was
    tuned on). ``history``: the tasks the prior may learn from (default: all the others), to
    see how the prior grows with a team's history."""
    epochs = table_data["epochs"]
    results = []
    for task, data in table_data["tasks"].items():
        if only and task not in only:
            continue
        print(f"{task} ...", file=sys.stderr, flush=True)
        table = Table(data["rows"])
        entries = {
            m: prior_entries(table_data, task, startup(n_trials), m == "prior/s", history)
            for m in ("prior", "prior/s")
            if any(x.startswith(m) for x in methods)
        }
        for seed in range(first_seed, first_seed + seeds):
            ref_seed = seed + (REFERENCE_SEED if reference == "independent" else 0)
            base = run(
                table, optuna.samplers.RandomSampler(seed=ref_seed), None, math.inf, n_trials, None
            )
            target = max(v for _, v in base if v is not None)
            random_s = reached(base, target)
            budget = cap * base[-1][0]
            row = {"task": task, "seed": seed, "target": target, "random_s": random_s}
            for method in methods:
                if method == "random" and reference == "shared":
                    row[method] = random_s
                    continue
                sampler = sampler_for(method, seed, n_trials, table, entries)
                pruner = (
                    None
                    if method in ("random", "tpe", "tpe/s")
                    else _hyperband(epochs, spare_prior=method != "prior+prune")
                )
                trace = run(table, sampler, pruner, budget, 10 * n_trials, target)
                row[method] = reached(trace, target)
                row[f"{method}_budget"] = budget
            results.append(row)
    return results


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def summarize(results: list[dict], methods=METHODS) -> dict:
    """Per method: median and quartiles of random's seconds / the method's (a miss counts as
    the cap), the geometric mean, misses; and the median per task."""
    out = {}
    for m in methods:
        ratios, misses, per_task = [], 0, {}
        for r in results:
            spent = r[m] if r[m] is not None else r.get(f"{m}_budget")
            if r[m] is None:
                misses += 1
            ratio = r["random_s"] / spent
            ratios.append(ratio)
            per_task.setdefault(r["task"], []).append(ratio)
        q1, med, q3 = _quartiles(ratios)
        out[m] = {
            "median": round(med, 3),
            "q1": round(q1, 3),
            "q3": round(q3, 3),
            "geomean": round(math.exp(statistics.fmean(math.log(x) for x in ratios)), 3),
            "misses": misses,
            "runs": len(ratios),
            "per_task": {t: round(statistics.median(v), 3) for t, v in per_task.items()},
        }
    return out


#: pairs compared run by run (same seed, same target): the cost-aware methods with the plain
#: ones, the prior whose trials Hyperband spares with the one it may prune
PAIRS = (("tpe/s", "tpe"), ("prior/s", "prior"), ("prior", "prior+prune"))


def paired(results: list[dict], a: str, b: str, resamples: int = 2000) -> dict:
    """Method ``a`` against ``b`` on the same runs: the geometric mean of b's seconds / a's
    (> 1: ``a`` faster; a miss counts as the cap), its 95 % bootstrap interval over runs
    (seeded), and the runs where ``a`` was faster / equal / slower."""
    import random

    def spent(r, m):
        return r[m] if r[m] is not None else r[f"{m}_budget"]

    logs = [math.log(spent(r, b) / spent(r, a)) for r in results]
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(resamples))
    return {
        "geomean": round(math.exp(statistics.fmean(logs)), 3),
        "ci": (
            round(math.exp(means[int(0.025 * resamples)]), 3),
            round(math.exp(means[int(0.975 * resamples) - 1]), 3),
        ),
        "faster": sum(x > 1e-12 for x in logs),
        "equal": sum(abs(x) <= 1e-12 for x in logs),
        "slower": sum(x < -1e-12 for x in logs),
    }


def format_pairs(results: list[dict], methods) -> str:
    lines = []
    for a, b in PAIRS:
        if a in methods and b in methods:
            p = paired(results, a, b)
            lines.append(
                f"{a} vs {b} (same runs): {b}'s seconds / {a}'s, geometric mean {p['geomean']:.2f}x "
                f"(95 % bootstrap {p['ci'][0]:.2f}-{p['ci'][1]:.2f}); {a} faster in "
                f"{p['faster']}, equal in {p['equal']}, slower in {p['slower']} of {len(results)}"
            )
    return "\n".join(lines)


def format_summary(
    summary: dict, seeds: int, n_trials: int, cap: float, reference: str = "shared"
) -> str:
    tasks = list(next(iter(summary.values()))["per_task"])
    ref = (
        "an independent random search (seed + REFERENCE_SEED)"
        if reference == "independent"
        else "random (same seed as the methods)"
    )
    lines = [
        f"speed-up to the reference's final best (reference: {ref}, {n_trials} trials; "
        f"{seeds} seeds x {len(tasks)} left-out tasks; a miss = {cap:g}x the reference's "
        "seconds): the reference's seconds to its best / the method's",
        "",
        "| method | median | quartiles | geometric mean | misses | " + " | ".join(tasks) + " |",
        "|---|---|---|---|---|" + "---|" * len(tasks),
    ]
    for m, s in summary.items():
        lines.append(
            f"| {m} | {s['median']:.2f}x | {s['q1']:.2f}–{s['q3']:.2f} | {s['geomean']:.2f}x | "
            f"{s['misses']}/{s['runs']} | "
            + " | ".join(f"{s['per_task'][t]:.2f}" for t in tasks)
            + " |"
        )
    return "\n".join(lines)


def scale_seconds(table_data: dict, factors: list[str]) -> dict:
    """``table_data`` with each ``BACKBONE=FACTOR``'s per-epoch seconds multiplied (a what-if
    on a table whose backbones cost about the same)."""
    for text in factors:
        backbone, _, factor = text.partition("=")
        for task in table_data["tasks"].values():
            for row in task["rows"]:
                if row["backbone"] == backbone:
                    row["seconds"] = [s * float(factor) for s in row["seconds"]]
    return table_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", default=str(TABLE))
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds FIRST .. FIRST + SEEDS - 1 (held out)"
    )
    parser.add_argument("--trials", type=int, default=20, help="random search's trials")
    parser.add_argument("--cap", type=float, default=3.0, help="x random's seconds")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", help="write the per-run results and the summary here")
    parser.add_argument("--tasks", nargs="+", help="leave out only these tasks in turn")
    parser.add_argument(
        "--history", nargs="+", help="the prior learns only from these tasks (minus the left-out)"
    )
    parser.add_argument(
        "--scale-seconds",
        nargs="+",
        default=[],
        metavar="BACKBONE=FACTOR",
        help="a what-if: that backbone's measured seconds times FACTOR (e.g. a heavy backbone)",
    )
    parser.add_argument(
        "--proposals", type=int, default=COST_PROPOSALS, help="tpe/s: TPE proposals per trial"
    )
    parser.add_argument(
        "--reference",
        choices=("shared", "independent"),
        default="shared",
        help="the reference random search: random's own run (same seed as the methods) or "
        "another seed's (then random is measured like any method)",
    )
    parser.add_argument(
        "--combine", nargs="+", metavar="JSON", help="summarize the runs of earlier --json files"
    )
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    methods = ["random", *[m for m in args.methods if m != "random"]]
    PROPOSALS[0] = args.proposals
    started = time.perf_counter()
    if args.combine:  # e.g. two halves of the tasks run side by side
        loaded = [json.loads(Path(f).read_text()) for f in args.combine]
        results = [r for data in loaded for r in data["runs"]]
        args.seeds = len({r["seed"] for r in results})
        args.reference = loaded[0].get("reference", "shared")
        methods = [m for m in methods if all(m in r for r in results)]
    else:
        table_data = scale_seconds(json.loads(Path(args.table).read_text()), args.scale_seconds)
        unknown = sorted(
            (set(args.tasks or []) | set(args.history or [])) - set(table_data["tasks"])
        )
        if unknown:
            parser.error(
                f"no task {', '.join(unknown)} in {args.table}; it has "
                + ", ".join(table_data["tasks"])
            )
        results = simulate(
            table_data,
            args.seeds,
            args.trials,
            args.cap,
            methods,
            only=args.tasks,
            reference=args.reference,
            first_seed=args.first_seed,
            history=args.history,
        )
    summary = summarize(results, methods)
    print(format_summary(summary, args.seeds, args.trials, args.cap, args.reference))
    pairs = format_pairs(results, methods)
    if pairs:
        print("\n" + pairs)
    print(f"\n({time.perf_counter() - started:.0f}s)")
    if args.json:
        out = {"reference": args.reference, "summary": summary, "runs": results}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
