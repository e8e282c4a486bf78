"""torchvision's classification models as automl-tl backbones.

Every model of ``torchvision.models.list_models(module=torchvision.models)`` is registered as
``tv_<name>`` (``tv_resnet50``, ``tv_convnext_tiny``, ``tv_vit_b_16``, …). Weight sources,
per backbone in the study's ``[weights]``:

- ``"none"``: random init;
- ``"torchvision"``: the model's ``DEFAULT`` weights enum member (``ResNet50_Weights.DEFAULT``);
- ``"torchvision:TAG"``: a member by name, e.g. ``"torchvision:IMAGENET1K_V1"``;
- a path to a ``.safetensors`` / torch checkpoint saved from the same architecture.

``check_weights`` looks a tag up in the enum, so a search with a mistyped one stops before it
starts with one message listing the model's tags.

torchvision downloads weights into ``$TORCH_HOME/hub/checkpoints`` the first time they are
asked for, and only then; offline, copy that folder from a connected machine. The files there
are read with ``torch.load(weights_only=True)`` (torchvision's own loader unpickles them in
full): a file that holds more than tensors is refused, never run.

Layer groups (for the unfreeze depth) follow the model's own structure: its top-level blocks,
opening the container that holds most of the network (``features``, ``layers``,
``encoder.layers``, ``trunk_output``, ``blocks``) so that there are at least four groups,
with a stem's normalization kept with its convolution. The head is the model's last layer
with parameters (``fc``, ``classifier[-1]``, ``heads.head``, …), replaced by a fresh one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

import automl_tl
from automl_tl.errors import did_you_mean
from automl_tl.weights import load_weights

__version__ = "0.1.0"

PREFIX = "tv_"


def _get_model(name: str, weights, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name, weights=weights)``, the weights' file read safely.

    torchvision reads its hub cache with ``torch.hub.load_state_dict_from_url``, which
    unpickles with ``weights_only=False``: a file put in that folder would run code. Here the
    state dict is read first with ``weights_only=True`` (downloaded and hash-checked if not
    cached), and torchvision's builder gets that state dict in place of reading the file.
    """
    if weights is None:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    enum = type(weights)
    own = enum.__dict__.get("get_state_dict")  # normally none: WeightsEnum's
    base = torchvision.models.WeightsEnum.get_state_dict

    def read(self, *args, **kw):
        return state if self is weights else base(self, *args, **{**kw, "weights_only": True})

    enum.get_state_dict = read
    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    finally:
        if own is None:
            del enum.get_state_dict
        else:
            enum.get_state_dict = own


WEIGHTS = "torchvision"
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def model_names() -> list[str]:
    """torchvision's classification models (no detection, segmentation, video, quantized)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _head_path(model: nn.Module) -> str:
    """The last module with parameters of its own: the classifier."""
    last = ""
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            last = name
    return last


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _new_head(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes)
    if isinstance(old, nn.Conv2d):  # SqueezeNet classifies with a 1x1 convolution
        return nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size)
    raise TypeError(f"cannot replace a {type(old).__name__} classifier")


class _MNASNet(torchvision.models.MNASNet):
    """MNASNet that loads a state dict without torchvision's version metadata (a
    ``.safetensors`` file has none; torchvision's own refuses it)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        metadata = {**local_metadata, "version": local_metadata.get("version", 2)}
        super()._load_from_state_dict(state_dict, prefix, metadata, *args)


def _numel(module: nn.Module, skip: set[int]) -> int:
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)


class TorchvisionBackbone(automl_tl.Backbone):
    """One torchvision classification model, e.g. ``TorchvisionBackbone("resnet50")``."""

    description = "torchvision classification model"

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.name = PREFIX + model_name

    # -- weights

    def weights_enum(self):
        """The model's weights enum, e.g. ``torchvision.models.ResNet50_Weights``."""
        return torchvision.models.get_model_weights(self.model_name)

    def torchvision_weights(self, source: str):
        """``"torchvision"`` -> the DEFAULT member; ``"torchvision:TAG"`` -> that member."""
        enum = self.weights_enum()
        tag = source.partition(":")[2] or "DEFAULT"
        if tag not in enum.__members__:
            raise automl_tl.UserError(
                f"{self.name} has no torchvision weights {tag!r}"
                f"{did_you_mean(tag, enum.__members__)}; choose one of "
                + ", ".join(f"torchvision:{m}" for m in enum.__members__)
            )
        return enum[tag]

    def check_weights(self, source: str) -> None:
        """``"none"``, ``"torchvision"`` and ``"torchvision:TAG"`` with a member of the model's
        weights enum (looked up, not downloaded)."""
        if source == "none":
            return
        name = source.partition(":")[0]
        if name == WEIGHTS:
            self.torchvision_weights(source)
        elif name == "timm":
            raise automl_tl.UserError(self._not_timm())
        else:
            hint = did_you_mean(name, [WEIGHTS])
            tags = ", ".join(self.weights_enum().__members__)
            raise automl_tl.UserError(
                f'{self.name} has no weight source "{source}"{hint}; it takes "torchvision" '
                f'(the DEFAULT weights) or "torchvision:TAG", known tags: {tags}'
            )

    def _not_timm(self) -> str:
        return (
            f'{self.name} is a torchvision model: use [weights] {self.name} = "torchvision" '
            '(or "torchvision:TAG", a file, or "none"), not timm hub weights'
        )

    def _build(self, weights, image_size: int | None) -> nn.Module:
        kwargs = {}
        if self.model_name in ("googlenet", "inception_v3"):
            kwargs["aux_logits"] = False  # a single output in training too
            if weights is None:
                kwargs["init_weights"] = True
        if self.model_name.startswith("vit_") and image_size is not None:
            if weights is None:
                kwargs["image_size"] = image_size
            elif weights.meta["min_size"][0] != image_size:
                return self._vit_at(weights, image_size)
        return _get_model(self.model_name, weights, **kwargs)

    def _vit_at(self, weights, image_size: int) -> nn.Module:
        """A ViT with pretrained weights at another image size: position embeddings resized."""
        from torchvision.models.vision_transformer import interpolate_embeddings

        native = _get_model(self.model_name, weights)
        state = interpolate_embeddings(image_size, native.patch_size, native.state_dict())
        model = torchvision.models.get_model(
            self.model_name,
            weights=None,
            image_size=image_size,
            num_classes=native.heads.head.out_features,
        )
        model.load_state_dict(state)
        return model

    def create(self, num_classes: int, weights: str = "none", image_size: int | None = None):
        source = weights or "none"
        chosen = None
        if source == WEIGHTS or source.startswith(WEIGHTS + ":"):
            chosen = self.torchvision_weights(source)
            try:
                model = self._build(chosen, image_size)
            except Exception as exc:  # no network, no cached file
                raise automl_tl.UserError(
                    f"cannot get torchvision weights {chosen} for {self.name}: "
                    f"{type(exc).__name__}: {exc}. torchvision keeps them in "
                    f"{Path(torch.hub.get_dir()) / 'checkpoints'}; copy that folder from a "
                    f'connected machine, or save the weights to a file and set [weights] {self.name} = "/path/model.safetensors".'
                ) from exc
        elif source == "timm" or source.startswith("timm:"):
            raise automl_tl.UserError(self._not_timm())
        else:
            model = self._build(None, image_size)
        if type(model) is torchvision.models.MNASNet:
            model.__class__ = _MNASNet
        head = _head_path(model)
        _set_module(model, head, _new_head(model.get_submodule(head), num_classes))
        model.automl_tl_weights = chosen  # the preprocessing to use (data_config)
        if chosen is None and source != "none":
            load_weights(model, Path(source), self.head_parameters(model))
        return model

    # -- the contract

    def head_parameters(self, model: nn.Module) -> list[str]:
        head = _head_path(model)
        return [f"{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()]

    def layer_groups(self, model: nn.Module) -> list[list[str]]:
        head_module = model.get_submodule(_head_path(model))
        skip = {id(p) for p in head_module.parameters()}
        total = max(1, _numel(model, skip))

        def own(prefix: str, module: nn.Module) -> list[str]:
            dot = f"{prefix}." if prefix else ""
            return [dot + n for n, p in module.named_parameters(recurse=False) if id(p) not in skip]

        def children(prefix: str, module: nn.Module):
            dot = f"{prefix}." if prefix else ""
            return [(dot + n, m) for n, m in module.named_children() if m is not head_module]

        def openable(module: nn.Module | None) -> bool:
            if module is None:
                return False
            inner = [m for _, m in module.named_children() if _numel(m, skip)]
            return len(inner) >= 2

        # units: (prefix, module), or (None, [names]) for parameters a container holds itself
        units: list[tuple] = [(None, own("", model))] + children("", model)
        while True:
            sizes = [
                _numel(m, skip) if p is not None else 0 for p, m in units
            ]  # own parameters are tiny (tokens, embeddings)
            candidates = [i for i, (p, m) in enumerate(units) if p is not None and openable(m)]
            if not candidates:
                break
            i = max(candidates, key=lambda k: sizes[k])
            busy = sum(1 for (p, m), s in zip(units, sizes) if s)
            if not (sizes[i] > 0.8 * total or busy < 4):
                break
            prefix, module = units[i]
            units[i : i + 1] = [(None, own(prefix, module))] + children(prefix, module)

        groups: list[list[str]] = []
        pending: list[str] = []  # a container's own parameters join the next group
        previous_leaf = False
        for prefix, module in units:
            if prefix is None:
                pending += module
                continue
            names = [f"{prefix}.{n}" for n, p in module.named_parameters() if id(p) not in skip]
            if not names:
                continue
            leaf = not any(True for _ in module.children())
            if isinstance(module, _NORMS) and previous_leaf and groups and not pending:
                groups[-1] += names  # a stem's norm stays with its convolution (conv1 + bn1)
            else:
                groups.append(pending + names)
                pending = []
            previous_leaf = leaf
        if pending:
            groups.append(pending)
        return groups

    def data_config(self, model: nn.Module) -> automl_tl.DataConfig:
        """The weights' own preprocessing (the DEFAULT weights' when trained from scratch)."""
        weights = getattr(model, "automl_tl_weights", None) or self.weights_enum().DEFAULT
        transforms = weights.transforms()
        size = int(transforms.crop_size[0])
        return automl_tl.DataConfig((3, size, size), tuple(transforms.mean), tuple(transforms.std))


@automl_tl.hookimpl
def register_backbones(register):
    for name in model_names():
        register(TorchvisionBackbone(name))
