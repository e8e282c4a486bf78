"""fit(): train one configuration on one device, score it every epoch, report for pruning.

The hot loop never waits on the host:

- batches come from the decoded uint8 cache; on a GPU a split that fits is copied to the
  device once and stays there (shared by the trials of the process), so a step only gathers
  rows on the device; otherwise rows are gathered on the host, pinned and copied without
  blocking;
- uint8 -> float, augmentation (Kornia, on the device) and normalization run on the device
  (one fused scale-and-shift when there is no augmentation), in the model's memory format;
- forward/backward under bf16 autocast on CUDA, channels-last for convolutional backbones,
  ``cudnn.benchmark`` on, optionally ``torch.compile``;
- the loss is summed on the device and read once per epoch: no step forces a host sync;
- parameters of frozen layer groups have ``requires_grad`` off (autograd then runs no
  backward below the lowest trainable group) and frozen BatchNorm stays in eval mode;
- evaluation runs under ``inference_mode``.

A linear probe without augmentation trains the head on cached features
(:mod:`automl_tl.features`). On out-of-memory before the first epoch is reported, the trial
restarts with half the batch size (recorded in :attr:`FitResult.batch_size`); strategies
whose trainable set grows over the epochs are first tried once at their peak on CUDA, so
running out of memory late is caught up front.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import features as _features
from ._util import is_out_of_memory as _is_out_of_memory
from .components import Backbone, DataConfig, Metric, UnfreezeStrategy
from .config import metric_direction
from .data import Split, Splits, batches
from .errors import ConfigError, DataError
from .recipe import (
    BACKBONE_REGULARIZERS,
    Recipe,
    balanced_order,
    class_counts,
    clip_gradients,
    lr_schedule,
    mixer_for,
    resolve_imbalance,
    smooth_multi_hot,
    warmup_steps,
    weight_average,
)
from .recipe import training_loss as recipe_loss
from .registry import Registry
from .tasks import MULTICLASS, MultiLabelScores, Task, for_targets

log = logging.getLogger("automl_tl")

#: Devices on which a strategy that unfreezes more later is first tried at its peak memory.
MEMORY_PROBE_DEVICES = {"cuda"}
#: A split is kept on the GPU when it takes at most this fraction of the free memory.
RESIDENT_FRACTION = 0.25
#: How many splits stay resident on the GPU (train, val, test, train+val).
RESIDENT_SPLITS = 4
#: The share of the GPU's memory this process may use, when workers share a GPU
#: (set per worker by ``--trials-per-gpu``; see :mod:`automl_tl.workers`).
MEMORY_FRACTION_ENV = "AUTOML_TL_MEMORY_FRACTION"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class Choice:
    """One configuration of the search space: everything fit() needs to train a model."""

    backbone: str
    weights: str = "none"
    augmentation: str = "none"
    aug_strength: float = 0.0
    unfreeze: str = "top_k"
    unfreeze_depth: float = 1.0  # fraction of the backbone's layer groups
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 5
    batch_size: int = 64
    extra: dict[str, Any] = field(default_factory=dict)
    #: regularizers and the answer to class imbalance (automl_tl.recipe); default: plain
    recipe: Recipe = field(default_factory=Recipe)
    #: the searched image size (``[data] image_size = [160, 224]``); None: the study's one.
    #: fit() trains at the size of the splits it gets: pass ``data.splits_at(..., image_size)``
    image_size: int | None = None
    #: the unfreeze strategy's options for this trial (``lora``: ``{"rank": 16}``), handed to
    #: :meth:`UnfreezeStrategy.configure`; empty: the registered strategy as it is
    strategy_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    lr: float
    seconds: float
    images_per_s: float
    val: dict[str, float] | None = None
    #: the head trained on cached features this epoch (images/s is then not the backbone's)
    cached_features: bool = False


@dataclass
class FitResult:
    """A trained model with its history; ``val`` holds the last epoch's validation metrics."""

    model: nn.Module
    backbone: Backbone
    data_config: DataConfig
    history: list[EpochResult]
    val: dict[str, Any] | None
    seconds: float
    images_per_s: float
    depth: int
    num_groups: int
    #: the batch size trained with: always the choice's (each optimizer step sees it)
    batch_size: int = 0
    oom_retries: int = 0
    #: images per forward/backward: the batch size, or less after out-of-memory (the batch's
    #: gradient is then accumulated over ``batch_size // micro_batch`` micro-batches)
    micro_batch: int = 0
    #: with ``compile``: "yes", or "no: <why>" (:func:`compile_decision`); None when not asked
    compiled: str | None = None
    #: "hit" / "miss" when the head trained on cached features (miss: computed here), else None
    feature_cache: str | None = None
    #: seconds spent computing features for the cache (0 on a hit)
    feature_seconds: float = 0.0
    #: the epoch (0-based) whose validation score was best, and that score's metrics
    best_epoch: int | None = None
    best_val: dict[str, Any] | None = None
    #: log-probabilities on the evaluated split (``keep_predictions``): at the best epoch
    #: with ``patience``, else at the last
    val_log_probs: torch.Tensor | None = None
    #: training stopped early: no improvement for ``patience`` epochs
    stopped_early: bool = False
    #: with EMA of the weights: True when the averaged weights scored better at the last
    #: epoch (then :attr:`model` is the averaged model), False when the raw ones did
    ema_won: bool | None = None
    #: the answer to class imbalance the trial trained with (``auto`` resolved)
    imbalance: str = "none"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` / ``None`` -> CUDA when available, else CPU; else the device named.

    Raises :class:`ConfigError` for a name torch does not know (``"cdua"``) or a device this
    machine does not have (``"cuda"`` without a visible GPU, ``"cuda:7"`` with two).
    """
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        return device
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device {device!r} is not a device name; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device {device!r}: no CUDA device is visible here; use cpu (or auto)"
            )
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(
                f"device {device!r}: only {count} CUDA device(s) are visible "
                f"(cuda:0 … cuda:{count - 1})"
            )
    elif resolved.type == "mps" and not (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    ):
        raise ConfigError(f"device {device!r}: MPS is not available here; use cpu (or auto)")
    return resolved


def depth_to_groups(fraction: float, num_groups: int) -> int:
    """Unfreeze depth as a fraction of the body's layer groups -> a number of groups."""
    return max(0, min(num_groups, int(round(fraction * num_groups))))


def classification_metrics(confusion: torch.Tensor) -> dict[str, Any]:
    """accuracy, balanced_accuracy and macro_f1 from a confusion matrix (rows = true class)."""
    cm = confusion.double()
    total = cm.sum()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(
        precision + recall > 0,
        2 * precision * recall / (precision + recall).clamp(min=1e-12),
        torch.zeros_like(tp),
    )
    present = support > 0
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "confusion_matrix": confusion.long().tolist(),
    }


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error on any device (CUDA, MPS, a failed host allocation), and
    a cuBLAS / cuDNN allocation failure (:func:`automl_tl._util.is_out_of_memory`); not a
    host ``MemoryError`` (the data, not the batch, is then too large)."""
    return not isinstance(exc, MemoryError) and _is_out_of_memory(exc)


def is_convolutional(model: nn.Module) -> bool:
    """More than one 2-D convolution (a ViT's patch embedding alone does not count)."""
    convs = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            convs += 1
            if convs > 1:
                return True
    return False


def memory_format_for(model: nn.Module, device: torch.device) -> torch.memory_format:
    """channels-last for convolutional backbones on CUDA, else the default layout."""
    if device.type == "cuda" and is_convolutional(model):
        return torch.channels_last
    return torch.contiguous_format


def _autocast(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


class _Inputs:
    """uint8 batches -> normalized float batches in the model's memory format, on the device."""

    def __init__(
        self, cfg: DataConfig, device: torch.device, memory_format: torch.memory_format
    ) -> None:
        mean = torch.tensor(cfg.mean, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / torch.tensor(cfg.std, device=device).view(1, -1, 1, 1)
        self.shift = -mean * self.scale
        self.scale_u8 = self.scale / 255.0
        self.memory_format = memory_format

    def __call__(self, xb: torch.Tensor, augment: nn.Module | None = None) -> torch.Tensor:
        if augment is None:  # one conversion pass and an in-place scale and shift
            x = xb.to(torch.float32, memory_format=self.memory_format)
            return x.mul_(self.scale_u8).add_(self.shift)
        with torch.no_grad():
            x = augment(xb.float().div_(255.0))
        return torch.addcmul(self.shift, x, self.scale).contiguous(memory_format=self.memory_format)


# ---------------------------------------------------------------------------------------------
# splits resident on the device

_RESIDENT: OrderedDict[tuple[int, str], tuple[Any, Split]] = OrderedDict()


def on_device(split: Split, device: torch.device) -> Split:
    """``split`` with its images and labels on ``device`` when they fit, else ``split``.

    Only for accelerators: on the CPU the split already is where the model is. The copy is
    kept (for the few splits last used) so later trials of the process reuse it.
    """
    if device.type == "cpu" or len(split) == 0:
        return split
    key = (id(split.x), str(device))
    entry = _RESIDENT.get(key)
    if entry is not None and entry[0] is split.x:
        _RESIDENT.move_to_end(key)
        return entry[1]
    nbytes = int(split.x.nbytes) + int(split.y.nbytes)
    if device.type == "cuda":
        free = _free_gpu_memory(device)
        if nbytes > RESIDENT_FRACTION * free:
            return split
    resident = Split(split.x.to(device), split.y.to(device), split.names)
    _RESIDENT[key] = (split.x, resident)  # the source is held, so its id is never reused
    while len(_RESIDENT) > RESIDENT_SPLITS:
        _RESIDENT.popitem(last=False)
    return resident


def _free_gpu_memory(device: torch.device) -> int:
    """Free bytes on the GPU for this process: the device's free memory, or less when the
    process is capped at a share of it (workers sharing a GPU)."""
    free, total = torch.cuda.mem_get_info(device)
    share = os.environ.get(MEMORY_FRACTION_ENV)
    if share:
        mine = float(share) * total - torch.cuda.memory_reserved(device)
        free = min(free, max(0, int(mine)))
    return free


def release_memory(device: torch.device | None = None) -> None:
    """Drop resident splits and cached features (of ``device``'s kind) and free the memory."""
    kind = device.type if device is not None else None
    for key in [k for k, (_, s) in _RESIDENT.items() if kind is None or s.x.device.type == kind]:
        del _RESIDENT[key]
    _features.FEATURES.clear(kind)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# evaluation


def _confusion(num_classes: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)


def add_to_confusion(confusion: torch.Tensor, labels, predictions, num_classes: int) -> None:
    """Count (label, prediction) pairs into the flat ``confusion`` (row = true class), on its
    device and without a host sync (``torch.bincount`` on CUDA reads the largest index back
    to size its output: one sync per call)."""
    index = labels.long() * num_classes + predictions.long()
    confusion.scatter_add_(0, index, torch.ones_like(index, dtype=confusion.dtype))


def plugin_metrics(registry: Registry) -> list[Metric]:
    """Every metric the plugins registered (``register_metrics``), computed beside the
    built-in ones wherever a model is evaluated."""
    return [registry.get("metrics", name) for name in registry.names("metrics")]


class _Scores:
    """What an evaluation collects: the confusion matrix, log-probabilities when asked, and
    labels and probabilities when a plugin metric needs them."""

    def __init__(
        self,
        num_classes: int,
        device: torch.device,
        metrics: Sequence[Metric],
        log_probs: list[torch.Tensor] | None,
    ):
        self.num_classes, self.metrics, self.log_probs = num_classes, list(metrics), log_probs
        self.confusion = _confusion(num_classes, device)
        self.labels: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.device_log_probs: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, yb: torch.Tensor) -> None:
        add_to_confusion(self.confusion, yb, logits.argmax(1), self.num_classes)
        # kept on the device until the end: a copy to the host per batch would be a sync each
        if self.log_probs is not None:
            self.device_log_probs.append(logits.float().log_softmax(1))
        if self.metrics:
            self.labels.append(yb)
            self.probs.append(logits.float().softmax(1))

    def result(self) -> dict[str, Any]:
        if self.log_probs is not None and self.device_log_probs:
            self.log_probs.append(torch.cat(self.device_log_probs).cpu())
            self.device_log_probs = []
        self.labels = [torch.cat(self.labels).cpu()] if self.labels else []
        self.probs = [torch.cat(self.probs).cpu()] if self.probs else []
        n = self.num_classes
        out = classification_metrics(self.confusion.view(n, n).cpu())
        if self.metrics and self.labels:
            y_true = torch.cat(self.labels).numpy().astype("int64")
            probs = torch.cat(self.probs).numpy().astype("float32")
            for metric in self.metrics:
                out[metric.name] = metric.checked(y_true, probs)
        return out


def _new_scores(
    targets: torch.Tensor,
    num_classes: int,
    device: torch.device,
    metrics: Sequence[Metric],
    log_probs: list[torch.Tensor] | None,
):
    """What an evaluation over targets like ``targets`` collects: the task's scorer (plugin
    metrics score one class per image, so a multi-label task has none)."""
    if for_targets(targets).multilabel:
        return MultiLabelScores(log_probs)
    return _Scores(num_classes, device, metrics, log_probs)


def training_loss(task: Task, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss of one training batch: the task's (cross-entropy; binary cross-entropy or
    the asymmetric loss for a multi-label task), on float logits."""
    return task.loss(logits.float(), targets)


class TaskLoss(nn.Module):
    """A task's own loss (:func:`training_loss`) as the trial's ``loss(logits, target)``;
    ``smoothing``: multi-hot targets smoothed towards ½ first
    (:func:`automl_tl.recipe.smooth_multi_hot`)."""

    def __init__(self, task: Task, smoothing: float = 0.0) -> None:
        super().__init__()
        self.task, self.smoothing = task, smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.smoothing:
            target = smooth_multi_hot(target.float(), self.smoothing)
        return training_loss(self.task, logits, target)


def trial_loss(task: Task, recipe: Recipe, imbalance: str, counts: list[int]) -> nn.Module:
    """The loss a trial trains with: a multi-label study's task loss on its (possibly mixed)
    multi-hot targets, with the recipe's label smoothing in its multi-label form (class
    weighting is for one label per image: the study file's check refuses ``imbalance``),
    else the recipe's (:func:`automl_tl.recipe.training_loss`)."""
    if task.multilabel:
        return TaskLoss(task, recipe.label_smoothing)
    return recipe_loss(recipe, imbalance, counts)


def evaluate(
    model: nn.Module,
    split: Split,
    num_classes: int,
    data_config: DataConfig,
    device: torch.device,
    batch_size: int = 256,
    log_probs: list[torch.Tensor] | None = None,
    metrics: Sequence[Metric] = (),
) -> dict[str, Any]:
    """Metrics of ``model`` on ``split`` (no augmentation): the built-in ones and ``metrics``
    (plugin metrics, :func:`plugin_metrics`); ``log_probs`` (a list) receives the
    log-probabilities of every image, in the split's order, batch by batch."""
    with torch.inference_mode():
        model.eval()
        inputs = _Inputs(data_config, device, memory_format_for(model, device))
        amp = _autocast(device)
        scores = _new_scores(split.y, num_classes, device, metrics, log_probs)
        for xb, yb in batches(on_device(split, device), batch_size, device=device):
            with amp():
                logits = model(inputs(xb))
            scores.add(logits, yb)
    return scores.result()


@torch.inference_mode()
def _evaluate_head(
    head: nn.Module,
    features: Split,
    num_classes: int,
    device: torch.device,
    batch_size: int,
    log_probs: list[torch.Tensor] | None = None,
    metrics: Sequence[Metric] = (),
) -> dict[str, Any]:
    head.eval()
    amp = _autocast(device)
    scores = _new_scores(features.y, num_classes, device, metrics, log_probs)
    for fb, yb in batches(features, batch_size, device=device):
        with amp():
            logits = head(fb).reshape(len(fb), -1)
        scores.add(logits, yb)
    return scores.result()


# ---------------------------------------------------------------------------------------------
# training


def set_trainable(model: nn.Module, trainable: set[str]) -> None:
    """requires_grad on exactly ``trainable``; train mode except BatchNorm of frozen layers."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the model's state dict (parameters and buffers)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def configured_strategy(registry: Registry, choice: Choice) -> UnfreezeStrategy:
    """The trial's unfreeze strategy with its options (``Choice.strategy_options``)."""
    strategy: UnfreezeStrategy = registry.get("unfreeze_strategies", choice.unfreeze)
    return strategy.configure(**choice.strategy_options)


def adapt_model(
    strategy: UnfreezeStrategy,
    model: nn.Module,
    groups: list[list[str]],
    head: list[str],
    depth: int,
) -> list[list[str]]:
    """``strategy.adapt(...)``: the layer groups the strategy trains of, checked to be one per
    body group and to name parameters of the (adapted) model outside the head."""
    adapted = [list(g) for g in strategy.adapt(model, groups, head, depth)]
    if len(adapted) != len(groups):
        raise RuntimeError(
            f"strategy {strategy.name!r}: adapt() returned {len(adapted)} layer groups for the "
            f"backbone's {len(groups)}; return one (possibly empty) list of names per group"
        )
    names = dict(model.named_parameters())
    wrong = [n for g in adapted for n in g if n not in names or n in head]
    if wrong:
        raise RuntimeError(
            f"strategy {strategy.name!r}: adapt() returned names that are no body parameter of "
            f"the adapted model: {', '.join(wrong[:5])}"
        )
    return adapted


def merge_model(
    strategy: UnfreezeStrategy, model: nn.Module, created: dict[str, tuple[int, ...]]
) -> nn.Module:
    """``strategy.merge(model)``, checked to give back exactly the tensors (names, shapes)
    the backbone created, so that the export loads where the backbone's own weights do."""
    merged = strategy.merge(model)
    now = parameter_shapes(merged)
    if now != created:
        extra = sorted(set(now) - set(created))
        missing = sorted(set(created) - set(now))
        reshaped = sorted(k for k in set(now) & set(created) if now[k] != created[k])
        raise RuntimeError(
            f"strategy {strategy.name!r}: after merge() the model differs from the backbone's "
            f"(added {extra[:3]}, missing {missing[:3]}, reshaped {reshaped[:3]}); merge() must "
            "fold what adapt() added back into the backbone's own parameters"
        )
    return merged


def _optimizer(
    model: nn.Module, strategy: UnfreezeStrategy, groups, head, depth: int, choice: Choice
):
    named = dict(model.named_parameters())
    param_groups = []
    for group in strategy.param_groups(groups, head, depth):
        decay = [named[n] for n in group.names if named[n].ndim > 1]
        no_decay = [named[n] for n in group.names if named[n].ndim <= 1]  # biases and norms
        lr = choice.lr * group.lr_scale
        if decay:
            param_groups.append({"params": decay, "lr": lr, "weight_decay": choice.weight_decay})
        if no_decay:
            param_groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    try:  # one kernel per parameter, no temporaries: ~1.4x faster steps on CPU for resnet18
        return torch.optim.AdamW(param_groups, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or torch without fused AdamW
        return torch.optim.AdamW(param_groups)


#: roughly what ``torch.compile`` of a timm backbone costs on a GPU (its first steps)
COMPILE_SECONDS = 60.0
#: compile only a trial expected to take at least this many times :data:`COMPILE_SECONDS`
COMPILE_PAYS_AT = 10.0


def compile_decision(
    compile: bool | str,
    plan: Sequence[set[str]],
    *,
    cached_features: bool = False,
    expected_seconds: float | None = None,
) -> str | None:
    """Whether a trial asked to compile (``[search] compile = true``) is compiled: ``"yes"``,
    or ``"no: <why>"`` (recorded on the trial, never a silent fallback); None when it was not
    asked. Compiling pays only where the trial is long next to the compile and its graph
    stays the same: not when the trainable set changes between epochs (``gradual``,
    ``lp_ft``: every change would recompile), not for a head trained on cached features, not
    when the trial should take less than :data:`COMPILE_PAYS_AT` compiles (``expected_seconds``
    from the backbone's measured speed; unknown: compiled)."""
    if not compile:
        return None
    if cached_features:
        return "no: the head trains on cached features (nothing to compile)"
    if any(p != plan[0] for p in plan):
        return "no: the trainable layers change between epochs, and every change would recompile"
    if expected_seconds is not None and expected_seconds < COMPILE_PAYS_AT * COMPILE_SECONDS:
        return (
            f"no: the trial should take ~{expected_seconds:.0f} s, less than {COMPILE_PAYS_AT:g} "
            f"times the ~{COMPILE_SECONDS:.0f} s a compile costs"
        )
    return "yes"


def _compiled(model: nn.Module, compile: bool | str) -> nn.Module:
    """``torch.compile(model)``; a string names the backend (e.g. "eager" in tests)."""
    if not compile:
        return model
    if isinstance(compile, str):
        return torch.compile(model, backend=compile)
    return torch.compile(model)


_NUM_GROUPS: dict[tuple[str, int], int] = {}


def _num_groups(registry: Registry, backbone: str, image_size: int) -> int:
    key = (backbone, image_size)
    if key not in _NUM_GROUPS:  # one throwaway CPU model per backbone and process
        component = registry.get("backbones", backbone)
        model = component.create(2, weights="none", image_size=image_size)
        _NUM_GROUPS[key] = len(component.layer_groups(model))
    return _NUM_GROUPS[key]


def expected_seconds(
    choice: Choice,
    data: Splits,
    registry: Registry,
    images_per_s: float,
    *,
    train_on: str = "train",
    evaluate_on: str | None = "val",
) -> float:
    """How long ``choice`` should take at its backbone's measured training images/s.

    Evaluation and feature extraction are forward passes, counted as a third of a training
    step each. A linear probe without augmentation (head on cached features) costs one such
    pass over the two splits; its head epochs are free in comparison.
    """

    def size(part: str | None) -> int:  # without building "train+val"
        return sum(len(getattr(data, p)) for p in part.split("+")) if part else 0

    n_train, n_eval = size(train_on), size(evaluate_on)
    depth = depth_to_groups(
        choice.unfreeze_depth, _num_groups(registry, choice.backbone, data.image_size)
    )
    if depth == 0 and (choice.augmentation == "none" or choice.aug_strength == 0.0):
        images = (n_train + n_eval) / 3.0
    else:
        images = choice.epochs * (n_train + n_eval / 3.0)
    return images / max(images_per_s, 1e-9)


def fit(
    choice: Choice,
    data: Splits,
    registry: Registry,
    *,
    device: str | torch.device = "auto",
    seed: int = 0,
    train_on: str = "train",
    evaluate_on: str | None = "val",
    on_epoch: Callable[[EpochResult], None] | None = None,
    compile: bool | str = False,
    feature_cache: _features.FeatureCache | bool = True,
    patience: int = 0,
    metric: str = "accuracy",
    keep_predictions: bool = False,
    use_ema: bool | None = None,
    expected_seconds: float | None = None,
) -> FitResult:
    """Train ``choice`` on ``data.part(train_on)``; score ``evaluate_on`` after every epoch.

    ``on_epoch`` is called after each epoch (the search uses it to report to Optuna and to
    prune by raising ``optuna.TrialPruned``). Raises :class:`NonFiniteLossError` when the loss
    is NaN or infinite.

    Args:
        compile: ``torch.compile`` the model (a string: the compile backend) where it pays
            (:func:`compile_decision`; :attr:`FitResult.compiled` says whether and why).
        feature_cache: the cache a linear probe without augmentation trains its head from:
            ``True`` the process-wide one, ``False`` none (train through the whole model).
        patience: stop when ``metric`` on ``evaluate_on`` has not improved for this many
            epochs (0: run every epoch). :attr:`FitResult.best_epoch` and ``best_val`` are
            the best epoch's either way.
        keep_predictions: keep the best epoch's log-probabilities on ``evaluate_on``
            (:attr:`FitResult.val_log_probs`).
        use_ema: with EMA of the weights (``choice.recipe.ema_decay``), which model to keep:
            None the better scoring on ``evaluate_on`` each epoch (the averaged one when
            nothing is evaluated), True / False the averaged / the raw one (a retrain keeps
            what won in its trial).
        expected_seconds: how long the trial should take (its backbone's measured speed,
            :func:`expected_seconds`), for the compile decision; None: unknown.

    Out of memory (a cuBLAS / cuDNN allocation failure too) before the first epoch is
    reported restarts the trial with the same batch size in micro-batches of half as many
    images, accumulating their gradients (down to micro-batches of 2); the micro-batch used
    is :attr:`FitResult.micro_batch`.
    """
    device = resolve_device(device)
    if feature_cache is True:
        cache = _features.FEATURES
    else:  # (an empty cache is falsy: compare with False, not truthiness)
        cache = None if feature_cache is False or feature_cache is None else feature_cache
    reported = 0

    def report(result: EpochResult) -> None:
        nonlocal reported
        reported += 1
        if on_epoch is not None:
            on_epoch(result)

    batch_size, micro, retries = choice.batch_size, choice.batch_size, 0
    while True:
        try:
            result = _fit(
                choice,
                data,
                registry,
                device=device,
                seed=seed,
                train_on=train_on,
                evaluate_on=evaluate_on,
                on_epoch=report,
                compile=compile,
                cache=cache,
                batch_size=batch_size,
                micro_batch=micro,
                patience=patience,
                metric=metric,
                keep_predictions=keep_predictions,
                use_ema=use_ema,
                expected=expected_seconds,
            )
            result.oom_retries = retries
            return result
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            release_memory(device)  # the caches at least, also when the trial ends here
            if reported or micro <= MIN_MICRO_BATCH:
                raise
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # outside the except block: the traceback (and the model it holds) is gone
        release_memory(device)
        micro, retries = max(MIN_MICRO_BATCH, micro // 2), retries + 1
        log.warning(
            "out of memory at %d images per step (%s); retrying batch size %d as %d "
            "micro-batches of %d with their gradients accumulated",
            min(batch_size, micro * 2),
            reason,
            batch_size,
            _micro_batches(batch_size, micro),
            micro,
        )


#: the largest evaluation batch on a GPU (forward only: at low resolution many images fit, and
#: a small batch leaves the GPU waiting on kernel launches)
EVAL_BATCH_MAX = 1024


def eval_batch_size(
    batch_size: int, image_size: int, device: torch.device, *, shrunk: bool = False
) -> int:
    """Images per evaluation batch: 4 training batches, at most 256; on a GPU as many as 256
    images at 224 px take (``256 * (224 / size)^2``, at most :data:`EVAL_BATCH_MAX`) unless
    out-of-memory has ``shrunk`` the training batch."""
    base = min(256, 4 * batch_size)
    if device.type != "cuda" or shrunk:
        return base
    scaled = int(256 * (224 / max(1, image_size)) ** 2) // 8 * 8
    return max(base, min(EVAL_BATCH_MAX, scaled))


#: the smallest micro-batch out-of-memory backs off to (BatchNorm needs 2 images)
MIN_MICRO_BATCH = 2


def _micro_batches(n: int, micro: int) -> int:
    """Into how many micro-batches a batch of ``n`` images is split (each at least ``micro``
    images, so none falls below :data:`MIN_MICRO_BATCH`)."""
    return 1 if micro >= n else max(1, n // micro)


def _backward(
    step: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    micro: int,
    amp,
    flatten: bool,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward and backward of one batch; the batch's mean loss (``loss_fn``'s), detached.

    When the batch does not fit (``micro`` < its size) it runs as micro-batches whose
    gradients add up to the whole batch's: each loss is its sum over the batch's size.
    ``loss_fn``: the trial's loss (:func:`trial_loss`; ``y`` may be soft or multi-hot
    targets), a part's mean weighted by its share of the batch (exact for an unweighted
    loss; with class weights each part is normalised by its own weights); None: cross entropy
    (the multiclass task's loss).
    """
    if loss_fn is None:
        loss_fn = TaskLoss(MULTICLASS)
    n = len(y)
    parts = _micro_batches(n, micro)
    if parts == 1:
        with amp():
            logits = step(x)
        if flatten:
            logits = logits.reshape(n, -1)
        loss = loss_fn(logits, y)
        loss.backward()
        return loss.detach()
    total = torch.zeros((), device=y.device)
    for xp, yp in zip(x.tensor_split(parts), y.tensor_split(parts)):
        with amp():
            logits = step(xp)
        if flatten:
            logits = logits.reshape(len(yp), -1)
        loss = loss_fn(logits, yp) * (len(yp) / n)
        loss.backward()
        total += loss.detach()
    return total


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size + (n % batch_size >= 2))


def _fit(
    choice: Choice,
    data: Splits,
    registry: Registry,
    *,
    device: torch.device,
    seed: int,
    train_on: str,
    evaluate_on: str | None,
    on_epoch: Callable[[EpochResult], None],
    compile: bool | str,
    cache: _features.FeatureCache | None,
    batch_size: int,
    micro_batch: int | None = None,
    patience: int = 0,
    metric: str = "accuracy",
    keep_predictions: bool = False,
    use_ema: bool | None = None,
    expected: float | None = None,
) -> FitResult:
    micro_batch = micro_batch or batch_size
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    num_classes = len(data.class_names)
    start = time.perf_counter()
    metrics = plugin_metrics(registry)  # scored beside the built-in ones every epoch
    direction = metric_direction(metric, registry)  # a plugin's metric may be lower-is-better

    backbone: Backbone = registry.get("backbones", choice.backbone)
    policy = registry.get("augmentation_policies", choice.augmentation)
    strategy = configured_strategy(registry, choice)

    recipe = choice.recipe
    model = create_model(backbone, choice, num_classes, data.image_size)
    data_config = backbone.data_config(model)
    data_config = DataConfig(
        (3, data.image_size, data.image_size), data_config.mean, data_config.std
    )
    groups = backbone.layer_groups(model)
    head = backbone.head_parameters(model)
    depth = depth_to_groups(choice.unfreeze_depth, len(groups))
    created = parameter_shapes(model)
    groups = adapt_model(strategy, model, groups, head, depth)
    plan = [strategy.trainable(e, choice.epochs, groups, head, depth) for e in range(choice.epochs)]
    augment = policy.build(choice.aug_strength, data.image_size)
    if isinstance(augment, nn.Identity):
        augment = None
    else:
        augment = augment.to(device)
    eval_batch = eval_batch_size(
        micro_batch, data.image_size, device, shrunk=micro_batch < batch_size
    )

    model.to(device)
    memory_format = memory_format_for(model, device)
    if memory_format is torch.channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    inputs = _Inputs(data_config, device, memory_format)
    amp = _autocast(device)
    train = on_device(data.part(train_on), device)
    held_out = on_device(data.part(evaluate_on), device) if evaluate_on else None
    multilabel = data.task.multilabel
    counts = [] if multilabel else class_counts(train.y, num_classes)
    imbalance = "none" if multilabel else resolve_imbalance(recipe.imbalance, counts)
    criterion = trial_loss(data.task, recipe, imbalance, counts).to(device)
    mixer = mixer_for(recipe, num_classes, seed, multilabel=multilabel)

    # A linear probe without augmentation: the head trains on the body's cached features.
    probe = None
    head_set = set(head)
    plain_steps = mixer is None and recipe.ema_decay <= 0 and imbalance != "sampler"
    if cache is not None and augment is None and plain_steps and all(t <= head_set for t in plan):
        set_trainable(model, plan[0])
        probe = _cached_features(
            model,
            backbone,
            head,
            data,
            train_on,
            evaluate_on,
            train,
            held_out,
            inputs,
            amp,
            device,
            cache,
            eval_batch,
        )
    if probe is not None:
        head_module, train_source, eval_source, feature_cache, feature_seconds = probe
        step = head_module
        compiled = compile_decision(compile, plan, cached_features=True)
    else:
        head_module = eval_source = feature_cache = None
        feature_seconds = 0.0
        train_source = train
        compiled = compile_decision(compile, plan, expected_seconds=expected)
        if compiled is not None and compiled != "yes":
            log.info("not compiled: %s", compiled[4:])
        step = _compiled(model, compile if compiled == "yes" else False)
        peak = set().union(*plan)
        if device.type in MEMORY_PROBE_DEVICES and peak != plan[0]:
            _try_peak_memory(model, step, peak, train, micro_batch, inputs, amp, device, data.task)

    # a compiled model sees one batch shape: the last partial batch is dropped (when a whole
    # one exists), else a smaller last batch would compile a second graph
    min_batch = batch_size if compiled == "yes" and len(train_source) >= batch_size else 2
    optimizer = _optimizer(model, strategy, groups, head, depth, choice)
    steps_per_epoch = _steps_per_epoch(len(train), batch_size)
    total_steps = steps_per_epoch * choice.epochs
    warmup = warmup_steps(recipe, steps_per_epoch, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(warmup, total_steps))
    ema = weight_average(model, recipe) if probe is None and use_ema is not False else None
    ema_won = None
    trained = [p for p in model.parameters()]
    global_step = 0
    history: list[EpochResult] = []
    val = None
    best_epoch, best_val, best_log_probs, stopped_early = None, None, None, False
    last_log_probs = None
    train_seconds, images_seen = 0.0, 0
    for epoch in range(choice.epochs):
        set_trainable(model, plan[epoch])
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        lr_now = optimizer.param_groups[0]["lr"]
        for xb, yb in batches(
            _epoch_source(train_source, imbalance, num_classes, generator),
            batch_size,
            device=device,
            shuffle=True,
            generator=generator,
            min_batch=min_batch,
        ):
            x = xb if probe is not None else inputs(xb, augment)
            target = yb
            if mixer is not None:  # after the policy, on the device: soft targets
                x, target = mixer(x, yb)
            optimizer.zero_grad(set_to_none=True)
            loss = _backward(
                step, x, target, micro_batch, amp, flatten=probe is not None, loss_fn=criterion
            )
            clip_gradients(trained, recipe)
            optimizer.step()
            scheduler.step()
            global_step += 1
            if ema is not None:
                ema.update(model, step=global_step)
            loss_sum += loss * len(yb)
            seen += len(yb)
        if seen == 0:  # every batch was dropped: the model would leave untrained, as if fine
            raise DataError(
                f"no training step ran: the {train_on} split has {len(train_source)} image(s) and "
                f"batches of batch size {batch_size} with fewer than 2 images are dropped "
                "(BatchNorm needs 2); use [search] batch_size >= 2 and a train split of at least "
                "2 images"
            )
        train_loss = float(loss_sum) / max(1, seen)  # the one host sync per epoch
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        images_seen += seen
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(f"training loss became {train_loss} in epoch {epoch + 1}")
        result = EpochResult(
            epoch,
            train_loss,
            lr_now,
            seconds,
            seen / max(seconds, 1e-9),
            cached_features=probe is not None,
        )
        if held_out is not None:
            collected: list[torch.Tensor] | None = [] if keep_predictions else None
            if probe is not None:
                val = _evaluate_head(
                    head_module, eval_source, num_classes, device, eval_batch, collected, metrics
                )
            else:
                val = evaluate(
                    step,
                    held_out,
                    num_classes,
                    data_config,
                    device,
                    eval_batch,
                    collected,
                    metrics,
                )
            if ema is not None and use_ema is not False:
                ema_collected: list[torch.Tensor] | None = [] if keep_predictions else None
                ema_val = evaluate(
                    ema.module,
                    held_out,
                    num_classes,
                    data_config,
                    device,
                    eval_batch,
                    ema_collected,
                    metrics,
                )
                ema_won = use_ema is True or direction.better(ema_val[metric], val[metric])
                if ema_won:
                    val, collected = ema_val, ema_collected
            result.val = {k: v for k, v in val.items() if not isinstance(v, list)}
            if collected:
                last_log_probs = torch.cat(collected)
            # strictly better: the first of equally good epochs is the best
            if best_val is None or direction.better(val[metric], best_val[metric]):
                best_epoch, best_val, best_log_probs = epoch, val, last_log_probs
        history.append(result)
        on_epoch(result)
        if patience and best_epoch is not None and epoch - best_epoch >= patience:
            stopped_early = epoch + 1 < choice.epochs
            break
    if ema is not None and ema_won is None:  # nothing scored: as asked, else the average
        ema_won = use_ema is not False
    if ema_won:
        model = ema.module
    model = merge_model(strategy, model, created)
    return FitResult(
        model=model.eval(),
        backbone=backbone,
        data_config=data_config,
        history=history,
        val=val,
        seconds=time.perf_counter() - start,
        images_per_s=images_seen / max(train_seconds, 1e-9),
        depth=depth,
        num_groups=len(groups),
        batch_size=batch_size,
        micro_batch=micro_batch,
        compiled=compiled,
        feature_cache=feature_cache,
        feature_seconds=feature_seconds,
        best_epoch=best_epoch,
        best_val=best_val,
        # the epoch the score is taken from: the best with early stopping, else the last
        val_log_probs=best_log_probs if patience else last_log_probs,
        stopped_early=stopped_early,
        ema_won=ema_won,
        imbalance=imbalance,
    )


def create_model(
    backbone: Backbone, choice: Choice, num_classes: int, image_size: int
) -> nn.Module:
    """``backbone.create`` with the recipe's regularizers the backbone declares
    (:meth:`Backbone.regularizers`): ``drop_path_rate`` only when it takes drop-path."""
    options = {}
    for name, keyword in BACKBONE_REGULARIZERS.items():
        value = getattr(choice.recipe, name)
        if value and name in backbone.regularizers():
            options[keyword] = value
    return backbone.create(num_classes, weights=choice.weights, image_size=image_size, **options)


def _epoch_source(train: Split, imbalance: str, num_classes: int, generator) -> Split:
    """The train split, or for a class-balanced sampler one epoch drawn from it with every
    class equally likely (then shuffled again by ``batches``: the draw is already random)."""
    if imbalance != "sampler":
        return train
    order = balanced_order(train.y, num_classes, generator).to(train.y.device)
    names = [train.names[i] for i in order.tolist()] if train.names else []
    return Split(train.x[order], train.y[order], names)


def _try_peak_memory(
    model: nn.Module,
    step: nn.Module,
    peak: set[str],
    train: Split,
    batch_size: int,
    inputs: _Inputs,
    amp,
    device: torch.device,
    task: Task,
) -> None:
    """One forward/backward with the largest trainable set, so that running out of memory
    in a late epoch (gradual unfreezing) happens now, while the batch can still be halved.
    Leaves no trace: gradients are dropped and BatchNorm statistics restored."""
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    set_trainable(model, peak)
    for xb, yb in batches(train, batch_size, device=device, min_batch=2):
        with amp():
            logits = step(inputs(xb))
        training_loss(task, logits, yb).backward()
        break
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])


def _cached_features(
    model: nn.Module,
    backbone: Backbone,
    head: list[str],
    data: Splits,
    train_on: str,
    evaluate_on: str | None,
    train: Split,
    held_out: Split | None,
    inputs: _Inputs,
    amp,
    device: torch.device,
    cache: _features.FeatureCache,
    batch_size: int,
):
    """(head module, train features, eval features, "hit"|"miss", seconds), or None when
    the model's head cannot be trained on features with the same result."""
    module = _features.head_module(model, head)
    if module is None or not _features.static_body(model, module):
        return None
    t0 = time.perf_counter()
    digest = _features.body_digest(model, head)
    identity = (
        backbone.name,
        digest,
        data.fingerprint,
        data.split_hash,
        data.image_size,
        str(device),
        str(inputs.memory_format),
    )
    status = "hit"
    sources = []
    for name, split in ((train_on, train), (evaluate_on, held_out)):
        if split is None:
            sources.append(None)
            continue
        key = (*identity, name)
        feats = cache.get(key)
        if feats is None:
            status = "miss"
            feats = _features.extract(
                model,
                module,
                (inputs(xb) for xb, _ in batches(split, batch_size, device=device)),
                autocast=amp,
            )
            if feats is None:
                return None
            cache.put(key, feats)
        sources.append(Split(feats, split.y.to(feats.device), split.names))
    return module, sources[0], sources[1], status, time.perf_counter() - t0
