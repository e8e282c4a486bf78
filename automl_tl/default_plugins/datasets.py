"""Dataset sources: the embedded ``digits`` and ``digit_pairs``, ``folder:PATH`` and ``csv:PATH``."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np

from automl_tl import hookimpl
from automl_tl.components import Dataset, DatasetSource, Record
from automl_tl.data import IMAGE_SUFFIXES
from automl_tl.errors import DataError

SPLITS = ("train", "val", "test")
#: Environment variable: "1" follows symbolic links that lead out of a dataset folder.
FOLLOW_SYMLINKS_ENV = "AUTOML_TL_FOLLOW_SYMLINKS"
#: Files that mark a folder as a study's output (``[search] output``), never a class.
STUDY_OUTPUT_MARKERS = ("catalog.db", "optuna.db", "optuna-journal.log")


def _follow_links() -> bool:
    return os.environ.get(FOLLOW_SYMLINKS_ENV, "") not in ("", "0")


def _outside(path: Path, root: Path) -> bool:
    """Whether ``path`` (after its symbolic links) lies outside ``root`` (already resolved)."""
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return True
    return False


def _link_escapes(path: Path, root: Path) -> str | None:
    """Why ``path`` must not be read: a link out of ``root``; None when it may be."""
    if _follow_links() or not _outside(path, root):
        return None
    return (
        f"symbolic link to {path.resolve()}, outside the dataset folder {root}; copy it in, "
        f"or set {FOLLOW_SYMLINKS_ENV}=1 to follow links"
    )


def _hidden(path: Path) -> bool:
    """Dot files and folders (.ipynb_checkpoints, .DS_Store, ._x.jpg) and OS litter."""
    return path.name.startswith(".") or path.name in ("__MACOSX", "@eaDir", "Thumbs.db")


def _resolve(argument: str | None, base_dir: Path, what: str) -> Path:
    if not argument:
        raise DataError(f"{what} needs a path: write it as '{what}:PATH'")
    path = Path(argument).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.exists():
        raise DataError(f"{what} path {path} does not exist; fix [data] source")
    return path


class Digits(DatasetSource):
    """scikit-learn's 1,797 handwritten digits (8×8 grayscale), shipped with the package."""

    name = "digits"
    description = "scikit-learn's handwritten digits (embedded, no download)"

    def load(self, argument, base_dir):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
        classes = [str(c) for c in range(10)]
        if argument:  # "digits:0-4" keeps a subset of classes, e.g. for a source task
            classes = _digit_subset(argument)
        keep = set(classes)
        records = [
            Record(image=img, label=str(int(t)))
            for img, t in zip(images, bunch.target)
            if str(int(t)) in keep
        ]
        return Dataset(records=records, class_names=classes)


def _digit_subset(argument: str) -> list[str]:
    try:
        if "-" in argument:
            lo, hi = (int(v) for v in argument.split("-"))
            digits = list(range(lo, hi + 1))
        else:
            digits = [int(v) for v in argument.split(",")]
    except ValueError:
        digits = []
    if not digits or any(d < 0 or d > 9 for d in digits):
        raise DataError(
            f"digits:{argument} is not a digit range; write e.g. 'digits:0-4' or 'digits:5,7'"
        )
    return [str(d) for d in digits]


class DigitPairs(DatasetSource):
    """The embedded multi-label demo: scikit-learn's digits placed side by side.

    ``digit_pairs``: 1,200 images of 16×16, two slots side by side, each holding a digit
    (probability 0.8, at least one per image); the labels are the digits present (one or
    two). ``digit_pairs:hard``: a 2×2 grid of slots (each filled with probability 0.5), so
    up to four labels per image, with noise added. Built from a fixed seed: the same images
    everywhere.
    """

    name = "digit_pairs"
    description = "digits side by side, labelled with the digits present (embedded, multi-label)"
    #: (images, slots (rows, columns), probability a slot holds a digit, noise std)
    VARIANTS = {"": (1200, (1, 2), 0.8, 0.0), "hard": (1600, (2, 2), 0.5, 24.0)}

    def load(self, argument, base_dir):
        from sklearn.datasets import load_digits

        if (argument or "") not in self.VARIANTS:
            raise DataError(
                f"digit_pairs:{argument} is not a variant; write 'digit_pairs' or "
                "'digit_pairs:hard'"
            )
        count, (rows, cols), fill, noise = self.VARIANTS[argument or ""]
        bunch = load_digits()
        digits = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
        rng = np.random.default_rng(20111)
        records, seen = [], set()
        while len(records) < count:
            filled = rng.random(rows * cols) < fill
            if not filled.any():
                filled[rng.integers(rows * cols)] = True
            canvas = np.zeros((16, 16), dtype=np.float64)
            labels = set()
            for slot in np.flatnonzero(filled):
                pick = int(rng.integers(len(digits)))
                r, c = divmod(int(slot), cols)
                top = 4 if rows == 1 else 8 * r
                canvas[top : top + 8, 8 * c : 8 * c + 8] = digits[pick]
                labels.add(str(int(bunch.target[pick])))
            if noise:
                canvas += rng.normal(0.0, noise, canvas.shape)
            image = np.clip(canvas, 0, 255).round().astype(np.uint8)
            if image.tobytes() in seen:  # a copy would sit in two splits: draw again
                continue
            seen.add(image.tobytes())
            records.append(Record(image=image, labels=tuple(sorted(labels))))
        return Dataset(records=records, class_names=[str(d) for d in range(10)])


def _is_study_output(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in STUDY_OUTPUT_MARKERS)


def _class_folders(root: Path, real_root: Path | None = None) -> list[Path]:
    """Class folders of ``root``: not hidden, not a study's output folder (its report/ holds
    PNGs), and, unless links are followed, not a symbolic link out of ``real_root``."""
    folders = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or _hidden(p):
            continue
        if _is_study_output(p):
            warnings.warn(
                f"ignored {p}: it is a study's output folder, not a class "
                "(put [search] output outside the dataset folder)",
                stacklevel=3,
            )
            continue
        why = _link_escapes(p, real_root) if real_root is not None else None
        if why:
            raise DataError(f"class folder {p} is a {why}")
        folders.append(p)
    return folders


def _files_in(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``folder``, recursively, hidden ones left out.

    Image files are recognised by extension, case-insensitively (``.JPG``, ``.Png``).
    """
    images, others = [], []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(_hidden(Path(part)) for part in p.relative_to(folder).parts):
            continue
        (images if p.suffix.lower() in IMAGE_SUFFIXES else others).append(p)
    return images, others


def _images_in(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, skipping hidden files and folders."""
    return _files_in(folder)[0]


class Folder(DatasetSource):
    """``root/<class>/*.png|jpg|…``, or ``root/{train,val,test}/<class>/…`` with fixed splits."""

    name = "folder"
    description = "image folder: one folder per class, optional train/ val/ test/"
    needs_argument = True

    def load(self, argument, base_dir):
        """Records of every image; the class map is every class folder name, sorted, shared
        by train/ val/ test/ (an empty class folder stays in it, so the checks name it)."""
        root = _resolve(argument, base_dir, "folder")
        if not root.is_dir():
            raise DataError(f"folder {root} is not a directory")
        real_root = root.resolve()  # the root itself may be a link (data/pets -> /mnt/pets)
        escaping: list[tuple[str, str]] = []
        records: list[Record] = []
        classes: set[str] = set()
        ignored: list[Path] = []
        split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
        if split_dirs:
            if not (root / "train").is_dir():
                raise DataError(
                    f"{root} has {', '.join(d.name for d in split_dirs)}/ but no train/ folder"
                )
            extra = [p.name for p in _class_folders(root, real_root) if p.name not in SPLITS]
            if extra:
                warnings.warn(
                    f"{root} has train/ val/ test/ folders, so its other folders {extra} are "
                    "ignored; move them into train/ (or remove them)",
                    stacklevel=2,
                )
            for d in split_dirs:
                why = _link_escapes(d, real_root)
                if why:
                    raise DataError(f"split folder {d} is a {why}")
            groups = [(d, cls) for d in split_dirs for cls in _class_folders(d, real_root)]
        else:
            groups = [(None, cls) for cls in _class_folders(root, real_root)]
        for split_dir, cls in groups:
            images, others = _files_in(cls)
            classes.add(cls.name)
            split = split_dir.name if split_dir is not None else None
            for p in images:
                why = _link_escapes(p, real_root)
                if why:
                    escaping.append((str(p), why))
                else:
                    records.append(Record(str(p), cls.name, split))
            ignored += others
        if ignored:
            shown = ", ".join(str(p.relative_to(root)) for p in ignored[:5])
            more = f", … ({len(ignored)} in all)" if len(ignored) > 5 else ""
            warnings.warn(
                f"ignored {len(ignored)} file(s) without an image extension "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}): {shown}{more}",
                stacklevel=2,
            )
        if not records:
            raise DataError(
                f"no images found under {root}; expected {root}/<class>/*.png|jpg|… "
                "or train/ val/ test/ subfolders holding class folders"
            )
        return Dataset(records=records, class_names=sorted(classes), problems=escaping)


class CsvManifest(DatasetSource):
    """A CSV with columns ``path,label`` (and optionally ``split``); paths relative to the CSV.

    ``path,labels[,split]`` is a multi-label manifest: each ``labels`` cell lists the image's
    labels separated by ``label_separator`` (``[data] label_separator``; by default spaces,
    as in common multi-label CSVs).
    """

    name = "csv"
    description = "CSV manifest with columns path,label[,split] or path,labels[,split]"
    needs_argument = True

    def load(self, argument, base_dir, *, label_separator: str = " "):
        path = _resolve(argument, base_dir, "csv")
        try:
            return self._read(path, label_separator)
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path} is not UTF-8 text (byte {exc.start}: "
                f"{exc.object[exc.start : exc.start + 1]!r}); save it as UTF-8"
            ) from None

    def _read(self, path: Path, label_separator: str = " ") -> Dataset:
        lines: dict[str, list[int]] = {}
        forms: dict[str, list[int]] = {"label": [], "labels": []}
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            if "path" not in fields or not {"label", "labels"} & set(fields):
                raise DataError(
                    f"{path} must have a header with columns path,label (one label per image) "
                    f"or path,labels (multi-label) (found {fields})"
                )
            records = []
            for line_no, row in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                labels: tuple[str, ...] = ()
                if row.get("labels") or ("labels" in fields and "label" not in fields):
                    labels = _split_labels(row.get("labels", ""), label_separator)
                    if not labels:
                        raise DataError(
                            f"{path}:{line_no}: empty labels cell; every image needs at least "
                            f"one label (separated by {label_separator!r}, [data] "
                            "label_separator); remove the row or label the image"
                        )
                    forms["labels"].append(line_no)
                    row["label"] = ""
                elif row.get("label"):
                    forms["label"].append(line_no)
                if not row.get("path") or not (row.get("label") or labels):
                    raise DataError(f"{path}:{line_no}: empty path or label")
                split = row.get("split") or None
                if split is not None and split not in SPLITS:
                    raise DataError(
                        f"{path}:{line_no}: split {split!r} is not one of train, val, test"
                    )
                image = Path(row["path"]).expanduser()
                if not image.is_absolute():
                    image = path.parent / image
                records.append(Record(str(image), row["label"], split, labels))
                lines.setdefault(os.path.normpath(image), []).append(line_no)
        if not records:
            raise DataError(f"{path} lists no images")
        if forms["label"] and forms["labels"]:
            raise DataError(
                f"{path} mixes single-label rows (a label cell: lines "
                f"{_line_list(forms['label'])}) and multi-label rows (a labels cell: lines "
                f"{_line_list(forms['labels'])}); use one labels column for every row (an "
                "image with one label lists just that one)"
            )
        repeated = {p: n for p, n in lines.items() if len(n) > 1}
        if repeated:  # a repeated image can land in train and in test: a leak
            shown = "; ".join(
                f"{os.path.relpath(p, path.parent)} (lines {', '.join(map(str, n))})"
                for p, n in list(repeated.items())[:5]
            )
            more = f"; … ({len(repeated)} in all)" if len(repeated) > 5 else ""
            raise DataError(
                f"{path} lists {len(repeated)} image(s) more than once: {shown}{more}. A "
                "repeated image can land in train and in val/test; remove the repeated rows"
            )
        return Dataset(records=records)


def _split_labels(cell: str, separator: str) -> tuple[str, ...]:
    """The labels of a multi-label cell, each once, in their first order."""
    parts = cell.split() if separator == " " else cell.split(separator)
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))


def _line_list(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:5])) + (
        f", … ({len(numbers)} in all)" if len(numbers) > 5 else ""
    )


@hookimpl(trylast=True)
def register_datasets(register):
    for source in (Digits(), DigitPairs(), Folder(), CsvManifest()):
        register(source)
