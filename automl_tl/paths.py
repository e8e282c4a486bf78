"""The study folder's layout, in one place: ``StudyPaths(config.output_dir)``.

::

    <output>/
      optuna.db             the study (SQLite; the default storage for one process)
      optuna-journal.log    ... or Optuna's journal file (several processes on one node)
      catalog.db            every trial, epoch and exported model (sqlite-utils)
      cache/                decoded images (uint8, one file per source and size)
      pretrained/           ``pretrain:SOURCE`` weights, ``<backbone>--<source>.safetensors``
      best/                 the retrained best model (timm local-dir format + metrics.json)
      models/trial-N/       any other retrained trial
      ensemble/             the ensemble of the finalists (ensemble.json + members/)
      soup/                 the greedy weight soup of the finalists (one model)
      selection.json        the race and single / ensemble / soup scored on test
      report/               figures and index.html
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

JOURNAL_FILE = "optuna-journal.log"


@dataclass(frozen=True)
class StudyPaths:
    root: Path

    @property
    def sqlite(self) -> Path:
        return self.root / "optuna.db"

    @property
    def journal(self) -> Path:
        return self.root / JOURNAL_FILE

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.db"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def pretrained(self) -> Path:
        return self.root / "pretrained"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def ensemble(self) -> Path:
        return self.root / "ensemble"

    @property
    def soup(self) -> Path:
        return self.root / "soup"

    @property
    def selection(self) -> Path:
        return self.root / "selection.json"

    @property
    def prior(self) -> Path:
        return self.root / "prior.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def model(self, trial_number: int | None) -> Path:
        """Where a retrained trial goes: ``best/`` for the best (None), else ``models/trial-N``."""
        if trial_number is None:
            return self.best
        return self.root / "models" / f"trial-{trial_number}"

    def pretrained_weights(self, backbone: str, source: str) -> Path:
        """Where ``pretrain:SOURCE`` weights of ``backbone`` are kept."""
        slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in source)
        return self.pretrained / f"{backbone}--{slug}.safetensors"


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and check a file can be written there, before hours of work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(
            f"output folder {folder} is not writable ({exc.strerror or exc}); set [search] "
            "output to a folder you can write to, or fix its permissions"
        ) from exc
