#!/usr/bin/env python
"""Build the tabular benchmark of the search: the learning curve of every configuration of a
small grid on several small, differing tasks, computed once and shipped as
``benchmarks/data/tabular.json`` (read by ``benchmarks/search.py``).

    nice -n 5 python benchmarks/build_tabular.py               # the shipped table
    python benchmarks/build_tabular.py --quick --out /tmp/t.json   # a smoke run, seconds

Tasks (all generated here from scikit-learn's shipped digits and synthetic drawings: nothing
is downloaded), at ``--size`` px (default 16), 15 validation images per class:

==================  =====================================================================
``digits-few``      digits 5-9, 6 labels per class: few labels, orientation-sensitive, the
                    source task's near neighbour (transfer helps)
``digits-many``     digits 5-9, 40 labels per class
``digits-mirror``   digits 2, 3, 4, 5, 7 and their mirror images (10 classes), 15 per class:
                    a flip swaps the label (flip augmentation hurts)
``shapes``          six filled shapes on noise, colour, 20 per class; flip-safe
``shapes-few``      the same, 5 per class
``textures``        six colour textures (gratings of three frequencies at any angle, a
                    checkerboard, dots, blobs), 20 per class: little for digit features to
                    transfer
``textures-many``   the same, 40 per class: many labels where transfer helps little
``shapes-many``     the shapes, 40 per class
``arrows``          arrows pointing left, right, up or down, colour, 15 per class:
                    orientation-sensitive shapes (a horizontal flip swaps left and right)
``counting``        one to four bright dots on a noisy grey field, 20 per class: a global
                    property, nothing local to recognise
``digits-inverse``  digits 5-9 dark on a light, tinted background, 15 per class: the source
                    task's shapes at other low-level statistics
``digits-rot``      the source task's own classes (digits 0-4) turned a quarter turn, 10 per
                    class: the same labels, another orientation
==================  =====================================================================

The first six tasks were built on 2026-11-30, the last six on 2026-12-01 (``--tasks`` with
``--into`` the shipped table: the tasks already there are kept as they are; the pretrained
weights are rebuilt identically, see :func:`weights_digest`).

Backbones are timm's tiny ``test_resnet`` and ``test_efficientnet`` (``test_convnext`` needs
32 px), each pretrained once on the source task (digits 0-4, 6 epochs,
:func:`automl_tl.pretrain.pretrain`). The grid (``GRID``): backbone (2) x augmentation policy
at a strength (``none``; ``crop`` and ``flip_crop`` at 0.3 and 0.8: 5) x unfreeze strategy at
a depth (``top_k`` at 0, 0.5, 1; ``lp_ft`` at 1: 4) x lr (3e-4, 2e-3, 1e-2: 3) = 120
configurations per task, weight decay 1e-4, ``--epochs`` (5) epochs each, batch 32, one seed,
one CPU thread, the feature cache off (so every epoch's seconds are the model's). Each row
keeps the validation accuracy after every epoch and the seconds each epoch took (the cost of
that configuration); each task keeps its meta-features
(:func:`automl_tl.prior.meta_features`: what a team prior matches tasks by).

The grid was shrunk to fit the shared 2-core build machine (a first attempt at 32 px with
three backbones, 6 epochs and 180 configurations per task needed ~25 CPU-minutes, over an
hour of wall-clock time under the machine's load): 16 px, two backbones, three lrs, 5 epochs,
fewer images. RESULTS.md says what that leaves out.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AUTOML_TL_LOAD_PLUGINS", "")  # only the built-in components
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from automl_tl import registry_for  # noqa: E402
from automl_tl.data import Split, Splits  # noqa: E402
from automl_tl.pretrain import PretrainSpec, pretrain  # noqa: E402
from automl_tl.prior import meta_features  # noqa: E402
from automl_tl.train import Choice, fit  # noqa: E402

BACKBONES = ("test_resnet", "test_efficientnet")
AUGMENTATIONS = (
    ("none", 0.0),
    ("crop", 0.3),
    ("crop", 0.8),
    ("flip_crop", 0.3),
    ("flip_crop", 0.8),
)
STRATEGIES = (("top_k", 0.0), ("top_k", 0.5), ("top_k", 1.0), ("lp_ft", 1.0))
LRS = (3e-4, 2e-3, 1e-2)
WEIGHT_DECAY = 1e-4
GRID = list(itertools.product(BACKBONES, AUGMENTATIONS, STRATEGIES, LRS))
SOURCE = "digits:0-4"
#: validation images per class
VAL = 15


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images * (255.0 / 16.0)).round().astype(np.uint8), bunch.target


def _resize_gray(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) uint8 -> (N, 3, size, size) uint8, bilinear."""
    x = torch.from_numpy(images).float()[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1).numpy()


def _shapes(rng, n_per_class: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out, labels = [], []
    for label in range(6):
        for _ in range(n_per_class):
            r = rng.uniform(0.25, 0.42) * size
            cx, cy = rng.uniform(r, size - r, 2)
            dx, dy = (xx - cx) / r, (yy - cy) / r
            mask = [
                dx**2 + dy**2 <= 1,
                (abs(dx) <= 0.8) & (abs(dy) <= 0.8),
                (dy <= 0.8) & (dy >= -0.9 + 1.7 * abs(dx)),
                ((abs(dx) <= 0.3) | (abs(dy) <= 0.3)) & (abs(dx) <= 1) & (abs(dy) <= 1),
                (dx**2 + dy**2 <= 1) & (dx**2 + dy**2 >= 0.45),
                abs(dx) + abs(dy) <= 1,
            ][label]
            fg, bg = rng.uniform(150, 255, 3), rng.uniform(0, 90, 3)
            image = np.where(mask[..., None], fg, bg) + rng.normal(0, 20, (size, size, 3))
            out.append(np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1))
            labels.append(label)
    return np.stack(out), np.array(labels)


def _textures(rng, n_per_class: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out, labels = [], []
    for label in range(6):
        for _ in range(n_per_class):
            angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            u = xx * np.cos(angle) + yy * np.sin(angle)
            if label < 3:  # gratings: 2, 4 or 7 cycles across the image
                value = np.sin(2 * np.pi * (2, 4, 7)[label] * u / size + phase)
            elif label == 3:  # checkerboard
                v = -xx * np.sin(angle) + yy * np.cos(angle)
                cell = size / rng.uniform(3, 5)
                value = np.sign(np.sin(np.pi * u / cell) * np.sin(np.pi * v / cell))
            elif label == 4:  # dots
                value = -np.ones((size, size), np.float32)
                for _ in range(rng.integers(4, 9)):
                    cx, cy = rng.uniform(0, size, 2)
                    value[(xx - cx) ** 2 + (yy - cy) ** 2 <= rng.uniform(1.0, 2.5) ** 2] = 1
            else:  # blobs: smooth noise
                coarse = rng.normal(0, 1, (4, 4)).astype(np.float32)
                value = torch.nn.functional.interpolate(
                    torch.from_numpy(coarse)[None, None], size=(size, size), mode="bicubic"
                )[0, 0].numpy()
                value = np.tanh(2 * value)
            a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            image = (value[..., None] + 1) / 2 * a + (1 - value[..., None]) / 2 * b
            image = image + rng.normal(0, 12, (size, size, 3))
            out.append(np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1))
            labels.append(label)
    return np.stack(out), np.array(labels)


def _arrows(rng, n_per_class: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Arrows pointing left, right, up or down: a shaft and a triangular head, colour."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out, labels = [], []
    for label in range(4):
        for _ in range(n_per_class):
            half = rng.uniform(0.3, 0.45) * size  # half the arrow's length
            cx, cy = rng.uniform(half, size - half, 2)
            # along / across the arrow's direction (right, left, down, up in image rows)
            along = [xx - cx, cx - xx, yy - cy, cy - yy][label] / half
            across = [yy - cy, yy - cy, xx - cx, xx - cx][label] / half
            shaft = (along >= -1) & (along <= 0.2) & (abs(across) <= 0.18)
            head = (along > 0.2) & (along <= 1) & (abs(across) <= 0.6 * (1 - along) / 0.8)
            fg, bg = rng.uniform(150, 255, 3), rng.uniform(0, 100, 3)
            image = np.where((shaft | head)[..., None], fg, bg) + rng.normal(0, 18, (size, size, 3))
            out.append(np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1))
            labels.append(label)
    return np.stack(out), np.array(labels)


def _counting(rng, n_per_class: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One to four bright dots, apart from each other, on a noisy grey field."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out, labels = [], []
    for label in range(4):
        for _ in range(n_per_class):
            centres: list[np.ndarray] = []
            while len(centres) < label + 1:
                c = rng.uniform(2, size - 2, 2)
                if all(np.hypot(*(c - d)) >= 4.5 for d in centres):
                    centres.append(c)
            value = np.full((size, size), rng.uniform(40, 110), np.float32)
            for cx, cy in centres:
                value[(xx - cx) ** 2 + (yy - cy) ** 2 <= rng.uniform(1.2, 2.0) ** 2] = 230
            image = value + rng.normal(0, 15, (size, size))
            out.append(np.clip(image, 0, 255).astype(np.uint8)[None].repeat(3, 0))
            labels.append(label)
    return np.stack(out), np.array(labels)


def _split(x: np.ndarray, y: np.ndarray, n_train: int, n_val: int, rng) -> tuple[Split, Split]:
    """Per class: ``n_train`` training and ``n_val`` validation images."""
    train, val = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        train += list(idx[:n_train])
        val += list(idx[n_train : n_train + n_val])

    def part(idx):
        return Split(torch.from_numpy(x[idx]).contiguous(), torch.from_numpy(y[idx]).long())

    return part(np.array(train)), part(np.array(val))


def make_task(name: str, size: int, seed: int = 0) -> Splits:
    """One task of the benchmark as in-memory splits (see the module docstring)."""
    rng = np.random.default_rng(seed + sum(map(ord, name)))
    images, target = _digits()
    if name in ("digits-few", "digits-many"):
        keep = target >= 5
        x, y = _resize_gray(images[keep], size), target[keep] - 5
        n_train = 6 if name == "digits-few" else 40
        classes = [str(d) for d in range(5, 10)]
    elif name == "digits-inverse":
        keep = target >= 5
        gray = _resize_gray(images[keep], size).astype(np.float32) / 255.0
        tint = rng.uniform(170, 255, (len(gray), 3, 1, 1))  # a light, tinted background
        x = ((1.0 - gray) * tint).round().astype(np.uint8)
        y, n_train = target[keep] - 5, 15
        classes = [str(d) for d in range(5, 10)]
    elif name == "digits-rot":
        keep = target < 5
        x = _resize_gray(np.rot90(images[keep], k=-1, axes=(1, 2)).copy(), size)
        y, n_train = target[keep], 10
        classes = [f"{d}-turned" for d in range(5)]
    elif name == "digits-mirror":
        digits = (2, 3, 4, 5, 7)
        keep = np.isin(target, digits)
        base, t = images[keep], np.searchsorted(digits, target[keep])
        x = _resize_gray(np.concatenate([base, base[:, :, ::-1]]), size)
        y = np.concatenate([t, t + len(digits)])
        n_train = 15
        classes = [str(d) for d in digits] + [f"{d}-mirrored" for d in digits]
    elif name.startswith("shapes"):
        n_train = {"shapes-few": 5, "shapes-many": 40}.get(name, 20)
        x, y = _shapes(rng, n_train + VAL, size)
        classes = ["circle", "square", "triangle", "cross", "ring", "diamond"]
    elif name.startswith("textures"):
        n_train = 40 if name == "textures-many" else 20
        x, y = _textures(rng, n_train + VAL, size)
        classes = ["grating-2", "grating-4", "grating-7", "checker", "dots", "blobs"]
    elif name == "arrows":
        n_train = 15
        x, y = _arrows(rng, n_train + VAL, size)
        classes = ["right", "left", "down", "up"]
    elif name == "counting":
        n_train = 20
        x, y = _counting(rng, n_train + VAL, size)
        classes = ["one", "two", "three", "four"]
    else:
        raise ValueError(name)
    train, val = _split(x, y, n_train, VAL, rng)
    digest = hashlib.sha256(train.x.numpy().tobytes() + val.x.numpy().tobytes()).hexdigest()
    return Splits(
        class_names=classes,
        train=train,
        val=val,
        test=val,
        image_size=size,
        fingerprint=f"tabular-{name}-{digest[:12]}",
        split_hash=digest[:12],
    )


TASKS = (
    "digits-few",
    "digits-many",
    "digits-mirror",
    "shapes",
    "shapes-few",
    "textures",
    "textures-many",
    "shapes-many",
    "arrows",
    "counting",
    "digits-inverse",
    "digits-rot",
)


def run_config(config: tuple, splits: Splits, registry, weights: dict[str, str], epochs: int):
    backbone, (policy, strength), (strategy, depth), lr = config
    choice = Choice(
        backbone=backbone,
        weights=weights[backbone],
        augmentation=policy,
        aug_strength=strength,
        unfreeze=strategy,
        unfreeze_depth=depth,
        lr=lr,
        weight_decay=WEIGHT_DECAY,
        epochs=epochs,
        batch_size=32,
    )
    curve, seconds = [], []
    try:
        result = fit(
            choice,
            splits,
            registry,
            device="cpu",
            seed=0,
            feature_cache=False,  # every epoch's seconds are the model's (a fair cost)
            on_epoch=lambda r: (
                curve.append(round(r.val["accuracy"], 4)),
                seconds.append(r.seconds),
            ),
        )
        del result
    except Exception as exc:  # a diverged run is a row at chance
        print(f"  {config}: {type(exc).__name__}: {exc}", file=sys.stderr)
        chance = 1 / len(splits.class_names)
        curve += [round(chance, 4)] * (epochs - len(curve))
        seconds += [seconds[-1] if seconds else 1.0] * (epochs - len(seconds))
    return {
        "backbone": backbone,
        "augmentation": policy,
        "aug_strength": strength,
        "unfreeze": strategy,
        "unfreeze_depth": depth,
        "lr": lr,
        "val_accuracy": curve,
        "seconds": [round(s, 4) for s in seconds],
    }


def _write(out: Path, table: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=None, separators=(",", ":")) + "\n")


class Refused(Exception):
    """Tables that cannot be combined: one message, exit 2."""


def weights_digest(weights: dict[str, str]) -> str:
    """A digest of the pretrained backbones' files: tasks built in separate runs share it only
    when their weights were the same (pretraining is seeded and runs on one CPU thread)."""
    digest = hashlib.sha256()
    for backbone in sorted(weights):
        digest.update(backbone.encode() + Path(weights[backbone]).read_bytes())
    return digest.hexdigest()[:16]


def combine(paths: list[str], out: Path) -> dict:
    """Several builds' tables as one: the same size, epochs, source and weights, each task once
    (the first file's wins)."""
    tables = [json.loads(Path(p).read_text()) for p in paths]
    first = tables[0]
    for path, table in zip(paths[1:], tables[1:]):
        for key in ("size", "epochs", "source", "weight_decay", "weights_digest"):
            if key == "weights_digest" and not (table.get(key) and first.get(key)):
                continue  # a table from before digests were kept (the first six tasks')
            if table.get(key) != first.get(key):
                raise Refused(
                    f"{path}: {key} = {table.get(key)!r}, {paths[0]} has {first.get(key)!r}; "
                    "only tables built the same way combine"
                )
        for task, data in table["tasks"].items():
            first["tasks"].setdefault(task, data)
        first["weights_digest"] = first.get("weights_digest") or table.get("weights_digest")
    first["build_seconds"] = round(sum(t.get("build_seconds", 0) for t in tables), 1)
    _write(out, first)
    return first


def main(argv: list[str] | None = None) -> int:
    try:
        return build(argv)
    except Refused as exc:
        print(f"build_tabular: {exc}", file=sys.stderr)
        return 2


def build(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "data" / "tabular.json"))
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, help="only these tasks")
    parser.add_argument(
        "--into", help="a table to extend: its tasks are kept, the others are built and added"
    )
    parser.add_argument(
        "--combine", nargs="+", metavar="TABLE", help="write these tables' tasks as one to --out"
    )
    parser.add_argument("--quick", action="store_true", help="2 tasks x 4 configurations")
    args = parser.parse_args(argv)
    if args.combine:
        table = combine(args.combine, Path(args.out))
        print(f"wrote {args.out}: {', '.join(table['tasks'])}")
        return 0
    torch.set_num_threads(1)
    registry = registry_for()
    started = time.perf_counter()
    tasks, grid = tuple(args.tasks or TASKS), GRID
    if args.quick:
        tasks, grid = tuple(args.tasks or TASKS[1:3]), GRID[2::31][:8]
    with tempfile.TemporaryDirectory() as folder:
        weights = {}
        for backbone in BACKBONES:
            path = Path(folder) / f"{backbone}.safetensors"
            spec = PretrainSpec(
                backbone=backbone,
                source=SOURCE,
                image_size=args.size,
                epochs=args.pretrain_epochs,
                seed=0,
            )
            pretrain(spec, path, registry, base_dir=Path(folder), device="cpu")
            weights[backbone] = str(path)
        table = {
            "about": (
                "learning curves of a configuration grid on small tasks; built by "
                "benchmarks/build_tabular.py"
            ),
            "size": args.size,
            "epochs": args.epochs,
            "source": SOURCE,
            "weight_decay": WEIGHT_DECAY,
            "weights_digest": weights_digest(weights),
            "tasks": {},
        }
        if args.into:
            base = json.loads(Path(args.into).read_text())
            for key in ("size", "epochs", "source", "weight_decay"):
                if base.get(key) != table[key]:
                    raise Refused(
                        f"{args.into}: {key} = {base.get(key)!r}, not {table[key]!r}; build "
                        "with the same --size and --epochs"
                    )
            known = base.get("weights_digest")
            if known and known != table["weights_digest"]:
                raise Refused(
                    f"{args.into}: built from other pretrained weights ({known}); rebuild "
                    "the whole table"
                )
            table["tasks"] = base["tasks"]
            started -= base.get("build_seconds", 0.0)
        for task in tasks:
            if task in table["tasks"]:
                continue
            splits = make_task(task, args.size)
            features = meta_features(splits, weights=f"pretrain:{SOURCE}")
            rows = []
            t0 = time.perf_counter()
            for config in grid:
                rows.append(run_config(config, splits, registry, weights, args.epochs))
            best = max(r["val_accuracy"][-1] for r in rows)
            print(
                f"{task}: {len(rows)} configurations in {time.perf_counter() - t0:.0f}s, "
                f"best final {best:.3f}",
                flush=True,
            )
            table["tasks"][task] = {"meta_features": features, "rows": rows}
            table["build_seconds"] = round(time.perf_counter() - started, 1)
            _write(Path(args.out), table)  # after each task: a stopped build keeps its tasks
    print(f"wrote {args.out} ({table.get('build_seconds', 0):.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
