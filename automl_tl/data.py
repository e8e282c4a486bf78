"""Dataset sources -> checks -> decoded uint8 cache -> stratified, seeded splits -> batches.

Images are decoded once, at the study's image size, into ``<output>/cache/images-<key>.npy``
(``(N, 3, S, S)`` uint8) plus a ``.json`` sidecar that lists the unreadable files. The build
writes a temporary file and renames it, under a lock, so an interrupted build is never used
and the workers of one node decode the data once between them. Every trial and every worker
reads that file memory-mapped: splits up to :func:`in_memory_limit` bytes are copied into RAM
(fast shuffling), larger ones stay mapped and each batch reads just its rows, so a dataset
larger than RAM still trains.

Before anything trains, the data is checked: unreadable files are listed by path
(``[data] on_bad_image``), and class problems (one class, an empty class, a class only in
val/test, too few images to split, severe imbalance) are errors or warnings.
:func:`check_source` runs every check without stopping at the first problem
(``automl-tl check-data``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._util import node_lock, pid_alive
from .components import Dataset, Record
from .errors import DataError, did_you_mean
from .registry import Registry

log = logging.getLogger("automl_tl")

#: Image file extensions read by the folder source and `predict` (matched case-insensitively).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CACHE_VERSION = 2
SPLIT_NAMES = ("train", "val", "test")
#: RGBA / LA / palette-with-transparency images are composited on this background (white).
ALPHA_BACKGROUND = (255, 255, 255)
#: Image modes decoded to RGB; others (LAB, HSV, …) would need colour management: bad files.
SUPPORTED_MODES = frozenset(
    {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "I", "F"}
    | {"I;16", "I;16B", "I;16L", "I;16N"}
)
#: A class with this many times the images of the smallest class triggers a warning.
IMBALANCE_RATIO = 10
#: Environment variable: the largest split (in MB of decoded images) copied into RAM.
IN_MEMORY_ENV = "AUTOML_TL_IN_MEMORY_MB"


def in_memory_limit() -> int:
    """Bytes of decoded images a split may take in RAM; larger splits stay memory-mapped.

    ``AUTOML_TL_IN_MEMORY_MB`` if set, else 2 GiB or a quarter of physical memory,
    whichever is smaller.
    """
    raw = os.environ.get(IN_MEMORY_ENV)
    if raw:
        try:
            return int(float(raw) * 1024**2)
        except ValueError:
            raise DataError(f"{IN_MEMORY_ENV}={raw!r} is not a number of megabytes") from None
    limit = 2 * 1024**3
    with contextlib.suppress(ValueError, OSError, AttributeError):
        limit = min(limit, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
    return limit


# ---------------------------------------------------------------------------------------------
# splits


def _read_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` read in file order (one sequential read where the rows are a range)."""
    if len(rows) == 0:
        return np.empty((0, *array.shape[1:]), dtype=array.dtype)
    first, last = int(rows[0]), int(rows[-1])
    if last - first == len(rows) - 1 and np.all(np.diff(rows) == 1):
        return np.array(array[first : last + 1])
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    out[order] = array[rows[order]]
    return out


class CachedImages:
    """Rows of the memory-mapped decoded cache, read only when indexed.

    Stands in for the ``(N, 3, S, S)`` uint8 tensor of a split too large for RAM: ``len``,
    ``shape``, ``dtype`` and indexing (an int, a slice, an index tensor or array) work as on
    the tensor and return a uint8 tensor holding just those rows.
    """

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, array: np.ndarray, rows: np.ndarray) -> None:
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.array.shape[1:]))

    @property
    def nbytes(self) -> int:
        return len(self.rows) * int(np.prod(self.array.shape[1:]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        rows = self.rows[index]
        if np.ndim(rows) == 0:
            return torch.from_numpy(np.array(self.array[int(rows)]))
        return torch.from_numpy(_read_rows(self.array, rows))

    def numpy(self) -> np.ndarray:
        """Every row, read into RAM."""
        return _read_rows(self.array, self.rows)

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Every row as a tensor (read into RAM first), like ``Tensor.to``."""
        return torch.from_numpy(self.numpy()).to(*args, **kwargs)

    def __repr__(self) -> str:
        return f"CachedImages(shape={tuple(self.shape)}, memory-mapped)"


def _concat(a: torch.Tensor | CachedImages, b: torch.Tensor | CachedImages):
    if isinstance(a, CachedImages) and isinstance(b, CachedImages) and a.array is b.array:
        return CachedImages(a.array, np.concatenate([a.rows, b.rows]))
    as_tensor = [x if isinstance(x, torch.Tensor) else x.to("cpu") for x in (a, b)]
    return torch.cat(as_tensor)


@dataclass
class Split:
    """Images ``x`` (N, 3, S, S) uint8 and labels ``y`` (N,) int64 of one split.

    ``x`` is a tensor in RAM, or :class:`CachedImages` (memory-mapped) for a split larger
    than :func:`in_memory_limit`; both index the same way.
    """

    x: torch.Tensor | CachedImages
    y: torch.Tensor
    names: list[str] = field(default_factory=list)  # file path or "#index" per image

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def in_memory(self) -> bool:
        return isinstance(self.x, torch.Tensor)


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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    class_hashes: dict[str, str] = field(default_factory=dict)  # per-class identity

    def part(self, name: str) -> Split:
        """``"train"``, ``"val"``, ``"test"`` or ``"train+val"``."""
        if name == "train+val":
            return Split(
                _concat(self.train.x, self.val.x),
                torch.cat([self.train.y, self.val.y]),
                self.train.names + self.val.names,
            )
        return getattr(self, name)

    def summary(self) -> dict:
        """What the study stores to recognise its data (see :func:`describe_changes`)."""
        counts = {}
        for s in SPLIT_NAMES:
            per_class = torch.bincount(getattr(self, s).y, minlength=len(self.class_names))
            counts[s] = {c: int(n) for c, n in zip(self.class_names, per_class.tolist())}
        return {
            "classes": self.class_names,
            "sizes": {s: len(getattr(self, s)) for s in SPLIT_NAMES},
            "counts": counts,
            "class_hashes": self.class_hashes,
            "fingerprint": self.fingerprint,
            "split_hash": self.split_hash,
        }


def describe_changes(stored: dict, current: dict) -> list[str]:
    """What differs between the data a study was created with and the data found now."""
    changes = []
    old_classes, new_classes = stored.get("classes", []), current.get("classes", [])
    if old_classes != new_classes:
        gone = [c for c in old_classes if c not in new_classes]
        new = [c for c in new_classes if c not in old_classes]
        parts = [f"removed {gone}" if gone else "", f"added {new}" if new else ""]
        changes.append(
            "classes "
            + (", ".join(p for p in parts if p) or "reordered")
            + f" ({old_classes} -> {new_classes})"
        )
    old_counts, new_counts = stored.get("counts"), current.get("counts")
    if old_counts and new_counts and not changes:
        for split in SPLIT_NAMES:
            for cls in new_classes:
                a, b = old_counts.get(split, {}).get(cls, 0), new_counts[split].get(cls, 0)
                if a != b:
                    changes.append(f"{split}/{cls}: {a} -> {b} images")
    elif stored.get("sizes") != current.get("sizes") and not changes:
        changes.append(f"split sizes {stored.get('sizes')} -> {current.get('sizes')}")
    if stored.get("fingerprint") != current.get("fingerprint") and not changes:
        old_h, new_h = stored.get("class_hashes") or {}, current.get("class_hashes") or {}
        touched = [c for c in new_classes if old_h and old_h.get(c) != new_h.get(c)]
        changes.append(
            f"files renamed, resized or relabelled in class(es) {touched}"
            if touched
            else "file names, sizes or labels changed"
        )
    if stored.get("split_hash") != current.get("split_hash") and not changes:
        changes.append("the train/val/test assignment changed ([data] seed or fractions)")
    return changes


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
    elif img.mode == "F" and arr.size and float(np.nanmax(arr)) <= 1.0:
        arr = arr.astype(np.float64)  # float images in [0, 1]
    elif img.mode in ("I", "F"):
        arr = arr.astype(np.float64)
        hi = arr.max() if arr.size else 0
        # 32-bit containers usually hold 16-bit data (PNG loads 16-bit as "I").
        arr = arr / (65535.0 if hi > 255 else 255.0)
    arr = np.nan_to_num(arr, nan=0.0)
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode="L")


def decode_image(
    image: str | Path | np.ndarray, size: int, *, info: dict[str, Any] | None = None
) -> np.ndarray:
    """Decode one image to ``(3, size, size)`` uint8 RGB.

    Applies EXIF orientation; converts grayscale, palette, CMYK and 16-bit images (by their
    real range, so a 16-bit image does not come out white); composites transparency on
    :data:`ALPHA_BACKGROUND`; resizes (bicubic, antialiased) to a square. Large JPEGs are
    decoded at a reduced scale first (never below ``size``). ``info``, when given, receives
    the file's ``format``, ``mode`` and ``size`` (width, height).

    Raises whatever PIL raises for an unreadable file, and :class:`DataError` for an
    unsupported mode.
    """
    from PIL import Image, ImageOps

    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise DataError(f"in-memory image has dtype {arr.dtype}; expected uint8")
        img = Image.fromarray(arr if arr.ndim == 2 or arr.shape[-1] in (3, 4) else arr.squeeze())
        if info is not None:
            info.update(format="array", mode=img.mode, size=img.size)
    else:
        with Image.open(image) as opened:
            if info is not None:
                info.update(format=opened.format, mode=opened.mode, size=opened.size)
            if opened.format == "JPEG":
                opened.draft(None, (size, size))  # DCT scaling: a 24 MP photo decodes fast
            opened.load()
            img = ImageOps.exif_transpose(opened) or opened
            img = img.copy()
    if img.mode not in SUPPORTED_MODES:
        raise DataError(f"unsupported image mode {img.mode!r}")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
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


def bad_image_reason(exc: BaseException, image: str | Path | np.ndarray) -> str:
    """A short, stable reason why ``image`` could not be decoded."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(image, np.ndarray):
        try:
            if os.path.getsize(image) == 0:
                return "empty file (0 bytes)"
        except OSError:
            return "file not found"
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (no image format recognises it)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large ({text})"
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return "truncated image"
    if isinstance(exc, DataError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _decode_into(
    records: list[Record],
    image_size: int,
    out: np.ndarray | None,
    infos: list[dict] | None = None,
    desc: str = "decoding images",
) -> list[tuple[int, str]]:
    """Decode every record into ``out[i]`` (or only check it when ``out`` is None)."""
    from tqdm.auto import tqdm

    bad: list[tuple[int, str]] = []
    bar = tqdm(
        records,
        desc=desc,
        unit="img",
        # off a terminal, and off when the automl_tl logger is set above INFO (the CLI's -q)
        disable=True if log.level > logging.INFO else None,
        leave=False,
        mininterval=0.5,
        dynamic_ncols=True,
    )
    for i, record in enumerate(bar):
        info: dict[str, Any] = {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning, EXIF warnings
                decoded = decode_image(record.image, image_size, info=info)
        except MemoryError:
            raise
        except Exception as exc:  # any decoder error means this one file is unusable
            bad.append((i, bad_image_reason(exc, record.image)))
        else:
            if out is not None:
                out[i] = decoded
        if infos is not None:
            infos.append(info)
    bar.close()
    return bad


# ---------------------------------------------------------------------------------------------
# fingerprints


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

    Copies of the same dataset on different nodes have the same fingerprint (modification
    times differ between copies, so they are left out here; the local cache key has them).
    """
    root = _common_root(records)
    h = hashlib.sha256()
    for r in records:
        h.update(f"{_record_identity(r, root)}|{r.label}|{r.split or ''}\n".encode())
    return h.hexdigest()


def _class_hashes(records: list[Record]) -> dict[str, str]:
    """A short fingerprint per class, so a changed dataset can say which classes changed."""
    root = _common_root(records)
    hashes: dict[str, Any] = {}
    for r in records:
        h = hashes.setdefault(r.label, hashlib.sha256())
        h.update(f"{_record_identity(r, root)}|{r.split or ''}\n".encode())
    return {label: h.hexdigest()[:12] for label, h in sorted(hashes.items())}


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


# ---------------------------------------------------------------------------------------------
# class checks and splits


def _split_shortfall(records: list[Record], class_names: list[str]) -> str | None:
    """Why the records cannot be split (a class too small for train + val + test), or None."""
    fixed = {s for s in SPLIT_NAMES if any(r.split == s for r in records)}
    need = 1 + ("val" not in fixed) + ("test" not in fixed)
    counts = Counter(r.label for r in records if r.split in (None, "train"))
    small = {c: counts[c] for c in class_names if 0 < counts[c] < need}
    if not small:
        return None
    return (
        "too few images to split: "
        + ", ".join(f"class {k!r} has {v}" for k, v in sorted(small.items()))
        + f"; each class needs at least {need} (train"
        + (", val" if "val" not in fixed else "")
        + (", test" if "test" not in fixed else "")
        + "). Add images or remove the class."
    )


def check_classes(
    records: list[Record], class_names: list[str], source: str
) -> tuple[list[str], list[str]]:
    """Errors and warnings about the classes of ``records`` (the readable images).

    Errors: labels outside the class list, fewer than 2 classes, a class with no images
    (an empty class folder), a class that appears only in val/test (often a folder spelled
    differently there), a class too small to split. Warnings: a class missing from a fixed
    val/ or test/ folder, severe imbalance.
    """
    errors: list[str] = []
    warns: list[str] = []
    labels = {r.label for r in records}
    unknown = sorted(labels - set(class_names))
    if unknown:
        errors.append(f"labels {unknown} are not in the source's class list {class_names}")
    if len(class_names) < 2:
        errors.append(
            f"{source} has {len(class_names)} class"
            + (f" ({class_names[0]!r})" if class_names else "")
            + "; a classifier needs at least 2"
        )
    per_split: dict[str | None, Counter] = {}
    for r in records:
        per_split.setdefault(r.split, Counter())[r.label] += 1
    total = Counter(r.label for r in records)
    fixed = [s for s in SPLIT_NAMES if s in per_split]
    empty = [c for c in class_names if total[c] == 0]
    if empty:
        errors.append(
            f"class(es) {empty} have no usable images (an empty class folder, or every image "
            "in it unreadable); add images or remove the class"
        )
    train_pool = per_split.get("train", Counter()) + per_split.get(None, Counter())
    train_classes = [c for c in class_names if train_pool[c]]
    for cls in class_names:
        if total[cls] and not train_pool[cls]:
            where = ", ".join(f"{s}/ ({per_split[s][cls]})" for s in fixed if per_split[s][cls])
            same = [c for c in train_classes if c.lower() == cls.lower()]
            hint = f" (train/ has {same[0]!r})" if same else did_you_mean(cls, train_classes)
            errors.append(
                f"class {cls!r} appears only in {where}, never in train/{hint}; "
                "train/, val/ and test/ must use the same class folder names"
            )
    folded: dict[str, list[str]] = {}
    for cls in train_classes:
        folded.setdefault(cls.strip().lower(), []).append(cls)
    for same in folded.values():
        if len(same) > 1:
            warns.append(f"class names {same} differ only in case or spaces; they are separate")
    for split in ("val", "test"):
        if split in per_split:
            missing = [c for c in train_classes if not per_split[split][c]]
            if missing:
                warns.append(
                    f"class(es) {missing} have no images in {split}/; they are not scored there"
                )
    if not errors:
        shortfall = _split_shortfall(records, class_names)
        if shortfall:
            errors.append(shortfall)
    present = {c: total[c] for c in class_names if total[c]}
    if len(present) >= 2 and max(present.values()) >= IMBALANCE_RATIO * min(present.values()):
        warns.append(
            f"severe class imbalance: {present} (images per class); consider "
            '[search] metric = "balanced_accuracy" or "macro_f1"'
        )
    return errors, warns


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
    shortfall = _split_shortfall(records, class_names)
    if shortfall:
        raise DataError(shortfall)
    out = dict(fixed)
    if len(fixed["test"]) == 0:
        pool, out["test"] = _stratified(pool, labels, test_fraction, rng)
    if len(fixed["val"]) == 0:
        # val_fraction is of the whole dataset; rescale to what is left after the test split
        frac = val_fraction / max(1e-9, 1.0 - (test_fraction if len(fixed["test"]) == 0 else 0.0))
        pool, out["val"] = _stratified(pool, labels, min(frac, 0.9), rng)
    out["train"] = pool
    return out


def limit_per_class(
    splits: dict[str, np.ndarray], labels: np.ndarray, max_per_class: int, seed: int
) -> dict[str, np.ndarray]:
    """At most ``max_per_class`` images per class in train + val together (a few-label task).

    Each class keeps its train : val proportion (at least one of each); test is untouched.
    The images kept are a seeded sample, the same on every worker.
    """
    rng = np.random.default_rng([seed, max_per_class])
    out = dict(splits)
    kept: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for cls in np.unique(labels[np.concatenate([splits["train"], splits["val"]])]):
        members = {s: splits[s][labels[splits[s]] == cls] for s in ("train", "val")}
        n_train, n_val = len(members["train"]), len(members["val"])
        if n_train + n_val <= max_per_class:
            k_val = n_val
        else:
            k_val = int(round(max_per_class * n_val / (n_train + n_val)))
            k_val = min(n_val, max(1 if n_val else 0, k_val), max_per_class - 1)
        k = {"val": k_val, "train": min(n_train, max_per_class - k_val)}
        for s in ("train", "val"):
            kept[s].append(np.sort(rng.permutation(members[s])[: k[s]]))
    for s in ("train", "val"):
        out[s] = np.sort(np.concatenate(kept[s])) if kept[s] else splits[s]
    return out


def _split_hash(splits: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in SPLIT_NAMES:
        h.update(name.encode() + splits[name].astype(np.int64).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the decoded cache


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of this cache left by killed builds on this host (never used, only removed)."""
    host = socket.gethostname()
    prefix = f".{path.name}."
    for tmp in path.parent.glob(f"{prefix}*.tmp"):
        owner = tmp.name[len(prefix) :].rsplit(".", 2)[0]  # "<host>.<pid>"
        tmp_host, _, pid = owner.rpartition(".")
        if tmp_host == host and pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _open_cache(path: Path, n: int, image_size: int) -> tuple[np.ndarray, list] | None:
    """The finished cache at ``path``, or None when there is none (or it is not this one)."""
    meta_path = path.with_suffix(".json")
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if meta.get("version") != CACHE_VERSION or images.shape != (n, 3, image_size, image_size):
        return None
    return images, [tuple(b) for b in meta["bad"]]


def _build_cache(records: list[Record], image_size: int, path: Path) -> list[tuple[int, str]]:
    """Decode every record into ``path`` atomically; return (index, reason) for bad images.

    The images go to ``.<name>.<host>.<pid>.tmp`` and the sidecar to its own temporary file;
    both are renamed into place only after the last image is written and flushed, the
    sidecar first: a reader needs both, so a kill at any moment leaves no usable half cache.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    stem = f".{path.name}.{socket.gethostname()}.{os.getpid()}"
    tmp = path.with_name(f"{stem}.npy.tmp")
    meta_tmp = path.with_name(f"{stem}.json.tmp")
    log.info("decoding %d images at %d px into %s", len(records), image_size, path.parent)
    try:
        arr = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(records), 3, image_size, image_size)
        )
        bad = _decode_into(records, image_size, arr)
        arr.flush()
        del arr
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        meta = {"version": CACHE_VERSION, "bad": bad, "n": len(records)}
        meta_tmp.write_text(json.dumps(meta))
        os.replace(meta_tmp, path.with_suffix(".json"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)
    return [tuple(b) for b in bad]


def decoded_images(
    records: list[Record], image_size: int, cache_dir: Path | None
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """All records decoded at ``image_size`` and the (index, reason) of the unreadable ones.

    With ``cache_dir`` the result is the memory-mapped cache, built once per node.
    """
    if cache_dir is None:
        out = np.zeros((len(records), 3, image_size, image_size), np.uint8)
        return out, _decode_into(records, image_size, out)
    path = Path(cache_dir) / f"images-{_local_cache_key(records, image_size)}.npy"
    found = _open_cache(path, len(records), image_size)
    if found is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with node_lock(
            path.with_name(f".{path.stem}.lock"),
            "waiting for another process to finish decoding the image cache",
        ):
            found = _open_cache(path, len(records), image_size)  # another worker built it
            if found is None:
                _build_cache(records, image_size, path)
                found = _open_cache(path, len(records), image_size)
    if found is None:  # pragma: no cover - the build just wrote it
        raise DataError(f"the image cache {path} could not be read back after building it")
    return found


def _bad_images_error(source: str, problems: list[tuple[str, str]]) -> DataError:
    listing = "\n".join(f"  {p}: {why}" for p, why in problems[:50])
    more = f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""
    return DataError(
        f"{len(problems)} unreadable image(s) in {source}:\n{listing}{more}\n"
        'Fix or remove them, or set [data] on_bad_image = "skip" to leave them out.'
    )


def _classes_error(source: str, errors: list[str]) -> DataError:
    if len(errors) == 1:
        return DataError(errors[0])
    return DataError(
        f"{len(errors)} problems with the classes of {source}:\n"
        + "\n".join(f"  - {e}" for e in errors)
    )


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
    max_per_class: int | None = None,
) -> Splits:
    """Load a dataset source, check it, decode it once, and split it (stratified, seeded).

    Raises :class:`DataError` listing every unreadable file (unless ``on_bad_image="skip"``,
    which leaves them out and lists them in ``Splits.skipped``) and every class problem;
    warns about class imbalance and classes missing from a fixed val/ or test/ split.
    ``max_per_class`` keeps at most that many images per class in train + val together
    (:func:`limit_per_class`); test keeps all of its images.
    """
    dataset = load_dataset(registry, source, base_dir or Path.cwd())
    all_records = dataset.records
    images, bad = decoded_images(all_records, image_size, cache_dir)
    problems = list(dataset.problems) + [(str(all_records[i].image), why) for i, why in bad]
    if problems and on_bad_image == "error":
        raise _bad_images_error(source, problems)
    bad_idx = {i for i, _ in bad}
    keep = [i for i in range(len(all_records)) if i not in bad_idx]
    records = [all_records[i] for i in keep]
    # every label listed, so a class whose images are all unreadable is named, not dropped
    class_names = list(dataset.class_names or sorted({r.label for r in all_records}))
    errors, warns = check_classes(records, class_names, source)
    if errors:
        raise _classes_error(source, errors)
    for message in warns:
        warnings.warn(message, stacklevel=2)
    indices = assign_splits(records, class_names, val_fraction, test_fraction, seed)
    if max_per_class is not None:
        label_ids = np.array([class_names.index(r.label) for r in records], dtype=np.int64)
        indices = limit_per_class(indices, label_ids, max_per_class, seed)
    labels = torch.tensor([class_names.index(r.label) for r in records], dtype=torch.int64)
    keep_rows = np.asarray(keep, dtype=np.int64)
    per_image = 3 * image_size * image_size
    mapped = isinstance(images, np.memmap) and len(keep_rows) * per_image > in_memory_limit()
    if mapped:
        log.info(
            "decoded images (%.1f GB) stay memory-mapped; each batch reads its rows",
            len(keep_rows) * per_image / 1e9,
        )

    def make(idx: np.ndarray) -> Split:
        rows = keep_rows[idx]  # idx is sorted, so rows are too: a sequential read of the cache
        if mapped:
            x: torch.Tensor | CachedImages = CachedImages(images, rows)
        elif len(rows):
            x = torch.from_numpy(np.ascontiguousarray(images[rows]))
        else:
            x = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
        names = [
            f"#{row}" if isinstance(records[j].image, np.ndarray) else str(records[j].image)
            for j, row in zip(idx.tolist(), rows.tolist())
        ]
        return Split(x, labels[torch.from_numpy(idx)], names)

    return Splits(
        class_names=class_names,
        train=make(indices["train"]),
        val=make(indices["val"]),
        test=make(indices["test"]),
        image_size=image_size,
        fingerprint=fingerprint(records),
        split_hash=_split_hash(indices),
        skipped=problems,
        class_hashes=_class_hashes(records),
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
    # a split already on the device (automl_tl.train.on_device): index there, copy nothing
    resident = isinstance(split.x, torch.Tensor) and split.x.device.type != "cpu"
    if resident and order is not None:
        order = order.to(split.x.device)  # once per epoch, not once per step
    cuda = device.type == "cuda" and not resident
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


# ---------------------------------------------------------------------------------------------
# automl-tl check-data

#: a class name that is a character or a number, bare or after a word saying so ("7", "a",
#: "digit_3", "letter-B", "char 5"): its orientation is part of its identity
_GLYPH_CLASS = re.compile(
    r"(?:(?:digit|number|num|char|character|letter|glyph)[\s_\-]*)?(?:\d+|[^\W\d_])",
    re.IGNORECASE,
)


def looks_orientation_sensitive(class_names: list[str]) -> bool:
    """Whether every class names a digit, number or single character (``0``-``9``,
    ``digit_3``, ``A``): a mirrored or turned image of one may be another class (or none),
    so ``[data] orientation = "fixed"`` is the safe setting."""
    return len(class_names) >= 2 and all(_GLYPH_CLASS.fullmatch(c.strip()) for c in class_names)


ORIENTATION_SUGGESTION = (
    "the class names are digits or characters ({names}), whose orientation is part of the "
    'label (a mirrored 2 or a 6 turned into a 9); set [data] orientation = "fixed" so that '
    "no augmentation flips or turns them"
)


@dataclass
class DataCheck:
    """Everything :func:`check_source` found; ``usable`` when the data works as it is."""

    source: str
    class_names: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> readable images
    split_kind: str  # "fixed" (the source's own), "stratified", "mixed" or "not split"
    files: int
    bad: list[tuple[str, str]]
    modes: dict[str, int]
    formats: dict[str, int]
    sizes: dict[str, str]  # smallest / median / largest as "WxH"
    errors: list[str]
    warnings: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    #: settings the data suggests (``[data] orientation = "fixed"`` for digits, say)
    suggestions: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.errors and not self.bad

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "usable": self.usable,
            "files": self.files,
            "classes": self.class_names,
            "split": self.split_kind,
            "settings": self.settings,
            "counts": self.counts,
            "sizes": self.sizes,
            "modes": self.modes,
            "formats": self.formats,
            "bad_files": [{"path": p, "reason": r} for p, r in self.bad],
            "errors": self.errors,
            "warnings": self.warnings,
            "suggestions": self.suggestions,
        }


def check_source(
    registry: Registry,
    source: str,
    *,
    image_size: int = 32,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    base_dir: Path | None = None,
    orientation: str = "free",
) -> DataCheck:
    """Run every data check on ``source`` without training or writing anything.

    Every file is decoded (and discarded) to find the unreadable ones; the class checks run on
    the readable ones, and the split is the one a study with these settings would use.
    With ``orientation = "free"`` and classes that name digits or characters, it suggests
    ``"fixed"`` (:func:`looks_orientation_sensitive`).
    Raises :class:`DataError` only when the source cannot be listed at all.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_dataset(registry, source, base_dir or Path.cwd())
    warns = [str(w.message) for w in caught]
    records = dataset.records
    infos: list[dict] = []
    bad_idx = _decode_into(records, image_size, None, infos, desc="checking images")
    bad = list(dataset.problems) + [(str(records[i].image), why) for i, why in bad_idx]
    skip = {i for i, _ in bad_idx}
    good = [r for i, r in enumerate(records) if i not in skip]
    class_names = list(dataset.class_names or sorted({r.label for r in records}))
    errors, class_warns = check_classes(good, class_names, source)
    warns += class_warns
    fixed = {r.split for r in good}
    counts: dict[str, dict[str, int]] = {}
    split_kind = "not split"
    if not errors:
        indices = assign_splits(good, class_names, val_fraction, test_fraction, seed)
        for name in SPLIT_NAMES:
            counts[name] = dict(Counter(good[i].label for i in indices[name].tolist()))
        split_kind = (
            "fixed by the source"
            if fixed >= {"train", "val", "test"} and None not in fixed
            else ("stratified" if fixed <= {None} else "mixed: fixed where given, stratified")
        )
    else:
        for r in good:
            counts.setdefault(r.split or "unsplit", Counter())[r.label] += 1
        counts = {k: dict(v) for k, v in counts.items()}
    readable = [info for i, info in enumerate(infos) if i not in skip and info.get("size")]
    sizes: dict[str, str] = {}
    if readable:
        by_area = sorted(readable, key=lambda info: info["size"][0] * info["size"][1])
        as_text = [f"{info['size'][0]}x{info['size'][1]}" for info in by_area]
        sizes = {
            "smallest": as_text[0],
            "median": as_text[len(as_text) // 2],
            "largest": as_text[-1],
        }
    suggestions = []
    if orientation == "free" and looks_orientation_sensitive(class_names):
        shown = ", ".join(class_names[:5]) + (", …" if len(class_names) > 5 else "")
        suggestions.append(ORIENTATION_SUGGESTION.format(names=shown))
    modes = Counter(info.get("mode") for info in infos if info.get("mode"))
    formats = Counter(info.get("format") for info in infos if info.get("format"))
    return DataCheck(
        source=source,
        class_names=class_names,
        counts=counts,
        split_kind=split_kind,
        files=len(records) + len(dataset.problems),
        bad=bad,
        modes=dict(modes.most_common()),
        formats=dict(formats.most_common()),
        sizes=sizes,
        errors=errors,
        warnings=warns,
        settings={
            "image_size": image_size,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "orientation": orientation,
        },
        suggestions=suggestions,
    )


def load_splits(config, registry: Registry) -> Splits:
    """The splits of a study (:class:`automl_tl.config.StudyConfig`), decoded into its cache."""
    d = config.data
    return prepare_data(
        registry,
        d.source,
        image_size=d.image_size,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=d.seed,
        base_dir=config.base_dir,
        cache_dir=config.paths.cache,
        on_bad_image=d.on_bad_image,
        max_per_class=d.max_per_class,
    )
