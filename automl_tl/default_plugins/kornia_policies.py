"""Augmentation policies built from Kornia ops; they run on the training device.

How ``strength`` s in [0, 1] maps onto Kornia's own scales (s = 0 is always the identity):

=============== =====================================================================
policy          mapping
=============== =====================================================================
none            identity at every strength
flip_crop       RandomResizedCrop scale = (1 - 0.6 s, 1), ratio = (1 - 0.25 s, 1 + 0.25 s)
                (batched: ``cropping_mode="resample"``); RandomHorizontalFlip p = 0.5 s
crop            flip_crop without the flip (for ``[data] orientation = "fixed"``)
color           ColorJitter brightness = contrast = saturation = 0.4 s, hue = 0.1 s
                (p = 1, the order of the four drawn on the host), RandomGrayscale p = 0.2 s
randaugment     RandAugment n = 2, m = round(20 s) clipped to [1, 29] on Kornia's (0, 30)
                magnitude scale (s = 0.5 gives m = 10, near the paper's ImageNet m = 9)
trivialaugment  TrivialAugment (magnitude drawn per batch by the method itself) applied to
                each image with probability s
autoaugment     AutoAugment ImageNet policy applied to each image with probability s
=============== =====================================================================

Geometry each declares (``flips``, ``max_rotation_deg``; see
:attr:`automl_tl.AugmentationPolicy.orientation_safe`): ``flip_crop`` flips; RandAugment,
TrivialAugment and AutoAugment rotate by at most 30° (Kornia's ``("rotate", -30, 30)``) and
never flip; the others do neither. So under ``[data] orientation = "fixed"`` every policy
but ``flip_crop`` is searched, and ``crop`` takes its place in the default list.
"""

from __future__ import annotations

import itertools

import kornia.augmentation as K
import torch
from kornia.augmentation.auto import AutoAugment, RandAugment, TrivialAugment
from torch import nn

from automl_tl import hookimpl
from automl_tl.components import AugmentationPolicy


class ApplyToFraction(nn.Module):
    """Apply ``op`` to each image of the batch independently with probability ``p``."""

    def __init__(self, op: nn.Module, p: float) -> None:
        super().__init__()
        self.op, self.p = op, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p >= 1.0:
            return self.op(x)
        # drawn on the host, so which images to augment is known without a device sync
        chosen = torch.nonzero(torch.rand(x.shape[0]) < self.p).flatten()
        if len(chosen) == 0:
            return x
        if x.is_cuda:
            chosen = chosen.pin_memory().to(x.device, non_blocking=True)
        out = x.clone()
        out[chosen] = self.op(x[chosen]).to(x.dtype)
        return out


class _Policy(AugmentationPolicy):
    def __init__(
        self, name: str, description: str, builder, *, flips=False, max_rotation_deg=0.0
    ) -> None:
        self.name, self.description, self._builder = name, description, builder
        self.flips, self.max_rotation_deg = flips, max_rotation_deg

    def build(self, strength: float, image_size: int) -> nn.Module:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if strength == 0.0:
            return nn.Identity()
        return self._builder(float(strength), int(image_size))


def _crop(s: float, size: int) -> nn.Module:
    # "resample": one batched affine warp crops and resizes every image at once; the default
    # "slice" mode crops image by image with its box sizes read back to the host (a sync)
    return K.RandomResizedCrop(
        (size, size),
        scale=(1.0 - 0.6 * s, 1.0),
        ratio=(1 - 0.25 * s, 1 + 0.25 * s),
        cropping_mode="resample",
    )


def _flip_crop(s: float, size: int) -> nn.Module:
    return nn.Sequential(_crop(s, size), K.RandomHorizontalFlip(p=0.5 * s))


class ColorJitterInHostOrder(nn.Module):
    """Kornia's ``ColorJitter`` (brightness, contrast, saturation, hue in a random order per
    batch) without a host sync: the order is drawn on the host and the batch goes to a
    jitter of that fixed order, whose steps are selected with ``torch.where``. Kornia's own
    random order reads its order and each step's ``factor.any()`` back from the device, five
    syncs per batch once the augmentation runs on a GPU."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float) -> None:
        super().__init__()
        self.orders = list(itertools.permutations(range(4)))
        self.jitters = nn.ModuleList(
            K.ColorJitter(brightness, contrast, saturation, hue, p=1.0, order=order)
            for order in self.orders
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.jitters[int(torch.randint(len(self.orders), ()))](x)


def _color(s: float, size: int) -> nn.Module:
    # RandomGrayscale at p < 1 blends its applied rows in with torch.where (Kornia 0.9): no sync
    return nn.Sequential(
        ColorJitterInHostOrder(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s),
        K.RandomGrayscale(p=0.2 * s),
    )


def _randaugment(s: float, size: int) -> nn.Module:
    return RandAugment(n=2, m=min(29, max(1, round(20 * s))))


POLICIES = [
    _Policy("none", "no augmentation", lambda s, size: nn.Identity()),
    _Policy(
        "flip_crop",
        "random resized crop and horizontal flip (geometric)",
        _flip_crop,
        flips=True,
    ),
    _Policy("crop", "random resized crop, no flip (geometric, keeps orientation)", _crop),
    _Policy("color", "colour jitter and random grayscale (photometric)", _color),
    _Policy(
        "randaugment",
        "RandAugment, 2 ops at magnitude 20·s of 30",
        _randaugment,
        max_rotation_deg=30.0,
    ),
    _Policy(
        "trivialaugment",
        "TrivialAugment applied to a fraction s of images",
        lambda s, size: ApplyToFraction(TrivialAugment(), s),
        max_rotation_deg=30.0,
    ),
    _Policy(
        "autoaugment",
        "AutoAugment (ImageNet policy) applied to a fraction s of images",
        lambda s, size: ApplyToFraction(AutoAugment("imagenet"), s),
        max_rotation_deg=30.0,
    ),
]


@hookimpl(trylast=True)
def register_augmentation_policies(register):
    for policy in POLICIES:
        register(policy)
