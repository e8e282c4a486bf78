#!/usr/bin/env python
"""Does racing the finalists (and ensembling / souping them) choose better than the argmax?

Few-label tasks, several seeds, one search per task and seed (the same search budget for
every arm): digits 5-9 with at most 10 and 20 labelled images per class (train + val; the
test split keeps every image) with backbones pretrained on digits 0-4, and digits 5-9 at 10
labels per class from random init (no transfer). After the search, every finalist (complete
trials within one standard error of the best) is retrained and scored on test. Per arm, the
chosen model's test accuracy:

- ``argmax``: the search's best trial, retrained (what automl-tl did before selection);
- ``raced``: the race's winner (``[selection]``: repeats / k folds, rule);
- ``soup``: the greedy soup of finalists sharing backbone and pretrained weights (the winner
  alone when none does, and always from random init: no shared starting point);
- ``ensemble``: the ensemble ``[selection] ensemble_rule`` builds (the default: every
  finalist at equal weight), and each rule of :data:`ENSEMBLE_RULES` on the same finalists;

and the regret: oracle (the best test accuracy among the retrained finalists) minus the
chosen one's. Printed per seed and as mean ± standard deviation over seeds; ``--json`` keeps
everything, ``--markdown`` prints the tables for benchmarks/RESULTS.md.

    python benchmarks/selection.py                 # 5 seeds x 3 tasks, ~20 min on 2 busy cores
    python benchmarks/selection.py --quick         # 1 seed, 1 task, a tiny search: ~1-2 min

Nothing is downloaded: the data is embedded and the source backbones are pretrained here
once (seed 0) into the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
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

#: (name, labels per class, transfer)
TASKS = [
    ("5-9@10 transfer", 10, True),
    ("5-9@20 transfer", 20, True),
    ("5-9@10 scratch", 10, False),
]
ARMS = ("argmax", "raced", "soup", "ensemble")


def pretrain_sources(args, out: Path) -> dict[str, str]:
    """Each backbone pretrained once on the source task: ``{backbone: weights file}``."""
    from automl_tl import registry_for
    from automl_tl.pretrain import PretrainSpec, pretrain

    registry = registry_for()
    files = {}
    for backbone in args.backbones:
        path = out / "source" / f"{backbone}.safetensors"
        spec = PretrainSpec(
            backbone=backbone,
            source=args.source,
            image_size=args.image_size,
            epochs=args.pretrain_epochs,
            seed=0,
        )
        pretrain(spec, path, registry, base_dir=out, cache_dir=out / "source-cache", device="cpu")
        files[backbone] = str(path)
    return files


def study_dict(args, task, seed: int, sources: dict[str, str]) -> dict:
    name, per_class, transfer = task
    slug = name.replace(" ", "-").replace("@", "at")
    return {
        "name": f"{slug}-seed{seed}",
        "data": {
            "source": args.target,
            "image_size": args.image_size,
            "max_per_class": per_class,
            "seed": seed,
        },
        "search": {
            "n_trials": args.n_trials,
            "sampler": "tpe",
            "pruner": "none",
            "backbones": args.backbones,
            "augmentations": ["none", "flip_crop"],
            "unfreeze": ["top_k", "layer_decay"],
            "lr": [1e-3, 3e-2],
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "device": "cpu",
        },
        "selection": {
            "finalists": min(args.finalists, args.n_trials),
            "repeats": args.repeats,
            "folds": args.folds,
            "rule": args.rule,
            "budget": args.budget,
        },
        "weights": dict(sources) if transfer else {"default": "none"},
    }


def run_one(args, task, seed: int, sources: dict[str, str], out: Path) -> dict:
    from automl_tl import config_from_dict, registry_for
    from automl_tl.data import load_splits
    from automl_tl.plugins import get_plugin_manager
    from automl_tl.search import search
    from automl_tl.selection import Selection, _member

    registry = registry_for()
    raw = study_dict(args, task, seed, sources)
    config = config_from_dict(raw, out / f"{raw['name']}.toml")
    pm, _ = get_plugin_manager()
    started = time.perf_counter()
    outcome = search(config, registry, pm, device="cpu")
    chosen = outcome.selection
    sel = chosen["selection"]
    splits = load_splits(config, registry)
    selection = Selection(**sel)
    finalists = {}
    for row in sel["finalists"]:  # every finalist retrained (the oracle and the argmax)
        folder = _member(config, registry, outcome.study, splits, row["trial"], selection, "cpu")
        finalists[row["trial"]] = json.loads((folder / "metrics.json").read_text())["test"][
            "accuracy"
        ]
    raced = chosen["single"]["test"]["accuracy"]
    variants = ensemble_variants(config, registry, outcome.study, splits, selection, finalists)
    result = {
        "task": task[0],
        "seed": seed,
        "argmax_trial": sel["argmax"],
        "winner": sel["winner"],
        "finalists": {str(k): v for k, v in finalists.items()},
        "argmax": finalists[sel["argmax"]],
        "raced": raced,
        "soup": chosen["soup"]["test"]["accuracy"] if "soup" in chosen else raced,
        "soup_built": "soup" in chosen and len(chosen["soup"].get("ingredients", [])) > 1,
        "ensemble": chosen["ensemble"]["test"]["accuracy"] if "ensemble" in chosen else raced,
        "ensemble_members": chosen.get("ensemble", {}).get("members", 1),
        "oracle": max(finalists.values()),
        "ensemble_rules": variants,
        "race_runs": sel["runs"],
        "race_seconds": sel["run_seconds"],
        "seconds": round(time.perf_counter() - started, 1),
        "test_images": len(splits.test),
    }
    result["regret_argmax"] = result["oracle"] - result["argmax"]
    result["regret_raced"] = result["oracle"] - result["raced"]
    return result


#: ways to choose an ensemble's members from the finalists' held-out predictions, compared on
#: the same retrained finalists: ``[selection] ensemble_rule``'s two ("greedy": Caruana's
#: hill-climb on the study's metric; "uniform": every finalist with equal weight, the default)
#: and the hill-climb on likelihood
ENSEMBLE_RULES = ("greedy", "greedy-nll", "uniform")


def ensemble_variants(config, registry, study, splits, selection, finalists: dict) -> dict:
    """Test accuracy of the ensemble each of :data:`ENSEMBLE_RULES` chooses: the members'
    test probabilities come from the retrained finalists (what the ensemble exports)."""
    import torch

    from automl_tl.export import load_model
    from automl_tl.scores import caruana_selection
    from automl_tl.selection import (
        _member,
        _pool_labels,
        done_runs,
        held_out_predictions,
        mean_probabilities,
        metric_to_maximize,
        model_log_probs,
        open_race_study,
        sized_splits,
    )

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    done = done_runs(open_race_study(study))
    labels, n_classes = _pool_labels(splits), len(splits.class_names)
    pooled = {}
    for n in finalists:
        runs = [r for r in done.values() if r.user_attrs.get("finalist") == n]
        preds = held_out_predictions(config, splits, by_number[n], runs)
        if preds:
            pooled[n] = mean_probabilities(preds, len(labels), n_classes)
    if len(pooled) < 2:
        return {}
    common = torch.ones(len(labels), dtype=torch.bool)
    for _, count in pooled.values():
        common &= count > 0
    numbers = list(pooled)
    held = [pooled[n][0][common].clamp(min=1e-12).log().float() for n in numbers]
    at_size = sized_splits(config, registry, splits)
    test, raw = {}, {}
    for n in numbers:
        folder = _member(config, registry, study, splits, n, selection, "cpu")
        loaded = load_model(folder, registry=registry)
        calibrated = model_log_probs(loaded, "test", at_size)  # log_softmax(z / T)
        test[n] = calibrated.exp()
        raw[n] = (calibrated * loaded.temperature).softmax(-1)  # softmax(z): T undone
    weights = {
        "greedy": caruana_selection(
            held, labels[common], score=metric_to_maximize(config, registry, n_classes)
        ),
        "greedy-nll": caruana_selection(held, labels[common], score="nll"),
        "uniform": [1] * len(numbers),
    }

    def accuracy(probs: dict, w: list[int]) -> float:
        mix = sum(c * probs[n] for n, c in zip(numbers, w) if c) / sum(w)
        return float((mix.argmax(1) == splits.test.y).double().mean())

    return {
        rule: {
            # the members' probabilities as exported (Averaged: each member's own softmax)
            "accuracy": accuracy(raw, weights[rule]),
            # each member's temperature-scaled probabilities averaged instead
            "accuracy_calibrated_members": accuracy(test, weights[rule]),
            "members": {str(n): c for n, c in zip(numbers, weights[rule]) if c},
        }
        for rule in ENSEMBLE_RULES
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> dict:
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        out[task] = {
            key: dict(zip(("mean", "sd"), mean_sd([r[key] for r in rs])))
            for key in (*ARMS, "oracle", "regret_argmax", "regret_raced", "race_runs", "seconds")
        }
        out[task]["finalists"] = statistics.fmean(len(r["finalists"]) for r in rs)
        ruled = [r for r in rs if r.get("ensemble_rules")]
        out[task]["ensemble_rules"] = {
            rule: {
                **dict(
                    zip(
                        ("mean", "sd"),
                        mean_sd([r["ensemble_rules"][rule]["accuracy"] for r in ruled]),
                    )
                ),
                "minus_raced": mean_sd(
                    [r["ensemble_rules"][rule]["accuracy"] - r["raced"] for r in ruled]
                ),
                "calibrated_members": mean_sd(
                    [r["ensemble_rules"][rule]["accuracy_calibrated_members"] for r in ruled]
                ),
                "calibrated_minus_raced": mean_sd(
                    [
                        r["ensemble_rules"][rule]["accuracy_calibrated_members"] - r["raced"]
                        for r in ruled
                    ]
                ),
                "seeds": len(ruled),
            }
            for rule in ENSEMBLE_RULES
            if ruled
        }
        out[task]["seeds"] = len(rs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--tasks", nargs="+", default=[t[0] for t in TASKS], help="task names")
    p.add_argument("--backbones", nargs="+", default=["test_resnet", "test_convnext"])
    p.add_argument("--source", default="digits:0-4")
    p.add_argument("--target", default="digits:5-9")
    p.add_argument("--n-trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--finalists", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--folds", type=int, default=-1)
    p.add_argument("--rule", default="mean", choices=["mean", "lcb"])
    p.add_argument("--budget", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="1 seed, 1 task, a tiny search")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="keep the studies here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument("--markdown", action="store_true", help="also print markdown tables")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.tasks = args.seeds[:1], args.tasks[:1]
        args.n_trials, args.epochs, args.pretrain_epochs = 4, 2, 1
        args.backbones, args.budget, args.finalists = ["test_resnet"], 4, 2
    unknown = [t for t in args.tasks if t not in {n for n, *_ in TASKS}]
    if unknown:
        print(f"error: unknown task(s) {unknown}; known: {[t[0] for t in TASKS]}", file=sys.stderr)
        return 2

    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("automl_tl").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="automl-tl-selection-"))
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/selection.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(
        f"{args.target}, tasks {args.tasks}, seeds {args.seeds}: {args.n_trials} trials x "
        f"{args.epochs} epochs, backbones {', '.join(args.backbones)}; [selection] finalists "
        f"{args.finalists}, repeats {args.repeats}, folds {args.folds}, rule {args.rule}, "
        f"budget {args.budget}",
        flush=True,
    )
    t0 = time.perf_counter()
    sources = pretrain_sources(args, out)
    rows = []
    for task in [t for t in TASKS if t[0] in args.tasks]:
        for seed in args.seeds:
            r = run_one(args, task, seed, sources, out)
            rows.append(r)
            print(
                f"{task[0]:<16} seed {seed}: argmax {r['argmax']:.4f} raced {r['raced']:.4f} "
                f"soup {r['soup']:.4f} ensemble {r['ensemble']:.4f} oracle {r['oracle']:.4f} "
                f"({len(r['finalists'])} finalists, {r['race_runs']} race runs, {r['seconds']:.0f}s)",
                flush=True,
            )
    summary = summarize(rows)
    print()
    for task, s in summary.items():
        print(
            f"{task}: "
            + ", ".join(f"{a} {s[a]['mean']:.4f} ± {s[a]['sd']:.4f}" for a in (*ARMS, "oracle"))
            + f"; regret argmax {s['regret_argmax']['mean']:.4f}, raced {s['regret_raced']['mean']:.4f}"
        )
    for task, s in summary.items():
        for rule, v in s["ensemble_rules"].items():
            d, sd = v["minus_raced"]
            (cm, csd), (cd, cdsd) = v["calibrated_members"], v["calibrated_minus_raced"]
            print(
                f"{task}: ensemble by {rule}: {v['mean']:.4f} ± {v['sd']:.4f}, "
                f"{d:+.4f} ± {sd:.4f} vs raced; calibrated members {cm:.4f} ± {csd:.4f}, "
                f"{cd:+.4f} ± {cdsd:.4f} vs raced ({v['seeds']} seeds)"
            )
    if args.markdown:
        print(
            "\n| task | argmax | raced | soup | ensemble | oracle | regret argmax | regret raced |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for task, s in summary.items():
            cells = [f"{s[k]['mean']:.4f} ± {s[k]['sd']:.4f}" for k in (*ARMS, "oracle")]
            cells += [f"{s[k]['mean']:.4f}" for k in ("regret_argmax", "regret_raced")]
            print(f"| {task} | " + " | ".join(cells) + " |")
        print(
            "\n| task | seed | argmax | raced | soup | ensemble | oracle | finalists | race runs |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['task']} | {r['seed']} | {r['argmax']:.4f} | {r['raced']:.4f} | "
                f"{r['soup']:.4f}{'' if r['soup_built'] else '*'} | {r['ensemble']:.4f} "
                f"({r['ensemble_members']}) | {r['oracle']:.4f} | {len(r['finalists'])} | "
                f"{r['race_runs']} |"
            )
    wall = time.perf_counter() - t0
    print(f"\n{len(rows)} searches in {wall:.0f}s; command: {command}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    **how_it_ran(command, args),
                    "wall_seconds": round(wall, 1),
                    "rows": rows,
                    "summary": summary,
                },
                indent=2,
            )
        )
    return 0


def how_it_ran(command: str, args: argparse.Namespace) -> dict:
    """The command, its settings and the machine, for a benchmark's JSON."""
    import torch

    return {
        "command": command,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load": os.getloadavg()[0],
        },
    }


if __name__ == "__main__":
    sys.exit(main())
