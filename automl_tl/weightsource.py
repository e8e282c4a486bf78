"""The ``[weights]`` grammar, in one place: parse, resolve, describe and validate a weight source.

A weight source says what a backbone starts from. The host understands four forms itself and
hands every other name to the backbone that declares it:

=====================  =============================================================  ===========
written                means                                                          kind
=====================  =============================================================  ===========
``none``               random initialisation                                          ``none``
``pretrain:SOURCE``    weights automl-tl trains once on SOURCE (see automl_tl.pretrain)  ``pretrain``
``local-dir:DIR``      an exported model folder (another study's ``best/``)           ``local-dir``
a path                 a ``.safetensors`` / torch checkpoint file (a folder: local-dir)  ``file``
``NAME`` / ``NAME:TAG``  a source a backbone's plugin defines (``timm``, ``timm:a1_in1k``,  ``named``
                       ``torchvision:IMAGENET1K_V1``): checked by ``Backbone.check_weights``
=====================  =============================================================  ===========

A name that is also an existing file or folder in the study's folder is that file. Relative
paths resolve against the study file's folder. The core knows no backbone plugin's names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._util import sha256_file
from .errors import ConfigError, UserError

NONE = "none"
PRETRAIN = "pretrain:"
LOCAL_DIR = "local-dir:"

#: ``NAME`` or ``NAME:TAG``: a weight source a backbone plugin defines, handed to its
#: ``create()`` as written (no path separator, no suffix)
_NAMED = re.compile(r"[A-Za-z][A-Za-z0-9_]*(:[A-Za-z0-9_.\-]+)?")

#: every form, for messages
FORMS = '"none", a named source such as "timm" or "timm:TAG", "pretrain:SOURCE", "local-dir:DIR" or a file path'
#: what every backbone takes besides its named sources: the end of a refused source's message
HOST_SOURCES = '"none", a file, "local-dir:DIR", "pretrain:SOURCE"'


def is_named(text: str) -> bool:
    """Whether ``text`` has the form of a plugin's named source (``NAME`` / ``NAME:TAG``)."""
    return bool(_NAMED.fullmatch(text))


@dataclass(frozen=True)
class WeightSource:
    """One parsed ``[weights]`` value.

    Attributes:
        text: as written.
        kind: ``none``, ``named``, ``pretrain``, ``local-dir`` or ``file``.
        target: ``named``: the name; ``pretrain``: the dataset source; ``local-dir`` and
            ``file``: the absolute path.
    """

    text: str
    kind: str
    target: str

    @property
    def pretrained(self) -> bool:
        """Whether training starts from learned weights (anything but ``none``)."""
        return self.kind != NONE

    def for_create(self, pretrained_file: Path | None = None) -> str:
        """The string a backbone's ``create(weights=...)`` takes. ``pretrain:`` becomes the
        file automl-tl builds (``pretrained_file``)."""
        if self.kind == "pretrain":
            if pretrained_file is None:
                raise ValueError(f"{self.text!r} needs the path of its pretrained file")
            return str(pretrained_file)
        if self.kind == "local-dir":
            return f"{LOCAL_DIR}{self.target}"
        return self.target if self.kind == "file" else self.text

    def identity(self) -> str:
        """The source as a cache key sees it: local files by content (sha256), else as written."""
        path = Path(self.target)
        if self.kind == "local-dir":
            path = path / "model.safetensors"
        if self.kind in ("file", "local-dir") and path.is_file():
            return f"sha256:{sha256_file(path)}"
        return self.text

    def file(self, pretrained_file: Path | None = None) -> Path | None:
        """The local weights file this source loads (``pretrain:`` needs the file automl-tl
        built), or None for ``none`` and named sources."""
        if self.kind == "file":
            return Path(self.target)
        if self.kind == "local-dir":
            return Path(self.target) / "model.safetensors"
        if self.kind == "pretrain" and pretrained_file is not None:
            return Path(pretrained_file)
        return None

    def describe(self, pretrained_file: Path | None = None) -> dict[str, Any]:
        """What a model records about where its weights came from: ``{"source": as written,
        "kind", "path", "sha256"}`` (path and sha256 only for a local file that exists)."""
        out: dict[str, Any] = {"source": self.text, "kind": self.kind}
        path = self.file(pretrained_file)
        if path is not None and path.is_file():
            out["path"] = str(path)
            out["sha256"] = _sha256_cached(path)
        return out

    def label(self, pretrained_file: Path | None = None) -> str:
        """One line for a leaderboard cell: as written, and a local file's short sha256."""
        digest = self.describe(pretrained_file).get("sha256")
        return f"{self.text} (sha256 {digest[:12]})" if digest else self.text


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256_cached(path: Path) -> str:
    """sha256 of a file, hashed again only when its size or modification time changes (every
    trial records its source; a weights file can be large)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def parse(text: str, base_dir: Path | None = None) -> WeightSource:
    """Parse one ``[weights]`` value; paths resolve against ``base_dir`` (default: the cwd)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if text == NONE:
        return WeightSource(text, NONE, NONE)
    if text.startswith(PRETRAIN):
        return WeightSource(text, "pretrain", text[len(PRETRAIN) :])
    local_dir = text.startswith(LOCAL_DIR)
    raw = text[len(LOCAL_DIR) :] if local_dir else text
    if not local_dir and is_named(text) and not (base / text).exists():
        return WeightSource(text, "named", text)
    path = Path(raw).expanduser()
    path = path if path.is_absolute() else base / path
    kind = "local-dir" if local_dir or path.is_dir() else "file"
    return WeightSource(text, kind, str(path))


def validate(source: WeightSource, key: str) -> None:
    """A ConfigError naming ``key`` when a host-resolved source cannot be used (checked when
    the study file is read; named sources are the backbone's to check: :func:`check_named`)."""
    if source.kind == "pretrain" and not source.target:
        raise ConfigError(f"{key}: write pretrain:SOURCE, e.g. pretrain:digits:0-4")
    if source.kind == "local-dir" and not (Path(source.target) / "config.json").is_file():
        raise ConfigError(
            f"{key} = {source.text!r}: {source.target} is not a timm export (no config.json); "
            "name a folder written by `automl-tl search`, e.g. studies/NAME/best"
        )
    if source.kind == "file" and not Path(source.target).is_file():
        raise ConfigError(
            f"{key} = {source.text!r}: file {source.target} does not exist; use {FORMS}"
        )


def check_named(
    backbone: Any, source: WeightSource, label: str, others: str = HOST_SOURCES
) -> None:
    """Ask ``backbone`` (:meth:`~automl_tl.Backbone.check_weights`) whether it takes the named
    ``source``; a refusal becomes one ConfigError: ``{label}: {why} (or use {others})``."""
    if source.kind != "named":
        return
    try:
        backbone.check_weights(source.text)
    except (UserError, ValueError) as exc:
        raise ConfigError(f"{label}: {exc} (or use {others})") from exc


def entries(weights: dict[str, str | list[str]], backbones: Iterable[str]):
    """``(backbone, key, text)`` for every source ``[weights]`` gives every backbone (each
    choice of a list; ``key`` is the entry it comes from: the backbone's own or ``default``)."""
    for backbone in backbones:
        key = backbone if backbone in weights else "default"
        value = weights.get(key, NONE)
        for text in value if isinstance(value, list) else [value]:
            yield backbone, key, text


def check_named_sources(
    weights: dict[str, str | list[str]], backbones: Iterable[str], registry: Any, base_dir: Path
) -> None:
    """Every backbone takes every named source ``[weights]`` gives it (``timm:TAG``, a
    plugin's ``NAME:TAG``), before anything trains: a typo'd tag is one message naming the
    entry, the tags the backbone knows and the other sources, not a failure in every trial."""
    for backbone, key, text in entries(weights, backbones):
        source = parse(text, base_dir)
        if source.kind == "named":
            component = registry.get("backbones", backbone)
            check_named(component, source, f'[weights] {key} = "{text}"')
