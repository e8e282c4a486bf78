"""Retrained model -> files timm loads on its own; loading them back; predicting.

``<dir>/model.safetensors`` + ``<dir>/config.json`` (timm's format: ``architecture``,
``num_classes``, ``label_names``, ``pretrained_cfg`` with mean/std/input_size) +
``<dir>/metrics.json``. ``timm.create_model("local-dir:<dir>", pretrained=True)`` loads the
model with no automl-tl installed; ``[weights] NAME = "local-dir:<dir>"`` seeds another study
with it. :func:`load_model` gives the model with its preprocessing (resize, mean/std) and
top-k :meth:`LoadedModel.predict`; :func:`export_onnx` (``automl-tl export STUDY --onnx``)
writes ``<dir>/model.onnx`` and checks it against the PyTorch model.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._util import as_umask_allows, sha256_file, write_atomic
from .components import Backbone, DataConfig
from .data import IMAGE_SUFFIXES
from .errors import PluginError, UserError
from .plugins import component_origin, get_plugin_manager, missing_plugin_message, origin_mismatch
from .registry import Registry
from .tasks import predicted_labels

#: Signals held back while ``best/`` is swapped, so Ctrl-C or SIGTERM cannot fall between the
#: two renames (a SIGKILL or a crash there is repaired by :func:`recover_export`).
_HELD_SIGNALS = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}


def _fsync_tree(path: Path) -> None:
    """Flush every file below ``path`` and the folders themselves to disk."""
    for below in sorted(path.rglob("*"), reverse=True):
        if below.is_file() and not below.is_symlink():
            with open(below, "rb") as f:
                os.fsync(f.fileno())
    for folder in (path, *(p for p in path.rglob("*") if p.is_dir())):
        _fsync_dir(folder)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT / SIGTERM / SIGHUP until the block ends (main thread only; else a no-op)."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _export_lock(directory: Path):
    """One export of ``directory`` at a time on this node: ``flock`` on the folder that holds
    it (no lock file is left beside ``best/``)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the renames still keep best/ whole
        yield
        return
    fd = os.open(directory.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _leftovers(directory: Path, kind: str) -> list[Path]:
    """``.<name>.old.*`` (kind "old") or ``.<name>.staging.*`` folders beside ``directory``."""
    prefix = f".{directory.name}.{kind}."
    if not directory.parent.is_dir():
        return []
    found = [
        p
        for p in directory.parent.iterdir()
        if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()
    ]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _staging_owner_gone(staging: Path, directory: Path) -> bool:
    """Whether the export that made ``staging`` (``.<name>.staging.<host>.<pid>.<random>``)
    is over: its process is gone (this host) or it is more than a day old (another host)."""
    import socket
    import time

    owner = staging.name[len(f".{directory.name}.staging.") :].rsplit(".", 1)[0]
    host, _, pid = owner.rpartition(".")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return int(pid) == os.getpid()  # ours, from an export that did not finish
    return time.time() - staging.stat().st_mtime > 86400


def recover_export(directory: str | Path) -> bool:
    """Repair what an export killed mid-way left beside ``directory`` (e.g. ``best/``).

    A missing ``directory`` with a ``.<name>.old.*`` folder beside it (killed between the two
    renames of :func:`export_model`) gets the newest complete old folder back; old folders
    next to a present ``directory`` and staging folders whose export is over are removed.
    Returns whether ``directory`` was restored. Safe to call at any time; serialised with
    :func:`export_model` on this node.
    """
    directory = Path(directory)
    if not directory.parent.is_dir():
        return False
    with _export_lock(directory):
        return _recover_locked(directory)


def _recover_locked(directory: Path) -> bool:
    restored = False
    old = [
        p
        for p in _leftovers(directory, "old")
        if (p / "config.json").is_file() or (p / ENSEMBLE_FILE).is_file()
    ]  # an empty placeholder (killed before the first rename) holds nothing to restore
    if not directory.exists() and old:
        os.replace(old[-1], directory)
        _fsync_dir(directory.parent)
        restored = True
    for leftover in _leftovers(directory, "old"):
        shutil.rmtree(leftover, ignore_errors=True)
    for staging in _leftovers(directory, "staging"):
        if _staging_owner_gone(staging, directory):
            shutil.rmtree(staging, ignore_errors=True)
    return restored


def export_model(
    model: nn.Module,
    backbone: Backbone,
    directory: Path,
    label_names: list[str],
    data_config: DataConfig,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> str:
    """Write the model into ``directory`` atomically (a new folder swapped in); return its
    sha256. ``extra`` goes into config.json's ``automl_tl`` table (e.g. ``temperature``).

    The new folder is written and flushed to disk under a private, unpredictable name, then
    swapped in with two renames (the old folder aside, the new one in place) while Ctrl-C and
    SIGTERM are held; a crash between them is repaired by :func:`recover_export`, which the
    next export (and :func:`load_model`) runs first. Readers see the old model or the new one.
    """

    def write(staging: Path) -> str:
        backbone.export(
            model.cpu().float().eval(),
            staging,
            label_names,
            data_config,
            {"study_metrics": "metrics.json", **(extra or {})},
        )
        write_atomic(staging / "metrics.json", json.dumps(metrics, indent=2))
        return sha256_file(staging / "model.safetensors")

    return _write_folder(Path(directory), write)


def _write_folder(directory: Path, write) -> Any:
    """``write(staging)`` into a private folder, then swap it in for ``directory`` (see
    :func:`export_model`); returns what ``write`` returned."""
    import socket

    directory.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{directory.name}.staging.{socket.gethostname()}.{os.getpid()}."
    with _export_lock(directory):
        _recover_locked(directory)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=prefix))
        try:
            digest = write(staging)
            as_umask_allows(staging)
            _fsync_tree(staging)
            # a fresh, unpredictable, empty folder: rename() replaces an empty folder, so no
            # leftover of an earlier export (or a reused pid) can be in the way
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
            with _signals_held():
                moved = directory.exists()
                if moved:
                    os.replace(directory, old)
                try:
                    os.replace(staging, directory)
                except BaseException:  # an error between the two renames: the old one back
                    if moved:
                        os.replace(old, directory)
                    else:
                        old.rmdir()
                    raise
                _fsync_dir(directory.parent)
            shutil.rmtree(old, ignore_errors=True)
            return digest
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


class Scaled(nn.Module):
    """``model(x) / temperature``: calibrated logits (temperature scaling) in one module."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("inv_temperature", torch.tensor(1.0 / float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float() * self.inv_temperature


class Averaged(nn.Module):
    """An ensemble as one module: the weighted mean of its members' probabilities, returned
    as log-probabilities (divided by the ensemble's temperature, then re-normalized). Input
    is normalized with the first member's mean/std; each member re-normalizes with its own.

    Members trained at different image sizes (a searched ``[data] image_size``) each get the
    input resized to their own ``sizes[i]`` (bicubic, antialiased, as
    :meth:`LoadedModel.preprocess` resizes); :meth:`forward_each` takes one input per member
    instead, e.g. the same images decoded at each member's size (how the selection scores an
    ensemble: :func:`automl_tl.selection.model_log_probs`)."""

    def __init__(
        self,
        members: list[nn.Module],
        weights: list[float],
        norms: list[tuple[Sequence[float], Sequence[float]]],
        temperature: float = 1.0,
        sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        #: each member's input size (height = width); None: every member takes the input as is
        self.sizes: list[int] | None = [int(s) for s in sizes] if sizes else None
        w = torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w / w.sum())
        mean0, std0 = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in norms[0])
        scales, shifts = [], []
        for mean, std in norms:  # x_i = (x * std0 + mean0 - mean_i) / std_i = x * a_i + b_i
            m, s_ = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
            scales.append(std0 / s_)
            shifts.append((mean0 - m) / s_)
        self.register_buffer("scales", torch.stack(scales))
        self.register_buffer("shifts", torch.stack(shifts))
        self.register_buffer("inv_temperature", torch.tensor(1.0 / float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_each([self._resized(x, i) for i in range(len(self.members))])

    def _resized(self, x: torch.Tensor, i: int) -> torch.Tensor:
        size = self.sizes[i] if self.sizes else None
        if size is None or tuple(x.shape[-2:]) == (size, size):
            return x
        return nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True)

    def forward_each(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ensemble's log-probabilities from one batch per member (the same images, each
        at its member's size, normalized with the first member's mean/std)."""
        total = None
        for i, (member, x) in enumerate(zip(self.members, inputs)):
            probs = member(x * self.scales[i] + self.shifts[i]).float().softmax(-1)
            total = probs * self.weights[i] if total is None else total + probs * self.weights[i]
        return (total.clamp_min(1e-12).log() * self.inv_temperature).log_softmax(-1)


@dataclass
class LoadedModel:
    """An exported model with its preprocessing: ``predict(images)`` takes paths, PIL images or tensors.

    An ensemble export (``ensemble.json``) loads as one too: :attr:`model` is then the
    :class:`Averaged` module of its members. :attr:`temperature` (temperature scaling) is
    applied by :meth:`predict` and by the ONNX export.
    """

    model: nn.Module
    label_names: list[str]
    data_config: DataConfig
    device: torch.device
    temperature: float = 1.0
    #: for an ensemble: its members' folders and weights
    members: list[tuple[Path, float]] | None = None
    #: a multi-label model's per-label thresholds (config.json's ``automl_tl.thresholds``);
    #: None for a multiclass model
    thresholds: list[float] | None = None
    #: how a multi-label model's labels are joined in one CSV cell (the study's separator)
    label_separator: str = " "

    @property
    def multilabel(self) -> bool:
        """One sigmoid per label (``predict`` gives every label above its threshold)."""
        return self.thresholds is not None

    def calibrated_module(self) -> nn.Module:
        """The module whose outputs are the calibrated logits (what ONNX exports)."""
        if isinstance(self.model, Averaged) or self.temperature == 1.0:
            return self.model
        return Scaled(self.model, self.temperature).to(self.device)

    @property
    def image_size(self) -> int:
        return int(self.data_config.input_size[-1])

    def preprocess(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """Paths / PIL images / uint8 or [0, 1] float tensors -> a normalized float batch."""
        from PIL import Image

        from .data import decode_image

        if isinstance(images, torch.Tensor):
            x = images if images.ndim == 4 else images.unsqueeze(0)
            x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = torch.nn.functional.interpolate(
                    x, size=(self.image_size,) * 2, mode="bicubic", antialias=True
                ).clamp(0, 1)
            return self.normalize(x)
        else:
            arrays = []
            for image in images:
                if isinstance(image, Image.Image):
                    import numpy as np

                    image = np.asarray(image.convert("RGB"))
                arrays.append(torch.from_numpy(decode_image(image, self.image_size)))
            x = torch.stack(arrays).float().div(255.0)
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 or [0, 1] float batch, at whatever size it has -> normalized with the
        model's mean/std, on its device (:meth:`preprocess` without the resize)."""
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        mean = torch.tensor(self.data_config.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.data_config.std).view(1, -1, 1, 1)
        return ((x - mean) / std).to(self.device)

    @torch.inference_mode()
    def predict(
        self, images: Sequence[Any] | torch.Tensor, top_k: int | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per image (calibrated probabilities; ``top_k`` None: 1).

        A multi-label model gives every label at or above its threshold (most probable
        first; possibly none), or with ``top_k`` the k most probable labels whatever their
        thresholds; its probabilities are per label (sigmoid), not summing to 1.
        """
        logits = self.calibrated_module()(self.preprocess(images)).float()
        if self.multilabel:
            probs = logits.sigmoid().cpu()
            if top_k is None:
                return predicted_labels(probs.numpy(), self.label_names, self.thresholds)
        else:
            probs = logits.softmax(-1).cpu()
        k = min(top_k or 1, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        return [
            [(self.label_names[i], float(p)) for p, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)
        ]


#: The ``model_args`` of an export's config.json that :func:`load_model` lets timm pass to the
#: model's constructor: shape and layout only. Anything else (``checkpoint_path``,
#: ``pretrained_cfg_overlay``, layer factories …) could make the constructor read other files
#: or build something else than the export describes, so it is refused.
ALLOWED_MODEL_ARGS = frozenset(
    {
        "num_classes",
        "in_chans",
        "global_pool",
        "img_size",
        "patch_size",
        "dynamic_img_size",
        "dynamic_img_pad",
        "class_token",
        "reg_tokens",
        "no_embed_class",
        "num_features",
    }
)


def _check_model_args(config: dict[str, Any], config_path: Path) -> None:
    args = config.get("model_args", {})
    plain = (int, float, str, bool, type(None))
    if not isinstance(args, dict):
        raise UserError(f"{config_path}: model_args must be a mapping; re-export the model")
    bad = sorted(
        k
        for k, v in args.items()
        if k not in ALLOWED_MODEL_ARGS
        or not (
            isinstance(v, plain) or (isinstance(v, list) and all(isinstance(x, plain) for x in v))
        )
    )
    if bad:
        raise UserError(
            f"{config_path}: model_args {bad} are not passed to the model's constructor (allowed: "
            f"{', '.join(sorted(ALLOWED_MODEL_ARGS))}, with plain values); remove them or "
            "re-export the model with automl-tl"
        )


def load_model(
    directory: str | Path,
    device: str = "cpu",
    registry=None,
    plugins: Sequence[str] = (),
) -> LoadedModel:
    """Load an exported model and its preprocessing.

    A timm architecture loads through timm; a plugin's backbone through the plugin that
    registered it: installed plugins load by themselves, a file or module is given in
    ``plugins`` (or a ``registry`` built with it). A missing plugin is one error naming what
    to install or pass (from the model's ``config.json``); a plugin of another version than
    the one that trained the model (another file content) gives a warning naming both.

    Example:
        >>> m = load_model("studies/digits/best")            # doctest: +SKIP
        >>> m.predict(["a.png", "b.png"], top_k=3)           # doctest: +SKIP
        >>> load_model("studies/team/best", plugins=["my_backbone.py"])  # doctest: +SKIP
    """
    import timm

    directory = Path(directory)
    if (directory / ENSEMBLE_FILE).is_file():
        if registry is None and plugins:
            registry = Registry.from_plugin_manager(get_plugin_manager(list(plugins))[0])
        return load_ensemble(directory, device=device, registry=registry)
    config_path = directory / "config.json"
    if not config_path.is_file():
        with contextlib.suppress(OSError):  # an export killed mid-swap: restore the old model
            recover_export(directory)
    if not config_path.is_file() or not (directory / "model.safetensors").is_file():
        raise UserError(
            f"{directory} is not an exported model (needs config.json and model.safetensors); "
            "run `automl-tl search` or `automl-tl retrain` first"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc}); re-export the model") from exc
    _check_model_args(config, config_path)
    architecture = config.get("architecture", "")
    label_names = config.get("label_names") or config.get("pretrained_cfg", {}).get("label_names")
    cfg = config.get("pretrained_cfg", {})
    data_config = DataConfig(tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]))
    if timm.is_model(architecture):
        model = timm.create_model(f"local-dir:{directory}", pretrained=True)
    else:
        from safetensors.torch import load_file

        if registry is None:
            registry = Registry.from_plugin_manager(get_plugin_manager(list(plugins))[0])
        record = config.get("automl_tl") or {}
        backbone = record.get("backbone", architecture)
        origin = record.get("backbone_origin")
        if backbone not in registry.names("backbones"):
            raise PluginError(missing_plugin_message(backbone, origin, str(directory)))
        component = registry.get("backbones", backbone)
        mismatch = origin_mismatch(
            backbone,
            origin,
            component_origin(registry.plugin_of("backbones", backbone), component),
            str(directory),
        )
        if mismatch:
            warnings.warn(mismatch, stacklevel=2)
        model = component.create(
            len(label_names), weights="none", image_size=data_config.input_size[-1]
        )
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
    device_t = torch.device(device)
    record = config.get("automl_tl") or {}
    temperature = float(record.get("temperature") or 1.0)
    thresholds = None
    if record.get("task") == "multilabel":
        thresholds = [float(t) for t in record.get("thresholds") or [0.5] * len(label_names)]
    return LoadedModel(
        model.to(device_t).eval(),
        list(label_names),
        data_config,
        device_t,
        temperature,
        thresholds=thresholds,
        label_separator=str(record.get("label_separator") or " "),
    )


#: the file that makes a folder an ensemble export
ENSEMBLE_FILE = "ensemble.json"


def load_ensemble(directory: Path, device: str = "cpu", registry=None) -> LoadedModel:
    """Load an ensemble export: ``ensemble.json`` names member folders (relative) and weights."""
    spec = json.loads((directory / ENSEMBLE_FILE).read_text())
    loaded = [
        load_model(directory / m["path"], device="cpu", registry=registry) for m in spec["members"]
    ]
    check_same_classes(
        [directory / m["path"] for m in spec["members"]], [m.label_names for m in loaded]
    )
    module = Averaged(
        [m.model for m in loaded],
        [float(m["weight"]) for m in spec["members"]],
        [(m.data_config.mean, m.data_config.std) for m in loaded],
        float(spec.get("temperature") or 1.0),
        sizes=[m.image_size for m in loaded],
    )
    device_t = torch.device(device)
    # input at the largest member's size (each member resizes to its own), normalized with
    # the first member's mean/std (what Averaged expects)
    first = loaded[0].data_config
    largest = max(m.image_size for m in loaded)
    return LoadedModel(
        module.to(device_t).eval(),
        loaded[0].label_names,
        DataConfig((first.input_size[0], largest, largest), first.mean, first.std),
        device_t,
        float(spec.get("temperature") or 1.0),
        members=[(directory / m["path"], float(m["weight"])) for m in spec["members"]],
    )


def check_single_label(folders: Sequence[Path], what: str) -> None:
    """Ensembles and soups average one softmax: a multi-label export is refused by name."""
    for folder in folders:
        config = json.loads((Path(folder) / "config.json").read_text())
        if (config.get("automl_tl") or {}).get("task") == "multilabel":
            raise UserError(
                f"{folder} is a multi-label model; {what} of multi-label models are not "
                "supported (they average one softmax over the classes): use the model alone"
            )


def check_same_classes(folders: Sequence[Path], label_lists: Sequence[list[str]]) -> None:
    """An ensemble's members predict the same classes in the same order, or a clear error."""
    first = list(label_lists[0])
    for folder, labels in zip(folders[1:], label_lists[1:]):
        if list(labels) != first:
            raise UserError(
                f"cannot ensemble models with different class lists: {folders[0]} predicts "
                f"{first}, {folder} predicts {list(labels)}; ensemble models of one study"
            )


def export_ensemble(
    members: Sequence[str | Path],
    directory: str | Path,
    *,
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write an ensemble export: ``members/<i>-<name>/`` copies of the member exports plus
    ``ensemble.json`` (and ``metrics.json``), swapped in atomically. ``load_model``,
    ``predict`` and ``export --onnx`` take the folder like any exported model."""
    members = [Path(m) for m in members]
    if not members:
        raise UserError("an ensemble needs at least one member model")
    for m in members:
        check_timm_export(m)
    check_single_label(members, "ensembles")
    labels = []
    for m in members:
        config = json.loads((m / "config.json").read_text())
        labels.append(
            config.get("label_names") or config.get("pretrained_cfg", {}).get("label_names")
        )
    check_same_classes(members, labels)
    weights = list(weights) if weights is not None else [1.0] * len(members)

    def write(staging: Path) -> None:
        spec_members = []
        for i, (m, w) in enumerate(zip(members, weights)):
            rel = f"members/{i}-{m.name}"
            shutil.copytree(m, staging / rel, ignore=shutil.ignore_patterns("model.onnx", ".*"))
            spec_members.append({"path": rel, "weight": float(w), "source": str(m)})
        spec = {
            "kind": "ensemble",
            "label_names": list(labels[0]),
            "members": spec_members,
            "temperature": round(float(temperature), 4),
        }
        write_atomic(staging / ENSEMBLE_FILE, json.dumps(spec, indent=2))
        write_atomic(staging / "metrics.json", json.dumps(metrics or {}, indent=2))

    directory = Path(directory)
    _write_folder(directory, write)
    return directory


def plain_timm_loads(directory: str | Path) -> bool:
    """Whether ``timm.create_model("local-dir:DIR", pretrained=True)`` loads the export with
    no automl-tl and no plugin: its architecture is one timm knows."""
    import timm

    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return timm.is_model(config.get("architecture", ""))


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively) into image files; files are taken as given."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        elif p.is_file():
            found.append(p)
        else:
            raise UserError(f"{p} does not exist; give image files or folders")
    if not found:
        raise UserError("no images found in " + ", ".join(map(str, paths)))
    return found


def predict_paths(
    model: LoadedModel,
    paths: Iterable[str | Path],
    top_k: int | None = None,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """One row per image: path, label, score (and the top-k list); for a multi-label model
    path, labels, scores (every label above its threshold, or the ``top_k`` most probable)."""
    from .data import decode_image

    rows = []
    files = find_images(paths)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        arrays, ok = [], []
        for f in chunk:
            try:
                arrays.append(torch.from_numpy(decode_image(f, model.image_size)))
                ok.append(f)
            except Exception as exc:  # one bad file must not stop the others
                rows.append(
                    {
                        "path": str(f),
                        "label": None,
                        "score": None,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
        if not arrays:
            continue
        preds = model.predict(torch.stack(arrays), top_k=top_k)
        if model.multilabel:
            for f, found in zip(ok, preds):
                rows.append(
                    {
                        "path": str(f),
                        "labels": [label for label, _ in found],
                        "scores": [round(p, 6) for _, p in found],
                    }
                )
            continue
        top_k = top_k or 1
        for f, top in zip(ok, preds):
            row = {"path": str(f), "label": top[0][0], "score": round(top[0][1], 6)}
            if top_k > 1:
                row["top_k"] = [{"label": label, "score": round(p, 6)} for label, p in top]
            rows.append(row)
    return rows


def check_timm_export(directory: str | Path) -> list[str]:
    """The files of an exported model folder; a clear error when it is not one."""
    directory = Path(directory)
    if (directory / ENSEMBLE_FILE).is_file():
        return sorted(p.name for p in directory.iterdir() if p.is_file())
    if not (directory / "config.json").is_file():
        with contextlib.suppress(OSError):  # an export killed mid-swap: restore the old model
            recover_export(directory)
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise UserError(
            f"{directory} is not an exported model (needs config.json and model.safetensors); "
            "run `automl-tl search` (best/) or `automl-tl retrain --trial N` (models/trial-N/) first"
        )
    return sorted(p.name for p in directory.iterdir() if p.is_file())


@dataclass
class OnnxExport:
    """Where the ONNX file went and how closely it matches the PyTorch model."""

    path: Path
    opset: int
    batch: int
    max_abs_diff: float


#: ONNX Runtime's output may differ from PyTorch's by float rounding, not more than this.
ONNX_TOLERANCE = 1e-3


def export_onnx(
    directory: str | Path,
    *,
    opset: int | None = None,
    batch: int = 8,
    seed: int = 0,
    registry=None,
    plugins: Sequence[str] = (),
) -> OnnxExport:
    """Write ``<directory>/model.onnx`` beside the timm export and check it against PyTorch.

    The graph takes a normalized float batch ``image`` of shape ``(batch, 3, S, S)`` (the batch
    dimension is dynamic) and returns ``logits``; the preprocessing (input size, mean, std)
    and the label names are stored in the file's metadata. The check runs ONNX Runtime and
    the PyTorch model on the same random batch (of another size than the export's example,
    so the dynamic batch is exercised too) and raises when they differ by more than
    :data:`ONNX_TOLERANCE`. Needs the ``onnx`` extra: ``pip install 'automl-tl[onnx]'``.
    """
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as exc:
        raise UserError(
            f"ONNX export needs the onnx extra ({exc.name} is not installed): "
            "pip install 'automl-tl[onnx]'"
        ) from exc
    import numpy as np

    directory = Path(directory)
    check_timm_export(directory)
    loaded = load_model(directory, device="cpu", registry=registry, plugins=plugins)
    model = loaded.calibrated_module().float().eval()  # temperature scaling / ensemble inside
    size = loaded.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    path = directory / "model.onnx"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".model.", suffix=".onnx")
    os.close(fd)
    try:
        kwargs: dict[str, Any] = {"opset_version": opset} if opset else {}
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
                torch.onnx.export(
                    model,
                    (example,),
                    tmp,
                    input_names=["image"],
                    output_names=["logits"],
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    external_data=False,
                    dynamo=True,
                    **kwargs,
                )
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UserError(
                f"torch.onnx cannot export this {type(model).__name__}: {type(exc).__name__}: "
                f"{reason}. The timm export in {directory} is unaffected."
            ) from exc
        proto = onnx.load(tmp)
        used_opset = next(
            (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            opset or 0,
        )
        metadata = {
            "label_names": json.dumps(loaded.label_names),
            "input_size": json.dumps(list(loaded.data_config.input_size)),
            "mean": json.dumps(list(loaded.data_config.mean)),
            "std": json.dumps(list(loaded.data_config.std)),
            "preprocess": "RGB in [0, 1], resized to input_size, then (x - mean) / std",
            "temperature": json.dumps(loaded.temperature),
            "outputs": "calibrated logits: softmax gives the probabilities"
            + (" (log of the ensemble's mean probabilities)" if loaded.members else ""),
        }
        if loaded.multilabel:
            metadata["task"] = "multilabel"
            metadata["thresholds"] = json.dumps(loaded.thresholds)
            metadata["outputs"] = (
                "logits, one per label: sigmoid gives each label's probability; a label is "
                "predicted at or above its threshold"
            )
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, tmp)
        check = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        (onnx_logits,) = session.run(["logits"], {"image": check.numpy()})
        with torch.inference_mode():
            torch_logits = model(check).float().numpy()
        diff = float(np.abs(onnx_logits - torch_logits).max())
        if not diff <= ONNX_TOLERANCE:
            raise UserError(
                f"the ONNX model differs from PyTorch by {diff:.3g} (> {ONNX_TOLERANCE}) on a "
                f"batch of {batch}; {directory}/model.onnx was not written"
            )
        as_umask_allows(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return OnnxExport(path, int(used_opset), batch, diff)
