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

from optuna.study import StudyDirection
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
BATCH_SIZE = "batch_size"  #: the batch size it trained with (kept on out-of-memory)
FEATURE_CACHE = "feature_cache"  #: "hit" / "miss" / "used": the head trained on cached features
TOO_SLOW = "too_slow"  #: why it was pruned before training under [search] timeout
DEADLINE_SKIP = "deadline_skip"  #: True: not started, it would not finish before --deadline
COMPILED = "compiled"  #: "yes" or why the model ran eagerly under [search] compile = true
ACCUMULATION = "accumulation"  #: micro-batches per step after out-of-memory (1: none)
BEST_EPOCH = "best_epoch"  #: the epoch (1-based) whose validation score was best
STOPPED_EARLY = "stopped_early"  #: True: no improvement for [search] patience epochs
#: the best epoch's validation log-probabilities (float16, base64; automl_tl.scores.pack)
VAL_LOG_PROBS = "val_log_probs"
DEAD_AT_CHANCE = "dead_at_chance"  #: the epoch the dead-trial guard pruned it at (samplers.py)
WEIGHTS = "weights"  #: its weight source as written, with a local file's short sha256
PRIOR = "prior"  #: where a trial's configuration came from when the team prior chose it
#: {latency_ms, params_m, model_mb} measured on the trained model (multi-objective studies)
MEASURED = "measured"
#: Optuna's constraint values of ``[search] constraints`` (<= 0: satisfied)
CONSTRAINTS = "constraints"

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
    DEADLINE_SKIP,
    COMPILED,
    ACCUMULATION,
    BEST_EPOCH,
    STOPPED_EARLY,
    VAL_LOG_PROBS,
    DEAD_AT_CHANCE,
    WEIGHTS,
    MEASURED,
    CONSTRAINTS,
)


def duration(trial: FrozenTrial) -> float | None:
    """Seconds from start to end of a trial that has ended (None while it runs)."""
    if trial.datetime_complete and trial.datetime_start:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def value_of(trial: FrozenTrial) -> float | None:
    """The trial's score (its metric: the first objective of a multi-objective study), or
    None if it has none or it is not finite."""
    value = trial.values[0] if trial.values else None
    return value if value is not None and math.isfinite(value) else None


def trial_constraints(trial: FrozenTrial) -> list[float]:
    """The ``constraints_func`` of a study with ``[search] constraints``: the values the
    search stored (<= 0 each when satisfied); a trial without them counts as infeasible."""
    return list(trial.user_attrs.get(CONSTRAINTS) or [1.0])


def feasible(trial: FrozenTrial) -> bool:
    """Every ``[search] constraint`` holds (true when the study has none)."""
    values = trial.user_attrs.get(CONSTRAINTS)
    return values is None or all(v <= 0 for v in values)


def best_trial(study: Any) -> FrozenTrial:
    """The study's best complete trial: Optuna's ``best_trial`` for one objective; for
    several, the feasible trial with the best metric (the first objective), ties going to
    lower measures, then the earlier trial. ValueError when there is none."""
    if len(study.directions) == 1:
        return study.best_trial
    direction = Direction.of(study)
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if value_of(t) is not None and feasible(t)
    ]
    if not complete:
        raise ValueError("no feasible complete trial")
    return min(complete, key=lambda t: (direction.key(value_of(t)), *t.values[1:], t.number))


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


# ---------------------------------------------------------------------------------------------
# which way is better


#: the study's user attribute describing its metric (``Direction.record``)
STUDY_METRIC = "metric"


@dataclass(frozen=True)
class Direction:
    """Which way the study's metric is better, and the range it lies in: the one place that
    decides which of two scores wins (sorting, the best trial, finalists, the race, ensembles,
    soups, the leaderboard). A plugin metric declares it (``Metric.higher_is_better``,
    ``Metric.range``); the study stores it (:meth:`record`) and readers take it from there
    (:meth:`of`), so nothing downstream assumes that higher is better.

    Example::

        d = Direction(higher_is_better=False)
        d.better(0.1, 0.3)                # True
        sorted([0.3, 0.1], key=d.key)    # [0.1, 0.3]: best first
    """

    higher_is_better: bool = True
    #: the values the metric can take (a binomial standard error is computed on this span)
    range: tuple[float, float] = (0.0, 1.0)

    @property
    def name(self) -> str:
        """``"maximize"`` or ``"minimize"`` (Optuna's word)."""
        return "maximize" if self.higher_is_better else "minimize"

    @property
    def sign(self) -> float:
        """+1 when higher is better, -1 when lower is: ``sign * value`` is to be maximized."""
        return 1.0 if self.higher_is_better else -1.0

    @property
    def worst(self) -> float:
        return -math.inf if self.higher_is_better else math.inf

    def key(self, value: float | None) -> float:
        """A sort key that puts the best value first (None and NaN last)."""
        if value is None or not math.isfinite(value):
            return math.inf
        return -value if self.higher_is_better else value

    def better(self, a: float | None, b: float | None) -> bool:
        """``a`` is strictly better than ``b`` (a missing score is worse than any)."""
        return self.key(a) < self.key(b)

    def best(self, values):
        """The best of ``values`` (the first of equals)."""
        return min(values, key=self.key)

    def within(self, value: float, best: float, margin: float) -> bool:
        """``value`` is no more than ``margin`` worse than ``best``."""
        return self.sign * (best - value) <= margin + 1e-12

    def pessimistic(self, mean: float, error: float) -> float:
        """The mean one standard error towards worse (the race's ``lcb`` rule)."""
        return mean - self.sign * error

    def record(self, name: str) -> dict[str, Any]:
        """What a study stores about its metric (user attribute :data:`STUDY_METRIC`)."""
        return {"name": name, "direction": self.name, "range": list(self.range)}

    @classmethod
    def of(cls, study: Any) -> Direction:
        """The direction of ``study``'s (first) objective, with the range it recorded."""
        stored = (getattr(study, "user_attrs", None) or {}).get(STUDY_METRIC) or {}
        span = stored.get("range") or (0.0, 1.0)
        return cls(study.directions[0] != StudyDirection.MINIMIZE, (float(span[0]), float(span[1])))

    @classmethod
    def named(cls, name: str | None) -> Direction:
        """``"maximize"`` / ``"minimize"`` (as a leaderboard or metrics.json writes it)."""
        return cls(name != "minimize")


MAXIMIZE = Direction(True)
MINIMIZE = Direction(False)


def _iso(value) -> str | None:
    return value.isoformat(timespec="seconds") if value else None
