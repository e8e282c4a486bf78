"""Loading weight files safely: safetensors, or torch checkpoints with ``weights_only=True``.

Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


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


def load_weights(model: nn.Module, path: str | Path, head: list[str]) -> None:
    """Load a weights file into ``model``; a head of another shape is replaced, not loaded.

    Any other missing or unexpected key is an error that lists them, so a file meant for
    another architecture never half-loads silently.
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
