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
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
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
from .errors import ConfigError, DataError, did_you_mean
from .registry import Registry
from .tasks import MULTICLASS, MultiLabel, Task

log = logging.getLogger("automl_tl")

#: Image file extensions read by the folder source and `predict` (matched case-insensitively).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CACHE_VERSION = 3  # 3: the sidecar holds each image's content digest
SPLIT_NAMES = ("train", "val", "test")
#: RGBA / LA / palette-with-transparency images are composited on this background (white).
ALPHA_BACKGROUND = (255, 255, 255)
#: Image modes decoded to RGB; others (LAB, HSV, …) would need colour management: bad files.
SUPPORTED_MODES = frozenset(
    {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "I", "F"}
    | {"I;16", "I;16B", "I;16L", "I;16N"}
)
#: A class with this many times the images of the smallest class is severe imbalance: a
#: warning, and trials answer it with the logit-adjusted loss (automl_tl/recipe.py)
IMBALANCE_RATIO = 5
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
    """Images ``x`` (N, 3, S, S) uint8 and labels ``y`` of one split: class indices (N,)
    int64, or for a multi-label task multi-hot rows (N, C) float32.

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
    #: identity of the images' contents (see :func:`content_fingerprint`); "" when unknown
    content_hash: str = ""
    content_class_hashes: dict[str, str] = field(default_factory=dict)
    #: the task kind (:mod:`automl_tl.tasks`): its targets, loss and metrics
    task: Task = MULTICLASS

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
            per_class = self.task.counts(getattr(self, s).y, len(self.class_names))
            counts[s] = {c: int(n) for c, n in zip(self.class_names, per_class.tolist())}
        return {
            "task": self.task.name,
            "classes": self.class_names,
            "sizes": {s: len(getattr(self, s)) for s in SPLIT_NAMES},
            "counts": counts,
            "class_hashes": self.class_hashes,
            "fingerprint": self.fingerprint,
            "split_hash": self.split_hash,
            "content": self.content_hash,
            "content_classes": self.content_class_hashes,
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
    old_content, new_content = stored.get("content"), current.get("content")
    if old_content and new_content and old_content != new_content and not changes:
        old_h = stored.get("content_classes") or {}
        new_h = current.get("content_classes") or {}
        touched = [c for c in new_classes if old_h.get(c) != new_h.get(c)]
        changes.append(
            f"the contents of images changed (same names and sizes) in class(es) {touched}"
        )
    if stored.get("split_hash") != current.get("split_hash") and not changes:
        changes.append("the train/val/test assignment changed ([data] seed or fractions)")
    return changes


def parse_source(source: str) -> tuple[str, str | None]:
    """``"folder:/data/pets"`` -> ``("folder", "/data/pets")``; ``"digits"`` -> ``("digits", None)``."""
    name, sep, argument = source.partition(":")
    return name, (argument if sep else None)


def load_dataset(
    registry: Registry, source: str, base_dir: Path, *, label_separator: str = " "
) -> Dataset:
    """The records of ``source``; ``label_separator`` goes to a source that reads
    multi-label cells (the csv source's ``load(..., label_separator=)``)."""
    import inspect

    name, argument = parse_source(source)
    dataset_source = registry.get("datasets", name)
    if dataset_source.needs_argument and not argument:
        raise DataError(f"[data] source {source!r} needs an argument: write it as '{name}:PATH'")
    takes_separator = "label_separator" in inspect.signature(dataset_source.load).parameters
    if takes_separator:
        return dataset_source.load(argument, base_dir, label_separator=label_separator)
    if label_separator != " ":
        raise DataError(
            f"[data] label_separator = {label_separator!r} has no effect on source {name!r} "
            "(it reads no labels cells); remove it"
        )
    return dataset_source.load(argument, base_dir)


def task_kind(records: list[Record]) -> str:
    """``"multilabel"`` when a record names its labels in ``labels``, else ``"multiclass"``."""
    return "multilabel" if any(r.labels for r in records) else "multiclass"


# ---------------------------------------------------------------------------------------------
# decoding


#: Image formats Pillow may open (by content; the file name does not decide): the formats of
#: :data:`IMAGE_SUFFIXES`. Anything else (EPS, which runs Ghostscript; PDF; exotic decoders)
#: is "not an image", whatever its name.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "GIF", "WEBP", "TIFF")  # JPEG: also MPO
#: Environment variable: the largest image (in pixels) decoded; default Pillow's warning limit.
MAX_PIXELS_ENV = "AUTOML_TL_MAX_IMAGE_PIXELS"
#: Rows of a high-bit-depth image converted at a time (bounds the temporary memory).
_CONVERT_PIXELS = 1 << 20


def max_image_pixels() -> int | None:
    """The largest image decoded, in pixels: ``AUTOML_TL_MAX_IMAGE_PIXELS`` if set, else
    Pillow's ``Image.MAX_IMAGE_PIXELS`` (about 89 MP; None: no limit)."""
    from PIL import Image

    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw:
        try:
            return int(float(raw))
        except ValueError:
            raise DataError(f"{MAX_PIXELS_ENV}={raw!r} is not a number of pixels") from None
    return Image.MAX_IMAGE_PIXELS


def _to_8bit(img):
    """High-bit-depth grayscale (I;16, I, F) -> 8-bit by the mode's real range, not clipping.

    Converted a block of rows at a time in integer (16-bit data) or float32 arithmetic, so a
    large 16-bit image costs a few bytes per pixel, not the five float64 copies it used to.
    """
    from PIL import Image

    arr = np.asarray(img)
    out = np.empty(arr.shape, dtype=np.uint8)
    rows = max(1, _CONVERT_PIXELS // max(1, arr.shape[1] if arr.ndim > 1 else 1))
    sixteen = img.mode.startswith("I;16") or arr.dtype == np.uint16
    if img.mode == "I" and arr.size:
        low, hi = int(arr.min()), int(arr.max())
        # 32-bit containers usually hold 16-bit data (PNG loads 16-bit as "I").
        sixteen = low >= 0 and 255 < hi <= 65535
        scale = 65535.0 if hi > 255 else 255.0
    elif img.mode == "F" and arr.size:
        hi = float(np.nanmax(arr)) if not np.isnan(arr).all() else 0.0
        scale = 1.0 if hi <= 1.0 else (65535.0 if hi > 255 else 255.0)
    else:
        scale = 255.0
    for start in range(0, arr.shape[0], rows):
        block = arr[start : start + rows]
        if sixteen:  # round(v * 255 / 65535) exactly, in integers
            wide = block.astype(np.uint32)
            wide *= 255
            wide += 32767
            wide //= 65535
            out[start : start + rows] = wide
        else:
            f = block.astype(np.float32)
            np.nan_to_num(f, copy=False, nan=0.0)
            f *= 255.0 / scale
            np.clip(f, 0, 255, out=f)
            np.rint(f, out=f)
            out[start : start + rows] = f
    return Image.fromarray(out, mode="L")


def _digest(data: bytes | np.ndarray) -> str:
    """The content identity of one image: the sha256 of its file's bytes (or array)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def decode_image(
    image: str | Path | np.ndarray, size: int, *, info: dict[str, Any] | None = None
) -> np.ndarray:
    """Decode one image to ``(3, size, size)`` uint8 RGB.

    Applies EXIF orientation; converts grayscale, palette, CMYK and 16-bit images (by their
    real range, so a 16-bit image does not come out white); composites transparency on
    :data:`ALPHA_BACKGROUND`; resizes (bicubic, antialiased) to a square. Large JPEGs are
    decoded at a reduced scale first (never below ``size``). ``info``, when given, receives
    the file's ``format``, ``mode``, ``size`` (width, height) and ``sha256`` (of its bytes,
    read once for both: the data identity costs no second read).

    Only the formats of :data:`IMAGE_FORMATS` are opened, and images over
    :func:`max_image_pixels` are refused before they are decoded. Raises whatever PIL raises
    for an unreadable file, and :class:`DataError` for an unsupported mode or a too large image.
    """
    from PIL import Image, ImageOps

    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise DataError(f"in-memory image has dtype {arr.dtype}; expected uint8")
        img = Image.fromarray(arr if arr.ndim == 2 or arr.shape[-1] in (3, 4) else arr.squeeze())
        if info is not None:
            info.update(format="array", mode=img.mode, size=img.size, sha256=_digest(arr))
    else:
        data = Path(image).read_bytes()
        if info is not None:
            info["sha256"] = _digest(data)
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as opened:
            if info is not None:
                info.update(format=opened.format, mode=opened.mode, size=opened.size)
            limit = max_image_pixels()
            width, height = opened.size
            if limit is not None and width * height > limit:
                raise DataError(
                    f"image too large: {width}x{height} = {width * height / 1e6:.0f} MP (limit "
                    f"{limit / 1e6:.0f} MP); downscale it, or raise {MAX_PIXELS_ENV}"
                )
            if opened.format == "JPEG":
                opened.draft(None, (size, size))  # DCT scaling: a 24 MP photo decodes fast
            opened.load()
            img = ImageOps.exif_transpose(opened) or opened
            img = img.copy() if img is opened else img
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
    hashes: list[str] | None = None,
) -> list[tuple[int, str]]:
    """Decode every record into ``out[i]`` (or only check it when ``out`` is None); append
    each record's content digest to ``hashes`` ("" where the file cannot be read)."""
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
        if hashes is not None:
            hashes.append(info.get("sha256", ""))
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
        h.update(_encode(f"{_record_identity(r, root)}|{r.label_text}|{r.split or ''}\n"))
    return h.hexdigest()


def _encode(text: str) -> bytes:
    """UTF-8, keeping the undecodable bytes of a non-UTF-8 file name as they are on disk."""
    return text.encode("utf-8", "surrogateescape")


def content_fingerprint(records: list[Record], hashes: list[str]) -> tuple[str, dict[str, str]]:
    """A hash of every image's content digest with its relative path, label and split, and
    the same per class: a same-size edit of one image changes it (:func:`fingerprint`,
    paths and sizes only, does not see it). ``hashes`` come from decoding
    (:func:`decoded_images`), which reads every byte anyway."""
    root = _common_root(records)
    whole = hashlib.sha256()
    per_class: dict[str, Any] = {}
    for r, digest in zip(records, hashes):
        line = _encode(f"{_record_identity(r, root)}|{digest}|{r.label_text}|{r.split or ''}\n")
        whole.update(line)
        for label in r.label_set:
            per_class.setdefault(label, hashlib.sha256()).update(line)
    return whole.hexdigest(), {c: h.hexdigest()[:12] for c, h in sorted(per_class.items())}


def record_digests(
    records: list[Record], image_size: int | None = None, cache_dir: Path | None = None
) -> list[str]:
    """Each record's content digest (as :func:`decode_image` takes it): from the decoded
    cache's sidecar when one holds these exact files at ``image_size`` (no file is read),
    else by reading every file ("" for a file that cannot be read)."""
    if cache_dir is not None and image_size:
        path = Path(cache_dir) / f"images-{_local_cache_key(records, image_size)}.npy"
        found = _open_cache(path, len(records), image_size)
        if found is not None and len(found[2]) == len(records):
            return found[2]
    digests = []
    for r in records:
        if isinstance(r.image, np.ndarray):
            digests.append(_digest(r.image))
            continue
        h = hashlib.sha256()
        try:
            with open(r.image, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            digests.append("")
            continue
        digests.append(h.hexdigest()[:32])
    return digests


def _class_hashes(records: list[Record]) -> dict[str, str]:
    """A short fingerprint per class, so a changed dataset can say which classes changed."""
    root = _common_root(records)
    hashes: dict[str, Any] = {}
    for r in records:
        for label in r.label_set:
            h = hashes.setdefault(label, hashlib.sha256())
            h.update(_encode(f"{_record_identity(r, root)}|{r.split or ''}\n"))
    return {label: h.hexdigest()[:12] for label, h in sorted(hashes.items())}


def _local_cache_key(records: list[Record], image_size: int) -> str:
    """Like :func:`fingerprint` plus mtimes: a cache is valid only for these exact files."""
    h = hashlib.sha256(_encode(f"v{CACHE_VERSION}|{image_size}|{fingerprint(records)}"))
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
            f"severe class imbalance: {present} (images per class); trials train with a "
            "logit-adjusted loss (Menon et al. 2021) unless [search] imbalance says otherwise, "
            'and accuracy hides the small classes: consider [search] metric = "balanced_accuracy" or "macro_f1"'
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
    if len(fixed["val"]) == 0 or len(fixed["test"]) == 0:
        trained = set(labels[pool].tolist())
        held = sorted({int(c) for c in labels[np.concatenate([out["val"], out["test"]])]})
        starved = [class_names[c] for c in held if c not in trained]
        if starved:
            raise DataError(
                f"class(es) {starved} have no training image left after the val and test splits "
                f"(val_fraction {val_fraction}, test_fraction {test_fraction}); lower the "
                "fractions or add images"
            )
    return out


def check_labels(
    records: list[Record], class_names: list[str], source: str
) -> tuple[list[str], list[str]]:
    """The multi-label counterpart of :func:`check_classes` (a record counts for each of its
    labels). Errors: labels outside the label list, fewer than 2 labels, a label no image
    has, a label only in val/test, a label on too few images to reach train, val and test.
    Warnings: a label missing from a fixed val/ or test/ split."""
    errors: list[str] = []
    warns: list[str] = []
    per_split: dict[str | None, Counter] = {}
    for r in records:
        per_split.setdefault(r.split, Counter()).update(r.label_set)
    total = sum(per_split.values(), Counter())
    unknown = sorted(set(total) - set(class_names))
    if unknown:
        errors.append(f"labels {unknown} are not in the source's label list {class_names}")
    if len(class_names) < 2:
        errors.append(
            f"{source} has {len(class_names)} label(s); a multi-label classifier needs at least 2"
        )
    empty = [c for c in class_names if total[c] == 0]
    if empty:
        errors.append(f"label(s) {empty} are on no usable image; add images or remove the label")
    pool = per_split.get("train", Counter()) + per_split.get(None, Counter())
    only_held_out = [c for c in class_names if total[c] and not pool[c]]
    if only_held_out:
        errors.append(
            f"label(s) {only_held_out} appear only in val/test rows, never in train; every "
            "label needs training images"
        )
    fixed = {s for s in SPLIT_NAMES if s in per_split}
    need = 1 + ("val" not in fixed) + ("test" not in fixed)
    small = {c: pool[c] for c in class_names if 0 < pool[c] < need}
    if small and not only_held_out:
        where = (
            "train"
            + (", val" if "val" not in fixed else "")
            + (", test" if "test" not in fixed else "")
        )
        errors.append(
            "too few images to split: "
            + ", ".join(
                f"label {k!r} appears in only {v} image{'s' if v > 1 else ''}"
                for k, v in sorted(small.items())
            )
            + f"; each label needs at least {need} ({where}). Add images with it or remove "
            "the label"
        )
    for split in ("val", "test"):
        if split in per_split:
            missing = [c for c in class_names if pool[c] and not per_split[split][c]]
            if missing:
                warns.append(
                    f"label(s) {missing} are on no image of the fixed {split} split; they are "
                    "not scored there"
                )
    return errors, warns


def _iterative_split(
    indices: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rest, taken): ``fraction`` of ``indices`` taken by iterative stratification
    (Sechidis et al., 2011, as the ``iterative-stratification`` package implements it), so
    each label's share of the taken images follows ``fraction``."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    splitter = MultilabelStratifiedShuffleSplit(
        n_splits=1, test_size=fraction, random_state=int(seed) % 2**32
    )
    rest, taken = next(splitter.split(np.zeros(len(indices)), y[indices].astype(np.int64)))
    return np.sort(indices[rest]), np.sort(indices[taken])


def assign_multilabel_splits(
    records: list[Record],
    targets: np.ndarray,
    class_names: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Indices of train / val / test for multi-hot ``targets``: the source's own splits where
    it has them, else iterative stratification, seeded; a label seen in val or test that no
    training image has is an error, a label missing from val or test a warning."""
    fixed = {
        s: np.array([i for i, r in enumerate(records) if r.split == s], dtype=np.int64)
        for s in SPLIT_NAMES
    }
    unassigned = np.array([i for i, r in enumerate(records) if r.split is None], dtype=np.int64)
    pool = np.sort(np.concatenate([fixed["train"], unassigned]))
    out = dict(fixed)
    if len(fixed["test"]) == 0:
        pool, out["test"] = _iterative_split(pool, targets, test_fraction, seed)
    if len(fixed["val"]) == 0:
        frac = val_fraction / max(1e-9, 1.0 - (test_fraction if len(fixed["test"]) == 0 else 0.0))
        pool, out["val"] = _iterative_split(pool, targets, min(frac, 0.9), seed + 1)
    out["train"] = pool
    trained = targets[pool].sum(0) > 0
    held = targets[np.concatenate([out["val"], out["test"]])].sum(0) > 0
    starved = [class_names[c] for c in np.flatnonzero(held & ~trained)]
    if starved:
        raise DataError(
            f"label(s) {starved} have no training image left after the val and test splits "
            f"(val_fraction {val_fraction}, test_fraction {test_fraction}); lower the "
            "fractions or add images"
        )
    for name in ("val", "test"):
        missing = [
            class_names[c] for c in np.flatnonzero(trained & (targets[out[name]].sum(0) == 0))
        ]
        if missing:
            warnings.warn(
                f"label(s) {missing} are on no {name} image after the split; they are not "
                f"scored on {name} (add images with them)",
                stacklevel=3,
            )
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


def _remove_stale_temporaries(path: Path, *, dry_run: bool = False) -> list[Path]:
    """Temporary files of this cache left by killed builds on this host (never used, only
    removed); returns them."""
    host = socket.gethostname()
    prefix = f".{path.name}."
    stale = []
    for tmp in path.parent.glob(f"{prefix}*.tmp"):
        owner = tmp.name[len(prefix) :].rsplit(".", 3)[0]  # "<host>.<pid>"(.<random>.npy.tmp)
        tmp_host, _, pid = owner.rpartition(".")
        if tmp_host == host and pid.isdigit() and not pid_alive(int(pid)):
            stale.append(tmp)
            if not dry_run:
                tmp.unlink(missing_ok=True)
    return stale


def cache_file(records: list[Record], image_size: int, cache_dir: Path) -> Path:
    """The decoded cache ``records`` at ``image_size`` use in ``cache_dir``."""
    return Path(cache_dir) / f"images-{_local_cache_key(records, image_size)}.npy"


def stale_cache_files(cache_dir: Path, in_use: set[Path], *, dry_run: bool = False) -> list[Path]:
    """Decoded caches in ``cache_dir`` (and their sidecars and locks) that none of ``in_use``
    is, plus temporaries of builds killed on this host; removed unless ``dry_run``. A cache
    being built right now (its lock held) is left alone."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    keep = {p.name for p in in_use}
    stale: list[Path] = []
    for npy in sorted(cache_dir.glob("images-*.npy")):
        stale += _remove_stale_temporaries(npy, dry_run=dry_run)
        if npy.name in keep:
            continue
        lock = npy.with_name(f".{npy.stem}.lock")
        try:
            with node_lock(lock, block=False):
                for f in (npy, npy.with_suffix(".json")):
                    if f.exists():
                        stale.append(f)
                        if not dry_run:
                            f.unlink(missing_ok=True)
                if not dry_run:
                    lock.unlink(missing_ok=True)  # its cache is gone: nobody waits on it
        except BlockingIOError:
            continue  # another process is building or reading it now
    return stale


def _open_cache(path: Path, n: int, image_size: int) -> tuple[np.ndarray, list, list] | None:
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
    return images, [tuple(b) for b in meta["bad"]], list(meta.get("hashes") or [""] * n)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _allocate_cache(tmp: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new ``.npy`` file at ``tmp`` with every block of its data allocated on disk.

    A sparse file would get its blocks only as rows are written through the memory map, and
    a full disk then kills the process with SIGBUS ("Bus error") and no message; allocated
    up front, a full disk is one clear error before anything is decoded. The file is created
    exclusively and never through a symbolic link.
    """
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
    header["shape"] = shape
    nbytes = int(np.prod(shape))
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW
    fd = os.open(tmp, flags, 0o644)
    with os.fdopen(fd, "wb+") as f:
        np.lib.format.write_array_header_1_0(f, header)
        offset = f.tell()
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, offset + nbytes)
            else:  # pragma: no cover - macOS, Windows: sparse, as before
                f.truncate(offset + nbytes)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                f.truncate(offset + nbytes)  # a filesystem that cannot preallocate
            else:
                tmp.unlink(missing_ok=True)
                raise DataError(_no_room_message(tmp.parent, offset + nbytes, exc)) from exc
    return np.memmap(tmp, dtype=np.uint8, mode="r+", offset=offset, shape=shape)


def _no_room_message(folder: Path, nbytes: int, exc: OSError) -> str:
    try:
        free = f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free"
    except OSError:
        free = "free space unknown"
    size = f" ({nbytes / 1e9:.2f} GB)" if nbytes >= 1e9 else f" ({nbytes / 1e6:.1f} MB)"
    size = size if nbytes else ""
    return (
        f"cannot write the decoded image cache{size} in {folder}: "
        f"{exc.strerror or exc} ({free}). Free disk space, lower [data] image_size, or point "
        "[search] output at a larger disk"
    )


def _build_cache(records: list[Record], image_size: int, path: Path) -> None:
    """Decode every record into ``path`` atomically, with the bad images and every image's
    content digest in the ``.json`` sidecar.

    The images go to ``.<name>.<host>.<pid>.<random>.npy.tmp`` and the sidecar to its own
    temporary file (both created exclusively, never through a symbolic link); both are
    renamed into place only after the last image is written and flushed, the sidecar first:
    a reader needs both, so a kill at any moment leaves no usable half cache. The image file
    is allocated in full first, so a full disk is a clear error, not a "Bus error".
    """
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    stem = f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(6)}"
    tmp = path.with_name(f"{stem}.npy.tmp")
    meta_tmp = path.with_name(f"{stem}.json.tmp")
    log.info("decoding %d images at %d px into %s", len(records), image_size, path.parent)
    try:
        arr = _allocate_cache(tmp, (len(records), 3, image_size, image_size))
        hashes: list[str] = []
        bad = _decode_into(records, image_size, arr, hashes=hashes)
        arr.flush()
        del arr
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        meta = {"version": CACHE_VERSION, "bad": bad, "n": len(records), "hashes": hashes}
        fd = os.open(meta_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        os.replace(meta_tmp, path.with_suffix(".json"))
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DataError(_no_room_message(path.parent, 0, exc)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)


def decoded_images(
    records: list[Record], image_size: int, cache_dir: Path | None
) -> tuple[np.ndarray, list[tuple[int, str]], list[str]]:
    """All records decoded at ``image_size``, the (index, reason) of the unreadable ones and
    each record's content digest (the sha256 of its bytes, taken while decoding).

    With ``cache_dir`` the result is the memory-mapped cache, built once per node.
    """
    if cache_dir is None:
        out = np.zeros((len(records), 3, image_size, image_size), np.uint8)
        hashes: list[str] = []
        return out, _decode_into(records, image_size, out, hashes=hashes), hashes
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
    task: Task = MULTICLASS,
    label_separator: str = " ",
    dataset: Dataset | None = None,
) -> Splits:
    """Load a dataset source, check it, decode it once, and split it (stratified, seeded).

    A multi-label ``task`` (:class:`automl_tl.tasks.MultiLabel`) takes records with several
    labels: targets are multi-hot rows, the split is iterative stratification
    (:func:`assign_multilabel_splits`) and the checks are per label (:func:`check_labels`).
    ``dataset``: the source's records when the caller already listed them.

    Raises :class:`DataError` listing every unreadable file (unless ``on_bad_image="skip"``,
    which leaves them out and lists them in ``Splits.skipped``) and every class problem;
    warns about class imbalance and classes missing from a fixed val/ or test/ split.
    ``max_per_class`` keeps at most that many images per class in train + val together
    (:func:`limit_per_class`); test keeps all of its images.
    """
    if dataset is None:
        dataset = load_dataset(
            registry, source, base_dir or Path.cwd(), label_separator=label_separator
        )
    all_records = dataset.records
    if task_kind(all_records) == "multilabel" and not task.multilabel:
        raise DataError(
            f"{source} gives several labels per image (multi-label records); set "
            '[data] task = "multilabel"'
        )
    if task.multilabel and max_per_class is not None:
        raise DataError(
            "[data] max_per_class caps images per class, which a multi-label split cannot "
            "keep (an image has several labels); remove it for a multi-label study"
        )
    images, bad, all_hashes = decoded_images(all_records, image_size, cache_dir)
    problems = list(dataset.problems) + [(str(all_records[i].image), why) for i, why in bad]
    if problems and on_bad_image == "error":
        raise _bad_images_error(source, problems)
    bad_idx = {i for i, _ in bad}
    keep = [i for i in range(len(all_records)) if i not in bad_idx]
    records = [all_records[i] for i in keep]
    hashes = [all_hashes[i] for i in keep]
    # every label listed, so a class whose images are all unreadable is named, not dropped
    class_names = list(
        dataset.class_names or sorted({label for r in all_records for label in r.label_set})
    )
    checks = check_labels if task.multilabel else check_classes
    errors, warns = checks(records, class_names, source)
    if errors:
        raise _classes_error(source, errors)
    for message in warns:
        warnings.warn(message, stacklevel=2)
    labels = task.targets([r.label_set for r in records], class_names)
    if task.multilabel:
        indices = assign_multilabel_splits(
            records, labels.numpy(), class_names, val_fraction, test_fraction, seed
        )
    else:
        indices = assign_splits(records, class_names, val_fraction, test_fraction, seed)
    if max_per_class is not None:
        label_ids = np.array([class_names.index(r.label) for r in records], dtype=np.int64)
        indices = limit_per_class(indices, label_ids, max_per_class, seed)
    leak = _copies_across_splits(records, hashes, indices)
    if leak:
        warnings.warn(leak, stacklevel=2)
    content_hash, content_classes = content_fingerprint(records, hashes)
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
        content_hash=content_hash,
        content_class_hashes=content_classes,
        task=task,
    )


def _copies_across_splits(
    records: list[Record], hashes: list[str], indices: dict[str, np.ndarray]
) -> str | None:
    """A warning when byte-identical images sit in different splits (a copy of a training
    image in val or test inflates its score), naming a few; None when there are none."""
    split_of = {int(i): name for name in SPLIT_NAMES for i in indices[name]}
    seen: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    for i in sorted(split_of):
        digest = hashes[i]
        if not digest:
            continue
        first = seen.setdefault(digest, i)
        if first != i and split_of[first] != split_of[i]:
            pairs.append((first, i))
    if not pairs:
        return None

    def name(i: int) -> str:
        image = records[i].image
        return f"#{i}" if isinstance(image, np.ndarray) else str(image)

    shown = ", ".join(
        f"{name(a)} ({split_of[a]}) = {name(b)} ({split_of[b]})" for a, b in pairs[:3]
    )
    more = f", … ({len(pairs)} in all)" if len(pairs) > 3 else ""
    return (
        f"{len(pairs)} image(s) are byte-identical copies of images in another split: "
        f"{shown}{more}; the copies inflate the val/test score: remove them"
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
    label_separator: str = " ",
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
        dataset = load_dataset(
            registry, source, base_dir or Path.cwd(), label_separator=label_separator
        )
    warns = [str(w.message) for w in caught]
    records = dataset.records
    infos: list[dict] = []
    hashes: list[str] = []
    bad_idx = _decode_into(records, image_size, None, infos, desc="checking images", hashes=hashes)
    bad = list(dataset.problems) + [(str(records[i].image), why) for i, why in bad_idx]
    skip = {i for i, _ in bad_idx}
    good = [r for i, r in enumerate(records) if i not in skip]
    good_hashes = [h for i, h in enumerate(hashes) if i not in skip]
    class_names = list(
        dataset.class_names or sorted({label for r in records for label in r.label_set})
    )
    multilabel = task_kind(records) == "multilabel"
    errors, class_warns = (check_labels if multilabel else check_classes)(good, class_names, source)
    warns += class_warns
    fixed = {r.split for r in good}
    counts: dict[str, dict[str, int]] = {}
    split_kind = "not split"
    if not errors:
        if multilabel:
            targets = MultiLabel().targets([r.label_set for r in good], class_names).numpy()
            with warnings.catch_warnings(record=True) as split_warnings:
                warnings.simplefilter("always")
                indices = assign_multilabel_splits(
                    good, targets, class_names, val_fraction, test_fraction, seed
                )
            warns += [str(w.message) for w in split_warnings]
        else:
            indices = assign_splits(good, class_names, val_fraction, test_fraction, seed)
        for name in SPLIT_NAMES:
            counts[name] = dict(
                Counter(label for i in indices[name].tolist() for label in good[i].label_set)
            )
        leak = _copies_across_splits(good, good_hashes, indices)  # the split a study would use
        if leak:
            warns.append(leak)
        split_kind = (
            "fixed by the source"
            if fixed >= {"train", "val", "test"} and None not in fixed
            else ("stratified" if fixed <= {None} else "mixed: fixed where given, stratified")
        )
    else:
        for r in good:
            counts.setdefault(r.split or "unsplit", Counter()).update(r.label_set)
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
            "task": "multilabel" if multilabel else "multiclass",
        },
        suggestions=suggestions,
    )


def load_splits(config, registry: Registry, image_size: int | None = None) -> Splits:
    """The splits of a study (:class:`automl_tl.config.StudyConfig`), decoded into its cache
    (at ``image_size``, one of a searched ``[data] image_size``; default: the study's).

    The task kind is the study file's (a CSV with a labels column is multi-label by
    itself, :func:`automl_tl.config.csv_is_multilabel`); a source that gives several labels
    per image to a multiclass study is refused, naming the key to set.
    """
    d = config.data
    dataset = load_dataset(registry, d.source, config.base_dir, label_separator=d.label_separator)
    if image_size is None and config.task.multilabel and not config.sets("data.task"):
        log.info(
            '%s is multi-label (several labels per image): [data] task = "multilabel", '
            "searched by %s",
            d.source,
            config.search.metric,
        )
    return prepare_data(
        registry,
        d.source,
        image_size=image_size or d.image_size,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=d.seed,
        base_dir=config.base_dir,
        cache_dir=config.paths.cache,
        on_bad_image=d.on_bad_image,
        max_per_class=d.max_per_class,
        task=config.task,
        dataset=dataset,
    )


_SIZED: dict[tuple, Splits] = {}


def splits_at(config, registry: Registry, splits: Splits, image_size: int | None) -> Splits:
    """``splits`` decoded at ``image_size`` (a trial's searched size): the same images and
    split, from the study's cache for that size (built once, shared by workers like any
    cache); kept per process. ``splits`` itself for its own size or None."""
    if image_size is None or image_size == splits.image_size:
        return splits
    key = (str(config.paths.cache), splits.fingerprint, splits.split_hash, image_size)
    if key not in _SIZED:
        _SIZED[key] = load_splits(config, registry, image_size=image_size)
    return _SIZED[key]


def check_image_sizes(config, splits: Splits) -> None:
    """Several searched sizes whose decoded caches together exceed what a process keeps in
    memory (:func:`in_memory_limit`) are refused before anything trains."""
    sizes = config.data.sizes
    if len(sizes) < 2:
        return  # one size: a split too large for memory is memory-mapped, as always
    n = len(splits.train) + len(splits.val) + len(splits.test)
    total = sum(n * 3 * s * s for s in sizes)
    limit = in_memory_limit()
    if total > limit:
        mb = 1024**2
        raise ConfigError(
            f"[data] image_size = {sizes}: the {n} images decoded at every size take "
            f"{total / mb:,.0f} MB together, more than the {limit / mb:,.0f} MB a process keeps "
            f"in memory ({IN_MEMORY_ENV}, default the smaller of 2 GiB and a quarter of RAM); "
            f"search fewer or smaller sizes, or raise {IN_MEMORY_ENV}"
        )
