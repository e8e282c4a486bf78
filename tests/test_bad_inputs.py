"""The bad-input suite: every broken dataset and configuration is built on the fly, and each
test asserts the exact outcome (the decoded pixels, the reason, the message, the exit code)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from automl_tl import DataError, UserError
from automl_tl.cli import main
from automl_tl.data import (
    CachedImages,
    batches,
    decode_image,
    decoded_images,
    load_dataset,
    prepare_data,
)
from automl_tl.storage import scrub

from .conftest import REPO, write_study


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() points the automl_tl logger at this test's stderr; undo it afterwards."""
    import logging

    logger = logging.getLogger("automl_tl")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


# ---------------------------------------------------------------------------------------------
# building broken files


def _noise(size=(24, 18), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _png16(path: Path, array: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): gray = 0, RGB = 2."""
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    _noise((64, 64)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])


def exif_rotated_jpeg(path: Path) -> None:
    """40x20: left half red, right half blue, tagged "rotate 90° clockwise to display"."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, quality=95, exif=exif)


def make_folder(root: Path, counts: dict[str, int], split: str | None = None) -> Path:
    for k, (cls, n) in enumerate(counts.items()):
        folder = root / split / cls if split else root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _noise(seed=100 * k + i).save(folder / f"{i}.png")
    return root


BAD = {
    "cat/truncated.jpg": (truncated_jpeg, "truncated image"),
    "dog/zero.png": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "dog/text.jpg": (
        lambda p: p.write_text("hello, I am not a JPEG"),
        "not an image (no image format recognises it)",
    ),
    "bird/lab.tif": (lambda p: Image.new("LAB", (8, 8)).save(p), "unsupported image mode 'LAB'"),
}


@pytest.fixture
def messy(tmp_path) -> Path:
    """A folder as users have them: mixed-case extensions, odd modes, OS litter, bad files."""
    root = make_folder(tmp_path / "pets", {"bird": 5, "cat": 6, "dog": 6})
    _noise().save(root / "cat" / "upper.JPG")
    _noise().save(root / "dog" / "mixed.Png")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(root / "bird" / "cmyk.jpg")
    Image.fromarray(np.full((9, 9), 30000, np.uint16)).save(root / "bird" / "deep16.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(root / "dog" / "alpha.png")
    exif_rotated_jpeg(root / "cat" / "rotated.jpeg")
    Image.new("P", (2400, 1800)).save(root / "dog" / "huge.gif")
    Image.new("L", (1, 1), 7).save(root / "cat" / "tiny.bmp")
    (root / ".ipynb_checkpoints").mkdir()
    _noise().save(root / ".ipynb_checkpoints" / "0-checkpoint.png")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    _noise().save(root / "cat" / "._upper.JPG")  # macOS AppleDouble litter
    (root / "cat" / "notes.txt").write_text("labels by Ann")
    for rel, (make, _) in BAD.items():
        make(root / rel)
    return root


# ---------------------------------------------------------------------------------------------
# decoding: every mode comes out right


def test_cmyk_jpeg_is_converted(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = (int(v) for v in decode_image(tmp_path / "c.jpg", 8)[:, 4, 4])
    assert r > 240 and g < 15 and b < 15  # CMYK "no cyan, full magenta + yellow" is red


def test_16bit_png_is_not_white(tmp_path):
    _png16(tmp_path / "g.png", np.full((6, 6), 16384, np.uint16), color_type=0)
    assert int(decode_image(tmp_path / "g.png", 6)[0, 0, 0]) == 64  # 16384 / 65535 * 255
    _png16(tmp_path / "rgb.png", np.full((6, 6, 3), [65535, 32768, 0], np.uint16), color_type=2)
    assert decode_image(tmp_path / "rgb.png", 6)[:, 0, 0].tolist() == [255, 128, 0]


def test_exif_orientation_is_applied(tmp_path):
    exif_rotated_jpeg(tmp_path / "r.jpg")
    out = decode_image(tmp_path / "r.jpg", 16).astype(int)
    top, bottom = out[:, :6].mean(axis=(1, 2)), out[:, 10:].mean(axis=(1, 2))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is on top once rotated
    assert bottom[2] > 200 and bottom[0] < 60


def test_alpha_palette_and_gray_on_the_documented_background(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(tmp_path / "a.png")
    assert decode_image(tmp_path / "a.png", 4)[:, 0, 0].tolist() == [255, 127, 127]
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert decode_image(tmp_path / "la.png", 4).min() == 255  # fully transparent: white
    gif = Image.new("P", (4, 4), 1)
    gif.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    gif.save(tmp_path / "t.gif", transparency=1)
    assert decode_image(tmp_path / "t.gif", 4).min() == 255
    Image.new("L", (3, 5), 90).save(tmp_path / "g.png")
    assert decode_image(tmp_path / "g.png", 4)[:, 2, 2].tolist() == [90, 90, 90]


def test_tiny_and_huge_images_are_resized_to_the_study_size(tmp_path):
    Image.new("RGB", (1, 1), (9, 8, 7)).save(tmp_path / "tiny.png")
    _noise((6000, 4000)).save(tmp_path / "huge.jpg", quality=50)
    info: dict = {}
    started = time.perf_counter()
    huge = decode_image(tmp_path / "huge.jpg", 32, info=info)
    assert time.perf_counter() - started < 5  # decoded at a reduced scale
    assert huge.shape == (3, 32, 32) and info == {
        "format": "JPEG",
        "mode": "RGB",
        "size": (6000, 4000),
        "sha256": hashlib.sha256((tmp_path / "huge.jpg").read_bytes()).hexdigest()[:32],
    }
    tiny = decode_image(tmp_path / "tiny.png", 32)
    assert tiny.shape == (3, 32, 32) and tiny[:, 31, 31].tolist() == [9, 8, 7]


# ---------------------------------------------------------------------------------------------
# unreadable files: found up front, listed by path, error or skip


@pytest.mark.filterwarnings("ignore:ignored 1 file")
def test_bad_files_refuse_to_start_listing_every_one(registry, messy):
    with pytest.raises(DataError) as err:
        prepare_data(registry, f"folder:{messy}", image_size=8)
    message = str(err.value)
    assert message.startswith(f"4 unreadable image(s) in folder:{messy}:")
    for rel, (_, reason) in BAD.items():
        assert f"  {messy / rel}: {reason}\n" in message
    assert message.endswith('set [data] on_bad_image = "skip" to leave them out.')


def test_skip_excludes_them_and_lists_them(registry, messy, tmp_path):
    with pytest.warns(UserWarning, match=r"ignored 1 file\(s\) without an image extension"):
        splits = prepare_data(
            registry,
            f"folder:{messy}",
            image_size=8,
            on_bad_image="skip",
            cache_dir=tmp_path / "cache",
        )
    assert sorted(splits.skipped) == sorted(
        (str(messy / rel), why) for rel, (_, why) in BAD.items()
    )
    assert splits.class_names == ["bird", "cat", "dog"]
    names = splits.train.names + splits.val.names + splits.test.names
    assert len(names) == 5 + 6 + 6 + 8  # 8 odd-but-good files; litter and bad files left out
    assert not any(".ipynb_checkpoints" in n or "._upper" in n for n in names)
    assert {Path(n).name for n in names} >= {"upper.JPG", "mixed.Png", "cmyk.jpg", "tiny.bmp"}


# ---------------------------------------------------------------------------------------------
# class problems: clear errors or warnings before any training


def test_empty_class_folder_is_an_error(registry, tmp_path):
    root = make_folder(tmp_path / "d", {"a": 5, "b": 5})
    (root / "c").mkdir()
    with pytest.raises(DataError, match=r"^class\(es\) \['c'\] have no usable images"):
        prepare_data(registry, f"folder:{root}", image_size=8)


def test_single_class_is_an_error(registry, tmp_path):
    root = make_folder(tmp_path / "d", {"only": 6})
    with pytest.raises(DataError, match=r"has 1 class \('only'\); a classifier needs at least 2"):
        prepare_data(registry, f"folder:{root}", image_size=8)


def test_too_few_images_to_split(registry, tmp_path):
    root = make_folder(tmp_path / "d", {"a": 5, "b": 2})
    with pytest.raises(DataError, match=r"class 'b' has 2; each class needs at least 3"):
        prepare_data(registry, f"folder:{root}", image_size=8)


def test_label_spelled_differently_in_val_is_named(registry, tmp_path):
    root = make_folder(tmp_path / "d", {"cat": 4, "dog": 4}, split="train")
    make_folder(root, {"Cat": 2, "dog": 2}, split="val")
    make_folder(root, {"cat": 2, "dog": 2}, split="test")
    with pytest.raises(DataError) as err:
        prepare_data(registry, f"folder:{root}", image_size=8)
    assert str(err.value) == (
        "class 'Cat' appears only in val/ (2), never in train/ (train/ has 'cat'); "
        "train/, val/ and test/ must use the same class folder names"
    )


def test_splits_share_one_sorted_class_map(registry, tmp_path):
    root = make_folder(tmp_path / "d", {"c": 4, "a": 4, "b": 4}, split="train")
    make_folder(root, {"a": 2, "c": 2}, split="val")  # no b in val
    make_folder(root, {"b": 2, "c": 2, "a": 2}, split="test")
    with pytest.warns(UserWarning, match=r"class\(es\) \['b'\] have no images in val/"):
        splits = prepare_data(registry, f"folder:{root}", image_size=8)
    assert splits.class_names == ["a", "b", "c"]
    for split in (splits.train, splits.val, splits.test):
        for name, label in zip(split.names, split.y.tolist()):
            assert Path(name).parent.name == splits.class_names[label]
    assert sorted(splits.val.y.tolist()) == [0, 0, 2, 2]


def test_severe_imbalance_warns_with_counts(registry, tmp_path):
    root = make_folder(tmp_path / "d", {"many": 30, "few": 3})
    with pytest.warns(UserWarning, match=r"severe class imbalance: \{'few': 3, 'many': 30\}"):
        prepare_data(registry, f"folder:{root}", image_size=8)


def test_stray_folder_next_to_train_is_named(registry, tmp_path):
    root = make_folder(tmp_path / "d", {"a": 4, "b": 4}, split="train")
    make_folder(root, {"stray": 2})
    with pytest.warns(UserWarning, match=r"other folders \['stray'\] are ignored"):
        prepare_data(registry, f"folder:{root}", image_size=8)


def test_missing_file_in_a_csv_manifest(registry, tmp_path):
    make_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    rows = ["path,label"] + [f"imgs/{c}/{i}.png,{c}" for c in "ab" for i in range(4)]
    (tmp_path / "m.csv").write_text("\n".join(rows + ["imgs/a/gone.png,a"]) + "\n")
    with pytest.raises(DataError, match=r"(?s)1 unreadable.*imgs/a/gone.png: file not found"):
        prepare_data(registry, f"csv:{tmp_path / 'm.csv'}", image_size=8)


def test_class_with_only_unreadable_images_is_named_not_dropped(registry, tmp_path):
    make_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    (tmp_path / "imgs" / "c.png").write_bytes(b"")
    rows = ["path,label"] + [f"imgs/{c}/{i}.png,{c}" for c in "ab" for i in range(4)]
    (tmp_path / "m.csv").write_text("\n".join(rows + ["imgs/c.png,c"]) + "\n")
    with pytest.raises(DataError, match=r"^class\(es\) \['c'\] have no usable images"):
        prepare_data(registry, f"csv:{tmp_path / 'm.csv'}", image_size=8, on_bad_image="skip")


# ---------------------------------------------------------------------------------------------
# automl-tl check-data


def test_check_data_on_a_messy_folder(messy, capsys):
    code = main(["check-data", f"folder:{messy}"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[0] == f"folder:{messy}: 29 image files, 4 unreadable, 3 classes"
    assert "split: stratified, seed 0 (val 0.2, test 0.2)" in out
    assert "class      train    val    test    total" in out
    assert "bird           4      2       1        7" in out  # 7 * 0.2 = 1 test, 0.25 of 6 val
    assert "(all)         14      6       5       25" in out
    assert "largest 2400x1800" in out and "smallest 1x1" in out
    assert "CMYK 1" in out and "I;16 1" in out and "RGBA 1" in out and "LAB 1" in out
    for rel, (_, reason) in BAD.items():
        assert f"  {messy / rel}: {reason}" in out
    assert out.rstrip().endswith(
        "NOT usable as is: 4 unreadable file(s): fix or remove them, or set [data] "
        'on_bad_image = "skip" to leave them out'
    )


def test_check_data_clean_folder_json_and_errors(tmp_path, capsys):
    root = make_folder(tmp_path / "d", {"a": 5, "b": 5})
    assert main(["check-data", f"folder:{root}", "--format", "json", "--seed", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["usable"] is True and data["bad_files"] == [] and data["errors"] == []
    assert {s: sum(c.values()) for s, c in data["counts"].items()} == {
        "train": 6,
        "val": 2,
        "test": 2,
    }
    (root / "c").mkdir()
    assert main(["check-data", f"folder:{root}"]) == 1
    assert "errors:\n  - class(es) ['c'] have no usable images" in capsys.readouterr().out
    assert main(["check-data", f"folder:{tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: folder path {tmp_path / 'nowhere'} does not exist; fix [data] source\n"


def test_check_data_names_copies_across_splits(tmp_path, capsys):
    """A byte-identical copy in another split (train/test leakage) is warned about by
    check-data, as the search does, on the split the study would use."""
    import shutil

    root = make_folder(tmp_path / "d", {"a": 6, "b": 6})
    first = sorted((root / "a").iterdir())[0]
    for i in range(4):  # copies land in other splits than the original, whatever the seed
        shutil.copy(first, root / "a" / f"copy{i}{first.suffix}")
    assert main(["check-data", f"folder:{root}", "--format", "json"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert any("byte-identical copies of images in another split" in w for w in warnings)


# ---------------------------------------------------------------------------------------------
# the decoded cache: memory-mapped, progress, never half-written


def test_large_splits_stay_memory_mapped(registry, tmp_path, monkeypatch):
    from automl_tl.train import Choice, fit

    kwargs = dict(image_size=16, cache_dir=tmp_path / "cache", seed=0)
    in_ram = prepare_data(registry, "digits:0-2", **kwargs)
    monkeypatch.setenv("AUTOML_TL_IN_MEMORY_MB", "0")
    mapped = prepare_data(registry, "digits:0-2", **kwargs)
    assert in_ram.train.in_memory and not mapped.train.in_memory
    x = mapped.train.x
    assert isinstance(x, CachedImages) and isinstance(x.array, np.memmap)
    assert x.shape == in_ram.train.x.shape and x.nbytes == in_ram.train.x.numel()
    idx = torch.tensor([5, 0, 17, 3])
    assert torch.equal(x[idx], in_ram.train.x[idx]) and torch.equal(x[2:9], in_ram.train.x[2:9])
    both = mapped.part("train+val")
    assert isinstance(both.x, CachedImages)
    assert np.array_equal(both.x.numpy(), in_ram.part("train+val").x.numpy())
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    cpu = torch.device("cpu")
    for (xa, ya), (xb, yb) in zip(
        batches(in_ram.train, 50, device=cpu, shuffle=True, generator=gen_a),
        batches(mapped.train, 50, device=cpu, shuffle=True, generator=gen_b),
    ):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    choice = Choice(backbone="test_resnet", epochs=1)
    result = fit(choice, mapped, registry, device="cpu", seed=0)
    same = fit(choice, in_ram, registry, device="cpu", seed=0)  # trains on the same pixels
    assert np.isfinite(result.history[0].train_loss)
    assert result.history[0].train_loss == same.history[0].train_loss
    assert result.val == same.val


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cache_build_shows_a_progress_bar(registry, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    prepare_data(registry, "digits:0-1", image_size=8, cache_dir=tmp_path / "cache")
    assert "decoding images:   0%|" in terminal.getvalue() and "0/360" in terminal.getvalue()
    log_file = io.StringIO()  # not a terminal: no bar (the log line says what happens)
    monkeypatch.setattr(sys, "stderr", log_file)
    prepare_data(registry, "digits:0-1", image_size=9, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("images-*.npy"))) == 2
    assert "decoding images" not in log_file.getvalue()


def test_interrupted_cache_build_leaves_nothing_usable(registry, tmp_path, monkeypatch):
    import automl_tl.data as data

    real, calls = data.decode_image, []

    def decode_then_interrupt(image, size, **kw):
        calls.append(1)
        if len(calls) == 50:
            raise KeyboardInterrupt
        return real(image, size, **kw)

    monkeypatch.setattr(data, "decode_image", decode_then_interrupt)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        prepare_data(registry, "digits:0-1", image_size=8, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == []
    monkeypatch.setattr(data, "decode_image", real)
    splits = prepare_data(registry, "digits:0-1", image_size=8, cache_dir=cache)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 360
    assert int(splits.train.x.float().mean()) > 0  # real pixels, not a zero-filled half file


KILLED_BUILD = """
import sys, time
import automl_tl.data as data
from automl_tl import registry_for

real = data.decode_image
def slow(image, size, **kw):
    time.sleep(0.01)
    return real(image, size, **kw)
data.decode_image = slow
records = data.load_dataset(registry_for(), "digits:0-1", None).records
print("building", flush=True)
data.decoded_images(records, 8, __import__("pathlib").Path(sys.argv[1]))
print("finished", flush=True)
"""


def test_killed_cache_build_is_never_used(registry, tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(cache)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout.readline().strip() == "building"
    deadline = time.time() + 60
    while not list(cache.glob(".images-*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    left = sorted(p.name for p in cache.iterdir())
    assert not [n for n in left if n.startswith("images-")]  # no cache, no sidecar
    assert [n for n in left if n.endswith(".npy.tmp")]  # only the dead build's temporary file
    records = load_dataset(registry, "digits:0-1", tmp_path).records
    images, bad, _ = decoded_images(records, 8, cache)
    assert images.shape == (360, 3, 8, 8) and bad == [] and int(images[-1].max()) > 0
    assert not list(cache.glob(".images-*.tmp"))  # the dead build's leftovers are removed


# ---------------------------------------------------------------------------------------------
# a resumed study refuses changed data, saying what changed


def test_changed_data_is_refused_naming_the_change(registry, tmp_path):
    import optuna

    from automl_tl.storage import check_data

    root = make_folder(tmp_path / "d", {"cat": 6, "dog": 6})
    study = optuna.create_study(study_name="s", direction="maximize")
    check_data(study, prepare_data(registry, f"folder:{root}", image_size=8))
    check_data(study, prepare_data(registry, f"folder:{root}", image_size=8))  # same: fine
    os.replace(root / "dog" / "0.png", root / "dog" / "renamed.png")
    with pytest.raises(DataError) as err:
        check_data(study, prepare_data(registry, f"folder:{root}", image_size=8))
    assert "files renamed, resized or relabelled in class(es) ['dog']" in str(err.value)
    (root / "dog" / "renamed.png").unlink()
    with pytest.raises(DataError, match=r"(dog: 2 -> 1|dog: 6 -> 5|dog: 4 -> 3) images"):
        check_data(study, prepare_data(registry, f"folder:{root}", image_size=8))
    with pytest.raises(DataError, match=r"seed or fractions"):
        make_folder(root, {"cat": 6, "dog": 6})  # the original files again
        check_data(study, prepare_data(registry, f"folder:{root}", image_size=8, seed=5))


# ---------------------------------------------------------------------------------------------
# bad configuration: one message, exit code 2, no traceback

STUDY = """
[data]
source = "digits:0-2"
image_size = 32
[search]
n_trials = 1
backbones = ["test_resnet"]
augmentations = ["none"]
unfreeze = ["top_k"]
epochs = 1
pruner = "none"
"""

CONFIG_CASES = {
    "unknown key": (
        ("[search]", "[search]\nn_trial = 3"),
        "error: unknown key 'n_trial' in [search] (did you mean \"n_trials\"?); allowed: ",
    ),
    "wrong type": (
        ("n_trials = 1", 'n_trials = "many"'),
        "error: [search] n_trials must be an integer, got a string 'many'",
    ),
    "empty list": (
        ('unfreeze = ["top_k"]', "unfreeze = []"),
        "error: [search] unfreeze is empty; list at least one name",
    ),
    "low > high": (
        ("[search]", "[search]\nlr = [0.1, 0.001]"),
        "error: [search] lr = [0.1, 0.001]: low > high; write [0.001, 0.1]",
    ),
    "unknown backbone": (
        ('backbones = ["test_resnet"]', 'backbones = ["test_resnett"]'),
        "error: unknown backbone 'test_resnett' in [search] backbones (did you mean \"test_resnet\"?); ",
    ),
    "unknown policy": (
        ('augmentations = ["none"]', 'augmentations = ["flipcrop"]'),
        "error: unknown augmentation policy 'flipcrop' in [search] augmentations (did you mean \"flip_crop\"?); known: ",
    ),
    "unknown strategy": (
        ('unfreeze = ["top_k"]', 'unfreeze = ["topk"]'),
        "error: unknown unfreeze strategy 'topk' in [search] unfreeze (did you mean \"top_k\"?); known: ",
    ),
    "unknown dataset": (
        ('source = "digits:0-2"', 'source = "foldr:x"'),
        "error: unknown dataset 'foldr' in [data] source (did you mean \"folder\"?); known: ",
    ),
    "mistyped hub tag": (
        ('pruner = "none"', 'pruner = "none"\n[weights]\ntest_resnet = "timm:in1k_typo"'),
        'error: [weights] test_resnet = "timm:in1k_typo": test_resnet has no pretrained tag '
        '"in1k_typo"; known tags: r160_in1k (or use "none", a file, "local-dir:DIR", '
        '"pretrain:SOURCE")',
    ),
    "unknown weight source": (
        ('pruner = "none"', 'pruner = "none"\n[weights]\ndefault = ["none", "timn"]'),
        'error: [weights] default = "timn": test_resnet has no weight source "timn" (did you '
        'mean "timm"?); it takes "timm" (default tag r160_in1k) or "timm:TAG"; known tags: '
        "r160_in1k (or use",
    ),
    "missing path": (
        ('source = "digits:0-2"', 'source = "folder:no/such/dir"'),
        "error: folder path {tmp}/no/such/dir does not exist; fix [data] source",
    ),
    "unwritable output": (
        ("[search]", '[search]\noutput = "a-file/out"'),
        "error: output folder {tmp}/a-file/out is not writable (",
    ),
    "batch of one": (
        ("epochs = 1", "epochs = 1\nbatch_size = 1"),
        "error: [search] batch_size = 1 is too small (batches of one image are dropped, so "
        "nothing trains); it must be at least 2",
    ),
    "nothing left to train on": (
        ("image_size = 32", "image_size = 32\nval_fraction = 0.5\ntest_fraction = 0.5"),
        "error: [data] val_fraction + test_fraction = 1 leaves no images to train on; keep "
        "their sum at most 0.9",
    ),
    "NaN in a range": (
        ("[search]", "[search]\nlr = [nan, 0.1]"),
        "error: [search] lr = [nan, 0.1]: both ends must be finite numbers",
    ),
    "inf in a range": (
        ("[search]", "[search]\nweight_decay = [1e-6, inf]"),
        "error: [search] weight_decay = [1e-06, inf]: both ends must be finite numbers",
    ),
    "negative seed": (
        ("image_size = 32", "image_size = 32\nseed = -1"),
        "error: [data] seed = -1 is too small; it must be at least 0",
    ),
    "seed of 2**32": (
        ("image_size = 32", "image_size = 32\nseed = 4294967296"),
        "error: [data] seed = 4294967296 is too large; it must be at most 4294967295",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_configuration_is_one_message(case, tmp_path, capsys):
    (old, new), expected = CONFIG_CASES[case]
    assert old in STUDY
    (tmp_path / "a-file").write_text("a file, not a folder")
    study = write_study(tmp_path, STUDY.replace(old, new, 1))
    code = main(["search", str(study), "--no-retrain", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(expected.format(tmp=tmp_path)), lines[0]
    assert not (tmp_path / "tiny" / "optuna.db").exists()  # nothing ran


# Root writes anywhere (and CI runs as root): there the command runs without the capabilities
# that let root ignore file modes, as any unprivileged user is. (Not as `nobody`: the Python
# of root, under /root, is not readable by other users.)
WITHOUT_ROOT_OVERRIDES = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
    "--",
]


def test_read_only_output_folder(tmp_path, capsys):
    """An output folder the user may not write to is one message, exit 2, nothing created."""
    import shutil

    (tmp_path / "ro").mkdir(mode=0o500)
    study = write_study(tmp_path, STUDY.replace("[search]", '[search]\noutput = "ro/out"'))
    argv = ["search", str(study), "--device", "cpu"]
    if os.geteuid() != 0:
        code, err = main(argv), capsys.readouterr().err
    else:
        assert shutil.which("setpriv"), "running as root needs setpriv (util-linux) for this test"
        proc = subprocess.run(
            [*WITHOUT_ROOT_OVERRIDES, sys.executable, "-m", "automl_tl.cli", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        code, err = proc.returncode, proc.stderr
    assert code == 2, err
    assert err == (
        f"error: output folder {tmp_path / 'ro' / 'out'} is not writable (Permission denied); "
        "set [search] output to a folder you can write to, or fix its permissions\n"
    )
    assert not (tmp_path / "ro" / "out").exists()


def test_bad_configuration_from_the_command_line_has_no_traceback(tmp_path):
    from .conftest import run_cli

    study = write_study(tmp_path, STUDY.replace('["top_k"]', "[]"))
    result = run_cli("search", str(study))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == "error: [search] unfreeze is empty; list at least one name\n"


# ---------------------------------------------------------------------------------------------
# security: passwords never shown


def test_storage_password_never_appears(tmp_path, capsys):
    secret = "s3cret-Pa55"
    url = f"postgresql://alice:{secret}@127.0.0.1:9/optuna"
    study = write_study(tmp_path, STUDY)
    code = main(["search", str(study), "--storage", url, "--device", "cpu", "-v"])
    captured = capsys.readouterr()
    assert code == 2
    assert "error: cannot open storage postgresql://alice:***@127.0.0.1:9/optuna" in captured.err
    assert main(["report", str(study), "--storage", url]) == 2
    captured2 = capsys.readouterr()
    for text in (captured.out, captured.err, captured2.out, captured2.err):
        assert secret not in text
    for path in (tmp_path / "tiny").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_passwords_scrubbed_from_logs_and_tracebacks(capsys):
    import logging

    from automl_tl.cli import setup_logging

    url = "postgresql+psycopg2://bob:hunter2@db:5432/x"
    assert (
        scrub(f"connect {url} failed") == "connect postgresql+psycopg2://bob:***@db:5432/x failed"
    )
    assert scrub("sqlite:////tmp/a.db and https://example.org/a:b") == (
        "sqlite:////tmp/a.db and https://example.org/a:b"
    )
    setup_logging(0)
    logging.getLogger("automl_tl").info("storage %s", url)
    assert "bob:***@db" in capsys.readouterr().err
    # a class or file name's terminal escape is shown in a log line, not run
    logging.getLogger("automl_tl").info("class %s", "cat\x1b]0;owned\x07")
    assert "class cat\\x1b]0;owned\\x07" in capsys.readouterr().err


def test_weights_are_never_unpickled(tmp_path):
    """A pickle that would run code when loaded is refused, not executed."""
    from automl_tl.weights import read_state_dict

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="weights_only=True"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_cli_source_has_no_unsafe_loaders():
    """Only safetensors or torch.load(weights_only=True): no pickle, no weights_only=False."""
    for path in (REPO / "automl_tl").rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        assert "weights_only=False" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


# ---------------------------------------------------------------------------------------------
# skipped images reach the catalog and the report


def test_skipped_images_are_in_the_catalog_and_the_report(tmp_path, capsys):
    import sqlite3

    root = make_folder(tmp_path / "data", {"a": 8, "b": 8})
    (root / "a" / "zero.png").write_bytes(b"")
    truncated_jpeg(root / "b" / "cut.jpg")
    body = STUDY.replace('source = "digits:0-2"', 'source = "folder:data"\non_bad_image = "skip"')
    study = write_study(tmp_path, body.replace("image_size = 32", "image_size = 16"))
    assert main(["check-data", str(study)]) == 1  # the study's own [data]: not usable as is
    assert "unreadable files (2):" in capsys.readouterr().out
    assert main(["search", str(study), "--no-retrain", "--device", "cpu"]) == 0
    capsys.readouterr()
    expected = [
        (str(root / "a" / "zero.png"), "empty file (0 bytes)"),
        (str(root / "b" / "cut.jpg"), "truncated image"),
    ]
    db = sqlite3.connect(tmp_path / "tiny" / "catalog.db")
    assert (
        db.execute("select path, reason from skipped_images order by path").fetchall() == expected
    )
    assert main(["report", str(study), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["skipped_images"] == [{"path": p, "reason": r} for p, r in expected]
    assert main(["report", str(study)]) == 0
    assert (
        f'skipped 2 unreadable image(s) (on_bad_image = "skip"): {expected[0][0]} (empty file '
        f"(0 bytes)), {expected[1][0]} (truncated image)" in capsys.readouterr().out
    )


# ---------------------------------------------------------------------------------------------
# more bad input: one message, exit 2, no traceback (issue 13)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_nul_byte_in_the_study_name(tmp_path, capsys):
    study = tmp_path / "nul.toml"
    study.write_text('name = "a\\u0000b"\n' + STUDY)
    assert main(["search", str(study), "--device", "cpu"]) == 2
    assert _one_error_line(capsys).startswith(
        "error: name 'a\\x00b' must not contain control characters"
    )


def test_study_file_that_is_not_utf8(tmp_path, capsys):
    study = tmp_path / "latin1.toml"
    study.write_bytes('name = "caf\u00e9"\n'.encode("latin-1") + STUDY.encode())
    assert main(["search", str(study), "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "is not UTF-8 text" in line and "save it as UTF-8" in line


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("cdua", "error: device 'cdua' is not a device name; use auto, cpu, cuda, cuda:N or mps"),
        ("cuda:99", "error: device 'cuda:99': "),
    ],
)
def test_bad_device_is_one_message(tmp_path, capsys, device, expected):
    study = write_study(tmp_path, STUDY)
    assert main(["search", str(study), "--device", device]) == 2
    assert _one_error_line(capsys).startswith(expected)
    assert not (tmp_path / "tiny" / "optuna.db").exists()


@pytest.mark.parametrize("k", ["0", "-3"])
def test_predict_top_k_below_one(tmp_path, capsys, k):
    assert main(["predict", str(tmp_path), str(tmp_path), "--top-k", k]) == 2
    assert _one_error_line(capsys) == f"error: --top-k {k}: give 1 or more labels per image"


def test_fractions_that_starve_a_small_class_are_refused(registry, tmp_path):
    root = make_folder(tmp_path / "d", {"few": 3, "many": 12})
    with pytest.raises(DataError, match=r"class\(es\) \['few'\] have no training image left"):
        prepare_data(
            registry, f"folder:{root}", image_size=8, val_fraction=0.45, test_fraction=0.45
        )


def test_a_batch_size_that_trains_nothing_fails_instead_of_exporting(registry):
    """fit() never returns an untrained model as if it were fine (every batch dropped)."""
    from automl_tl import Choice, fit

    data = prepare_data(registry, "digits:0-1", image_size=16, seed=0, max_per_class=6)
    choice = Choice(backbone="test_resnet", epochs=1, batch_size=1)
    with pytest.raises(DataError, match="no training step ran"):
        fit(choice, data, registry, device="cpu", seed=0)


def test_a_same_size_edit_of_an_image_is_noticed(registry, tmp_path):
    """Path + size is not the data's identity: the bytes are (hashed while decoding)."""
    import optuna

    from automl_tl.study import check_data

    root = make_folder(tmp_path / "d", {"cat": 6, "dog": 6})
    study = optuna.create_study(study_name="s", direction="maximize")
    cache = tmp_path / "cache"
    check_data(study, prepare_data(registry, f"folder:{root}", image_size=8, cache_dir=cache))
    target = root / "cat" / "2.png"
    size, stat = target.stat().st_size, target.stat()
    _noise(seed=999).save(target)  # noise does not compress: the same size, other pixels
    assert target.stat().st_size == size
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an edit moves mtime
    with pytest.raises(DataError, match=r"contents of images changed .* in class\(es\) \['cat'\]"):
        check_data(study, prepare_data(registry, f"folder:{root}", image_size=8, cache_dir=cache))


def test_byte_identical_copies_across_splits_warn(registry, tmp_path):
    root = make_folder(tmp_path / "d", {"cat": 6, "dog": 6})
    for i in range(6):  # every dog is a copy of a cat: some land in another split
        (root / "dog" / f"{i}.png").write_bytes((root / "cat" / f"{i}.png").read_bytes())
    with pytest.warns(UserWarning, match=r"byte-identical copies of images in another split"):
        prepare_data(registry, f"folder:{root}", image_size=8)


def test_a_csv_that_lists_an_image_twice_is_refused(registry, tmp_path):
    make_folder(tmp_path, {"a": 4, "b": 4})
    rows = [f"a/{i}.png,a" for i in range(4)] + [f"b/{i}.png,b" for i in range(4)]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join([*rows, "a/1.png,a"]) + "\n")
    with pytest.raises(
        DataError, match=r"lists 1 image\(s\) more than once.*a/1.png \(lines 3, 10\)"
    ):
        load_dataset(registry, "csv:m.csv", tmp_path)


def test_a_csv_that_is_not_utf8_is_one_message(registry, tmp_path):
    make_folder(tmp_path, {"a": 4})
    (tmp_path / "m.csv").write_bytes("path,label\na/0.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"m.csv is not UTF-8 text .* save it as UTF-8"):
        load_dataset(registry, "csv:m.csv", tmp_path)
