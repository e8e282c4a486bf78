"""Dataset sources -> decoded uint8 cache -> stratified, seeded splits -> batches on the device.

Images are decoded once, at the study's image size, into ``<output>/cache/images-<key>.npy``
(``(N, 3, S, S)`` uint8, written to a temporary file and renamed, so an interrupted build is
never used). Every trial and every worker on the node reads that file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .components import Dataset, Record
from .errors import DataError
from .registry import Registry

CACHE_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
#: RGBA / LA / palette-with-transparency images are composited on this background.
ALPHA_BACKGROUND = (255, 255, 255)


@dataclass
class Split:
    """Images ``x`` (N, 3, S, S) uint8 and labels ``y`` (N,) int64 of one split."""

    x: torch.Tensor
    y: torch.Tensor
    names: list[str] = field(default_factory=list)  # file path or "#index" per image

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Splits:
    """The study's data: one class map and the train / val / test splits."""

    class_names: list[str]
    train: Split
    val: Split
    test: Split
    image_size: int
    fingerprint: str  # identity of the records (location independent)
    split_hash: str  # identity of the train/val/test assignment
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def part(self, name: str) -> Split:
        """``"train"``, ``"val"``, ``"test"`` or ``"train+val"``."""
        if name == "train+val":
            return Split(
                torch.cat([self.train.x, self.val.x]),
                torch.cat([self.train.y, self.val.y]),
                self.train.names + self.val.names,
            )
        return getattr(self, name)

    def summary(self) -> dict:
        return {
            "classes": self.class_names,
            "sizes": {s: len(getattr(self, s)) for s in SPLIT_NAMES},
            "fingerprint": self.fingerprint,
            "split_hash": self.split_hash,
        }


def parse_source(source: str) -> tuple[str, str | None]:
    """``"folder:/data/pets"`` -> ``("folder", "/data/pets")``; ``"digits"`` -> ``("digits", None)``."""
    name, sep, argument = source.partition(":")
    return name, (argument if sep else None)


def load_dataset(registry: Registry, source: str, base_dir: Path) -> Dataset:
    name, argument = parse_source(source)
    dataset_source = registry.get("datasets", name)
    if dataset_source.needs_argument and not argument:
        raise DataError(f"[data] source {source!r} needs an argument: write it as '{name}:PATH'")
    return dataset_source.load(argument, base_dir)


# ---------------------------------------------------------------------------------------------
# decoding


def _to_8bit(img):
    """High-bit-depth grayscale (I;16, I, F) -> 8-bit by the mode's real range, not clipping."""
    from PIL import Image

    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (arr.dtype == np.uint16):
        arr = arr.astype(np.float64) / 65535.0
    elif img.mode in ("I", "F"):
        arr = arr.astype(np.float64)
        hi = arr.max()
        # 32-bit containers usually hold 16-bit data (PNG loads 16-bit as "I").
        arr = arr / (65535.0 if hi > 255 else 255.0)
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode="L")


def decode_image(image: str | Path | np.ndarray, size: int) -> np.ndarray:
    """Decode one image to ``(3, size, size)`` uint8 RGB.

    Applies EXIF orientation; converts grayscale, palette, CMYK and 16-bit images; composites
    transparency on :data:`ALPHA_BACKGROUND`; resizes (bicubic, antialiased) to a square.
    """
    from PIL import Image, ImageOps

    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise DataError(f"in-memory image has dtype {arr.dtype}; expected uint8")
        img = Image.fromarray(arr if arr.ndim == 2 or arr.shape[-1] in (3, 4) else arr.squeeze())
    else:
        with Image.open(image) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened) or opened
            img = img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (*ALPHA_BACKGROUND, 255))
        img = Image.alpha_composite(background, img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


# ---------------------------------------------------------------------------------------------
# fingerprints and splits


def _record_identity(record: Record, root: str | None) -> str:
    if isinstance(record.image, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(record.image).tobytes()).hexdigest()[:16]
    path = str(record.image)
    rel = os.path.relpath(path, root) if root else path
    try:
        size = os.stat(path).st_size
    except OSError:
        size = -1
    return f"{rel}|{size}"


def _common_root(records: list[Record]) -> str | None:
    paths = [str(r.image) for r in records if not isinstance(r.image, np.ndarray)]
    if not paths:
        return None
    try:
        return os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    except ValueError:
        return None


def fingerprint(records: list[Record]) -> str:
    """A location-independent hash of the records: relative path, size, label, fixed split.

    Copies of the same dataset on different nodes have the same fingerprint.
    """
    root = _common_root(records)
    h = hashlib.sha256()
    for r in records:
        h.update(f"{_record_identity(r, root)}|{r.label}|{r.split or ''}\n".encode())
    return h.hexdigest()


def _local_cache_key(records: list[Record], image_size: int) -> str:
    """Like :func:`fingerprint` plus mtimes: a cache is valid only for these exact files."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{image_size}|{fingerprint(records)}".encode())
    for r in records:
        if not isinstance(r.image, np.ndarray):
            try:
                h.update(str(os.stat(r.image).st_mtime_ns).encode())
            except OSError:
                h.update(b"missing")
    return h.hexdigest()[:20]


def _stratified(
    indices: np.ndarray, labels: np.ndarray, fraction: float, rng
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, taken) with ``fraction`` of each class taken (at least one)."""
    taken, rest = [], []
    for cls in np.unique(labels[indices]):
        members = indices[labels[indices] == cls]
        members = members[rng.permutation(len(members))]
        k = max(1, int(round(len(members) * fraction)))
        taken.append(members[:k])
        rest.append(members[k:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(taken))


def assign_splits(
    records: list[Record],
    class_names: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Indices of train / val / test: the source's own splits where it has them, else stratified."""
    labels = np.array([class_names.index(r.label) for r in records])
    fixed = {
        s: np.array([i for i, r in enumerate(records) if r.split == s], dtype=np.int64)
        for s in SPLIT_NAMES
    }
    unassigned = np.array([i for i, r in enumerate(records) if r.split is None], dtype=np.int64)
    rng = np.random.default_rng(seed)
    pool = np.sort(np.concatenate([fixed["train"], unassigned]))
    counts = Counter(labels[pool].tolist())
    need = 1 + (len(fixed["val"]) == 0) + (len(fixed["test"]) == 0)
    small = {class_names[c]: n for c, n in counts.items() if n < need}
    if small:
        raise DataError(
            "too few images to split: "
            + ", ".join(f"class {k!r} has {v}" for k, v in sorted(small.items()))
            + f"; each class needs at least {need} (train"
            + (", val" if not len(fixed["val"]) else "")
            + (", test" if not len(fixed["test"]) else "")
            + "). Add images or remove the class."
        )
    out = dict(fixed)
    if len(fixed["test"]) == 0:
        pool, out["test"] = _stratified(pool, labels, test_fraction, rng)
    if len(fixed["val"]) == 0:
        # val_fraction is of the whole dataset; rescale to what is left after the test split
        frac = val_fraction / max(1e-9, 1.0 - (test_fraction if len(fixed["test"]) == 0 else 0.0))
        pool, out["val"] = _stratified(pool, labels, min(frac, 0.9), rng)
    out["train"] = pool
    return out


def _split_hash(splits: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in SPLIT_NAMES:
        h.update(name.encode() + splits[name].astype(np.int64).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the decoded cache


def _build_cache(records: list[Record], image_size: int, path: Path) -> list[tuple[int, str]]:
    """Decode every record into ``path`` (atomically); return (index, reason) for bad images."""
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    bad: list[tuple[int, str]] = []
    arr = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(len(records), 3, image_size, image_size)
    )
    try:
        for i, record in enumerate(
            tqdm(records, desc="decoding images", unit="img", disable=None, leave=False)
        ):
            try:
                arr[i] = decode_image(record.image, image_size)
            except (
                OSError,
                ValueError,
                SyntaxError,
                DataError,
            ) as exc:  # PIL's errors for bad files
                bad.append((i, f"{type(exc).__name__}: {exc}"))
        arr.flush()
        del arr
        meta = {"version": CACHE_VERSION, "bad": bad, "n": len(records)}
        meta_tmp = tmp.with_suffix(".json.tmp")
        meta_tmp.write_text(json.dumps(meta))
        os.replace(meta_tmp, path.with_suffix(".json"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return [tuple(b) for b in bad]


def decoded_images(
    records: list[Record], image_size: int, cache_dir: Path | None
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """All records decoded at ``image_size`` (memory-mapped from the cache when there is one)."""
    if cache_dir is None:
        bad, out = [], np.zeros((len(records), 3, image_size, image_size), np.uint8)
        for i, r in enumerate(records):
            try:
                out[i] = decode_image(r.image, image_size)
            except (OSError, ValueError, SyntaxError, DataError) as exc:
                bad.append((i, f"{type(exc).__name__}: {exc}"))
        return out, bad
    path = cache_dir / f"images-{_local_cache_key(records, image_size)}.npy"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        bad = [tuple(b) for b in json.loads(meta_path.read_text())["bad"]]
    else:
        bad = _build_cache(records, image_size, path)
    return np.load(path, mmap_mode="r"), bad


def prepare_data(
    registry: Registry,
    source: str,
    *,
    image_size: int,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    base_dir: Path | None = None,
    cache_dir: Path | None = None,
    on_bad_image: str = "error",
) -> Splits:
    """Load a dataset source, decode it once, and split it (stratified, seeded)."""
    dataset = load_dataset(registry, source, base_dir or Path.cwd())
    records = dataset.records
    images, bad = decoded_images(records, image_size, cache_dir)
    problems = list(dataset.problems) + [(str(records[i].image), why) for i, why in bad]
    if problems and on_bad_image == "error":
        listing = "\n".join(f"  {p}: {why}" for p, why in problems[:50])
        more = f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(
            f"{len(problems)} unreadable image(s) in {source}:\n{listing}{more}\n"
            'Fix or remove them, or set [data] on_bad_image = "skip" to leave them out.'
        )
    bad_idx = {i for i, _ in bad}
    keep = [i for i in range(len(records)) if i not in bad_idx]
    records = [records[i] for i in keep]
    class_names = dataset.class_names or sorted({r.label for r in records})
    unknown = sorted({r.label for r in records} - set(class_names))
    if unknown:
        raise DataError(f"labels {unknown} are not in the source's class list {class_names}")
    if len(class_names) < 2:
        raise DataError(f"{source} has {len(class_names)} class; a classifier needs at least 2")
    present = Counter(r.label for r in records)
    empty = [c for c in class_names if present[c] == 0]
    if empty:
        raise DataError(
            f"class(es) {empty} have no usable images; add images or remove the class folder"
        )
    train_labels = {r.label for r in records if r.split in (None, "train")}
    only_eval = sorted(set(present) - train_labels)
    if only_eval:
        raise DataError(
            f"class(es) {only_eval} appear only in val/test, never in train; add training images"
        )
    counts = sorted(present.values())
    if counts[-1] >= 10 * counts[0]:
        warnings.warn(
            f"severe class imbalance: {dict(sorted(present.items()))}; consider "
            'metric = "balanced_accuracy" or "macro_f1"',
            stacklevel=2,
        )
    indices = assign_splits(records, class_names, val_fraction, test_fraction, seed)
    labels = torch.tensor([class_names.index(r.label) for r in records], dtype=torch.int64)

    keep_rows = np.asarray(keep, dtype=np.int64)

    def make(idx: np.ndarray) -> Split:
        rows = keep_rows[idx]  # idx is sorted, so rows are too: a sequential read of the cache
        if len(rows):
            x = torch.from_numpy(np.ascontiguousarray(images[rows]))
        else:
            x = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
        names = [
            f"#{row}" if isinstance(records[j].image, np.ndarray) else str(records[j].image)
            for j, row in zip(idx.tolist(), rows.tolist())
        ]
        return Split(x, labels[torch.from_numpy(idx)], names)

    return Splits(
        class_names=list(class_names),
        train=make(indices["train"]),
        val=make(indices["val"]),
        test=make(indices["test"]),
        image_size=image_size,
        fingerprint=fingerprint(records),
        split_hash=_split_hash(indices),
        skipped=[(str(dataset.records[i].image), why) for i, why in bad],
    )


def batches(
    split: Split,
    batch_size: int,
    *,
    device: torch.device,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    min_batch: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, labels) on ``device``; a final batch smaller than ``min_batch`` is dropped."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else None
    cuda = device.type == "cuda"
    for start in range(0, n, batch_size):
        if order is not None:
            idx = order[start : start + batch_size]
            xb, yb = split.x[idx], split.y[idx]
        else:
            xb, yb = split.x[start : start + batch_size], split.y[start : start + batch_size]
        if len(yb) < min_batch:
            break
        if cuda:
            xb = xb.pin_memory().to(device, non_blocking=True)
            yb = yb.pin_memory().to(device, non_blocking=True)
        elif xb.device != device:
            xb, yb = xb.to(device), yb.to(device)
        yield xb, yb
