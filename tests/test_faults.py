"""Failures during a search: a trial that goes NaN, raises, or runs out of memory ends as FAIL
with its reason and the study goes on; too many failures in a row stop it with one message;
Ctrl-C / SIGTERM stop cleanly and the same command resumes with the remaining budget."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from automl_tl import load_config
from automl_tl.cli import main
from automl_tl.plugins import get_plugin_manager
from automl_tl.registry import Registry

from .conftest import REPO, SMALL_STUDY, run_main, write_study

FAULTS = """
import torch
from torch import nn

import automl_tl


class Fault(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "nan":
            return x * float("nan")
        if self.kind == "raise":
            raise RuntimeError("policy exploded at runtime")
        if self.kind == "cuda_oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        raise MemoryError("cannot allocate 20 GiB")


class Faulty(automl_tl.AugmentationPolicy):
    def __init__(self, kind):
        self.name, self.kind = f"{kind}_aug", kind

    def build(self, strength, image_size):
        return Fault(self.kind)


@automl_tl.hookimpl
def register_augmentation_policies(register):
    for kind in ("nan", "raise", "cuda_oom", "cpu_oom"):
        register(Faulty(kind))
"""

FAULT_STUDY = """
plugins = ["faults.py"]
[data]
source = "digits:0-1"
image_size = 16
[search]
n_trials = 2
backbones = ["test_resnet"]
augmentations = ["none", "nan_aug", "raise_aug", "cuda_oom_aug", "cpu_oom_aug"]
unfreeze = ["top_k"]
epochs = 1
pruner = "none"
"""

REASONS = {
    "nan_aug": "NonFiniteLossError: training loss became nan in epoch 1",
    "raise_aug": "RuntimeError: policy exploded at runtime",
    "cuda_oom_aug": "out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB",
    "cpu_oom_aug": "out of memory: MemoryError: cannot allocate 20 GiB",
}


def _params(augmentation: str) -> dict:
    params = {
        "backbone": "test_resnet",
        "augmentation": augmentation,
        "unfreeze": "top_k",
        "unfreeze_depth": 1.0,
        "lr": 1e-3,
        "weight_decay": 1e-4,
    }
    if augmentation != "none":
        params["aug_strength"] = 0.5
    return params


def _fault_study(tmp_path, body: str = FAULT_STUDY, queue=()):
    """A study with the fault plugin and these trials queued first (in this order)."""
    import optuna

    (tmp_path / "faults.py").write_text(FAULTS)
    config = load_config(write_study(tmp_path, body))
    pm, _ = get_plugin_manager(config.plugins, base_dir=config.base_dir)
    config.paths.root.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=config.name, storage=config.storage_url, direction="maximize"
    )
    for augmentation in queue:
        study.enqueue_trial(_params(augmentation))
    return config, pm, Registry.from_plugin_manager(pm)


@pytest.fixture(autouse=True)
def _restore_logging():
    import logging

    logger = logging.getLogger("automl_tl")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def test_nan_exception_and_out_of_memory_fail_and_the_study_goes_on(tmp_path, monkeypatch, capsys):
    import automl_tl.search as search_module
    from automl_tl.leaderboard import leaderboard

    freed = []
    monkeypatch.setattr(search_module, "release_memory", lambda device=None: freed.append(1))
    queue = ["nan_aug", "none", "raise_aug", "cuda_oom_aug", "cpu_oom_aug", "none"]
    config, pm, registry = _fault_study(tmp_path, queue=queue)
    outcome = search_module.search(config, registry, pm, device="cpu", retrain_best=False)
    trials = outcome.study.get_trials()
    assert [t.params["augmentation"] for t in trials] == queue  # nothing else ran
    assert [t.state.name for t in trials] == [
        "FAIL",
        "COMPLETE",
        "FAIL",
        "FAIL",
        "FAIL",
        "COMPLETE",
    ]
    for t in trials:
        assert t.user_attrs.get("fail_reason") == REASONS.get(t.params["augmentation"])
    assert outcome.finished == 2 and outcome.ran == 6
    assert len(freed) == 2  # memory given back after each out-of-memory trial

    report = leaderboard(config)
    assert [t["fail_reason"] for t in report["trials"]] == [REASONS.get(a) for a in queue]
    db = sqlite3.connect(config.output_dir / "catalog.db")
    rows = db.execute("select number, state, fail_reason from trials order by number").fetchall()
    assert rows == [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]

    assert main(["report", str(config.path)]) == 0
    table = capsys.readouterr().out
    for reason in REASONS.values():
        assert reason in table


def test_too_many_failures_in_a_row_stop_with_the_common_reason(tmp_path, capsys):
    body = FAULT_STUDY.replace("pruner = ", "max_consecutive_failures = 3\npruner = ")
    config, *_ = _fault_study(tmp_path, body, queue=["raise_aug", "nan_aug", "raise_aug", "none"])
    code = main(["search", str(config.path), "--no-retrain", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (
        "error: search stopped: 3 trials in a row failed (2 with: RuntimeError: policy exploded "
        "at runtime). Completed trials are kept; fix the cause and run the same command again "
        "to resume (raise [search] max_consecutive_failures to tolerate more)."
    )
    data = json.loads(run_main("report", str(config.path), "--format", "json", "--no-files").stdout)
    assert [t["state"] for t in data["trials"]] == ["FAIL", "FAIL", "FAIL", "WAITING"]  # no "none"


# ---------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM, then resume

RECORDER = """
import json, os, time

import automl_tl


def _write(**fields):
    with open(os.environ["EVENTS"], "a") as f:
        f.write(json.dumps({"run": os.environ["RUN"], **fields}) + "\\n")


@automl_tl.hookimpl
def trial_started(study_name, trial_number, params):
    _write(event="started", trial=trial_number)


@automl_tl.hookimpl
def epoch_finished(study_name, trial_number, epoch, metrics):
    _write(event="epoch", trial=trial_number, epoch=epoch)
    if str(trial_number) == os.environ.get("HANG_AT_TRIAL"):
        _write(event="hanging", trial=trial_number)
        time.sleep(120)  # the signal arrives here, in the middle of the trial


@automl_tl.hookimpl
def trial_finished(study_name, trial_number, state, value, attrs):
    _write(event="finished", trial=trial_number, state=state, reason=attrs.get("fail_reason"))
"""

RESUME_STUDY = """
plugins = ["recorder.py"]
[data]
source = "folder:data"
image_size = 16
[search]
n_trials = 3
backbones = ["test_resnet"]
augmentations = ["none", "flip_crop"]
unfreeze = ["top_k"]
epochs = 2
pruner = "none"
"""


def _events(path, run):
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["run"] == run]


def _search(study, events, run, hang_at=None, stop_with=None):
    """Run `automl-tl search`; with ``stop_with``, send that signal once trial ``hang_at`` hangs."""
    env = {**os.environ, "EVENTS": str(events), "RUN": run, "HANG_AT_TRIAL": str(hang_at)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "automl_tl.cli", "search", str(study), "--no-retrain"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    if stop_with is not None:
        deadline = time.time() + 300
        while not any(e["event"] == "hanging" for e in _events(events, run)):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the trial never started"
            time.sleep(0.1)
        proc.send_signal(stop_with)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_interrupt_and_resume(tmp_path):
    from PIL import Image

    from automl_tl.leaderboard import leaderboard as study_report

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 128 if cls == "a" else 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{i}.png")
    (tmp_path / "recorder.py").write_text(RECORDER)
    study = write_study(tmp_path, RESUME_STUDY)
    events = tmp_path / "events.jsonl"
    catalog = tmp_path / "tiny" / "catalog.db"

    def report():
        return study_report(load_config(study))["trials"]

    # 1: Ctrl-C in the middle of trial 1 (trial 0 is complete)
    code, out, err = _search(study, events, "1", hang_at=1, stop_with=signal.SIGINT)
    assert code == 130, err
    assert err.rstrip().endswith(
        "interrupted; completed trials are kept — run the same command again to resume"
    )
    assert "Traceback" not in err
    first = report()
    assert [(t["number"], t["state"], t["fail_reason"]) for t in first] == [
        (0, "COMPLETE", None),
        (1, "FAIL", "interrupted"),
        (2, "WAITING", None),  # trial 1's configuration, queued to run first on resume
    ]
    assert first[2]["params"] == first[1]["params"]
    assert "trial 1 was interrupted and queued again" in err
    finished = [
        (e["trial"], e["state"], e["reason"])
        for e in _events(events, "1")
        if e["event"] == "finished"
    ]
    assert finished == [(0, "COMPLETE", None), (1, "FAIL", "interrupted")]
    db = sqlite3.connect(catalog)
    assert db.execute(
        "select number, state, fail_reason from trials order by number"
    ).fetchall() == [
        (0, "COMPLETE", None),
        (1, "FAIL", "interrupted"),
    ]
    assert db.execute("select trial, epoch from epochs order by trial, epoch").fetchall() == [
        (0, 0),
        (0, 1),
        (1, 0),  # trial 1 stopped after its first epoch
    ]
    db.close()

    # 2: SIGTERM (a scheduler's stop) in the middle of the first trial of the next run
    code, out, err = _search(study, events, "2", hang_at=2, stop_with=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert [e["trial"] for e in _events(events, "2") if e["event"] == "started"] == [2]

    # 3: the same command again: only the remaining budget runs
    code, out, err = _search(study, events, "3")
    assert code == 0, err
    assert "3 trials finished (2 run now)" in out
    started = {
        run: [e["trial"] for e in _events(events, run) if e["event"] == "started"] for run in "123"
    }
    assert started == {"1": [0, 1], "2": [2], "3": [3, 4]}
    final = report()
    assert [(t["number"], t["state"], t["fail_reason"]) for t in final] == [
        (0, "COMPLETE", None),
        (1, "FAIL", "interrupted"),
        (2, "FAIL", "interrupted"),
        (3, "COMPLETE", None),
        (4, "COMPLETE", None),
    ]
    assert final[0] == first[0]  # the completed trial is untouched: same value, same duration
    # the interrupted configuration ran again, was interrupted again, and completed the third time
    assert final[1]["params"] == final[2]["params"] == final[3]["params"]
    db = sqlite3.connect(catalog)
    assert db.execute("select number, state from trials order by number").fetchall() == [
        (t["number"], t["state"]) for t in final
    ]
    counts = {
        "runs": 3,
        "started per run": {run: len(s) for run, s in started.items()},
        "complete": sum(t["state"] == "COMPLETE" for t in final),
        "interrupted": sum(t["fail_reason"] == "interrupted" for t in final),
    }
    print("interrupt/resume counts:", json.dumps(counts))
    assert counts["complete"] == 3 and counts["interrupted"] == 2


@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_optuna_creates_a_trial_fails_that_trial(tmp_path, monkeypatch, stop_with):
    """The signal lands after Optuna wrote trial 1 to the storage but before the objective saw
    it (the window a scheduler's SIGTERM hit in CI): trial 1 ends FAIL "interrupted", not
    RUNNING for ever; nothing else starts, and the same command resumes."""
    from optuna.trial import Trial

    from automl_tl.leaderboard import leaderboard as study_report

    study = write_study(tmp_path, SMALL_STUDY.replace("n_trials = 4", "n_trials = 3"))
    init = Trial.__init__
    created = []

    def created_then_signal(self, study, trial_id):  # study.ask(): the trial is in the storage
        init(self, study, trial_id)
        created.append(trial_id)
        if len(created) == 2:
            os.kill(os.getpid(), stop_with)  # handled right here, before the objective runs

    monkeypatch.setattr(Trial, "__init__", created_then_signal)
    code = main(["search", str(study), "--no-retrain", "--device", "cpu"])
    assert code == 128 + stop_with
    trials = study_report(load_config(study))["trials"]
    assert [(t["number"], t["state"], t["fail_reason"]) for t in trials] == [
        (0, "COMPLETE", None),
        (1, "FAIL", "interrupted"),
    ]
    monkeypatch.setattr(Trial, "__init__", init)
    assert main(["search", str(study), "--no-retrain", "--device", "cpu"]) == 0
    states = [t["state"] for t in study_report(load_config(study))["trials"]]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


def test_signals_outside_the_held_window_are_raised_at_once():
    from automl_tl.search import Interrupts

    with Interrupts() as interrupts:
        interrupts.hold()
        os.kill(os.getpid(), signal.SIGINT)  # held
        with pytest.raises(KeyboardInterrupt):
            interrupts.deliver()
        interrupts.deliver()  # delivered once only
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------------------------
# the best/ swap: no leftover, pid or interruption loses the exported model


def _export_tiny(registry, directory, bias: float = 0.0):
    import torch

    from automl_tl.components import DataConfig
    from automl_tl.export import export_model

    backbone = registry.get("backbones", "test_resnet")
    torch.manual_seed(0)
    model = backbone.create(2, image_size=16)
    with torch.no_grad():
        model.fc.bias.fill_(bias)
    cfg = DataConfig((3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return export_model(model, backbone, directory, ["a", "b"], cfg, {"bias": bias})


@pytest.fixture
def export_registry():
    from automl_tl import registry_for

    return registry_for()


def test_export_ignores_a_leftover_old_folder_with_our_pid(tmp_path, export_registry):
    """Containers reuse pids: a `.best.old.<pid>` from an earlier run must not fail the export."""
    best = tmp_path / "best"
    _export_tiny(export_registry, best, 0.0)
    leftover = tmp_path / f".best.old.{os.getpid()}"
    leftover.mkdir()
    (leftover / "junk.txt").write_text("from a killed run")
    _export_tiny(export_registry, best, 1.0)
    assert json.loads((best / "metrics.json").read_text()) == {"bias": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_kill_between_the_two_renames_keeps_the_old_model(tmp_path, export_registry):
    """What a SIGKILL between `best -> .best.old.*` and `staging -> best` leaves behind:
    no best/, the old model aside. Loading it (and the next export) puts the old one back."""
    from automl_tl import load_model
    from automl_tl.export import recover_export

    best = tmp_path / "best"
    _export_tiny(export_registry, best, 0.5)
    os.replace(best, tmp_path / ".best.old.4242abcd")
    (tmp_path / ".best.staging.elsewhere.1.x").mkdir()  # another host's, recent: kept
    m = load_model(best)
    assert m.label_names == ["a", "b"]
    assert json.loads((best / "metrics.json").read_text()) == {"bias": 0.5}
    assert not (tmp_path / ".best.old.4242abcd").exists()
    assert (tmp_path / ".best.staging.elsewhere.1.x").exists()
    assert recover_export(best) is False  # nothing left to repair


def test_stale_staging_folders_of_dead_exports_are_removed(tmp_path, export_registry):
    import socket

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    stale = tmp_path / f".best.staging.{socket.gethostname()}.{pid}.k2j3"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    _export_tiny(export_registry, tmp_path / "best", 0.0)
    assert not stale.exists()
    assert (tmp_path / "best" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# a full disk while the image cache is written: one message, not "Bus error"

DISK_FULL = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, like a full disk
from automl_tl import registry_for
from automl_tl.data import prepare_data
registry = registry_for()
resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))  # the cache needs ~5.5 MB
prepare_data(registry, "digits", image_size=32, cache_dir=Path(sys.argv[1]))
"""


def test_a_full_disk_while_caching_is_one_message(tmp_path):
    code = (
        "import sys\nfrom automl_tl.cli import main\nfrom automl_tl.errors import UserError\n"
        "try:\n" + "".join(f"    {line}\n" for line in DISK_FULL.strip().splitlines()) + ""
        "except UserError as exc:\n    print('error:', exc, file=sys.stderr); sys.exit(2)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "cannot write the decoded image cache (5.5 MB) in " in result.stderr
    assert "Free disk space" in result.stderr
    assert not any((tmp_path / "cache").glob("*.tmp"))  # nothing half written is left
