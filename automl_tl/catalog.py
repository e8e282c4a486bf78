"""The catalog: one SQLite file per study (``catalog.db``) with tables ``trials``, ``epochs``,
``models``, ``races``, ``datasets`` (the data's meta-features, read by automl_tl.prior) and
``skipped_images`` (``benchmarks`` from ``plugins --bench``), written with sqlite-utils so it
can be queried with ``sqlite-utils`` or datasette.

Each write is one transaction, so a kill at any moment leaves the previous good state.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from pathlib import Path
from typing import Any

import sqlite_utils

from ._util import NETWORK_FILESYSTEMS, filesystem_type
from .space import SHOWN_PARAMS, effective_params
from .storage import storage_kind
from .trials import Direction, TrialSummary


def catalog_path(config) -> Path:
    """Where this process writes the study's catalog: ``catalog.db``, or ``catalog-<host>.db``
    when the study folder is on a network filesystem and the storage is a database server
    (several nodes). SQLite's WAL mode, which lets a node's workers write side by side, does
    not work across hosts; one catalog per node does (read them together with datasette, or
    ``sqlite-utils`` + ``ATTACH``)."""
    paths = config.paths
    if storage_kind(config.storage_url) == "rdb" and (
        filesystem_type(paths.root) in NETWORK_FILESYSTEMS
    ):
        return paths.root / f"catalog-{socket.gethostname()}.db"
    return paths.catalog


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


class Catalog:
    """Append-only record of every trial, epoch and exported model of the studies it holds."""

    def __init__(self, path: str | Path | None = None) -> None:
        if path is None:
            self.db = sqlite_utils.Database(memory=True)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite_utils.Database(path)
        self._open_when_free(path is not None)

    def _open_when_free(self, wal: bool) -> None:
        """WAL mode and the tables (idempotent). Workers that start together on one node race
        here, and SQLite answers "database is locked" at once (not after its busy timeout) to
        all but one of them: they try again."""
        import random
        import sqlite3
        import time

        for attempt in range(60):
            try:
                if wal:
                    self.db.enable_wal()
                self._create_tables()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 59:
                    raise
                time.sleep(random.uniform(0.05, 0.25))

    def _write(self, write: Any) -> Any:
        """Run one write; the workers of a node share this file, and one may be adding the
        same new column (``alter=True``) or holding the lock right now: then write again."""
        import random
        import sqlite3
        import time

        for attempt in range(60):
            try:
                return write()
            except sqlite3.OperationalError as exc:
                transient = ("locked", "duplicate column", "has no column named")
                if attempt == 59 or not any(t in str(exc) for t in transient):
                    raise
                time.sleep(random.uniform(0.05, 0.25))

    def _create_tables(self) -> None:
        params = {
            name: (str if name in ("backbone", "weights", "augmentation", "unfreeze") else float)
            for name in SHOWN_PARAMS
        }
        self.db["trials"].create(
            {
                "study": str,
                "number": int,
                "state": str,
                "value": float,
                "metric": str,  # the study's [search] metric, which "value" is
                "direction": str,  # "maximize" / "minimize": which way "value" is better
                **params,
                "params": str,
                "duration_s": float,
                "epochs_run": int,
                "images_per_s": float,
                "device": str,
                "fail_reason": str,
                "started": str,
                "finished": str,
            },
            pk=("study", "number"),
            if_not_exists=True,
        )
        self.db["epochs"].create(
            {
                "study": str,
                "trial": int,
                "epoch": int,
                "train_loss": float,
                "val_accuracy": float,
                "val_balanced_accuracy": float,
                "val_macro_f1": float,
                "lr": float,
                "seconds": float,
                "images_per_s": float,
            },
            pk=("study", "trial", "epoch"),
            if_not_exists=True,
        )
        self.db["models"].create(
            {
                "id": int,
                "study": str,
                "trial": int,
                "path": str,
                "backbone": str,
                "params": str,
                "data_fingerprint": str,
                "val_accuracy": float,
                "metric": str,
                "direction": str,
                "test_accuracy": float,
                "test_balanced_accuracy": float,
                "test_macro_f1": float,
                "task": str,
                "test_map": float,
                "test_micro_f1": float,
                "metrics": str,
                "sha256": str,
                "weights": str,
                "weights_sha256": str,
                "backbone_origin": str,
                "created": str,
            },
            pk="id",
            if_not_exists=True,
        )
        self.db["races"].create(
            {
                "study": str,
                "key": str,
                "finalist": int,
                "repeat": int,
                "fold": int,
                "folds": int,
                "seed": int,
                "value": float,
                "images": int,
                "best_epoch": int,
                "seconds": float,
                "finished": str,
            },
            pk=("study", "key"),
            if_not_exists=True,
        )
        self.db["datasets"].create(
            {
                "study": str,
                "classes": int,
                "images_per_class": float,
                "resolution": int,
                "weights": str,
                **{f"{k}_{c}": float for k in ("mean", "std") for c in "rgb"},
                "recorded": str,
            },
            pk="study",
            if_not_exists=True,
        )
        self.db["skipped_images"].create(
            {"study": str, "path": str, "reason": str},
            pk=("study", "path"),
            if_not_exists=True,
        )

    def record_skipped(self, study: str, skipped: list[tuple[str, str]]) -> None:
        """Replace the study's list of images left out (``[data] on_bad_image = "skip"``)."""
        with self.db.conn:  # one transaction: the old list or the new one, never half
            self.db.execute("delete from skipped_images where study = ?", [study])
            if skipped:
                self.db["skipped_images"].insert_all(
                    ({"study": study, "path": p, "reason": r} for p, r in skipped),
                    pk=("study", "path"),
                    replace=True,
                )

    def record_dataset(self, study: str, features: dict[str, Any]) -> None:
        """The study's dataset meta-features (automl_tl.prior.meta_features), for later priors."""
        row = {"study": study, **features, "recorded": _iso(dt.datetime.now(dt.timezone.utc))}
        self._write(lambda: self.db["datasets"].upsert(row, pk="study", alter=True))

    def dataset(self, study: str) -> dict[str, Any] | None:
        rows = list(self.db["datasets"].rows_where("study = ?", [study]))
        return rows[0] if rows else None

    def skipped(self, study: str) -> list[dict[str, str]]:
        return [
            {"path": row["path"], "reason": row["reason"]}
            for row in self.db["skipped_images"].rows_where("study = ?", [study], order_by="path")
        ]

    def trial_states(self, study: str) -> dict[int, str]:
        """Trial number -> state as recorded here (to find trials the storage has and this lacks)."""
        return {
            row["number"]: row["state"]
            for row in self.db["trials"].rows_where("study = ?", [study], select="number, state")
        }

    def record_race(self, study: str, row: dict[str, Any]) -> None:
        """One finished run of the finalists' race (automl_tl.selection)."""
        row = {"study": study, **row}
        self._write(lambda: self.db["races"].upsert(row, pk=("study", "key"), alter=True))

    def races(self, study: str) -> list[dict[str, Any]]:
        return list(self.db["races"].rows_where("study = ?", [study], order_by="finalist, key"))

    def record_epoch(self, study: str, trial: int, epoch: int, metrics: dict[str, Any]) -> None:
        row = {"study": study, "trial": trial, "epoch": epoch}
        for key in ("train_loss", "lr", "seconds", "images_per_s"):
            row[key] = metrics.get(key)
        for key, value in (metrics.get("val") or {}).items():
            if not isinstance(value, (list, dict)):  # per-label lists stay in the trial
                row[f"val_{key}"] = value
        self._write(
            lambda: self.db["epochs"].upsert(row, pk=("study", "trial", "epoch"), alter=True)
        )

    def record_trial(
        self, study: str, trial: Any, metric: str | None = None, direction: Direction | None = None
    ) -> None:
        """Record an Optuna FrozenTrial (any state); ``value`` is ``metric``'s, better
        higher or lower as ``direction`` (a :class:`automl_tl.trials.Direction`) says."""
        s = TrialSummary.of(trial)
        row = {
            "study": study,
            "number": s.number,
            "state": s.state,
            "value": s.value,
            "metric": metric,
            "direction": direction.name if direction is not None else None,
            # one column per parameter in its shown form; the stored names are in "params"
            **dict(zip(SHOWN_PARAMS, map(effective_params(s.params).get, SHOWN_PARAMS))),
            "weights": s.weights,  # resolved: fixed sources too, a file with its sha256
            "params": json.dumps(s.params, sort_keys=True),
            "duration_s": s.duration_s,
            "epochs_run": s.epochs_run,
            "images_per_s": s.images_per_s,
            "batch_size": s.batch_size,  # after out-of-memory halving
            "feature_cache": s.feature_cache,  # head on cached features
            "device": s.device,
            "fail_reason": s.fail_reason,
            "started": s.started,
            "finished": s.finished,
            "prior": s.prior,  # from the team prior (automl_tl.prior): where from
        }
        self._write(lambda: self.db["trials"].upsert(row, pk=("study", "number"), alter=True))

    def record_model(
        self,
        study: str,
        trial: int,
        path: Path,
        backbone: str,
        params: dict[str, Any],
        data_fingerprint: str,
        metrics: dict[str, Any],
        sha256: str,
    ) -> int:
        test = metrics.get("test", {})
        weights = metrics.get("weights") or {}
        origin = metrics.get("backbone_origin")
        row = {
            "study": study,
            "trial": trial,
            "path": str(path),
            "backbone": backbone,
            "params": json.dumps(params, sort_keys=True),
            "data_fingerprint": data_fingerprint,
            "val_accuracy": (metrics.get("val") or {}).get("accuracy"),
            "metric": metrics.get("metric"),  # the study's; "direction": which way is better
            "direction": metrics.get("direction"),
            "test_accuracy": test.get("accuracy"),
            "test_balanced_accuracy": test.get("balanced_accuracy"),
            "test_macro_f1": test.get("macro_f1"),
            # the task kind, and a multi-label model's own headline metrics
            "task": metrics.get("task", "multiclass"),
            "test_map": test.get("map"),
            "test_micro_f1": test.get("micro_f1"),
            "metrics": json.dumps(metrics, sort_keys=True),
            "sha256": sha256,
            "weights": weights.get("source"),
            "weights_sha256": weights.get("sha256"),
            "backbone_origin": json.dumps(origin, sort_keys=True) if origin else None,
            "created": _iso(dt.datetime.now(dt.timezone.utc)),
        }
        return self._write(lambda: self.db["models"].insert(row, alter=True).last_pk)
