"""The study file (TOML): schema, defaults, and validation with messages a user can act on.

Relative paths in the file (``folder:PATH``, ``csv:PATH``, weight files, plugin files,
``output``) are resolved against the study file's folder, so a study file and its data can be
moved together.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import urllib.parse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import tasks, weightsource
from .errors import ConfigError, did_you_mean
from .paths import StudyPaths
from .trials import MAXIMIZE, Direction

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: the built-in metrics of a multiclass study (a multi-label one: tasks.MULTILABEL_METRICS)
METRICS = tasks.MULTICLASS_METRICS
#: the largest val_fraction + test_fraction: at least a tenth of the data stays to train on
MAX_HELD_OUT = 0.9
#: the answers to class imbalance ``[search] imbalance`` chooses from (automl_tl/recipe.py)
IMBALANCE_CHOICES = ("none", "weighted", "focal", "sampler", "logit_adjust")
#: the [search] keys that open a regularizer of the recipe as a searched dimension
RECIPE_KEYS = (
    "mixup_alpha",
    "cutmix_alpha",
    "mix_prob",
    "mix_switch_prob",
    "label_smoothing",
    "ema_decay",
    "drop_path",
    "clip_grad",
    "warmup_epochs",
    "imbalance",
)
#: the recipe keys that assume one label per image (refused for a multi-label study; mixing
#: and label smoothing have multi-label forms, automl_tl/recipe.py)
SINGLE_LABEL_RECIPE = ("imbalance",)
SAMPLERS = ("tpe", "gp", "random", "nsga2")
#: what a multi-objective study can measure on each trained model beside its metric (all
#: lower-is-better): milliseconds per call on the [search] latency target, millions of
#: parameters, megabytes of weights
MEASURES = ("latency_ms", "params_m", "model_mb")
#: how [selection] pick names a measure: "fastest within 1 point" and the like
PICK_WORDS = {"fastest": "latency_ms", "smallest": "params_m", "lightest": "model_mb"}
#: the keys of [search] latency and their defaults (where latency_ms is measured)
LATENCY_DEFAULTS = {"device": "cpu", "threads": 1, "batch_size": 1, "runtime": "torch"}
LATENCY_RUNTIMES = ("torch", "onnxruntime")
PRUNERS = ("hyperband", "median", "none")


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass
class DataSection:
    source: str = "digits"
    image_size: int = field(default=32, metadata={"min": 8, "max": 1024})
    val_fraction: float = field(default=0.2, metadata={"min": 0.01, "max": 0.9})
    test_fraction: float = field(default=0.2, metadata={"min": 0.01, "max": 0.9})
    #: numpy and torch take seeds in [0, 2**32)
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1})
    on_bad_image: str = field(default="error", metadata=_choices("error", "skip"))
    #: a few-label task: at most this many labelled images per class for train + val
    #: together (in the val_fraction proportion); test keeps all its images
    max_per_class: int | None = field(default=None, metadata={"min": 2})
    #: "fixed": the label depends on orientation (digits, text, dials): no searched policy
    #: flips or rotates beyond a small angle (AugmentationPolicy.orientation_safe). "free":
    #: any policy (natural photos, where a mirrored cat is a cat)
    orientation: str = field(default="free", metadata=_choices("free", "fixed"))
    #: ``image_size = [160, 224]`` in the study file: the sizes searched (the ``image_size``
    #: parameter; one decoded cache each); ``image_size`` is then the first of them
    searched_sizes: list[int] | None = field(default=None, metadata={"internal": True})

    @property
    def sizes(self) -> list[int]:
        """Every image size the study trains at: the searched ones, else ``image_size``."""
        return list(self.searched_sizes or [self.image_size])

    #: "multiclass": one class per image; "multilabel": any number of labels per image
    #: (a csv: source whose header has a labels column is multi-label without saying so)
    task: str = field(default="multiclass", metadata=_choices(*tasks.TASK_KINDS))
    #: what separates the labels in a multi-label CSV's labels cell (default: spaces)
    label_separator: str = " "


@dataclass
class SearchSection:
    n_trials: int = field(default=20, metadata={"min": 1})
    timeout: float | None = field(default=None, metadata={"min": 1})
    #: a built-in (METRICS) or a plugin's metric (register_metrics), checked by the search
    metric: str = field(default="accuracy")
    sampler: str = field(default="tpe", metadata=_choices(*SAMPLERS))
    pruner: str = field(default="hyperband", metadata=_choices(*PRUNERS))
    storage: str = ""
    output: str = ""
    backbones: list[str] = field(
        default_factory=lambda: ["test_resnet", "test_efficientnet", "test_convnext"],
        metadata={"nonempty": True},
    )
    augmentations: list[str] = field(
        default_factory=lambda: ["none", "flip_crop", "randaugment", "trivialaugment"],
        metadata={"nonempty": True},
    )
    unfreeze: list[str] = field(
        default_factory=lambda: ["top_k", "gradual", "lp_ft", "layer_decay"],
        metadata={"nonempty": True},
    )
    #: the lr range of every trial when the study sets it; left out, it depends on the weight
    #: source (automl_tl/space.py): this range from random init, a lower one for fine-tuning
    lr: list[float] = field(default_factory=lambda: [1e-4, 1e-2], metadata={"range": "log"})
    weight_decay: list[float] = field(
        default_factory=lambda: [1e-6, 1e-2], metadata={"range": "log"}
    )
    #: the searched unfreeze depth (a fraction of the body's groups) of trials from pretrained
    #: weights; [x, x] fixes it. Trials from random init have none: their whole body trains
    unfreeze_depth: list[float] = field(
        default_factory=lambda: [0.0, 1.0], metadata={"range": "unit"}
    )
    epochs: int = field(default=5, metadata={"min": 1})
    #: at least 2: a batch of one image is dropped (BatchNorm cannot train on it)
    batch_size: int = field(
        default=64,
        metadata={"min": 2, "why": "batches of one image are dropped, so nothing trains"},
    )
    device: str = "auto"
    max_consecutive_failures: int = field(default=5, metadata={"min": 1})
    heartbeat_interval: int = field(default=60, metadata={"min": 1})
    #: torch.compile each trial's model (pays off on GPU for long trials; costs compile time)
    compile: bool = False
    #: tpe / gp: start with one textbook configuration per backbone (automl_tl/portfolio.py)
    #: in place of the first random start-up trials; false: random start-up only
    portfolio: bool = True
    #: TPE keeps the cheapest of several proposals, by a cost model of the study's trials
    #: (automl_tl/samplers.py CostAwareSampler): "auto" = under a timeout or a --deadline
    cost_aware: str | bool = field(default="auto", metadata={"auto_or_bool": True})
    #: a team prior: catalogs of earlier studies (file patterns, e.g. "studies/*/catalog.db",
    #: relative to the study file) or a shared catalog URL ("postgresql://…"); the best
    #: configurations of the most similar earlier datasets run first (automl_tl/prior.py)
    prior: list[str] = field(default_factory=list)
    #: early stopping: a trial stops when its validation score has not improved for this
    #: many epochs, and scores as its best epoch (0 = off: every trial runs all epochs)
    patience: int = field(default=0, metadata={"min": 0})
    # The recipe (automl_tl/recipe.py; the space table of automl_tl/space.py). Each is off
    # unless the study sets it: a range [low, high] is searched, one number (or [x, x]) fixes it.
    #: mixup's Beta(α, α) parameter (> 0)
    mixup_alpha: list[float] | None = field(
        default=None, metadata={"range": "positive", "fixed_ok": True}
    )
    #: CutMix's Beta(α, α) parameter (> 0)
    cutmix_alpha: list[float] | None = field(
        default=None, metadata={"range": "positive", "fixed_ok": True}
    )
    #: the fraction of batches mixed (when mixup or CutMix is open; default 1.0)
    mix_prob: list[float] | None = field(default=None, metadata={"range": "unit", "fixed_ok": True})
    #: of the mixed batches, the fraction mixed by CutMix (when both are open; default 0.5)
    mix_switch_prob: list[float] | None = field(
        default=None, metadata={"range": "unit", "fixed_ok": True}
    )
    #: label smoothing ε in [0, 1)
    label_smoothing: list[float] | None = field(
        default=None, metadata={"range": "below_one", "fixed_ok": True}
    )
    #: decay of the EMA of the weights, in (0, 1)
    ema_decay: list[float] | None = field(
        default=None, metadata={"range": "decay", "fixed_ok": True}
    )
    #: drop-path (stochastic depth) rate in [0, 1), for backbones that take it
    drop_path: list[float] | None = field(
        default=None, metadata={"range": "below_one", "fixed_ok": True}
    )
    #: the largest global gradient norm (> 0; searched on a log scale)
    clip_grad: list[float] | None = field(default=None, metadata={"range": "log", "fixed_ok": True})
    #: epochs of linear lr warm-up (>= 0; left out: a tenth of the steps, at most one epoch)
    warmup_epochs: list[float] | None = field(
        default=None, metadata={"range": "nonnegative", "fixed_ok": True}
    )
    #: the answer to class imbalance: several names are a searched choice, one fixes it; left
    #: out: "logit_adjust" for a train split whose largest class has >= 5x its smallest, else "none"
    imbalance: list[str] | None = field(
        default=None, metadata={"items": IMBALANCE_CHOICES, "nonempty": True}
    )
    #: the ranks of the ``lora`` strategy's low-rank adapters: a list is a searched choice (the
    #: ``lora_rank`` parameter of trials that choose ``lora``), one integer fixes it; alpha is
    #: 2 x rank (the adapters' scale alpha / rank stays 2 at every rank)
    lora_rank: list[int] = field(default_factory=lambda: [4, 8, 16], metadata={"ranks": True})
    #: multi-label studies: "bce" (binary cross-entropy) or "asymmetric" (Ridnik et al., 2021)
    multilabel_loss: str = field(default="bce", metadata=_choices(*tasks.MULTILABEL_LOSSES))
    #: more than one: a multi-objective study (Optuna's TPE or NSGA-II): the first is the
    #: metric, the others are measured on each trained model (MEASURES, all minimized)
    objectives: list[str] = field(default_factory=list)
    #: where latency_ms is measured: {device, threads, batch_size, runtime} (LATENCY_DEFAULTS)
    latency: dict = field(default_factory=dict)
    #: bounds on measured objectives, e.g. ["latency_ms <= 20"] (Optuna's constraints_func)
    constraints: list[str] = field(default_factory=list)

    @property
    def measures(self) -> list[str]:
        """The objectives measured on the model (after the metric)."""
        return list(self.objectives[1:])

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def latency_target(self) -> dict[str, Any]:
        """[search] latency with its defaults filled in."""
        return {**LATENCY_DEFAULTS, **self.latency}


@dataclass
class SelectionSection:
    """How the winner is chosen after the search (automl_tl/selection.py)."""

    #: race the finalists (complete trials within one standard error of the best) again;
    #: false: the plain argmax of the search, as before
    race: bool = True
    #: at most this many finalists are raced
    finalists: int = field(default=5, metadata={"min": 1})
    #: extra training runs (other seeds) per finalist and fold
    repeats: int = field(default=1, metadata={"min": 1})
    #: k-fold cross-validation over train+val while racing; -1 = chosen from the images per
    #: class (folds when the validation split has fewer than 10 images per class), 0 = off
    folds: int = field(default=-1, metadata={"min": -1})
    #: how the raced winner is chosen: the mean score, or its lower confidence bound
    rule: str = field(default="mean", metadata=_choices("mean", "lcb"))
    #: at most this many extra training runs (trial-equivalents) in all for racing; 0: as many
    #: as the search's n_trials, at most 20 (racing never more than doubles a search)
    budget: int = field(default=0, metadata={"min": 0})

    def race_budget(self, n_trials: int) -> int:
        """The racing budget in force: ``budget``, or for 0 ``min(20, n_trials)``."""
        return self.budget or max(1, min(20, n_trials))

    #: an ensemble of the finalists -> <output>/ensemble/
    ensemble: bool = True
    #: its members: "uniform" (every finalist with held-out predictions, equal weights) or
    #: "greedy" (Caruana 2004: forward selection with replacement, hill-climbing the metric on
    #: the held-out predictions; on a few dozen held-out images it overfits them,
    #: benchmarks/RESULTS.md)
    ensemble_rule: str = field(default="uniform", metadata=_choices("uniform", "greedy"))
    #: greedy weight soup (Wortsman 2022) of finalists sharing backbone and weights -> soup/
    soup: bool = True
    #: temperature scaling fitted on held-out validation predictions
    calibrate: bool = True
    #: a multi-objective study's model to ship: "best" (the best metric on the Pareto front)
    #: or e.g. "fastest within 1 point" (the lowest latency_ms within 1 point of the best
    #: metric; "smallest": params_m, "lightest": model_mb)
    pick: str = "best"


@dataclass
class RetrainSection:
    on: str = field(default="train+val", metadata=_choices("train+val", "train"))


@dataclass
class PretrainSection:
    """How ``pretrain:SOURCE`` weights are trained (at the study's image size and seed)."""

    epochs: int = field(default=10, metadata={"min": 1})
    lr: float = field(default=3e-3, metadata={"min": 1e-8})
    weight_decay: float = field(default=1e-4, metadata={"min": 0.0})
    batch_size: int = field(default=64, metadata={"min": 2})
    augmentation: str = "none"
    aug_strength: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})


@dataclass
class StudyConfig:
    """A validated study file. Build it with :func:`load_config` or :func:`config_from_dict`."""

    name: str
    plugins: list[str] = field(default_factory=list)
    data: DataSection = field(default_factory=DataSection)
    search: SearchSection = field(default_factory=SearchSection)
    retrain: RetrainSection = field(default_factory=RetrainSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    selection: SelectionSection = field(default_factory=SelectionSection)
    #: per-backbone weight source; "default" applies to backbones not named. A list makes the
    #: source a searched choice (the ``weights`` parameter), e.g. ["pretrain:digits:0-4", "none"]
    weights: dict[str, str | list[str]] = field(default_factory=lambda: {"default": "none"})
    #: the study file, or None for a config built in code
    path: Path | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    #: the keys the study file set, as "section.key" (e.g. "search.lr"); a default that
    #: depends on something else (the lr range on the weight source) applies only to the others
    explicit: frozenset[str] = frozenset()

    @property
    def task(self) -> tasks.Task:
        """The study's task kind (:mod:`automl_tl.tasks`), with its loss."""
        return tasks.build(self.data.task, self.search.multilabel_loss)

    def sets(self, key: str) -> bool:
        """Whether the study file set ``key`` ("section.key") rather than leaving its default."""
        return key in self.explicit

    def trains_from_scratch(self, backbone: str) -> bool:
        """Whether every trial of ``backbone`` starts from random init (``[weights]`` "none")."""
        return self.weights_entry(backbone) == "none"

    @property
    def output_dir(self) -> Path:
        """Where the study's files go: ``[search] output`` or ``<study file folder>/<name>``."""
        if self.search.output:
            out = Path(self.search.output).expanduser()
            return out if out.is_absolute() else self.base_dir / out
        return self.base_dir / self.name

    @property
    def paths(self) -> StudyPaths:
        """The study folder's layout (:class:`automl_tl.paths.StudyPaths`)."""
        return StudyPaths(self.output_dir)

    @property
    def storage_url(self) -> str:
        """The Optuna storage URL; default SQLite in the output folder, or the journal file
        there once a ``--workers N`` search has made one (``journal:PATH``)."""
        if self.search.storage:
            return self.search.storage
        paths = self.paths
        if paths.journal.exists():
            return f"journal:{paths.journal}"
        return sqlite_url(paths.sqlite)

    def weights_entry(self, backbone: str) -> str | list[str]:
        """``[weights]``'s value for ``backbone`` as written: its own entry, else ``default``."""
        return self.weights.get(backbone, self.weights.get("default", "none"))

    def weight_choices(self, backbone: str) -> list[str] | None:
        """The sources searched for ``backbone`` (the ``weights`` parameter), or None if fixed."""
        value = self.weights_entry(backbone)
        return list(value) if isinstance(value, list) else None

    def searches_weights(self) -> bool:
        """True when some backbone's weight source is a searched choice."""
        return any(self.weight_choices(b) for b in self.search.backbones)

    def weight_source(self, backbone: str, choice: str | None = None) -> weightsource.WeightSource:
        """``backbone``'s weight source, parsed (``choice``: the searched one, when
        ``[weights]`` lists several)."""
        value = self.weights_entry(backbone)
        if isinstance(value, list):
            if choice not in value:  # e.g. a trial from before [weights] became this list
                raise ConfigError(
                    f"[weights] {backbone} lists {value}, but the trial's weight source is "
                    f"{choice!r}; restore the study file's [weights] as it was for this study"
                )
            value = choice
        return weightsource.parse(value, self.base_dir)

    def pretrained_path(self, backbone: str, source: str) -> Path:
        """Where ``pretrain:SOURCE`` weights of ``backbone`` are kept (built by automl_tl.pretrain)."""
        return self.paths.pretrained_weights(backbone, source)

    def weights_record(self, backbone: str, choice: str | None = None) -> dict[str, Any]:
        """Where ``backbone``'s weights come from, as a model records it: the source as
        written, its kind and, for a local file (``pretrain:`` included), path and sha256."""
        source = self.weight_source(backbone, choice)
        pretrained = (
            self.pretrained_path(backbone, source.target) if source.kind == "pretrain" else None
        )
        return source.describe(pretrained)

    def weights_label(self, backbone: str, choice: str | None = None) -> str:
        """:meth:`weights_record` in one line: as written, and a local file's short sha256."""
        source = self.weight_source(backbone, choice)
        pretrained = (
            self.pretrained_path(backbone, source.target) if source.kind == "pretrain" else None
        )
        return source.label(pretrained)

    def weights_for(self, backbone: str, choice: str | None = None) -> str:
        """The weight source for ``backbone`` as a backbone's ``create()`` takes it: paths
        resolved against the study folder, ``pretrain:SOURCE`` as the file
        :func:`automl_tl.pretrain.ensure_study_weights` writes."""
        source = self.weight_source(backbone, choice)
        pretrained = (
            self.pretrained_path(backbone, source.target) if source.kind == "pretrain" else None
        )
        return source.for_create(pretrained)


def sqlite_url(path: Path) -> str:
    """``sqlite:///PATH`` with the path percent-quoted: SQLAlchemy reads ``?`` as the start of
    URL options and unquotes ``%2E%2E%2F``, so a study name or output folder holding them
    would otherwise move ``optuna.db`` elsewhere."""
    return "sqlite:///" + urllib.parse.quote(str(path), safe="/")


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///PATH`` URL (the inverse of :func:`sqlite_url`)."""
    return Path(urllib.parse.unquote(url[len("sqlite:///") :].partition("?")[0]))


_SECTIONS = {
    "data": DataSection,
    "search": SearchSection,
    "retrain": RetrainSection,
    "pretrain": PretrainSection,
    "selection": SelectionSection,
}
_TOP_LEVEL = (
    "name",
    "preset",
    "plugins",
    "data",
    "search",
    "retrain",
    "pretrain",
    "selection",
    "weights",
)

#: ``preset = NAME`` (or ``automl-tl search --preset NAME``): the keys a preset sets, as
#: section -> key -> value; any key the study file sets itself wins. README.md has the table.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # a first answer in minutes on a GPU: two small ImageNet backbones, short trials, the
    # textbook regularizers fixed rather than searched
    "fast": {
        "search": {
            "backbones": ["mobilenetv3_large_100", "resnet18"],
            "n_trials": 12,
            "epochs": 5,
            "augmentations": ["none", "flip_crop"],
            "unfreeze": ["top_k", "lp_ft"],
            "label_smoothing": 0.1,
        },
        "selection": {"finalists": 3},
        "weights": {"default": "timm"},
    },
    # the usual fine-tuning search: three mid-size families, early stopping, the strongest
    # regularizers searched
    "balanced": {
        "search": {
            "backbones": ["resnet50", "convnext_tiny", "efficientnet_b0"],
            "n_trials": 40,
            "epochs": 10,
            "patience": 3,
            "label_smoothing": [0.0, 0.2],
            "mixup_alpha": [0.1, 0.4],
            "mix_prob": [0.0, 1.0],
            "ema_decay": [0.99, 0.9998],
        },
        "weights": {"default": "timm"},
    },
    # as good as the budget allows: larger backbones, longer trials, the whole recipe
    # searched (class imbalance too)
    "best": {
        "search": {
            "backbones": ["convnext_small", "vit_small_patch16_224", "efficientnet_b3"],
            "n_trials": 100,
            "epochs": 20,
            "patience": 5,
            "label_smoothing": [0.0, 0.2],
            "mixup_alpha": [0.1, 0.8],
            "cutmix_alpha": [0.5, 1.0],
            "mix_prob": [0.0, 1.0],
            "mix_switch_prob": [0.0, 1.0],
            "ema_decay": [0.99, 0.9998],
            "drop_path": [0.0, 0.2],
            "clip_grad": [0.5, 5.0],
            "warmup_epochs": [0.0, 3.0],
            "imbalance": ["none", "weighted", "focal", "sampler", "logit_adjust"],
        },
        "selection": {"repeats": 2},
        "weights": {"default": "timm"},
    },
}


def apply_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with its ``preset``'s keys filled in where the study file does not set them."""
    name = raw.get("preset")
    if name is None:
        return raw
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(
            f"preset = {name!r} is not a preset{did_you_mean(str(name), PRESETS)}; choose one "
            f"of: {', '.join(PRESETS)}, or remove preset and set [search] yourself"
        )
    out = dict(raw)
    for section, values in PRESETS[name].items():
        mine = out.get(section, {})
        if not isinstance(mine, dict):
            continue  # refused with its own message by the section's check
        out[section] = {**values, **mine}
    return out


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
    }.get(type(value), type(value).__name__)


def _check_value(key: str, f: dataclasses.Field, value: Any) -> Any:
    hint = str(f.type)
    meta = f.metadata
    if value is None and "None" in hint:
        return None
    if meta.get("auto_or_bool"):
        if isinstance(value, bool) or value == "auto":
            return value
        raise ConfigError(f'{key} must be "auto", true or false, got {_type_name(value)} {value!r}')
    if meta.get("ranks"):
        return _check_ranks(key, value)
    if meta.get("fixed_ok") and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]  # one number fixes a searched range
    if hint.startswith("list["):
        item = float if "float" in hint else str
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {_type_name(value)} {value!r}")
        for v in value:
            ok = (
                isinstance(v, (int, float)) and not isinstance(v, bool)
                if item is float
                else isinstance(v, str)
            )
            if not ok:
                raise ConfigError(
                    f"{key} must hold {'numbers' if item is float else 'strings'}, got {v!r}"
                )
        if meta.get("nonempty") and not value:
            raise ConfigError(f"{key} is empty; list at least one name")
        for v in value if "items" in meta else ():
            if v not in meta["items"]:
                raise ConfigError(
                    f"{key} lists {v!r}{did_you_mean(v, meta['items'])}; choose from: "
                    f"{', '.join(meta['items'])}"
                )
        if meta.get("range"):
            if len(value) != 2:
                raise ConfigError(f"{key} must be a range [low, high], got {value!r}")
            low, high = float(value[0]), float(value[1])
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ConfigError(f"{key} = {value!r}: both ends must be finite numbers")
            if low > high:
                raise ConfigError(f"{key} = {value!r}: low > high; write [{value[1]}, {value[0]}]")
            if meta["range"] == "log" and low <= 0:
                raise ConfigError(
                    f"{key} = {value!r} is searched on a log scale; both ends must be > 0"
                )
            if meta["range"] == "unit" and not (low >= 0.0 and high <= 1.0):
                raise ConfigError(f"{key} = {value!r} is a fraction; both ends must lie in [0, 1]")
            _check_recipe_range(key, meta["range"], value, low, high)
            return [low, high]
        if len(set(value)) != len(value):
            raise ConfigError(f"{key} lists a name twice: {value!r}")
        return list(value)
    if hint.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {_type_name(value)} {value!r}")
    elif hint.startswith("float"):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ConfigError(f"{key} must be a number, got {_type_name(value)} {value!r}")
        value = float(value)
    elif hint.startswith("str") and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {_type_name(value)} {value!r}")
    elif hint.startswith("bool") and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {_type_name(value)} {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(
            f"{key} = {value!r} is not allowed{did_you_mean(value, meta['choices'])}; "
            f"choose one of: {', '.join(meta['choices'])}"
        )
    if "min" in meta and value < meta["min"]:
        why = f" ({meta['why']})" if "why" in meta else ""
        raise ConfigError(f"{key} = {value!r} is too small{why}; it must be at least {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key} = {value!r} is too large; it must be at most {meta['max']}")
    return value


def _check_ranks(key: str, value: Any) -> list[int]:
    """A list of positive integers (or one, which fixes it): adapter ranks."""
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad or not values:
        what = f"{bad[0]!r} is not a positive integer" if bad else "lists no rank"
        raise ConfigError(
            f"{key} = {value!r}: {what}; a rank is the adapters' inner dimension, a whole "
            f"number >= 1: write a list to search it (e.g. [4, 8, 16]) or one integer (e.g. 8)"
        )
    if len(set(values)) != len(values):
        raise ConfigError(f"{key} lists a rank twice: {value!r}")
    return list(values)


#: range kind -> (the allowed values, whether (low, high) is in them), for the recipe's ranges
_RECIPE_RANGES = {
    "positive": ("> 0 (0 would switch it off: leave the key out instead)", lambda lo, hi: lo > 0),
    "below_one": ("in [0, 1)", lambda lo, hi: lo >= 0 and hi < 1),
    "decay": ("in (0, 1), e.g. [0.9, 0.999]", lambda lo, hi: lo > 0 and hi < 1),
    "nonnegative": (">= 0", lambda lo, hi: lo >= 0),
}


def _check_recipe_range(key: str, kind: str, value: Any, low: float, high: float) -> None:
    if kind not in _RECIPE_RANGES:
        return
    allowed, ok = _RECIPE_RANGES[kind]
    if not ok(low, high):
        raise ConfigError(f"{key} = {value!r}: both ends must be {allowed}")


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table, got {_type_name(raw)}")
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"unknown key {key!r} in [{name}]{did_you_mean(key, known)}; "
                f"allowed: {', '.join(known)}"
            )
        values[key] = _check_value(f"[{name}] {key}", known[key], value)
    return cls(**values)


def config_from_dict(raw: dict[str, Any], path: Path | None = None) -> StudyConfig:
    """Validate a parsed study file; raises ConfigError naming the first bad key."""
    for key in raw:
        if key not in _TOP_LEVEL:
            raise ConfigError(
                f"unknown top-level key {key!r}{did_you_mean(key, _TOP_LEVEL)}; "
                f"allowed: {', '.join(_TOP_LEVEL)}"
            )
    given, raw = raw, apply_preset(raw)
    raw, sizes = _searched_sizes(raw)
    base_dir = path.parent.resolve() if path else Path.cwd()
    name = raw.get("name", path.stem if path else None)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            "name must be a non-empty string (it names the study and its output folder)"
        )
    if any(c in name for c in "/\\") or name in (".", ".."):
        raise ConfigError(f"name {name!r} must not contain path separators")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ConfigError(
            f"name {name!r} must not contain control characters (a NUL byte, a newline, …); "
            "it names the study and its output folder"
        )
    plugins = raw.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"plugins must be a list of module names or .py paths, got {plugins!r}")
    # a plugin file is found beside the study file, never in whatever folder the command runs
    plugins = [_plugin_path(p, base_dir) for p in plugins]
    weights = raw.get("weights", {})
    if not isinstance(weights, dict) or not all(
        isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        for v in weights.values()
    ):
        raise ConfigError(f"[weights] must map backbone names to {weightsource.FORMS} (or a list)")
    sections = {k: _section(k, cls, raw.get(k, {})) for k, cls in _SECTIONS.items()}
    sections["data"].searched_sizes = sizes
    held_out = sections["data"].val_fraction + sections["data"].test_fraction
    if held_out > MAX_HELD_OUT + 1e-9:
        raise ConfigError(
            f"[data] val_fraction + test_fraction = {held_out:g} leaves "
            f"{'no' if held_out >= 1 else 'too few'} images to train on; keep their sum at most "
            f"{MAX_HELD_OUT}"
        )
    # the keys the study file sets itself (a preset's are defaults: flip_crop still becomes
    # crop under [data] orientation = "fixed")
    explicit = frozenset(
        f"{k}.{key}" for k in _SECTIONS if isinstance(given.get(k), dict) for key in given[k]
    )
    if sections["data"].orientation == "fixed" and "search.augmentations" not in explicit:
        # the default list without its flip: crop for flip_crop (see kornia_policies.py)
        sections["search"].augmentations = [
            FIXED_ORIENTATION_SWAPS.get(a, a) for a in sections["search"].augmentations
        ]
    if sections["data"].label_separator == "":
        raise ConfigError('[data] label_separator is empty; use " " (the default), ";" or "|", say')
    config = StudyConfig(
        name=name,
        plugins=list(plugins),
        weights={"default": "none", **weights},
        path=path,
        base_dir=base_dir,
        explicit=explicit,
        **sections,
    )
    _resolve_task(config)
    check_objectives(config, raw)
    s = config.search
    if s.cost_aware is True and (s.sampler != "tpe" or s.multi_objective):
        why = "a multi-objective study" if s.multi_objective else f'sampler = "{s.sampler}"'
        raise ConfigError(
            f"[search] cost_aware = true applies to TPE in a single-objective study, not to "
            f'{why}; set sampler = "tpe" or drop cost_aware'
        )
    asked = (raw.get("selection") or {}).get("finalists")
    if asked is not None and asked > config.search.n_trials:
        raise ConfigError(
            f"[selection] finalists = {asked} is more than the {config.search.n_trials} trials "
            f"of [search] n_trials, so there cannot be that many; set [selection] finalists to "
            f"at most {config.search.n_trials} or raise n_trials"
        )
    for backbone, value in config.weights.items():
        if backbone != "default" and backbone not in config.search.backbones:
            raise ConfigError(
                f"[weights] names backbone {backbone!r}, which is not in [search] backbones"
                f"{did_you_mean(backbone, config.search.backbones)}; searched: "
                f"{', '.join(config.search.backbones)}"
            )
        _check_weights(config, backbone, value)
    if config.sets("search.unfreeze_depth") and all(
        config.trains_from_scratch(b) for b in config.search.backbones
    ):
        raise ConfigError(
            f"[search] unfreeze_depth = {config.search.unfreeze_depth!r} has no effect: every "
            'backbone trains from random init ([weights] "none"), where the whole body always '
            "trains and no depth is searched; remove unfreeze_depth, or give the backbones "
            'pretrained weights in [weights] (e.g. default = "timm" or "pretrain:SOURCE")'
        )
    if config.sets("search.lora_rank") and "lora" not in config.search.unfreeze:
        raise ConfigError(
            f"[search] lora_rank = {config.search.lora_rank!r} has no effect: [search] unfreeze "
            f'= {config.search.unfreeze!r} has no "lora" strategy; add "lora" to unfreeze, '
            "or remove lora_rank"
        )
    return config


def _searched_sizes(raw: dict[str, Any]) -> tuple[dict[str, Any], list[int] | None]:
    """``[data] image_size = [160, 224]``: the sizes (checked like one size each), and
    ``raw`` with the first of them as ``image_size``."""
    data = raw.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("image_size"), list):
        return raw, None
    sizes = data["image_size"]
    size_field = next(f for f in fields(DataSection) if f.name == "image_size")
    if not sizes:
        raise ConfigError("[data] image_size = []: give one size, or a list of sizes to search")
    for size in sizes:
        _check_value("[data] image_size", size_field, size)
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"[data] image_size lists a size twice: {sizes!r}")
    return {**raw, "data": {**data, "image_size": sizes[0]}}, (
        list(sizes) if len(sizes) > 1 else None
    )


def csv_is_multilabel(path: Path) -> bool:
    """Whether a CSV manifest's header names a ``labels`` column (a multi-label manifest)."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError):
        return False  # the source itself says what is wrong when it is read
    return "labels" in [c.strip() for c in header]


def _resolve_task(config: StudyConfig) -> None:
    """The task kind: as set, or multi-label for a csv: source with a labels column; the
    default metric follows it, and a metric of the other task kind is refused."""
    d = config.data
    name, _, argument = d.source.partition(":")
    if name == "csv" and argument and not config.sets("data.task"):
        path = Path(argument).expanduser()
        if csv_is_multilabel(path if path.is_absolute() else config.base_dir / path):
            d.task = "multilabel"
    task = config.task
    single_label = [k for k in SINGLE_LABEL_RECIPE if config.sets(f"search.{k}")]
    if task.multilabel and single_label:
        raise ConfigError(
            f"[search] {', '.join(single_label)}: the class-imbalance answers (class weights, "
            "focal loss, a class-balanced sampler, logit adjustment) assume one label per image, and this study "
            f"is multilabel; remove {'it' if len(single_label) == 1 else 'them'} (for rare "
            'labels try [search] multilabel_loss = "asymmetric"; mixup, CutMix, label '
            "smoothing and the other regularizers work for both)"
        )
    if task.multilabel:  # a preset's single-label keys are defaults: dropped, not refused
        for key in SINGLE_LABEL_RECIPE:
            setattr(config.search, key, None)
    if not config.sets("search.metric"):
        config.search.metric = task.default_metric
        return
    metric = config.search.metric
    other = "multiclass" if task.multilabel else "multilabel"
    if metric not in task.metrics and metric in tasks.metric_names(other):
        raise ConfigError(
            f'[search] metric = "{metric}" is a {other} metric, but this study is {task.name}'
            + (" (its CSV has a labels column)" if not config.sets("data.task") else "")
            + f"; choose one of: {', '.join(task.metrics)}"
        )


@dataclass(frozen=True)
class Constraint:
    """One ``[search] constraints`` entry: ``name <= bound`` or ``name >= bound``."""

    name: str
    op: str
    bound: float

    def violation(self, value: float) -> float:
        """Optuna's convention: <= 0 when satisfied, else by how much it is not."""
        return value - self.bound if self.op == "<=" else self.bound - value


def parse_constraint(text: str) -> Constraint:
    """``"latency_ms <= 20"`` -> Constraint; a ConfigError naming the entry otherwise."""
    parts = text.split()
    ok = len(parts) == 3 and parts[1] in ("<=", ">=")
    try:
        bound = float(parts[2]) if ok else math.nan
    except ValueError:
        bound = math.nan
    if not ok or not math.isfinite(bound):
        raise ConfigError(
            f'[search] constraints: "{text}" is not NAME <= NUMBER or NAME >= NUMBER '
            '(e.g. "latency_ms <= 20")'
        )
    return Constraint(parts[0], parts[1], bound)


def parse_pick(text: str) -> tuple[str, float] | None:
    """``[selection] pick``: None for "best", else (measure, points), e.g. ("latency_ms", 1)."""
    if text == "best":
        return None
    words = text.split()
    if (
        len(words) == 4
        and words[0] in PICK_WORDS
        and words[1] == "within"
        and words[3] in ("point", "points")
    ):
        try:
            points = float(words[2])
        except ValueError:
            points = math.nan
        if math.isfinite(points) and points >= 0:
            return PICK_WORDS[words[0]], points
    raise ConfigError(
        f'[selection] pick = "{text}" is not "best" or "WORD within N points" with WORD one of '
        f'{", ".join(PICK_WORDS)} (e.g. "fastest within 1 point")'
    )


def check_objectives(config: StudyConfig, raw: dict[str, Any]) -> None:
    """[search] objectives, latency and constraints and [selection] pick agree: the first
    objective is the metric, the others are MEASURES, and a constraint or pick only names
    what is measured."""
    s = config.search
    if s.objectives:
        first = s.objectives[0]
        if first in MEASURES:
            raise ConfigError(
                f"[search] objectives starts with {first!r}; the first objective is the metric "
                f'to select by, then the measures, e.g. ["accuracy", "{first}"]'
            )
        for name in s.objectives[1:]:
            if name not in MEASURES:
                raise ConfigError(
                    f"unknown objective {name!r} in [search] objectives"
                    f"{did_you_mean(name, MEASURES)}; after the metric ({first!r}) come "
                    f"measures: {', '.join(MEASURES)}"
                )
        if "metric" in (raw.get("search") or {}) and s.metric != first:
            raise ConfigError(
                f"[search] metric = {s.metric!r} but [search] objectives starts with {first!r}; "
                "the first objective is the metric: drop one of them or make them agree"
            )
        s.metric = first
    measured = s.objectives or [s.metric]
    for text in s.constraints:
        c = parse_constraint(text)
        if c.name not in measured:
            known = [*MEASURES, *METRICS]
            what = "measured" if c.name in known else f"known{did_you_mean(c.name, known)}"
            raise ConfigError(
                f'[search] constraints: "{text}" bounds {c.name!r}, which is not {what}; '
                f"a constraint names one of [search] objectives ({', '.join(measured)}), e.g. "
                '["accuracy", "latency_ms"] with "latency_ms <= 20"'
            )
    if not isinstance(s.latency, dict):
        raise ConfigError(
            f'[search] latency must be a table, e.g. {{device = "cpu", threads = 1}}, got '
            f"{_type_name(s.latency)} {s.latency!r}"
        )
    for key in s.latency:
        if key not in LATENCY_DEFAULTS:
            raise ConfigError(
                f"unknown key {key!r} in [search] latency{did_you_mean(key, LATENCY_DEFAULTS)}; "
                f"allowed: {', '.join(LATENCY_DEFAULTS)}"
            )
    target = s.latency_target()
    for key in ("threads", "batch_size"):
        value = target[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"[search] latency {key} = {value!r} must be an integer >= 1")
    if target["runtime"] not in LATENCY_RUNTIMES:
        raise ConfigError(
            f"[search] latency runtime = {target['runtime']!r} is not allowed"
            f"{did_you_mean(str(target['runtime']), LATENCY_RUNTIMES)}; choose one of: "
            f"{', '.join(LATENCY_RUNTIMES)}"
        )
    if not isinstance(target["device"], str) or target["device"].split(":")[0] not in (
        "cpu",
        "cuda",
    ):
        raise ConfigError(
            f'[search] latency device = {target["device"]!r} must be "cpu" or "cuda" '
            '(or "cuda:N"): the device the model will run on'
        )
    pick = parse_pick(config.selection.pick)
    if pick is not None and pick[0] not in s.measures:
        raise ConfigError(
            f'[selection] pick = "{config.selection.pick}" needs {pick[0]!r} measured; add it '
            f'to [search] objectives (e.g. ["{s.metric}", "{pick[0]}"]) or pick "best"'
        )


#: under ``[data] orientation = "fixed"``, the default ``[search] augmentations`` with these
#: built-in policies swapped for their orientation-safe twins
FIXED_ORIENTATION_SWAPS = {"flip_crop": "crop"}


def _plugin_path(spec: str, base_dir: Path) -> str:
    """A plugin file of the study resolved against the study file's folder; a module as is."""
    if not (spec.endswith(".py") or "/" in spec or "\\" in spec):
        return spec
    path = Path(spec).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def _check_weights(config: StudyConfig, backbone: str, value: str | list[str]) -> None:
    """One source, or a list of them searched as the ``weights`` parameter."""
    key = f"[weights] {backbone}"
    if isinstance(value, list):
        if not value or len(set(value)) != len(value):
            raise ConfigError(f"{key} = {value!r}: list each source once, at least one")
        lists = [v for v in config.weights.values() if isinstance(v, list)]
        if any(v != value for v in lists):
            raise ConfigError(
                f"[weights] lists differ ({', '.join(map(repr, lists))}); the searched `weights` "
                "parameter has one set of choices: write the list once, as default"
            )
    for choice in value if isinstance(value, list) else [value]:
        weightsource.validate(weightsource.parse(choice, config.base_dir), key)


def metric_direction(name: str, registry=None) -> Direction:
    """Which way ``name`` is better: the built-in metrics are higher-is-better in [0, 1]; a
    plugin's metric (``register_metrics``) says so itself (``higher_is_better``, ``range``)."""
    if name in METRICS or name in tasks.MULTILABEL_METRICS:
        return MAXIMIZE
    if registry is None:
        raise ValueError(f"metric {name!r} is a plugin's: its direction needs the registry")
    metric = registry.get("metrics", name)
    low, high = metric.range
    return Direction(bool(metric.higher_is_better), (float(low), float(high)))


def check_named_weights(config: StudyConfig, registry) -> None:
    """Every backbone of ``[search]`` takes every named source ``[weights]`` gives it; run
    before anything trains (files, ``local-dir:`` and ``pretrain:`` are checked when the
    study file is read)."""
    weightsource.check_named_sources(
        config.weights, config.search.backbones, registry, config.base_dir
    )


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read and validate a study file; ``overrides`` are ``"section.key": value`` pairs."""
    path = Path(path)
    if path.is_dir() and (path.parent / f"{path.name}.toml").is_file():
        path = path.parent / f"{path.name}.toml"  # accept the output folder for the study file
    if not path.is_file():
        raise ConfigError(
            f"study file {path} does not exist; pass a .toml file such as studies/digits.toml"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r}); "
            "TOML files are UTF-8: save it as UTF-8"
        ) from exc
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if not key:  # a top-level key (preset)
            raw[section] = value
            continue
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw, path.resolve())
