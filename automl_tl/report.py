"""The study report: plots of the search, the best model's mistakes, and one page that shows them.

``automl-tl report STUDY`` writes ``<output>/report/`` (``studies/<name>/report/``):

============================ ==================================================================
file                         what it shows
============================ ==================================================================
optimization_history.png     every complete trial's validation score in trial order and the
                             best-so-far line (Optuna's ``plot_optimization_history``)
param_importances.png        how much each searched parameter explains the validation score
                             (Optuna's ``plot_param_importances``, PED-ANOVA)
validation_curves.png        the validation score after every epoch, one line per trial,
                             coloured by backbone; pruned trials dashed (Optuna's
                             ``plot_intermediate_values``, recoloured)
accuracy_vs_time.png         validation score against the trial's wall-clock time, one colour
                             per backbone (pruned trials at their last reported score)
best_vs_seconds.png          the best validation score so far against the device-seconds the
                             finished trials took, summed; trials from the team prior starred
depth_vs_strength.png        unfreeze depth against augmentation strength, coloured by the
                             validation score, one marker per augmentation policy
confusion_matrix.png         the exported best model on the test split: true class (rows)
                             against predicted class (columns)
misclassified.png            the test images the best model gets wrong, most confident first,
                             with the true and the predicted class
per_label_ap.png             multi-label: each label's average precision on test (bars), with
                             its count of positive test images and its threshold
label_cooccurrence.png       multi-label: how often two labels share a test image (diagonal:
                             each label's images), beside the best model's predicted sets
label_mistakes.png           multi-label: per label, the most confident false positive and the
                             most confidently missed positive on test
index.html                   all of the above with the leaderboard and the best model's test
                             metrics in one self-contained file (images embedded)
manifest.json                which files were written, which were skipped and why
============================ ==================================================================

A plot that cannot be drawn yet (no complete trial, too few for importances, no exported
model) is skipped with the reason, shown in ``index.html`` and ``manifest.json``. The report is
rebuilt only when the study or the best model changed since it was written.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import html
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._util import write_atomic
from .config import RECIPE_KEYS, StudyConfig
from .registry import Registry
from .space import SHOWN_PARAMS, STRATEGY_OPTIONS, effective_params
from .trials import PRIOR, Direction, value_of

#: Bump when the report's content changes, so existing reports are rebuilt.
REPORT_VERSION = 6  # 6: every searched parameter in the leaderboard (LoRA rank, recipe)
MAX_MISCLASSIFIED = 32


class Skipped(Exception):
    """A figure that cannot be drawn; the message says why (shown in the report)."""


@dataclass
class ReportFile:
    """One file of the report and whether it was written (else the reason it was skipped)."""

    file: str
    title: str
    description: str
    written: bool = False
    reason: str | None = None


@dataclass
class Report:
    """What :func:`build_report` wrote: the folder, its ``index.html`` and every figure."""

    directory: Path
    index: Path
    files: list[ReportFile]
    rebuilt: bool = True

    @property
    def written(self) -> list[ReportFile]:
        return [f for f in self.files if f.written]

    @property
    def skipped(self) -> list[ReportFile]:
        return [f for f in self.files if not f.written]


@dataclass
class ReportContext:
    config: StudyConfig
    registry: Registry | None
    study: optuna.Study
    trials: list[FrozenTrial]
    data: dict[str, Any]
    device: str = "cpu"
    _predictions: Any = field(default=None, repr=False)

    @property
    def metric(self) -> str:
        return self.config.search.metric

    def colors(self) -> dict[str, Any]:
        """One colour per backbone, the same in every figure."""
        import matplotlib

        names = sorted({t.params["backbone"] for t in self.trials if "backbone" in t.params})
        cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
        return {name: cmap(i % cmap.N) for i, name in enumerate(names)}

    def target(self) -> Callable[[FrozenTrial], float] | None:
        """What Optuna's plots show of a multi-objective study: its metric (None: the value)."""
        return value_of if len(self.study.directions) > 1 else None

    def complete(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state == TrialState.COMPLETE and t.values]

    def predictions(self) -> TestPredictions:
        if self._predictions is None:
            self._predictions = predict_test(self)
        if isinstance(self._predictions, Skipped):
            raise self._predictions
        return self._predictions


# ---------------------------------------------------------------------------------------------
# figures


def _last_score(trial: FrozenTrial) -> float | None:
    if trial.state == TrialState.COMPLETE and trial.values:
        return value_of(trial)
    if trial.intermediate_values:
        return float(trial.intermediate_values[max(trial.intermediate_values)])
    return None


def _duration(trial: FrozenTrial) -> float | None:
    if trial.datetime_complete and trial.datetime_start:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def _optimization_history(ctx: ReportContext):
    from optuna.visualization.matplotlib import plot_optimization_history

    if not ctx.complete():
        raise Skipped("no trial has completed yet")
    ax = plot_optimization_history(
        ctx.study, target=ctx.target(), target_name=f"validation {ctx.metric}"
    )
    ax.set_title(f"Optimization history: validation {ctx.metric} per trial")
    return ax.figure


def _param_importances(ctx: ReportContext):
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_param_importances

    if len(ctx.complete()) < 2:
        raise Skipped(f"needs at least 2 complete trials, the study has {len(ctx.complete())}")
    try:
        ax = plot_param_importances(
            ctx.study,
            target=ctx.target(),
            evaluator=PedAnovaImportanceEvaluator(),
            target_name=f"validation {ctx.metric}",
        )
    except (RuntimeError, ValueError) as exc:  # e.g. every trial has the same parameters
        raise Skipped(f"Optuna cannot compute importances yet: {exc}") from exc
    ax.set_title("", loc="left")  # Optuna's own title sits on the left
    ax.set_title(f"Parameter importances for validation {ctx.metric} (PED-ANOVA)")
    return ax.figure


def _validation_curves(ctx: ReportContext):
    import matplotlib.lines as mlines
    from matplotlib.ticker import MaxNLocator
    from optuna.visualization.matplotlib import plot_intermediate_values

    reported = [t for t in ctx.trials if t.intermediate_values]
    if not reported:
        raise Skipped("no trial has reported a validation score yet")
    ax = plot_intermediate_values(ctx.study)
    colors = ctx.colors()
    trials = {t.number: t for t in ctx.trials}
    for line in ax.get_lines():
        label = line.get_label()
        if not label.startswith("Trial"):
            continue
        trial = trials.get(int(label[len("Trial") :]))
        if trial is None:
            continue
        line.set_color(colors.get(trial.params.get("backbone"), "grey"))
        if trial.state == TrialState.PRUNED:
            line.set_linestyle("--")
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()
    handles = [mlines.Line2D([], [], color=c, marker=".", label=b) for b, c in colors.items()]
    handles.append(mlines.Line2D([], [], color="grey", linestyle="--", label="pruned"))
    ax.legend(handles=handles, bbox_to_anchor=(1.02, 1), loc="upper left", fontsize="small")
    ax.set_title(f"Validation {ctx.metric} per epoch, one line per trial")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {ctx.metric}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return ax.figure


def _accuracy_vs_time(ctx: ReportContext):
    import matplotlib.pyplot as plt

    points = [
        (t, _duration(t), _last_score(t))
        for t in ctx.trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    points = [(t, d, s) for t, d, s in points if d is not None and s is not None]
    if not points:
        raise Skipped("no trial has finished with a score yet")
    fig, ax = plt.subplots(figsize=(7, 4.5), tight_layout=True)
    for backbone, color in ctx.colors().items():
        for state, marker in ((TrialState.COMPLETE, "o"), (TrialState.PRUNED, "x")):
            xs = [
                d for t, d, _ in points if t.params.get("backbone") == backbone and t.state == state
            ]
            ys = [
                s for t, _, s in points if t.params.get("backbone") == backbone and t.state == state
            ]
            if xs:
                label = backbone if state == TrialState.COMPLETE else f"{backbone} (pruned)"
                ax.scatter(xs, ys, color=color, marker=marker, s=40, label=label)
    best = ctx.data.get("best")
    if best:
        t = next((t for t, _, _ in points if t.number == best["number"]), None)
        if t is not None:
            ax.scatter(
                [_duration(t)], [best["value"]], s=220, facecolors="none", edgecolors="black"
            )
            ax.annotate(
                f"best #{t.number}",
                (_duration(t), best["value"]),
                xytext=(8, -12),
                textcoords="offset points",
            )
    ax.set_xlabel("trial time (s)")
    ax.set_ylabel(f"validation {ctx.metric}")
    ax.set_title(f"Validation {ctx.metric} vs. trial time, per backbone")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return fig


def _best_vs_seconds(ctx: ReportContext):
    import matplotlib.pyplot as plt

    finished = sorted(
        (t for t in ctx.trials if t.state.is_finished() and _duration(t) is not None),
        key=lambda t: t.datetime_complete,
    )
    spent, best, xs, ys, prior = 0.0, None, [], [], []
    direction = Direction.of(ctx.study)  # a cost metric: the lowest so far
    for t in finished:
        spent += _duration(t)
        value = value_of(t)  # the metric (a multi-objective study's first objective)
        if t.state == TrialState.COMPLETE and value is not None:
            best = value if direction.better(value, best) else best
            if PRIOR in t.user_attrs:
                prior.append((spent, value))
        if best is not None:
            xs.append(spent)
            ys.append(best)
    if not xs:
        raise Skipped("no trial has completed yet")
    fig, ax = plt.subplots(figsize=(7, 4.5), tight_layout=True)
    ax.step([0.0, *xs], [ys[0], *ys], where="post", color="black", label="best so far")
    if prior:
        ax.scatter(*zip(*prior), marker="*", s=90, color="tab:orange", label="from the prior")
    ax.set_xlabel("device-seconds spent (trial times summed, in finishing order)")
    ax.set_ylabel(f"best validation {ctx.metric}")
    ax.set_title(f"Best validation {ctx.metric} vs. compute spent")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return fig


def _depth_vs_strength(ctx: ReportContext):
    import matplotlib.pyplot as plt

    finished = [
        t
        for t in ctx.trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and "unfreeze_depth" in effective_params(t.params)  # random init: depth 1.0
    ]
    if not finished:
        raise Skipped("no trial has finished yet")
    markers = "osD^vP*Xh<>"
    policies = sorted({t.params.get("augmentation", "?") for t in finished})
    fig, ax = plt.subplots(figsize=(7, 4.5), tight_layout=True)
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    values = [value_of(t) for t in complete]
    vmin, vmax = (min(values), max(values)) if values else (0.0, 1.0)
    mappable = None
    for i, policy in enumerate(policies):
        mine = [t for t in complete if t.params.get("augmentation") == policy]
        if mine:
            mappable = ax.scatter(
                [float(t.params.get("aug_strength", 0.0)) for t in mine],
                [float(effective_params(t.params)["unfreeze_depth"]) for t in mine],
                c=[value_of(t) for t in mine],
                cmap="viridis",
                vmin=vmin,
                vmax=vmax if vmax > vmin else vmin + 1e-9,
                marker=markers[i % len(markers)],
                s=60,
                edgecolors="black",
                linewidths=0.5,
                label=policy,
            )
        pruned = [
            t
            for t in finished
            if t.state == TrialState.PRUNED and t.params.get("augmentation") == policy
        ]
        if pruned:
            ax.scatter(
                [float(t.params.get("aug_strength", 0.0)) for t in pruned],
                [float(effective_params(t.params)["unfreeze_depth"]) for t in pruned],
                marker=markers[i % len(markers)],
                s=40,
                facecolors="none",
                edgecolors="grey",
                label=f"{policy} (pruned)",
            )
    if mappable is not None:
        fig.colorbar(mappable, ax=ax, label=f"validation {ctx.metric}")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("augmentation strength (0 = none)")
    ax.set_ylabel("unfreeze depth (fraction of layer groups)")
    ax.set_title("Unfreeze depth × augmentation strength")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.25, 1))
    return fig


@dataclass
class TestPredictions:
    class_names: list[str]
    images: Any  # (N, 3, S, S) uint8 tensor of the test split
    names: list[str]
    truth: list[int]
    predicted: list[int]
    confidence: list[float]
    trial: int | None
    #: a multi-label model: per-label probabilities (N, C), multi-hot truth, thresholds
    probs: Any = None
    targets: Any = None
    thresholds: list[float] | None = None


def predict_test(ctx: ReportContext) -> TestPredictions | Skipped:
    """The exported best model's predictions on the study's test split (or why there are none)."""
    import torch

    from .data import load_splits
    from .errors import UserError
    from .export import load_model

    best_dir = ctx.config.paths.best
    metrics_path = best_dir / "metrics.json"
    if not metrics_path.is_file():
        return Skipped(
            f"no exported best model in {best_dir}; run `automl-tl search` (without "
            "--no-retrain) or `automl-tl retrain`"
        )
    if ctx.registry is None:
        return Skipped("the plugins were not loaded, so the model cannot be rebuilt")
    metrics = json.loads(metrics_path.read_text())
    try:
        splits = load_splits(ctx.config, ctx.registry)
        model = load_model(best_dir, device=ctx.device, registry=ctx.registry)
    except UserError as exc:
        return Skipped(f"cannot evaluate the best model: {exc}")
    trained_on = metrics.get("data") or {}
    if trained_on.get("split_hash") and trained_on["split_hash"] != splits.split_hash:
        return Skipped(
            "the data changed since the best model was trained (its test split differs); "
            "retrain it with `automl-tl retrain`"
        )
    if list(model.label_names) != list(splits.class_names):
        return Skipped(
            f"the model's classes {model.label_names} differ from the data's {splits.class_names}"
        )
    test = splits.test
    if len(test) == 0:
        return Skipped("the test split is empty")
    predicted: list[int] = []
    confidence: list[float] = []
    if model.multilabel:
        with torch.inference_mode():
            probs = torch.cat(
                [
                    model.model(model.preprocess(test.x[start : start + 256])).float().sigmoid()
                    for start in range(0, len(test), 256)
                ]
            ).cpu()
        return TestPredictions(
            class_names=list(splits.class_names),
            images=test.x,
            names=list(test.names),
            truth=[],
            predicted=[],
            confidence=[],
            trial=metrics.get("trial"),
            probs=probs.numpy(),
            targets=test.y.numpy() > 0.5,
            thresholds=list(model.thresholds or []),
        )
    with torch.inference_mode():
        for start in range(0, len(test), 256):
            x = model.preprocess(test.x[start : start + 256])
            probs = model.model(x).float().softmax(-1).cpu()
            p, i = probs.max(1)
            predicted += i.tolist()
            confidence += p.tolist()
    return TestPredictions(
        class_names=list(splits.class_names),
        images=test.x,
        names=list(test.names),
        truth=test.y.tolist(),
        predicted=predicted,
        confidence=confidence,
        trial=metrics.get("trial"),
    )


def _confusion_matrix(ctx: ReportContext):
    import matplotlib.pyplot as plt
    import numpy as np

    pred = ctx.predictions()
    n = len(pred.class_names)
    cm = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(pred.truth, pred.predicted):
        cm[t, p] += 1
    accuracy = float(np.trace(cm)) / max(1, int(cm.sum()))
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(14.0, max(4.5, 0.45 * n + 2.5))
    fig, ax = plt.subplots(figsize=(size + 1, size), tight_layout=True)
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    labels = [c if len(c) <= 14 else c[:13] + "…" for c in pred.class_names]
    ax.set_xticks(range(n), labels, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), labels)
    if n <= 30:
        _annotate_counts(ax, cm, rows, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    trial = f"trial {pred.trial}, " if pred.trial is not None else ""
    ax.set_title(
        f"Best model ({trial}exported) on test: {len(pred.truth)} images, accuracy {accuracy:.4f}"
    )
    return fig


def _annotate_counts(ax, counts, shade, fontsize: int) -> None:
    """Each non-zero count written on its cell, white on cells shaded past half."""
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if shade[i, j] > 0.5 else "black",
                )


def _misclassified(ctx: ReportContext):
    import matplotlib.pyplot as plt

    pred = ctx.predictions()
    wrong = [i for i, (t, p) in enumerate(zip(pred.truth, pred.predicted)) if t != p]
    if not wrong:
        raise Skipped(f"the best model classifies all {len(pred.truth)} test images correctly")
    wrong.sort(key=lambda i: -pred.confidence[i])
    shown = wrong[:MAX_MISCLASSIFIED]
    cols = min(8, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.2 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        ax.imshow(pred.images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        true, guess = pred.class_names[pred.truth[i]], pred.class_names[pred.predicted[i]]
        ax.set_title(f"{true} → {guess} ({pred.confidence[i]:.2f})", fontsize=8, color="darkred")
        name = pred.names[i]
        caption = f"test #{i}" if name.startswith("#") else os.path.basename(name)
        ax.text(
            0.5,
            -0.08,
            caption if len(caption) <= 22 else caption[:21] + "…",
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=7,
        )
    fig.suptitle(
        f"{len(wrong)} of {len(pred.truth)} test images misclassified"
        + (f" (the {len(shown)} most confident shown)" if len(wrong) > len(shown) else "")
        + ": true → predicted (confidence)"
    )
    fig.tight_layout()
    return fig


def _short(name: str, limit: int = 14) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _per_label_ap(ctx: ReportContext):
    import matplotlib.pyplot as plt
    import numpy as np

    from .tasks import average_precision

    pred = ctx.predictions()
    n = len(pred.class_names)
    ap = np.array([average_precision(pred.probs[:, c], pred.targets[:, c]) for c in range(n)])
    positives = pred.targets.sum(0)
    fig, ax = plt.subplots(figsize=(min(16.0, max(5.0, 0.5 * n + 2)), 4.5), tight_layout=True)
    shown = np.nan_to_num(ap, nan=0.0)
    bars = ax.bar(range(n), shown, color=["tab:blue" if p else "lightgray" for p in positives])
    for bar, value, count, t in zip(bars, ap, positives, pred.thresholds or [None] * n):
        text = "no positive" if np.isnan(value) else f"{value:.2f}"
        text += f"\nn={int(count)}" + (f"\nt={t:.2f}" if t is not None else "")
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height() + 0.01,
            text,
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(range(n), [_short(c) for c in pred.class_names], rotation=90 if n > 8 else 0)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("average precision on test")
    mean = float(np.nanmean(ap)) if not np.isnan(ap).all() else 0.0
    trial = f"trial {pred.trial}, " if pred.trial is not None else ""
    ax.set_title(f"Per-label average precision of the best model ({trial}test mAP {mean:.4f})")
    return fig


def _label_cooccurrence(ctx: ReportContext):
    import matplotlib.pyplot as plt
    import numpy as np

    pred = ctx.predictions()
    n = len(pred.class_names)
    truth = pred.targets.astype(np.int64)
    guessed = (pred.probs >= np.asarray(pred.thresholds)).astype(np.int64)
    size = min(12.0, max(4.0, 0.4 * n + 2.5))
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), tight_layout=True)
    labels = [_short(c) for c in pred.class_names]
    for ax, matrix, what in (
        (axes[0], truth.T @ truth, "true labels"),
        (axes[1], guessed.T @ guessed, "predicted labels (at the tuned thresholds)"),
    ):
        image = ax.imshow(matrix, cmap="Blues")
        fig.colorbar(image, ax=ax, label="test images with both labels")
        ax.set_xticks(range(n), labels, rotation=90 if n > 6 else 0)
        ax.set_yticks(range(n), labels)
        if n <= 20:
            _annotate_counts(ax, matrix, matrix / max(1, int(matrix.max())), fontsize=7)
        ax.set_title(f"Co-occurrence of {what}")
    return fig


#: per label, the most confident false positive and the most confidently missed positive
MISTAKES_PER_LABEL = 2


def _label_mistakes(ctx: ReportContext):
    import matplotlib.pyplot as plt
    import numpy as np

    pred = ctx.predictions()
    t = np.asarray(pred.thresholds)
    panels = []  # (label, image index, kind, probability)
    for c, name in enumerate(pred.class_names):
        p, y = pred.probs[:, c], pred.targets[:, c]
        false_pos = np.flatnonzero((p >= t[c]) & ~y)
        missed = np.flatnonzero((p < t[c]) & y)
        if len(false_pos):
            i = int(false_pos[np.argmax(p[false_pos])])
            panels.append((name, i, "false +", float(p[i])))
        if len(missed):
            i = int(missed[np.argmin(p[missed])])
            panels.append((name, i, "missed", float(p[i])))
    if not panels:
        raise Skipped(f"the best model gets every label of all {len(pred.probs)} test images right")
    cols = min(8, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.3 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, i, kind, prob) in zip(axes.flat, panels):
        ax.imshow(pred.images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{_short(name, 10)}: {kind} ({prob:.2f})", fontsize=8, color="darkred")
        truth = [pred.class_names[j] for j in np.flatnonzero(pred.targets[i])]
        caption = "true: " + " ".join(truth)
        ax.text(
            0.5,
            -0.08,
            _short(caption, 24),
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=7,
        )
    fig.suptitle(
        "Most confident mistakes per label on test: a false positive (label predicted, not "
        "true; its probability) and a missed label (true, not predicted)"
    )
    fig.tight_layout()
    return fig


def _reliability(ctx: ReportContext):
    import matplotlib.pyplot as plt

    cal = (ctx.data.get("best_model") or {}).get("calibration")
    if not cal or not cal.get("bins_before"):
        raise Skipped("the best model has no calibration record (retrain it with this version)")
    fig, ax = plt.subplots(figsize=(5.5, 5), tight_layout=True)
    ax.plot([0, 1], [0, 1], color="#999", linestyle=":", label="perfectly calibrated")
    for key, label, color in (
        ("bins_before", f"before (ECE {cal['ece_before']:.3f})", "#d62728"),
        (
            "bins_after",
            f"after, T = {cal['temperature']:.2f} (ECE {cal['ece_after']:.3f})",
            "#1f77b4",
        ),
    ):
        points = [(b["confidence"], b["accuracy"]) for b in cal[key] if b["count"]]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", color=color, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability of the best model on test")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _pareto_front(ctx: ReportContext):
    from optuna.visualization.matplotlib import plot_pareto_front

    names = [f"validation {ctx.metric}", *ctx.config.search.measures]
    if len(names) > 3:
        raise Skipped(f"{len(names)} objectives: a Pareto front is drawn for 2 or 3")
    if not ctx.complete():
        raise Skipped("no trial has completed yet")
    constrained = ctx.config.search.constraints
    # Optuna finds the constraints the search stored on each trial itself
    ax = plot_pareto_front(ctx.study, target_names=names)
    ax.set_title(
        f"Pareto front: {' vs. '.join(names)}"
        + (f" ({', '.join(constrained)})" if constrained else "")
    )
    return ax.figure


#: drawn only for a multi-objective study (``[search] objectives``)
PARETO = (
    "pareto_front.png",
    "Pareto front",
    "Each complete trial by its validation score and its measured cost (latency on the "
    "declared target, parameters or size); the highlighted trials are the Pareto front: none "
    "is beaten on every objective at once. [selection] pick (or retrain --trial N) chooses "
    "the point to ship; trials breaking [search] constraints are greyed out.",
    _pareto_front,
)


def figures_for(config: StudyConfig) -> list[tuple[str, str, str, Callable[[ReportContext], Any]]]:
    """The study's figures: those of :data:`FIGURES` for its task kind (multi-label or
    not), and the Pareto front of a multi-objective one."""
    skip = SINGLE_LABEL_FIGURES if config.task.multilabel else MULTILABEL_FIGURES
    figures = [f for f in FIGURES if f[0] not in skip]
    return [*figures, PARETO] if config.search.multi_objective else figures


FIGURES: list[tuple[str, str, str, Callable[[ReportContext], Any]]] = [
    (
        "optimization_history.png",
        "Optimization history",
        "Each dot is a complete trial's validation score in the order the trials ran; the line is "
        "the best score so far. A line that stops improving means more trials are unlikely to help.",
        _optimization_history,
    ),
    (
        "param_importances.png",
        "Parameter importances",
        "How much of the variation in the validation score each searched parameter explains "
        "(Optuna's PED-ANOVA over the complete trials). Parameters near zero barely matter for "
        "this data; with few trials the estimate is rough.",
        _param_importances,
    ),
    (
        "validation_curves.png",
        "Validation curves",
        "The validation score after every epoch, one line per trial, coloured by backbone. "
        "Dashed lines are trials the pruner stopped early.",
        _validation_curves,
    ),
    (
        "accuracy_vs_time.png",
        "Score vs. trial time",
        "Each trial's validation score against its wall-clock time, one colour per backbone "
        "(crosses: pruned trials at their last score). Up and to the left is cheap and good.",
        _accuracy_vs_time,
    ),
    (
        "best_vs_seconds.png",
        "Best score vs. compute spent",
        "The best validation score so far against the device-seconds all finished trials took "
        "(their times summed, in the order they finished): how much compute the search needed "
        "to get where it is. Stars: trials the team prior chose ([search] prior).",
        _best_vs_seconds,
    ),
    (
        "depth_vs_strength.png",
        "Unfreeze depth × augmentation strength",
        "Each finished trial placed by how much of the backbone it trained (0 = linear probe, "
        "1 = full fine-tune) and how strong its augmentation was (0 = none), coloured by "
        "validation score; the marker shape is the augmentation policy.",
        _depth_vs_strength,
    ),
    (
        "reliability.png",
        "Calibration (reliability diagram)",
        "Test images binned by the best model's confidence: each point is a bin's mean "
        "confidence against its accuracy, before and after temperature scaling (the "
        "temperature is fitted on held-out validation predictions). On the diagonal, a "
        "probability of 0.8 is right 80 % of the time; ECE is the mean gap.",
        _reliability,
    ),
    (
        "confusion_matrix.png",
        "Confusion matrix of the best model",
        "The exported best model on the test split: rows are true classes, columns predicted "
        "ones; the numbers are image counts and the colour the fraction of the true class.",
        _confusion_matrix,
    ),
    (
        "misclassified.png",
        "Misclassified test images",
        "The test images the best model gets wrong, most confident mistakes first, titled "
        "true → predicted class (confidence) with the file name below.",
        _misclassified,
    ),
    (
        "per_label_ap.png",
        "Average precision per label",
        "The exported best model on the test split: each label's average precision (grey: "
        "no positive test image), its number of positive test images (n) and the threshold "
        "tuned on validation (t).",
        _per_label_ap,
    ),
    (
        "label_cooccurrence.png",
        "Label co-occurrence",
        "How many test images carry both labels: the true label sets (left) and the best "
        "model's predicted sets at its thresholds (right); the diagonal counts each label.",
        _label_cooccurrence,
    ),
    (
        "label_mistakes.png",
        "Most confident mistakes per label",
        "Per label, the test image it is most confidently predicted for without being true "
        "(false +) and the one it is most confidently missed on, with the image's true labels.",
        _label_mistakes,
    ),
]
#: figures of one task kind only (the others are drawn for both)
SINGLE_LABEL_FIGURES = frozenset({"reliability.png", "confusion_matrix.png", "misclassified.png"})
MULTILABEL_FIGURES = frozenset({"per_label_ap.png", "label_cooccurrence.png", "label_mistakes.png"})


# ---------------------------------------------------------------------------------------------
# the page


def _state_key(ctx: ReportContext) -> str:
    """Changes whenever a trial, the best model or the report's own format changes."""
    h = hashlib.sha256(f"v{REPORT_VERSION}|{ctx.metric}".encode())
    for t in ctx.trials:
        h.update(
            json.dumps(
                [
                    t.number,
                    t.state.name,
                    t.values,
                    t.params,
                    sorted(t.intermediate_values.items()),
                    t.datetime_complete.isoformat() if t.datetime_complete else None,
                ],
                default=str,
            ).encode()
        )
    for path in (
        ctx.config.paths.best / "model.safetensors",
        ctx.config.paths.selection,
    ):
        if path.is_file():
            stat = path.stat()
            h.update(f"{stat.st_size}|{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if key in ("lr", "weight_decay"):
            return f"{value:.2e}"
        if key in ("aug_strength", "unfreeze_depth"):
            return f"{value:.2f}"
        if key == "seconds":
            return f"{value:.1f}"
        return f"{value:.4f}"
    return str(value)


#: the leaderboard's parameter columns, each shown when some trial has it: the shown
#: parameters, then a strategy's own options (the LoRA rank), the searched image size and the
#: recipe's searched regularizers
LEADERBOARD_PARAMS = (
    *SHOWN_PARAMS,
    *(key for options in STRATEGY_OPTIONS.values() for key in options.values()),
    "image_size",
    *RECIPE_KEYS,
)


def _leaderboard_html(data: dict[str, Any]) -> str:
    metric = data["metric"]
    shown = {t["number"]: effective_params(t["params"]) for t in data["trials"]}
    used = [
        k
        for k in LEADERBOARD_PARAMS  # every trial's weight source, resolved, also when fixed
        if k == "weights" or any(p.get(k) is not None for p in shown.values())
    ]
    columns = ["trial", "state", metric, *used, "epochs", "seconds", "fail_reason"]
    best = (data.get("best") or {}).get("number")
    direction = Direction.named(data.get("direction"))  # best first, either way
    trials = sorted(data["trials"], key=lambda t: direction.key(t["value"]))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for t in trials:
        values = {
            "trial": t["number"],
            "state": t["state"],
            metric: t["value"],
            **{k: shown[t["number"]].get(k) for k in used},
            "weights": t.get("weights") or shown[t["number"]].get("weights"),  # resolved
            "epochs": t.get("epochs_run"),
            "seconds": t.get("duration_s"),
            "fail_reason": t.get("fail_reason"),
        }
        cells = "".join(f"<td>{html.escape(_fmt(values[c], c))}</td>" for c in columns)
        css = ' class="best"' if t["number"] == best else f' class="{t["state"].lower()}"'
        rows.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } .muted { color: #666; }
figure { margin: 2rem 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; max-width: 60rem; }
.skipped { color: #8a5a00; background: #fff6e0; padding: 0.5rem 1rem; border-radius: 4px; }
table { border-collapse: collapse; font-size: 0.85rem; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f3f3f3; position: sticky; top: 0; }
tr.best { background: #e5f5e0; font-weight: 600; } tr.pruned { color: #777; }
tr.fail { color: #a33; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dt { font-weight: 600; }
nav a { margin-right: 1rem; }
"""


def _summary_html(ctx: ReportContext) -> str:
    data = ctx.data
    counts: dict[str, int] = {}
    for t in data["trials"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    items = [
        ("metric", f"validation {data['metric']}"),
        ("trials", ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "none"),
    ]
    stored = ctx.study.user_attrs.get("data") or {}
    if stored:
        sizes = stored.get("sizes", {})
        items.append(
            (
                "data",
                f"{len(stored.get('classes', []))} classes, "
                + " / ".join(f"{sizes.get(s, 0)} {s}" for s in ("train", "val", "test"))
                + f" images ({ctx.config.data.source}, {ctx.config.data.image_size} px)",
            )
        )
    best = data.get("best")
    if best:
        params = ", ".join(f"{k}={_fmt(v, k)}" for k, v in best["params"].items())
        items.append(("best trial", f"#{best['number']}: {best['value']:.4f} ({params})"))
    if data.get("dead_at_chance"):
        items.append(
            (
                "pruned at chance",
                f"{data['dead_at_chance']} trial(s) (the dead-trial guard: <= 1.5x chance from "
                "epoch 2 while another trial had left it)",
            )
        )
    if data.get("selection_note"):
        items.append(("note", data["selection_note"]))
    model = data.get("best_model")
    if model:
        test = ", ".join(f"{k} {v:.4f}{_interval(model, k)}" for k, v in model["test"].items())
        items.append(("best model", f"trial {model['trial']}, test {test} — {model['path']}"))
        if model.get("test_interval"):
            how = (
                "bootstrap over the test images for each metric"
                if model.get("task") == "multilabel"
                else "Wilson for accuracy, bootstrap for balanced accuracy and macro F1"
            )
            items.append(
                ("intervals", f"95 % on {model.get('test_images', '?')} test images: {how}")
            )
        cal = model.get("calibration") or {}
        if cal.get("fitted_on"):
            items.append(
                (
                    "calibration",
                    f"temperature {cal['temperature']:.3f} fitted on {cal['fitted_on']}; expected "
                    f"calibration error on test {cal['ece_before']:.3f} → {cal['ece_after']:.3f}",
                )
            )
    return (
        "<dl>"
        + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items)
        + "</dl>"
    )


def _interval(row: dict[str, Any], key: str) -> str:
    low_high = (row.get("test_interval") or {}).get(key)
    return f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else ""


def _selection_html(data: dict[str, Any]) -> str:
    """The race of the finalists and single best vs ensemble vs soup on test."""
    chosen = data.get("selection")
    if not chosen:
        return ""
    sel = chosen["selection"]
    parts = ['<h2 id="selection">Selection</h2>']
    how = f"{sel['folds']} folds of train+val" if sel["folds"] else "the study's split"
    parts.append(
        f"<p>{len(sel['finalists'])} finalist(s) within one standard error (±"
        f"{sel['standard_error']:.3f}) of the best on {sel['val_images']} validation images; "
        f"{sel['runs']} extra run(s) on {html.escape(how)} ({sel['repeats']} repeat(s), budget "
        f"{sel['budget']}, {sel['run_seconds']:.0f} s); winner by {html.escape(sel['rule'])}: "
        f"trial {sel['winner']} (the search's argmax: trial {sel['argmax']}).</p>"
    )
    head = "".join(
        f"<th>{c}</th>"
        for c in ("trial", "search score", "race scores", "mean", "lcb", "best epochs")
    )
    rows = []
    for r in sel["finalists"]:
        css = ' class="best"' if r["trial"] == sel["winner"] else ""
        cells = [
            r["trial"],
            f"{r['value']:.4f}",
            ", ".join(f"{v:.3f}" for v in r["scores"]),
            f"{r['mean']:.4f}",
            f"{r['lcb']:.4f}",
            ", ".join(map(str, r["best_epochs"])),
        ]
        rows.append(
            f"<tr{css}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
        )
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    for note in sel.get("notes") or []:
        parts.append(f'<p class="muted">note: {html.escape(note)}</p>')
    models = [(k, chosen.get(k)) for k in ("single", "ensemble", "soup") if chosen.get(k)]
    if models:
        head = "".join(
            f"<th>{c}</th>"
            for c in (
                "model",
                "test accuracy (95 %)",
                "balanced accuracy",
                "macro F1",
                "ECE",
                "ms / image",
                "models",
                "parameters",
            )
        )
        rows = []
        for name, m in models:
            cells = [
                {"single": "single best"}.get(name, name),
                f"{m['test']['accuracy']:.4f}{_interval(m, 'accuracy')}",
                f"{m['test']['balanced_accuracy']:.4f}{_interval(m, 'balanced_accuracy')}",
                f"{m['test']['macro_f1']:.4f}{_interval(m, 'macro_f1')}",
                f"{m['ece']:.3f}",
                f"{m['ms_per_image']:.2f}",
                m["members"],
                f"{m['parameters']:,}",
            ]
            rows.append(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
            )
        parts.append(
            "<h3>Single best vs ensemble vs soup (test)</h3>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    return "\n".join(parts)


def _page(ctx: ReportContext, files: list[ReportFile], directory: Path) -> str:
    data = ctx.data
    sections = []
    for f in files:
        anchor = f.file.rsplit(".", 1)[0]
        if f.written:
            encoded = base64.b64encode((directory / f.file).read_bytes()).decode("ascii")
            body = (
                f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(f.title)}">'
                f"<figcaption>{html.escape(f.description)} "
                f'<span class="muted">({html.escape(f.file)})</span></figcaption>'
            )
        else:
            body = f'<p class="skipped">Not drawn: {html.escape(f.reason or "")}</p>'
        sections.append(f'<figure id="{anchor}"><h2>{html.escape(f.title)}</h2>{body}</figure>')
    nav = "".join(
        f'<a href="#{f.file.rsplit(".", 1)[0]}">{html.escape(f.title)}</a>' for f in files
    )
    generated = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    title = f"automl-tl report: {data['study']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="muted">generated {html.escape(generated)} by automl-tl report</p>
{_summary_html(ctx)}
<nav><a href="#leaderboard">Leaderboard</a>{'<a href="#selection">Selection</a>' if data.get("selection") else ""}{nav}</nav>
<h2 id="leaderboard">Leaderboard</h2>
{_leaderboard_html(data)}
{_selection_html(data)}
{"".join(sections)}
</body></html>
"""


def build_report(
    config: StudyConfig,
    registry: Registry | None,
    data: dict[str, Any] | None = None,
    *,
    directory: Path | None = None,
    device: str = "cpu",
    force: bool = False,
) -> Report:
    """Write the report folder (default ``<output>/report/``) and return what it holds.

    Args:
        config: the study.
        registry: the loaded plugins (to rebuild the best model and reload the data); with
            None the confusion matrix and the misclassified images are skipped.
        data: :func:`automl_tl.study.report`'s leaderboard, when the caller has it already.
        directory: where to write, instead of ``<output>/report/``.
        device: where the best model predicts the test split.
        force: rebuild even when nothing changed since the last report.

    Example:
        >>> from automl_tl import load_config, registry_for           # doctest: +SKIP
        >>> config = load_config("studies/digits.toml")               # doctest: +SKIP
        >>> build_report(config, registry_for(config.plugins)).index  # doctest: +SKIP
        PosixPath('studies/digits/report/index.html')
    """
    import matplotlib.pyplot as plt

    from .leaderboard import leaderboard
    from .storage import open_study

    data = data if data is not None else leaderboard(config)
    study = open_study(config)
    ctx = ReportContext(config, registry, study, study.get_trials(deepcopy=False), data, device)
    directory = Path(directory) if directory else config.paths.report
    manifest_path = directory / "manifest.json"
    key = _state_key(ctx)
    if not force and manifest_path.is_file() and (directory / "index.html").is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            files = [ReportFile(**f) for f in manifest["files"]]
        except (ValueError, KeyError, TypeError):
            manifest, files = {}, []
        complete = files and all((directory / f.file).is_file() for f in files if f.written)
        if manifest.get("state") == key and complete:
            return Report(directory, directory / "index.html", files, rebuilt=False)

    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for name, title, description, draw in figures_for(config):
        entry = ReportFile(name, title, description)
        # Optuna's plots switch to the ggplot style (keep it local) and warn about small samples
        # (the report says so in words); class and file names are text, never mathtext
        # (a "$" in a name would be parsed as TeX and can crash the figure)
        with plt.rc_context({"text.parse_math": False}), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fig = draw(ctx)
            except Skipped as exc:
                entry.reason = str(exc)
                (directory / name).unlink(missing_ok=True)
            else:
                fig.savefig(directory / name, dpi=110, bbox_inches="tight")
                plt.close(fig)
                entry.written = True
        files.append(entry)
    plt.close("all")
    index = directory / "index.html"
    write_atomic(index, _page(ctx, files, directory))
    manifest = {
        "study": config.name,
        "state": key,
        "generated": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "files": [asdict(f) for f in files],
    }
    write_atomic(manifest_path, json.dumps(manifest, indent=2))
    return Report(directory, index, files)


def write_report_files(
    config: StudyConfig, data: dict[str, Any], plugins: list[str] = (), device: str = "cpu"
) -> dict[str, Any]:
    """``automl-tl report``'s part: build the report, say on stderr where it is, return its
    manifest (added to ``--format json`` as ``"report"``)."""
    import sys

    import matplotlib

    matplotlib.use("Agg")  # the command line never opens a window

    from .data import parse_source
    from .errors import UserError
    from .plugins import registry_needing

    # the study file's plugins are code: they run only when the best model's backbone or the
    # dataset source comes from one of them
    needs = {"datasets": [parse_source(config.data.source)[0]]}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        exported = json.loads((config.output_dir / "best" / "config.json").read_text())
        needs["backbones"] = [
            exported.get("automl_tl", {}).get("backbone") or exported["architecture"]
        ]
    try:
        registry: Registry | None = registry_needing(config.plugins, plugins, needs)
    except UserError as exc:  # the plots of the search need no plugin; the model's do
        print(f"warning: {exc}; the best model's figures are skipped", file=sys.stderr)
        registry = None
    built = build_report(config, registry, data, device=device)
    state = "written" if built.rebuilt else "up to date"
    print(f"report {state}: {built.index} ({len(built.written)} figures)", file=sys.stderr)
    for f in built.skipped:
        print(f"  not drawn: {f.file}: {f.reason}", file=sys.stderr)
    return {
        "directory": str(built.directory),
        "index": str(built.index),
        "files": [asdict(f) for f in built.files],
    }
