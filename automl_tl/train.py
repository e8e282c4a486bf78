"""fit(): train one configuration on one device, score it every epoch, report for pruning.

The hot loop: uint8 batch -> device -> float -> augmentation (on the device) -> normalize ->
forward/backward (bf16 autocast and channels-last on CUDA). The loss is summed on the device
and read once per epoch, so no step forces a host sync. Parameters of frozen layer groups have
``requires_grad`` off (autograd then skips everything below the lowest trainable group) and
BatchNorm layers whose parameters are all frozen stay in eval mode, statistics included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .components import Backbone, DataConfig, UnfreezeStrategy
from .data import Split, Splits, batches
from .registry import Registry


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` / ``None`` -> CUDA when available, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def _normalizer(cfg: DataConfig, device: torch.device):
    """(mean, 1/std) as (1, C, 1, 1) tensors for images in [0, 1]."""
    mean = torch.tensor(cfg.mean, device=device).view(1, -1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.std, device=device).view(1, -1, 1, 1)
    return mean, inv_std


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    split: Split,
    num_classes: int,
    data_config: DataConfig,
    device: torch.device,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``split`` (no augmentation)."""
    model.eval()
    mean, inv_std = _normalizer(data_config, device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    channels_last = device.type == "cuda"
    for xb, yb in batches(split, batch_size, device=device):
        x = (xb.float().div_(255.0) - mean) * inv_std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(x).argmax(1)
        confusion += torch.bincount(yb * num_classes + pred, minlength=num_classes**2).view(
            num_classes, num_classes
        )
    return classification_metrics(confusion.cpu())


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
    return torch.optim.AdamW(param_groups)


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
) -> FitResult:
    """Train ``choice`` on ``data.part(train_on)``; score ``evaluate_on`` after every epoch.

    ``on_epoch`` is called after each epoch (the search uses it to report to Optuna and to
    prune by raising ``optuna.TrialPruned``). Raises :class:`NonFiniteLossError` when the loss
    is NaN or infinite.
    """
    device = resolve_device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    num_classes = len(data.class_names)

    backbone: Backbone = registry.get("backbones", choice.backbone)
    policy = registry.get("augmentation_policies", choice.augmentation)
    strategy: UnfreezeStrategy = registry.get("unfreeze_strategies", choice.unfreeze)

    model = backbone.create(num_classes, weights=choice.weights, image_size=data.image_size)
    data_config = backbone.data_config(model)
    data_config = DataConfig(
        (3, data.image_size, data.image_size), data_config.mean, data_config.std
    )
    groups = backbone.layer_groups(model)
    head = backbone.head_parameters(model)
    depth = depth_to_groups(choice.unfreeze_depth, len(groups))

    model.to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    augment = policy.build(choice.aug_strength, data.image_size).to(device)
    mean, inv_std = _normalizer(data_config, device)
    optimizer = _optimizer(model, strategy, groups, head, depth, choice)

    train = data.part(train_on)
    steps_per_epoch = max(
        1, len(train) // choice.batch_size + (len(train) % choice.batch_size >= 2)
    )
    total_steps = steps_per_epoch * choice.epochs
    warmup = min(steps_per_epoch, max(1, total_steps // 10))

    def lr_lambda(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    history: list[EpochResult] = []
    val = None
    start = time.perf_counter()
    train_seconds, images_seen = 0.0, 0
    for epoch in range(choice.epochs):
        set_trainable(model, strategy.trainable(epoch, choice.epochs, groups, head, depth))
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        lr_now = optimizer.param_groups[0]["lr"]
        for xb, yb in batches(
            train, choice.batch_size, device=device, shuffle=True, generator=generator, min_batch=2
        ):
            x = xb.float().div_(255.0)
            with torch.no_grad():
                x = augment(x)
            x = (x - mean) * inv_std
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(yb)
            seen += len(yb)
        train_loss = float(loss_sum) / max(1, seen)  # the one host sync per epoch
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        images_seen += seen
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(f"training loss became {train_loss} in epoch {epoch + 1}")
        result = EpochResult(epoch, train_loss, lr_now, seconds, seen / max(seconds, 1e-9))
        if evaluate_on:
            val = evaluate(model, data.part(evaluate_on), num_classes, data_config, device)
            result.val = {k: v for k, v in val.items() if k != "confusion_matrix"}
        history.append(result)
        if on_epoch is not None:
            on_epoch(result)
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
    )
