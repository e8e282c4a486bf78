"""Shared fixtures. Installed third-party plugins never leak into a test run: entry-point
loading is off unless a test turns it on (as datasette does with DATASETTE_LOAD_PLUGINS)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

os.environ["AUTOML_TL_LOAD_PLUGINS"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download weights

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from automl_tl import registry_for  # noqa: E402

from .postgres import postgres_server, postgres_url  # noqa: E402, F401  (a throwaway server)

REPO = Path(__file__).resolve().parent.parent
TEST_BACKBONES = ["test_resnet", "test_vit", "test_convnext", "test_efficientnet"]


@pytest.fixture(scope="session")
def registry():
    return registry_for()


def write_study(folder: Path, body: str, name: str = "tiny") -> Path:
    """Write a study file; ``body`` is TOML appended after ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\n' + textwrap.dedent(body))
    return path


TINY_STUDY = """
[data]
source = "digits"
image_size = 32
seed = 0

[search]
n_trials = 4
backbones = ["test_resnet", "test_convnext"]
augmentations = ["none", "flip_crop"]
unfreeze = ["top_k", "layer_decay"]
epochs = 2
batch_size = 64
pruner = "none"
"""


def create_study(config):
    """Create ``config``'s study empty, as a search would before its first trial (tests that
    fill a study by hand; ``automl_tl.storage.open_study`` only opens existing ones)."""
    import optuna

    from automl_tl.storage import open_storage

    return optuna.create_study(
        study_name=config.name,
        storage=open_storage(config.storage_url),
        direction="maximize",
        load_if_exists=True,
    )


@pytest.fixture
def tiny_study(tmp_path):
    return write_study(tmp_path, TINY_STUDY)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    """Run ``automl-tl`` in a subprocess, as a user would."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "automl_tl.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )
