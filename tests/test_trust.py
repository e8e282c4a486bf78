"""Trust boundaries: what automl-tl runs (plugins, study files, worker processes) and what it
reads (images, weights, exports) is checked, and names from the data never act as code in a
terminal, a spreadsheet or a figure (issue 13). docs/architecture.md, "Trust boundaries"."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from automl_tl import DataError, PluginError, UserError, load_config
from automl_tl.cli import main
from automl_tl.data import bad_image_reason, decode_image, load_dataset, prepare_data
from automl_tl.plugins import get_plugin_manager

from .conftest import write_study


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() points the automl_tl logger at this test's stderr; undo it afterwards."""
    import logging

    logger = logging.getLogger("automl_tl")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def _noise(path: Path, seed: int = 0, size: int = 12) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _folder(root: Path, classes=("a", "b"), n: int = 4) -> Path:
    for k, cls in enumerate(classes):
        for i in range(n):
            _noise(root / cls / f"{i}.png", seed=10 * k + i)
    return root


# ---------------------------------------------------------------------------------------------
# plugins: a study file is code, so its plugins run only where they are needed

MARKING_PLUGIN = """
from pathlib import Path

import automl_tl
from automl_tl.default_plugins.datasets import Digits

Path({marker!r}).write_text("ran")


class FromPlugin(Digits):
    name = "fromplugin"


@automl_tl.hookimpl
def register_datasets(register):
    register(FromPlugin())
"""


def _marking_study(tmp_path: Path, source: str = "digits:0-2") -> tuple[Path, Path]:
    marker = tmp_path / "plugin-ran"
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "marking.py").write_text(MARKING_PLUGIN.format(marker=str(marker)))
    study = write_study(
        tmp_path,
        f"""
        plugins = ["marking.py"]
        [data]
        source = "{source}"
        image_size = 8
        [search]
        backbones = ["test_resnet"]
        """,
    )
    return study, marker


def test_check_data_runs_no_study_plugin_it_does_not_need(tmp_path, capsys):
    study, marker = _marking_study(tmp_path)
    assert main(["check-data", str(study)]) == 0
    assert not marker.exists()
    study, marker = _marking_study(tmp_path / "other", source="fromplugin:0-2")
    assert main(["check-data", str(study)]) == 0  # its data source is the plugin's: loaded
    assert marker.exists()


def test_report_runs_no_study_plugin_it_does_not_need(tmp_path, capsys):
    import optuna

    from automl_tl.storage import open_storage

    study, marker = _marking_study(tmp_path)
    config = load_config(study)
    storage = open_storage(config.storage_url, heartbeat_interval=60)
    optuna.create_study(study_name=config.name, storage=storage)
    assert main(["report", str(study)]) == 0
    assert not marker.exists()
    assert (config.output_dir / "report" / "index.html").is_file()


def test_a_relative_plugin_path_is_the_study_folders_not_the_cwds(tmp_path, monkeypatch):
    studies = tmp_path / "studies"
    studies.mkdir()
    for where in (studies, tmp_path):
        (where / "mine.py").write_text(f"WHERE = {str(where)!r}\n")
    study = write_study(studies, 'plugins = ["mine.py"]\n')
    monkeypatch.chdir(tmp_path)  # a same-named file where the command runs
    config = load_config(study)
    pm, infos = get_plugin_manager(config.plugins)
    assert str(studies) == pm.get_plugin("mine").WHERE
    assert infos["mine"].location == str(studies / "mine.py")


def test_two_plugin_files_with_one_name_are_refused(tmp_path):
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "tracker.py").write_text("")
    with pytest.raises(PluginError, match=r"two plugin files are named tracker.py: .*a/tracker.py"):
        get_plugin_manager([str(tmp_path / "a" / "tracker.py"), str(tmp_path / "b" / "tracker.py")])
    pm, _ = get_plugin_manager([str(tmp_path / "a" / "tracker.py")] * 2)  # the same file: fine
    assert pm.get_plugin("tracker") is not None


def test_workers_cannot_be_shadowed_by_a_package_folder_in_the_cwd(tmp_path):
    """`python -m automl_tl.cli` in a folder holding automl_tl/ runs that folder's code;
    the command run_workers starts its workers with does not."""
    from automl_tl.workers import python_module_command

    shadow = tmp_path / "automl_tl"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("print('SHADOWED'); raise SystemExit(7)\n")
    (shadow / "cli.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    naive = subprocess.run(
        [sys.executable, "-m", "automl_tl.cli", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert "SHADOWED" in naive.stdout  # the hazard is real
    safe = subprocess.run(
        [*python_module_command("automl_tl.cli"), "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert safe.returncode == 0 and "SHADOWED" not in safe.stdout
    assert safe.stdout.startswith("automl-tl ")


# ---------------------------------------------------------------------------------------------
# what is read: the dataset folder and nothing outside it, images by an allowed format


def test_symlinks_out_of_the_dataset_folder_are_refused(registry, tmp_path, monkeypatch):
    root = _folder(tmp_path / "data")
    outside = _noise(tmp_path / "private" / "secret.png", seed=99)
    (root / "a" / "inside-link.png").symlink_to(root / "b" / "0.png")  # stays inside: fine
    (root / "a" / "leak.png").symlink_to(outside)
    dataset = load_dataset(registry, f"folder:{root}", tmp_path)
    paths = {Path(r.image).name for r in dataset.records}
    assert "inside-link.png" in paths and "leak.png" not in paths
    assert [(Path(p).name, why.split(",")[0]) for p, why in dataset.problems] == [
        ("leak.png", f"symbolic link to {outside}")
    ]
    with pytest.raises(
        DataError, match=r"leak.png: symbolic link to .*AUTOML_TL_FOLLOW_SYMLINKS=1"
    ):
        prepare_data(registry, f"folder:{root}", image_size=8)
    (root / "c").symlink_to(tmp_path / "private", target_is_directory=True)
    with pytest.raises(DataError, match=r"class folder .*/c is a symbolic link to .*private"):
        load_dataset(registry, f"folder:{root}", tmp_path)
    monkeypatch.setenv("AUTOML_TL_FOLLOW_SYMLINKS", "1")  # the explicit option
    dataset = load_dataset(registry, f"folder:{root}", tmp_path)
    assert {"leak.png", "secret.png"} <= {Path(r.image).name for r in dataset.records}
    assert dataset.problems == []


def test_a_linked_dataset_root_is_fine(registry, tmp_path):
    real = _folder(tmp_path / "mnt" / "pets")
    (tmp_path / "pets").symlink_to(real, target_is_directory=True)
    dataset = load_dataset(registry, "folder:pets", tmp_path)
    assert len(dataset.records) == 8 and dataset.problems == []


def test_an_output_folder_inside_the_data_root_is_not_a_class(registry, tmp_path):
    root = _folder(tmp_path / "data")
    out = root / "my-study"
    _noise(out / "report" / "confusion.png")
    (out / "catalog.db").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"ignored .*my-study: it is a study's output folder"):
        dataset = load_dataset(registry, f"folder:{root}", tmp_path)
    assert dataset.class_names == ["a", "b"]


def test_a_postscript_file_named_png_is_not_opened(tmp_path):
    """Pillow picks the decoder by content; EPS would hand the file to Ghostscript."""
    eps = tmp_path / "photo.png"
    eps.write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
        b"newpath 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n"
    )
    with pytest.raises(Exception) as err:
        decode_image(eps, 8)
    assert bad_image_reason(err.value, eps) == "not an image (no image format recognises it)"


def test_a_huge_image_is_refused_by_name_before_it_is_decoded(registry, tmp_path, monkeypatch):
    root = _folder(tmp_path / "data")
    Image.new("L", (300, 200)).save(root / "a" / "poster.png")
    monkeypatch.setenv("AUTOML_TL_MAX_IMAGE_PIXELS", "50000")
    with pytest.raises(DataError) as err:
        prepare_data(registry, f"folder:{root}", image_size=8)
    assert f"{root / 'a' / 'poster.png'}: image too large: 300x200 = 0 MP" in str(err.value)
    assert "AUTOML_TL_MAX_IMAGE_PIXELS" in str(err.value)


def test_a_16bit_image_decodes_without_float64_copies(tmp_path):
    """A 16-bit grayscale image used to go through five float64 copies of itself."""
    import tracemalloc

    side = 1500
    ramp = np.tile(np.linspace(0, 65535, side, dtype=np.uint16), (side, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    tracemalloc.start()
    try:
        out = decode_image(tmp_path / "deep.png", 8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * side * side  # was over 20 bytes per pixel (float64 copies)
    row = out[0, 0]
    assert row[0] < 30 and row[-1] > 225 and list(row) == sorted(row)  # range kept, not white


def test_cache_temporaries_never_follow_a_planted_link(registry, tmp_path):
    """The old temporary name was predictable; a link planted there was written through."""
    from automl_tl.data import _local_cache_key, decoded_images

    root = _folder(tmp_path / "data")
    records = load_dataset(registry, f"folder:{root}", tmp_path).records
    cache = tmp_path / "cache"
    cache.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    name = f"images-{_local_cache_key(records, 8)}.npy"
    stem = f".{name}.{socket.gethostname()}.{os.getpid()}"
    (cache / f"{stem}.npy.tmp").symlink_to(victim)
    (cache / f"{stem}.json.tmp").symlink_to(victim)
    images, bad, _ = decoded_images(records, 8, cache)
    assert images.shape == (8, 3, 8, 8) and bad == []
    assert victim.read_text() == "keep me"


def test_the_sqlite_url_quotes_the_study_folder(tmp_path):
    """`?` starts URL options and `%2E%2E%2F` is unquoted to `../` by SQLAlchemy."""
    import optuna

    from automl_tl.storage import open_storage

    for name in ("what?x", "%2E%2E%2Fescaped"):
        study = tmp_path / "s.toml"
        study.write_text(f'name = "{name}"\n')
        config = load_config(study)
        storage = open_storage(config.storage_url, heartbeat_interval=60)
        optuna.create_study(study_name="q", storage=storage)
        assert (config.output_dir / "optuna.db").is_file(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["%2E%2E%2Fescaped", "s.toml", "what?x"]
    assert not (tmp_path.parent / "escaped").exists()


# ---------------------------------------------------------------------------------------------
# exports: config.json cannot steer the model's constructor


@pytest.fixture
def exported(tmp_path, registry):
    import torch

    from automl_tl.components import DataConfig
    from automl_tl.export import export_model

    backbone = registry.get("backbones", "test_resnet")
    torch.manual_seed(0)
    model = backbone.create(2, image_size=16)
    cfg = DataConfig((3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    export_model(model, backbone, tmp_path / "best", ["=cat", "dog\x1b[2J"], cfg, {})
    return tmp_path / "best"


def test_load_model_refuses_model_args_outside_the_allow_list(exported):
    from automl_tl import load_model

    assert load_model(exported).label_names == ["=cat", "dog\x1b[2J"]
    config = json.loads((exported / "config.json").read_text())
    config["model_args"]["checkpoint_path"] = "/etc/hostname"
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"model_args \['checkpoint_path'\] are not passed"):
        load_model(exported)


def test_predict_output_is_inert_in_a_terminal_and_a_spreadsheet(
    exported, tmp_path, capsys, monkeypatch
):
    images = tmp_path / "images"
    _noise(images / "=HYPERLINK(1).png")
    _noise(images / "\x1b]0;title\x07.png", seed=1)
    monkeypatch.chdir(images)  # relative paths: a cell starts with the file's name
    assert main(["predict", str(exported), ".", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    rows = out.strip().splitlines()[1:]
    assert all(not cell.startswith(("=", "+", "-", "@")) for r in rows for cell in r.split(","))
    assert sorted(r.split(",")[0] for r in rows) == ["'=HYPERLINK(1).png", "\\x1b]0;title\\x07.png"]
    assert all(r.split(",")[1] in ("'=cat", "dog\\x1b[2J") for r in rows)
    assert main(["predict", str(exported), "."]) == 0
    assert "\x1b" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# end to end: names a real dataset has (a "$" in a class, a file name that is not UTF-8)


@pytest.mark.slow
def test_search_report_and_predict_with_odd_names(tmp_path, capsys):
    root = tmp_path / "data"
    _folder(root, classes=("$\\frac{$", "plain"), n=6)
    os.rename(root / "plain" / "0.png", os.fsencode(root / "plain") + b"/\xff\xfe.png")
    study = write_study(
        tmp_path,
        textwrap.dedent(
            """
            [data]
            source = "folder:data"
            image_size = 16
            [search]
            n_trials = 1
            backbones = ["test_resnet"]
            augmentations = ["none"]
            unfreeze = ["top_k"]
            epochs = 1
            batch_size = 8
            pruner = "none"
            """
        ),
    )
    assert main(["search", str(study), "--device", "cpu", "-q"]) == 0
    assert main(["report", str(study)]) == 0
    report = tmp_path / "tiny" / "report"
    assert (report / "index.html").is_file()
    manifest = json.loads((report / "manifest.json").read_text())
    written = {f["file"] for f in manifest["files"] if f["written"]}
    assert "confusion_matrix.png" in written  # the class names drawn as text, not TeX
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "tiny" / "best"), str(root), "--format", "csv"]) == 0
    assert "\\xff\\xfe.png" in capsys.readouterr().out


def test_node_locks_never_follow_a_planted_link(tmp_path):
    """Lock files have predictable names; a link planted there must not create its target."""
    from automl_tl._util import node_lock

    (tmp_path / ".best.lock").symlink_to(tmp_path / "elsewhere" / "created")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(OSError), node_lock(tmp_path / ".best.lock"):
        pass
    assert not (tmp_path / "elsewhere" / "created").exists()
