"""Pretrain a backbone on a source dataset, once, so studies can fine-tune it on small tasks.

``automl-tl pretrain --backbone NAME --data SOURCE --epochs E --image-size S --out FILE`` (and
the ``pretrain:SOURCE`` weight source of a study) trains the backbone with the project's own
loop (:func:`automl_tl.train.fit`: full fine-tune, AdamW, warm-up + cosine) on SOURCE's train
split, scores it on SOURCE's held-out test split, and writes:

- ``FILE`` (``.safetensors``): the backbone's weights without its classifier head, so a study
  loads them for any number of classes (the head starts fresh);
- ``FILE`` with the suffix ``.json``: what was trained and how well — backbone, source,
  classes, epochs, image size, held-out accuracy, the data fingerprint, the cache key and the
  weights' sha256.

Cached by content: the key hashes the data fingerprint and every training setting, so running
again with the same inputs only checks the sidecar and the file's hash; different inputs
retrain and replace both files (each written atomically).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import weightsource
from ._util import node_lock, sha256_file, write_atomic
from .errors import UserError
from .registry import Registry

log = logging.getLogger("automl_tl")

#: Bump when the training recipe changes, so old caches are rebuilt.
RECIPE_VERSION = 1
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1


@dataclass(frozen=True)
class PretrainSpec:
    """Everything that decides the pretrained weights (the cache key hashes all of it)."""

    backbone: str
    source: str
    image_size: int = 32
    epochs: int = 10
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    augmentation: str = "none"
    aug_strength: float = 0.5
    seed: int = 0
    #: the weights training starts from: "none" (random init), "timm", a file, local-dir:DIR
    init: str = "none"


@dataclass
class PretrainResult:
    path: Path
    meta: dict[str, Any]
    cached: bool


def sidecar_path(path: str | Path) -> Path:
    """``weights.safetensors`` -> ``weights.json``."""
    return Path(path).with_suffix(".json")


def cache_key(spec: PretrainSpec, data_fingerprint: str) -> str:
    """The content key: recipe version, data fingerprint and every setting of ``spec``."""
    fields = {**asdict(spec), "init": weightsource.parse(spec.init).identity()}
    text = json.dumps(
        {"recipe": RECIPE_VERSION, "data": data_fingerprint, **fields}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The JSON beside pretrained weights, or None when it is missing or unreadable."""
    try:
        return json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None


def _up_to_date(path: Path, key: str) -> dict[str, Any] | None:
    meta = read_sidecar(path)
    if not meta or meta.get("key") != key or not path.is_file():
        return None
    # the sidecar is written after the weights; a hash mismatch means a half-replaced pair
    return meta if meta.get("sha256") == sha256_file(path) else None


def pretrain(
    spec: PretrainSpec,
    out: str | Path,
    registry: Registry,
    *,
    base_dir: Path | None = None,
    cache_dir: Path | None = None,
    device: str = "auto",
    force: bool = False,
    block: bool = True,
) -> PretrainResult:
    """Train ``spec.backbone`` on ``spec.source`` and write its weights to ``out`` (cached).

    Args:
        spec: what to train; the cache key hashes it with the data's fingerprint.
        out: the ``.safetensors`` file to write; its ``.json`` sidecar goes beside it.
        registry: where the backbone, dataset source and augmentation policy come from.
        base_dir: relative dataset paths are resolved against it (default: the cwd).
        cache_dir: where the decoded images are cached (default: none, decode in memory).
        device: ``auto``, ``cpu``, ``cuda``, ...
        force: retrain even when ``out`` is up to date.
        block: wait while another process of this node builds ``out``; False raises
            ``BlockingIOError`` instead (:func:`ensure_study_weights` then takes another).
    """
    from .data import content_fingerprint, fingerprint, load_dataset, record_digests

    out = Path(out)
    _check_spec(spec, out)
    base_dir = base_dir or Path.cwd()
    backbone = registry.get("backbones", spec.backbone)
    registry.get("augmentation_policies", spec.augmentation)
    # "timm:TAG", a plugin's source: checked before any data is read
    weightsource.check_named(
        backbone,
        weightsource.parse(spec.init),
        f'--init "{spec.init}"',
        '"none", a file, "local-dir:DIR"',
    )
    dataset = load_dataset(registry, spec.source, base_dir)
    records = dataset.records
    # paths + sizes, and the bytes: a same-size edit of an image is a new data set (the
    # digests come from the decoded cache when it is current, else one read of each file)
    content, _ = content_fingerprint(records, record_digests(records, spec.image_size, cache_dir))
    key = cache_key(spec, f"{fingerprint(records)}|{content}")
    if not force:
        meta = _up_to_date(out, key)
        if meta is not None:
            log.info("pretrained %s on %s is up to date: %s", spec.backbone, spec.source, out)
            return PretrainResult(out, meta, cached=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with node_lock(out.with_name(f".{out.name}.lock"), block=block):
        # another worker of this node may have built it while we waited for the lock
        meta = None if force else _up_to_date(out, key)
        if meta is not None:
            return PretrainResult(out, meta, cached=True)
        return _train(spec, out, key, registry, base_dir, cache_dir, device)


def _check_spec(spec: PretrainSpec, out: Path) -> None:
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: pretrained weights are written as a .safetensors file")
    for name, value, low in (
        ("epochs", spec.epochs, 1),
        ("image size", spec.image_size, 8),
        ("batch size", spec.batch_size, 2),
    ):
        if value < low:
            raise UserError(f"pretrain {name} = {value} is too small; it must be at least {low}")
    if not 0 <= spec.seed < 2**32:
        raise UserError(f"pretrain seed = {spec.seed} is out of range; use 0 … {2**32 - 1}")
    finite = all(math.isfinite(v) for v in (spec.lr, spec.weight_decay, spec.aug_strength))
    if (
        not finite
        or not spec.lr > 0
        or not 0.0 <= spec.aug_strength <= 1.0
        or spec.weight_decay < 0
    ):
        raise UserError(
            f"pretrain needs lr > 0 (got {spec.lr}), weight decay >= 0 (got "
            f"{spec.weight_decay}) and an augmentation strength in [0, 1] (got {spec.aug_strength})"
        )


def _train(
    spec: PretrainSpec,
    out: Path,
    key: str,
    registry: Registry,
    base_dir: Path,
    cache_dir: Path | None,
    device: str,
) -> PretrainResult:
    from safetensors.torch import save_file

    from .data import prepare_data
    from .train import Choice, evaluate, fit, resolve_device

    splits = prepare_data(
        registry,
        spec.source,
        image_size=spec.image_size,
        val_fraction=VAL_FRACTION,
        test_fraction=TEST_FRACTION,
        seed=spec.seed,
        base_dir=base_dir,
        cache_dir=cache_dir,
    )
    choice = Choice(
        backbone=spec.backbone,
        weights=spec.init,
        augmentation=spec.augmentation,
        aug_strength=spec.aug_strength if spec.augmentation != "none" else 0.0,
        unfreeze="top_k",
        unfreeze_depth=1.0,  # every layer trains
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
    )
    device_t = resolve_device(device)
    log.info(
        "pretraining %s on %s (%d classes, %d train images, %d epochs, %s)",
        spec.backbone,
        spec.source,
        len(splits.class_names),
        len(splits.train),
        spec.epochs,
        device_t,
    )

    def on_epoch(r) -> None:
        log.info(
            "  pretrain epoch %d/%d: loss %.4f, val accuracy %.4f",
            r.epoch + 1,
            spec.epochs,
            r.train_loss,
            r.val["accuracy"],
        )

    started = time.perf_counter()
    result = fit(
        choice,
        splits,
        registry,
        device=device_t,
        seed=spec.seed,
        train_on="train",
        evaluate_on="val",
        on_epoch=on_epoch,
    )
    num_classes = len(splits.class_names)
    test = evaluate(result.model, splits.test, num_classes, result.data_config, device_t)
    head = set(result.backbone.head_parameters(result.model))
    head_prefixes = tuple(n.rsplit(".", 1)[0] + "." for n in head)
    body = {
        k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
        for k, v in result.model.state_dict().items()
        if k not in head and not k.startswith(head_prefixes)
    }
    write_atomic(out, lambda tmp: save_file(body, tmp, metadata={"format": "pt"}))
    import timm
    import torch

    from . import __version__

    meta = {
        "backbone": spec.backbone,
        "source": spec.source,
        "classes": splits.class_names,
        "epochs": spec.epochs,
        "image_size": spec.image_size,
        "accuracy": round(test["accuracy"], 6),
        "val_accuracy": round(result.val["accuracy"], 6) if result.val else None,
        "images": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "settings": asdict(spec),
        "head": "removed (a study adds a fresh head for its own classes)",
        "data_fingerprint": splits.fingerprint,
        "key": key,
        "sha256": sha256_file(out),
        "seconds": round(time.perf_counter() - started, 3),
        "device": str(device_t),
        "versions": {
            "automl_tl": __version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
        },
    }
    write_atomic(sidecar_path(out), json.dumps(meta, indent=2))
    log.info(
        "pretrained %s on %s: held-out accuracy %.4f in %.1fs -> %s",
        spec.backbone,
        spec.source,
        meta["accuracy"],
        meta["seconds"],
        out,
    )
    return PretrainResult(out, meta, cached=False)


def study_specs(config) -> list[tuple[PretrainSpec, Path]]:
    """Every ``pretrain:SOURCE`` weight source of a study, with the file it resolves to."""
    p = config.pretrain
    specs = []
    for backbone, _, text in weightsource.entries(config.weights, config.search.backbones):
        source = weightsource.parse(text, config.base_dir)
        if source.kind == "pretrain":
            spec = PretrainSpec(
                backbone=backbone,
                source=source.target,
                image_size=config.data.image_size,
                epochs=p.epochs,
                lr=p.lr,
                weight_decay=p.weight_decay,
                batch_size=p.batch_size,
                augmentation=p.augmentation,
                aug_strength=p.aug_strength,
                seed=config.data.seed,
            )
            specs.append((spec, config.pretrained_path(backbone, spec.source)))
    return specs


def ensure_study_weights(config, registry: Registry, device: str = "auto") -> list[PretrainResult]:
    """Build (or find up to date) the weights of every ``pretrain:SOURCE`` in ``[weights]``.

    The workers of a node share the builds, first come first served: each takes the first
    backbone no other worker is building (its lock is free), so N workers build N backbones
    side by side, each on its own GPU; then each waits for the builds the others took.
    """
    specs = study_specs(config)

    def build(spec, path, block: bool) -> PretrainResult:
        return pretrain(
            spec,
            path,
            registry,
            base_dir=config.base_dir,
            cache_dir=config.paths.cache,
            device=device,
            block=block,
        )

    built: dict[int, PretrainResult] = {}
    for i, (spec, path) in enumerate(specs):
        try:
            built[i] = build(spec, path, block=False)
        except BlockingIOError:  # another worker builds this one: take the next
            log.info("pretrained %s on %s: built by another worker", spec.backbone, spec.source)
    for i, (spec, path) in enumerate(specs):  # then wait for theirs (up to date: cached)
        if i not in built:
            built[i] = build(spec, path, block=True)
    return [built[i] for i in range(len(specs))]
