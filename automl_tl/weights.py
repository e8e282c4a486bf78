"""Loading weight files safely: safetensors, or torch checkpoints with ``weights_only=True``.

Nothing here unpickles arbitrary objects. Three kinds of local source reach a model:

- a weights file (:func:`load_weights`): the head is replaced when its class count differs,
  the input convolution is adapted when the file was trained on another number of input
  channels (timm's ``adapt_input_conv``), any other missing or unexpected key is an error;
- a timm ``local-dir:`` folder (:func:`local_dir_weights`), e.g. a previous study's ``best/``;
- the weights ``automl-tl pretrain`` writes (a ``.safetensors`` file, head removed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
#: The files timm looks for in a ``local-dir:`` folder, in its order of preference.
LOCAL_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch checkpoint (``weights_only=True``).

    A checkpoint that nests its weights under ``state_dict``, ``model`` or ``state_dict_ema``
    is unwrapped; a ``module.`` prefix from DataParallel is stripped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; fix the path in [weights]")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"cannot read weights file {path}: {type(exc).__name__}: {exc}. Use a .safetensors "
            "file or a torch checkpoint that holds only tensors (weights_only=True)."
        ) from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def local_dir_weights(directory: str | Path, architecture: str) -> Path:
    """The weights file of a timm ``local-dir:`` folder exported for ``architecture``.

    The folder holds ``config.json`` (timm's format, as ``save_for_hf`` and ``automl-tl``
    exports write it) and one of :data:`LOCAL_DIR_FILES`. A folder exported for another
    architecture is refused with both names.
    """
    directory = Path(directory).expanduser()
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"local-dir:{directory} is not a timm export: {config_path} does not exist. Point "
            "[weights] at a folder written by `automl-tl search` (its best/) or timm's save_for_hf."
        )
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {config_path}: {exc}") from exc
    exported = (config.get("automl_tl") or {}).get("backbone") or config.get("architecture")
    if exported and exported != architecture:
        raise UserError(
            f"local-dir:{directory} holds a {exported} model, not {architecture}; name it in "
            f"[weights] for backbone {exported!r}, or export a {architecture} model"
        )
    for name in LOCAL_DIR_FILES:
        if (directory / name).is_file():
            return directory / name
    raise UserError(
        f"local-dir:{directory} has a config.json but no weights file (one of "
        f"{', '.join(LOCAL_DIR_FILES)})"
    )


def _input_convs(model: nn.Module, first_conv: str | list[str] | tuple[str, ...] | None):
    """Names of the input convolutions: the argument, else timm's ``pretrained_cfg``."""
    if first_conv is None:
        first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if not first_conv:
        return ()
    return (first_conv,) if isinstance(first_conv, str) else tuple(first_conv)


def _adapt_input_channels(
    model: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], first_conv
) -> list[str]:
    """Adapt input-conv weights trained on another channel count, as timm does; return them."""
    from timm.models import adapt_input_conv

    adapted = []
    for conv in _input_convs(model, first_conv):
        key = f"{conv}.weight"
        if key not in state or key not in own or state[key].shape == own[key].shape:
            continue
        theirs, ours = state[key], own[key]
        same_kernel = theirs.ndim == ours.ndim == 4 and theirs.shape[0] == ours.shape[0]
        if not same_kernel or theirs.shape[2:] != ours.shape[2:]:
            continue  # not a channel difference; reported as a shape mismatch
        try:
            state[key] = adapt_input_conv(ours.shape[1], theirs, base_chans=theirs.shape[1])
        except (NotImplementedError, ValueError, AssertionError):
            continue
        adapted.append(key)
    return adapted


def load_weights(
    model: nn.Module,
    path: str | Path,
    head: list[str],
    first_conv: str | list[str] | None = None,
) -> dict[str, list[str]]:
    """Load a weights file into ``model``; a head of another shape is replaced, not loaded.

    The input convolution (``first_conv``, default timm's ``pretrained_cfg["first_conv"]``)
    of a file trained on another number of input channels is adapted with timm's
    ``adapt_input_conv``. Any other missing or unexpected key is an error that lists them, so
    a file meant for another architecture never half-loads silently.

    Returns:
        ``{"replaced_head": [...], "adapted_input": [...]}``: what did not load as it was.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head_keys = set(head)
    # Buffers and parameters of the head module (e.g. a bias) share the head's prefixes.
    head_prefixes = tuple(n.rsplit(".", 1)[0] + "." for n in head)
    dropped = []
    for key in list(state):
        is_head = key in head_keys or key.startswith(head_prefixes)
        if is_head and (key not in own or own[key].shape != state[key].shape):
            dropped.append(key)
            del state[key]
    adapted = _adapt_input_channels(model, state, own, first_conv)
    missing = [
        k for k in own if k not in state and not (k in head_keys or k.startswith(head_prefixes))
    ]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' …' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}")
        if mismatched:
            shapes = [
                f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                for k in mismatched[:5]
            ]
            parts.append("shape mismatches " + "; ".join(shapes))
        raise UserError(
            f"weights file {path} does not fit {type(model).__name__}: "
            + ", ".join(parts)
            + ". Point [weights] at a file saved from the same architecture."
        )
    model.load_state_dict(state, strict=False)
    return {"replaced_head": dropped, "adapted_input": adapted}
