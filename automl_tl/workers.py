"""``--workers N``: N local worker processes on one study, and which GPU and CPU threads each
gets.

Optuna's storage-backed distributed optimization does the scheduling: every worker is an
ordinary ``automl-tl search`` process running the same ``study.optimize`` loop against one
storage (see :mod:`automl_tl.storage` for the kinds, :mod:`automl_tl.budget` for the exact
global budget and dead workers' trials). This module only starts and watches the processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from . import trials
from .budget import RACERS_ENV, recover_stale_trials
from .config import StudyConfig
from .data import load_splits
from .errors import UserError
from .leaderboard import best_by_weights, retrained_model
from .retrain import claim_best, finish_claim, retrain, retrain_chosen, retrain_per_weights
from .search import check_backbones_run, check_names, open_search_study
from .selection import Selection, build_extras, retrain_selected, select, select_and_retrain
from .storage import check_data, open_study, storage_kind
from .train import MEMORY_FRACTION_ENV, resolve_device

log = logging.getLogger("automl_tl")


# ---------------------------------------------------------------------------------------------
# N local worker processes


@dataclass
class Slot:
    """Where one local worker runs: a GPU (``CUDA_VISIBLE_DEVICES``) and its CPU threads.

    When several workers share a GPU, each gets ``memory_fraction`` of its memory
    (``torch.cuda.set_per_process_memory_fraction`` in the worker, see
    :func:`apply_memory_fraction`), and ``mps`` says the MPS daemon runs their kernels side
    by side (without it the GPU time-slices between them)."""

    index: int
    gpu: str | None
    threads: int
    memory_fraction: float | None = None
    mps: bool = False

    @property
    def label(self) -> str:
        where = f"GPU {self.gpu}" if self.gpu is not None else "CPU"
        if self.memory_fraction is not None:
            where += f" ({self.memory_fraction:.0%} of its memory{', MPS' if self.mps else ''})"
        return f"{where}, {self.threads} thread{'s' if self.threads != 1 else ''}"

    def env(self) -> dict[str, str]:
        env = {
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "AUTOML_TL_WORKER": str(self.index),
        }
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        if self.memory_fraction is not None:
            env[MEMORY_FRACTION_ENV] = f"{self.memory_fraction:.4f}"
        return env


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every CUDA device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


#: at most this many workers share one GPU, or one CPU core
WORKERS_PER_GPU = 8
WORKERS_PER_CORE = 4
#: the environment variable that tells a worker process its parent's pid
PARENT_ENV = "AUTOML_TL_PARENT_PID"
#: the share of a GPU's memory that the workers on it split between them (the rest is the
#: CUDA context of each and the allocator's slack)
GPU_MEMORY_SHARE = 0.95
#: ``--trials-per-gpu auto``: (largest image side, most backbone parameters, trials per GPU),
#: the first row that fits, else 1: small models at small images leave a GPU mostly idle
#: (launch-bound), so several of their trials share it
AUTO_TRIALS_PER_GPU = ((64, 30e6, 4), (64, float("inf"), 2), (128, 30e6, 2))


def max_workers(*, gpus: list[str], cpus: int) -> int:
    """The most local workers that make sense: :data:`WORKERS_PER_CORE` per CPU core (each
    gets at least one thread), or up to :data:`WORKERS_PER_GPU` per visible GPU."""
    return max(1, WORKERS_PER_CORE * cpus, WORKERS_PER_GPU * len(gpus))


def mps_running() -> bool:
    """Whether an NVIDIA MPS control daemon is reachable: its pipe directory
    (``CUDA_MPS_PIPE_DIRECTORY``, default ``/tmp/nvidia-mps``) holds its ``control`` pipe.
    CUDA processes of the same user then share the GPU's SMs instead of time-slicing."""
    pipes = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps"
    return os.path.exists(os.path.join(pipes, "control"))


def auto_trials_per_gpu(image_size: int, max_parameters: float) -> int:
    """``--trials-per-gpu auto``: how many trials share one GPU for this image size and the
    largest backbone of the study (:data:`AUTO_TRIALS_PER_GPU`; 1 for anything larger)."""
    for side, parameters, k in AUTO_TRIALS_PER_GPU:
        if image_size <= side and max_parameters <= parameters:
            return min(k, WORKERS_PER_GPU)
    return 1


def study_trials_per_gpu(config: StudyConfig, registry) -> int:
    """:func:`auto_trials_per_gpu` for a study: its image size and its largest backbone (each
    built once on the CPU, without weights, to count its parameters)."""
    largest = 0
    for name in config.search.backbones:
        model = registry.get("backbones", name).create(
            2, weights="none", image_size=config.data.image_size
        )
        largest = max(largest, sum(p.numel() for p in model.parameters()))
    return auto_trials_per_gpu(config.data.image_size, largest)


def parse_workers(text: str | int) -> int | str:
    """``--workers``: ``auto`` or a whole number of at least 1 (:class:`UserError` if not)."""
    return _count_or_auto(text, "--workers", "one per visible GPU, or 1 on the CPU")


def parse_trials_per_gpu(text: str | int | None) -> int | str | None:
    """``--trials-per-gpu``: None, ``auto`` or a whole number of at least 1."""
    if text is None:
        return None
    return _count_or_auto(text, "--trials-per-gpu", "from the backbones and the image size")


def _count_or_auto(text: str | int, flag: str, auto_means: str) -> int | str:
    text = str(text)
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise UserError(f"{flag} {text}: give a whole number of at least 1, or auto ({auto_means})")
    return value


def plan_workers(
    workers: int | str,
    trials_per_gpu: int | str | None,
    *,
    cuda: bool,
    gpus: list[str],
    auto_k: Callable[[], int] = lambda: 1,
) -> tuple[int, int | None]:
    """(number of workers, trials per GPU or None) for ``--workers`` and ``--trials-per-gpu``.

    ``--workers auto`` is one worker per visible GPU times the trials per GPU on a CUDA
    device, and one (this process, as before) on the CPU. ``--trials-per-gpu`` is ``K``,
    ``auto`` (``auto_k()``) or None (not given: 1 with ``--workers auto``, else round robin).
    More workers than GPUs x K is refused.
    """
    workers, trials_per_gpu = parse_workers(workers), parse_trials_per_gpu(trials_per_gpu)
    if not cuda or not gpus:
        if trials_per_gpu is not None:
            log.warning("--trials-per-gpu is for CUDA devices; ignored on the CPU")
        return (1 if workers == "auto" else int(workers)), None
    k = auto_k() if trials_per_gpu == "auto" else trials_per_gpu
    if workers == "auto":
        return len(gpus) * (k or 1), k
    if k is not None and int(workers) > len(gpus) * k:
        raise UserError(
            f"--workers {workers} is more than {len(gpus)} GPU{'s' if len(gpus) != 1 else ''} x "
            f"--trials-per-gpu {k} = {len(gpus) * k}; pass --workers {len(gpus) * k} or fewer "
            "(or --workers auto), or raise --trials-per-gpu"
        )
    return int(workers), k


def plan_slots(
    workers: int,
    device: str,
    *,
    gpus: list[str],
    cpus: int,
    per_gpu: int | None = None,
    mps: bool = False,
) -> list[Slot]:
    """One slot per worker: GPUs round robin (unless the device is the CPU); CPU threads split.

    Workers that share a GPU (``per_gpu`` of them, or more workers than GPUs) split
    :data:`GPU_MEMORY_SHARE` of its memory evenly; ``mps`` (:func:`mps_running`) is noted."""
    limit = max_workers(gpus=gpus if device != "cpu" else [], cpus=cpus)
    if workers > limit:
        where = f"{cpus} CPU core{'s' if cpus != 1 else ''}"
        if gpus and device != "cpu":
            where += f" and {len(gpus)} GPU{'s' if len(gpus) != 1 else ''}"
        raise UserError(
            f"--workers {workers} is more than this machine can run side by side ({where}: at "
            f"most {limit}: {WORKERS_PER_CORE} per core or {WORKERS_PER_GPU} per GPU); pass --workers {limit} "
            "or fewer, and start more nodes for more"
        )
    if device.startswith("cuda:"):
        raise UserError(
            f"--device {device} names one GPU, but each of the {workers} workers gets its own "
            "through CUDA_VISIBLE_DEVICES; pass --device cuda (or auto), or set "
            "CUDA_VISIBLE_DEVICES to the GPUs to use"
        )
    if device not in ("auto", "cuda", "cpu", ""):
        raise UserError(f"--workers runs on cuda or cpu, not {device!r}")
    if device == "cuda" and not gpus:
        raise UserError("--device cuda, but no GPU is visible (check CUDA_VISIBLE_DEVICES)")
    use = gpus if device != "cpu" else []
    sharing = max(per_gpu or 1, -(-workers // len(use))) if use else 1
    fraction = round(GPU_MEMORY_SHARE / sharing, 4) if sharing > 1 else None
    base, extra = divmod(max(1, cpus), workers)
    return [
        Slot(
            i,
            use[i % len(use)] if use else None,
            max(1, base + (1 if i < extra else 0)),
            memory_fraction=fraction,
            mps=mps and fraction is not None,
        )
        for i in range(workers)
    ]


def apply_memory_fraction() -> float | None:
    """In a worker that shares its GPU: cap this process at its share of the GPU's memory
    (:data:`automl_tl.train.MEMORY_FRACTION_ENV`, set by :class:`Slot`), so that one trial
    runs out of memory alone instead of taking its neighbours with it. Returns the fraction
    applied, or None."""
    text = os.environ.get(MEMORY_FRACTION_ENV)
    if not text:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    fraction = float(text)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return fraction


@dataclass
class WorkerOutcome:
    slot: Slot
    pid: int
    returncode: int | None = None
    finished_trials: int = 0
    #: when the process started and ended (``time.time()``)
    started: float | None = None
    ended: float | None = None
    last_lines: deque = field(default_factory=lambda: deque(maxlen=20))

    @property
    def failed(self) -> bool:
        return self.returncode != 0

    @property
    def killed_by(self) -> str | None:
        """The signal that ended the process (``SIGKILL``), or None."""
        if self.returncode is None or self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def describe(self) -> str:
        ran = f"{self.finished_trials} trial{'s' if self.finished_trials != 1 else ''} finished"
        if self.returncode == 0:
            return f"done, {ran}"
        if self.killed_by:
            return (
                f"killed by {self.killed_by} after {ran}; its running trial is failed and retried"
            )
        errors = [line for line in self.last_lines if line.startswith("error:")]
        why = errors[-1] if errors else (self.last_lines[-1] if self.last_lines else "")
        return f"failed (exit {self.returncode}) after {ran}: {why}".rstrip(": ")


@dataclass
class WorkersOutcome:
    study: optuna.Study
    workers: list[WorkerOutcome]

    @property
    def failed(self) -> list[WorkerOutcome]:
        return [w for w in self.workers if w.failed]


def _pump(proc: subprocess.Popen, prefix: str, outcome: WorkerOutcome) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        outcome.last_lines.append(line)
        sys.stderr.write(f"{prefix}{line}\n")
        sys.stderr.flush()


def python_module_command(module: str) -> list[str]:
    """``python -m MODULE`` without the current directory on ``sys.path`` (``-P``, and the
    same by hand before Python 3.11): a folder named like the package where the command runs
    cannot shadow the installed one."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module]
    code = (
        "import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", code]


def run_workers(
    config: StudyConfig,
    registry,
    workers: int,
    *,
    device: str,
    child_args: Callable[[Slot], Sequence[str]],
    env: dict[str, str] | None = None,
    per_gpu: int | None = None,
) -> WorkersOutcome:
    """Start ``workers`` local ``automl-tl search`` processes on one study and wait for them.

    The parent checks names and backbones, decodes the data once and creates the study (with
    its data fingerprint) before any child starts; each child is an ordinary worker pinned to
    one slot, in its own session so a terminal's Ctrl-C reaches it once, through the parent.
    A child that dies does not stop the others: its running trial is failed and retried.
    ``per_gpu`` workers share each GPU (:func:`plan_slots`).
    """
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    check_names(config, registry)
    check_backbones_run(config, registry)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    splits = load_splits(config, registry)  # decoded once, here, into the shared cache
    study = open_search_study(config, splits, registry)
    del splits  # the workers read the cache; the parent holds no images while they run
    url = config.storage_url
    recover_stale_trials(study, url)  # trials of workers killed in an earlier run
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = visible_gpus() if device != "cpu" else []
    slots = plan_slots(
        workers,
        device,
        gpus=gpus,
        cpus=cpus or 1,
        per_gpu=per_gpu,
        mps=bool(gpus) and mps_running(),
    )
    log.info(
        "starting %d workers on study %r (%s storage): %s",
        workers,
        config.name,
        storage_kind(url),
        "; ".join(f"worker {s.index}: {s.label}" for s in slots),
    )

    def died(outcome: WorkerOutcome) -> None:
        log.warning("worker %d: exit %s; the others go on", outcome.slot.index, outcome.returncode)
        recover_stale_trials(study, url)  # its running trial is failed and retried

    racers = {RACERS_ENV: str(workers)}  # the deadline keeps time for their share of the race
    outcomes = run_processes(
        slots, child_args, env={**(env or {}), **racers}, prefix="worker", on_failure=died
    )
    by_pid = {o.pid: o for o in outcomes}
    for t in study.get_trials(deepcopy=False, states=trials.FINISHED):
        worker = t.user_attrs.get(trials.WORKER) or {}
        if worker.get("host") == socket.gethostname() and worker.get("pid") in by_pid:
            by_pid[worker["pid"]].finished_trials += 1
    return WorkersOutcome(study, outcomes)


def run_processes(
    slots: Sequence[Slot],
    child_args: Callable[[Slot], Sequence[str]],
    *,
    env: dict[str, str] | None = None,
    prefix: str = "worker",
    on_failure: Callable[[WorkerOutcome], None] | None = None,
) -> list[WorkerOutcome]:
    """Run one ``automl-tl`` child process per slot, side by side, and wait for them all:
    the one place that starts local workers (the search's, the retrains').

    Each child is pinned to its slot (:meth:`Slot.env`), in its own session so a terminal's
    Ctrl-C reaches it once, through this process (SIGINT / SIGTERM / SIGHUP are forwarded,
    then raised here as ``KeyboardInterrupt`` once every child has stopped). Its output is
    echoed line by line behind ``[PREFIX N]``. A child that fails does not stop the others
    (``on_failure`` is called as it ends)."""
    procs: list[subprocess.Popen] = []
    outcomes: list[WorkerOutcome] = []
    pumps: list[threading.Thread] = []
    previous = {}
    signalled: list[int] = []

    def forward(signum, frame):  # SIGINT/SIGTERM/SIGHUP to the parent -> every child, once
        signalled.append(signum)
        to_child = signal.SIGTERM if signum == signal.SIGHUP else signum  # stop cleanly
        for p in procs:
            if p.poll() is None:
                p.send_signal(to_child)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # only the main thread may; elsewhere, don't
            previous[sig] = signal.signal(sig, forward)
    try:
        for slot in slots:
            proc = subprocess.Popen(
                # issue 13: not `python -m`, which puts the cwd first on sys.path (an
                # automl_tl/ folder there would run instead of the installed package)
                [*python_module_command("automl_tl.cli"), *child_args(slot)],
                env={**os.environ, **(env or {}), **slot.env(), PARENT_ENV: str(os.getpid())},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
            procs.append(proc)
            outcome = WorkerOutcome(slot, proc.pid, started=time.time())
            outcomes.append(outcome)
            pump = threading.Thread(
                target=_pump, args=(proc, f"[{prefix} {slot.index}] ", outcome), daemon=True
            )
            pump.start()
            pumps.append(pump)
        pending = dict(enumerate(procs))
        while pending:
            for i, proc in list(pending.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del pending[i]
                outcomes[i].returncode, outcomes[i].ended = rc, time.time()
                if rc != 0 and on_failure is not None:
                    on_failure(outcomes[i])
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:  # only if the parent itself is failing
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pump in pumps:
            pump.join(timeout=5)
    if signalled:  # after every child has stopped: the parent stops as they did
        raise KeyboardInterrupt(
            "SIGINT" if all(s == signal.SIGINT for s in signalled) else "SIGTERM"
        )
    return outcomes


def die_with_parent() -> None:
    """In a worker process: be sent SIGTERM when the ``--workers`` parent dies, however it
    dies (SIGKILL included), so no worker is left orphaned (Linux; elsewhere nothing).

    The parent's pid comes from :data:`PARENT_ENV`; a parent already gone by the time the
    child asks (the race the prctl cannot see) stops the child at once too.
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


# ---------------------------------------------------------------------------------------------
# the retrains after the search, fanned out over the GPUs


@dataclass(frozen=True)
class RetrainJob:
    """One retrain after the search: the race's winner into ``best/`` (``selection``: what
    the race chose), or a weight source's best trial into ``models/trial-N/`` (the
    transferred-vs-scratch comparison)."""

    trial: int
    selection: dict[str, Any] | None = None
    weights: str | None = None

    def describe(self) -> str:
        if self.selection is not None:
            return f"trial {self.trial} (the race's winner, into best/)"
        return (
            f"trial {self.trial} (the best {self.weights!r} trial, into models/trial-{self.trial}/)"
        )

    def to_json(self) -> dict[str, Any]:
        return {"trial": self.trial, "selection": self.selection, "weights": self.weights}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetrainJob:
        return cls(int(data["trial"]), data.get("selection"), data.get("weights"))


@dataclass
class RetrainsOutcome:
    """What the retrains after the search gave, as the serial path returns it: the winner's
    ``(best/, metrics)`` (None when another worker retrains it or its retrain failed),
    ``selection.json``'s content, the per-weights comparison, and the retrains that failed
    (with why) when they ran in worker processes."""

    retrained: tuple[Path, dict[str, Any]] | None = None
    selection: dict[str, Any] | None = None
    comparison: list[dict[str, Any]] | None = None
    failed: list[tuple[RetrainJob, str]] = field(default_factory=list)
    workers: list[WorkerOutcome] = field(default_factory=list)


def retrain_slots(
    device: str, *, gpus: list[str] | None = None, cpus: int | None = None
) -> list[Slot]:
    """Where the retrains after the search run: one slot per visible GPU (a retrain trains on
    train+val, so it gets a GPU of its own). Fewer than two (the CPU, one GPU): none, and the
    retrains run one after the other in this process, as before."""
    if gpus is None:
        gpus = visible_gpus() if resolve_device(device).type == "cuda" else []
    if len(gpus) < 2:
        return []
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return plan_slots(len(gpus), "cuda", gpus=gpus, cpus=cpus or 1)


def plan_retrains(config: StudyConfig, study: optuna.Study, chosen: Selection) -> list[RetrainJob]:
    """The retrains to fan out: the winner's, then each weight source's best trial not yet
    retrained. A finalist is left out when the race set the epochs: the ensemble or the soup
    may retrain it with those epochs (after the winner, in this process, as before)."""
    jobs = [RetrainJob(chosen.winner, selection=chosen.to_dict())]
    if not config.searches_weights():
        return jobs
    finalists = {row["trial"] for row in chosen.finalists}
    for label, t in best_by_weights(config, study).items():
        if t.number == chosen.winner or retrained_model(config, t.number) is not None:
            continue
        if t.number in finalists and chosen.epochs is not None:
            continue
        jobs.append(RetrainJob(t.number, weights=label))
    return jobs


def retrain_after_search(
    config: StudyConfig,
    registry,
    study: optuna.Study,
    splits,
    *,
    device: str,
    slots: Sequence[Slot],
    child_args: Callable[[Slot, list[RetrainJob]], Sequence[str]],
    env: dict[str, str] | None = None,
) -> RetrainsOutcome:
    """After a ``--workers`` search: the race's choice, the winner's retrain, the ensemble
    and the soup, and each weight source's best retrained.

    With two slots or more (:func:`retrain_slots`) the retrains run side by side, one
    worker process per slot (:func:`fan_out_retrains`); this process holds the winner's
    claim, then collects the results exactly as the serial path leaves them (``best/``,
    ``models/trial-N/``, catalog rows). A retrain that fails is named in
    :attr:`RetrainsOutcome.failed`; the others' results and the study are kept."""

    def one_after_the_other(retrained, extras) -> RetrainsOutcome:  # the serial path
        rows = None
        if retrained is not None:
            rows = retrain_per_weights(config, registry, study, splits, device=device)
        return RetrainsOutcome(retrained, extras, rows)

    if len(slots) < 2:
        return one_after_the_other(
            *select_and_retrain(config, registry, study, splits, device=device)
        )
    chosen = select(config, registry, study, splits, device=device)
    if chosen is None:
        return RetrainsOutcome()
    jobs = plan_retrains(config, study, chosen)
    if len(jobs) < 2:  # the winner alone: nothing to spread
        return one_after_the_other(
            *retrain_selected(config, registry, study, splits, chosen, device=device)
        )
    if not claim_best(config, study, chosen.winner):
        return RetrainsOutcome()
    failed, outcomes = fan_out_retrains(config, jobs, slots, child_args, env=env)
    out = RetrainsOutcome(failed=failed, workers=outcomes)
    if all(job.trial != chosen.winner for job, _ in failed):
        finish_claim(study, chosen.winner)
        best = config.paths.best
        out.retrained = best, json.loads((best / "metrics.json").read_text())
        out.selection = build_extras(config, registry, study, splits, chosen, device=device)
    skip = {job.trial for job, _ in failed}
    out.comparison = retrain_per_weights(config, registry, study, splits, device=device, skip=skip)
    return out


def fan_out_retrains(
    config: StudyConfig,
    jobs: list[RetrainJob],
    slots: Sequence[Slot],
    child_args: Callable[[Slot, list[RetrainJob]], Sequence[str]],
    *,
    env: dict[str, str] | None = None,
) -> tuple[list[tuple[RetrainJob, str]], list[WorkerOutcome]]:
    """Run ``jobs`` in worker processes (:func:`run_processes`), one per slot, dealt in turn
    (job i to slot i mod n): each child is ``automl-tl retrain --jobs`` of its share. Returns
    the jobs whose model is not there afterwards, each with why (its child's error line, or
    how it died), and the children's outcomes."""
    n = min(len(slots), len(jobs))
    shares = {slot.index: jobs[i::n] for i, slot in enumerate(slots[:n])}
    log.info(
        "retraining %d models side by side: %s",
        len(jobs),
        "; ".join(
            f"retrain {s.index} ({s.label}): "
            + ", ".join(f"trial {j.trial}" for j in shares[s.index])
            for s in slots[:n]
        ),
    )
    started = time.time()
    outcomes = run_processes(
        slots[:n], lambda slot: child_args(slot, shares[slot.index]), env=env, prefix="retrain"
    )
    failed = []
    for outcome in outcomes:
        for job in shares[outcome.slot.index]:
            folder = (
                config.paths.best if job.selection is not None else config.paths.model(job.trial)
            )
            if not _exported_since(folder, job.trial, started):
                failed.append((job, _why_failed(outcome, job)))
    return failed, outcomes


def _exported_since(folder: Path, trial_number: int, since: float) -> bool:
    """``folder`` holds ``trial_number``'s model, written at ``since`` or later."""
    try:
        written = (folder / "metrics.json").stat().st_mtime
        held = json.loads((folder / "metrics.json").read_text()).get("trial")
    except (OSError, ValueError):
        return False
    return (
        held == trial_number and written >= since - 1 and (folder / "model.safetensors").is_file()
    )


def _why_failed(outcome: WorkerOutcome, job: RetrainJob) -> str:
    where = f"retrain worker {outcome.slot.index} ({outcome.slot.label}, pid {outcome.pid})"
    if outcome.killed_by:
        return f"{where} was killed by {outcome.killed_by}"
    errors = [line for line in outcome.last_lines if line.startswith("error:")]
    mine = [line for line in errors if f"trial {job.trial}" in line]
    why = (mine or errors or list(outcome.last_lines) or [f"exit {outcome.returncode}"])[-1]
    return f"{where}: {why.removeprefix('error: ')}"


def run_retrain_jobs(
    config: StudyConfig, registry, jobs: list[RetrainJob], *, device: str
) -> list[tuple[RetrainJob, Exception]]:
    """In a retrain worker (``automl-tl retrain --jobs``): run its share of the retrains one
    after the other; one that fails does not stop the next. Returns the failures."""
    study = open_study(config)
    splits = load_splits(config, registry)
    check_data(study, splits)
    failed = []
    for job in jobs:
        try:
            if job.selection is not None:
                retrain_chosen(
                    config, registry, job.selection, device=device, study=study, splits=splits
                )
            else:
                retrain(
                    config,
                    registry,
                    trial_number=job.trial,
                    device=device,
                    study=study,
                    splits=splits,
                )
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            log.debug("retrain of trial %d failed", job.trial, exc_info=True)
            failed.append((job, exc))
    return failed
