"""The contracts a plugin implements: Backbone, AugmentationPolicy, UnfreezeStrategy, DatasetSource.

Every built-in component is an instance of one of these classes registered through a hook
(see :mod:`automl_tl.hookspecs`), exactly as a third-party plugin registers its own.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UserError

#: Parameter names of one layer group; a backbone's groups are ordered input -> output.
LayerGroup = list[str]


@dataclass(frozen=True)
class DataConfig:
    """What a model expects as input: (channels, height, width), per-channel mean and std."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


class Backbone(ABC):
    """A pretrained (or scratch) feature extractor with a fresh classification head.

    Subclasses set :attr:`name` and implement :meth:`create`; the other methods have defaults
    that work for timm models and for any ``nn.Module`` whose last child is the classifier.
    """

    name: str = ""
    #: Short human description shown by ``automl-tl plugins``.
    description: str = ""

    @abstractmethod
    def create(
        self, num_classes: int, weights: str = "none", image_size: int | None = None
    ) -> nn.Module:
        """Build the model with a new ``num_classes`` head.

        Args:
            num_classes: size of the new classification head.
            weights: ``"none"`` (random init), ``"timm"`` / ``"timm:TAG"`` (hub weights), a
                path to a ``.safetensors`` / torch checkpoint file (``pretrain:SOURCE`` arrives
                as the file it built) or ``"local-dir:DIR"``, an exported model folder
                (:func:`automl_tl.weights.local_dir_weights` finds its weights file).
            image_size: the study's square input size, for models that need to know it.
        """

    def regularizers(self) -> frozenset[str]:
        """The searched regularizers this backbone's models implement themselves, from
        ``"drop_path"`` (stochastic depth): the host then passes the trial's rate to
        :meth:`create` as the keyword argument ``drop_path_rate``. The other regularizers
        (mixup, CutMix, label smoothing, EMA, clipping, warm-up) work on any model and need
        no declaration.

        Default: none, so a backbone that says nothing is created as before; for it the
        study's ``[search] drop_path`` is not searched (a note says so). timm backbones
        declare ``"drop_path"`` when their architecture takes ``drop_path_rate``.
        """
        return frozenset()

    def check_weights(self, source: str) -> None:
        """Refuse a named weight source this backbone does not take, saying what it takes.

        The host calls it for every ``[weights]`` value of the form ``NAME`` or ``NAME:TAG``
        (``"timm:a1_in1k"``, ``"torchvision"``; not ``"none"``, files, ``local-dir:`` or
        ``pretrain:``, which it checks itself) before a search or a retrain trains anything,
        so that a typo is one message at the start instead of a failure in every trial.
        It must work offline and quickly: look the name up, never download.

        Returns ``None`` when ``create(weights=source)`` can use the source; raises
        :class:`automl_tl.UserError` (or ``ValueError``) otherwise, with a message that names
        the problem and lists the sources (and tags) the backbone knows; the host prefixes it
        with the ``[weights]`` entry and the sources every backbone takes.

        Default: ``"none"`` only (a backbone that defines no named sources). A plugin that
        defines its own (``"torchvision:TAG"``) overrides it; timm backbones take ``"timm"``
        and ``"timm:TAG"`` with a tag timm knows for the architecture.
        """
        if source == "none":
            return
        raise UserError(f'{self.name} has no weight source "{source}": it defines no named sources')

    def head_parameters(self, model: nn.Module) -> list[str]:
        """Names of the classifier head's parameters (always trainable)."""
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        if classifier is None:
            classifier = list(model.children())[-1]
        ids = {id(p) for p in classifier.parameters()}
        return [n for n, p in model.named_parameters() if id(p) in ids]

    def layer_groups(self, model: nn.Module) -> list[LayerGroup]:
        """Body parameter groups ordered input -> output, the head excluded.

        Default: timm's ``group_matcher(coarse=True)`` where the model has one, else one group
        per top-level child module.
        """
        head = set(self.head_parameters(model))
        groups: list[LayerGroup]
        if hasattr(model, "group_matcher"):
            from timm.models import group_parameters

            grouped = group_parameters(model, model.group_matcher(coarse=True))
            groups = [list(names) for _, names in sorted(grouped.items())]
        else:
            groups = []
            for child_name, child in model.named_children():
                groups.append([f"{child_name}.{n}" for n, _ in child.named_parameters()])
        groups = [[n for n in g if n not in head] for g in groups]
        return [g for g in groups if g]

    def data_config(self, model: nn.Module) -> DataConfig:
        """Input size, mean and std the backbone's weights were trained with."""
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return DataConfig(
            input_size=tuple(cfg.get("input_size", (3, 224, 224))),
            mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        )

    def export(
        self,
        model: nn.Module,
        directory: Path,
        label_names: list[str],
        data_config: DataConfig,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write the model so it can be loaded again (``model.safetensors`` + ``config.json``).

        The default writes timm's own format for timm models (``timm.create_model(
        "local-dir:DIR", pretrained=True)`` loads it); other models get the same files with
        ``"architecture"`` set to this backbone's name, loadable through
        :func:`automl_tl.load_model` when the plugin is installed.
        """
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        data = {
            "input_size": list(data_config.input_size),
            "mean": list(data_config.mean),
            "std": list(data_config.std),
        }
        if getattr(model, "pretrained_cfg", None) is not None:
            from timm.models import save_for_hf

            save_for_hf(
                model,
                str(directory),
                model_config={"label_names": list(label_names)},
                safe_serialization=True,
                data_config=data,
            )
            config = json.loads((directory / "config.json").read_text())
        else:
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(directory / "model.safetensors"))
            config = {
                "architecture": self.name,
                "num_classes": len(label_names),
                "label_names": list(label_names),
                "pretrained_cfg": {**data, "num_classes": len(label_names)},
            }
        config["automl_tl"] = {"backbone": self.name, **(extra or {})}
        (directory / "config.json").write_text(json.dumps(config, indent=2))


#: The largest rotation (degrees) a policy may apply under ``[data] orientation = "fixed"``:
#: the ±30° of RandAugment / TrivialAugment / AutoAugment keep a digit or a letter what it is;
#: a flip, or a half turn, does not (a mirrored 2 or a 6 turned into a 9).
MAX_FIXED_ORIENTATION_ROTATION = 30.0


#: the size the orientation probe runs at (at least: fewer pixels blur the stripes)
PROBE_SIZE = 32


class AugmentationPolicy(ABC):
    """A family of training-time augmentations with one strength knob.

    ``build(strength, image_size)`` returns an ``nn.Module`` that maps a float batch
    ``(B, 3, H, W)`` in ``[0, 1]`` on the training device to a batch of the same shape.
    Strength 0.0 is the identity, 1.0 the strongest sensible setting. Randomness comes from
    torch's global generator, so the same seed gives the same augmentation.
    """

    name: str = ""
    description: str = ""
    #: Whether the policy may mirror an image (horizontally or vertically) at some strength.
    flips: bool = False
    #: The largest rotation, in degrees, the policy may apply at strength 1.0 (0: none).
    max_rotation_deg: float = 0.0

    @property
    def orientation_safe(self) -> bool:
        """Whether the policy keeps labels that depend on orientation (digits, text): it never
        flips and rotates by at most :data:`MAX_FIXED_ORIENTATION_ROTATION` degrees. Only such
        policies are searched under ``[data] orientation = "fixed"``; the contract suite checks
        that a policy declared safe does not flip (:func:`automl_tl.testing.check_policy`)."""
        return not self.flips and self.max_rotation_deg <= MAX_FIXED_ORIENTATION_ROTATION

    @abstractmethod
    def build(self, strength: float, image_size: int) -> nn.Module:
        """Return the augmentation module for ``strength`` in [0, 1]."""


# ---------------------------------------------------------------------------------------------
# the orientation probe: how "orientation_safe" is checked (testing.check_policy_orientation,
# and the search's start under [data] orientation = "fixed")


def orientation_probe(image_size: int = PROBE_SIZE, n: int = 32) -> torch.Tensor:
    """``n`` copies of an image whose mirror is told apart anywhere in it: diagonal stripes
    rising to the right ("/"), tinted per channel. Crops, zooms, colour changes and small
    rotations keep them rising; a horizontal or vertical flip makes them fall."""
    i = torch.arange(image_size, dtype=torch.float32)
    period = max(4.0, image_size / 5)
    wave = torch.sin(2 * torch.pi * (i[:, None] + i[None, :]) / period)
    tint = torch.tensor([0.35, 0.3, 0.25])[:, None, None]
    image = 0.5 + tint * wave[None]
    return image.expand(n, 3, image_size, image_size).contiguous()


def stripe_direction(batch: torch.Tensor) -> torch.Tensor:
    """Per image, which way the edges of its central half run, in [-1, 1]: the structure
    tensor's normalised off-diagonal ``2 Σ gx·gy / Σ (gx² + gy²)`` of the channel mean. The
    probe scores +1, its mirror -1, an image without edges 0 (the border, where rotations and
    shears pad, is left out)."""
    g = batch.float().mean(dim=1)
    h, w = g.shape[-2:]
    g = g[:, h // 4 : h - h // 4, w // 4 : w - w // 4]
    gx = g[:, 1:-1, 2:] - g[:, 1:-1, :-2]
    gy = g[:, 2:, 1:-1] - g[:, :-2, 1:-1]
    cross = (gx * gy).sum(dim=(1, 2))
    energy = (gx * gx + gy * gy).sum(dim=(1, 2))
    return 2 * cross / energy.clamp_min(1e-8)


#: :func:`stripe_direction` below this is a mirrored probe. A flip after the strongest crop of
#: the built-ins (aspect ratio 3:4) scores <= -0.96; orientation-preserving ops score higher:
#: a rotation by 30° +0.5, Kornia's strongest shear (54°, TrivialAugment) about -0.66
MIRRORED = -0.9


def flipped_outputs(
    policy: AugmentationPolicy, image_size: int = PROBE_SIZE, repeats: int = 8, seed: int = 0
) -> int:
    """How many of ``repeats`` × 32 augmentations of :func:`orientation_probe` at strength 1.0
    came out mirrored (closer to the flipped probe than any orientation-keeping op gets:
    :data:`MIRRORED`). 0 for a policy that keeps orientation. Probed at 32 px or more: on
    fewer pixels, resampling blurs the stripes too much to tell."""
    image_size = max(PROBE_SIZE, image_size)
    x = orientation_probe(image_size)
    augment = policy.build(1.0, image_size)
    flipped = 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(repeats):
            with torch.no_grad():
                flipped += int((stripe_direction(augment(x.clone())) < MIRRORED).sum())
    return flipped


@dataclass(frozen=True)
class ParamGroup:
    """Parameters that share one learning rate: ``lr = base_lr * lr_scale``."""

    names: list[str]
    lr_scale: float = 1.0


class UnfreezeStrategy(ABC):
    """Which parameters train, when, and at which learning rate.

    ``depth`` is the number of body groups counted from the top (0 = linear probe, i.e. head
    only; ``len(groups)`` = full fine-tune). Strategies are stateless: the host asks them for
    the optimizer's parameter groups once and for the trainable set at every epoch, sets
    ``requires_grad`` accordingly and keeps BatchNorm statistics of frozen layers frozen.

    A strategy may train a subset of a group's parameters (BitFit: its biases) and may add
    parameters to the model (LoRA: low-rank adapters): :meth:`adapt` runs once, before
    training, and returns the layer groups the other methods then get; :meth:`merge` runs
    once after training and folds added parameters back, so the model is exported with the
    backbone's own parameter names (plain timm loads it). The host checks that the merged
    model has exactly the parameters the backbone created.
    """

    name: str = ""
    description: str = ""
    #: Whether the strategy makes sense from random init, applied at full depth: the whole body
    #: trains from the first epoch at full lr (``top_k``). A strategy that keeps part of the
    #: body frozen for some epochs (``gradual``, ``lp_ft``) or slows the lower layers down
    #: (``layer_decay``) protects pretrained features; from random init it trains a head on
    #: random features, so the search offers only ``from_scratch`` strategies to trials without
    #: pretrained weights (see the space table in docs/architecture.md).
    from_scratch: bool = False

    def adapt(
        self, model: nn.Module, groups: list[LayerGroup], head: list[str], depth: int
    ) -> list[LayerGroup]:
        """Prepare ``model`` for training at ``depth`` and return the layer groups that
        :meth:`param_groups` and :meth:`trainable` get.

        Called once per training run, before the model moves to the device. It may change
        the model in place (replace a submodule with ``setattr``; the head stays as it is)
        and return, per group (same number, same order), the names the strategy trains of
        it: the group itself, a subset (its biases), or new names (an adapter's parameters).
        At depth 0 it must leave the model unchanged (a linear probe trains the head on the
        body's cached features). Default: the model and the groups unchanged.
        """
        return groups

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold what :meth:`adapt` added back into the backbone's own parameters and return
        the model, which must then have exactly the parameter names and shapes the backbone
        created (adapters merged: :func:`automl_tl.adapters.merge_lora`). Called once after
        training, before anything evaluates the final model or exports it. Default: the
        model unchanged."""
        return model

    def configure(self, **options: Any) -> UnfreezeStrategy:
        """This strategy with a trial's options (``lora``: ``rank``), as a new object: the
        registered one is shared by every trial and stays as it is. The host calls it once
        per training run, before :meth:`adapt`, with the options the search chose for the
        trial (``Choice.strategy_options``; which strategies take which options, and the
        ``[search]`` key each is searched from: :data:`automl_tl.space.STRATEGY_OPTIONS`).
        Default: the strategy takes no options (``self`` for none, an error for any)."""
        if options:
            raise UserError(
                f"unfreeze strategy {self.name!r} takes no options, got {sorted(options)}"
            )
        return self

    @abstractmethod
    def param_groups(
        self, groups: list[LayerGroup], head: list[str], depth: int
    ) -> list[ParamGroup]:
        """Every parameter that trains at some epoch, grouped by learning-rate scale."""

    def trainable(
        self, epoch: int, epochs: int, groups: list[LayerGroup], head: list[str], depth: int
    ) -> set[str]:
        """Names of the parameters that train during ``epoch`` (0-based). Default: all of them."""
        return {n for g in self.param_groups(groups, head, depth) for n in g.names}


class Metric(ABC):
    """A score a team selects models by (recall at a fixed precision, a cost-weighted error),
    registered with ``register_metrics``; usable as ``[search] metric`` (higher- or
    lower-is-better), in pruning, racing, ensembles and in the report beside the built-in
    ``accuracy``, ``balanced_accuracy`` and ``macro_f1``.

    ``score(y_true, y_pred)`` gets the true class indices (``int64``, shape ``(N,)``) and
    either the predicted classes (shape ``(N,)``) or, with :attr:`uses_probabilities`, the
    class probabilities (``float32``, shape ``(N, C)``, rows sum to 1). It must return a
    finite float within :attr:`range`; anything else fails the trial with a message naming
    the metric (and fails the contract suite, :func:`automl_tl.testing.check_metric`).
    """

    name: str = ""
    description: str = ""
    #: True: larger is better; False: smaller is (a cost, an error). As ``[search] metric``
    #: the study is created to maximize or minimize it, and every ranking follows.
    higher_is_better: bool = True
    #: the values ``score`` can return, (low, high)
    range: tuple[float, float] = (0.0, 1.0)
    #: True: ``score`` gets class probabilities (N, C) instead of predicted classes (N,)
    uses_probabilities: bool = False

    @abstractmethod
    def score(self, y_true: np.ndarray, y_pred: np.ndarray) -> float:
        """The metric of predictions ``y_pred`` against ``y_true``."""

    def checked(self, y_true: np.ndarray, probs: np.ndarray) -> float:
        """:meth:`score` on these probabilities (or their argmax), refused when NaN, infinite
        or outside :attr:`range`."""
        y_pred = probs if self.uses_probabilities else probs.argmax(1)
        value = self.score(y_true, y_pred)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(
                f"metric {self.name!r} returned {value!r}, not a number; score() must return a float"
            ) from None
        low, high = self.range
        if not np.isfinite(value) or not low <= value <= high:
            raise UserError(
                f"metric {self.name!r} returned {value} on {len(y_true)} images, outside its "
                f"declared range [{low}, {high}]; fix its score() or its range"
            )
        return value


@dataclass
class Record:
    """One labelled image: a file path or a decoded array, its class name, and its split if fixed.

    A multi-label record (``[data] task = "multilabel"``) names its labels in ``labels``
    (one or more) and leaves ``label`` empty: ``Record(path, labels=("cat", "sofa"))``.
    """

    image: str | Path | np.ndarray
    label: str = ""
    split: str | None = None  # "train" | "val" | "test" | None (split by the study)
    labels: tuple[str, ...] = ()

    @property
    def label_set(self) -> tuple[str, ...]:
        """Every label of the image: ``labels``, or ``(label,)`` for a single-label record."""
        return tuple(self.labels) if self.labels else (self.label,)

    @property
    def label_text(self) -> str:
        """The labels as one string (``label`` itself for a single-label record): the
        record's identity in fingerprints."""
        return self.label if not self.labels else " ".join(self.labels)


@dataclass
class Dataset:
    """What a DatasetSource returns: its records and, optionally, a fixed class order."""

    records: list[Record]
    class_names: list[str] | None = None
    #: Files that could not be listed or read, as (path, reason); reported, never silently used.
    problems: list[tuple[str, str]] = field(default_factory=list)


class DatasetSource(ABC):
    """A kind of labelled image dataset, named in the study as ``name`` or ``name:ARGUMENT``."""

    name: str = ""
    description: str = ""
    #: True when the source needs an argument after the colon (a path, say).
    needs_argument: bool = False

    @abstractmethod
    def load(self, argument: str | None, base_dir: Path) -> Dataset:
        """List the records; relative paths in ``argument`` are resolved against ``base_dir``."""
