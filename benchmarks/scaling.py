"""Scaling and storage overhead of a shared study.

1. **Scaling**: the same study searched by 1 worker (all CPU threads) and by ``--workers 2``
   (threads split between them), each through the command line on a fresh journal storage,
   interleaved over ``--rounds``; plus 1 worker with 1 thread, to tell the gain of a second
   process from the cost of a second thread.
   Trials per minute count finished trials between the first trial's start and the last
   trial's end, as the storage records them (worker start-up is reported apart).
2. **Storage overhead**: one in-process worker per storage kind (SQLite, journal file,
   PostgreSQL) with every call into the Optuna storage timed on the worker's own thread (the
   heartbeat thread runs beside the trial and is not counted): seconds in storage calls per
   trial, and as a share of the trial seconds.

PostgreSQL: ``--postgres URL`` (an empty database), or a throwaway server is started like the
tests do (Debian's ``postgresql`` package); without either, that row is left out.

    .venv/bin/python benchmarks/scaling.py                 # figures for benchmarks/RESULTS.md
    .venv/bin/python benchmarks/scaling.py --trials 6 --skip-scaling
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STUDY = """
name = "scaling"

[data]
source = "digits"
image_size = 32
seed = 0

[search]
n_trials = {n_trials}
backbones = ["test_resnet", "test_efficientnet"]
augmentations = ["none", "flip_crop"]
unfreeze = ["top_k", "layer_decay"]
epochs = {epochs}
batch_size = 64
pruner = "none"
heartbeat_interval = 5
"""


def write_study(folder: Path, n_trials: int, epochs: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scaling.toml"
    path.write_text(textwrap.dedent(STUDY.format(n_trials=n_trials, epochs=epochs)))
    return path


def finished_trials(url: str, name: str = "scaling"):
    import optuna

    from automl_tl.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat_interval=60))
    return [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]


# ---------------------------------------------------------------------------------------------
# 1. scaling: 1 worker vs 2 workers


def scaling_run(workers: int, n_trials: int, epochs: int, cpus: int, threads: int) -> dict:
    """One CLI search; ``cpus`` threads for the machine, ``threads`` for a lone worker."""
    folder = Path(tempfile.mkdtemp(prefix=f"automl-tl-scaling-{workers}-"))
    study = write_study(folder, n_trials, epochs)
    journal = folder / "journal.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "automl_tl.cli", "search", str(study), "--no-retrain", "-q"]
        + ["--workers", str(workers), "--storage", f"journal:{journal}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{workers} worker(s) failed:\n{result.stdout}\n{result.stderr}")
    trials = finished_trials(f"journal:{journal}")
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    span = (last - first).total_seconds()
    return {
        "workers": workers,
        "threads_each": threads if workers == 1 else max(1, cpus // workers),
        "trials": len(trials),
        "span_s": span,
        "wall_s": wall,
        "per_min": 60 * len(trials) / span,
        "mean_trial_s": sum(
            (t.datetime_complete - t.datetime_start).total_seconds() for t in trials
        )
        / len(trials),
    }


# ---------------------------------------------------------------------------------------------
# 2. storage overhead per trial


class StorageClock:
    """Times every call into the storage classes made on the timed thread; nested calls (the
    cache in front of an RDB storage calling the RDB storage) count once."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._depth = threading.local()
        self._thread: int | None = None
        self._patched: list[tuple[type, str, object]] = []

    def patch(self, *classes: type) -> None:
        for cls in classes:
            for name, fn in list(vars(cls).items()):
                if (
                    name.startswith("__")
                    or not callable(fn)
                    or isinstance(fn, (staticmethod, classmethod))
                ):
                    continue
                self._patched.append((cls, name, fn))
                setattr(cls, name, self._timed(fn))

    def _timed(self, fn):
        clock = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if threading.get_ident() != clock._thread:
                return fn(*args, **kwargs)
            depth = getattr(clock._depth, "n", 0)
            clock._depth.n = depth + 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock._depth.n = depth
                if depth == 0:
                    clock.seconds += time.perf_counter() - started
                    clock.calls += 1

        return timed

    def start(self) -> None:
        self._thread = threading.get_ident()

    def restore(self) -> None:
        for cls, name, fn in reversed(self._patched):
            setattr(cls, name, fn)


def overhead_run(kind: str, url: str, n_trials: int, epochs: int) -> dict:
    import optuna
    from optuna.storages import _CachedStorage

    from automl_tl import get_plugin_manager
    from automl_tl.config import load_config
    from automl_tl.registry import Registry
    from automl_tl.search import search

    folder = Path(tempfile.mkdtemp(prefix=f"automl-tl-overhead-{kind}-"))
    study_path = write_study(folder, n_trials, epochs)
    config = load_config(study_path, {"search.storage": url})
    pm, _ = get_plugin_manager(config.plugins, base_dir=config.base_dir)
    registry = Registry.from_plugin_manager(pm)
    clock = StorageClock()
    clock.patch(
        optuna.storages.RDBStorage,
        _CachedStorage,
        optuna.storages.JournalStorage,
        optuna.storages.BaseStorage,
    )
    try:
        clock.start()
        started = time.perf_counter()
        search(config, registry, pm, device="cpu", retrain_best=False)
        wall = time.perf_counter() - started
    finally:
        clock.restore()
    trials = finished_trials(config.storage_url)
    trial_s = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    return {
        "storage": kind,
        "trials": len(trials),
        "calls": clock.calls,
        "storage_s": clock.seconds,
        "trial_s": trial_s,
        "per_trial_ms": 1000 * clock.seconds / len(trials),
        "share": clock.seconds / trial_s,
        "wall_s": wall,
    }


@contextlib.contextmanager
def postgres_database(url: str | None):
    """An empty database: the one given, or one on a throwaway server (None if impossible)."""
    if url:
        yield url
        return
    sys.path.insert(0, str(REPO))
    from tests.postgres import Unavailable, running_server

    try:
        with running_server() as server:
            yield server.new_database()
    except Unavailable as exc:
        print(f"(no PostgreSQL: {exc})", file=sys.stderr)
        yield None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="budget of each run")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--postgres", help="URL of an empty PostgreSQL database")
    parser.add_argument("--rounds", type=int, default=3, help="1-vs-2-worker pairs, interleaved")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()
    import logging
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    logging.getLogger("automl_tl").setLevel(logging.WARNING)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    if not args.skip_scaling:
        print(f"## scaling: {args.trials} trials × {args.epochs} epochs, {cpus} CPU threads")
        print(
            "| round | workers | threads each | trials | trials/min | mean trial s | wall s | load |"
        )
        print("|---|---|---|---|---|---|---|---|")
        ratios, vs_one_thread = [], []
        # interleaved, so every configuration sees the same machine; the third (one worker,
        # one thread) tells the gain of a second process from the cost of a second thread
        for round_ in range(1, args.rounds + 1):
            pair = []
            for workers, threads in ((1, cpus), (2, 0), (1, 1)):
                load = os.getloadavg()[0]
                r = scaling_run(workers, args.trials, args.epochs, cpus, threads or cpus)
                pair.append(r)
                print(
                    f"| {round_} | {r['workers']} | {r['threads_each']} | {r['trials']} | "
                    f"{r['per_min']:.1f} | {r['mean_trial_s']:.1f} | {r['wall_s']:.0f} | "
                    f"{load:.1f} |",
                    flush=True,
                )
            ratios.append(pair[1]["per_min"] / pair[0]["per_min"])
            vs_one_thread.append(pair[1]["per_min"] / pair[2]["per_min"])
        print(
            f"\nratio 2 workers / 1 worker (trials/min): {', '.join(f'{x:.2f}' for x in ratios)}"
            f"; median {statistics.median(ratios):.2f}"
            f"\nratio 2 workers / 1 worker with 1 thread: "
            f"{', '.join(f'{x:.2f}' for x in vs_one_thread)}; median "
            f"{statistics.median(vs_one_thread):.2f}\n"
        )

    if not args.skip_overhead:
        import torch

        torch.set_num_threads(cpus)
        print(
            f"## storage overhead: 1 worker, {args.trials} trials × {args.epochs} epochs, "
            f"load {os.getloadavg()[0]:.1f}"
        )
        print("| storage | trials | storage calls | storage s | per trial ms | share of trial s |")
        print("|---|---|---|---|---|---|")
        tmp = Path(tempfile.mkdtemp(prefix="automl-tl-storages-"))
        with postgres_database(args.postgres) as pg_url:
            storages = [
                ("sqlite", f"sqlite:///{tmp / 'optuna.db'}"),
                ("journal", f"journal:{tmp / 'journal.log'}"),
            ] + ([("postgresql", pg_url)] if pg_url else [])
            for kind, url in storages:
                r = overhead_run(kind, url, args.trials, args.epochs)
                print(
                    f"| {kind} | {r['trials']} | {r['calls']} | {r['storage_s']:.3f} | "
                    f"{r['per_trial_ms']:.1f} | {100 * r['share']:.2f} % |"
                )


if __name__ == "__main__":
    main()
