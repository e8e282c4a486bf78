#!/usr/bin/env python
"""Random search, the default search and the team prior as real searches (issue 12's "the
same ordering on 3 live searches"), on CPU, offline, in minutes.

    python benchmarks/search_live.py                       # 3 tasks x 3 methods, seed 0
    python benchmarks/search_live.py --seeds 0 1 2 --json out.json

The tasks are benchmarks/build_tabular.py's (generated from scikit-learn's digits and
synthetic drawings, 16 px), written as image folders with their train / val split; the two
tiny timm backbones are pretrained here on digits 0-4 (automl_tl.pretrain, cached in the
output folder), as the table's are. Per seed, each method is a full ``automl_tl.search``
(no retrain) of ``--trials`` trials of ``--epochs`` epochs in the study's own space (every
policy, strategy, weight decay: wider than the table's grid), one process, one thread;
``[data] seed`` = the seed (the samplers' seed and the trials' training seeds):

- ``random``: ``[search] sampler = "random"``, no pruner;
- ``default``: the study's defaults (the textbook portfolio, TPE, Hyperband);
- ``prior``: ``[search] prior`` = the catalogs of the random searches (same seed) of the
  benchmark's *other five* tasks (a team that searched those before), then the defaults;
  ``--history`` names other tasks for that history (e.g. all twelve of the table: then the
  prior has 11 earlier tasks and chooses how many nearest to trust);
- ``prior-six`` (with ``--history``): the same, from the first six tasks' searches only, so
  one run compares a short and a long history on the same seeds.

Measured per live task and seed as ``benchmarks/search.py --reference independent`` does:
the target is the best validation accuracy of a reference random search (seed + 1000), and
its seconds until it first reached it are the reference; each method's seconds (its trials'
durations, in trial order) until one first reached the target; the reference's seconds / the
method's (> 1: faster). A method that never reached it in its trials is a miss and counts
``CAP`` x the reference search's total seconds, as a miss does on the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AUTOML_TL_LOAD_PLUGINS", "")  # only the built-in components
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from build_tabular import TASKS as ALL_TASKS  # noqa: E402  (every task of the table)

METHODS = ("random", "default", "prior", "prior-six")
#: the tasks searched by every method (three that differ: few labels near the source task,
#: colour shapes, textures where digit features transfer little)
LIVE = ("digits-few", "shapes", "textures")
#: the history by default: random searches on each of the table's first six tasks feed the
#: other tasks' priors (--history: any of ALL_TASKS)
TASKS = ALL_TASKS[:6]
#: the reference random search's seed: the run's seed + this
REFERENCE_SEED = 1000
#: a miss counts this many times the reference search's total seconds
CAP = 3.0


def write_task(name: str, root: Path, size: int) -> None:
    """build_tabular's task as ``root/{train,val,test}/<class>/<i>.png`` (test = val: no
    retrain here, the search scores on val)."""
    from build_tabular import make_task
    from PIL import Image

    splits = make_task(name, size)
    for split, part in (("train", splits.train), ("val", splits.val), ("test", splits.val)):
        for i, (x, y) in enumerate(zip(part.x, part.y)):
            folder = root / split / splits.class_names[int(y)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


def pretrained(out: Path, size: int, backbones: list[str]) -> dict[str, str]:
    from build_tabular import SOURCE

    from automl_tl import registry_for
    from automl_tl.pretrain import PretrainSpec, pretrain

    weights = {}
    for backbone in backbones:
        path = out / "weights" / f"{backbone}.safetensors"
        spec = PretrainSpec(backbone=backbone, source=SOURCE, image_size=size, epochs=6, seed=0)
        pretrain(spec, path, registry_for(), base_dir=out, device="cpu")
        weights[backbone] = str(path)
    return weights


def run_search(args, out: Path, task: str, method: str, seed: int, weights: dict) -> dict:
    """One search; ``method`` "reference" is random search with seed + REFERENCE_SEED."""
    from automl_tl import config_from_dict, registry_for
    from automl_tl.plugins import get_plugin_manager
    from automl_tl.search import search

    name = f"{task}-s{seed}"  # one name for every method: Hyperband's brackets hash it
    folder = out / method / name
    data_seed = seed + REFERENCE_SEED if method == "reference" else seed
    search_ = {
        "n_trials": args.trials,
        "backbones": list(weights),
        "epochs": args.epochs,
        "batch_size": 32,
        "device": "cpu",
        "output": str(folder),
    }
    if method in ("random", "reference"):
        search_.update(sampler="random", pruner="none")
    if method in ("prior", "prior-six"):
        history = TASKS if method == "prior-six" else args.history
        search_["prior"] = [
            str(out / "random" / f"{t}-s{seed}" / "catalog.db") for t in history if t != task
        ]
    raw = {
        "name": name,
        "data": {
            "source": f"folder:{out / 'data' / task}",
            "image_size": args.size,
            "seed": data_seed,
        },
        "search": search_,
        "weights": weights,
    }
    config = config_from_dict(raw, out / f"{method}-{name}.toml")
    pm, _ = get_plugin_manager()
    started = time.perf_counter()
    outcome = search(config, registry_for(), pm, device="cpu", retrain_best=False)
    trials = sorted(outcome.study.get_trials(deepcopy=False), key=lambda t: t.number)
    trace, spent = [], 0.0
    for t in trials:
        if t.datetime_start and t.datetime_complete:
            spent += (t.datetime_complete - t.datetime_start).total_seconds()
        trace.append((round(spent, 2), t.value if t.state.name == "COMPLETE" else None))
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "trace": trace,
        "prior_trials": sum("prior" in t.user_attrs for t in trials),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def reached(trace, target: float) -> float | None:
    for spent, value in trace:
        if value is not None and value >= target - 1e-9:
            return spent
    return None


def summarize(runs: list[dict]) -> list[dict]:
    """Per live task, seed and method: the target, the seconds, a miss, the speed-up."""
    rows = []
    by = {(r["task"], r["seed"], r["method"]): r for r in runs}
    for task, seed in sorted({(r["task"], r["seed"]) for r in runs}):
        ref = by.get((task, seed, "reference"))
        if ref is None:
            continue
        target = max(v for _, v in ref["trace"] if v is not None)
        random_s = reached(ref["trace"], target)
        for method in METHODS:
            r = by.get((task, seed, method))
            if r is None:
                continue
            got = reached(r["trace"], target)
            spent = got if got is not None else CAP * ref["trace"][-1][0]
            rows.append(
                {
                    "task": task,
                    "seed": seed,
                    "method": method,
                    "target": target,
                    "reference_s": random_s,
                    "seconds": spent,
                    "miss": got is None,
                    "speedup": round(random_s / spent, 3),
                }
            )
    return rows


def format_rows(rows: list[dict]) -> str:
    """A row per live task and seed, then each method's median, quartiles and misses."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = [
        "| task | seed | target | reference s | "
        + " | ".join(f"{m} s" for m in methods)
        + " | "
        + " | ".join(f"{m} x" for m in methods)
        + " |",
        "|---|---|---|---|" + "---|" * (2 * len(methods)),
    ]
    for task, seed in sorted({(r["task"], r["seed"]) for r in rows}):
        r = {x["method"]: x for x in rows if x["task"] == task and x["seed"] == seed}

        def cell(m, r=r):
            return f"{r[m]['seconds']:.1f}{'*' if r[m]['miss'] else ''}" if m in r else "-"

        first = r[next(m for m in methods if m in r)]
        lines.append(
            f"| {task} | {seed} | {first['target']:.3f} | {first['reference_s']:.1f} | "
            + " | ".join(cell(m) for m in methods)
            + " | "
            + " | ".join(f"{r[m]['speedup']:.2f}" if m in r else "-" for m in methods)
            + " |"
        )
    lines.append("")
    for m in METHODS:
        x = [r["speedup"] for r in rows if r["method"] == m]
        if not x:
            continue
        q = statistics.quantiles(x, n=4) if len(x) > 1 else [x[0]] * 3
        per_task = {
            t: statistics.median(r["speedup"] for r in rows if r["method"] == m and r["task"] == t)
            for t in dict.fromkeys(r["task"] for r in rows)
        }
        lines.append(
            f"{m}: median {q[1]:.2f}x (quartiles {q[0]:.2f}-{q[2]:.2f}) over {len(x)} runs, "
            f"misses {sum(r['miss'] for r in rows if r['method'] == m)}; per task "
            + ", ".join(f"{t} {v:.2f}x" for t, v in per_task.items())
        )
    lines.append(f"(* never reached the reference's best: counted as {CAP:g}x its seconds)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tasks", nargs="+", default=list(LIVE), choices=TASKS)
    parser.add_argument(
        "--history",
        nargs="+",
        choices=ALL_TASKS,
        help="the tasks whose random searches feed the priors (default: the first six); "
        "with this, the method prior-six runs too (the first six only)",
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--out", help="work folder (default: a temporary one)")
    parser.add_argument("--json", help="write every run's trace and the summary here")
    parser.add_argument(
        "--combine", nargs="+", metavar="JSON", help="summarize the runs of earlier --json files"
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    logging.getLogger("automl_tl").setLevel(logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    if args.combine:
        runs = [r for f in args.combine for r in json.loads(Path(f).read_text())["runs"]]
        print(format_rows(summarize(runs)))
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="automl-tl-live-"))
    longer = args.history is not None
    args.history = list(args.history or TASKS)
    searched = list(dict.fromkeys([*args.history, *(TASKS if longer else ())]))
    for task in searched:  # every task's folder: the prior reads the other tasks' studies
        if not (out / "data" / task).is_dir():
            write_task(task, out / "data" / task, args.size)
    weights = pretrained(out, args.size, ["test_resnet", "test_efficientnet"])
    runs = []
    started = time.perf_counter()
    for seed in args.seeds:
        plan = [(t, "random") for t in searched]  # first: the priors learn from these
        methods = ("reference", "default", "prior", *(("prior-six",) if longer else ()))
        plan += [(t, m) for t in args.tasks for m in methods]
        for task, method in plan:
            run = run_search(args, out, task, method, seed, weights)
            runs.append(run)
            print(
                f"{task} seed {seed} {method}: {len(run['trace'])} trials, "
                f"{run['trace'][-1][0]:.0f}s of trials, {run['wall_s']:.0f}s wall",
                flush=True,
            )
            if args.json:
                Path(args.json).write_text(json.dumps({"runs": runs}, indent=1))
    rows = summarize(runs)
    print(format_rows(rows))
    print(f"({time.perf_counter() - started:.0f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
