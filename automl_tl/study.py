"""Deprecated: the search moved to :mod:`automl_tl.search`, storages to
:mod:`automl_tl.storage`, samplers to :mod:`automl_tl.samplers`, the retrain to
:mod:`automl_tl.retrain` and the leaderboard to :mod:`automl_tl.leaderboard`.

These names stay importable from here for one release (0.2) so plugins and scripts written
against 0.1 keep working; import them from their new modules.
"""

from __future__ import annotations

from .data import load_splits
from .leaderboard import backbone_throughput, best_summary, count_finished, selection_note
from .leaderboard import leaderboard as report
from .retrain import retrain
from .samplers import make_pruner, make_sampler
from .search import (
    Objective,
    SearchOutcome,
    TooManyFailures,
    TrialFailed,
    check_backbones_run,
    check_names,
    search,
)
from .storage import check_data, open_study, redact
from .trials import FINISHED

__all__ = [
    "FINISHED",
    "Objective",
    "SearchOutcome",
    "TooManyFailures",
    "TrialFailed",
    "backbone_throughput",
    "best_summary",
    "check_backbones_run",
    "check_data",
    "check_names",
    "count_finished",
    "load_splits",
    "make_pruner",
    "make_sampler",
    "open_study",
    "redact",
    "report",
    "retrain",
    "search",
    "selection_note",
]
