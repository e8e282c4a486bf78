"""The trial record: the user attributes a trial carries, which states count as finished, how
long it ran, and one typed summary of a trial that the catalog, the hooks, the progress
display, the leaderboard and the report all read.

Optuna stores a trial's own facts (number, state, value, params, times) and automl-tl adds
user attributes; their names live here, not as string literals in each reader.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

#: the states a trial's budget counts (a failed trial does not use up the budget)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# user attributes, set by the search while a trial runs
WORKER = "worker"  #: {"host", "pid", "started"} of the process running it
DEVICE = "device"  #: the torch device it trained on
EPOCHS_RUN = "epochs_run"  #: epochs finished so far
FAIL_REASON = "fail_reason"  #: one line: why it failed ("interrupted", "out of memory: …")
SKIPPED = "skipped"  #: True: admitted after the budget was covered; trained nothing
SECONDS = "seconds"  #: training seconds of a completed trial
IMAGES_PER_S = "images_per_s"  #: training throughput of the backbone
VAL_METRICS = "val_metrics"  #: every validation metric of the scored epoch
BATCH_SIZE = "batch_size"  #: the batch size it trained with (halved on out-of-memory)
FEATURE_CACHE = "feature_cache"  #: "hit" / "miss" / "used": the head trained on cached features
TOO_SLOW = "too_slow"  #: why it was pruned before training under [search] timeout
BEST_EPOCH = "best_epoch"  #: the epoch (1-based) whose validation score was best
STOPPED_EARLY = "stopped_early"  #: True: no improvement for [search] patience epochs
#: the best epoch's validation log-probabilities (float16, base64; automl_tl.scores.pack)
VAL_LOG_PROBS = "val_log_probs"
DEAD_AT_CHANCE = "dead_at_chance"  #: the epoch the dead-trial guard pruned it at (samplers.py)
WEIGHTS = "weights"  #: its weight source as written, with a local file's short sha256
PRIOR = "prior"  #: where a trial's configuration came from when the team prior chose it

#: attributes that belong to one run of a trial, not to its configuration: a trial queued
#: again (its worker died, it was interrupted) starts without them
RUN_ATTRS = (
    WORKER,
    DEVICE,
    EPOCHS_RUN,
    FAIL_REASON,
    SKIPPED,
    SECONDS,
    IMAGES_PER_S,
    VAL_METRICS,
    BATCH_SIZE,
    FEATURE_CACHE,
    TOO_SLOW,
    BEST_EPOCH,
    STOPPED_EARLY,
    VAL_LOG_PROBS,
    DEAD_AT_CHANCE,
    WEIGHTS,
)


def duration(trial: FrozenTrial) -> float | None:
    """Seconds from start to end of a trial that has ended (None while it runs)."""
    if trial.datetime_complete and trial.datetime_start:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def value_of(trial: FrozenTrial) -> float | None:
    """The trial's score, or None if it has none or it is not finite."""
    value = trial.value if trial.values else None
    return value if value is not None and math.isfinite(value) else None


@dataclass
class TrialSummary:
    """One trial as automl-tl's readers see it (plain data; ``asdict`` gives JSON)."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any] = field(default_factory=dict)
    duration_s: float | None = None
    epochs_run: int | None = None
    fail_reason: str | None = None
    images_per_s: float | None = None
    batch_size: int | None = None
    feature_cache: str | None = None
    device: str | None = None
    #: the weight source it trained from (``[weights]`` as written; a file with its sha256)
    weights: str | None = None
    started: str | None = None
    finished: str | None = None
    #: where the team prior took its configuration from (None: not from the prior)
    prior: str | None = None

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialSummary:
        attrs = trial.user_attrs
        seconds = duration(trial)
        return cls(
            number=trial.number,
            state=trial.state.name,
            value=value_of(trial),
            params=dict(trial.params),
            duration_s=round(seconds, 3) if seconds is not None else None,
            epochs_run=attrs.get(EPOCHS_RUN),
            fail_reason=attrs.get(FAIL_REASON),
            images_per_s=attrs.get(IMAGES_PER_S),
            batch_size=attrs.get(BATCH_SIZE),
            feature_cache=attrs.get(FEATURE_CACHE),
            device=attrs.get(DEVICE),
            weights=attrs.get(WEIGHTS) or trial.params.get("weights"),
            started=_iso(trial.datetime_start),
            finished=_iso(trial.datetime_complete),
            prior=attrs.get(PRIOR),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(value) -> str | None:
    return value.isoformat(timespec="seconds") if value else None
