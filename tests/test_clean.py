"""`automl-tl clean`: stale decoded caches and killed exports' leftovers go; nothing the
study still uses does."""

from __future__ import annotations

import os
import subprocess
import sys

from automl_tl import load_config, registry_for
from automl_tl.data import load_splits

from .conftest import write_study

STUDY = """
[data]
source = "digits:0-2"
image_size = 16
max_per_class = 10
[search]
backbones = ["test_resnet"]
"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_removes_what_the_study_no_longer_uses_and_keeps_the_rest(tmp_path, capsys):
    from automl_tl.cli import main

    registry = registry_for()
    path = write_study(tmp_path, STUDY)
    old = load_config(path, {"data.image_size": 24})
    load_splits(old, registry)  # a cache at the size the study used before
    config = load_config(path)
    load_splits(config, registry)  # the one in use
    paths = config.paths
    caches = sorted(paths.cache.glob("images-*.npy"))
    assert len(caches) == 2
    in_use = next(c for c in caches if c != max(caches, key=lambda c: c.stat().st_size))
    # a cache build killed on this host, an export killed between its two renames
    host = os.uname().nodename
    killed_build = paths.cache / f".{in_use.name}.{host}.{_dead_pid()}.abc123.npy.tmp"
    killed_build.write_bytes(b"x" * 100)
    paths.best.mkdir(parents=True)
    (paths.best / "config.json").write_text("{}")
    old_best = paths.root / ".best.old.deadbeef"
    old_best.mkdir()
    (old_best / "config.json").write_text("{}")
    keep = [paths.best / "config.json", in_use, in_use.with_suffix(".json")]

    assert main(["clean", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith("would remove /")]
    assert len(listed) == 4  # stale .npy + .json, the temporary, the old best
    assert all(p.exists() for p in [*caches, killed_build, old_best])

    assert main(["clean", str(path)]) == 0
    out = capsys.readouterr().out
    assert "removed 4 item(s)" in out.splitlines()[-1]
    assert sorted(paths.cache.glob("images-*.npy")) == [in_use]
    assert len(list(paths.cache.glob(".images-*.lock"))) == 1
    assert not killed_build.exists() and not old_best.exists()
    assert all(p.exists() for p in keep)
    assert main(["clean", str(path)]) == 0
    assert capsys.readouterr().out.strip().endswith("removed 0 item(s), 0.0 MB")
