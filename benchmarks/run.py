#!/usr/bin/env python
"""How fast are automl-tl's trials? Every figure is a ratio of two things measured side by side,
alternately, in this one process, so a busy machine slows both sides alike.

    python benchmarks/run.py --quick --json out.json     # CPU, under 5 minutes
    python benchmarks/run.py --json out.json             # CPU, larger sizes
    python benchmarks/run.py --device cuda --json gpu.json
        # GPU: resnet50 and vit_small at 224 px, resnet18 and convnext_atto at 64 px,
        # efficientnet_b0 at 224 px, bf16, channels-last (benchmarks/gpu_check.sh: every GPU
        # figure in one call, under 7 minutes)
    python benchmarks/run.py --tiny                      # seconds; what the test suite runs

Figures (JSON keys; each one a ratio measured in this run):

trial_loop_vs_bare           images/s of fit()'s training loop (decoded cache -> augmentation
                             "none" -> model step) / images/s of a bare loop (timm
                             benchmark.py style: ready float tensors, forward, loss, backward,
                             AdamW step) on the same model, batch, tensors and device; the
                             smallest over the models measured
augment_share                fraction of fit()'s step time spent inside the augmentation module
                             at strength 0.5, the worst built-in policy (every policy under
                             "details", with its epoch time / the epoch without augmentation)
cached_vs_pil_epoch          seconds per epoch of a torchvision ImageFolder + DataLoader that
                             decodes JPEG/PNG with PIL every epoch / the decoded uint8 cache
linear_probe_cached_speedup  wall time of a 10-epoch linear probe through the whole model /
                             with the feature cache (cold: extraction included)
frozen_backward_saving       step time of a full fine-tune / with half the layer groups frozen
search_efficiency            mean over seeds of (epochs random search needed to reach its final
                             best) / (epochs TPE + Hyperband needed to reach that score), both
                             on the digits study's space at the same epoch budget
trial_loop_vs_compiled_bare  (GPU) images/s of fit() with [search] compile / a bare loop through
                             torch.compile, resnet50 at 224 px (peak memory of both)
fit_train_share              share of a whole fit() (set-up, training epochs, evaluation) spent
                             in its training epochs, with the three parts under "details"
packing_speedup              aggregate training images/s of K concurrent trials on one device
                             (K = 1, 2, 4: separate processes, each with 1/K of the GPU memory)
                             at the best K / at K = 1, small models at 64 px
syncs_per_step               (GPU) host syncs one more training step costs, augmentation on
                             (flip_crop): CUDA's sync debug mode over two split sizes

``--profile`` adds torch.profiler tables of the trial loop and the bare loop.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("AUTOML_TL_LOAD_PLUGINS", "")  # only the built-in components
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random init everywhere; never download

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from automl_tl import registry_for  # noqa: E402
from automl_tl.components import AugmentationPolicy  # noqa: E402
from automl_tl.data import Split, Splits, batches, prepare_data  # noqa: E402
from automl_tl.features import FeatureCache  # noqa: E402
from automl_tl.registry import Registry  # noqa: E402
from automl_tl.train import (  # noqa: E402
    Choice,
    EpochResult,
    fit,
    memory_format_for,
    resolve_device,
)

TARGETS = {  # (target, "min" | "max", on which device)
    "trial_loop_vs_bare": {"cpu": (0.95, "min"), "cuda": (0.90, "min")},
    "augment_share": {"cuda": (0.05, "max")},
    "cached_vs_pil_epoch": {"cpu": (5.0, "min"), "cuda": (5.0, "min")},
    "linear_probe_cached_speedup": {"cpu": (5.0, "min"), "cuda": (5.0, "min")},
    "frozen_backward_saving": {},
    "search_efficiency": {"cpu": (2.0, "min"), "cuda": (2.0, "min")},
    "trial_loop_vs_compiled_bare": {"cuda": (0.95, "min")},
    "fit_train_share": {},
    "packing_speedup": {"cuda": (2.0, "min")},
    "syncs_per_step": {"cuda": (0.0, "max")},
}


@dataclasses.dataclass
class Profile:
    """Sizes of one run of the benchmarks."""

    name: str
    #: (backbone, image size, batch size) for the trial-loop and bare-loop comparison
    loop_models: list[tuple[str, int, int]]
    loop_steps: int  # steps per epoch
    loop_rounds: int  # measured epochs of each loop (after one warm-up epoch)
    aug_model: tuple[str, int, int]
    aug_policies: list[str]
    aug_steps: int
    aug_rounds: int
    pil_images: int
    pil_source_size: int  # the files' size; both sides deliver pil_size
    pil_size: int
    pil_rounds: int
    pil_workers: list[int]
    probe_model: tuple[str, int, int]
    probe_images: int
    probe_rounds: int
    frozen_model: tuple[str, int, int]
    frozen_steps: int
    frozen_rounds: int
    search_seeds: int
    search_trials: int  # random search's budget in trials (x search_epochs = the epoch budget)
    search_epochs: int
    search_cap: float = 2.0  # TPE + Hyperband may use this many times random's budget
    search_train_images: int | None = None  # None: all of digits' training split
    probe_epochs: int = 10
    #: (backbone, image size, batch) of the compiled comparison (trial_loop_vs_compiled_bare)
    compiled_model: tuple[str, int, int] = ("test_resnet", 32, 16)
    compiled_rounds: int = 2
    #: (backbone, image size, batch, steps, epochs) of the whole-fit() figure
    fit_model: tuple[str, int, int, int, int] = ("test_resnet", 32, 16, 2, 2)
    #: (backbone, image size, batch, steps per epoch, epochs) of each concurrent trial
    packing_models: list[tuple[str, int, int, int, int]] = dataclasses.field(
        default_factory=lambda: [("test_resnet", 32, 16, 2, 2)]
    )
    packing_counts: list[int] = dataclasses.field(default_factory=lambda: [1, 2])


ALL_POLICIES = ["none", "flip_crop", "color", "randaugment", "trivialaugment", "autoaugment"]

PROFILES = {
    "tiny": Profile(
        name="tiny",
        loop_models=[("test_resnet", 32, 16)],
        loop_steps=2,
        loop_rounds=2,
        aug_model=("test_resnet", 32, 16),
        aug_policies=["none", "randaugment"],
        aug_steps=2,
        aug_rounds=1,
        pil_images=40,
        pil_source_size=48,
        pil_size=32,
        pil_rounds=1,
        pil_workers=[0],
        probe_model=("test_resnet", 32, 16),
        probe_images=48,
        probe_rounds=1,
        probe_epochs=3,
        frozen_model=("test_resnet", 32, 16),
        frozen_steps=2,
        frozen_rounds=1,
        search_seeds=1,
        search_trials=2,
        search_epochs=1,
        search_train_images=120,
    ),
    "quick": Profile(
        name="quick",
        loop_models=[("test_resnet", 32, 64), ("resnet18", 32, 32)],
        loop_steps=8,
        loop_rounds=8,
        aug_model=("resnet18", 64, 32),
        aug_policies=ALL_POLICIES,
        aug_steps=4,
        aug_rounds=2,
        pil_images=256,
        pil_source_size=128,
        pil_size=64,
        pil_rounds=3,
        pil_workers=[0, 2],
        probe_model=("resnet18", 32, 64),
        probe_images=512,
        probe_rounds=2,
        frozen_model=("resnet18", 32, 32),
        frozen_steps=8,
        frozen_rounds=4,
        search_seeds=3,
        search_trials=12,
        search_epochs=3,
        search_train_images=600,
    ),
    "full": Profile(
        name="full",
        loop_models=[
            ("test_resnet", 32, 64),
            ("resnet18", 112, 64),
            ("vit_tiny_patch16_224", 112, 64),
        ],
        loop_steps=12,
        loop_rounds=7,
        aug_model=("resnet18", 112, 64),
        aug_policies=ALL_POLICIES,
        aug_steps=6,
        aug_rounds=3,
        pil_images=1024,
        pil_source_size=256,
        pil_size=112,
        pil_rounds=3,
        pil_workers=[0, 2],
        probe_model=("resnet18", 112, 64),
        probe_images=512,
        probe_rounds=3,
        frozen_model=("resnet18", 112, 64),
        frozen_steps=8,
        frozen_rounds=5,
        search_seeds=5,
        search_trials=24,
        search_epochs=4,
    ),
    "cuda": Profile(
        name="cuda",
        loop_models=[
            ("resnet50", 224, 128),
            ("vit_small_patch16_224", 224, 128),
            ("resnet18", 64, 128),
            ("convnext_atto", 64, 128),
            ("efficientnet_b0", 224, 128),
        ],
        loop_steps=12,
        loop_rounds=4,
        aug_model=("resnet50", 224, 128),
        aug_policies=ALL_POLICIES,
        aug_steps=12,
        aug_rounds=3,
        pil_images=1024,
        pil_source_size=256,
        pil_size=224,
        pil_rounds=3,
        pil_workers=[0, 8],
        probe_model=("resnet50", 224, 128),
        probe_images=1024,
        probe_rounds=2,
        frozen_model=("resnet50", 224, 128),
        frozen_steps=12,
        frozen_rounds=4,
        search_seeds=3,
        search_trials=12,
        search_epochs=3,
        compiled_model=("resnet50", 224, 128),
        compiled_rounds=3,
        fit_model=("resnet50", 224, 128, 12, 3),
        packing_models=[("resnet18", 64, 128, 24, 3), ("convnext_atto", 64, 128, 24, 3)],
        packing_counts=[1, 2, 4],
    ),
}

log = logging.getLogger("benchmarks")


# ---------------------------------------------------------------------------------------------
# helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds for timing work on ``device``.

    On the CPU: this process's CPU time. Time the scheduler gives to other processes (this
    machine may be shared) then counts for neither side of a comparison, which wall time
    cannot promise: one preemption inside a millisecond-long epoch would decide the ratio.
    With one torch thread (the default here on CPU) CPU time is the work itself; several
    threads add their spin-waits. On CUDA: wall time after a device synchronisation.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "process CPU time" if device.type == "cpu" else "wall time (synchronised)"

    def __call__(self) -> float:
        if self.device.type == "cpu":
            return time.process_time()
        _sync(self.device)
        return time.perf_counter()


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(_median(values), 4),
        "min": round(min(values), 4) if values else None,
        "max": round(max(values), 4) if values else None,
        "n": len(values),
    }


_DIGITS: dict[int, Splits] = {}


def digits_at(registry: Registry, size: int) -> Splits:
    """The embedded digits, decoded at ``size`` (real images; no download)."""
    if size not in _DIGITS:
        _DIGITS[size] = prepare_data(registry, "digits", image_size=size, seed=0)
    return _DIGITS[size]


def _take(split: Split, n: int) -> Split:
    """The first ``n`` images of ``split``, repeated when it has fewer."""
    reps = -(-n // len(split))
    x = split.x if isinstance(split.x, torch.Tensor) else split.x.to("cpu")
    idx = torch.arange(len(split)).repeat(reps)[:n]
    names = [split.names[i] for i in idx.tolist()] if split.names else []
    return Split(x[idx].contiguous(), split.y[idx].contiguous(), names)


def image_data(registry: Registry, size: int, n_train: int, n_val: int) -> Splits:
    """Splits of ``n_train`` / ``n_val`` digits images at ``size`` (tiled when needed)."""
    d = digits_at(registry, size)
    return dataclasses.replace(
        d,
        train=_take(d.train, n_train),
        val=_take(d.val, n_val),
        fingerprint=f"{d.fingerprint}-{n_train}-{n_val}",
    )


def _alternate(
    rounds: int, a: Callable[[], float], b: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Times of a() and b(), called alternately (a first in even rounds)."""
    ta, tb = [], []
    for i in range(rounds):
        if i % 2 == 0:
            ta.append(a())
            tb.append(b())
        else:
            tb.append(b())
            ta.append(a())
    return ta, tb


def _compare(slow: list[float], fast: list[float]) -> dict[str, Any]:
    """The median of the per-round ratios slow / fast (rounds alternate, so drift in the
    machine's load cancels within a round), with the ratio of each side's fastest round (as
    timeit would report it) for reference."""
    paired = [a / b for a, b in zip(slow, fast)]
    return {
        "ratio": round(_median(paired), 4),
        "ratio_of_fastest": round(min(slow) / min(fast), 4),
        "paired": _spread(paired),
        "seconds": {"slow": round(_median(slow), 5), "fast": round(_median(fast), 5)},
    }


# ---------------------------------------------------------------------------------------------
# trial loop vs bare loop


def bare_batches(
    registry: Registry, backbone: str, data: Splits, batch: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training images as normalized float batches, ready on the device in the model's
    memory format: what timm's benchmark.py feeds its train step."""
    component = registry.get("backbones", backbone)
    model = component.create(len(data.class_names), weights="none", image_size=data.image_size)
    fmt = memory_format_for(model, device)
    cfg = component.data_config(model)
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std).view(1, -1, 1, 1)
    x, y = data.train.x, data.train.y
    return [
        (
            ((x[s : s + batch].float() / 255.0 - mean) / std).to(device, memory_format=fmt),
            y[s : s + batch].to(device),
        )
        for s in range(0, len(y) - batch + 1, batch)
    ]


class BareLoop:
    """timm benchmark.py's train step on tensors ready on the device: nothing else."""

    def __init__(
        self,
        registry: Registry,
        backbone: str,
        data: Splits,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        compile: bool = False,
    ) -> None:
        torch.manual_seed(0)
        component = registry.get("backbones", backbone)
        model = component.create(len(data.class_names), weights="none", image_size=data.image_size)
        self.device = device
        fmt = memory_format_for(model, device)
        self.model = model.to(device, memory_format=fmt).train()
        params = list(self.model.parameters())
        try:  # the fastest AdamW there is, as fit() uses
            self.optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, fused=True)
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
        self.batches = batches
        self.amp = device.type == "cuda"
        self.forward = torch.compile(self.model) if compile else self.model

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.forward(x)
        loss = F.cross_entropy(out.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @property
    def images(self) -> int:
        return sum(len(y) for _, y in self.batches)

    def epoch(self, clock: Clock) -> float:
        """Seconds of one pass over the batches."""
        t0 = clock()
        for x, y in self.batches:
            self.step(x, y)
        return clock() - t0


def _second_epoch(choice, data, registry, device, clock: Clock, **kwargs) -> tuple[float, Any]:
    """A fresh fit() of ``choice`` on ``data`` (training only); (seconds of its second epoch,
    from one on_epoch call to the next: the whole trial loop, the FitResult)."""
    marks: list[float] = []
    result = fit(
        choice,
        data,
        registry,
        device=device,
        evaluate_on=None,
        feature_cache=False,
        on_epoch=lambda r: marks.append(clock()),
        **kwargs,
    )
    return marks[1] - marks[0], result


def bench_trial_loop(registry, device, profile: Profile, do_profile: bool = False) -> dict:
    """Rounds of: a fresh 2-epoch fit() (the second epoch timed, from one on_epoch call to
    the next: the whole trial loop) and a fresh bare loop (second epoch timed), in alternating
    order. Fresh models every round average out where a process happens to place them."""
    clock = Clock(device)
    rows = {}
    for backbone, size, batch in profile.loop_models:
        data = image_data(registry, size, batch * profile.loop_steps, batch)
        ready = bare_batches(registry, backbone, data, batch, device)
        choice = Choice(
            backbone=backbone,
            augmentation="none",
            unfreeze="top_k",
            unfreeze_depth=1.0,
            lr=1e-3,
            epochs=2,
            batch_size=batch,
        )

        def trial(choice=choice, data=data) -> float:
            return _second_epoch(choice, data, registry, device, clock)[0]

        def bare(backbone=backbone, data=data, ready=ready) -> float:
            loop = BareLoop(registry, backbone, data, ready, device)
            loop.epoch(clock)  # warm-up, as the fit's first epoch
            return loop.epoch(clock)

        trial_times, bare_times = _alternate(profile.loop_rounds, trial, bare)
        compared = _compare(trial_times, bare_times)  # trial time / bare time
        images = len(ready) * batch
        key = f"{backbone}@{size}/b{batch}"
        rows[key] = {
            # images/s trial / images/s bare = bare time / trial time
            "ratio": round(1.0 / compared["paired"]["median"], 4),
            "ratio_of_fastest": round(1.0 / compared["ratio_of_fastest"], 4),
            "paired": _spread([b / t for t, b in zip(trial_times, bare_times)]),
            "trial_images_per_s": round(images / _median(trial_times), 1),
            "bare_images_per_s": round(images / _median(bare_times), 1),
        }
        if device.type == "cuda":
            rows[key]["trial_peak_mib"] = _peak_mib(lambda trial=trial: trial())
            rows[key]["bare_peak_mib"] = _peak_mib(lambda bare=bare: bare())
        if device.type == "cuda":  # host syncs one more epoch costs: expected 2, not per step
            syncs = [
                count_syncs(
                    lambda e=e, choice=choice, data=data: fit(
                        dataclasses.replace(choice, epochs=e),
                        data,
                        registry,
                        device=device,
                        evaluate_on=None,
                    )
                )
                for e in (2, 3)
            ]
            rows[key]["syncs_per_epoch"] = syncs[1] - syncs[0]
        if do_profile:
            loop = BareLoop(registry, backbone, data, ready, device)
            rows[key]["profile"] = profile_loops(
                registry, data, backbone, batch, device, loop, clock
            )
    worst = min(r["ratio"] for r in rows.values())
    return {"value": worst, "clock": clock.kind, "models": rows}


def profile_loops(
    registry, data, backbone, batch, device, bare: BareLoop, clock: Clock
) -> dict[str, str]:
    """torch.profiler tables (top ops by self time) of one epoch of each loop."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    choice = Choice(backbone=backbone, epochs=1, batch_size=batch, unfreeze_depth=1.0)
    out = {}
    with profile(activities=activities) as prof:
        fit(choice, data, registry, device=device, evaluate_on=None)
    out["trial"] = prof.key_averages().table(sort_by=sort, row_limit=15)
    with profile(activities=activities) as prof:
        bare.epoch(clock)
    out["bare"] = prof.key_averages().table(sort_by=sort, row_limit=15)
    for name, table in out.items():
        print(f"\n--- profile: {name} loop, {backbone} ---\n{table}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# augmentation share


class _Timed(nn.Module):
    """Wraps an augmentation; adds up the time spent inside it (CUDA events on the GPU, so
    the loop is not synchronised by the measurement)."""

    def __init__(self, op: nn.Module, clock: Clock) -> None:
        super().__init__()
        self.op, self.clock = op, clock
        self.seconds = 0.0
        self.events: list[tuple[Any, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.op(x)
            end.record()
            self.events.append((start, end))
            return out
        t0 = self.clock()
        out = self.op(x)
        self.seconds += self.clock() - t0
        return out

    def take(self) -> float:
        """Seconds since the last take()."""
        if self.events:
            torch.cuda.synchronize()
            self.seconds += sum(s.elapsed_time(e) for s, e in self.events) / 1000.0
            self.events.clear()
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class _TimedPolicy(AugmentationPolicy):
    def __init__(self, inner: AugmentationPolicy, clock: Clock) -> None:
        self.inner, self.name, self.clock = inner, f"timed-{inner.name}", clock
        self.built: _Timed | None = None

    def build(self, strength: float, image_size: int) -> nn.Module:
        op = self.inner.build(strength, image_size)
        if isinstance(op, nn.Identity):
            self.built = None
            return op
        self.built = _Timed(op, self.clock)
        return self.built


def _with(registry: Registry, kind: str, component: Any) -> Registry:
    """A copy of ``registry`` with one more component."""
    copy = Registry()
    copy.tables = {k: dict(v) for k, v in registry.tables.items()}
    copy.add(kind, component, "benchmarks")
    return copy


def _peak_mib(fn: Callable[[], Any]) -> float:
    """Peak CUDA memory allocated while ``fn`` runs, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def count_syncs(fn: Callable[[], Any]) -> int:
    """How many host-device synchronisations ``fn`` forces (CUDA's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def bench_augment(registry, device, profile: Profile, strength: float = 0.5) -> dict:
    """Each policy wrapped in a timer, trained with fit(): time inside the augmentation /
    time of the epoch (first epoch left out)."""
    clock = Clock(device)
    backbone, size, batch = profile.aug_model
    data = image_data(registry, size, batch * profile.aug_steps, batch)
    per_policy = {}
    for name in profile.aug_policies:
        timed = _TimedPolicy(registry.get("augmentation_policies", name), clock)
        reg = _with(registry, "augmentation_policies", timed)
        inside: list[float] = []
        epochs: list[float] = []
        mark: list[float] = []

        def on_epoch(r: EpochResult, timed=timed, inside=inside, epochs=epochs, mark=mark):
            now = clock()
            spent = timed.built.take() if timed.built is not None else 0.0
            if mark:
                epochs.append(now - mark[0])
                inside.append(spent)
            mark[:] = [clock()]

        choice = Choice(
            backbone=backbone,
            augmentation=timed.name,
            aug_strength=strength if name != "none" else 0.0,
            unfreeze_depth=1.0,
            epochs=profile.aug_rounds + 1,
            batch_size=batch,
        )
        fit(choice, data, reg, device=device, evaluate_on=None, on_epoch=on_epoch)
        row: dict[str, Any] = {
            "share": round(sum(inside) / sum(epochs), 4),
            "ms_per_step": round(1000 * sum(inside) / (len(epochs) * profile.aug_steps), 3),
            "epoch_seconds": round(_median(epochs), 5),
        }
        if "none" in per_policy:  # the epoch with this policy / the epoch without
            row["epoch_ratio"] = round(_median(epochs) / per_policy["none"]["epoch_seconds"], 4)
        if device.type == "cuda" and timed.built is not None:
            x = data.train.x[:batch].to(device).float().div_(255.0)
            op = timed.built.op
            op(x)
            row["syncs_per_call"] = count_syncs(lambda op=op, x=x: op(x))
        per_policy[name] = row
    worst = max(per_policy, key=lambda p: per_policy[p]["share"])
    return {
        "value": per_policy[worst]["share"],
        "worst": worst,
        "clock": clock.kind,
        "model": f"{backbone}@{size}/b{batch}",
        "strength": strength,
        "policies": per_policy,
    }


# ---------------------------------------------------------------------------------------------
# decoded cache vs PIL every epoch


def _write_image_folder(root: Path, registry: Registry, n: int, source_size: int) -> None:
    """``n`` digit images as RGB files of ``source_size`` px, half JPEG, half PNG."""
    from PIL import Image

    d = digits_at(registry, source_size)
    rng = np.random.default_rng(0)
    by_class = [torch.nonzero(d.train.y == c).flatten().tolist() for c in range(len(d.class_names))]
    for i in range(n):
        members = by_class[i % len(by_class)]  # balanced classes
        j = members[(i // len(by_class)) % len(members)]
        label = d.class_names[int(d.train.y[j])]
        arr = d.train.x[j].numpy().transpose(1, 2, 0)
        tint = rng.integers(0, 60, size=3, dtype=np.uint8)  # colour, so JPEG has work to do
        arr = np.clip(arr.astype(np.int16) + tint, 0, 255).astype(np.uint8)
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        ext = "jpg" if i % 2 == 0 else "png"
        Image.fromarray(arr).save(folder / f"{i:05d}.{ext}", quality=90)


def bench_pil(registry, device, profile: Profile, tmp: Path) -> dict:
    """One epoch of data delivery (float batches in [0, 1] on the device, shuffled):
    torchvision ImageFolder + DataLoader decoding with PIL / the decoded uint8 cache.
    In-process loaders are timed with the clock; a loader with worker processes in wall
    time (its work is in other processes), against the cache in wall time too."""
    from torchvision import datasets, transforms

    clock = Clock(device)
    root = tmp / "images"
    _write_image_folder(root, registry, profile.pil_images, profile.pil_source_size)
    size, batch = profile.pil_size, 64
    data = prepare_data(
        registry,
        f"folder:{root}",
        image_size=size,
        val_fraction=0.01,
        test_fraction=0.01,
        cache_dir=tmp / "cache",
    )
    every = Split(
        torch.cat([data.train.x, data.val.x, data.test.x]),
        torch.cat([data.train.y, data.val.y, data.test.y]),
    )
    generator = torch.Generator().manual_seed(0)

    def wall() -> float:
        _sync(device)
        return time.perf_counter()

    def cached_epoch(now: Callable[[], float]) -> float:
        t0 = now()
        for xb, _ in batches(every, batch, device=device, shuffle=True, generator=generator):
            xb.float().div_(255.0)
        return now() - t0

    rows = {}
    dataset = datasets.ImageFolder(
        str(root),
        transform=transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()]),
    )
    for workers in profile.pil_workers:
        now = clock if workers == 0 else wall
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )

        def pil_epoch(loader=loader, now=now) -> float:
            t0 = now()
            for x, _ in loader:
                x.to(device, non_blocking=True)
            return now() - t0

        pil_epoch(), cached_epoch(now)  # warm-up (worker start-up, page cache)
        # the cached epoch is ~1000x shorter: time several for each loader epoch
        pil, cached = _alternate(
            profile.pil_rounds,
            pil_epoch,
            lambda now=now: min(cached_epoch(now) for _ in range(5)),
        )
        rows[f"DataLoader(num_workers={workers})"] = {
            **_compare(pil, cached),
            "clock": clock.kind if workers == 0 else "wall time",
        }
        del loader
    value = min(r["ratio"] for r in rows.values())  # against the loader's best setting
    return {"value": value, "images": len(every), "size": size, "loaders": rows}


# ---------------------------------------------------------------------------------------------
# linear probe: cached features vs recomputing them


def bench_linear_probe(registry, device, profile: Profile) -> dict:
    """A whole linear-probe trial (fit(), validation every epoch) through the full model vs
    on cached features: cold (a new cache: extraction included) and warm (the features of an
    earlier trial of the same backbone). Rounds alternate the three."""
    clock = Clock(device)
    backbone, size, batch = profile.probe_model
    n_val = max(batch, profile.probe_images // 4)
    data = image_data(registry, size, profile.probe_images, n_val)
    choice = Choice(
        backbone=backbone,
        augmentation="none",
        unfreeze="top_k",
        unfreeze_depth=0.0,
        lr=3e-3,
        epochs=profile.probe_epochs,
        batch_size=batch,
    )
    accuracy: dict[str, float] = {}
    shared = FeatureCache()

    def run(cache) -> float:
        t0 = clock()
        r = fit(choice, data, registry, device=device, seed=0, feature_cache=cache)
        seconds = clock() - t0
        accuracy[r.feature_cache or "recompute"] = r.val["accuracy"]
        return seconds

    run(False), run(shared)  # warm-up; fills the shared cache
    recompute, cold, warm = [], [], []
    for i in range(profile.probe_rounds):
        order = [("r", False), ("c", None), ("w", shared)]
        for tag, cache in order if i % 2 == 0 else reversed(order):
            seconds = run(FeatureCache() if tag == "c" else cache)
            {"r": recompute, "c": cold, "w": warm}[tag].append(seconds)
    cold_vs = _compare(recompute, cold)
    return {
        "value": cold_vs["ratio"],
        "clock": clock.kind,
        "model": f"{backbone}@{size}/b{batch}",
        "epochs": profile.probe_epochs,
        "images": {"train": len(data.train), "val": len(data.val)},
        "cold": cold_vs,
        "warm": _compare(recompute, warm),
        "val_accuracy": accuracy,
        "same_result": len({round(v, 6) for v in accuracy.values()}) == 1,
    }


# ---------------------------------------------------------------------------------------------
# frozen layers: backward saving


def bench_frozen(registry, device, profile: Profile) -> dict:
    """Step time of a full fine-tune / with the lower half of the layer groups frozen
    (top_k, depth 0.5): 2-epoch fits alternated, the second epoch timed."""
    clock = Clock(device)
    backbone, size, batch = profile.frozen_model
    data = image_data(registry, size, batch * profile.frozen_steps, batch)

    def step_seconds(depth: float) -> Callable[[], float]:
        def run() -> float:
            choice = Choice(backbone=backbone, unfreeze_depth=depth, epochs=2, batch_size=batch)
            return _second_epoch(choice, data, registry, device, clock)[0] / profile.frozen_steps

        return run

    full, half = _alternate(profile.frozen_rounds, step_seconds(1.0), step_seconds(0.5))
    compared = _compare(full, half)
    return {
        "value": compared["ratio"],
        "clock": clock.kind,
        "model": f"{backbone}@{size}/b{batch}",
        **compared,
    }


# ---------------------------------------------------------------------------------------------
# search efficiency: TPE + Hyperband vs random search at the same epoch budget


#: The search space of the embedded digits study as it was when this benchmark was written
#: (pinned here so that the benchmark stays the same when the study file changes).
SEARCH_SPACE = {
    "backbones": ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"],
    "augmentations": ["none", "flip_crop", "randaugment", "trivialaugment"],
    "unfreeze": ["top_k", "gradual", "lp_ft", "layer_decay"],
    "lr": [3e-4, 3e-2],
    "weight_decay": [1e-6, 1e-2],
    "batch_size": 64,
    "metric": "accuracy",
}


def _search_config(tmp: Path, seed: int, sampler: str, pruner: str, profile: Profile):
    from automl_tl.config import config_from_dict

    return config_from_dict(
        {
            "name": f"bench-{sampler}-{seed}",
            "data": {"source": "digits", "image_size": 32, "seed": seed},
            "search": {
                **SEARCH_SPACE,
                "n_trials": profile.search_trials,
                "epochs": profile.search_epochs,
                "sampler": sampler,
                "pruner": pruner,
                "output": str(tmp / f"{sampler}-{pruner}-{seed}"),
            },
            "weights": {"default": "none"},
        }
    )


def _run_search(config, registry, pm, splits, device, stop: Callable[[Any, int], bool]):
    """Trials until ``stop(trial, epochs so far)``; [(epochs so far, value or None)]."""
    import optuna

    from automl_tl.samplers import make_pruner, make_sampler
    from automl_tl.search import Objective, TrialFailed, TrialRecorder

    study = optuna.create_study(
        sampler=make_sampler(config), pruner=make_pruner(config), direction="maximize"
    )
    objective = Objective(config, registry, pm, splits, device)
    recorder = TrialRecorder(config, pm, objective.catalog)
    trace: list[tuple[int, float | None]] = []
    spent = 0

    def after(study, trial) -> None:
        nonlocal spent
        recorder(study, trial)
        spent += int(trial.user_attrs.get("epochs_run") or 0)
        value = trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None
        trace.append((spent, value))
        if stop(trial, spent):
            study.stop()

    study.optimize(objective, callbacks=[after], catch=(TrialFailed,), gc_after_trial=False)
    return trace


def bench_search(registry, device, profile: Profile, tmp: Path) -> dict:
    from automl_tl.plugins import get_plugin_manager

    pm, _ = get_plugin_manager()
    splits = digits_at(registry, 32)
    if profile.search_train_images:
        splits = dataclasses.replace(splits, train=_take(splits.train, profile.search_train_images))
    budget = profile.search_trials * profile.search_epochs
    cap = int(profile.search_cap * budget)
    per_seed = []
    for seed in range(profile.search_seeds):
        random_cfg = _search_config(tmp, seed, "random", "none", profile)
        n = profile.search_trials
        trace = _run_search(
            random_cfg, registry, pm, splits, device, lambda t, s, n=n: t.number + 1 >= n
        )
        values = [v for _, v in trace if v is not None]
        target = max(values) if values else float("nan")
        random_epochs = next(e for e, v in trace if v is not None and v >= target)

        tpe_cfg = _search_config(tmp, seed, "tpe", "hyperband", profile)
        tpe_trace = _run_search(
            tpe_cfg,
            registry,
            pm,
            splits,
            device,
            lambda t, s, target=target: (t.value is not None and t.value >= target) or s >= cap,
        )
        reached = [e for e, v in tpe_trace if v is not None and v >= target]
        tpe_epochs = reached[0] if reached else None
        ratio = random_epochs / tpe_epochs if tpe_epochs else random_epochs / cap
        per_seed.append(
            {
                "seed": seed,
                "random_best": round(target, 4),
                "random_epochs_to_best": random_epochs,
                "random_budget_epochs": trace[-1][0],
                "tpe_hyperband_epochs_to_same": tpe_epochs,
                "tpe_hyperband_trials": len(tpe_trace),
                "tpe_hyperband_best": round(
                    max((v for _, v in tpe_trace if v is not None), default=float("nan")), 4
                ),
                "ratio": round(ratio, 4),
                "reached": tpe_epochs is not None,
            }
        )
        log.info("search seed %d: %s", seed, per_seed[-1])
    ratios = [s["ratio"] for s in per_seed]
    return {
        "value": round(statistics.mean(ratios), 4),
        "std": round(statistics.stdev(ratios), 4) if len(ratios) > 1 else 0.0,
        "spread": _spread(ratios),
        "budget_epochs": budget,
        "cap_epochs": cap,
        "note": "a seed where TPE + Hyperband never reached random's best within the cap counts as random_epochs / cap (an upper bound)",
        "seeds": per_seed,
    }


# ---------------------------------------------------------------------------------------------
# GPU nodes (issue 17): the compiled bare loop, the whole fit(), packed trials, syncs per step


def bench_compiled(registry, device, profile: Profile) -> dict:
    """fit() with compile on vs a bare loop through ``torch.compile`` (second epoch of each
    timed, alternating rounds). On the CPU the "eager" backend stands in (no C compiler
    needed), which keeps the code path working but measures no compiler."""
    clock = Clock(device)
    backend: bool | str = True if device.type == "cuda" else "eager"
    backbone, size, batch = profile.compiled_model
    data = image_data(registry, size, batch * profile.loop_steps, batch)
    ready = bare_batches(registry, backbone, data, batch, device)
    choice = Choice(
        backbone=backbone, unfreeze="top_k", unfreeze_depth=1.0, epochs=2, batch_size=batch
    )
    compiled: list[str | None] = []

    def trial() -> float:
        seconds, result = _second_epoch(choice, data, registry, device, clock, compile=backend)
        compiled.append(result.compiled)
        return seconds

    def bare() -> float:
        loop = BareLoop(registry, backbone, data, ready, device, compile=backend)
        loop.epoch(clock)  # warm-up: the compile
        return loop.epoch(clock)

    trial_times, bare_times = _alternate(profile.compiled_rounds, trial, bare)
    compared = _compare(trial_times, bare_times)
    row: dict[str, Any] = {
        "value": round(1.0 / compared["paired"]["median"], 4),
        "model": f"{backbone}@{size}/b{batch}",
        "backend": "inductor" if backend is True else backend,
        "paired": _spread([b / t for t, b in zip(trial_times, bare_times)]),
        "trial_compiled": compiled[-1] if compiled else None,
        "clock": clock.kind,
    }
    if device.type == "cuda":
        row["trial_peak_mib"] = _peak_mib(trial)
        row["bare_peak_mib"] = _peak_mib(bare)
    return row


def bench_fit(registry, device, profile: Profile) -> dict:
    """One whole fit() (train and validation split, the search's settings) split into its
    set-up (model, data to the device, optimizer), training epochs and evaluations."""
    backbone, size, batch, steps, epochs = profile.fit_model
    data = image_data(registry, size, batch * steps, max(batch, batch * steps // 4))
    choice = Choice(
        backbone=backbone,
        augmentation="flip_crop",
        aug_strength=0.5,
        unfreeze_depth=1.0,
        epochs=epochs,
        batch_size=batch,
    )

    def now() -> float:
        _sync(device)
        return time.perf_counter()

    fit(dataclasses.replace(choice, epochs=1), data, registry, device=device)  # warm-up
    marks: list[tuple[float, float]] = []
    t0 = now()
    result = fit(
        choice,
        data,
        registry,
        device=device,
        feature_cache=False,
        on_epoch=lambda r: marks.append((now(), r.seconds)),
    )
    total = now() - t0
    train = sum(r.seconds for r in result.history)
    # between two epochs' marks: one epoch's training and its evaluation
    evals = [marks[i][0] - marks[i - 1][0] - marks[i][1] for i in range(1, len(marks))]
    evaluation = max(0.0, _median(evals)) * len(marks) if evals else 0.0
    setup = max(0.0, total - train - evaluation)
    return {
        "value": round(train / total, 4),
        "model": f"{backbone}@{size}/b{batch}, {epochs} epochs, flip_crop",
        "seconds": {
            "total": round(total, 3),
            "setup": round(setup, 3),
            "train": round(train, 3),
            "eval": round(evaluation, 3),
        },
        "images_per_s": round(result.images_per_s, 1),
        "clock": "wall time (synchronised)",
    }


def _packing_worker(spec: dict[str, Any]) -> int:
    """One of K concurrent trials (a process of bench_packing): warm up, say ready, wait for
    the go file, train, print the start and end times and the images trained."""
    from automl_tl.workers import apply_memory_fraction

    apply_memory_fraction()
    registry = registry_for()
    device = resolve_device(spec["device"])
    data = image_data(registry, spec["size"], spec["batch"] * spec["steps"], spec["batch"])
    choice = Choice(
        backbone=spec["backbone"],
        unfreeze_depth=1.0,
        epochs=spec["epochs"],
        batch_size=spec["batch"],
    )
    kwargs = dict(device=device, evaluate_on=None, feature_cache=False)
    fit(dataclasses.replace(choice, epochs=1), data, registry, **kwargs)  # CUDA context, cuDNN
    Path(spec["ready"]).write_text("ready")
    go = Path(spec["go"])
    limit = time.monotonic() + 300
    while not go.exists() and time.monotonic() < limit:
        time.sleep(0.01)
    start = time.time()
    result = fit(choice, data, registry, **kwargs)
    _sync(device)
    end = time.time()
    images = sum(round(r.images_per_s * r.seconds) for r in result.history)
    print(json.dumps({"start": start, "end": end, "images": images}), flush=True)
    return 0


def _packed(
    spec: dict[str, Any], k: int, device: torch.device, tmp: Path, threads: int
) -> dict[str, Any]:
    """Aggregate images/s of ``k`` trials started together, each in its own process."""
    run = tmp / f"pack-{spec['backbone']}-{k}"
    run.mkdir(parents=True, exist_ok=True)
    go = run / "go"
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // k))}
    if device.type == "cuda" and k > 1:
        from automl_tl.workers import GPU_MEMORY_SHARE

        env["AUTOML_TL_MEMORY_FRACTION"] = f"{GPU_MEMORY_SHARE / k:.4f}"
    procs = []
    for i in range(k):
        mine = {**spec, "ready": str(run / f"ready-{i}"), "go": str(go), "device": str(device)}
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--packing-worker",
                    json.dumps(mine),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    limit = time.monotonic() + 300
    while not all((run / f"ready-{i}").exists() for i in range(k)):
        if time.monotonic() > limit or any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.05)
    go.write_text("go")
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"packing worker failed ({p.returncode}): {err[-2000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    images = sum(r["images"] for r in reports)
    return {"images_per_s": round(images / wall, 1), "seconds": round(wall, 3), "trials": k}


def bench_packing(registry, device, profile: Profile, tmp: Path) -> dict:
    """K trials sharing one device (1, 2, 4: separate processes, each with 1/K of the GPU's
    memory, as ``--trials-per-gpu K`` runs them): aggregate images/s against one trial."""
    threads = torch.get_num_threads() if device.type == "cpu" else (os.cpu_count() or 1)
    rows = {}
    for backbone, size, batch, steps, epochs in profile.packing_models:
        spec = dict(backbone=backbone, size=size, batch=batch, steps=steps, epochs=epochs)
        per_k = {k: _packed(spec, k, device, tmp, threads) for k in profile.packing_counts}
        one = per_k[profile.packing_counts[0]]["images_per_s"]
        best = max(per_k, key=lambda k: per_k[k]["images_per_s"])
        rows[f"{backbone}@{size}/b{batch}"] = {
            "per_k": per_k,
            "best_k": best,
            "speedup": round(per_k[best]["images_per_s"] / one, 3),
        }
    return {
        "value": min(r["speedup"] for r in rows.values()),
        "models": rows,
        "clock": "wall time",
    }


def bench_syncs(registry, device, profile: Profile) -> dict:
    """Host syncs per training step with augmentation on (flip_crop) and evaluation: the
    syncs of a fit over twice the steps, less those of the fit, per added step (CUDA's sync
    debug mode). Without CUDA there is nothing to count (NaN)."""
    if device.type != "cuda":
        return {"value": float("nan"), "why": "no CUDA device: the sync debug mode is CUDA's"}
    backbone, size, batch = profile.aug_model
    counts = {}
    for steps in (profile.aug_steps, 2 * profile.aug_steps):
        data = image_data(registry, size, batch * steps, batch)
        choice = Choice(
            backbone=backbone,
            augmentation="flip_crop",
            aug_strength=0.5,
            unfreeze_depth=1.0,
            epochs=2,
            batch_size=batch,
        )
        fit(choice, data, registry, device=device)  # warm-up
        counts[steps] = count_syncs(
            lambda choice=choice, data=data: fit(choice, data, registry, device=device)
        )
    small, large = profile.aug_steps, 2 * profile.aug_steps
    per_step = (counts[large] - counts[small]) / (2 * (large - small))  # 2 epochs each
    return {"value": per_step, "model": f"{backbone}@{size}/b{batch}", "syncs": counts}


# ---------------------------------------------------------------------------------------------
# driver


BENCHES = (
    "loop",
    "augment",
    "pil",
    "probe",
    "frozen",
    "search",
    "compiled",
    "fit",
    "packing",
    "syncs",
)
#: run without --only: everything on a GPU; on the CPU the figures of before (the GPU-node ones
#: run there with --only, as benchmarks/gpu_check.sh's CPU smoke run does)
DEFAULT_BENCHES = {
    "cpu": ("loop", "augment", "pil", "probe", "frozen", "search"),
    "cuda": BENCHES,
}
KEYS = {
    "loop": "trial_loop_vs_bare",
    "augment": "augment_share",
    "pil": "cached_vs_pil_epoch",
    "probe": "linear_probe_cached_speedup",
    "frozen": "frozen_backward_saving",
    "search": "search_efficiency",
    "compiled": "trial_loop_vs_compiled_bare",
    "fit": "fit_train_share",
    "packing": "packing_speedup",
    "syncs": "syncs_per_step",
}


def machine(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
    }
    with contextlib.suppress(Exception):
        import kornia
        import optuna
        import timm

        info.update(timm=timm.__version__, kornia=kornia.__version__, optuna=optuna.__version__)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def verdict(key: str, value: float, device: torch.device) -> tuple[str, str]:
    rule = TARGETS.get(key, {}).get(device.type)
    if rule is None or value is None or (isinstance(value, float) and math.isnan(value)):
        return "-", ""
    target, kind = rule
    ok = value >= target if kind == "min" else value <= target
    return (f">= {target:g}" if kind == "min" else f"<= {target:g}"), ("ok" if ok else "MISS")


def _range(d: dict[str, Any]) -> str:
    return f"[{d['min']:.2f}-{d['max']:.2f}]"


def _detail(key: str, r: dict) -> str:
    if key == "trial_loop_vs_bare":
        return "; ".join(
            f"{m}: {v['ratio']:.3f} (per round {_range(v['paired'])}; "
            f"{v['trial_images_per_s']:.0f} vs {v['bare_images_per_s']:.0f} img/s"
            + (f"; {v['syncs_per_epoch']} syncs/epoch" if "syncs_per_epoch" in v else "")
            + ")"
            for m, v in r["models"].items()
        )
    if key == "augment_share":
        return (
            f"{r['model']}, s={r['strength']}: "
            + ", ".join(
                f"{p} {v['share']:.1%}"
                + (f" x{v['epoch_ratio']:.2f}" if "epoch_ratio" in v and p != "none" else "")
                + (f" ({v['syncs_per_call']} syncs)" if "syncs_per_call" in v else "")
                for p, v in r["policies"].items()
            )
            + f"; worst {r['worst']}"
        )
    if key == "cached_vs_pil_epoch":
        return f"{r['images']} images at {r['size']} px vs " + ", ".join(
            f"{k} {v['ratio']:.0f}x" for k, v in r["loaders"].items()
        )
    if key == "linear_probe_cached_speedup":
        return (
            f"{r['model']}, {r['epochs']} epochs, per round {_range(r['cold']['paired'])}; "
            f"warm cache {r['warm']['ratio']:.1f}x; same val accuracy: {r['same_result']}"
        )
    if key == "frozen_backward_saving":
        return f"{r['model']}, per round {_range(r['paired'])}"
    if key == "trial_loop_vs_compiled_bare":
        return (
            f"{r['model']} ({r['backend']}), per round {_range(r['paired'])}; trial compiled: "
            f"{r['trial_compiled']}"
            + (
                f"; peak {r['trial_peak_mib']:.0f} vs {r['bare_peak_mib']:.0f} MiB"
                if "trial_peak_mib" in r
                else ""
            )
        )
    if key == "fit_train_share":
        sec = r["seconds"]
        return (
            f"{r['model']}: {sec['total']:.2f} s = set-up {sec['setup']:.2f} + train "
            f"{sec['train']:.2f} + eval {sec['eval']:.2f}"
        )
    if key == "packing_speedup":
        return "; ".join(
            f"{m}: "
            + ", ".join(f"K={k} {v['images_per_s']:.0f} img/s" for k, v in row["per_k"].items())
            for m, row in r["models"].items()
        )
    if key == "syncs_per_step":
        return r.get("why") or f"{r['model']}, flip_crop: syncs {r['syncs']}"
    if key == "search_efficiency":
        return (
            f"{len(r['seeds'])} seeds (std {r['std']:.2f}): "
            + ", ".join(f"{s['ratio']:.2f}{'' if s['reached'] else '*'}" for s in r["seeds"])
            + f"; random budget {r['budget_epochs']} epochs"
        )
    return ""


def table(results: dict[str, Any], device: torch.device) -> str:
    lines = [f"{'figure':30} {'value':>8}  {'target':>8}  {'':4}  details", "-" * 100]
    for key in KEYS.values():
        if key not in results:
            continue
        value = results[key]
        target, status = verdict(key, value, device)
        lines.append(
            f"{key:30} {value:8.3f}  {target:>8}  {status:4}  {_detail(key, results['details'][key])}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="CPU sizes that finish in under 5 minutes"
    )
    size.add_argument(
        "--tiny", action="store_true", help="seconds: keeps the script working (tests)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--json", type=Path, help="write the figures and details here")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    parser.add_argument(
        "--profile", action="store_true", help="print torch.profiler tables of both loops"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default on CPU: 1, so CPU time measures the work, not "
        "spin-waits; on CUDA: torch's default)",
    )
    parser.add_argument("--search-seeds", type=int, help="override the profile's seeds")
    parser.add_argument("--search-trials", type=int, help="override random search's trials")
    parser.add_argument("--search-epochs", type=int, help="override the epochs per trial")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--packing-worker", help=argparse.SUPPRESS)  # bench_packing's trials
    args = parser.parse_args(argv)
    if args.packing_worker:
        logging.getLogger("automl_tl").setLevel(logging.WARNING)
        return _packing_worker(json.loads(args.packing_worker))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    if not args.verbose:
        logging.getLogger("automl_tl").setLevel(logging.WARNING)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = resolve_device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    with contextlib.suppress(ImportError):
        from optuna.exceptions import ExperimentalWarning

        warnings.filterwarnings("ignore", category=ExperimentalWarning)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    name = (
        "tiny"
        if args.tiny
        else ("cuda" if device.type == "cuda" else ("quick" if args.quick else "full"))
    )
    profile = dataclasses.replace(
        PROFILES[name],
        **{
            k: v
            for k, v in {
                "search_seeds": args.search_seeds,
                "search_trials": args.search_trials,
                "search_epochs": args.search_epochs,
            }.items()
            if v is not None
        },
    )
    only = (
        set(args.only.split(",")) if args.only else set(DEFAULT_BENCHES.get(device.type, BENCHES))
    )
    unknown = only - set(BENCHES)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(BENCHES)}")

    registry = registry_for()
    started = time.perf_counter()
    results: dict[str, Any] = {"details": {}}
    with tempfile.TemporaryDirectory(prefix="automl-tl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        runs = {
            "loop": lambda: bench_trial_loop(registry, device, profile, args.profile),
            "augment": lambda: bench_augment(registry, device, profile),
            "pil": lambda: bench_pil(registry, device, profile, tmp),
            "probe": lambda: bench_linear_probe(registry, device, profile),
            "frozen": lambda: bench_frozen(registry, device, profile),
            "search": lambda: bench_search(registry, device, profile, tmp),
            "compiled": lambda: bench_compiled(registry, device, profile),
            "fit": lambda: bench_fit(registry, device, profile),
            "packing": lambda: bench_packing(registry, device, profile, tmp),
            "syncs": lambda: bench_syncs(registry, device, profile),
        }
        for bench in BENCHES:
            if bench not in only:
                continue
            t0 = time.perf_counter()
            detail = runs[bench]()
            detail["wall_seconds"] = round(time.perf_counter() - t0, 1)
            key = KEYS[bench]
            results[key] = detail["value"]
            results["details"][key] = detail
            print(
                f"[{time.perf_counter() - started:6.1f}s] {key} = {detail['value']:.4f}", flush=True
            )
    results["verdicts"] = {  # (target, "ok" | "MISS" | "") per figure, for gpu_check.py
        key: verdict(key, results[key], device) for key in KEYS.values() if key in results
    }
    results["meta"] = {
        "profile": profile.name,
        "device": str(device),
        "command": "python "
        + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(device),
    }
    print()
    print(table(results, device))
    print(f"\n{profile.name} profile on {device} in {results['meta']['seconds']:.0f}s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
