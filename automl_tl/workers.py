"""Many workers, one study: storage kinds, joining, the global budget, stale trials, the
retrain claim, and ``--workers N`` local worker processes.

Optuna's storage-backed distributed optimization does the scheduling: every worker runs the
same ``study.optimize`` loop against one storage, and this module only adds what a shared
search needs on top of it.

- **Storage** — SQLite (``sqlite:///…``) for one process; Optuna's journal file
  (``journal:PATH``) for several processes on one node; an RDB server (``postgresql://…``,
  ``mysql://…``) for several nodes, with Optuna's heartbeats (``[search] heartbeat_interval``,
  grace period twice that) so a killed worker's trial is failed and retried by
  :class:`RetryStaleTrial` (Optuna's retry callback). The file storages have no heartbeat: a
  trial whose worker process on *this* host is gone is failed and retried the same way.
- **Budget** — ``n_trials`` finished (COMPLETE or PRUNED) trials across every worker, exactly:
  a trial is admitted only if the finished trials plus the running ones created before it
  leave room (trial numbers are assigned atomically by the storage, so every worker agrees).
- **Data** — a worker joins only if its data fingerprint matches the one stored on the study.
- **Retrain** — claimed atomically (creating a uniquely named marker study in the same storage)
  so it runs once per best trial however many workers finish together.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .config import StudyConfig, sqlite_path
from .errors import DataError, UserError

log = logging.getLogger("automl_tl")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: how often a trial killed with its worker is queued again (Optuna's ``max_retry``)
MAX_RETRIES = 3
#: user attributes that belong to one run of a trial, not to its configuration
_RUN_ATTRS = (
    "worker",
    "device",
    "epochs_run",
    "fail_reason",
    "skipped",
    "seconds",
    "images_per_s",
    "val_metrics",
    "batch_size",  # after out-of-memory halving (automl_tl.train)
    "feature_cache",
    "too_slow",
)
JOURNAL_FILE = "optuna-journal.log"
#: on the file storages, a RUNNING trial that never recorded its worker is failed after this
ORPHAN_AFTER_S = 600


class TrialSkipped(Exception):
    """The budget was already covered when this trial started; it trained nothing."""


# ---------------------------------------------------------------------------------------------
# storage


def storage_kind(url: str) -> str:
    """``"sqlite"``, ``"journal"`` or ``"rdb"`` (a database server)."""
    if url.startswith("journal:"):
        return "journal"
    if url.startswith("sqlite:"):
        return "sqlite"
    return "rdb"


def journal_path(url: str) -> Path:
    return Path(url[len("journal:") :]).expanduser()


def _retry_callback_class() -> type:
    # RetryHeartbeatStaleTrialCallback since Optuna 4.9; RetryFailedTrialCallback before
    new = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    return new or optuna.storages.RetryFailedTrialCallback


class RetryStaleTrial:
    """Optuna's retry callback for a trial whose worker died: the trial (now FAIL) is queued
    again as a WAITING trial with the same parameters, up to :data:`MAX_RETRIES` times.

    The attributes of the dead run (worker, epochs run…) are left behind so the retry starts
    clean; Optuna's ``failed_trial`` / ``retry_history`` system attributes link the two.
    """

    def __init__(self, max_retry: int | None = MAX_RETRIES) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry = _retry_callback_class()(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        worker = trial.user_attrs.get("worker") or {}
        host = f" ({worker.get('host')} pid {worker.get('pid')})" if worker else ""
        self.queue_again(study, trial, f"lost its worker{host} while running; marked FAIL")

    def queue_again(self, study: optuna.Study, trial: FrozenTrial, why: str) -> bool:
        """Queue ``trial``'s configuration again (False: it has no parameters yet, or it was
        already retried :data:`MAX_RETRIES` times)."""
        retries = len(trial.system_attrs.get("retry_history", []))
        if not trial.params or retries >= MAX_RETRIES:
            log.warning("trial %d %s; not queued again (%d retries)", trial.number, why, retries)
            return False
        clean = copy.copy(trial)
        clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in _RUN_ATTRS}
        clean.system_attrs = copy.deepcopy(trial.system_attrs)
        log.warning("trial %d %s and queued again", trial.number, why)
        self._retry(study, clean)
        return True


def open_storage(url: str, *, heartbeat_interval: int) -> optuna.storages.BaseStorage:
    """The Optuna storage for ``url`` (see :func:`storage_kind`); errors never show a password."""
    from .study import redact

    kind = storage_kind(url)
    try:
        if kind == "journal":
            from optuna.storages.journal import JournalFileBackend

            path = journal_path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if kind == "sqlite":
            if url.startswith("sqlite:///"):  # issue 13: the path is percent-quoted
                sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(url)
        # A database server: heartbeats, so a SIGKILLed worker's trial becomes FAIL after the
        # grace period and the retry callback queues it again for another worker.
        params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
        callback_arg = (
            "heartbeat_stale_trial_callback"
            if "heartbeat_stale_trial_callback" in params
            else "failed_trial_callback"
        )
        return _first_come(
            lambda: optuna.storages.RDBStorage(
                _with_driver(url),
                # two connections per worker in use (main thread + heartbeat thread)
                engine_kwargs={"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2},
                heartbeat_interval=heartbeat_interval,
                grace_period=2 * heartbeat_interval,
                **{callback_arg: RetryStaleTrial()},
            )
        )
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            _hide_password(f"cannot open storage {redact(url)}: {type(exc).__name__}: {text}", url)
        ) from exc


def _first_come(open_rdb: Callable[[], optuna.storages.RDBStorage]) -> optuna.storages.RDBStorage:
    """Open an RDB storage; workers that start together on an empty database race to create
    Optuna's tables, and the losers see "already exists": they try again, finding them."""
    import random

    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return open_rdb()
        except (IntegrityError, ProgrammingError):
            if attempt == 5:
                raise
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
    raise AssertionError("unreachable")


def _with_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed: SQLAlchemy 2.1 defaults
    to psycopg 3, 2.0 to psycopg2, and automl-tl's ``postgres`` extra installs psycopg2."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    import importlib.util

    rest = url.split("://", 1)[1]
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    return url


def password_to_env(url: str) -> tuple[str, dict[str, str]]:
    """A PostgreSQL URL without its password, and the password as ``PGPASSWORD`` (libpq reads
    it), so the password stays off the command lines of worker processes (``ps`` shows them)."""
    from sqlalchemy.engine import URL, make_url

    if not url.startswith(("postgresql", "postgres://")):
        return url, {}
    try:
        parsed = make_url(url)
    except Exception:
        return url, {}
    if not parsed.password:
        return url, {}
    bare = URL.create(
        parsed.drivername,
        parsed.username,
        None,
        parsed.host,
        parsed.port,
        parsed.database,
        parsed.query,
    ).render_as_string(hide_password=False)
    return bare, {"PGPASSWORD": str(parsed.password)}


def _hide_password(text: str, url: str) -> str:
    """``text`` with the URL's password (should a driver repeat it) replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:
        return text
    return text.replace(str(password), "***") if password else text


def storage_for_workers(config: StudyConfig, workers: int) -> str:
    """The storage URL ``workers`` local processes share; SQLite with several is refused."""
    from .study import redact

    url = config.search.storage
    if url and storage_kind(url) == "journal":
        return f"journal:{journal_path(url).resolve()}"
    if url and storage_kind(url) != "sqlite":
        return url
    if workers > 1:
        sqlite_file = config.output_dir / "optuna.db"
        if url:
            where = redact(url)
        elif sqlite_file.exists() and not (config.output_dir / JOURNAL_FILE).exists():
            where = f"{sqlite_file} (this study's SQLite storage)"
        else:
            return f"journal:{(config.output_dir / JOURNAL_FILE).resolve()}"
        raise UserError(
            f"--workers {workers} cannot share {where}: SQLite serves one process (Optuna's FAQ: "
            "concurrent writers get 'database is locked'). Use Optuna's journal file for several "
            "workers on one node (--storage journal:PATH; the default with --workers > 1 when "
            "the study has no SQLite storage yet), or a database server for several nodes "
            "(--storage postgresql://user@host/db or mysql://…), or run --workers 1."
        )
    return url or config.storage_url


# ---------------------------------------------------------------------------------------------
# who runs a trial, and is it still alive


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process from /proc, or None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text.rsplit(")", 1)[1].split()
    return rest[0], int(rest[19])


def worker_identity() -> dict[str, Any]:
    """This process as a trial records it: host, pid and start time (pids get reused)."""
    stat = _proc_stat(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": stat[1] if stat else None}


def is_alive(worker: dict[str, Any]) -> bool:
    """Whether a worker process is alive; one on another host is assumed to be."""
    if worker.get("host") != socket.gethostname():
        return True
    pid = int(worker.get("pid", 0))
    if pid <= 0:
        return True
    if Path("/proc/self/stat").exists():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):  # gone, or a zombie nobody reaped yet
            return False
        return worker.get("started") in (None, stat[1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def recover_stale_trials(study: optuna.Study, url: str) -> None:
    """Fail the RUNNING trials whose worker died, and queue them again.

    On a database server this is Optuna's heartbeat check. The file storages have no
    heartbeat, and serve one node: there a trial whose worker process on this host is gone is
    failed the same way (the storage lets exactly one worker make the change).
    """
    if storage_kind(url) == "rdb":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return
    storage = study._storage  # as optuna.storages.fail_stale_trials does
    retry = RetryStaleTrial()
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker:
            if is_alive(worker):
                continue
            reason = f"its worker ({worker.get('host')} pid {worker.get('pid')}) died while it ran"
        else:  # a worker records itself first thing; one that never did was killed as it began
            started = trial.datetime_start
            if started is None or (now - started).total_seconds() < ORPHAN_AFTER_S:
                continue
            reason = (
                f"its worker never recorded itself in {ORPHAN_AFTER_S} s (killed at the start?)"
            )
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        retry(study, copy.deepcopy(storage.get_trial(trial._trial_id)))


# ---------------------------------------------------------------------------------------------
# joining a study


def join_study(config: StudyConfig, splits) -> optuna.Study:
    """Create or load the study; store the data identity on a new one, verify it otherwise.

    Exactly one worker creates the study (the storage refuses a duplicate name) and stores the
    data fingerprint; every other one waits for it and refuses to join if its data differ.
    """
    from .study import check_data, make_pruner, make_sampler, make_storage

    storage = make_storage(config)
    sampler = make_sampler(config)
    if storage_kind(config.storage_url) != "sqlite":
        # Workers seeded alike would sample the same configurations side by side; each trial
        # still trains with seed + its number, so the trials themselves stay reproducible.
        sampler.reseed_rng()
    kwargs = {
        "study_name": config.name,
        "storage": storage,
        "sampler": sampler,
        "pruner": make_pruner(config),
    }
    try:
        study = optuna.create_study(direction="maximize", **kwargs)
        check_data(study, splits)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
    deadline = time.monotonic() + 30
    while (
        "data" not in study.user_attrs
        and not study.get_trials(deepcopy=False)
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)  # the creator stores the data identity right after creating it
    try:
        check_data(study, splits)
    except DataError as exc:
        raise DataError(
            f"this worker ({socket.gethostname()} pid {os.getpid()}) refuses to join: {exc} "
            "Every worker must see the same data (same files, labels, seed and fractions)."
        ) from exc
    return study


# ---------------------------------------------------------------------------------------------
# the global budget


class Budget:
    """``n_trials`` finished trials across all workers, exactly — not N × the budget.

    Use :meth:`admit` first thing in the objective and the instance itself as an ``optimize``
    callback (it stops the loop, or waits while the remaining budget is held by trials running
    on other workers, which may still fail and need this worker). Optuna's MaxTrialsCallback
    alone overshoots by up to N - 1 trials when N workers finish at once.

    Example:
        >>> budget = Budget(study, 20, url=storage_url)
        >>> def objective(trial):
        ...     budget.admit(trial)
        ...     return train(trial)
        >>> if budget.room():
        ...     study.optimize(objective, catch=(TrialSkipped,), callbacks=[budget])
    """

    def __init__(
        self,
        study: optuna.Study,
        n_trials: int,
        *,
        url: str,
        timeout: float | None = None,
        poll: float | None = None,
        heartbeat_interval: int = 60,
    ) -> None:
        self.study, self.n_trials, self.url = study, n_trials, url
        self.deadline = None if timeout is None else time.monotonic() + timeout
        if poll is None:
            poll = min(5.0, max(0.5, heartbeat_interval / 2)) if storage_kind(url) == "rdb" else 1.0
        self.poll = poll

    def admit(self, trial: optuna.Trial) -> None:
        """Raise :class:`TrialSkipped` if the finished trials plus those started before this one
        (lower numbers: the storage numbers trials atomically) already cover the budget."""
        ahead = finished = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.state in FINISHED:
                finished += 1
            elif t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < trial.number:
                ahead += 1
        if finished + ahead >= self.n_trials:
            reason = (
                f"skipped: the budget of {self.n_trials} was already covered by other workers "
                f"({finished} finished, {ahead} running)"
            )
            trial.set_user_attr("skipped", True)
            trial.set_user_attr("fail_reason", reason)
            raise TrialSkipped(reason)

    def room(self) -> bool:
        """Wait until this worker may start a trial (True), or the budget is spent (False)."""
        waiting_since = None
        while True:
            recover_stale_trials(self.study, self.url)
            finished = running = 0
            for t in self.study.get_trials(deepcopy=False):
                finished += t.state in FINISHED
                running += t.state == TrialState.RUNNING
            if finished >= self.n_trials:
                return False
            if finished + running < self.n_trials:
                return True
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return False
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.info(
                    "%d of %d trials finished and %d running on other workers: waiting for them "
                    "(one whose worker dies is failed and run again here)",
                    finished,
                    self.n_trials,
                    running,
                )
                self._warn_unwatched()
            time.sleep(self.poll)

    def _warn_unwatched(self) -> None:
        """A file storage cannot tell whether a worker on another host is alive."""
        if storage_kind(self.url) == "rdb":
            return
        host = socket.gethostname()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            other = (t.user_attrs.get("worker") or {}).get("host", host)
            if other != host:
                log.warning(
                    "trial %d runs on host %s: a %s storage cannot see whether that worker is "
                    "still alive, so if it is gone this wait only ends with --timeout; use a "
                    "database server (postgresql://…) for workers on several nodes",
                    t.number,
                    other,
                    storage_kind(self.url),
                )

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not self.room():
            study.stop()


# ---------------------------------------------------------------------------------------------
# retrain once


def _claim_name(study_name: str, trial_number: int) -> str:
    return f"{study_name}:retrain:trial-{trial_number}"


def claim_retrain(study: optuna.Study, trial_number: int) -> tuple[bool, dict[str, Any]]:
    """Claim the retrain of ``trial_number``: True for exactly one caller across all workers.

    The claim is a marker study named ``<study>:retrain:trial-<n>`` in the same storage:
    creating a study whose name exists fails atomically on every Optuna storage. The loser
    gets the winner's identity (host, pid, time) to report.
    """
    name = _claim_name(study.study_name, trial_number)
    me = {**worker_identity(), "at": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        claim = optuna.create_study(study_name=name, storage=study._storage)
    except optuna.exceptions.DuplicatedStudyError:
        holder = optuna.load_study(study_name=name, storage=study._storage)
        deadline = time.monotonic() + 5
        while "claimed_by" not in holder.user_attrs and time.monotonic() < deadline:
            time.sleep(0.1)
        return False, dict(holder.user_attrs.get("claimed_by", {}))
    claim.set_user_attr("claimed_by", me)
    claim.set_user_attr("claim_of", study.study_name)
    return True, me


def retrain_once(config: StudyConfig, registry, study: optuna.Study, splits, *, device: str):
    """Retrain the best trial unless another worker has claimed it; (dir, metrics) or None."""
    from .study import retrain

    best = study.best_trial
    won, holder = claim_retrain(study, best.number)
    if not won:
        log.info(
            "trial %d is retrained by another worker (%s pid %s, %s); "
            "`automl-tl retrain` retrains it again",
            best.number,
            holder.get("host", "?"),
            holder.get("pid", "?"),
            holder.get("at", "?"),
        )
        return None
    return retrain(config, registry, device=device, study=study, splits=splits)


# ---------------------------------------------------------------------------------------------
# N local worker processes


@dataclass
class Slot:
    """Where one local worker runs: a GPU (``CUDA_VISIBLE_DEVICES``) and its CPU threads."""

    index: int
    gpu: str | None
    threads: int

    @property
    def label(self) -> str:
        where = f"GPU {self.gpu}" if self.gpu is not None else "CPU"
        return f"{where}, {self.threads} thread{'s' if self.threads != 1 else ''}"

    def env(self) -> dict[str, str]:
        env = {
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "AUTOML_TL_WORKER": str(self.index),
        }
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every CUDA device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def plan_slots(workers: int, device: str, *, gpus: list[str], cpus: int) -> list[Slot]:
    """One slot per worker: GPUs round robin (unless the device is the CPU); CPU threads split."""
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
    base, extra = divmod(max(1, cpus), workers)
    return [
        Slot(i, use[i % len(use)] if use else None, max(1, base + (1 if i < extra else 0)))
        for i in range(workers)
    ]


@dataclass
class WorkerOutcome:
    slot: Slot
    pid: int
    returncode: int | None = None
    finished_trials: int = 0
    last_lines: deque = field(default_factory=lambda: deque(maxlen=20))

    @property
    def failed(self) -> bool:
        return self.returncode != 0

    def describe(self) -> str:
        ran = f"{self.finished_trials} trial{'s' if self.finished_trials != 1 else ''} finished"
        if self.returncode == 0:
            return f"done, {ran}"
        if self.returncode is not None and self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"killed by {name} after {ran}; its running trial is failed and retried"
        errors = [line for line in self.last_lines if line.startswith("error:")]
        why = errors[-1] if errors else (self.last_lines[-1] if self.last_lines else "")
        return f"failed (exit {self.returncode}) after {ran}: {why}".rstrip(": ")


@dataclass
class WorkersOutcome:
    study: optuna.Study
    splits: Any
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
) -> WorkersOutcome:
    """Start ``workers`` local ``automl-tl search`` processes on one study and wait for them.

    The parent checks names and backbones, decodes the data once and creates the study (with
    its data fingerprint) before any child starts; each child is an ordinary worker pinned to
    one slot, in its own session so a terminal's Ctrl-C reaches it once, through the parent.
    A child that dies does not stop the others: its running trial is failed and retried.
    """
    from .study import check_backbones_run, check_names, load_splits

    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    check_names(config, registry)
    check_backbones_run(config, registry)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    splits = load_splits(config, registry)  # decoded once, here, for every worker
    study = join_study(config, splits)
    url = config.storage_url
    recover_stale_trials(study, url)  # trials of workers killed in an earlier run
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = visible_gpus() if device != "cpu" else []
    slots = plan_slots(workers, device, gpus=gpus, cpus=cpus or 1)
    log.info(
        "starting %d workers on study %r (%s storage): %s",
        workers,
        config.name,
        storage_kind(url),
        "; ".join(f"worker {s.index}: {s.label}" for s in slots),
    )
    procs: list[subprocess.Popen] = []
    outcomes: list[WorkerOutcome] = []
    pumps: list[threading.Thread] = []
    previous = {}
    signalled: list[int] = []

    def forward(signum, frame):  # SIGINT/SIGTERM to the parent -> every running child, once
        signalled.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # only the main thread may; elsewhere, don't
            previous[sig] = signal.signal(sig, forward)
    try:
        for slot in slots:
            proc = subprocess.Popen(
                # issue 13: not `python -m`, which puts the cwd first on sys.path (an
                # automl_tl/ folder there would run instead of the installed package)
                [*python_module_command("automl_tl.cli"), *child_args(slot)],
                env={**os.environ, **(env or {}), **slot.env()},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
            procs.append(proc)
            outcome = WorkerOutcome(slot, proc.pid)
            outcomes.append(outcome)
            pump = threading.Thread(
                target=_pump, args=(proc, f"[worker {slot.index}] ", outcome), daemon=True
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
                outcomes[i].returncode = rc
                if rc != 0:
                    log.warning("worker %d: exit %s; the others go on", i, rc)
                    recover_stale_trials(study, url)
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
        raise KeyboardInterrupt("SIGTERM" if signal.SIGTERM in signalled else "SIGINT")
    by_pid = {o.pid: o for o in outcomes}
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") == socket.gethostname() and worker.get("pid") in by_pid:
            by_pid[worker["pid"]].finished_trials += 1
    return WorkersOutcome(study, splits, outcomes)
