"""Optuna storages: which kind a URL is, opening it, opening a study in it, and hiding its
password wherever a URL is shown.

- **Kinds** — SQLite (``sqlite:///…``) for one process; Optuna's journal file
  (``journal:PATH``) for several processes on one node; a database server
  (``postgresql://…``, ``mysql://…``, "rdb") for several nodes, with Optuna's heartbeats so a
  killed worker's trial is failed and queued again (the callback comes from
  :mod:`automl_tl.budget`).
- **Opening a study** — :func:`open_study` loads an existing study read-only (no sampler or
  pruner of the search, so reading it warns about nothing a search would);
  :func:`join_study` creates or loads it for a search and checks this worker's data against
  the identity stored on it.
- **Secrets** — :func:`redact` shows a URL without its password, whatever form the password
  takes (``user:password@``, ``?password=``); :func:`scrub` hides passwords in any text (log
  records, error messages). Worker processes get the URL in their environment, never on
  their command line.

The only uses of Optuna's private storage API (``study._storage``, ``trial._trial_id``) are
here, behind :func:`set_trial_attr` and :func:`fail_trial`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import random
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._util import node_lock
from .config import StudyConfig, sqlite_path
from .data import describe_changes
from .errors import ConfigError, DataError, UserError
from .trials import MAXIMIZE, STUDY_METRIC, Direction

log = logging.getLogger("automl_tl")

#: the environment variable a worker process reads its storage URL from (not its argv)
STORAGE_ENV = "AUTOML_TL_STORAGE"


def storage_kind(url: str) -> str:
    """``"sqlite"``, ``"journal"`` or ``"rdb"`` (a database server)."""
    if url.startswith("journal:"):
        return "journal"
    if url.startswith("sqlite:"):
        return "sqlite"
    return "rdb"


def journal_path(url: str) -> Path:
    return Path(url[len("journal:") :]).expanduser()


# ---------------------------------------------------------------------------------------------
# passwords


#: ``scheme://user:PASSWORD@``: the password runs to the last ``@`` before the host
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s:/@]*:)(\S*)@(?=[^\s@]*$|[^\s@]*\s)")
#: ``?password=…`` / ``&passwd=…`` in a query string
_QUERY = re.compile(r"([?&](?:password|passwd|pwd|pass)=)[^&\s#]*", re.IGNORECASE)


def _userinfo_password(url: str) -> str | None:
    """The password of ``scheme://user:PASSWORD@host…`` as written: everything between the
    first ``:`` of the user info and the last ``@`` before the query (a password written
    raw may hold ``/``, ``@`` or spaces, which ``urlsplit`` would cut at)."""
    start = url.find("://")
    if start < 0:
        return None
    authority = url[start + 3 :].split("?", 1)[0]
    userinfo, at, _ = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return None
    return userinfo.split(":", 1)[1] or None


def _secrets(url: str) -> list[str]:
    """The password(s) a URL carries, in any form (as written and percent-decoded)."""
    from urllib.parse import unquote_plus

    found = []
    raw = _userinfo_password(url)
    if raw:
        found += [raw, unquote_plus(raw)]
    query = url.split("?", 1)[1] if "?" in url else ""
    for piece in query.split("&"):
        key, _, value = piece.partition("=")
        if key.lower() in ("password", "passwd", "pwd", "pass") and value:
            found += [value, unquote_plus(value)]
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, *urls: str) -> str:
    """``text`` with every URL password hidden (``postgresql://user:***@host/db``,
    ``?password=***``); the passwords of ``urls`` are hidden wherever they appear (a driver
    may repeat one in its error message)."""
    for url in urls:
        for secret in _secrets(url):
            text = text.replace(secret, "***")
    text = _USERINFO.sub(r"\1***@", text)
    return _QUERY.sub(r"\1***", text)


def redact(url: str) -> str:
    """A storage URL with its password hidden, for logs and messages."""
    return scrub(url, url)


class RedactFilter(logging.Filter):
    """A logging filter that scrubs passwords from every record it sees (the command line
    puts it on automl-tl's and Optuna's handlers)."""

    def __init__(self, *urls: str) -> None:
        super().__init__()
        self.urls = list(urls)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message, *self.urls)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def url_to_env(url: str) -> tuple[str | None, dict[str, str]]:
    """How a worker process gets ``url``: not on its command line (``ps`` shows every
    user's argv) but in its environment (:data:`STORAGE_ENV`), which only its own user sees."""
    if not url or storage_kind(url) != "rdb" or not _secrets(url):
        return url, {}
    return None, {STORAGE_ENV: url}


# ---------------------------------------------------------------------------------------------
# opening


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """The Optuna storage for ``url`` (see :func:`storage_kind`); errors never show a password.

    A database server gets heartbeats every ``heartbeat_interval`` seconds (grace period
    twice that) when given; ``on_stale`` is then called for a trial whose worker stopped
    beating (e.g. :class:`automl_tl.budget.RetryStaleTrial`, which queues it again).
    """
    kind = storage_kind(url)
    try:
        if kind == "journal":
            from optuna.storages.journal import JournalFileBackend

            path = journal_path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if kind == "sqlite":
            if url.startswith("sqlite:///"):  # the path is percent-quoted (config.sqlite_url)
                sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(url)
        kwargs: dict[str, Any] = {}
        if heartbeat_interval:
            params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
            callback_arg = (
                "heartbeat_stale_trial_callback"
                if "heartbeat_stale_trial_callback" in params
                else "failed_trial_callback"
            )
            kwargs = {
                "heartbeat_interval": heartbeat_interval,
                "grace_period": 2 * heartbeat_interval,
                callback_arg: on_stale,
            }
        return _first_come(
            lambda: optuna.storages.RDBStorage(
                with_driver(url),
                # two connections per worker in use (main thread + heartbeat thread)
                engine_kwargs={"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2},
                **kwargs,
            )
        )
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            scrub(f"cannot open storage {redact(url)}: {type(exc).__name__}: {text}", url)
        ) from exc


def _first_come(open_rdb: Callable[[], optuna.storages.RDBStorage]) -> optuna.storages.RDBStorage:
    """Open an RDB storage; workers that start together on an empty database race to create
    Optuna's tables, and the losers see "already exists": they try again, finding them."""
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


def with_driver(url: str) -> str:
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


def storage_for_workers(config: StudyConfig, workers: int) -> str:
    """The storage URL ``workers`` local processes share; SQLite with several is refused."""
    url = config.search.storage
    if url and storage_kind(url) == "journal":
        return f"journal:{journal_path(url).resolve()}"
    if url and storage_kind(url) != "sqlite":
        return url
    paths = config.paths
    if workers > 1:
        if url:
            where = redact(url)
        elif paths.sqlite.exists() and not paths.journal.exists():
            where = f"{paths.sqlite} (this study's SQLite storage)"
        else:
            return f"journal:{paths.journal.resolve()}"
        raise UserError(
            f"--workers {workers} cannot share {where}: SQLite serves one process (Optuna's FAQ: "
            "concurrent writers get 'database is locked'). Use Optuna's journal file for several "
            "workers on one node (--storage journal:PATH; the default with --workers > 1 when "
            "the study has no SQLite storage yet), or a database server for several nodes "
            "(--storage postgresql://user@host/db or mysql://…), or run --workers 1."
        )
    return url or config.storage_url


@contextlib.contextmanager
def one_search_per_sqlite(url: str) -> Iterator[None]:
    """While a search runs on a SQLite storage, a second one on the same file is refused at
    once (SQLite serves one writer; the second would fail mid-trial with "database is
    locked"). Other storages take any number of workers."""
    if storage_kind(url) != "sqlite" or not url.startswith("sqlite:///"):
        yield
        return
    db = sqlite_path(url)
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        with node_lock(db.with_name(f".{db.name}.search.lock"), block=False):
            yield
    except BlockingIOError:
        raise UserError(
            f"another search is running on {db} (SQLite serves one process at a time); wait "
            "for it to finish, or run several workers on one study with --workers N (Optuna's "
            "journal file) or --storage postgresql://… for several nodes"
        ) from None


def open_study(config: StudyConfig, **kwargs: Any) -> optuna.Study:
    """The study of ``config``, read-only: for reports, retrains and live progress.

    ``kwargs`` go to :func:`optuna.load_study` (a ``sampler`` or ``pruner``); none by
    default, so reading never builds the search's sampler or warns as the search would.
    """
    storage = open_storage(config.storage_url)
    try:
        return optuna.load_study(study_name=config.name, storage=storage, **kwargs)
    except KeyError as exc:
        raise UserError(
            f"no study named {config.name!r} in {redact(config.storage_url)}; run `automl-tl search` first"
        ) from exc


def check_data(study: optuna.Study, splits) -> None:
    """Store the data identity (:meth:`automl_tl.data.Splits.summary`) on a new study;
    refuse data that differs from a stored one."""
    summary = splits.summary()
    stored = study.user_attrs.get("data")
    if stored is None:
        study.set_user_attr("data", summary)
        return
    changes = describe_changes(stored, summary)
    if changes:
        raise DataError(
            f"the data no longer matches study {study.study_name!r}: "
            + "; ".join(changes)
            + ". Restore the original data, or give the study a new name to start over."
        )


def check_direction(study: optuna.Study, metric: str, direction: Direction) -> None:
    """Refuse to search ``study`` by ``metric`` when it was created for the other direction
    (Optuna fixes a study's direction when it is created)."""
    stored = Direction.of(study)
    if stored.higher_is_better == direction.higher_is_better:
        return
    was = (study.user_attrs.get(STUDY_METRIC) or {}).get("name")
    raise ConfigError(
        f"[search] metric = {metric!r} is {_better_word(direction)}, but study "
        f"{study.study_name!r} was created to {stored.name}"
        + (f" {was!r}" if was else "")
        + f" ({_better_word(stored)}); "
        "a study keeps its direction: give the study a new name, or search it by a metric "
        f"that is {_better_word(stored)}"
    )


def check_objectives(study: optuna.Study, config: StudyConfig) -> None:
    """Refuse to search ``study`` by other ``[search] objectives`` than it was created with
    (Optuna fixes the number of objectives when a study is created)."""
    had = (study.user_attrs.get(STUDY_METRIC) or {}).get("measures") or []
    wanted = config.search.measures
    if len(study.directions) - 1 == len(wanted) and (not had or had == wanted):
        return
    was = [config.search.metric, *had] if had else f"{len(study.directions)} objective(s)"
    raise ConfigError(
        f"[search] objectives = {[config.search.metric, *wanted]!r}, but study "
        f"{study.study_name!r} was created with {was!r}; a study keeps its objectives: give "
        "the study a new name, or search it with the objectives it has"
    )


def check_existing_direction(config: StudyConfig, direction: Direction) -> None:
    """:func:`check_direction` on the study if it exists already, before any data is loaded
    (a search refused after minutes of decoding images helps no one)."""
    try:
        study = optuna.load_study(study_name=config.name, storage=open_storage(config.storage_url))
    except KeyError:
        return
    check_direction(study, config.search.metric, direction)
    check_objectives(study, config)


def _better_word(direction: Direction) -> str:
    return "higher-is-better" if direction.higher_is_better else "lower-is-better"


def join_study(
    config: StudyConfig,
    splits,
    *,
    storage: optuna.storages.BaseStorage,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    direction: Direction = MAXIMIZE,
) -> optuna.Study:
    """Create or load the study for a search; store the data identity on a new one, verify it
    otherwise.

    Exactly one worker creates the study (the storage refuses a duplicate name) and stores the
    data fingerprint; every other one waits for it and refuses to join if its data differ.
    A new study optimizes in ``direction`` (``[search] metric``'s, and records the metric),
    and minimizes each measure of ``[search] objectives`` after it (a multi-objective study);
    an existing study made for the other direction or other objectives is refused.
    """
    if storage_kind(config.storage_url) != "sqlite":
        # Workers seeded alike would sample the same configurations side by side; each trial
        # still trains with seed + its number, so the trials themselves stay reproducible.
        sampler.reseed_rng()
    kwargs = {"study_name": config.name, "storage": storage, "sampler": sampler, "pruner": pruner}
    try:
        measures = config.search.measures
        study = optuna.create_study(
            directions=[direction.name, *["minimize"] * len(measures)], **kwargs
        )
        record = direction.record(config.search.metric)
        study.set_user_attr(STUDY_METRIC, {**record, "measures": measures})
        check_data(study, splits)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
    check_direction(study, config.search.metric, direction)
    check_objectives(study, config)
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
# Optuna's private storage API, used here only


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage object (Optuna has no public accessor; ``fail_stale_trials`` and
    the retry callbacks use the same attribute)."""
    return study._storage


def set_trial_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Set a user attribute of a trial this process does not hold an ``optuna.Trial`` for."""
    storage_of(study).set_trial_user_attr(trial._trial_id, key, value)


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> FrozenTrial | None:
    """Mark a RUNNING trial FAIL with ``reason``; the trial as stored after, or None when
    another worker changed its state first (the storage lets exactly one do it)."""
    storage = storage_of(study)
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    return storage.get_trial(trial._trial_id)
