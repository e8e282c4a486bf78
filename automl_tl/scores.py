"""Scores you can trust, as plain functions on predictions: 95 % intervals (Wilson for
accuracy, a stratified bootstrap for balanced accuracy and macro F1; a bootstrap over test
images for the multi-label metrics), temperature scaling and the expected calibration error,
greedy ensemble selection (Caruana et al., 2004) and weight averaging for soups (Wortsman et
al., 2022).

Everything here takes tensors of log-probabilities ``(N, C)`` and labels ``(N,)`` (the
multi-label intervals: probabilities and multi-hot rows ``(N, C)``); nothing trains a model
or reads a study. ``automl_tl.selection`` and ``automl_tl.retrain`` use it.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .tasks import MULTILABEL_METRICS, tune_thresholds

#: the z of a two-sided 95 % interval
Z95 = 1.959963984540054
#: bootstrap resamples of the test images behind a 95 % interval
BOOTSTRAP_SAMPLES = 1000


# ---------------------------------------------------------------------------------------------
# compact predictions (for a trial's user attributes)


def pack(log_probs: torch.Tensor) -> dict[str, Any]:
    """Log-probabilities as JSON-able data: float16 bytes in base64 plus the shape."""
    array = log_probs.detach().float().clamp(min=-60.0).cpu().to(torch.float16).numpy()
    return {"shape": list(array.shape), "f16": base64.b64encode(array.tobytes()).decode("ascii")}


def unpack(data: dict[str, Any] | None) -> torch.Tensor | None:
    """The tensor :func:`pack` stored (float32), or None."""
    if not data:
        return None
    import numpy as np

    array = np.frombuffer(base64.b64decode(data["f16"]), dtype=np.float16)
    return torch.from_numpy(array.astype(np.float32).reshape(data["shape"]))


# ---------------------------------------------------------------------------------------------
# metrics and their intervals


def metrics_from_predictions(y: torch.Tensor, pred: torch.Tensor, num_classes: int) -> dict:
    """accuracy, balanced_accuracy, macro_f1 (and the confusion matrix) of hard predictions."""
    from .train import classification_metrics

    confusion = torch.bincount(y * num_classes + pred, minlength=num_classes**2)
    return classification_metrics(confusion.view(num_classes, num_classes))


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    y: torch.Tensor,
    pred: torch.Tensor,
    num_classes: int,
    metric: str,
    *,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` (resampling images with replacement)."""
    n = len(y)
    if n == 0:
        return (0.0, 1.0)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n, (samples, n), generator=generator)
    ys, ps = y[index], pred[index]  # (samples, n)
    k = num_classes
    confusion = torch.zeros(samples, k * k, dtype=torch.float64)
    confusion.scatter_add_(1, ys * k + ps, torch.ones(samples, n, dtype=torch.float64))
    cm = confusion.view(samples, k, k)
    tp = cm.diagonal(dim1=1, dim2=2)
    support, predicted = cm.sum(2), cm.sum(1)
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    present = (support > 0).double()
    if metric == "balanced_accuracy":
        values = (recall * present).sum(1) / present.sum(1).clamp(min=1)
    elif metric == "macro_f1":
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
        f1 = torch.where(
            precision + recall > 0,
            2 * precision * recall / (precision + recall).clamp(min=1e-12),
            torch.zeros_like(tp),
        )
        values = (f1 * present).sum(1) / present.sum(1).clamp(min=1)
    elif metric == "accuracy":
        values = tp.sum(1) / n
    else:
        raise ValueError(f"unknown metric {metric!r}")
    alpha = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return (float(low), float(high))


def metric_intervals(
    y: torch.Tensor, pred: torch.Tensor, num_classes: int, seed: int = 0
) -> dict[str, list[float]]:
    """95 % intervals: Wilson for accuracy, bootstrap for balanced accuracy and macro F1."""
    correct = int((y == pred).sum())
    return {
        "accuracy": [round(v, 4) for v in wilson_interval(correct, len(y))],
        "balanced_accuracy": [
            round(v, 4)
            for v in bootstrap_interval(y, pred, num_classes, "balanced_accuracy", seed=seed)
        ],
        "macro_f1": [
            round(v, 4) for v in bootstrap_interval(y, pred, num_classes, "macro_f1", seed=seed)
        ],
    }


def multilabel_intervals(
    probs: np.ndarray,
    y: np.ndarray,
    thresholds: np.ndarray | list[float] | None = None,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """95 % percentile bootstrap intervals of the multi-label test metrics (``map``,
    ``micro_f1``, ``macro_f1``, ``subset_accuracy``): ``samples`` resamples of the images
    with replacement (seeded), each scored as :func:`automl_tl.tasks.multilabel_metrics`
    scores it at the fixed ``thresholds`` (None: tuned once on all of these predictions, as
    the point estimate is); a label with no positive image in a resample is left out of that
    resample's macro means."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y) > 0.5
    n = len(y)
    if n == 0:
        return {m: [0.0, 1.0] for m in MULTILABEL_METRICS}
    t = tune_thresholds(probs, y) if thresholds is None else np.asarray(thresholds, np.float64)
    rng = np.random.default_rng(seed)
    block = max(1, min(samples, 2_000_000 // n))  # resamples scored at once (memory)
    parts: dict[str, list[np.ndarray]] = {m: [] for m in MULTILABEL_METRICS}
    for start in range(0, samples, block):
        b = min(block, samples - start)
        draws = rng.integers(0, n, (b, n)) + n * np.arange(b)[:, None]
        # float32 counts: exact (every sum is at most n images) and half the memory traffic
        weights = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float32)
        for metric, values in resampled_multilabel_metrics(probs, y, t, weights).items():
            parts[metric].append(values)
    alpha = (1 - level) / 2
    out = {}
    for metric, values in parts.items():
        low, high = np.quantile(np.concatenate(values), [alpha, 1 - alpha])
        out[metric] = [round(float(low), 4), round(float(high), 4)]
    return out


def resampled_multilabel_metrics(
    probs: np.ndarray, y: np.ndarray, thresholds: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """The multi-label metrics of ``B`` resamples at once, each given by how many times it
    draws each image (``weights``, ``(B, N)`` counts): the same numbers
    :func:`automl_tl.tasks.multilabel_metrics` gives for the resampled images (a repeated
    image is a tie with itself), without building them."""
    y = np.asarray(y, dtype=bool)
    pred = probs >= thresholds

    def count(mask: np.ndarray) -> np.ndarray:  # images of each resample in ``mask``
        return (weights @ mask.astype(weights.dtype)).astype(np.float64)

    tp = count(pred & y)
    denom = 2 * tp + count(pred & ~y) + count(~pred & y)
    present = count(y) > 0
    per_label = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    n_present = present.sum(1)
    ap_sum = np.zeros(len(weights))
    for label in range(y.shape[1]):
        ap = _resampled_average_precision(probs[:, label], y[:, label], weights)
        ap_sum += np.where(present[:, label], ap, 0.0)
    return {
        "map": np.where(n_present > 0, ap_sum / np.maximum(n_present, 1), 0.0),
        "micro_f1": 2 * tp.sum(1) / np.maximum(denom.sum(1), 1),
        "macro_f1": np.where(
            n_present > 0, (per_label * present).sum(1) / np.maximum(n_present, 1), 0.0
        ),
        "subset_accuracy": count((pred == y).all(1)) / weights.sum(1, dtype=np.float64),
    }


def _resampled_average_precision(
    scores: np.ndarray, positive: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """:func:`automl_tl.tasks.average_precision` of one label in each resample (``weights``
    ``(B, N)``): precision at the end of each run of tied scores, weighted by the recall it
    gains (0 where the resample has no positive; the caller leaves those out)."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the end of each run of ties
    w = weights[:, order]
    tp = np.cumsum(w * positive[order], axis=1)[:, last].astype(np.float64)
    seen = np.cumsum(w, axis=1)[:, last].astype(np.float64)
    n_pos = tp[:, -1:]
    precision = np.where(seen > 0, tp / np.maximum(seen, 1), 0.0)
    gain = np.diff(tp, axis=1, prepend=0.0) / np.maximum(n_pos, 1)
    return (precision * gain).sum(1)


def standard_error(p: float, n: int, span: tuple[float, float] = (0.0, 1.0)) -> float:
    """Binomial standard error of a score ``p`` on ``n`` images (at least one image's worth),
    as :func:`automl_tl.leaderboard.selection_note` computes it. A metric whose values lie in
    another ``span`` (a plugin's cost, say) is scaled to [0, 1] and back."""
    if not n:
        return 0.0
    low, high = span
    width = (high - low) or 1.0
    q = min(1.0, max(0.0, (p - low) / width))
    return width * math.sqrt(max(q * (1 - q), 1 / n) / n)


def difference_in_noise(
    a: float, n_a: int, b: float, n_b: int, span: tuple[float, float] = (0.0, 1.0)
) -> tuple[float, bool]:
    """(half-width of the 95 % interval of ``a - b``, whether ``a - b`` lies inside it), for
    two accuracies (or scores in ``span``) on ``n_a`` and ``n_b`` images (normal
    approximation)."""
    half = Z95 * math.sqrt(standard_error(a, n_a, span) ** 2 + standard_error(b, n_b, span) ** 2)
    return half, abs(a - b) <= half


# ---------------------------------------------------------------------------------------------
# calibration


def fit_temperature(log_probs: torch.Tensor, y: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T`` minimizing the NLL of ``softmax(logits / T)`` (LBFGS on log T).

    Log-probabilities work as logits: they differ from them by a constant per row, which
    softmax ignores.
    """
    logits = log_probs.detach().float()
    y = y.long()
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(max(t, 0.05), 20.0)


def calibrated(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities after temperature scaling."""
    return (log_probs / temperature).log_softmax(-1)


def reliability(log_probs: torch.Tensor, y: torch.Tensor, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error (top-1, equal-width confidence bins) and the bins
    (count, mean confidence, accuracy) for a reliability diagram."""
    probs = log_probs.exp()
    confidence, pred = probs.max(1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1)
    rows, ece, n = [], 0.0, max(1, len(y))
    for i in range(bins):
        lo, hi = edges[i], edges[i + 1]
        inside = (confidence > lo) & (confidence <= hi) if i else (confidence <= hi)
        count = int(inside.sum())
        if count:
            conf = float(confidence[inside].double().mean())
            acc = float(correct[inside].mean())
            ece += count / n * abs(acc - conf)
        else:
            conf = acc = None
        rows.append(
            {
                "low": float(lo),
                "high": float(hi),
                "count": count,
                "confidence": conf,
                "accuracy": acc,
            }
        )
    return {"ece": round(ece, 4), "bins": rows}


# ---------------------------------------------------------------------------------------------
# ensembles and soups


def caruana_selection(
    log_probs: list[torch.Tensor],
    y: torch.Tensor,
    *,
    rounds: int = 20,
    score: str | Callable[[torch.Tensor, torch.Tensor], float] = "nll",
) -> list[int]:
    """Greedy ensemble selection with replacement (Caruana et al., 2004).

    Starts empty; each round adds the member whose addition gives the ensemble (the mean of
    its members' probabilities, repeats counting as weight) the best score on these
    predictions (``"nll"``: lowest negative log-likelihood, ties broken by accuracy;
    ``"accuracy"``: highest accuracy, ties by NLL; a function of (mean probabilities, labels):
    the highest value it returns, e.g. the study's metric, ties by NLL). Returns the count of
    each member.
    Stops early when no addition improves the score.
    """
    probs = [lp.exp().double() for lp in log_probs]
    counts = [0] * len(probs)
    total = torch.zeros_like(probs[0])
    best_key = None
    for _ in range(rounds):
        candidates = []
        size = sum(counts) + 1
        for i, p in enumerate(probs):
            mean = (total + p) / size
            nll = float(-mean.clamp(min=1e-12).log().gather(1, y.view(-1, 1)).mean())
            if callable(score):
                key = (float(score(mean, y)), -nll)
            else:
                acc = float((mean.argmax(1) == y).double().mean())
                key = (-nll, acc) if score == "nll" else (acc, -nll)
            candidates.append((key, i))
        key, i = max(candidates, key=lambda c: (c[0], -c[1]))
        if best_key is not None and key <= best_key:
            break
        best_key = key
        counts[i] += 1
        total = total + probs[i]
    return counts


def average_state_dicts(
    states: list[dict[str, torch.Tensor]], weights: list[float] | None = None
) -> dict[str, torch.Tensor]:
    """The (weighted) average of state dicts with the same keys and shapes; integer buffers
    (BatchNorm's ``num_batches_tracked``) are taken from the first."""
    weights = weights or [1.0] * len(states)
    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        if not torch.is_floating_point(first):
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for w, state in zip(weights, states):
            acc += w * state[key].double()
        out[key] = (acc / total).to(first.dtype)
    return out
