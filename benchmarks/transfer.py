#!/usr/bin/env python
"""Does transfer pay? Pretrained vs random init on a few-label task, same budget, several seeds.

Source task: digits 0-4 (``pretrain:digits:0-4``, the project's own supervised pretraining).
Target task: digits 5-9 with at most ``--max-per-class`` labelled images per class (train +
val; the test split keeps every image). For each seed, two studies that differ only in
``[weights]`` (the pretrained backbones, or ``none``) run the same search (sampler, pruner,
trials, epochs, space) on the same split; each retrains its best trial and scores it on the
same test images. Printed: both test accuracies per seed, their difference, and the mean ±
standard deviation over seeds (plus a markdown table with ``--markdown``).

    python benchmarks/transfer.py                       # 5 seeds, 30 labels/class, ~5-10 min CPU
    python benchmarks/transfer.py --seeds 0 1 --n-trials 6 --epochs 4     # a quick look
    python benchmarks/transfer.py --backbones test_convnext --markdown    # one backbone

Nothing is downloaded: the data is embedded and pretraining runs here (cached per seed in the
output folder, ``--out``, default a temporary folder).
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


def study_dict(args: argparse.Namespace, seed: int, weights: str, name: str) -> dict:
    """The study both arms share; only ``weights`` differs."""
    return {
        "name": name,
        "data": {
            "source": args.target,
            "image_size": args.image_size,
            "max_per_class": args.max_per_class,
            "seed": seed,
        },
        "search": {
            "n_trials": args.n_trials,
            "sampler": args.sampler,
            "pruner": args.pruner,
            "backbones": args.backbones,
            "augmentations": ["none", "flip_crop", "randaugment", "trivialaugment"],
            "unfreeze": ["top_k", "gradual", "lp_ft", "layer_decay"],
            "lr": [3e-4, 3e-2],
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "device": args.device,
            "portfolio": args.portfolio,
        },
        "pretrain": {"epochs": args.pretrain_epochs},
        "weights": {"default": weights},
    }


def run_arm(args, seed: int, arm: str, out: Path) -> dict:
    from automl_tl import config_from_dict, registry_for
    from automl_tl.plugins import get_plugin_manager
    from automl_tl.search import search

    weights = f"pretrain:{args.source}" if arm == "pretrained" else "none"
    name = f"{arm}-seed{seed}"
    config = config_from_dict(study_dict(args, seed, weights, name), out / f"{name}.toml")
    pm, _ = get_plugin_manager()
    started = time.perf_counter()
    outcome = search(config, registry_for(), pm, device=args.device)
    test = outcome.metrics["test"]
    sizes = outcome.metrics["data"]["sizes"]
    return {
        "arm": arm,
        "seed": seed,
        "test_accuracy": test["accuracy"],
        "val_accuracy": outcome.best["value"],
        "best_params": outcome.best["params"],
        "sizes": sizes,
        "seconds": round(time.perf_counter() - started, 1),
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--backbones", nargs="+", default=["test_resnet", "test_efficientnet"])
    p.add_argument("--source", default="digits:0-4")
    p.add_argument("--target", default="digits:5-9")
    p.add_argument("--max-per-class", type=int, default=30)
    p.add_argument("--n-trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--sampler", default="tpe")
    p.add_argument("--pruner", default="hyperband")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--portfolio",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="[search] portfolio (default: on, as in a study)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1)")
    p.add_argument("--out", type=Path, help="keep the studies here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = p.parse_args(argv)

    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="automl-tl-transfer-"))
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    print(
        f"source {args.source} -> target {args.target}, <= {args.max_per_class} labels/class, "
        f"{args.n_trials} trials x {args.epochs} epochs ({args.sampler} + {args.pruner}), "
        f"backbones {', '.join(args.backbones)}, seeds {args.seeds}",
        flush=True,
    )
    for seed in args.seeds:
        pair = {arm: run_arm(args, seed, arm, out) for arm in ("pretrained", "scratch")}
        diff = pair["pretrained"]["test_accuracy"] - pair["scratch"]["test_accuracy"]
        rows.append({"seed": seed, **pair, "difference": diff})
        sizes = pair["scratch"]["sizes"]
        print(
            f"seed {seed}: test accuracy pretrained {pair['pretrained']['test_accuracy']:.4f}, "
            f"scratch {pair['scratch']['test_accuracy']:.4f}, difference {diff:+.4f} "
            f"(train/val/test {sizes['train']}/{sizes['val']}/{sizes['test']}; "
            f"{pair['pretrained']['seconds'] + pair['scratch']['seconds']:.0f}s)",
            flush=True,
        )
    pre = [r["pretrained"]["test_accuracy"] for r in rows]
    scr = [r["scratch"]["test_accuracy"] for r in rows]
    dif = [r["difference"] for r in rows]
    (mp, sp), (ms, ss), (md, sd) = mean_sd(pre), mean_sd(scr), mean_sd(dif)
    wins = sum(d > 0 for d in dif)
    print(
        f"\nover {len(rows)} seeds: pretrained {mp:.4f} ± {sp:.4f}, scratch {ms:.4f} ± {ss:.4f}; "
        f"difference {md:+.4f} ± {sd:.4f} (mean ± sd); pretrained better in {wins}/{len(rows)}"
    )
    if args.markdown:
        print("\n| seed | pretrained | scratch | difference |\n|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['seed']} | {r['pretrained']['test_accuracy']:.4f} | "
                f"{r['scratch']['test_accuracy']:.4f} | {r['difference']:+.4f} |"
            )
        print(f"| mean ± sd | {mp:.4f} ± {sp:.4f} | {ms:.4f} ± {ss:.4f} | {md:+.4f} ± {sd:.4f} |")
    if args.json:
        summary = {
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cpus": os.cpu_count(),
            },
            "seeds": rows,
            "pretrained": {"mean": mp, "sd": sp},
            "scratch": {"mean": ms, "sd": ss},
            "difference": {"mean": md, "sd": sd, "pretrained_better": wins},
        }
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
