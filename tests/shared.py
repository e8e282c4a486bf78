"""Studies searched once per test session and shared, read-only, by several test modules
(a test that changes one works on a copy). Imported by conftest.py as fixtures."""

from __future__ import annotations

import pytest

from .conftest import TINY_STUDY, run_main, write_study

#: test_resnet pretrained on digits 0-4: what tests/test_transfer.py's studies build from
#: ``[pretrain] epochs = 3, batch_size = 32`` (the same cache key), and test_pretrain's subject.
PRETRAIN_SPEC = dict(
    backbone="test_resnet", source="digits:0-4", image_size=32, epochs=3, batch_size=32
)

# Implements every hook with every argument its spec names (pluggy fails a call that does not
# pass one), and logs each call: test_every_hookspec_is_called_in_a_real_search.
RECORDER = """
import json, os
import automl_tl

LOG = os.environ.get("RECORDER_LOG", os.devnull)


def _write(event, **fields):
    with open(LOG, "a") as f:
        f.write(json.dumps({"event": event, **fields}) + "\\n")


@automl_tl.hookimpl
def register_backbones(register):
    _write("register_backbones")


@automl_tl.hookimpl
def register_augmentation_policies(register):
    _write("register_augmentation_policies")


@automl_tl.hookimpl
def register_unfreeze_strategies(register):
    _write("register_unfreeze_strategies")


@automl_tl.hookimpl
def register_datasets(register):
    _write("register_datasets")


@automl_tl.hookimpl
def register_metrics(register):
    _write("register_metrics")


@automl_tl.hookimpl
def trial_started(study_name, trial_number, params, output_dir):
    _write("trial_started", trial=trial_number, params=params, output_dir=output_dir)


@automl_tl.hookimpl
def epoch_finished(study_name, trial_number, epoch, metrics):
    _write("epoch_finished", trial=trial_number, epoch=epoch, val=metrics["val"])


@automl_tl.hookimpl
def trial_finished(study_name, trial_number, state, value, attrs):
    _write("trial_finished", trial=trial_number, state=state, value=value)


@automl_tl.hookimpl
def study_finished(study_name, best, output_dir):
    _write("study_finished", best=best, output_dir=output_dir)


@automl_tl.hookimpl
def model_exported(study_name, trial_number, model_dir, metrics, best):
    _write("model_exported", trial=trial_number, model_dir=model_dir, best=best)
"""


@pytest.fixture(scope="session")
def searched(tmp_path_factory):
    """``TINY_STUDY`` (with the recorder plugin) searched once through the command line, in
    this process: (folder, study file, CliResult, recorder log). Read-only for its users."""
    tmp = tmp_path_factory.mktemp("searched")
    (tmp / "recorder.py").write_text(RECORDER)
    study = write_study(tmp, 'plugins = ["recorder.py"]\n' + TINY_STUDY)
    log = tmp / "events.jsonl"
    result = run_main("search", str(study), "--device", "cpu", env={"RECORDER_LOG": str(log)})
    assert result.returncode == 0, result.stderr
    return tmp, study, result, log


@pytest.fixture(scope="session")
def pretrained_digits(tmp_path_factory, registry):
    """``PRETRAIN_SPEC`` pretrained once, as a study keeps it: ``pretrained/`` holds
    ``test_resnet--digits-0-4.safetensors`` and its sidecar. Read-only for its users."""
    from automl_tl.pretrain import PretrainSpec, pretrain

    out = tmp_path_factory.mktemp("pretrained") / "pretrained"
    return pretrain(
        PretrainSpec(**PRETRAIN_SPEC),
        out / "test_resnet--digits-0-4.safetensors",
        registry,
        device="cpu",
    )
