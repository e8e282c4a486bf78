#!/usr/bin/env python
"""The search space before and after issue 18, same budget, several seeds.

    python benchmarks/search_space.py                  # 5 seeds, 2 tasks x 2 arms, ~15 min CPU
    python benchmarks/search_space.py --quick          # 1 seed, 4 trials: a smoke run (~1 min)

Two tasks, both from random init (``[weights] default = "none"``), at 16 px, tiny timm models:

- ``shapes``: a synthetic task generated here (filled shapes in random places, sizes and
  colours, on noise), whose labels do not depend on orientation: (a) the share of completed
  trials within 1.5x chance, and (b) the pick's test accuracy;
- ``digits``: scikit-learn's digits, few labels per class, orientation-sensitive (a mirrored
  2 is no 2): (b) the pick's test accuracy.

Two arms per task and seed, each a full ``automl_tl.study.search`` (same split, trials, epochs,
sampler and its seed, Hyperband) that retrains its best trial and tests it:

- ``before``: the space as it was: every trial searches ``unfreeze`` over every strategy and
  ``unfreeze_depth`` in [0, 1], one lr range, the portfolio starts with ``flip_crop``, plain
  Hyperband, no ``[data] orientation`` (the function :func:`flat_suggest` and the entries of
  :func:`flat_portfolio` below are that code, kept here to compare against);
- ``after``: the study's defaults today (automl_tl.space's conditional space, the guarded
  Hyperband), and for digits ``[data] orientation = "fixed"``.

Printed: per seed and arm, the pick's test accuracy, the completed trials and how many sat
within 1.5x chance, and trials pruned at chance; then means ± sd over seeds, the differences
(after - before) and the worst seed. ``--json`` keeps everything.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AUTOML_TL_LOAD_PLUGINS", "")  # only the built-in components
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: ``after-free``: the new space on digits with ``orientation = "free"`` (an ablation: how much
#: of the digits difference is the space and the guard, how much the orientation setting)
ARMS = ("before", "after", "after-free")
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")


def write_shapes(root: Path, per_class: int, seed: int, size: int = 24) -> None:
    """``root/<shape>/<i>.png``: one filled shape per image, random centre, radius and
    colour, on a noisy background of another colour. Every shape is left-right symmetric, so
    a flip never changes the label."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for shape in SHAPES:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            r = rng.uniform(0.22, 0.4) * size
            cx, cy = rng.uniform(r, size - r, 2)
            dx, dy = (xx - cx) / r, (yy - cy) / r
            mask = {
                "circle": dx**2 + dy**2 <= 1,
                "square": (abs(dx) <= 0.8) & (abs(dy) <= 0.8),
                "triangle": (dy <= 0.8) & (dy >= -0.9 + 1.7 * abs(dx)),
                "cross": ((abs(dx) <= 0.3) | (abs(dy) <= 0.3)) & (abs(dx) <= 1) & (abs(dy) <= 1),
                "ring": (dx**2 + dy**2 <= 1) & (dx**2 + dy**2 >= 0.45),
                "diamond": abs(dx) + abs(dy) <= 1,
            }[shape]
            fg, bg = rng.uniform(150, 255, 3), rng.uniform(0, 90, 3)  # a light shape on dark
            image = np.where(mask[..., None], fg, bg) + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")


# ---------------------------------------------------------------------------------------------
# the space before issue 18, kept here to compare against


def flat_suggest(trial, config, registry=None):
    """automl_tl.space.suggest as it was: every dimension in every trial."""
    from automl_tl.train import Choice

    s = config.search
    backbone = trial.suggest_categorical("backbone", s.backbones)
    sources = config.weight_choices(backbone)
    source = trial.suggest_categorical("weights", sources) if sources else None
    augmentation = trial.suggest_categorical("augmentation", s.augmentations)
    strength = 0.0 if augmentation == "none" else trial.suggest_float("aug_strength", 0.0, 1.0)
    unfreeze = trial.suggest_categorical("unfreeze", s.unfreeze)
    depth = trial.suggest_float("unfreeze_depth", 0.0, 1.0)
    lr = trial.suggest_float("lr", s.lr[0], s.lr[1], log=True)
    weight_decay = trial.suggest_float(
        "weight_decay", s.weight_decay[0], s.weight_decay[1], log=True
    )
    return Choice(
        backbone=backbone,
        weights=config.weights_for(backbone, source),
        augmentation=augmentation,
        aug_strength=strength,
        unfreeze=unfreeze,
        unfreeze_depth=depth,
        lr=lr,
        weight_decay=weight_decay,
        epochs=s.epochs,
        batch_size=s.batch_size,
    )


def flat_portfolio(config, size: int) -> list[dict]:
    """The portfolio's random-init entries as they were (flip_crop 0.5, top_k depth 1.0, lr
    and weight decay at their log-centres)."""
    s = config.search

    def centre(r):
        return math.sqrt(r[0] * r[1])

    entries = []
    for backbone in s.backbones[: max(0, size)]:
        aug = "flip_crop" if "flip_crop" in s.augmentations else "none"
        entry = {
            "backbone": backbone,
            "augmentation": aug,
            "unfreeze": "top_k" if "top_k" in s.unfreeze else s.unfreeze[0],
            "unfreeze_depth": 1.0,
            "lr": centre(s.lr),
            "weight_decay": centre(s.weight_decay),
        }
        if aug != "none":
            entry["aug_strength"] = 0.5
        entries.append(entry)
    return entries


class Before:
    """While active, automl_tl.search searches the flat space with the old portfolio and a
    plain Hyperband (its module functions swapped, as benchmarks/search_variants.py does)."""

    def __enter__(self):
        import optuna

        from automl_tl import search as search_mod
        from automl_tl.samplers import PortfolioSampler, startup_trials

        self.module = search_mod
        self.saved = (search_mod.suggest, search_mod.make_sampler, search_mod.make_pruner)

        # the old TPE and portfolio: whatever search() passes beside the config (a team
        # prior, a deadline for cost awareness) did not exist then, and is ignored
        def make_sampler(config, *_, **__):
            tpe = optuna.samplers.TPESampler(
                multivariate=True,
                group=True,
                constant_liar=True,
                seed=config.data.seed,
                n_startup_trials=startup_trials(config),
            )
            return PortfolioSampler(tpe, flat_portfolio(config, startup_trials(config)))

        def make_pruner(config):
            return optuna.pruners.HyperbandPruner(
                min_resource=1, max_resource=config.search.epochs, reduction_factor=3
            )

        search_mod.suggest = flat_suggest
        search_mod.make_sampler = make_sampler
        search_mod.make_pruner = make_pruner
        return self

    def __exit__(self, *exc):
        m = self.module
        m.suggest, m.make_sampler, m.make_pruner = self.saved


# ---------------------------------------------------------------------------------------------


def study_dict(args, task: str, arm: str, seed: int, source: str, name: str) -> dict:
    data = {"source": source, "image_size": args.image_size, "seed": seed}
    if task == "digits":  # a few-label task; the shapes are all used
        data["max_per_class"] = args.max_per_class
    if task == "digits" and arm == "after":  # "after-free": the new space, orientation free
        data["orientation"] = "fixed"
    return {
        "name": name,
        "data": data,
        "search": {
            "n_trials": args.n_trials,
            "backbones": args.backbones,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "device": "cpu",
        },
        "weights": {"default": "none"},
    }


def run_arm(args, task: str, arm: str, seed: int, source: str, out: Path) -> dict:
    import contextlib

    from optuna.trial import TrialState

    from automl_tl import config_from_dict, registry_for
    from automl_tl.plugins import get_plugin_manager
    from automl_tl.search import search
    from automl_tl.trials import DEAD_AT_CHANCE

    # one study name for every arm (each in its own folder): Hyperband assigns a trial to a
    # bracket by hashing the study name and the trial number, so the arms prune alike
    name = f"{task}-seed{seed}"
    raw = study_dict(args, task, arm, seed, source, name)
    raw["search"]["output"] = str(out / arm / name)
    config = config_from_dict(raw, out / arm / f"{name}.toml")
    pm, _ = get_plugin_manager()
    started = time.perf_counter()
    with Before() if arm == "before" else contextlib.nullcontext():
        outcome = search(config, registry_for(), pm, device="cpu")
    classes = len(outcome.metrics["data"]["classes"])
    limit = 1.5 / classes
    trials = outcome.study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return {
        "task": task,
        "arm": arm,
        "seed": seed,
        "classes": classes,
        "test_accuracy": outcome.metrics["test"]["accuracy"],
        "val_accuracy": outcome.best["value"],
        "best_params": outcome.best["params"],
        "complete": len(complete),
        "complete_at_chance": sum(t.value <= limit for t in complete),
        # every finished trial (pruned ones too) by its last reported score
        "finished": len(finished),
        "finished_at_chance": sum(t.intermediate_values[t.last_step] <= limit for t in finished),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "pruned_at_chance": sum(DEAD_AT_CHANCE in t.user_attrs for t in trials),
        "epochs_run": sum(t.user_attrs.get("epochs_run", 0) for t in trials),
        "sizes": outcome.metrics["data"]["sizes"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict]) -> dict:
    """Per task and arm: means ± sd over seeds; per arm but ``before``: its difference from
    ``before`` seed by seed (``difference`` for ``after``, ``difference_<arm>`` for others)."""
    out: dict = {}
    for task in sorted({r["task"] for r in rows}):
        arms = [a for a in ARMS if any(r["task"] == task and r["arm"] == a for r in rows)]
        by = {arm: [r for r in rows if r["task"] == task and r["arm"] == arm] for arm in arms}
        task_out = {}
        for arm, rs in by.items():
            share = [r["complete_at_chance"] / r["complete"] if r["complete"] else 0.0 for r in rs]
            pooled = sum(r["complete_at_chance"] for r in rs) / max(
                1, sum(r["complete"] for r in rs)
            )
            task_out[arm] = {
                "test_accuracy": mean_sd([r["test_accuracy"] for r in rs]),
                "share_complete_at_chance": mean_sd(share),
                "share_complete_at_chance_pooled": pooled,
                "share_finished_at_chance": mean_sd(
                    [r["finished_at_chance"] / max(1, r["finished"]) for r in rs]
                ),
                "pruned_at_chance": sum(r["pruned_at_chance"] for r in rs),
                "epochs_run": mean_sd([r["epochs_run"] for r in rs]),
            }
        for arm in arms:
            if arm == "before" or "before" not in by:
                continue
            diffs = [
                a["test_accuracy"] - b["test_accuracy"]
                for b, a in zip(by["before"], by[arm], strict=True)
            ]
            task_out["difference" if arm == "after" else f"difference_{arm}"] = {
                "arm": arm,
                "mean_sd": mean_sd(diffs),
                "per_seed": diffs,
                "worst": min(diffs),
                "after_better": sum(d > 0 for d in diffs),
            }
        out[task] = task_out
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--tasks", nargs="+", default=["shapes", "digits"], choices=["shapes", "digits"])
    p.add_argument("--backbones", nargs="+", default=["test_resnet", "test_efficientnet"])
    p.add_argument("--n-trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument(
        "--max-per-class", type=int, default=40, help="digits: train + val labels per class"
    )
    p.add_argument("--shapes-per-class", type=int, default=100)
    p.add_argument("--arms", nargs="+", default=["before", "after"], choices=ARMS)
    p.add_argument("--quick", action="store_true", help="1 seed, 4 trials x 3 epochs: a smoke run")
    p.add_argument("--out", type=Path, help="keep the studies here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.n_trials, args.epochs = args.seeds[:1], 4, 3
        args.shapes_per_class, args.max_per_class = 25, 12

    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="automl-tl-space-"))
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/search_space.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(
        f"{command.strip()}\ntasks {args.tasks}, seeds {args.seeds}, {args.n_trials} trials x "
        f"{args.epochs} epochs (tpe + hyperband), {args.image_size} px, backbones "
        f"{', '.join(args.backbones)}, <= {args.max_per_class} labels/class",
        flush=True,
    )
    started = time.perf_counter()
    rows = []
    for seed in args.seeds:
        for task in args.tasks:
            if task == "shapes":
                root = out / f"shapes-{seed}"
                if not root.exists():
                    write_shapes(root, args.shapes_per_class, seed)
                source = f"folder:{root}"
            else:
                source = "digits"
            for arm in args.arms:
                if arm == "after-free" and task != "digits":
                    continue  # an ablation of the orientation setting: digits only
                r = run_arm(args, task, arm, seed, source, out)
                rows.append(r)
                print(
                    f"seed {seed} {task:6s} {arm:6s}: test {r['test_accuracy']:.4f}, "
                    f"{r['complete_at_chance']}/{r['complete']} complete trials at <= 1.5x chance, "
                    f"{r['pruned']} pruned ({r['pruned_at_chance']} at chance), "
                    f"{r['epochs_run']} epochs, {r['seconds']:.0f}s",
                    flush=True,
                )
    summary = summarize(rows)
    print()
    for task, s in summary.items():
        for arm in (a for a in ARMS if a in s):
            (ma, sa), (mc, sc) = s[arm]["test_accuracy"], s[arm]["share_complete_at_chance"]
            print(
                f"{task:6s} {arm:6s}: test accuracy {ma:.4f} ± {sa:.4f}; completed trials at "
                f"<= 1.5x chance {mc:.1%} ± {sc:.1%} (pooled {s[arm]['share_complete_at_chance_pooled']:.1%}); "
                f"pruned at chance {s[arm]['pruned_at_chance']}; finished trials at chance "
                f"(last score) {s[arm]['share_finished_at_chance'][0]:.1%}"
            )
        for d in (v for k, v in s.items() if k.startswith("difference")):
            print(
                f"{task:6s} {d['arm']} - before: {d['mean_sd'][0]:+.4f} ± {d['mean_sd'][1]:.4f}, "
                f"worst seed {d['worst']:+.4f}, better in {d['after_better']}/{len(d['per_seed'])}"
            )
    wall = time.perf_counter() - started
    print(f"\n{wall:.0f}s in all")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": command.strip(),
                    "settings": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    },
                    "machine": {
                        "python": platform.python_version(),
                        "torch": torch.__version__,
                        "cpus": os.cpu_count(),
                        "load": os.getloadavg()[0],
                    },
                    "seconds": round(wall, 1),
                    "seeds": rows,
                    "summary": summary,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
