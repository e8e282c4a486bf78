"""Progress while searching: live lines on a terminal, plain logs elsewhere, -q and -v."""

import datetime as dt
import io
import logging
import os
import re
import subprocess
import sys

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from automl_tl import get_plugin_manager, load_config
from automl_tl.progress import LiveLines, StudyWatcher, TrialProgress, show_progress, study_state
from automl_tl.storage import open_study

from .conftest import create_study, run_main, write_study

STUDY = """
[data]
source = "digits:0-1"
image_size = 16

[search]
n_trials = 1
backbones = ["test_resnet"]
augmentations = ["none"]
unfreeze = ["top_k"]
epochs = 2
pruner = "none"
"""


# tiny models: one thread each, no fight over the cores with the test run itself
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def _screen(text: str) -> str:
    """What the live lines printed, without tqdm's cursor movements."""
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).replace("\r", "\n")


def _complete(study, number, value, seconds):
    trial = optuna.trial.create_trial(
        value=value,
        params={"backbone": "test_resnet"},
        distributions={"backbone": CategoricalDistribution(["test_resnet", "test_vit"])},
    )
    trial.datetime_start = dt.datetime(2025, 1, 1, 12, 0, number)
    trial.datetime_complete = trial.datetime_start + dt.timedelta(seconds=seconds)
    study.add_trial(trial)


@pytest.fixture
def config(tmp_path):
    config = load_config(write_study(tmp_path, STUDY.replace("n_trials = 1", "n_trials = 6")))
    study = create_study(config)
    _complete(study, 0, 0.7, 10)
    _complete(study, 1, 0.9, 30)
    return config


def test_live_lines_show_trial_backbone_epoch_eta_and_best(config):
    terminal = FakeTerminal()
    pm, _ = get_plugin_manager()
    root = logging.getLogger("automl_tl")
    handler = logging.StreamHandler(terminal)
    root.addHandler(handler)
    try:
        with show_progress(config, 0, pm=pm, stream=terminal) as plugin:
            assert isinstance(plugin, TrialProgress) and plugin.display is not None
            pm.hook.trial_started(
                study_name="tiny", trial_number=2, params={"backbone": "test_vit"}, output_dir="."
            )
            pm.hook.epoch_finished(
                study_name="tiny",
                trial_number=2,
                epoch=0,
                metrics={"train_loss": 1.5, "val": {"accuracy": 0.625}, "seconds": 1.0},
            )
            root.warning("a log line while the bars are shown")
            assert handler.stream is not terminal  # routed above the bars
            header = plugin.display.header_text()
            line = plugin.display.line_text(0, plugin.display.lines[0])
        assert handler.stream is terminal  # restored
    finally:
        root.removeHandler(handler)
    # 2 of 6 trials finished in 20 s each on average: 4 left on one worker -> 80 s
    assert header == "study tiny: 2/6 trials finished, best accuracy 0.9000 (#1), ETA 01:20"
    assert re.fullmatch(
        r"w0 trial   2 test_vit\s+epoch 1/2  \d\d:\d\d<\d\d:\d\d  val 0\.6250  best 0\.9000", line
    ), line
    screen = _screen(terminal.getvalue())
    assert "study tiny: 2/6 trials finished" in screen
    assert "w0 trial   2 test_vit" in screen and "epoch 1/2" in screen
    assert "a log line while the bars are shown" in screen.splitlines()
    assert pm.get_plugin("automl_tl.progress") is None


def test_no_live_lines_off_a_terminal_or_when_quiet(config, caplog):
    pm, _ = get_plugin_manager()
    for stream, verbosity in ((io.StringIO(), 0), (FakeTerminal(), -1)):
        with show_progress(config, verbosity, pm=pm, stream=stream) as plugin:
            assert plugin.display is None
            pm.hook.trial_started(
                study_name="tiny", trial_number=2, params={"backbone": "x"}, output_dir="."
            )
        assert stream.getvalue() == ""
    caplog.set_level(logging.DEBUG, logger="automl_tl")
    plugin = TrialProgress(config, live=False)
    plugin.trial_started(study_name="tiny", trial_number=3, params={})
    plugin.epoch_finished(
        study_name="tiny",
        trial_number=3,
        epoch=1,
        metrics={"train_loss": 0.25, "val": {"accuracy": 0.5}, "seconds": 2.0, "images_per_s": 50},
    )
    (record,) = [r for r in caplog.records if "epoch" in r.getMessage()]
    assert record.levelno == logging.DEBUG  # shown with -v only
    assert re.match(
        r"trial   3 epoch 2/2: train_loss 0\.2500  val accuracy 0\.5000  2\.0s  50 img/s  ETA",
        record.getMessage(),
    )


def test_study_watcher_shows_one_line_per_running_worker(config):
    study = open_study(config)
    for pid, epochs_run in ((101, 1), (202, 0)):
        trial = study.ask({"backbone": CategoricalDistribution(["test_resnet", "test_vit"])})
        trial.set_user_attr("worker", {"host": "node1", "pid": pid})
        trial.set_user_attr("epochs_run", epochs_run)
        if epochs_run:
            trial.report(0.55, 1)
    assert study_state(study).running == 2
    terminal = FakeTerminal()
    watcher = StudyWatcher(config, stream=terminal)
    try:
        watcher.poll()
        lines = [watcher.display.line_text(k, v) for k, v in watcher.display.lines.items()]
    finally:
        watcher.close()
    assert len(lines) == 2
    assert (
        lines[0].startswith("w0 trial   2 ")
        and "epoch 1/2" in lines[0]
        and "val 0.5500" in lines[0]
    )
    assert lines[1].startswith("w1 trial   3 ") and "epoch 0/2" in lines[1]
    assert "study tiny: 2/6 trials finished" in _screen(terminal.getvalue())


def test_header_eta_counts_running_workers():
    display = LiveLines("s", 10, "accuracy", FakeTerminal())
    display.state.finished, display.state.running, display.state.mean_trial_s = 4, 3, 30.0
    assert display.header_text().endswith("ETA 01:00")  # 6 trials x 30 s / 3 workers


def _on_a_terminal(*args: str) -> str:
    """Run the command line on a pseudo-terminal; what the screen shows at the end."""
    import fcntl
    import struct
    import termios

    primary, secondary = os.openpty()
    # 24 rows x 120 columns, as a terminal window has (a bare pty is 0 x 0: tqdm draws nothing)
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm", **ONE_THREAD}
    proc = subprocess.Popen(
        [sys.executable, "-m", "automl_tl.cli", *args],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
    )
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=300) == 0, out.decode(errors="replace")
    os.close(primary)
    return _screen(out.decode(errors="replace"))


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_quiet_on_a_terminal_shows_only_the_summary(tmp_path):
    """-q hides every bar too, the image cache's included (built here: a fresh study)."""
    study = write_study(tmp_path, STUDY.replace("epochs = 2", "epochs = 1"))
    screen = _on_a_terminal("search", str(study), "-q", "--no-retrain")
    lines = [line.strip() for line in screen.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("study tiny: 1 trials finished"), screen


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_live_lines_on_a_terminal_plain_logs_elsewhere_and_quiet(tmp_path):
    """A pseudo-terminal gets the header and the worker line; a pipe gets plain log lines
    (with -v one per epoch); -q prints only the final summary."""
    study = write_study(tmp_path, STUDY.replace("epochs = 2", "epochs = 1"))
    screen = _on_a_terminal("search", str(study), "--no-retrain")
    assert "decoding images" in screen  # the cache's progress bar
    assert "study tiny: 0/1 trials finished, no complete trial yet" in screen
    assert re.search(r"w0 trial   0 test_resnet\s+epoch 1/1  \d\d:\d\d<\d\d:\d\d  val", screen)
    assert re.search(r"trial   0 COMPLETE accuracy=", screen)
    assert "study tiny: 1 trials finished" in screen
    assert "TrialState" not in screen and "Traceback" not in screen
    assert study_state(open_study(load_config(study))).finished == 1

    verbose = run_main("search", str(study), "-v", "--no-retrain", "--n-trials", "2")
    assert verbose.returncode == 0, verbose.stderr
    assert re.search(r"trial   1 epoch 1/1: train_loss [\d.]+  val accuracy", verbose.stderr)
    assert re.search(r"trial   1 COMPLETE accuracy=", verbose.stderr)
    assert "\r" not in verbose.stderr and "\x1b[A" not in verbose.stderr  # no bars in a pipe

    quiet = run_main("search", str(study), "-q", "--no-retrain", "--n-trials", "3")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.startswith("study tiny: 3 trials finished (1 run now)")
    assert quiet.stderr == ""
