"""``automl-tl plugins --bench NAME``: a scorecard for a plugin's backbones.

Each backbone the plugin registers runs beside two built-ins (:data:`REFERENCES`) on a small
fixed suite of tasks shipped with the package (:data:`SUITE`: subsets of the bundled digits,
so nothing is downloaded), with one fixed recipe (no search): train, score on the test split,
export, export to ONNX, and try plain timm on the export. Per backbone and task: test
accuracy, training images/s, peak memory, time to the first epoch, and whether ONNX export
and plain-timm loading work. The rows go to the ``benchmarks`` table of ``<out>/catalog.db``
(so later studies can rank the backbone next to the ones it ran beside) and to a Markdown
card ``<out>/<plugin>-card.md``.
"""

from __future__ import annotations

import datetime as dt
import json
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .catalog import Catalog
from .config import config_from_dict
from .data import load_splits
from .errors import UserError
from .export import export_model, export_onnx, plain_timm_loads
from .prior import meta_features
from .registry import Registry
from .train import Choice, EpochResult, evaluate, fit, resolve_device

#: the built-ins every plugin backbone is compared with
REFERENCES = ("test_resnet", "test_convnext")


@dataclass(frozen=True)
class Task:
    """One task of the suite: a dataset source and how many labels per class it keeps."""

    name: str
    source: str
    max_per_class: int | None
    description: str


SUITE = (
    Task("digits-few", "digits:0-4", 20, "few labels: 20 images per class, digits 0-4"),
    Task("digits-5-9", "digits:5-9", None, "a second task: all digits 5-9"),
    Task("digits-all", "digits", None, "harder: all ten digits"),
)

#: the one fixed recipe every backbone trains with
RECIPE = {"epochs": 3, "lr": 3e-3, "weight_decay": 1e-4, "unfreeze": "top_k", "depth": 1.0}


@dataclass
class BenchRow:
    plugin: str
    backbone: str
    reference: bool
    task: str
    test_accuracy: float | None
    images_per_s: float | None
    first_epoch_s: float | None
    peak_memory_mib: float | None
    onnx: str
    plain_timm: bool | None
    error: str | None = None
    weights: str = "none"


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # the process's peak resident set (kilobytes on Linux, bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def bench_plugin(
    plugin: str,
    registry: Registry,
    out: Path,
    *,
    device: str = "cpu",
    image_size: int = 32,
    tasks: tuple[Task, ...] | None = None,
    seed: int = 0,
    weights: dict[str, str] | None = None,
) -> list[BenchRow]:
    """Run the suite for every backbone ``plugin`` registered and the references; record
    the rows in ``<out>/catalog.db`` (table ``benchmarks``) and return them.

    ``weights`` maps a plugin backbone to its own weights (a file, ``local-dir:DIR`` or a
    named source it defines): it then runs from them *and* from scratch, so the card shows
    what its weights are worth on few labels and on the other tasks."""
    backbones = [
        b for b in registry.names("backbones") if registry.plugin_of("backbones", b) == plugin
    ]
    if not backbones:
        plugins = sorted({registry.plugin_of("backbones", b) for b in registry.names("backbones")})
        raise UserError(
            f"{plugin!r} is no loaded plugin that registers backbones; plugins with backbones: "
            f"{', '.join(p for p in plugins if not p.startswith('automl_tl.')) or 'none but the built-ins'}"
            ". Give an installed entry-point name, or pass the plugin with --plugin (its name is "
            "the file's stem or the module)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device_t = resolve_device(device)
    catalog = Catalog(out / "catalog.db")
    rows = []
    for task in SUITE if tasks is None else tasks:
        data = {"source": task.source, "image_size": image_size, "seed": seed}
        if task.max_per_class:
            data["max_per_class"] = task.max_per_class
        config = config_from_dict(
            {"name": task.name, "data": data, "search": {"output": str(out / "data" / task.name)}}
        )
        splits = load_splits(config, registry)
        # the task's meta-features: a team prior ranks the backbones by these rows
        catalog.record_dataset(f"bench:{task.name}", meta_features(splits, "none"))
        for name in [*backbones, *REFERENCES]:
            reference = name in REFERENCES
            for source in ["none"] + ([weights[name]] if name in (weights or {}) else []):
                rows.append(
                    _run(plugin, name, reference, task, splits, registry, device_t, seed, source)
                )
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    catalog.db["benchmarks"].insert_all(
        ({**asdict(r), "created": created} for r in rows), alter=True
    )
    return rows


def _run(plugin, name, reference, task, splits, registry, device, seed, weights) -> BenchRow:
    choice = Choice(
        backbone=name,
        weights=weights,
        augmentation="none",
        aug_strength=0.0,
        unfreeze=RECIPE["unfreeze"],
        unfreeze_depth=RECIPE["depth"],
        lr=RECIPE["lr"],
        weight_decay=RECIPE["weight_decay"],
        epochs=RECIPE["epochs"],
        batch_size=64,
    )
    started = time.perf_counter()
    first: list[float] = []

    def on_epoch(result: EpochResult) -> None:
        if not first:
            first.append(time.perf_counter() - started)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = BenchRow(
        plugin, name, reference, task.name, None, None, None, None, "not run", None, weights=weights
    )
    try:
        result = fit(
            choice,
            splits,
            registry,
            device=device,
            seed=seed,
            on_epoch=on_epoch,
            feature_cache=False,
        )
        test = evaluate(
            result.model, splits.test, len(splits.class_names), result.data_config, device
        )
    except Exception as exc:  # a backbone that fails a task is a row that says why
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return row
    row.test_accuracy = round(test["accuracy"], 4)
    row.images_per_s = round(result.images_per_s, 1)
    row.first_epoch_s = round(first[0], 3) if first else None
    row.peak_memory_mib = round(_peak_memory_mib(device), 1)
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder) / "model"
        export_model(
            result.model, result.backbone, directory, splits.class_names, result.data_config, {}
        )
        row.plain_timm = plain_timm_loads(directory)
        try:
            export_onnx(directory, registry=registry)
            row.onnx = "ok"
        except UserError as exc:
            row.onnx = f"fails: {str(exc)[:200]}"
    return row


def format_card(plugin: str, rows: list[BenchRow]) -> str:
    """The Markdown scorecard: one table per task, the plugin's backbones beside the built-ins."""
    lines = [
        f"# Scorecard: {plugin}",
        "",
        f"Fixed recipe (no search): {json.dumps(RECIPE)}, from scratch (and from a backbone's own weights where given), batch 64. Built-ins for "
        f"comparison: {', '.join(REFERENCES)}. Peak memory: the process's peak resident set on "
        "CPU (grows over the run), allocated memory on CUDA.",
    ]
    by_task: dict[str, list[BenchRow]] = {}
    for r in rows:
        by_task.setdefault(r.task, []).append(r)
    describe = {t.name: t.description for t in SUITE}
    for task, task_rows in by_task.items():
        lines += [
            "",
            f"## {task}: {describe.get(task, '')}",
            "",
            "| backbone | test accuracy | images/s | first epoch (s) | peak memory (MiB) | ONNX | plain timm |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in task_rows:
            label = f"{r.backbone} (built-in)" if r.reference else f"**{r.backbone}**"
            if r.weights != "none":
                label += f" from {r.weights}"
            if r.error:
                lines.append(f"| {label} | failed: {r.error} | | | | | |")
                continue
            lines.append(
                f"| {label} | {r.test_accuracy:.4f} | {r.images_per_s:.0f} | {r.first_epoch_s} | "
                f"{r.peak_memory_mib:.0f} | {r.onnx} | {'yes' if r.plain_timm else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def to_dicts(rows: list[BenchRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
