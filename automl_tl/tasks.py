"""The task kind of a study: what a label is, the loss, the metrics, and predictions -> labels.

``[data] task = "multiclass"`` (one class per image: softmax, cross-entropy, accuracy…) or
``"multilabel"`` (any number of labels per image: one sigmoid per label, binary
cross-entropy or the asymmetric loss, mean average precision and F1 at per-label
thresholds). Everything that differs between the two goes through a :class:`Task`, so the
data, training, selection, export and report code asks the task instead of testing a flag:

==================  =====================================  ==========================================
                    :data:`MULTICLASS`                     :class:`MultiLabel`
==================  =====================================  ==========================================
targets ``y``       class index, ``(N,)`` int64            multi-hot, ``(N, C)`` float32
:meth:`~Task.loss`  cross-entropy                          binary cross-entropy / asymmetric loss
kept predictions    log-softmax                            log-sigmoid (one probability per label)
metrics             accuracy, balanced_accuracy, macro_f1  map, micro_f1, macro_f1, subset_accuracy
labels of a row     the argmax                             every label at or above its threshold
==================  =====================================  ==========================================

Multi-label F1 and subset accuracy are taken at per-label thresholds
(:func:`tune_thresholds`, the F1-best cut of each label). On a validation split the
thresholds are tuned on that split itself (so every trial is scored the same way); the
exported model keeps the thresholds tuned on validation and its test scores use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

TASK_KINDS = ("multiclass", "multilabel")
MULTICLASS_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
MULTILABEL_METRICS = ("map", "micro_f1", "macro_f1", "subset_accuracy")
#: ``[search] multilabel_loss``: binary cross-entropy, or the asymmetric loss (Ridnik et al., 2021)
MULTILABEL_LOSSES = ("bce", "asymmetric")
#: the threshold of a label that validation cannot tune (no positive image there)
DEFAULT_THRESHOLD = 0.5


class Task:
    """One task kind (the multiclass one; :class:`MultiLabel` overrides what differs)."""

    name = "multiclass"
    metrics: tuple[str, ...] = MULTICLASS_METRICS
    default_metric = "accuracy"
    #: selection features that only make sense for one label per image
    supports_calibration = True
    supports_ensembles = True
    supports_folds = True

    @property
    def multilabel(self) -> bool:
        return self.name == "multilabel"

    def targets(self, label_sets: Sequence[Sequence[str]], class_names: list[str]) -> torch.Tensor:
        """The training targets of images with these labels."""
        index = {c: i for i, c in enumerate(class_names)}
        return torch.tensor([index[labels[0]] for labels in label_sets], dtype=torch.int64)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean training loss of a batch (float logits)."""
        return F.cross_entropy(logits, targets)

    def log_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-image log-probabilities kept for selection and calibration."""
        return logits.float().log_softmax(-1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)

    def counts(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Images per class (per label) among targets ``y``."""
        return torch.bincount(y.long(), minlength=num_classes)

    def to_dict(self) -> dict[str, Any]:
        """What an export and the catalog record of the task."""
        return {"task": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


MULTICLASS = Task()


class MultiLabel(Task):
    """Several labels per image: one sigmoid per label.

    ``loss``: ``"bce"`` (binary cross-entropy) or ``"asymmetric"``: the asymmetric loss of
    Ridnik et al. (2021, "Asymmetric Loss For Multi-Label Classification"), which
    down-weights easy negatives (``gamma_neg = 4``) and discards very easy ones (probability
    shifted by ``clip = 0.05``), for label sets where most labels are absent from most images.
    Both take soft targets in [0, 1] (mixup of multi-hot vectors).

    Temperature scaling, greedy ensembles, weight soups and k-fold racing are switched off
    for multi-label studies: they are defined on one softmax over the classes.
    """

    name = "multilabel"
    metrics = MULTILABEL_METRICS
    default_metric = "map"
    supports_calibration = False
    supports_ensembles = False
    supports_folds = False

    def __init__(self, loss: str = "bce") -> None:
        if loss not in MULTILABEL_LOSSES:
            raise ValueError(f"unknown multi-label loss {loss!r}")
        self.loss_name = loss

    def targets(self, label_sets, class_names):
        index = {c: i for i, c in enumerate(class_names)}
        y = torch.zeros((len(label_sets), len(class_names)), dtype=torch.float32)
        for row, labels in enumerate(label_sets):
            y[row, [index[c] for c in labels]] = 1.0
        return y

    def loss(self, logits, targets):
        targets = targets.to(logits.dtype)
        if self.loss_name == "asymmetric":
            return asymmetric_loss(logits, targets)
        return F.binary_cross_entropy_with_logits(logits, targets)

    def log_scores(self, logits):
        return F.logsigmoid(logits.float())

    def probabilities(self, logits):
        return logits.float().sigmoid()

    def counts(self, y, num_classes):
        return y.sum(0).round().long() if len(y) else torch.zeros(num_classes, dtype=torch.long)

    def to_dict(self):
        return {"task": self.name, "loss": self.loss_name}

    def __repr__(self) -> str:
        return f"MultiLabel(loss={self.loss_name!r})"


def build(kind: str, loss: str = "bce") -> Task:
    """The task of ``[data] task`` (and ``[search] multilabel_loss``)."""
    if kind == "multilabel":
        return MultiLabel(loss)
    if kind != "multiclass":
        raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(TASK_KINDS)}")
    return MULTICLASS


def for_targets(y: torch.Tensor) -> Task:
    """The task kind of targets ``y``: a multi-hot matrix is multi-label. (The loss is the
    study's; this is for scoring, where it does not matter.)"""
    return MultiLabel() if y.ndim == 2 else MULTICLASS


def metric_names(kind: str) -> tuple[str, ...]:
    """The built-in metrics of a task kind."""
    return MULTILABEL_METRICS if kind == "multilabel" else MULTICLASS_METRICS


# ---------------------------------------------------------------------------------------------
# losses


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The asymmetric loss (Ridnik et al., 2021), averaged over images and labels like
    ``binary_cross_entropy_with_logits``. With ``gamma_neg = gamma_pos = clip = 0`` it is
    binary cross-entropy."""
    p = logits.sigmoid()
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    positive = targets * torch.log(p.clamp(min=eps))
    negative = (1 - targets) * torch.log((1 - p_neg).clamp(min=eps))
    if gamma_pos:
        positive = positive * (1 - p).pow(gamma_pos)
    if gamma_neg:
        negative = negative * p_neg.pow(gamma_neg)
    return -(positive + negative).mean()


# ---------------------------------------------------------------------------------------------
# multi-label metrics (numpy: probabilities (N, C), multi-hot targets (N, C))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of one label: the mean, over its positive images, of the precision
    among the images scored at least as high (ties counted together, as scikit-learn's
    ``average_precision_score``). NaN when the label has no positive image."""
    positive = positive.astype(bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positive[order]
    tp = np.cumsum(pos)
    # the last index of each run of tied scores: precision is taken there
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp_at, seen_at = tp[last], last + 1
    precision = tp_at / seen_at
    recall_gain = np.diff(np.r_[0, tp_at]) / n_pos
    return float(np.sum(precision * recall_gain))


def mean_average_precision(probs: np.ndarray, y: np.ndarray) -> tuple[float, list[float]]:
    """(macro mAP over the labels with a positive image, each label's AP (NaN: none))."""
    per_label = [average_precision(probs[:, c], y[:, c]) for c in range(y.shape[1])]
    present = [ap for ap in per_label if not np.isnan(ap)]
    return (float(np.mean(present)) if present else 0.0), per_label


def tune_thresholds(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-label thresholds maximizing each label's F1 on these predictions.

    The cut lies halfway between the lowest probability kept and the next one below it, so
    a new image near the boundary is treated like its neighbours; a label with no positive
    image keeps :data:`DEFAULT_THRESHOLD`. Ties between cuts go to the higher threshold.
    """
    n, c = y.shape
    out = np.full(c, DEFAULT_THRESHOLD, dtype=np.float64)
    for label in range(c):
        pos = y[:, label].astype(bool)
        n_pos = int(pos.sum())
        if n_pos == 0 or n == 0:
            continue
        order = np.argsort(-probs[:, label], kind="stable")
        s, p = probs[order, label].astype(np.float64), pos[order]
        last = np.r_[np.nonzero(np.diff(s))[0], n - 1]  # cut after each run of ties
        tp = np.cumsum(p)[last]
        kept = last + 1
        f1 = 2 * tp / (kept + n_pos)
        best = int(np.argmax(f1))  # the first (highest-threshold) maximum
        below = s[last[best] + 1] if last[best] + 1 < n else 0.0
        out[label] = float((s[last[best]] + below) / 2)
    return out


def f1_scores(pred: np.ndarray, y: np.ndarray) -> tuple[float, float, list[float]]:
    """(micro F1, macro F1 over labels with a positive image, each label's F1)."""
    pred, y = pred.astype(bool), y.astype(bool)
    tp = (pred & y).sum(0).astype(np.float64)
    fp = (pred & ~y).sum(0).astype(np.float64)
    fn = (~pred & y).sum(0).astype(np.float64)
    denom = 2 * tp + fp + fn
    per_label = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    present = y.sum(0) > 0
    micro = float(2 * tp.sum() / max(1.0, denom.sum()))
    macro = float(per_label[present].mean()) if present.any() else 0.0
    return micro, macro, per_label.tolist()


def multilabel_metrics(
    probs: np.ndarray, y: np.ndarray, thresholds: np.ndarray | Sequence[float] | None = None
) -> dict[str, Any]:
    """map, micro_f1, macro_f1 and subset_accuracy of probabilities against multi-hot ``y``;
    F1 and subset accuracy at ``thresholds`` (None: tuned on these predictions, as a
    validation split is scored), plus ``micro_f1_at_0.5`` and the per-label AP."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y) > 0.5
    if len(y) == 0:
        return {m: 0.0 for m in MULTILABEL_METRICS}
    t = tune_thresholds(probs, y) if thresholds is None else np.asarray(thresholds, np.float64)
    pred = probs >= t
    micro, macro, _ = f1_scores(pred, y)
    mean_ap, per_label_ap = mean_average_precision(probs, y)
    return {
        "map": mean_ap,
        "micro_f1": micro,
        "macro_f1": macro,
        "subset_accuracy": float((pred == y).all(1).mean()),
        "micro_f1_at_0.5": f1_scores(probs >= 0.5, y)[0],
        "per_label_ap": [None if np.isnan(a) else round(a, 6) for a in per_label_ap],
    }


def predicted_labels(
    probs: np.ndarray, class_names: list[str], thresholds: Sequence[float]
) -> list[list[tuple[str, float]]]:
    """Per image, every (label, probability) at or above its threshold, most probable first."""
    out = []
    for row in np.asarray(probs, dtype=np.float64):
        above = [(class_names[i], float(p)) for i, p in enumerate(row) if p >= thresholds[i]]
        out.append(sorted(above, key=lambda item: -item[1]))
    return out


# ---------------------------------------------------------------------------------------------
# evaluation: what one pass over a split collects


class MultiLabelScores:
    """The multi-label counterpart of ``train._Scores``: collects probabilities and targets
    (and log-sigmoids when asked) batch by batch; :meth:`result` scores them."""

    def __init__(self, log_probs: list[torch.Tensor] | None, thresholds=None) -> None:
        self.log_probs, self.thresholds = log_probs, thresholds
        self.probs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, yb: torch.Tensor) -> None:
        logits = logits.float()
        self.probs.append(logits.sigmoid().cpu())
        self.labels.append(yb.cpu())
        if self.log_probs is not None:
            self.log_probs.append(F.logsigmoid(logits).cpu())

    def result(self) -> dict[str, Any]:
        if not self.probs:
            return {m: 0.0 for m in MULTILABEL_METRICS}
        probs = torch.cat(self.probs).numpy()
        y = torch.cat(self.labels).numpy()
        return multilabel_metrics(probs, y, self.thresholds)
