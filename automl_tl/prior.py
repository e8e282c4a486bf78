"""A team prior: what earlier studies learned, as the start of a new one.

``[search] prior = ["studies/*/catalog.db", "postgresql://…"]`` names catalogs of earlier
studies (file patterns, resolved against the study file's folder) or a shared catalog database.
Every search records its dataset's meta-features (:func:`meta_features`: classes, labelled
images per class, resolution, weight source, channel means and deviations) in its catalog's
``datasets`` table; ``automl-tl plugins --bench`` does the same for its suite's tasks, beside
its ``benchmarks`` rows. From them the prior

1. reads each earlier task: its meta-features and its completed configurations with their
   scores and seconds (:func:`read_tasks`; a ``benchmarks`` row is a configuration too: the
   bench recipe with that backbone, so a benchmarked backbone is ranked like any other);
2. weighs each task by how close its meta-features are to the new dataset's
   (:func:`task_weights`: ``exp(-distance / TEMPERATURE)``); with at least
   :data:`CHOOSE_NEIGHBOURS_FROM` earlier tasks, only the *k* nearest count, *k* chosen by
   leave-one-out over the earlier tasks themselves (:func:`choose_neighbours`: which *k*'s
   portfolio would have served each of them best), as Feurer et al. (AAAI 2015) start a
   search from the nearest datasets' best configurations: far tasks no longer dilute the
   near ones as a team's history grows;
3. scores each candidate (the best few configurations of every task, those the new study's
   space allows) on every task: the score, normalised to [0, 1] within the task, of that
   task's nearest evaluated configuration (:func:`config_distance`); a task that never
   tried anything close (:data:`MATCH_RADIUS`) counts as its mean;
4. builds a portfolio greedily (Auto-sklearn 2.0, Quick-Tune's zero-shot start): each step
   adds the candidate that most raises the weighted sum over tasks of the portfolio's best
   normalised score; under ``[search] timeout`` the gain per expected second
   (:func:`build_prior`, ``per_second``).

The portfolio's configurations are the new study's first trials (``samplers.PriorSampler``;
the trial attribute ``prior`` says where each came from), and TPE models from them at once
instead of after random start-up trials. Without ``[search] prior`` nothing here runs.

A pattern that matches no file, or a file that is no catalog (no ``trials`` table with the
columns read here), is a :class:`PriorError` (exit 2). A shared catalog that cannot be reached
is a warning: the search runs without the prior.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
import torch

from ._util import write_atomic
from .config import StudyConfig
from .data import Splits
from .errors import UserError
from .space import FINETUNE_LR, STRATEGY_OPTIONS, effective_params, is_scratch, lr_dimension
from .storage import scrub, with_driver

log = logging.getLogger("automl_tl")

#: the meta-features a dataset is described by (a catalog's ``datasets`` table)
META_FEATURES = (
    "classes",
    "images_per_class",
    "resolution",
    "weights",
    "mean_r",
    "mean_g",
    "mean_b",
    "std_r",
    "std_g",
    "std_b",
)
#: the columns of ``trials`` the prior reads: a catalog without them is from another schema
TRIAL_COLUMNS = ("study", "number", "state", "value", "params", "duration_s")
#: a task's weight in the prior: exp(-distance / TEMPERATURE) (distances: :func:`task_distance`)
TEMPERATURE = 0.25
#: a task's nearest configuration further than this from a candidate says nothing about it
MATCH_RADIUS = 1.0
#: the best configurations of each earlier task that become candidates
PER_TASK = 5
#: with this many earlier tasks or more, the portfolio is built from the k nearest only, k
#: chosen by leave-one-out among NEIGHBOUR_CHOICES (and all); with fewer, leave-one-out has
#: too few folds to choose by, and every task counts (benchmarks/RESULTS.md: on the search
#: table it helped at 6 and 11 earlier tasks and hurt at 5)
CHOOSE_NEIGHBOURS_FROM = 8
NEIGHBOUR_CHOICES = (1, 2, 3, 5, 8)
#: leave-one-out holds out at most this many earlier tasks, those nearest the new dataset (a
#: bound on its cost, which grows with the square of a team's history)
MAX_FOLDS = 30
#: the configuration ``plugins --bench`` trains every backbone with (automl_tl.bench.RECIPE)
BENCH_PARAMS = {
    "augmentation": "none",
    "aug_strength": 0.0,
    "unfreeze": "top_k",
    "unfreeze_depth": 1.0,
    "lr": 3e-3,
    "weight_decay": 1e-4,
}


class PriorError(UserError):
    """``[search] prior`` names something that is not a catalog automl-tl can read."""


def meta_features(splits: Splits, weights: str) -> dict[str, Any]:
    """What the prior matches datasets by: classes, labelled (train + val) images per class,
    resolution, where the weights come from (``[weights]`` as written: ``none`` is random
    init) and the training images' channel means and standard deviations (in [0, 1])."""
    x = splits.train.x
    take = min(len(splits.train), 2048)  # a sample: the statistics of a large split are stable
    sample = torch.as_tensor(x[:take] if isinstance(x, torch.Tensor) else x[torch.arange(take)])
    pixels = sample.float().div_(255).permute(1, 0, 2, 3).reshape(3, -1)
    mean, std = pixels.mean(1).tolist(), pixels.std(1).tolist()
    classes = len(splits.class_names)
    return {
        "classes": classes,
        "images_per_class": round((len(splits.train) + len(splits.val)) / max(1, classes), 2),
        "resolution": int(splits.image_size),
        "weights": weights,
        **{f"mean_{c}": round(m, 4) for c, m in zip("rgb", mean)},
        **{f"std_{c}": round(s, 4) for c, s in zip("rgb", std)},
    }


def study_weights(config) -> str:
    """A study's ``[weights]`` in one string, as :func:`meta_features` records it."""
    entries = []
    for backbone in config.search.backbones:
        value = config.weights_entry(backbone)
        for v in value if isinstance(value, list) else [value]:
            if v not in entries:
                entries.append(v)
    return ",".join(entries)


def _pretrained(weights: str | None) -> float:
    """The share of a ``weights`` string's sources that are not random init."""
    sources = [w for w in (weights or "none").split(",") if w]
    return sum(w != "none" for w in sources) / max(1, len(sources))


def task_distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """How far two datasets' meta-features lie apart (0: alike). Each term is scaled so that
    an order of magnitude counts about as much as a different weight source: classes and
    images per class on a log10 scale, resolution on log2 / 4, channel means and deviations as
    they are (in [0, 1]), colour (the spread of the channel means), pretrained or not."""

    def logs(key, base, scale=1.0):
        return (math.log(max(a[key], 1e-9), base) - math.log(max(b[key], 1e-9), base)) / scale

    def colour(f):
        means = [f["mean_r"], f["mean_g"], f["mean_b"]]
        return max(means) - min(means)

    terms = [
        logs("classes", 10),
        logs("images_per_class", 10),
        logs("resolution", 2, 4.0),
        *(a[k] - b[k] for k in ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b")),
        2 * (colour(a) - colour(b)),
        _pretrained(a.get("weights")) - _pretrained(b.get("weights")),
        0.25 * (a.get("weights") != b.get("weights")),
    ]
    return math.sqrt(sum(t * t for t in terms))


def config_distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """How far two configurations (effective params) lie apart: 1 per differing backbone,
    policy or strategy; lr over two decades, weight decay over four, strength and depth as
    they are."""

    def log_gap(key, decades):
        x, y = a.get(key), b.get(key)
        if not x or not y:
            return 0.0
        return abs(math.log10(x) - math.log10(y)) / decades

    d = sum(float(a.get(k) != b.get(k)) for k in ("backbone", "augmentation", "unfreeze"))
    d += abs(float(a.get("aug_strength") or 0) - float(b.get("aug_strength") or 0))
    d += abs(float(a.get("unfreeze_depth", 1.0)) - float(b.get("unfreeze_depth", 1.0)))
    return d + log_gap("lr", 2.0) + log_gap("weight_decay", 4.0)


@dataclass
class Evaluation:
    """One configuration an earlier task tried: effective params, its score and seconds."""

    params: dict[str, Any]
    score: float
    seconds: float | None = None


@dataclass
class Task:
    """An earlier study (or a bench task) as the prior sees it."""

    name: str
    origin: str  # the catalog it came from (a URL without its password)
    features: dict[str, Any]
    evaluations: list[Evaluation] = field(default_factory=list)

    def normalised(self, score: float) -> float:
        scores = [e.score for e in self.evaluations]
        lo, hi = min(scores), max(scores)
        return 0.5 if hi <= lo else (score - lo) / (hi - lo)

    def predict(self, params: dict[str, Any]) -> tuple[float, float | None]:
        """(normalised score, seconds) of ``params`` here: its nearest evaluated
        configuration's, or the task's mean (and no seconds) when none is near."""
        best = min(self.evaluations, key=lambda e: config_distance(params, e.params))
        if config_distance(params, best.params) > MATCH_RADIUS:
            mean = sum(self.normalised(e.score) for e in self.evaluations) / len(self.evaluations)
            return mean, None
        return self.normalised(best.score), best.seconds


# ---------------------------------------------------------------------------------------------
# reading catalogs


def _is_url(entry: str) -> bool:
    return "://" in entry


def expand_sources(entries: list[str], base_dir: Path) -> list[str]:
    """File patterns resolved against ``base_dir`` and expanded (sorted); URLs as they are.
    A pattern that matches no file is a :class:`PriorError`."""
    out: list[str] = []
    for entry in entries:
        if _is_url(entry):
            out.append(entry)
            continue
        pattern = Path(entry).expanduser()
        pattern = pattern if pattern.is_absolute() else base_dir / pattern
        matches = sorted(p for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
        if not matches:
            raise PriorError(
                f"[search] prior: {entry!r} matches no catalog file (looked for {pattern}); "
                'list the catalog.db of earlier studies (e.g. "studies/*/catalog.db") or a '
                "shared catalog URL, or remove the entry"
            )
        out.extend(m for m in matches if m not in out)
    return out


def _engine(source: str) -> sqlalchemy.Engine:
    if _is_url(source):
        args = {"connect_timeout": 5} if source.startswith("postgresql") else {}
        return sqlalchemy.create_engine(
            with_driver(source), connect_args=args, poolclass=sqlalchemy.NullPool
        )
    uri = f"sqlite:///file:{Path(source).resolve()}?mode=ro&uri=true"
    return sqlalchemy.create_engine(uri, poolclass=sqlalchemy.NullPool)


def _rows(conn, table: str, where: str = "") -> list[dict[str, Any]]:
    result = conn.execute(sqlalchemy.text(f"select * from {table} {where}"))
    return [dict(r._mapping) for r in result]


def _schema_problem(inspector) -> str | None:
    tables = inspector.get_table_names()
    if "trials" not in tables:
        return f"it has no trials table (tables: {', '.join(sorted(tables)) or 'none'})"
    columns = {c["name"] for c in inspector.get_columns("trials")}
    missing = [c for c in TRIAL_COLUMNS if c not in columns]
    if missing:
        return f"its trials table lacks {', '.join(missing)}"
    return None


def read_catalog(source: str) -> list[Task]:
    """The tasks of one catalog (a file or a database URL) that recorded their meta-features.

    Raises :class:`PriorError` for a file that is not a catalog of this schema, and
    ``sqlalchemy.exc.OperationalError`` when a database cannot be reached."""
    shown = scrub(source, source)
    engine = _engine(source)
    try:
        with engine.connect() as conn:
            try:
                inspector = sqlalchemy.inspect(conn)
                if _is_url(source) and not inspector.get_table_names():
                    return []  # a new shared catalog: the first study to end fills it
                problem = _schema_problem(inspector)
            except sqlalchemy.exc.DatabaseError as exc:
                if _is_url(source) and isinstance(exc, sqlalchemy.exc.OperationalError):
                    raise
                problem = f"it is not a SQLite database ({str(exc.orig).splitlines()[0]})"
            if problem:
                raise PriorError(
                    f"[search] prior: {shown} is not an automl-tl catalog: {problem}. List the "
                    "catalog.db files that automl-tl searches write"
                )
            tables = sqlalchemy.inspect(conn).get_table_names()
            if "datasets" not in tables:
                return []  # a catalog from before meta-features were recorded: nothing to match
            features = {row["study"]: row for row in _rows(conn, "datasets")}
            tasks = {
                name: Task(name, shown, {k: row.get(k) for k in META_FEATURES})
                for name, row in features.items()
            }
            for row in _rows(conn, "trials", "where state = 'COMPLETE' and value is not null"):
                task = tasks.get(row["study"])
                # a study that minimized a plugin's cost: its values rank the other way
                if task is not None and row.get("direction") != "minimize":
                    params = effective_params(json.loads(row["params"] or "{}"))
                    task.evaluations.append(Evaluation(params, row["value"], row["duration_s"]))
            if "benchmarks" in tables:
                for row in _rows(conn, "benchmarks", "where test_accuracy is not null"):
                    task = tasks.get(f"bench:{row['task']}")
                    if task is not None:
                        params = {
                            "backbone": row["backbone"],
                            "weights": row.get("weights") or "none",
                            **BENCH_PARAMS,
                        }
                        seconds = row.get("first_epoch_s")
                        task.evaluations.append(Evaluation(params, row["test_accuracy"], seconds))
    finally:
        engine.dispose()
    return [t for t in tasks.values() if len(t.evaluations) >= 1]


def check_sources(entries: list[str], base_dir: Path) -> None:
    """Every file ``entries`` names is a catalog of this schema (:class:`PriorError` if not):
    checked before a search reads its data. Database URLs are read later (a warning then)."""
    for source in expand_sources(entries, base_dir):
        if not _is_url(source):
            read_catalog(source)


def read_tasks(entries: list[str], base_dir: Path) -> tuple[list[Task], list[str]]:
    """Every task of the catalogs ``entries`` names, and the warnings of those that could not
    be read (an unreachable shared catalog: the search goes on without it)."""
    tasks: list[Task] = []
    warnings: list[str] = []
    for source in expand_sources(entries, base_dir):
        try:
            tasks.extend(read_catalog(source))
        except PriorError:
            raise
        except (sqlalchemy.exc.SQLAlchemyError, ModuleNotFoundError) as exc:
            if not _is_url(source):
                raise
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            warnings.append(
                f"[search] prior: the shared catalog {scrub(source, source)} cannot be read "
                f"({scrub(reason, source)}); this search runs without it"
            )
    return tasks, warnings


# ---------------------------------------------------------------------------------------------
# the portfolio


def task_weights(
    tasks: list[Task], features: dict[str, Any], neighbours: int | None = None
) -> list[float]:
    """Each task's weight: ``exp(-distance / TEMPERATURE)`` to the new dataset; with
    ``neighbours``, 0 for all but that many nearest."""
    distances = [task_distance(t.features, features) for t in tasks]
    return _weights(distances, neighbours)


def _weights(distances: list[float], neighbours: int | None) -> list[float]:
    weights = [math.exp(-d / TEMPERATURE) for d in distances]
    if neighbours is not None and neighbours < len(distances):
        keep = set(sorted(range(len(distances)), key=lambda i: distances[i])[:neighbours])
        weights = [w if i in keep else 0.0 for i, w in enumerate(weights)]
    return weights


def choose_neighbours(
    tasks: list[Task],
    scores: list[list[float]],
    owners: list[set[int]],
    size: int,
    features: dict[str, Any] | None = None,
) -> tuple[int | None, dict[str, float]]:
    """How many of the nearest earlier tasks the portfolio should trust (None: all), by
    leave-one-out over ``tasks``: each task in turn plays the new dataset, a portfolio of
    ``size`` is built from the others' candidates (``owners[c]``: the indices of the tasks
    whose best few candidate ``c`` is among) for every choice, and the choice's mark is that
    task's best normalised score so far after each entry (``scores[c][t]``), averaged over
    entries and tasks (at most :data:`MAX_FOLDS` tasks, those nearest ``features``). The
    portfolios are by score, also where the study's own is per second. Returns the best
    choice and every choice's mark (key ``"all"`` for None); below
    :data:`CHOOSE_NEIGHBOURS_FROM` tasks, None and no marks."""
    n = len(tasks)
    if n < CHOOSE_NEIGHBOURS_FROM:
        return None, {}
    distance = [[task_distance(a.features, b.features) for b in tasks] for a in tasks]
    folds = list(range(n))
    if features is not None and n > MAX_FOLDS:
        folds = sorted(folds, key=lambda i: task_distance(tasks[i].features, features))
        folds = folds[:MAX_FOLDS]
    choices: list[int | None] = [k for k in NEIGHBOUR_CHOICES if k < n - 1] + [None]
    marks: dict[int | None, float] = {}
    for k in choices:
        total = 0.0
        for h in folds:
            others = [i for i in range(n) if i != h]
            pool = [c for c in range(len(scores)) if owners[c] - {h}]
            weights = _weights([distance[h][i] for i in others], k)
            picked = greedy_portfolio([[scores[c][i] for i in others] for c in pool], weights, size)
            best, curve = 0.0, []
            for c in picked:
                best = max(best, scores[pool[c]][h])
                curve.append(best)
            total += sum(curve) / len(curve) if curve else 0.0
        marks[k] = total / len(folds)
    # the best mark; on a tie the fewest tasks
    chosen = max(choices, key=lambda k: (round(marks[k], 6), -choices.index(k)))
    return chosen, {("all" if k is None else str(k)): round(v, 4) for k, v in marks.items()}


@dataclass
class PriorEntry:
    """One configuration of the prior's portfolio and why it is there."""

    params: dict[str, Any]  # effective params (automl_tl.space.effective_params)
    task: str  # the earlier task it did best on
    origin: str
    expected: float  # weighted mean normalised score over the earlier tasks
    seconds: float | None  # expected seconds (weighted mean of the matches that have them)

    def label(self, rank: int) -> str:
        return f"#{rank} from {self.task} ({self.origin})"


@dataclass
class Prior:
    """What a prior learned for one dataset: the nearest tasks and the portfolio."""

    features: dict[str, Any]
    tasks: list[dict[str, Any]]  # name, origin, distance, weight: nearest first
    entries: list[PriorEntry]
    backbones: list[dict[str, Any]]  # backbone, expected: the prior's ranking
    per_second: bool = False
    warnings: list[str] = field(default_factory=list)
    # how many nearest tasks the portfolio trusts (None: all) and each choice's
    # leave-one-out mark (choose_neighbours)
    neighbours: int | None = None
    neighbour_marks: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prior:
        entries = [PriorEntry(**e) for e in data.get("entries", [])]
        return cls(**{**data, "entries": entries})


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def greedy_portfolio(
    scores: list[list[float]],
    weights: list[float],
    size: int,
    costs: list[float] | None = None,
) -> list[int]:
    """Indices of at most ``size`` candidates chosen greedily: each step the candidate that
    most raises ``sum_t weights[t] * max over the portfolio of scores[c][t]``; with ``costs``,
    the most per unit of cost. A candidate that adds nothing is not taken while one that
    adds something is left; then the rest follow by weighted mean score (per cost)."""
    chosen: list[int] = []
    best = [0.0] * len(weights)
    total = sum(weights) or 1.0
    left = list(range(len(scores)))
    while left and len(chosen) < size:

        def value(c: int, best: list[float] = best) -> tuple[float, float]:
            gain = sum(w * max(0.0, s - b) for w, s, b in zip(weights, scores[c], best))
            mean = sum(w * s for w, s in zip(weights, scores[c])) / total
            per = costs[c] if costs else 1.0
            return gain / per, mean / per

        pick = max(left, key=value)
        chosen.append(pick)
        left.remove(pick)
        best = [max(b, s) for b, s in zip(best, scores[pick])]
    return chosen


def build_prior(
    tasks: list[Task],
    features: dict[str, Any],
    size: int,
    *,
    allowed=None,
    per_second: bool = False,
    warnings: list[str] | None = None,
) -> Prior:
    """The prior for a dataset with ``features``: a portfolio of ``size`` configurations from
    ``tasks`` (see the module docstring). ``allowed(params) -> params | None`` maps a
    candidate into the new study's space (None: not searchable there)."""
    usable = [t for t in tasks if t.evaluations]
    candidates: dict[str, tuple[dict[str, Any], Task]] = {}
    owners: dict[str, set[int]] = {}
    for index, task in enumerate(usable):
        for e in sorted(task.evaluations, key=lambda e: -e.score)[:PER_TASK]:
            params = allowed(e.params) if allowed else dict(e.params)
            if params is not None:
                candidates.setdefault(_key(params), (params, task))
                owners.setdefault(_key(params), set()).add(index)
    cands = list(candidates.values())
    predictions = [[t.predict(p) for t in usable] for p, _ in cands]
    scores = [[s for s, _ in row] for row in predictions]
    neighbours, marks = choose_neighbours(
        usable, scores, [owners[_key(p)] for p, _ in cands], size, features
    )
    weights = task_weights(usable, features, neighbours)
    order = sorted(range(len(usable)), key=lambda i: task_distance(usable[i].features, features))
    nearest = [
        {
            "name": usable[i].name,
            "origin": usable[i].origin,
            "distance": round(task_distance(usable[i].features, features), 4),
            "weight": round(weights[i], 4),
            "configurations": len(usable[i].evaluations),
        }
        for i in order
    ]
    seconds = []
    for row in predictions:
        known = [(w, sec) for w, (_, sec) in zip(weights, row) if sec]
        total = sum(w for w, _ in known)
        seconds.append(sum(w * s for w, s in known) / total if total > 0 else None)
    costs = None
    if per_second:
        known_costs = [s for s in seconds if s]
        fallback = sorted(known_costs)[len(known_costs) // 2] if known_costs else 1.0
        costs = [max(s or fallback, 1e-6) for s in seconds]
    picked = greedy_portfolio(scores, weights, size, costs)
    total = sum(weights) or 1.0
    entries = [
        PriorEntry(
            params=cands[c][0],
            task=cands[c][1].name,
            origin=cands[c][1].origin,
            expected=round(sum(w * s for w, s in zip(weights, scores[c])) / total, 4),
            seconds=round(seconds[c], 3) if seconds[c] else None,
        )
        for c in picked
    ]
    ranking: dict[str, float] = {}
    for (params, _), row in zip(cands, scores):
        mean = sum(w * s for w, s in zip(weights, row)) / total
        ranking[params["backbone"]] = max(ranking.get(params["backbone"], 0.0), mean)
    backbones = [
        {"backbone": b, "expected": round(v, 4)}
        for b, v in sorted(ranking.items(), key=lambda kv: -kv[1])
    ]
    return Prior(
        features,
        nearest,
        entries,
        backbones,
        per_second,
        list(warnings or []),
        neighbours,
        marks,
    )


# ---------------------------------------------------------------------------------------------
# a study's prior


def _clamp(value: float, bounds) -> float:
    return min(max(float(value), float(bounds[0])), float(bounds[1]))


def fits_study(config: StudyConfig, params: dict[str, Any]) -> dict[str, Any] | None:
    """``params`` (effective form) mapped into the study's space: None when its backbone,
    policy or strategy is not searched; numbers clamped into the study's ranges."""
    s = config.search
    if params.get("backbone") not in s.backbones or params.get("augmentation") not in (
        s.augmentations
    ):
        return None
    if params.get("unfreeze") not in s.unfreeze:
        return None
    lo = min(s.lr[0], FINETUNE_LR[0])
    hi = max(s.lr[1], FINETUNE_LR[1])
    out = {
        "backbone": params["backbone"],
        "augmentation": params["augmentation"],
        "aug_strength": 0.0
        if params["augmentation"] == "none"
        else _clamp(params.get("aug_strength", 0.5), (0.0, 1.0)),
        "unfreeze": params["unfreeze"],
        "unfreeze_depth": _clamp(params.get("unfreeze_depth", 1.0), s.unfreeze_depth),
        "lr": _clamp(params.get("lr", 1e-3), (lo, hi)),
        "weight_decay": _clamp(params.get("weight_decay", 1e-4), s.weight_decay),
    }
    for key in STRATEGY_OPTIONS.get(params["unfreeze"], {}).values():  # lora_rank
        if params.get(key) in getattr(s, key):
            out[key] = params[key]
    return out


def study_params(config: StudyConfig, params: dict[str, Any], number: int) -> dict[str, Any]:
    """An entry as the Optuna parameters trial ``number`` takes (automl_tl.space's names: the
    branch follows the weight source that trial trains from)."""
    backbone = params["backbone"]
    choices = config.weight_choices(backbone)
    source = choices[number % len(choices)] if choices else None
    scratch = is_scratch(config, backbone, source)
    out: dict[str, Any] = {"backbone": backbone, "augmentation": params["augmentation"]}
    if params["augmentation"] != "none":
        out["aug_strength"] = params["aug_strength"]
    if scratch:  # a value the space does not allow comes from the base sampler
        out["unfreeze_scratch"] = params["unfreeze"]
    else:
        out["unfreeze"] = params["unfreeze"]
        out["unfreeze_depth"] = params["unfreeze_depth"]
        for key in STRATEGY_OPTIONS.get(params["unfreeze"], {}).values():
            if key in params and len(getattr(config.search, key)) > 1:
                out[key] = params[key]
    lr_name, bounds = lr_dimension(config, scratch)
    out[lr_name] = _clamp(params["lr"], bounds)
    out["weight_decay"] = params["weight_decay"]
    return out


def compute_prior(config: StudyConfig, features: dict[str, Any], size: int) -> Prior:
    """The study's prior from the catalogs of ``[search] prior`` (the study's own rows left
    out), ``size`` entries, per expected second under ``[search] timeout``."""
    tasks, warnings = read_tasks(config.search.prior, config.base_dir)
    tasks = [t for t in tasks if t.name != config.name]
    return build_prior(
        tasks,
        features,
        size,
        allowed=lambda p: fits_study(config, p),
        per_second=bool(config.search.timeout),
        warnings=warnings,
    )


def study_prior(
    config: StudyConfig, features: dict[str, Any], size: int, *, rebuild: bool = False
) -> Prior | None:
    """The study's prior (None without ``[search] prior``): ``<study>/prior.json`` when it
    was built from the same sources for the same data, so every worker and every resumed run
    gives trial *n* the same entry; else built now and written there."""
    if not config.search.prior:
        return None
    path = config.paths.prior
    sources = list(config.search.prior)
    if path.is_file() and not rebuild:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            data = json.loads(path.read_text(encoding="utf-8"))
            same = data.get("sources") == sources and data["prior"]["features"] == features
            if same and not data["prior"].get("warnings"):  # an unreachable catalog: try again
                return Prior.from_dict(data["prior"])
    prior = compute_prior(config, features, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"sources": sources, "prior": prior.to_dict()}, indent=2))
    return prior


def read_study_prior(config: StudyConfig) -> Prior | None:
    """The prior a study wrote (``prior.json``), or None."""
    path = config.paths.prior
    if not path.is_file():
        return None
    return Prior.from_dict(json.loads(path.read_text(encoding="utf-8"))["prior"])


# ---------------------------------------------------------------------------------------------
# a shared catalog


def _shared_tables(metadata: sqlalchemy.MetaData) -> dict[str, sqlalchemy.Table]:
    col, text, num, integer = (
        sqlalchemy.Column,
        sqlalchemy.Text,
        sqlalchemy.Float,
        sqlalchemy.Integer,
    )
    datasets = sqlalchemy.Table(
        "datasets",
        metadata,
        col("study", text, primary_key=True),
        col("classes", integer),
        col("images_per_class", num),
        col("resolution", integer),
        col("weights", text),
        *(col(k, num) for k in META_FEATURES[4:]),
        col("recorded", text),
    )
    trials = sqlalchemy.Table(
        "trials",
        metadata,
        col("study", text, primary_key=True),
        col("number", integer, primary_key=True),
        col("state", text),
        col("value", num),
        col("params", text),
        col("duration_s", num),
        col("epochs_run", integer),
        col("images_per_s", num),
        col("device", text),
    )
    benchmarks = sqlalchemy.Table(
        "benchmarks",
        metadata,
        col("plugin", text),
        col("backbone", text),
        col("task", text),
        col("weights", text),
        col("test_accuracy", num),
        col("images_per_s", num),
        col("first_epoch_s", num),
        col("created", text),
    )
    return {"datasets": datasets, "trials": trials, "benchmarks": benchmarks}


def publish(catalog_db, url: str, studies: list[str] | None = None) -> dict[str, int]:
    """Copy the ``datasets``, ``trials`` and ``benchmarks`` rows of a local catalog
    (a ``sqlite_utils.Database``) into the shared catalog at ``url``, creating its tables;
    a study's rows replace those it had there. Returns the rows written per table."""
    engine = _engine(url)
    metadata = sqlalchemy.MetaData()
    tables = _shared_tables(metadata)
    written = {}
    try:
        metadata.create_all(engine)
        local = set(catalog_db.table_names())
        with engine.begin() as conn:
            for name, table in tables.items():
                if name not in local:
                    continue
                keep = {c.name for c in table.columns}
                rows = [
                    {k: v for k, v in row.items() if k in keep}
                    for row in catalog_db[name].rows
                    if name == "benchmarks" or studies is None or row["study"] in studies
                ]
                if name == "benchmarks":
                    for row in rows:
                        conn.execute(
                            table.delete().where(
                                *(table.c[k] == row.get(k) for k in ("backbone", "task", "created"))
                            )
                        )
                else:
                    for study in {row["study"] for row in rows}:
                        conn.execute(table.delete().where(table.c.study == study))
                if rows:
                    conn.execute(table.insert(), rows)
                written[name] = len(rows)
    finally:
        engine.dispose()
    return written
