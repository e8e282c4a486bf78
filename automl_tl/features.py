"""The linear-probe feature cache: a frozen body's outputs, computed once per backbone and split.

A trial whose body never trains (every epoch's trainable set lies inside the classifier head:
unfreeze depth 0) and whose augmentation is the identity feeds the head exactly the same
inputs in every epoch. :func:`automl_tl.train.fit` then runs the body once over each split,
keeps what enters the classifier (:func:`extract`), and trains the head on those features:
ten epochs cost one forward pass plus ten passes over a linear layer.

Trials share features when their bodies are identical: the key holds a digest of the body's
parameters and buffers (:func:`body_digest`), so pretrained bodies are shared across trials
while random-init bodies (a different seed per trial) never are by mistake. The cache is per
process (a worker's trials share it), bounded by ``AUTOML_TL_FEATURE_CACHE_MB`` (default
2048 MB) and evicts the least recently used entry. Features live on the training device.

The path is taken only when it gives the same result as training through the whole model:
no module outside the head may be random or batch-dependent in the head-only training state
(dropout, drop-path, BatchNorm in train mode), and the first extracted batch is checked: the
head applied to the captured features must reproduce the model's output.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

import torch
from torch import nn

FEATURE_CACHE_ENV = "AUTOML_TL_FEATURE_CACHE_MB"


def _default_max_bytes() -> int:
    raw = os.environ.get(FEATURE_CACHE_ENV)
    try:
        return int(float(raw) * 1024**2) if raw else 2048 * 1024**2
    except ValueError:
        return 2048 * 1024**2


class FeatureCache:
    """Features by key, least recently used evicted first once ``max_bytes`` is exceeded."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = _default_max_bytes() if max_bytes is None else max_bytes
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._entries.values())

    def get(self, key: Hashable) -> torch.Tensor | None:
        features = self._entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return features

    def put(self, key: Hashable, features: torch.Tensor) -> bool:
        """Keep ``features`` unless they alone exceed the bound; evict to make room."""
        if features.nbytes > self.max_bytes:
            return False
        self._entries[key] = features
        self._entries.move_to_end(key)
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)
        return True

    def clear(self, device_type: str | None = None) -> None:
        """Drop every entry, or those on one kind of device (after an out-of-memory error)."""
        if device_type is None:
            self._entries.clear()
            return
        for key in [k for k, t in self._entries.items() if t.device.type == device_type]:
            del self._entries[key]


#: The process-wide cache fit() uses by default.
FEATURES = FeatureCache()


def head_module(model: nn.Module, head_names: Iterable[str]) -> nn.Module | None:
    """The outermost module whose parameters are exactly the head's (None if there is none)."""
    named = dict(model.named_parameters())
    wanted = {id(named[n]) for n in head_names if n in named}
    if not wanted:
        return None
    for _, module in model.named_modules():
        if module is not model and {id(p) for p in module.parameters()} == wanted:
            return module
    return None


def static_body(model: nn.Module, head: nn.Module) -> bool:
    """True when nothing outside ``head`` is random or batch-dependent in the current mode."""
    inside = {id(m) for m in head.modules()}
    if float(getattr(model, "drop_rate", 0.0) or 0.0) > 0:  # timm: dropout before the classifier
        return False
    for module in model.modules():
        if id(module) in inside or not module.training:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return False
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return False
        if float(getattr(module, "drop_prob", 0.0) or 0.0) > 0:  # timm DropPath / DropBlock
            return False
    return True


def body_digest(model: nn.Module, head_names: Iterable[str]) -> str:
    """A digest of every parameter and buffer outside the head (names, shapes, values)."""
    skip = set(head_names)
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        if name in skip:
            continue
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def extract(
    model: nn.Module,
    head: nn.Module,
    inputs: Iterable[torch.Tensor],
    *,
    autocast: Callable[[], object],
) -> torch.Tensor | None:
    """What enters ``head`` for every batch of ``inputs``, concatenated; None when the head
    applied to those features does not reproduce the model's output (the model does something
    after the head, calls it twice, or returns no single tensor)."""
    captured: list[torch.Tensor] = []
    recording = True

    def grab(_module, args):
        if recording:
            ok = args and isinstance(args[0], torch.Tensor)
            captured.append(args[0].detach() if ok else None)

    handle = head.register_forward_pre_hook(grab)
    out: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for i, x in enumerate(inputs):
                with autocast():
                    logits = model(x)
                if len(captured) != i + 1 or captured[i] is None:
                    return None
                if i == 0:
                    if not isinstance(logits, torch.Tensor):
                        return None
                    recording = False
                    with autocast():
                        again = head(captured[0])
                    recording = True
                    # the same op on the same input; bf16 autocast may pick another kernel
                    tol = 1e-4 if logits.dtype == torch.float32 else 2e-2
                    if again.shape[0] != logits.shape[0] or not torch.allclose(
                        again.reshape(logits.shape[0], -1).float(),
                        logits.reshape(logits.shape[0], -1).float(),
                        atol=tol,
                        rtol=tol,
                    ):
                        return None
                out.append(captured[i])
    finally:
        handle.remove()
    return torch.cat(out) if out else None
