"""What a search shows while it runs.

- On a terminal (stderr is a TTY): a header line (trials finished of the budget, best so far,
  ETA of the study) and one live line per worker (trial number, backbone, epoch k/E, elapsed <
  ETA of the trial, its last validation score, best so far). Log lines (one per finished trial)
  scroll above them.
- ``-v``: a log line per epoch as well. ``-q``: nothing until the final summary.
- Not a terminal (CI, SLURM, a pipe): plain log lines only, one per finished trial (and one per
  epoch with ``-v``).

One search process follows its own trial through the lifecycle hooks: :class:`TrialProgress`
is a plugin the command line registers. The parent of ``--workers N`` has no trial of its own;
it watches the study's storage (:class:`StudyWatcher`), where every worker records its trial,
its epochs and its validation scores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from .hookspecs import hookimpl

log = logging.getLogger("automl_tl")

#: seconds between two redraws of the live lines (and polls of the storage by the watcher)
REFRESH_S = 1.0


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default stderr) is an interactive terminal that can redraw lines."""
    stream = stream if stream is not None else sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return bool(tty) and os.environ.get("TERM", "") != "dumb"


def _screen(stream: IO[str]) -> tuple[int, int]:
    """The terminal's (columns, rows); a pseudo-terminal may say 0 x 0: then 120 x 40."""
    try:
        size = os.get_terminal_size(stream.fileno())
        columns, rows = size.columns, size.lines
    except (AttributeError, OSError, ValueError):
        columns, rows = 0, 0
    return (columns if columns > 20 else 120), (rows if rows > 2 else 40)


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


@dataclass
class StudyState:
    """What the storage says about the whole study (every worker's trials)."""

    finished: int = 0
    running: int = 0
    best_value: float | None = None
    best_number: int | None = None
    mean_trial_s: float | None = None


def study_state(study) -> StudyState:
    """Finished and running trials, the best so far and the mean time of a finished trial."""
    from optuna.trial import TrialState

    from .trials import Direction, value_of

    state = StudyState()
    direction = Direction.of(study)
    durations = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING:
            state.running += 1
        elif t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            state.finished += 1
            if t.datetime_start and t.datetime_complete:
                durations.append((t.datetime_complete - t.datetime_start).total_seconds())
        if t.state == TrialState.COMPLETE and direction.better(value_of(t), state.best_value):
            state.best_value, state.best_number = value_of(t), t.number
    if durations:
        state.mean_trial_s = sum(durations) / len(durations)
    return state


@dataclass
class _Line:
    trial: int | None = None
    backbone: str = ""
    done: int = 0
    epochs: int = 0
    started: float = 0.0
    score: float | None = None


class _TqdmStream:
    """A stand-in for stderr while the live lines are shown: whole lines go through
    ``tqdm.write``, which clears the bars, prints the line, and draws the bars again."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._buffer = ""

    def write(self, text: str) -> int:
        from tqdm import tqdm

        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            tqdm.write(line, file=self.stream)
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            from tqdm import tqdm

            tqdm.write(self._buffer, file=self.stream)
            self._buffer = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return False  # nothing else draws bars through us

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class LiveLines:
    """A header and one line per worker, redrawn in place on a terminal (tqdm bars)."""

    def __init__(self, name: str, budget: int, metric: str, stream: IO[str]) -> None:
        self.name, self.budget, self.metric, self.stream = name, budget, metric, stream
        self.state = StudyState()
        self.lines: dict[Any, _Line] = {}
        self._bars: dict[Any, Any] = {}
        self._header = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._saved: list[tuple[logging.Handler, IO[str]]] = []
        self._saved_stderr: IO[str] | None = None
        self.started = False

    # -- what is shown

    def header_text(self) -> str:
        s = self.state
        best = (
            f"best {self.metric} {s.best_value:.4f} (#{s.best_number})"
            if s.best_value is not None
            else "no complete trial yet"
        )
        eta = None
        if s.mean_trial_s is not None:
            left = max(0, self.budget - s.finished)
            eta = left * s.mean_trial_s / max(1, s.running, len(self.lines))
        return (
            f"study {self.name}: {s.finished}/{self.budget} trials finished, {best}, "
            f"ETA {_clock(eta)}"
        )

    def line_text(self, key: Any, line: _Line, now: float | None = None) -> str:
        label = f"w{list(self.lines).index(key)}"
        if line.trial is None:
            return f"{label} waiting for a trial"
        now = time.time() if now is None else now
        elapsed = max(0.0, now - line.started)
        eta = elapsed / line.done * (line.epochs - line.done) if line.done else None
        score = f"  val {line.score:.4f}" if line.score is not None else ""
        best = f"  best {self.state.best_value:.4f}" if self.state.best_value is not None else ""
        return (
            f"{label} trial {line.trial:>3} {line.backbone:<18.18} epoch {line.done}/{line.epochs}"
            f"  {_clock(elapsed)}<{_clock(eta)}{score}{best}"
        )

    # -- updates (any thread)

    def update(self, key: Any, **fields: Any) -> None:
        with self._lock:
            line = self.lines.setdefault(key, _Line())
            for k, v in fields.items():
                setattr(line, k, v)
            self.render()

    def set_state(self, state: StudyState) -> None:
        with self._lock:
            self.state = state
            self.render()

    def render(self) -> None:
        if not self.started:
            return
        from tqdm import tqdm

        with self._lock:
            columns, rows = _screen(self.stream)
            self._header.ncols, self._header.nrows = columns, rows
            self._header.set_description_str(self.header_text(), refresh=False)
            self._header.n = min(self.state.finished, self.budget)
            self._header.refresh()
            for key, line in self.lines.items():
                bar = self._bars.get(key)
                if bar is None:
                    bar = self._bars[key] = tqdm(
                        total=1,
                        position=len(self._bars) + 1,
                        file=self.stream,
                        ncols=columns,
                        nrows=rows,
                        leave=False,
                        bar_format="{desc}",
                    )
                bar.ncols, bar.nrows = columns, rows
                bar.set_description_str(self.line_text(key, line), refresh=False)
                bar.refresh()

    # -- start and stop

    def start(self) -> None:
        """Show the lines; route log records and stderr writes above them until :meth:`stop`."""
        from tqdm import tqdm

        with self._lock:
            if self.started:
                return
            columns, rows = _screen(self.stream)
            self._header = tqdm(
                total=max(1, self.budget),
                position=0,
                file=self.stream,
                ncols=columns,
                nrows=rows,
                leave=False,
                bar_format="{desc} |{bar:12}|",
            )
            routed = _TqdmStream(self.stream)
            for name in ("automl_tl", "optuna"):
                for handler in logging.getLogger(name).handlers:
                    stream = getattr(handler, "stream", None)
                    if stream is self.stream or stream is sys.stderr:
                        self._saved.append((handler, stream))
                        handler.setStream(routed)
            if sys.stderr is self.stream:  # warnings, worker output forwarded by the parent
                self._saved_stderr, sys.stderr = sys.stderr, routed
            self.started = True
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()
        self.render()

    def _tick(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                self.render()
            except Exception:  # a display must never stop the search
                log.debug("progress display failed", exc_info=True)
                return

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        with self._lock:
            if not self.started:
                return
            for bar in [*self._bars.values(), self._header]:
                bar.close()
            if self._saved_stderr is not None:
                sys.stderr.flush()
                sys.stderr = self._saved_stderr
            for handler, stream in self._saved:
                handler.setStream(stream)
            self._saved.clear()
            self.started = False


class TrialProgress:
    """A plugin on the lifecycle hooks that shows this process's trial and logs its epochs.

    Registered by ``automl-tl search`` (not by entry point), so it only runs in the search.
    """

    def __init__(
        self, config, *, live: bool, stream: IO[str] | None = None, worker: int | None = None
    ) -> None:
        self.config = config
        self.epochs = config.search.epochs
        self.metric = config.search.metric
        self.worker = int(os.environ.get("AUTOML_TL_WORKER", 0)) if worker is None else worker
        stream = stream if stream is not None else sys.stderr
        self.display = (
            LiveLines(config.name, config.search.n_trials, self.metric, stream) if live else None
        )
        self._study = None
        self._started_at: dict[int, float] = {}

    def _refresh_state(self) -> None:
        if self.display is None:
            return
        try:
            if self._study is None:
                from .storage import open_study

                self._study = open_study(self.config)
            self.display.set_state(study_state(self._study))
        except Exception:  # the storage is the search's business; the display just waits
            log.debug("progress: cannot read the study", exc_info=True)

    @hookimpl
    def trial_started(self, study_name: str, trial_number: int, params: dict[str, Any]) -> None:
        self._started_at[trial_number] = time.time()
        if self.display is None:
            return
        self._refresh_state()
        self.display.start()
        self.display.update(
            self.worker,
            trial=trial_number,
            backbone=str(params.get("backbone", "?")),
            done=0,
            epochs=self.epochs,
            started=self._started_at[trial_number],
            score=None,
        )

    @hookimpl
    def epoch_finished(
        self, study_name: str, trial_number: int, epoch: int, metrics: dict[str, Any]
    ) -> None:
        score = (metrics.get("val") or {}).get(self.metric)
        started = self._started_at.get(trial_number)
        elapsed = time.time() - started if started else None
        eta = elapsed / (epoch + 1) * (self.epochs - epoch - 1) if elapsed else None
        log.debug(
            "trial %3d epoch %d/%d: train_loss %.4f%s  %.1fs  %.0f img/s  ETA %s",
            trial_number,
            epoch + 1,
            self.epochs,
            metrics.get("train_loss", float("nan")),
            f"  val {self.metric} {score:.4f}" if score is not None else "",
            metrics.get("seconds", 0.0),
            metrics.get("images_per_s", 0.0),
            _clock(eta),
        )
        if self.display is not None:
            self.display.update(self.worker, done=epoch + 1, score=score)

    @hookimpl
    def trial_finished(
        self,
        study_name: str,
        trial_number: int,
        state: str,
        value: float | None,
        attrs: dict[str, Any],
    ) -> None:
        self._started_at.pop(trial_number, None)
        if self.display is not None:
            self._refresh_state()
            self.display.update(self.worker, trial=None)

    @hookimpl
    def study_finished(self, study_name: str, best: dict[str, Any] | None) -> None:
        self.close()  # the retrain that may follow logs plain lines

    def close(self) -> None:
        if self.display is not None:
            self.display.stop()


class StudyWatcher:
    """Polls the study's storage and shows one line per running worker (``--workers N``)."""

    def __init__(self, config, stream: IO[str] | None = None) -> None:
        self.config = config
        self.display = LiveLines(
            config.name,
            config.search.n_trials,
            config.search.metric,
            stream if stream is not None else sys.stderr,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="study-watcher", daemon=True)
        self._study = None

    def poll(self) -> None:
        """Read the storage once and update the lines (the thread does this every second)."""
        from optuna.trial import TrialState

        from .storage import open_study

        if self._study is None:
            try:
                self._study = open_study(self.config)
            except Exception:  # not created yet: the workers are still starting
                return
        trials = self._study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if not running and not self.display.started:
            return
        self.display.start()
        self.display.set_state(study_state(self._study))
        busy = set()
        for t in running:
            worker = t.user_attrs.get("worker") or {}
            key = (worker.get("host"), worker.get("pid")) if worker else ("trial", t.number)
            busy.add(key)
            values = t.intermediate_values
            self.display.update(
                key,
                trial=t.number,
                backbone=str(t.params.get("backbone", "?")),
                done=int(t.user_attrs.get("epochs_run", 0)),
                epochs=self.config.search.epochs,
                started=t.datetime_start.timestamp() if t.datetime_start else time.time(),
                score=float(values[max(values)]) if values else None,
            )
        for key, line in list(self.display.lines.items()):
            if key not in busy and line.trial is not None:
                self.display.update(key, trial=None)

    def _run(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                self.poll()
            except Exception:
                log.debug("progress: cannot read the study", exc_info=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.display.stop()


@contextlib.contextmanager
def show_progress(
    config, verbosity: int = 0, *, pm=None, workers: int = 1, stream: IO[str] | None = None
) -> Iterator[Any]:
    """Show the search's progress for the duration of the block.

    With ``pm`` (one search process) a :class:`TrialProgress` plugin is registered on it; with
    ``workers > 1`` (the parent of local workers) a :class:`StudyWatcher` follows the storage.
    Live lines only on a terminal and at the default or verbose level; ``-q`` shows nothing.
    """
    stream = stream if stream is not None else sys.stderr
    live = verbosity >= 0 and is_terminal(stream)
    if pm is not None:
        plugin = TrialProgress(config, live=live, stream=stream)
        pm.register(plugin, name="automl_tl.progress")
        try:
            yield plugin
        finally:
            plugin.close()
            pm.unregister(plugin)
    elif workers > 1 and live:
        watcher = StudyWatcher(config, stream=stream)
        watcher.start()
        try:
            yield watcher
        finally:
            watcher.close()
    else:
        yield None
