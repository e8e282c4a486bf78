"""The budget of a shared search, and the trials whose worker died.

- **Budget** — ``n_trials`` finished (COMPLETE or PRUNED) trials across every worker, exactly:
  a trial is admitted only if the finished trials plus the running ones created before it
  leave room (trial numbers are assigned atomically by the storage, so every worker agrees).
- **Stale trials** — on a database server Optuna's heartbeats find a trial whose worker
  stopped; on the file storages (one node) a trial whose worker process is gone is failed.
  Either way :class:`RetryStaleTrial` queues its configuration again.
- **Worker identity** — host, boot, PID namespace, pid and start time: a pid alone is reused,
  and containers sharing a hostname have PID namespaces of their own.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import os
import secrets
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import trials
from ._util import pid_alive, proc_stat
from .storage import fail_trial, storage_kind, storage_of

log = logging.getLogger("automl_tl")

#: how often a trial killed with its worker is queued again (Optuna's ``max_retry``)
MAX_RETRIES = 3
#: on the file storages, a RUNNING trial that never recorded its worker is failed after this
ORPHAN_AFTER_S = 600


class TrialSkipped(Exception):
    """The budget was already covered when this trial started; it trained nothing."""


# ---------------------------------------------------------------------------------------------
# who runs a trial, and is it still alive


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def worker_identity() -> dict[str, Any]:
    """This process as a trial records it: host, boot id, PID namespace, pid and start time."""
    stat = proc_stat(os.getpid())
    return {
        "host": socket.gethostname(),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pidns": _pid_namespace(),
        "pid": os.getpid(),
        "started": stat[1] if stat else None,
    }


def is_alive(worker: dict[str, Any]) -> bool:
    """Whether a worker process is alive. One this process cannot see — on another host, or
    in another PID namespace of this host (a container sharing the hostname) — is assumed to
    be; one of an earlier boot of this host is not."""
    if worker.get("host") != socket.gethostname():
        return True
    boot = worker.get("boot")
    if boot and boot != _read("/proc/sys/kernel/random/boot_id"):
        return False  # this host rebooted since: nothing of that run is alive
    pidns = worker.get("pidns")
    if pidns and pidns != _pid_namespace():
        return True  # its pid means another process here
    return pid_alive(int(worker.get("pid", 0)), worker.get("started"))


def claim_expiry(study: optuna.Study) -> float:
    """How long a claim held by a worker whose liveness this host cannot see (another node)
    stands before it is taken again: ten times the study's median trial, at least 10 minutes."""
    durations = sorted(
        d
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if (d := trials.duration(t)) is not None
    )
    median = durations[len(durations) // 2] if durations else 0.0
    return max(600.0, 10.0 * median)


def holder_gone(holder: dict[str, Any], expiry_s: float | None = None) -> str | None:
    """Why the holder of a claim is gone (died on this host; or, on a host this one cannot
    see, claimed more than ``expiry_s`` ago), or None while it may still be working."""
    if not is_alive(holder):
        return f"its holder ({describe_worker(holder)}) stopped before finishing"
    if expiry_s is None or holder.get("host") == socket.gethostname():
        return None
    try:
        at = datetime.datetime.fromisoformat(holder["at"])
    except (KeyError, TypeError, ValueError):
        return None
    age = (datetime.datetime.now() - at).total_seconds()
    if age > expiry_s:
        return (
            f"its holder ({describe_worker(holder)}) on another node claimed it {age:.0f} s ago "
            f"and has not finished (the limit is {expiry_s:.0f} s: ten median trials)"
        )
    return None


def describe_worker(worker: dict[str, Any] | None) -> str:
    worker = worker or {}
    return f"{worker.get('host', '?')} pid {worker.get('pid', '?')}"


# ---------------------------------------------------------------------------------------------
# retrying a dead worker's trial


def _retry_callback_class() -> type:
    # RetryHeartbeatStaleTrialCallback since Optuna 4.9; RetryFailedTrialCallback before
    new = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    return new or optuna.storages.RetryFailedTrialCallback


class RetryStaleTrial:
    """Optuna's retry callback for a trial whose worker died: the trial (now FAIL) is queued
    again as a WAITING trial with the same parameters, up to :data:`MAX_RETRIES` times.

    The attributes of the dead run (:data:`automl_tl.trials.RUN_ATTRS`) are left behind so the
    retry starts clean; Optuna's ``failed_trial`` / ``retry_history`` system attributes link
    the two.
    """

    def __init__(self, max_retry: int | None = MAX_RETRIES) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry = _retry_callback_class()(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        worker = trial.user_attrs.get(trials.WORKER)
        host = f" ({describe_worker(worker)})" if worker else ""
        self.queue_again(study, trial, f"lost its worker{host} while running; marked FAIL")

    def queue_again(self, study: optuna.Study, trial: FrozenTrial, why: str) -> bool:
        """Queue ``trial``'s configuration again (False: it has no parameters yet, or it was
        already retried :data:`MAX_RETRIES` times)."""
        retries = len(trial.system_attrs.get("retry_history", []))
        if not trial.params or retries >= MAX_RETRIES:
            log.warning("trial %d %s; not queued again (%d retries)", trial.number, why, retries)
            return False
        clean = copy.copy(trial)
        clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in trials.RUN_ATTRS}
        clean.system_attrs = copy.deepcopy(trial.system_attrs)
        log.warning("trial %d %s and queued again", trial.number, why)
        self._retry(study, clean)
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
    retry = RetryStaleTrial()
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(trials.WORKER)
        if worker:
            if is_alive(worker):
                continue
            reason = f"its worker ({describe_worker(worker)}) died while it ran"
        else:  # a worker records itself first thing; one that never did was killed as it began
            started = trial.datetime_start
            if started is None or (now - started).total_seconds() < ORPHAN_AFTER_S:
                continue
            reason = (
                f"its worker never recorded itself in {ORPHAN_AFTER_S} s (killed at the start?)"
            )
        failed = fail_trial(study, trial, reason)
        if failed is not None:
            retry(study, copy.deepcopy(failed))


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
        stop_at: Deadline | None = None,
        reserve: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.study, self.n_trials, self.url = study, n_trials, url
        self.deadline = None if timeout is None else time.monotonic() + timeout
        #: the search's deadline, and the seconds to keep free before it (the retrain)
        self.stop_at, self.reserve = stop_at, reserve
        if poll is None:
            poll = min(5.0, max(0.5, heartbeat_interval / 2)) if storage_kind(url) == "rdb" else 1.0
        self.poll = poll

    def counts(self, before: int | None = None) -> tuple[int, int]:
        """(finished, running) trials. With ``before`` (a trial number), "running" means the
        trials running or waiting that were created before that one."""
        finished = running = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.state in trials.FINISHED:
                finished += 1
            elif before is None:
                running += t.state == TrialState.RUNNING
            elif t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < before:
                running += 1
        return finished, running

    def admit(self, trial: optuna.Trial) -> None:
        """Raise :class:`TrialSkipped` if the finished trials plus those started before this one
        (lower numbers: the storage numbers trials atomically) already cover the budget."""
        finished, ahead = self.counts(before=trial.number)
        if finished + ahead >= self.n_trials:
            reason = (
                f"skipped: the budget of {self.n_trials} was already covered by other workers "
                f"({finished} finished, {ahead} running)"
            )
            trial.set_user_attr(trials.SKIPPED, True)
            trial.set_user_attr(trials.FAIL_REASON, reason)
            raise TrialSkipped(reason)

    def room(self) -> bool:
        """Wait until this worker may start a trial (True), or the budget is spent, or the time
        before ``stop_at`` is the retrain's (False)."""
        waiting_since = None
        while True:
            if self.stop_at is not None and self.stop_at.left() <= self.reserve():
                return False  # what is left of the time belongs to the retrain
            recover_stale_trials(self.study, self.url)
            finished, running = self.counts()
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
            other = (t.user_attrs.get(trials.WORKER) or {}).get("host", host)
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
# the deadline: a trial starts only if it can finish, leaving time for the retrain

#: where a job scheduler tells a job when it ends (Slurm: seconds since the epoch)
SLURM_END_ENV = "SLURM_JOB_END_TIME"
#: consecutive trials skipped for the deadline after which the search stops (nothing fits)
DEADLINE_SKIPS_TO_STOP = 3
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Deadline:
    """When the search must be over (seconds since the epoch) and who said so."""

    at: float
    source: str

    def left(self, now: float | None = None) -> float:
        return self.at - (time.time() if now is None else now)

    def iso(self) -> str:
        return datetime.datetime.fromtimestamp(self.at).isoformat(timespec="seconds")


def parse_deadline(text: str, now: float | None = None) -> float:
    """``--deadline``: a date and time (ISO 8601, ``2026-12-01T06:00``, local time unless it
    names its zone), or a duration from now (``90m``, ``2h``, ``1h30m``, ``45s``, or seconds).
    Raises ValueError for anything else."""
    now = time.time() if now is None else now
    text = text.strip()
    body = text.lstrip("+")
    if body and body[0].isdigit() and all(c.isdigit() or c in _UNITS or c == "." for c in body):
        if body.replace(".", "", 1).isdigit():
            return now + float(body)
        seconds, number = 0.0, ""
        for c in body:
            if c in _UNITS:
                if not number:
                    raise ValueError(text)
                seconds += float(number) * _UNITS[c]
                number = ""
            else:
                number += c
        if number:
            raise ValueError(text)
        return now + seconds
    return datetime.datetime.fromisoformat(text).timestamp()


def search_deadline(
    text: str | None, env: dict[str, str] | None = None, now: float | None = None
) -> Deadline | None:
    """The search's deadline: ``--deadline`` and the Slurm job's end (``SLURM_JOB_END_TIME``),
    whichever comes first; None when neither is set. Raises :class:`UserError` for a deadline
    that cannot be read or has passed."""
    from .errors import UserError

    env = os.environ if env is None else env
    now = time.time() if now is None else now
    found = []
    if text:
        try:
            found.append(Deadline(parse_deadline(text, now), "--deadline"))
        except ValueError:
            raise UserError(
                f"--deadline {text!r} is neither a date and time (2026-12-01T06:00) nor a duration "
                "from now (90m, 2h, 1h30m)"
            ) from None
    slurm = env.get(SLURM_END_ENV, "").strip()
    if slurm:
        try:
            found.append(Deadline(float(slurm), SLURM_END_ENV))
        except ValueError:
            log.warning("%s=%r is not a time in seconds; ignored", SLURM_END_ENV, slurm)
    if not found:
        return None
    deadline = min(found, key=lambda d: d.at)
    if deadline.left(now) <= 0:
        raise UserError(
            f"the deadline ({deadline.source}: {deadline.iso()}) has passed "
            f"{-deadline.left(now):.0f} s ago; give a later --deadline (or a duration: 2h)"
        )
    return deadline


#: the environment variable that tells a worker of ``--workers N`` how many workers share
#: the race after the search (N): each runs its share of the race's runs
RACERS_ENV = "AUTOML_TL_RACERS"


def racing_workers(environ=None) -> int:
    """How many workers share the race (:data:`RACERS_ENV`; 1: this process alone)."""
    try:
        return max(1, int((os.environ if environ is None else environ).get(RACERS_ENV, 1)))
    except ValueError:
        return 1


def after_search_reserve(
    study: optuna.Study,
    n_train: int,
    n_retrain: int,
    *,
    race_runs: int = 0,
    n_race: int = 0,
    racers: int = 1,
) -> float:
    """Seconds kept free after the search for the race and the winner's retrain: the
    longest completed trial, scaled from its ``n_train`` training images to the retrain's
    ``n_retrain``, plus the race's ``race_runs`` runs of ``n_race`` images each, in rounds
    of ``racers`` runs side by side."""
    rounds = -(-race_runs // max(1, racers))
    longest = max(
        (
            d
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if (d := trials.duration(t)) is not None
        ),
        default=0.0,
    )
    return longest * (n_retrain + rounds * n_race) / max(1, n_train)


def deadline_skips(study: optuna.Study) -> list[dict[str, Any]]:
    """The trials skipped because they would not have finished before the deadline, with
    the reason (the summary at the end of a search)."""
    return [
        {"number": t.number, "reason": t.user_attrs.get(trials.FAIL_REASON, "")}
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.user_attrs.get(trials.DEADLINE_SKIP)
    ]


# ---------------------------------------------------------------------------------------------
# claims: one worker does a piece of work (a retrain, a race run), and it is taken again when
# its holder is gone


@dataclass
class Claim:
    won: bool
    #: the identity of whoever holds it (this process when ``won``)
    holder: dict[str, Any]
    #: why an earlier holder's claim was taken over (None when it was new or is lost)
    taken_over: str | None = None


def claim_marker(
    study: optuna.Study, name: str, stale: Callable[[dict[str, Any]], str | None]
) -> Claim:
    """Claim the work named ``name``: won by exactly one caller across all workers.

    The claim is a marker study ``name`` in the study's storage: creating a study whose name
    exists fails atomically on every Optuna storage. When it exists, ``stale(attrs)`` (its
    user attributes) says why it may be taken again, or None while it holds; then a second
    marker named after the exact state seen (``name:takeover:<digest>``) decides, atomically
    too, which of the workers that saw that same stale state takes it. The winner's identity
    (with a nonce, so no two claims look alike) is stored as ``claimed_by``; the flags
    ``done`` and ``released`` are reset.
    """
    storage = storage_of(study)
    me = {
        **worker_identity(),
        "at": datetime.datetime.now().isoformat(timespec="seconds"),
        "nonce": secrets.token_hex(6),
    }
    why = None
    try:
        marker = optuna.create_study(study_name=name, storage=storage)
    except optuna.exceptions.DuplicatedStudyError:
        marker = optuna.load_study(study_name=name, storage=storage)
        deadline = time.monotonic() + 5
        while "claimed_by" not in marker.user_attrs and time.monotonic() < deadline:
            time.sleep(0.1)
        attrs = marker.user_attrs
        holder = dict(attrs.get("claimed_by") or {})
        why = stale(attrs)
        if why is None:
            return Claim(False, holder)
        seen = hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()
        try:
            optuna.create_study(study_name=f"{name}:takeover:{seen[:16]}", storage=storage)
        except optuna.exceptions.DuplicatedStudyError:
            return Claim(False, holder)  # another worker saw the same state and took it
    marker.set_user_attr("done", False)
    marker.set_user_attr("released", False)
    marker.set_user_attr("claimed_by", me)
    return Claim(True, me, why)
