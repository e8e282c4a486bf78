"""Shared fixtures. Installed third-party plugins never leak into a test run: entry-point
loading is off unless a test turns it on (as datasette does with DATASETTE_LOAD_PLUGINS).

In CI (``CI=true``, or ``AUTOML_TL_REQUIRE_DEV=1`` as ``.ci/run`` sets) every dev dependency
must be installed: a missing one stops the run naming it, instead of turning its tests into
skips. Elsewhere those tests are skipped with the install command.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
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

# What the tests import from pyproject's dev extra and plugins/ (distribution -> module).
# tests/test_docs.py checks this against pyproject.toml, so a new dev dependency is listed here.
DEV_MODULES = {
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
    "pytest": "pytest",
    "pytest-timeout": "pytest_timeout",
    "pytest-randomly": "pytest_randomly",
    "ruff": "ruff",
    "psycopg2-binary": "psycopg2",
    "optuna-dashboard": "optuna_dashboard",
    "datasette": "datasette",
    "mlflow": "mlflow",
    "automl-tl-example-backbone": "automl_tl_example_backbone",
    "automl-tl-mlflow": "automl_tl_mlflow",
    "automl-tl-tensorboard": "automl_tl_tensorboard",
    "automl-tl-torchvision": "automl_tl_torchvision",
}


def dev_required() -> bool:
    """True in CI: a missing dev dependency is a failure there, never a skip."""
    return (
        os.environ.get("CI", "").lower() in ("1", "true", "yes")
        or os.environ.get("AUTOML_TL_REQUIRE_DEV") == "1"
    )


def missing_dev_dependencies() -> list[str]:
    """The distributions in :data:`DEV_MODULES` whose module cannot be found."""
    return [
        dist for dist, module in DEV_MODULES.items() if importlib.util.find_spec(module) is None
    ]


def pytest_sessionstart(session):
    missing = missing_dev_dependencies() if dev_required() else []
    if missing:
        raise pytest.UsageError(
            f"dev dependencies missing: {', '.join(missing)} (CI requires them: "
            "pip install -e '.[dev]' plus plugins/*, as `make test` does)"
        )


def needs(module: str):
    """Import a dev dependency for one test: in CI a missing one fails naming it, elsewhere
    the test is skipped with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = (
            f"{module} is not installed ({exc}); `make test` installs the dev extra and plugins/*"
        )
        if dev_required():
            pytest.fail(f"dev dependency missing in CI: {message}")
        pytest.skip(message)


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """Every test leaves the ``automl_tl`` logger and Optuna's verbosity as it found them: a
    test that calls ``cli.main`` or ``setup_logging`` itself (``-q`` sets the logger to
    WARNING, which also turns the decoding bar off) must not change what a later test sees."""
    import logging

    import optuna

    logger = logging.getLogger("automl_tl")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    verbosity = optuna.logging.get_verbosity()
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
    optuna.logging.set_verbosity(verbosity)


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


# TINY_STUDY on 3 digits and 1 epoch: for tests that assert what a search does, not how well
# it learns (a third of the images, half the epochs).
SMALL_STUDY = TINY_STUDY.replace('source = "digits"', 'source = "digits:0-2"').replace(
    "epochs = 2", "epochs = 1"
)
assert SMALL_STUDY.count("digits:0-2") == 1 and "epochs = 1" in SMALL_STUDY


@pytest.fixture
def tiny_study(tmp_path):
    return write_study(tmp_path, TINY_STUDY)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    """Run ``automl-tl`` in a subprocess, as a user would: for tests of the process itself
    (signals, exit without a traceback, workers); the :func:`cli` fixture is faster."""
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


@dataclasses.dataclass
class CliResult:
    """What ``automl-tl ARGS`` returned and printed (the fields of a CompletedProcess)."""

    returncode: int
    stdout: str
    stderr: str


def run_main(*args: str, env: dict | None = None, cwd: Path | None = None) -> CliResult:
    """``automl-tl ARGS`` in this process: ``main(argv)`` with its output captured, 2-5 s
    faster than a subprocess. ``env`` and ``cwd`` hold for this call only; the logging,
    warning and signal set-up that ``main`` changes is put back afterwards."""
    import contextlib
    import io
    import logging
    import signal
    import warnings

    import optuna

    from automl_tl.cli import main

    logger = logging.getLogger("automl_tl")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    saved_format, saved_verbosity = warnings.formatwarning, optuna.logging.get_verbosity()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        if cwd is not None:
            mp.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(list(args))
        except SystemExit as exc:  # argparse: --help, a usage error
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            logger.handlers[:], logger.level, logger.propagate = saved
            warnings.formatwarning = saved_format
            optuna.logging.set_verbosity(saved_verbosity)
            for s, handler in saved_signals.items():
                signal.signal(s, handler)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    """:func:`run_main`: the command line in this process, where the process itself is not
    what a test is about (``run_cli`` for signals, tracebacks, worker processes)."""
    return run_main


from .shared import pretrained_digits, searched  # noqa: E402, F401  (built once per session)
