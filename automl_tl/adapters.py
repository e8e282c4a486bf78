"""Low-rank adapters (LoRA) for ``nn.Linear`` and ``nn.Conv2d``, and their merge.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a
layer's weight ``W`` and trains a low-rank update beside it: ``y = layer(x) + s · B(A(x))``
with ``A`` of rank ``r`` (random init), ``B`` zero-initialised (so training starts from the
pretrained function) and ``s = alpha / r``. A convolution's ``A`` is a ``r``-channel
convolution with the layer's kernel, stride, padding and dilation and its ``B`` a 1×1
convolution, so the update is again a convolution of the layer's shape.

The adapted layers stay instances of ``nn.Linear`` / ``nn.Conv2d`` and keep the parameter
names ``weight`` and ``bias`` (a model's parameter names change only by the added
``lora_a`` / ``lora_b``); :func:`merge_lora` folds ``W + s · B·A`` into a plain layer, after
which the model has exactly the parameters, names and outputs of the backbone it started
from, so plain timm loads its exported weights. Built-in strategy: ``lora``
(:mod:`automl_tl.default_plugins.unfreeze`); a plugin strategy may call
:func:`add_lora` / :func:`merge_lora` itself.

We use our own ~100 lines instead of the ``peft`` library: peft depends on ``transformers``
and ``accelerate`` (heavy installs and imports for a feature that is a few matrix products),
and its injected layers rename the base weights (``base_layer.weight``), which an export
would have to undo.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

#: attributes of a layer that are not parameters and that a copy keeps (besides public ones)
_PRIVATE_ATTRIBUTES = ("_reversed_padding_repeated_twice",)


def _copy_layer(layer: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` sharing ``layer``'s parameters (the same tensors) and settings."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in vars(layer).items():
        if key == "scale" and isinstance(layer, _LoRA):
            continue
        if not key.startswith("_") or key in _PRIVATE_ATTRIBUTES:
            setattr(new, key, value)
    new.weight = layer.weight
    new.register_parameter("bias", layer.bias)
    return new


class _LoRA:
    """What both adapted layers share: the two factors, the scale, the merged weight."""

    lora_a: nn.Parameter
    lora_b: nn.Parameter
    scale: float
    plain: type[nn.Module]

    def _init_factors(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], scale) -> None:
        weight = self.weight  # type: ignore[attr-defined]
        kwargs = {"device": weight.device, "dtype": weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(a_shape, **kwargs))
        self.lora_b = nn.Parameter(torch.zeros(b_shape, **kwargs))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = float(scale)

    def delta_weight(self) -> torch.Tensor:
        """``s · B·A`` in the shape of the layer's weight."""
        weight = self.weight  # type: ignore[attr-defined]
        delta = self.lora_b.flatten(1) @ self.lora_a.flatten(1)
        return (self.scale * delta).reshape(weight.shape)

    def merged(self) -> nn.Module:
        """A plain layer (same class as before :func:`add_lora`) with ``W + s · B·A``."""
        layer = _copy_layer(self, self.plain)  # type: ignore[arg-type]
        with torch.no_grad():
            weight = self.weight  # type: ignore[attr-defined]
            layer.weight = nn.Parameter(
                (weight + self.delta_weight().to(weight.dtype)).contiguous(),
                requires_grad=weight.requires_grad,
            )
        return layer


class LoRALinear(_LoRA, nn.Linear):
    """``nn.Linear`` plus a trainable low-rank update; see the module docstring."""

    plain = nn.Linear

    @classmethod
    def wrap(cls, layer: nn.Linear, rank: int, alpha: float) -> LoRALinear:
        new = _copy_layer(layer, cls)
        r = max(1, min(rank, layer.in_features, layer.out_features))
        new._init_factors((r, layer.in_features), (layer.out_features, r), alpha / rank)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = x W^T + b + (x A^T)(s B)^T: the scale on the small B, not the output, and the
        # low-rank term added by the GEMM itself (addmm), so no pass over the output is extra
        out = F.linear(x, self.weight, self.bias)
        low = F.linear(x, self.lora_a)
        flat = torch.addmm(
            out.reshape(-1, self.out_features),
            low.reshape(-1, low.shape[-1]),
            (self.lora_b * self.scale).t(),
        )
        return flat.view(out.shape)


class LoRAConv2d(_LoRA, nn.Conv2d):
    """``nn.Conv2d`` plus a trainable low-rank update (an ``r``-channel convolution with the
    layer's kernel, then a 1×1 one); see the module docstring."""

    plain = nn.Conv2d

    @classmethod
    def wrap(cls, layer: nn.Conv2d, rank: int, alpha: float) -> LoRAConv2d:
        new = _copy_layer(layer, cls)
        fan_in = layer.in_channels * math.prod(layer.kernel_size)
        r = max(1, min(rank, fan_in, layer.out_channels))
        new._init_factors(
            (r, layer.in_channels, *layer.kernel_size), (layer.out_channels, r, 1, 1), alpha / rank
        )
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.conv2d(x, self.lora_a, None, self.stride, self.padding, self.dilation)
        return self._conv_forward(x, self.weight, self.bias) + F.conv2d(
            low, self.lora_b * self.scale
        )


def can_adapt(module: nn.Module) -> bool:
    """Whether :func:`add_lora` adapts this module: exactly an ``nn.Linear``, or exactly an
    ``nn.Conv2d`` with zero padding and no channel groups (a depthwise convolution has few
    parameters to save; a subclass may compute its forward differently, e.g. timm's
    ``Conv2dSame``)."""
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def add_lora(
    model: nn.Module, module_names: Iterable[str], rank: int = 8, alpha: float = 16.0
) -> dict[str, list[str]]:
    """Adapt the named modules of ``model`` in place (each must pass :func:`can_adapt`).

    Returns, per adapted module, the names of its new parameters
    (``"blocks.0.mlp.fc1.lora_a"``, ``"blocks.0.mlp.fc1.lora_b"``). The layers' own weights
    are left as they are; the caller freezes them (the host does: they are in no trainable
    set).
    """
    added: dict[str, list[str]] = {}
    for name in module_names:
        layer = model.get_submodule(name)
        if not can_adapt(layer):
            raise ValueError(f"{name} is a {type(layer).__name__}; LoRA adapts nn.Linear/Conv2d")
        wrapper = LoRALinear if isinstance(layer, nn.Linear) else LoRAConv2d
        _set_module(model, name, wrapper.wrap(layer, rank, alpha))
        added[name] = [f"{name}.lora_a", f"{name}.lora_b"]
    return added


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer of ``model`` by a plain one holding the merged weight, in
    place; returns ``model``. A model without adapters is returned unchanged."""
    adapted = [name for name, m in model.named_modules() if isinstance(m, _LoRA)]
    for name in adapted:
        _set_module(model, name, model.get_submodule(name).merged())
    return model
