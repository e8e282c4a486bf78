"""Contract checks every component must pass — built-in or third-party.

Like Optuna's ``BasicSamplerTestCase`` and Kornia's ``CommonTests``: one suite, run over every
registered implementation. Use them in a plugin's own tests::

    from automl_tl.testing import check_backbone
    from my_plugin import MyBackbone

    def test_contract():
        check_backbone(MyBackbone())

Each check raises ``AssertionError`` with a sentence a plugin author can act on.

:func:`check_plugin` runs every check that applies to everything a plugin registers, and calls
its lifecycle hooks the way a search does (``automl-tl plugins --check MODULE`` prints it)::

    from automl_tl.testing import assert_plugin_passes

    def test_plugin():
        assert_plugin_passes("my_plugin")  # a module name, a .py file or an entry-point name
"""

from __future__ import annotations

import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .components import (
    AugmentationPolicy,
    Backbone,
    DatasetSource,
    Metric,
    UnfreezeStrategy,
    flipped_outputs,
)
from .train import parameter_shapes

NUM_CLASSES = 3
IMAGE_SIZE = 32


def check_backbone(backbone: Backbone, image_size: int = IMAGE_SIZE) -> None:
    """create() gives a fresh head of the right size; groups are ordered, disjoint, head-free."""
    assert isinstance(backbone, Backbone), f"{backbone!r} must subclass automl_tl.Backbone"
    assert backbone.name, "a backbone needs a non-empty name"
    torch.manual_seed(0)
    model = backbone.create(NUM_CLASSES, weights="none", image_size=image_size)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, image_size, image_size))
    assert tuple(out.shape) == (2, NUM_CLASSES), (
        f"{backbone.name}: create(num_classes={NUM_CLASSES}) must give logits of shape (B, {NUM_CLASSES}), "
        f"got {tuple(out.shape)}"
    )
    names = [n for n, _ in model.named_parameters()]
    head = backbone.head_parameters(model)
    assert head, (
        f"{backbone.name}: head_parameters() is empty; return the classifier's parameter names"
    )
    assert set(head) <= set(names), f"{backbone.name}: head_parameters() names unknown parameters"
    groups = backbone.layer_groups(model)
    assert groups, f"{backbone.name}: layer_groups() is empty; return at least one body group"
    flat = [n for g in groups for n in g]
    assert len(flat) == len(set(flat)), f"{backbone.name}: a parameter appears in two layer groups"
    assert not set(flat) & set(head), f"{backbone.name}: layer_groups() must not include the head"
    missing = [n for n in names if n not in set(flat) | set(head)]
    assert not missing, (
        f"{backbone.name}: {len(missing)} parameter(s) in no layer group and not in the head: "
        f"{', '.join(missing[:10])}{', …' if len(missing) > 10 else ''}. Add them to a group "
        "in layer_groups() (ordered input -> output) or name them in head_parameters()"
    )
    order = {n: i for i, n in enumerate(names)}
    firsts = [min(order[n] for n in g) for g in groups]
    assert firsts == sorted(firsts), (
        f"{backbone.name}: layer groups must be ordered input -> output"
    )
    cfg = backbone.data_config(model)
    assert len(cfg.mean) == 3 and len(cfg.std) == 3, (
        f"{backbone.name}: data_config needs 3-channel mean/std"
    )
    assert all(s > 0 for s in cfg.std), f"{backbone.name}: data_config std must be positive"


def check_policy(policy: AugmentationPolicy, image_size: int = IMAGE_SIZE) -> None:
    """Strength 0 is the identity; shape, dtype and [0, 1] range are kept; same seed, same output."""
    assert isinstance(policy, AugmentationPolicy), (
        f"{policy!r} must subclass automl_tl.AugmentationPolicy"
    )
    torch.manual_seed(0)
    x = torch.rand(8, 3, image_size, image_size)
    identity = policy.build(0.0, image_size)
    assert torch.equal(identity(x), x), (
        f"policy {policy.name!r}: strength 0.0 must return the batch unchanged"
    )
    for strength in (0.5, 1.0):
        aug = policy.build(strength, image_size)
        torch.manual_seed(1)
        a = aug(x.clone())
        torch.manual_seed(1)
        b = aug(x.clone())
        assert a.shape == x.shape and a.dtype == x.dtype, (
            f"policy {policy.name!r} at strength {strength}: output {tuple(a.shape)} {a.dtype} must match "
            f"the input {tuple(x.shape)} {x.dtype}"
        )
        assert torch.equal(a, b), (
            f"policy {policy.name!r}: the same seed must give the same augmentation"
        )
        assert float(a.min()) >= -1e-4 and float(a.max()) <= 1 + 1e-4, (
            f"policy {policy.name!r} at strength {strength}: values left [0, 1] "
            f"({float(a.min()):.3f}..{float(a.max()):.3f}); clamp the output"
        )


def check_policy_orientation(policy: AugmentationPolicy, image_size: int = IMAGE_SIZE) -> None:
    """A policy declared orientation-safe (``flips = False``, ``max_rotation_deg`` at most
    30°) never mirrors the probe image in 256 draws at strength 1.0; declarations are typed."""
    assert isinstance(policy.flips, bool), f"policy {policy.name!r}: flips must be a bool"
    assert isinstance(policy.max_rotation_deg, (int, float)) and policy.max_rotation_deg >= 0, (
        f"policy {policy.name!r}: max_rotation_deg must be a number >= 0"
    )
    if not policy.orientation_safe:
        return
    flipped = flipped_outputs(policy, image_size)
    assert not flipped, (
        f"policy {policy.name!r} declares flips = False and max_rotation_deg = "
        f"{policy.max_rotation_deg}, but {flipped} of 256 augmented probe images came out "
        "mirrored (closer to the flipped image than to the original); set flips = True on the "
        'policy (it is then left out of studies with [data] orientation = "fixed")'
    )


class StrategyProbe(nn.Module):
    """The model :func:`check_strategy` runs a strategy on: four body groups like a small
    hybrid backbone (a convolution with BatchNorm, a convolution block, an MLP, and a final
    LayerNorm alone, as a ViT's last group) and a linear head."""

    groups = ("stem", "block", "mlp", "norm")

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x)).mean(dim=(2, 3))
        return self.head(self.norm(x + self.mlp(x)))

    def layer_groups(self) -> list[list[str]]:
        return [[f"{g}.{n}" for n, _ in getattr(self, g).named_parameters()] for g in self.groups]


def check_strategy(strategy: UnfreezeStrategy) -> None:
    """Run on :class:`StrategyProbe` at every depth: ``adapt()`` returns one list of the
    model's body parameters per group and leaves the model alone at depth 0; depth 0 trains
    only the head; param groups are disjoint, known and include the head; depth ≥ 1 trains
    (some of) the top group; full depth reaches the input; ``merge()`` gives back the
    model's own parameters (names and shapes) and its outputs."""
    assert isinstance(strategy, UnfreezeStrategy), (
        f"{strategy!r} must subclass automl_tl.UnfreezeStrategy"
    )
    assert isinstance(strategy.from_scratch, bool), (
        f"strategy {strategy.name!r}: from_scratch must be a bool"
    )
    head = ["head.weight", "head.bias"]
    epochs = 4
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for depth in range(len(StrategyProbe.groups) + 1):
        torch.manual_seed(0)
        model = StrategyProbe()
        groups = model.layer_groups()
        created = parameter_shapes(model)
        original = {n for n, _ in model.named_parameters()}
        adapted = strategy.adapt(model, [list(g) for g in groups], list(head), depth)
        assert isinstance(adapted, list) and len(adapted) == len(groups), (
            f"strategy {strategy.name!r}: adapt() must return a list of {len(groups)} layer "
            f"groups (one per group it got, possibly a subset of it), got {adapted!r:.200}"
        )
        params = dict(model.named_parameters())
        unknown = [n for g in adapted for n in g if n not in params or n in head]
        assert not unknown, (
            f"strategy {strategy.name!r}: adapt() at depth {depth} returned names that are no "
            f"body parameter of the adapted model: {unknown[:5]}"
        )
        if depth == 0:
            assert parameter_shapes(model) == created, (
                f"strategy {strategy.name!r}: adapt() at depth 0 must leave the model unchanged "
                "(a linear probe trains the head on the body's cached features)"
            )
        everything = {n for g in adapted for n in g} | set(head)
        pgs = strategy.param_groups(adapted, head, depth)
        named = [n for pg in pgs for n in pg.names]
        assert len(named) == len(set(named)), (
            f"strategy {strategy.name!r}: a parameter is in two param groups"
        )
        assert set(named) <= everything, (
            f"strategy {strategy.name!r}: param_groups() names parameters that are not in the "
            "layer groups adapt() returned"
        )
        assert set(head) <= set(named), (
            f"strategy {strategy.name!r}: the head must always be in param_groups()"
        )
        assert all(pg.lr_scale > 0 for pg in pgs), (
            f"strategy {strategy.name!r}: lr_scale must be positive"
        )
        for epoch in range(epochs):
            trainable = strategy.trainable(epoch, epochs, adapted, head, depth)
            if depth == 0:
                assert trainable == set(head), (
                    f"strategy {strategy.name!r}: depth 0 is a linear probe, so only the head "
                    f"may train (epoch {epoch} trains {sorted(trainable)})"
                )
            assert trainable <= set(named), (
                f"strategy {strategy.name!r}: trainable() at epoch {epoch} names parameters that "
                "are not in param_groups(), so the optimizer would never update them"
            )
            assert set(head) <= trainable, (
                f"strategy {strategy.name!r}: the head must train at every epoch"
            )
            if strategy.from_scratch and depth == len(groups):
                assert original <= trainable, (
                    f"strategy {strategy.name!r} declares from_scratch = True, so at full depth "
                    f"the whole body must train from the first epoch (epoch {epoch} freezes "
                    "some); set from_scratch = False"
                )
        if depth:
            assert set(adapted[-1]) & set(named), (
                f"strategy {strategy.name!r}: depth {depth} must include the top group (all of "
                "its parameters, or the subset adapt() returns for it, such as its biases)"
            )
        if depth == len(groups):
            final = strategy.trainable(epochs - 1, epochs, adapted, head, depth)
            assert set(adapted[0]) & final, (
                f"strategy {strategy.name!r}: at full depth the lowest group (or the subset "
                "adapt() returns for it) must train by the last epoch"
            )
        _check_merge(strategy, model, original, created, x, depth)


def _check_merge(strategy, model, original, created, x, depth) -> None:
    """merge() after a stand-in for training (every added parameter moved off its init)
    gives back the model's own tensors and the adapted model's outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in original:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model.eval()
    with torch.no_grad():
        before = model(x)
    merged = strategy.merge(model)
    assert isinstance(merged, nn.Module), (
        f"strategy {strategy.name!r}: merge() must return the model"
    )
    now = parameter_shapes(merged)
    assert now == created, (
        f"strategy {strategy.name!r}: after merge() at depth {depth} the model must have exactly "
        f"the backbone's tensors (added: {sorted(set(now) - set(created))[:3]}, missing: "
        f"{sorted(set(created) - set(now))[:3]}); fold what adapt() added into the backbone's "
        "own parameters (automl_tl.adapters.merge_lora does for LoRA layers)"
    )
    with torch.no_grad():
        diff = float((merged.eval()(x) - before).abs().max())
    assert diff <= 1e-4, (
        f"strategy {strategy.name!r}: merge() at depth {depth} changed the model's outputs by "
        f"{diff:.3g}; the merged weights must compute what the adapted model computed"
    )


def check_dataset_source(source: DatasetSource) -> None:
    """The source has a name and says whether it needs an argument."""
    assert isinstance(source, DatasetSource), f"{source!r} must subclass automl_tl.DatasetSource"
    assert source.name and ":" not in source.name, (
        f"dataset source name {source.name!r} must be non-empty, without ':'"
    )
    assert isinstance(source.needs_argument, bool), (
        f"dataset source {source.name!r}: needs_argument must be a bool"
    )


def check_metric(metric: Metric) -> None:
    """A name, a sane range and direction; on perfect, random and constant predictions
    (several class counts) the score is a finite float inside the declared range."""
    import numpy as np

    assert isinstance(metric, Metric), f"{metric!r} must subclass automl_tl.Metric"
    assert metric.name, "a metric needs a non-empty name"
    low, high = metric.range
    assert low < high, f"metric {metric.name!r}: range must be (low, high) with low < high"
    assert isinstance(metric.higher_is_better, bool), (
        f"metric {metric.name!r}: higher_is_better must be a bool"
    )
    rng = np.random.default_rng(0)
    for classes in (2, 5):
        y = np.repeat(np.arange(classes), 6).astype("int64")
        perfect = np.eye(classes, dtype="float32")[y]
        random = rng.dirichlet(np.ones(classes), size=len(y)).astype("float32")
        constant = np.tile(np.eye(classes, dtype="float32")[0], (len(y), 1))
        for what, probs in (("perfect", perfect), ("random", random), ("constant", constant)):
            try:
                metric.checked(y, probs)
            except Exception as exc:
                raise AssertionError(
                    f"metric {metric.name!r} on {what} predictions of {classes} classes: {exc}"
                ) from exc


def check_backbone_weights(backbone: Backbone, image_size: int = IMAGE_SIZE) -> None:
    """``create(num_classes, weights=PATH)`` loads a file saved from the backbone's own model.

    The file's head has another number of classes (as weights from another task would), so the
    head must be replaced and every other tensor loaded.
    """
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = backbone.create(NUM_CLASSES + 2, weights="none", image_size=image_size)
    state = {k: v.detach().clone().contiguous() for k, v in source.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{backbone.name}.safetensors"
        save_file(state, str(path))
        torch.manual_seed(1)
        model = backbone.create(NUM_CLASSES, weights=str(path), image_size=image_size)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, image_size, image_size))
    assert tuple(out.shape) == (2, NUM_CLASSES), (
        f"{backbone.name}: create({NUM_CLASSES}, weights=PATH) must replace the file's "
        f"{NUM_CLASSES + 2}-class head with a {NUM_CLASSES}-class one, got logits {tuple(out.shape)}"
    )
    own = model.state_dict()
    head = backbone.head_parameters(model)
    head_prefixes = tuple(n.rsplit(".", 1)[0] + "." for n in head)
    body = [k for k in state if k in own and k not in head and not k.startswith(head_prefixes)]
    assert body, f"{backbone.name}: no tensor of the weights file matches the model's names"
    unloaded = [k for k in body if not torch.equal(own[k], state[k])]
    assert not unloaded, (
        f"{backbone.name}: create(weights=PATH) left {len(unloaded)} of {len(body)} tensors "
        f"unloaded (e.g. {unloaded[:3]}); read the file with "
        "automl_tl.weights.load_weights(model, path, self.head_parameters(model))"
    )


def check_backbone_weight_sources(backbone: Backbone, image_size: int = IMAGE_SIZE) -> None:
    """``check_weights("none")`` accepts; a named source no plugin defines is refused with a
    ``UserError`` (or ``ValueError``) that says what the backbone takes. Offline, no model built.

    ``image_size`` is unused: it keeps the signature of the other backbone checks.
    """
    from .errors import UserError

    try:
        backbone.check_weights("none")
    except Exception as exc:
        raise AssertionError(
            f"{backbone.name}: check_weights('none') must accept it (every backbone takes "
            f'"none"), got {type(exc).__name__}: {exc}'
        ) from exc
    made_up = "no_such_source:no_such_tag"
    try:
        backbone.check_weights(made_up)
    except (UserError, ValueError) as exc:
        assert str(exc).strip(), (
            f"{backbone.name}: check_weights({made_up!r}) must say which sources it takes"
        )
    else:
        raise AssertionError(
            f"{backbone.name}: check_weights({made_up!r}) accepted a source nobody defines; "
            "raise automl_tl.UserError naming the sources (and tags) the backbone takes"
        )


# ---------------------------------------------------------------------------------------------
# a whole plugin


@dataclass
class CheckResult:
    """One check of :func:`check_plugin`: what was checked, and the problem when it failed."""

    kind: str  # "plugin", "backbone", "augmentation policy", "unfreeze strategy", "dataset", "hook"
    name: str
    check: str
    ok: bool
    problem: str | None = None

    def __str__(self) -> str:
        head = f"{'ok  ' if self.ok else 'FAIL'}  {self.kind} {self.name}: {self.check}"
        return head if self.ok else f"{head}\n        {self.problem}"


#: kind -> [(what is checked, check function)]
_CHECKS = {
    "backbones": [
        ("contract (shape, head, layer groups, data config)", check_backbone),
        ("loads a weights file saved from itself", check_backbone_weights),
        ("refuses a weight source it does not know", check_backbone_weight_sources),
    ],
    "augmentation_policies": [
        ("contract (identity at 0, shape, range, seed)", check_policy),
        ("keeps orientation when it says so (no flips)", check_policy_orientation),
    ],
    "unfreeze_strategies": [
        ("contract (linear probe at 0, param groups, adapt and merge)", check_strategy)
    ],
    "datasets": [("contract (name, argument)", check_dataset_source)],
    "metrics": [("contract (finite, in its range, on any predictions)", check_metric)],
}

_HINTS = {
    "backbones": "create(num_classes, weights='none', image_size=None) must build the model "
    "offline, without downloading anything",
    "augmentation_policies": "build(strength, image_size) must return an nn.Module",
    "unfreeze_strategies": "adapt(model, groups, head, depth) must return one list of names per "
    "layer group, param_groups(groups, head, depth) ParamGroup objects",
    "datasets": "",
    "metrics": "score(y_true, y_pred) must return a float within the metric's range",
}


def _failure(exc: BaseException, hint: str = "") -> str:
    if isinstance(exc, AssertionError):
        return str(exc)
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    text = f"raised {type(exc).__name__}: {exc}{where}"
    return f"{text}. {hint}" if hint else text


def _lifecycle_calls(output_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """A search in miniature: a complete trial, a failed one, a pruned one, the end."""
    params = {
        "backbone": "test_resnet",
        "augmentation": "flip_crop",
        "aug_strength": 0.5,
        "unfreeze": "top_k",
        "unfreeze_depth": 0.5,
        "lr": 1e-3,
        "weight_decay": 1e-4,
    }

    def metrics(epoch: int) -> dict[str, Any]:
        val = {"accuracy": 0.5 + 0.1 * epoch, "balanced_accuracy": 0.5, "macro_f1": 0.45}
        return {
            "train_loss": 1.0 / (epoch + 1),
            "lr": 1e-3,
            "seconds": 1.5,
            "images_per_s": 200.0,
            "val": val,
        }

    study = {"study_name": "contract-check", "output_dir": output_dir}
    calls: list[tuple[str, dict[str, Any]]] = []
    for number, state, epochs in ((0, "COMPLETE", 2), (1, "FAIL", 0), (2, "PRUNED", 1)):
        trial = {"study_name": "contract-check", "trial_number": number}
        calls.append(("trial_started", {**trial, "params": params, "output_dir": output_dir}))
        for epoch in range(epochs):
            calls.append(("epoch_finished", {**trial, "epoch": epoch, "metrics": metrics(epoch)}))
        attrs: dict[str, Any] = {"epochs_run": epochs, "device": "cpu"}
        if state == "FAIL":
            attrs["fail_reason"] = "out of memory: CUDA out of memory"
        value = 0.6 if state == "COMPLETE" else None
        calls.append(("trial_finished", {**trial, "state": state, "value": value, "attrs": attrs}))
    calls.append(
        ("study_finished", {**study, "best": {"number": 0, "value": 0.6, "params": params}})
    )
    return calls


def _resolve_spec(spec: str) -> str:
    """An installed entry-point name (``example_backbone``) -> its module; others unchanged."""
    import importlib.metadata

    from .plugins import ENTRY_POINT_GROUP

    looks_like_file = spec.endswith(".py") or "/" in spec
    if looks_like_file:
        return spec
    # an entry point first: "torchvision" is the plugin, not the library of the same name
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            return ep.value.split(":")[0]
    return spec


def check_plugin(
    spec: str,
    base_dir: Path | None = None,
    *,
    only: str | None = None,
    image_size: int = IMAGE_SIZE,
) -> list[CheckResult]:
    """Load one plugin (module name, ``.py`` file or entry-point name) next to the default
    plugins and check everything it registers and every lifecycle hook it implements.

    Args:
        spec: the plugin.
        base_dir: where a relative ``.py`` path is looked for.
        only: check only the components whose names match this shell pattern (a plugin with
            dozens of backbones, say ``"tv_resnet*"``).
        image_size: the input size backbones and policies are checked at.

    Never raises for a broken plugin: each problem is a failed :class:`CheckResult`.
    """
    import fnmatch
    import functools

    import pluggy

    from . import hookspecs
    from .errors import UserError, did_you_mean
    from .plugins import DEFAULT_PLUGINS, load_plugin
    from .registry import KINDS, Registry

    results: list[CheckResult] = []
    pm = pluggy.PluginManager("automl_tl")
    pm.add_hookspecs(hookspecs)
    import importlib

    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    spec = _resolve_spec(spec)
    try:
        info = load_plugin(pm, spec, base_dir)
    except UserError as exc:
        return [CheckResult("plugin", spec, "loads", False, str(exc))]
    name = info.name
    plugin = pm.get_plugin(name)
    known = [n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "automl_tl_spec")]
    unknown = [
        hook
        for hook in dir(plugin)
        if getattr(getattr(plugin, hook, None), "automl_tl_impl", None) is not None
        and hook not in known
    ]
    for hook in unknown:
        results.append(
            CheckResult(
                "plugin",
                name,
                f"hook {hook} exists",
                False,
                f"{hook} is marked @automl_tl.hookimpl but no such hook exists{did_you_mean(hook, known)}; "
                "the hooks are listed in docs/writing-plugins.md",
            )
        )
    results.append(CheckResult("plugin", name, f"loads ({info.source})", True))
    try:
        registry = Registry.from_plugin_manager(pm)
    except UserError as exc:
        results.append(CheckResult("plugin", name, "registers valid components", False, str(exc)))
        return results
    registered = 0
    for kind, checks in _CHECKS.items():
        label = KINDS[kind][2]
        for component in sorted(registry.names(kind)):
            if registry.plugin_of(kind, component) != name:
                continue
            if only is not None and not fnmatch.fnmatchcase(component, only):
                continue
            registered += 1
            obj = registry.get(kind, component)
            for what, check in checks:
                if kind in ("backbones", "augmentation_policies"):
                    check = functools.partial(check, image_size=image_size)
                try:
                    check(obj)
                except Exception as exc:
                    problem = _failure(exc, _HINTS[kind])
                    results.append(CheckResult(label, component, what, False, problem))
                else:
                    results.append(CheckResult(label, component, what, True))
    lifecycle = ("trial_started", "epoch_finished", "trial_finished", "study_finished")
    impls = {
        hook: [i for i in getattr(pm.hook, hook).get_hookimpls() if i.plugin_name == name]
        for hook in lifecycle
    }
    implemented = [hook for hook in lifecycle if impls[hook]]
    if implemented:
        with tempfile.TemporaryDirectory() as output_dir:
            failed: dict[str, str] = {}
            for hook, kwargs in _lifecycle_calls(output_dir):
                for impl in impls[hook]:
                    if hook in failed:
                        continue
                    try:
                        impl.function(**{a: kwargs[a] for a in impl.argnames})
                    except Exception as exc:
                        failed[hook] = f"{_failure(exc)} (called with {sorted(kwargs)})"
            for hook in implemented:
                ok = hook not in failed
                results.append(
                    CheckResult(
                        "hook", hook, "runs through a miniature search", ok, failed.get(hook)
                    )
                )
    if not registered and not implemented and not unknown:
        results.append(
            CheckResult(
                "plugin",
                name,
                "does something",
                False,
                "it registers nothing and implements no hook; mark functions with "
                "@automl_tl.hookimpl (see docs/writing-plugins.md)",
            )
        )
    return results


def assert_plugin_passes(spec: str, base_dir: Path | None = None, **options) -> list[CheckResult]:
    """:func:`check_plugin` (same options), raising ``AssertionError`` listing every failure."""
    results = check_plugin(spec, base_dir, **options)
    failed = [r for r in results if not r.ok]
    assert not failed, f"plugin {spec}: {len(failed)} check(s) failed:\n" + "\n".join(
        str(r) for r in failed
    )
    return results
