"""``automl-tl plugins new``: a ready package per kind whose own tests pass; installed, its
backbone trains, exports with its distribution and version recorded, and predicts with no
--plugin; uninstalled, predict names what to install. Plugins declare the automl-tl versions
they support (issue 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, run_cli, write_study

KINDS = ["backbone", "policy", "strategy", "dataset", "tracker"]


def _own_tests(package, installed=False):
    path = str(REPO) if installed else f"{REPO}{os.pathsep}{package / 'src'}"
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "tests",
        ],
        cwd=package,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_new_plugin_of_each_kind_passes_its_own_tests(tmp_path, kind):
    result = run_cli("plugins", "new", f"team-{kind}", "--kind", kind, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    package = tmp_path / f"automl-tl-team-{kind}"
    assert (package / "pyproject.toml").is_file() and (package / "README.md").is_file()
    pyproject = (package / "pyproject.toml").read_text()
    assert (
        'version = "0.1.0"' in pyproject and f'team_{kind} = "automl_tl_team_{kind}"' in pyproject
    )
    assert 'test = ["pytest"]' in pyproject
    tests = _own_tests(package)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert " passed" in tests.stdout


def test_new_into_an_existing_folder_overwrites_nothing(tmp_path):
    folder = tmp_path / "automl-tl-team-cnn"
    folder.mkdir()
    (folder / "pyproject.toml").write_text("mine")
    result = run_cli("plugins", "new", "team_cnn", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "already exists; nothing was written" in result.stderr
    assert (folder / "pyproject.toml").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["pyproject.toml"]


def test_a_bad_plugin_name_or_word_is_one_message(tmp_path):
    result = run_cli("plugins", "new", "9lives", cwd=tmp_path)
    assert result.returncode == 2 and "must start with a letter" in result.stderr
    result = run_cli("plugins", "old", "x", cwd=tmp_path)
    assert result.returncode == 2 and "plugins new NAME" in result.stderr
    assert not any(tmp_path.iterdir())


STUDY = """
[data]
source = "digits"
image_size = 16
seed = 0

[search]
n_trials = 1
backbones = ["@NAME@"]
augmentations = ["none"]
unfreeze = ["top_k"]
epochs = 1
batch_size = 64
pruner = "none"
"""


@pytest.mark.slow
def test_an_installed_scaffold_trains_exports_and_predicts_by_its_entry_point(tmp_path):
    """pip install -e (into this environment, uninstalled at the end): the entry point loads
    by itself everywhere; the export records distribution and version; another version warns;
    once uninstalled, predict says what to pip install."""
    name = f"scaffold{os.getpid()}"
    dist = f"automl-tl-{name}"
    assert run_cli("plugins", "new", name, cwd=tmp_path).returncode == 0
    package = tmp_path / dist
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    installed = subprocess.run([*pip, "-e", str(package)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    env = {"AUTOML_TL_LOAD_PLUGINS": name}  # this plugin only, not the developer's others
    try:
        tests = _own_tests(package, installed=True)  # its own tests, against the install
        assert tests.returncode == 0, tests.stdout + tests.stderr
        listed = run_cli("plugins", "--format", "json", env=env)
        assert listed.returncode == 0, listed.stderr
        plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
        assert plugins[name]["source"] == "entry point"
        assert plugins[name]["registers"] == {"backbones": [name]}

        study = write_study(tmp_path, STUDY.replace("@NAME@", name), name="team")
        result = run_cli("search", str(study), "-q", env=env)
        assert result.returncode == 0, result.stderr
        best = tmp_path / "team" / "best"
        origin = json.loads((best / "config.json").read_text())["automl_tl"]["backbone_origin"]
        assert origin["source"] == "entry point"
        assert origin["distribution"] == dist and origin["version"] == "0.1.0"
        digits = tmp_path / "img.png"
        from PIL import Image

        Image.new("RGB", (16, 16)).save(digits)
        result = run_cli("predict", str(best), str(digits), "--format", "json", env=env)
        assert result.returncode == 0, result.stderr
        result = run_cli("export", str(study), env=env)
        assert result.returncode == 0 and "timm export" not in result.stdout

        config = json.loads((best / "config.json").read_text())
        config["automl_tl"]["backbone_origin"]["version"] = "0.0.9"
        (best / "config.json").write_text(json.dumps(config))
        result = run_cli("predict", str(best), str(digits), env=env)
        assert result.returncode == 0, result.stderr
        assert f"{dist} 0.0.9; 0.1.0 is loaded now" in result.stderr
    finally:
        subprocess.run(
            [sys.executable, "-m", "pip", "uninstall", "-q", "-y", dist], capture_output=True
        )
    result = run_cli("predict", str(best), str(digits), env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"pip install '{dist}==0.0.9'" in result.stderr


PLUGIN_REQUIRING = """
import automl_tl

automl_tl_requires = "@SPEC@"


@automl_tl.hookimpl
def register_augmentation_policies(register):
    pass
"""


@pytest.mark.parametrize(
    "spec, says",
    [
        ("<0.1", "written for an older plugin contract; since then 0.1.0: "),
        (">=9.0", "it needs a newer automl-tl"),
        ("banana", "is not a version specifier"),
    ],
)
def test_a_plugin_for_another_automl_tl_is_one_message(tmp_path, spec, says):
    plugin = tmp_path / "old_plugin.py"
    plugin.write_text(PLUGIN_REQUIRING.replace("@SPEC@", spec))
    result = run_cli("plugins", "--plugin", str(plugin))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "plugin 'old_plugin'" in result.stderr and says in result.stderr


def test_a_plugin_for_this_automl_tl_loads(tmp_path):
    plugin = tmp_path / "new_plugin.py"
    plugin.write_text(PLUGIN_REQUIRING.replace("@SPEC@", ">=0.1,<1"))
    result = run_cli("plugins", "--plugin", str(plugin))
    assert result.returncode == 0, result.stderr
    assert "new_plugin" in result.stdout
