"""Dataset sources, stratified seeded splits, the decoded cache."""

import numpy as np
import pytest
from PIL import Image

from automl_tl import DataError
from automl_tl.data import decode_image, prepare_data


def _png(path, color, size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def make_folder(root, classes=("cat", "dog"), n=6, splits=None):
    for cls_i, cls in enumerate(classes):
        for i in range(n):
            parent = root / splits[i % len(splits)] if splits else root
            _png(parent / cls / f"{i}.png", (40 * cls_i, 10 * i, 100))
    return root


def test_digits_split_is_stratified_disjoint_and_seeded(registry):
    a = prepare_data(registry, "digits", image_size=16, seed=0)
    b = prepare_data(registry, "digits", image_size=16, seed=0)
    c = prepare_data(registry, "digits", image_size=16, seed=1)
    assert a.class_names == [str(i) for i in range(10)]
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert abs(len(a.test) - 0.2 * 1797) < 12 and abs(len(a.val) - 0.2 * 1797) < 12
    names = [set(s.names) for s in (a.train, a.val, a.test)]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    for split in (a.val, a.test):
        counts = np.bincount(split.y.numpy(), minlength=10)
        assert counts.min() >= 30  # every class in every split
    assert a.split_hash == b.split_hash and a.split_hash != c.split_hash
    assert a.fingerprint == c.fingerprint  # same data, other split
    assert a.train.x.dtype.is_floating_point is False and tuple(a.train.x.shape[1:]) == (3, 16, 16)


def test_folder_with_class_folders(registry, tmp_path):
    make_folder(tmp_path / "data", n=6)
    (tmp_path / "data" / ".ipynb_checkpoints").mkdir()
    _png(tmp_path / "data" / ".ipynb_checkpoints" / "x.png", (0, 0, 0))
    splits = prepare_data(registry, f"folder:{tmp_path / 'data'}", image_size=8, seed=0)
    assert splits.class_names == ["cat", "dog"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12


def test_folder_with_fixed_splits(registry, tmp_path):
    make_folder(tmp_path / "data", n=9, splits=("train", "val", "test"))
    splits = prepare_data(registry, "folder:data", image_size=8, base_dir=tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 6, 6)
    assert all("/train/" in n for n in splits.train.names)


def test_csv_manifest_relative_to_the_csv(registry, tmp_path):
    make_folder(tmp_path / "imgs", n=5)
    rows = ["path,label"] + [f"imgs/{c}/{i}.png,{c}" for c in ("cat", "dog") for i in range(5)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    splits = prepare_data(registry, f"csv:{tmp_path / 'labels.csv'}", image_size=8)
    assert splits.class_names == ["cat", "dog"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 10


def test_cache_is_built_once_and_reused(registry, tmp_path):
    make_folder(tmp_path / "data", n=5)
    cache = tmp_path / "cache"
    a = prepare_data(registry, f"folder:{tmp_path / 'data'}", image_size=8, cache_dir=cache)
    files = sorted(cache.glob("images-*.npy"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = prepare_data(registry, f"folder:{tmp_path / 'data'}", image_size=8, cache_dir=cache)
    assert files[0].stat().st_mtime_ns == mtime
    assert np.array_equal(a.train.x.numpy(), b.train.x.numpy())
    assert not list(cache.glob(".*tmp"))


def test_unreadable_image_is_named(registry, tmp_path):
    make_folder(tmp_path / "data", n=5)
    (tmp_path / "data" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"(?s)1 unreadable image\(s\).*broken.png"):
        prepare_data(registry, f"folder:{tmp_path / 'data'}", image_size=8)
    skipped = prepare_data(
        registry, f"folder:{tmp_path / 'data'}", image_size=8, on_bad_image="skip"
    )
    assert [p for p, _ in skipped.skipped] == [str(tmp_path / "data" / "cat" / "broken.png")]


def test_too_few_images_to_split(registry, tmp_path):
    make_folder(tmp_path / "data", classes=("a", "b"), n=5)
    for p in list((tmp_path / "data" / "b").glob("*.png"))[2:]:
        p.unlink()
    with pytest.raises(DataError, match="class 'b' has 2"):
        prepare_data(registry, f"folder:{tmp_path / 'data'}", image_size=8)


def test_decode_modes(tmp_path):
    gray = tmp_path / "g.png"
    Image.new("L", (5, 7), 128).save(gray)
    out = decode_image(gray, 8)
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8 and int(out[0, 0, 0]) == 128
    deep = tmp_path / "d.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(deep)
    assert 120 <= int(decode_image(deep, 4)[0, 0, 0]) <= 135  # a 16-bit mid-grey is not white
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(rgba)
    assert int(decode_image(rgba, 4).min()) == 255  # transparent on the white background
