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


def export_model(
    model: nn.Module,
    backbone: Backbone,
    directory: Path,
    label_names: list[str],
    data_config: DataConfig,
    metrics: dict[str, Any],
    provenance: dict[str, Any] | None = None,
) -> str:
    """Write the model into ``directory`` atomically (a new folder swapped in); return its sha256.

    ``provenance`` (``{"backbone_origin": …, "weights": …}``: where the backbone's code and
    its starting weights came from) goes into ``config.json``'s ``automl_tl`` section, so a
    loader can name the plugin to install and warn about another version of it.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        backbone.export(
            model.cpu().float().eval(),
            staging,
            label_names,
            data_config,
            {"study_metrics": "metrics.json", **(provenance or {})},
        )
        write_atomic(staging / "metrics.json", json.dumps(metrics, indent=2))
        digest = sha256_file(staging / "model.safetensors")
        as_umask_allows(staging)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old.{os.getpid()}")
            os.replace(directory, old)
        try:
            os.replace(staging, directory)
        except BaseException:  # Ctrl-C or an error between the two renames: the old one back
            if old is not None:
                os.replace(old, directory)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return digest
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@dataclass
class LoadedModel:
    """An exported model with its preprocessing: ``predict(images)`` takes paths, PIL images or tensors."""

    model: nn.Module
    label_names: list[str]
    data_config: DataConfig
    device: torch.device

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
        else:
            arrays = []
            for image in images:
                if isinstance(image, Image.Image):
                    import numpy as np

                    image = np.asarray(image.convert("RGB"))
                arrays.append(torch.from_numpy(decode_image(image, self.image_size)))
            x = torch.stack(arrays).float().div(255.0)
        mean = torch.tensor(self.data_config.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.data_config.std).view(1, -1, 1, 1)
        return ((x - mean) / std).to(self.device)

    @torch.inference_mode()
    def predict(
        self, images: Sequence[Any] | torch.Tensor, top_k: int = 1
    ) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per image."""
        probs = self.model(self.preprocess(images)).float().softmax(-1).cpu()
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        return [
            [(self.label_names[i], float(p)) for p, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)
        ]


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
    config_path = directory / "config.json"
    if not config_path.is_file() or not (directory / "model.safetensors").is_file():
        raise UserError(
            f"{directory} is not an exported model (needs config.json and model.safetensors); "
            "run `automl-tl search` or `automl-tl retrain` first"
        )
    config = json.loads(config_path.read_text())
    architecture = config.get("architecture", "")
    label_names = config.get("label_names") or config.get("pretrained_cfg", {}).get("label_names")
    cfg = config.get("pretrained_cfg", {})
    data_config = DataConfig(tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]))
    record = config.get("automl_tl") or {}
    if timm.is_model(architecture):
        model = timm.create_model(f"local-dir:{directory}", pretrained=True)
    else:
        from safetensors.torch import load_file

        if registry is None:
            registry = Registry.from_plugin_manager(get_plugin_manager(list(plugins))[0])
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
    return LoadedModel(model.to(device_t).eval(), list(label_names), data_config, device_t)


def plain_timm_loads(directory: str | Path) -> bool:
    """Whether ``timm.create_model("local-dir:DIR", pretrained=True)`` loads the export with
    no automl-tl and no plugin: its architecture is one timm knows."""
    import timm

    try:
        config = json.loads((Path(directory) / "config.json").read_text())
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
    model: LoadedModel, paths: Iterable[str | Path], top_k: int = 1, batch_size: int = 64
) -> list[dict[str, Any]]:
    """One row per image: path, label, score (and the top-k list)."""
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
        for f, top in zip(ok, preds):
            row = {"path": str(f), "label": top[0][0], "score": round(top[0][1], 6)}
            if top_k > 1:
                row["top_k"] = [{"label": label, "score": round(p, 6)} for label, p in top]
            rows.append(row)
    return rows


def check_timm_export(directory: str | Path) -> list[str]:
    """The files of an exported model folder; a clear error when it is not one."""
    directory = Path(directory)
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
    model = loaded.model.float().eval()
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
        }
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
