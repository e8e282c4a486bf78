"""benchmarks/build_tabular.py: the tasks of the search's tabular benchmark, and a smoke run of
the build (issue 12). The shipped table's figures are RESULTS.md's."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from .conftest import REPO
from .test_benchmarks import bench


def _module():
    path = REPO / "benchmarks" / "build_tabular.py"
    spec = importlib.util.spec_from_file_location("build_tabular", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "task, classes, per_class",
    [
        ("textures-many", 6, 40),
        ("shapes-many", 6, 40),
        ("arrows", 4, 15),
        ("counting", 4, 20),
        ("digits-inverse", 5, 15),
        ("digits-rot", 5, 10),
    ],
)
def test_every_added_task_has_its_classes_and_labels(task, classes, per_class):
    build = _module()
    splits = build.make_task(task, 16)
    assert len(splits.class_names) == classes
    assert np.bincount(splits.train.y.numpy()).tolist() == [per_class] * classes
    assert np.bincount(splits.val.y.numpy()).tolist() == [build.VAL] * classes
    assert (
        splits.train.x.shape[1:] == (3, 16, 16) and splits.train.x.dtype.is_floating_point is False
    )
    # the same task twice is the same data (the table's rows are reproducible)
    assert build.make_task(task, 16).fingerprint == splits.fingerprint


def test_arrows_swap_left_and_right_under_a_horizontal_flip():
    """The orientation-sensitive task: a mirrored "right" arrow has its head where the "left"
    arrows have theirs (the brighter half of the image's foreground)."""
    build = _module()
    x, y = build._arrows(np.random.default_rng(0), 20, 16)
    gray = x.astype(np.float32).mean(1)
    fg = gray > gray.mean(axis=(1, 2), keepdims=True) + 30

    def head_side(masks):  # foreground columns right of the centroid minus left of it
        cols = np.arange(16)
        out = []
        for m in masks:
            c = (m * cols).sum() / m.sum()
            rows = m.sum(1) > 0
            widths = [(m[:, j] & rows).sum() for j in cols]
            out.append(
                sum(w for j, w in enumerate(widths) if j > c)
                - sum(w for j, w in enumerate(widths) if j < c)
            )
        return np.array(out)

    right, left = head_side(fg[y == 0]), head_side(fg[y == 1])
    assert (right > 0).mean() > 0.8 and (left < 0).mean() > 0.8
    assert (head_side(fg[y == 0][:, :, ::-1]) < 0).mean() > 0.8


def test_counting_draws_as_many_dots_as_its_label():
    from scipy import ndimage

    build = _module()
    x, y = build._counting(np.random.default_rng(1), 10, 16)
    for image, label in zip(x, y):
        # halfway between the field (<= 110) and a dot (230), 8-connected: noise (sd 15) neither
        # splits a dot nor makes one (seeded: the same images every run)
        blobs = ndimage.label(image[0] > 170, structure=np.ones((3, 3)))[1]
        assert blobs == label + 1


@pytest.mark.slow
def test_a_quick_build_extends_and_combines_tables(tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    proc = bench("build_tabular", "--quick", "--tasks", "arrows", "--out", first, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads(first.read_text())
    assert list(a["tasks"]) == ["arrows"] and len(a["weights_digest"]) == 16
    rows = a["tasks"]["arrows"]["rows"]
    assert len(rows) == 4 and all(len(r["val_accuracy"]) == a["epochs"] for r in rows)
    # --into keeps the tasks it has (arrows: not rebuilt) and adds the others
    extended = tmp_path / "extended.json"
    proc = bench(
        "build_tabular", "--quick", "--into", first, "--tasks", "arrows", "counting",
        "--out", extended, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = json.loads(extended.read_text())
    assert (
        list(b["tasks"]) == ["arrows", "counting"] and b["tasks"]["arrows"] == a["tasks"]["arrows"]
    )
    assert b["weights_digest"] == a["weights_digest"]  # pretraining repeats exactly
    # --combine: each task once; a table built otherwise is refused with one message, exit 2
    second.write_text(json.dumps({**b, "tasks": {"counting": b["tasks"]["counting"]}}))
    combined = tmp_path / "combined.json"
    proc = bench("build_tabular", "--combine", first, second, "--out", combined)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(json.loads(combined.read_text())["tasks"]) == ["arrows", "counting"]
    second.write_text(json.dumps({**b, "epochs": 3}))
    proc = bench("build_tabular", "--combine", first, second, "--out", combined)
    assert proc.returncode == 2 and "epochs = 3" in proc.stderr and "Traceback" not in proc.stderr
