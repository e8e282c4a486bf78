#!/usr/bin/env python
"""Does opening the fine-tuning recipe (issue 14) find better models on the same budget?

Two tasks, several seeds, two arms per task and seed with the same trial budget, each a full
``automl_tl.search.search`` that retrains its best trial and tests it (selection off: the
search's own pick, so the arms differ only in their space):

- ``balanced``: digits 5-9 with 20 labelled images per class (train + val; the test split
  keeps every image), backbones pretrained on digits 0-4 here (benchmarks/selection.py's
  ``pretrain_sources``). Figure: test accuracy.
- ``imbalanced``: the same digits, one class (5) with 10x the labelled images of the others
  (``--minority`` per class, 10x that for class 5; val drawn with train, in the same
  proportion), a balanced test split (``--test-per-class`` of each class). Written as a
  ``train/ val/ test/`` image folder per seed. Figure: test balanced accuracy, the study
  metric of both arms.
- a second family, not digits (``--tasks shapes shapes-imbalanced textures
  textures-imbalanced``): benchmarks/build_tabular.py's colour shapes and textures, 6 classes
  at 16 px, ``--per-class`` labelled images each, or class 0 with 10x ``--minority`` and the
  others ``--minority``; ``--test-per-class`` of each class in test; same backbones (pretrained
  on digits 0-4: little transfers to textures).

Arms:

- ``today``: the space before issue 14: no regularizer, plain cross entropy (``[search]
  imbalance = "none"``: the rule that changes an imbalanced study's loss is issue 14's too);
- ``recipe``: label smoothing, mixup (its alpha and how often), EMA of the weights and
  drop-path searched (``RECIPE`` below), and class imbalance left to the rule (the
  logit-adjusted loss on the imbalanced tasks; a class-weighted loss before 2026-12-01);
- ablations (``--arms today light rule``): ``light``, label smoothing and EMA only, the rule
  for imbalance; ``rule``, no regularizer, the rule for imbalance (on the balanced task the
  same as ``today``); ``weighted`` / ``adjust``, no regularizer and the class-weighted /
  logit-adjusted loss; ``smoothing`` / ``mixup`` / ``ema`` / ``droppath``, one regularizer
  each; ``short``, the recipe with EMA's decay fixed (README: short trials); ``placebo``, a
  control: one searched dimension that changes nothing (label smoothing in [0, 1e-6]), so
  the search's path differs from ``today``'s but not the training.

Printed per seed and as mean ± sd over seeds, with the per-seed difference (recipe - today)
and its worst seed; ``--json`` keeps everything, ``--markdown`` prints RESULTS.md's tables.

    nice python benchmarks/recipe.py                 # 5 seeds x 2 tasks x 2 arms (~30-60 min, 2 busy cores)
    python benchmarks/recipe.py --quick              # 1 seed, both tasks and arms, tiny: a smoke run

Nothing is downloaded: the data is embedded and the source backbones are pretrained here.
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

from selection import how_it_ran, pretrain_sources  # noqa: E402  (as there)

#: the digit tasks (the issue's), and a second family that is not digits: the colour shapes
#: and textures of benchmarks/build_tabular.py, 6 classes, balanced (``--per-class`` labelled
#: images per class) or imbalanced (class 0 with 10x ``--minority``, the others ``--minority``)
GENERATED = ("shapes", "textures")
TASKS = (
    "balanced",
    "imbalanced",
    *(f"{kind}{suffix}" for kind in GENERATED for suffix in ("", "-imbalanced")),
)
#: the recipe arm's searched regularizers ([search] keys)
RECIPE = {
    "label_smoothing": [0.0, 0.2],
    "mixup_alpha": [0.1, 0.4],
    "mix_prob": [0.0, 1.0],
    "ema_decay": [0.9, 0.999],
    "drop_path": [0.0, 0.2],
}
LIGHT = {k: RECIPE[k] for k in ("label_smoothing", "ema_decay")}
#: each arm's [search] keys beside the common ones (``today``: imbalance "none", nothing else)
SPACES: dict[str, dict] = {
    "today": {"imbalance": ["none"]},
    "recipe": RECIPE,
    "light": LIGHT,
    # the recipe as the README advises for trials of fewer than ~1000 optimizer steps: EMA's
    # decay fixed (timm's warm-up caps it below the range: a dimension that changes nothing)
    "short": {**RECIPE, "ema_decay": 0.998},
    "rule": {},
    "weighted": {"imbalance": ["weighted"]},
    "adjust": {"imbalance": ["logit_adjust"]},
    # one regularizer each, the imbalance rule (ablations of the recipe arm)
    "smoothing": {"label_smoothing": RECIPE["label_smoothing"]},
    "mixup": {k: RECIPE[k] for k in ("mixup_alpha", "mix_prob")},
    "ema": {"ema_decay": RECIPE["ema_decay"]},
    "droppath": {"drop_path": RECIPE["drop_path"]},
    # a control: one more searched dimension that changes nothing (smoothing in [0, 1e-6]):
    # how much of an arm's difference is the search's path, not the regularizer
    "placebo": {"label_smoothing": [0.0, 1e-6]},
}
ARMS = tuple(SPACES)
MAJORITY = "5"


def write_imbalanced(root: Path, seed: int, minority: int, test_per_class: int) -> dict:
    """``root/{train,val,test}/<digit>/<i>.png`` of digits 5-9: class 5 with 10x ``minority``
    labelled images, the others ``minority``; a fifth of them to val; ``test_per_class``
    images of every class to test. Returns the counts per split."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    counts: dict = {"train": {}, "val": {}, "test": {}}
    for digit in range(5, 10):
        idx = rng.permutation(np.flatnonzero(bunch.target == digit))
        labelled = minority * (10 if str(digit) == MAJORITY else 1)
        test, rest = idx[:test_per_class], idx[test_per_class : test_per_class + labelled]
        n_val = max(1, round(len(rest) / 5))
        for split, part in (("test", test), ("val", rest[:n_val]), ("train", rest[n_val:])):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i]).save(folder / f"{i}.png")
            counts[split][str(digit)] = len(part)
    return counts


def write_generated(
    root: Path, task: str, seed: int, per_class: int, minority: int, test_per_class: int
) -> dict:
    """``root/{train,val,test}/<class>/<i>.png`` of a generated task (``shapes``,
    ``textures``, ``-imbalanced`` for class 0 with 10x ``minority``, the others ``minority``;
    else ``per_class`` each); a fifth of the labelled images to val; ``test_per_class`` of
    every class to test. Returns the counts per split."""
    import numpy as np
    from build_tabular import _shapes, _textures
    from PIL import Image

    kind, imbalanced = task.removesuffix("-imbalanced"), task.endswith("-imbalanced")
    labelled = [minority * 10 if c == 0 else minority for c in range(6)]
    if not imbalanced:
        labelled = [per_class] * 6
    rng = np.random.default_rng(seed)
    x, y = {"shapes": _shapes, "textures": _textures}[kind](rng, max(labelled) + test_per_class, 16)
    counts: dict = {"train": {}, "val": {}, "test": {}}
    for c in range(6):
        idx = rng.permutation(np.flatnonzero(y == c))
        test, rest = idx[:test_per_class], idx[test_per_class : test_per_class + labelled[c]]
        n_val = max(1, round(len(rest) / 5))
        for split, part in (("test", test), ("val", rest[:n_val]), ("train", rest[n_val:])):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(x[i].transpose(1, 2, 0)).save(folder / f"{i}.png")
            counts[split][f"class{c}"] = len(part)
    return counts


def study_dict(args, task: str, arm: str, seed: int, sources: dict[str, str], out: Path) -> dict:
    name = f"{task}-seed{seed}"
    if task == "balanced":
        data = {"source": args.target, "max_per_class": args.per_class}
    else:
        data = {"source": f"folder:{out / f'{task}-{seed}'}"}
    metric = FIGURE[task][0].removeprefix("test_")
    search = {
        "n_trials": args.n_trials,
        "metric": metric,
        "sampler": "tpe",
        "pruner": "none",
        "backbones": args.backbones,
        "augmentations": ["none", "crop"],
        "unfreeze": ["top_k", "layer_decay"],
        "lr": [1e-3, 3e-2],
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "device": "cpu",
        "output": str(out / arm / name),
    }
    search.update(SPACES[arm])
    return {
        "name": name,
        "data": {**data, "image_size": args.image_size, "seed": seed, "orientation": "fixed"},
        "search": search,
        "selection": {"race": False, "ensemble": False, "soup": False},
        "weights": dict(sources),
    }


def run_arm(args, task: str, arm: str, seed: int, sources: dict[str, str], out: Path) -> dict:
    from automl_tl import config_from_dict, registry_for
    from automl_tl.plugins import get_plugin_manager
    from automl_tl.search import search

    raw = study_dict(args, task, arm, seed, sources, out)
    config = config_from_dict(raw, out / arm / f"{raw['name']}.toml")
    pm, _ = get_plugin_manager()
    started = time.perf_counter()
    outcome = search(config, registry_for(), pm, device="cpu")
    # a study already searched (``--out`` of an earlier run): its exported model's metrics
    metrics = outcome.metrics or json.loads((config.paths.best / "metrics.json").read_text())
    test = metrics["test"]
    return {
        "task": task,
        "arm": arm,
        "seed": seed,
        "metric": config.search.metric,
        "test_accuracy": test["accuracy"],
        "test_balanced_accuracy": test["balanced_accuracy"],
        "val": outcome.best["value"],
        "best_params": outcome.best["params"],
        "sizes": metrics["data"]["sizes"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


#: the figure each task is judged by, and its target (recipe - today, mean over seeds)
FIGURE = {
    task: ("test_balanced_accuracy", 0.05) if "imbalanced" in task else ("test_accuracy", 0.02)
    for task in TASKS
}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        key, target = FIGURE[task]
        by = {a: [r for r in rows if r["task"] == task and r["arm"] == a] for a in ARMS}
        s: dict = {"figure": key, "target": target}
        for arm, rs in by.items():
            if rs:
                s[arm] = {
                    k: mean_sd([r[k] for r in rs])
                    for k in ("test_accuracy", "test_balanced_accuracy", "seconds")
                }
        for arm in ARMS[1:]:
            if not (by["today"] and by[arm]):
                continue
            diffs = [
                b[key] - a[key]
                for a, b in zip(
                    sorted(by["today"], key=lambda r: r["seed"]),
                    sorted(by[arm], key=lambda r: r["seed"]),
                    strict=True,
                )
            ]
            s["difference" if arm == "recipe" else f"difference_{arm}"] = {
                "arm": arm,
                "mean_sd": mean_sd(diffs),
                "per_seed": diffs,
                "worst": min(diffs),
                "recipe_better": sum(d > 0 for d in diffs),
                "target_met": statistics.fmean(diffs) >= target,
            }
        out[task] = s
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--tasks", nargs="+", default=["balanced", "imbalanced"])
    p.add_argument("--backbones", nargs="+", default=["test_resnet", "test_efficientnet"])
    p.add_argument("--source", default="digits:0-4")
    p.add_argument("--target", default="digits:5-9")
    p.add_argument("--per-class", type=int, default=20, help="balanced: labels per class")
    p.add_argument("--minority", type=int, default=8, help="imbalanced: labels per small class")
    p.add_argument("--test-per-class", type=int, default=40, help="imbalanced: test images")
    p.add_argument("--n-trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--arms", nargs="+", default=["today", "recipe"], choices=ARMS)
    p.add_argument("--quick", action="store_true", help="1 seed, 2 trials x 1 epoch: a smoke run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="keep the studies here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument("--markdown", action="store_true", help="also print markdown tables")
    args = p.parse_args(argv)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        print(f"error: unknown task(s) {unknown}; known: {list(TASKS)}", file=sys.stderr)
        return 2
    if args.quick:
        args.seeds, args.n_trials, args.epochs, args.pretrain_epochs = args.seeds[:1], 2, 1, 1
        args.backbones, args.image_size = ["test_resnet"], 16

    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("automl_tl").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="automl-tl-recipe-"))
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/recipe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"{command.strip()}\ntasks {args.tasks}, seeds {args.seeds}: {args.n_trials} trials x "
        f"{args.epochs} epochs (tpe), {args.image_size} px, backbones {', '.join(args.backbones)} "
        f"pretrained on {args.source}",
        flush=True,
    )
    t0 = time.perf_counter()
    sources = pretrain_sources(args, out)
    rows = []
    for seed in args.seeds:
        for task in args.tasks:
            if task == "imbalanced" and not (out / f"imbalanced-{seed}").exists():
                write_imbalanced(
                    out / f"imbalanced-{seed}", seed, args.minority, args.test_per_class
                )
            elif task not in ("balanced", "imbalanced") and not (out / f"{task}-{seed}").exists():
                write_generated(
                    out / f"{task}-{seed}",
                    task,
                    seed,
                    args.per_class,
                    args.minority,
                    args.test_per_class,
                )
            for arm in args.arms:
                r = run_arm(args, task, arm, seed, sources, out)
                rows.append(r)
                print(
                    f"seed {seed} {task:10s} {arm:6s}: test accuracy {r['test_accuracy']:.4f}, "
                    f"balanced {r['test_balanced_accuracy']:.4f} ({r['seconds']:.0f}s)",
                    flush=True,
                )
    summary = summarize(rows)
    print()
    for task, s in summary.items():
        key = s["figure"]
        line = f"{task}: {key} " + ", ".join(
            f"{a} {s[a][key][0]:.4f} ± {s[a][key][1]:.4f}" for a in ARMS if a in s
        )
        for d in (v for k, v in s.items() if k.startswith("difference")):
            line += (
                f"; {d['arm']} - today {d['mean_sd'][0]:+.4f} ± {d['mean_sd'][1]:.4f} (worst seed "
                f"{d['worst']:+.4f}, better in {d['recipe_better']}/{len(d['per_seed'])}; target "
                f"{s['target']:+.2f}: {'met' if d['target_met'] else 'missed'})"
            )
        print(line)
    if args.markdown:
        print(
            "\n| task | figure | today | arm | arm's figure | arm - today | worst seed | better in |"
        )
        print("|---|---|---:|---|---:|---:|---:|---:|")
        for task, s in summary.items():
            key = s["figure"]
            for d in (v for k, v in s.items() if k.startswith("difference")):
                arm = s[d["arm"]][key]
                print(
                    f"| {task} | {key} | {s['today'][key][0]:.4f} ± {s['today'][key][1]:.4f} | "
                    f"{d['arm']} | {arm[0]:.4f} ± {arm[1]:.4f} | "
                    f"{d['mean_sd'][0]:+.4f} ± {d['mean_sd'][1]:.4f} | {d['worst']:+.4f} | "
                    f"{d['recipe_better']}/{len(d['per_seed'])} |"
                )
    wall = time.perf_counter() - t0
    print(f"\n{wall:.0f}s in all")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    **how_it_ran(command.strip(), args),
                    "seconds": round(wall, 1),
                    "rows": rows,
                    "summary": summary,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
