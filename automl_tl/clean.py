"""``automl-tl clean STUDY``: give back the disk a study no longer needs, and nothing else.

Removed: decoded image caches (``cache/images-*.npy`` + sidecar) that neither the study's data
at its image size nor any of its ``pretrain:SOURCE`` sources use any more (the data or
``image_size`` changed), temporaries of cache builds killed on this host, and what an export
killed mid-way left beside ``best/`` or ``models/trial-N/`` (:func:`export.recover_export`:
a lost ``best/`` is restored first). Never touched: the study's storage, ``catalog.db``,
exported models, pretrained weights, the report. A cache another process is building or
reading right now (its lock held) is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import StudyConfig
from .data import cache_file, load_dataset, stale_cache_files
from .export import recover_export
from .pretrain import study_specs
from .registry import Registry


@dataclass
class Cleaned:
    path: Path
    bytes: int
    what: str


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    try:
        return path.stat().st_size
    except OSError:
        return 0


def caches_in_use(config: StudyConfig, registry: Registry) -> set[Path]:
    """The decoded caches the study's data and its ``pretrain:`` sources use now."""
    paths = config.paths
    used = set()
    sources = [(config.data.source, config.data.image_size)]
    sources += [(spec.source, spec.image_size) for spec, _ in study_specs(config)]
    for source, size in sources:
        records = load_dataset(registry, source, config.base_dir).records
        used.add(cache_file(records, size, paths.cache))
    return used


def clean(config: StudyConfig, registry: Registry, *, dry_run: bool = False) -> list[Cleaned]:
    """Remove (or with ``dry_run`` only list) what the study no longer needs."""
    paths = config.paths
    found: list[Cleaned] = []
    in_use = caches_in_use(config, registry)
    sizes = {p: _size(p) for p in paths.cache.glob("*")} if paths.cache.is_dir() else {}
    for path in stale_cache_files(paths.cache, in_use, dry_run=dry_run):
        what = (
            "temporary of a killed cache build"
            if path.name.endswith(".tmp")
            else ("decoded images the study's data and image size no longer use")
        )
        found.append(Cleaned(path, sizes.get(path, 0), what))
    exports = [paths.best, *sorted((paths.root / "models").glob("trial-*"))]
    for directory in exports:
        before = {p: _size(p) for p in directory.parent.glob(f".{directory.name}.*")}
        if not before:
            continue
        if not dry_run:
            recover_export(directory)
        for leftover, size in before.items():
            if dry_run or not leftover.exists():
                found.append(
                    Cleaned(
                        leftover, size, f"left by an export of {directory.name}/ that was killed"
                    )
                )
    return found
