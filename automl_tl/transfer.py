"""Deprecated: the weight source as a compared parameter moved to :mod:`automl_tl.samplers`
(``AlternatingSampler``), :mod:`automl_tl.leaderboard` (the comparison) and
:mod:`automl_tl.retrain` (``retrain_per_weights``). These names stay importable from here for
one release (0.2); import them from their new modules.
"""

from __future__ import annotations

from .leaderboard import best_by_weights, comparison, weights_label
from .retrain import retrain_per_weights
from .samplers import AlternatingSampler, alternate_weights

__all__ = [
    "AlternatingSampler",
    "alternate_weights",
    "best_by_weights",
    "comparison",
    "retrain_per_weights",
    "weights_label",
]
