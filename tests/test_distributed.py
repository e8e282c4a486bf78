"""Many workers on one study: journal file on one node, PostgreSQL across nodes.

The PostgreSQL tests use a real server started by ``tests/postgres.py`` (marker ``postgres``;
CI installs the package and fails, never skips, when it is missing). Workers are real
``automl-tl search`` processes; a test plugin holds a trial open so a worker can be SIGKILLed
in the middle of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from PIL import Image

from automl_tl.budget import Budget, TrialSkipped, is_alive, worker_identity
from automl_tl.config import config_from_dict, load_config
from automl_tl.errors import DataError, UserError
from automl_tl.retrain import claim_retrain
from automl_tl.search import open_search_study
from automl_tl.storage import open_storage
from automl_tl.workers import plan_slots

from .conftest import REPO, run_cli, run_main, write_study
from .postgres import PASSWORD

# Holds one worker's trial open (the victim: AUTOML_TL_WORKER == SLEEP_WORKER) after writing a
# marker; every other worker waits at its first trial until the victim is in its trial, so the
# victim always has a running trial to lose, whatever the start-up order. With BARRIER_DIR,
# each worker's first trial waits until BARRIER_N workers have one (so all of them take part).
SLEEPER = """
import json, os, time
import automl_tl

VICTIM = os.environ.get("SLEEP_WORKER")
MARKER = os.environ.get("SLEEP_MARKER", "")


BARRIER = os.environ.get("BARRIER_DIR")  # first trials wait until BARRIER_N workers are in
joined = []


@automl_tl.hookimpl
def trial_started(study_name, trial_number, params):
    if BARRIER and not joined:
        joined.append(trial_number)
        open(os.path.join(BARRIER, str(os.getpid())), "w").close()
        deadline = time.time() + 120
        while len(os.listdir(BARRIER)) < int(os.environ["BARRIER_N"]) and time.time() < deadline:
            time.sleep(0.1)
    if VICTIM is None or os.environ.get("AUTOML_TL_WORKER") == VICTIM:
        return
    deadline = time.time() + 120
    while not os.path.exists(MARKER) and time.time() < deadline:
        time.sleep(0.1)


@automl_tl.hookimpl
def epoch_finished(study_name, trial_number, epoch, metrics):
    if VICTIM is None or os.environ.get("AUTOML_TL_WORKER") != VICTIM:
        return
    with open(MARKER + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "trial": trial_number}, f)
    os.replace(MARKER + ".tmp", MARKER)
    time.sleep(600)
"""

STUDY = """
plugins = ["sleeper.py"]

[data]
source = "folder:images"
image_size = 32
seed = 0

[search]
n_trials = {n_trials}
backbones = ["test_resnet"]
augmentations = ["none", "flip_crop"]
unfreeze = ["top_k", "layer_decay"]
epochs = 1
batch_size = 32
pruner = "none"
heartbeat_interval = {heartbeat}
"""

# Optuna's grace period is twice the interval: 10 s, so a live worker on a loaded machine (its
# heartbeat thread held up by the scheduler) is never taken for dead; a killed one is found
# within 10 s.
HEARTBEAT = 5


def make_study(folder: Path, n_trials: int) -> Path:
    """A study over a small image folder (3 classes × 20 images), so a trial takes a second."""
    rng = np.random.default_rng(0)
    for c, color in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        d = folder / "images" / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(20):
            noise = rng.integers(0, 60, size=(32, 32, 3))
            pixels = np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(d / f"{i}.png")
    (folder / "sleeper.py").write_text(SLEEPER)
    return write_study(folder, STUDY.format(n_trials=n_trials, heartbeat=HEARTBEAT))


def trials_of(url: str, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(url, heartbeat_interval=60)
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def finished(trials) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state.is_finished() and t.state.name != "FAIL"]


class Worker(subprocess.Popen):
    """``automl-tl search`` in the background, as one more worker (one CPU thread); its output
    goes to files, so a chatty worker never blocks on a full pipe."""

    def __init__(self, study: Path, *args: str, env: dict | None = None) -> None:
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        self.logs = [study.parent / f"worker-{time.monotonic_ns()}.{s}" for s in ("out", "err")]
        with open(self.logs[0], "w") as out, open(self.logs[1], "w") as err:
            super().__init__(
                [sys.executable, "-m", "automl_tl.cli", "search", str(study), *args],
                stdout=out,
                stderr=err,
                text=True,
                env=full_env,
                cwd=study.parent,
            )

    def finish(self, timeout: float = 240) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once it exits."""
        rc = self.wait(timeout=timeout)
        return rc, self.logs[0].read_text(), self.logs[1].read_text()


def wait_for(path: Path, proc: Worker, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            _, out, err = proc.finish()
            pytest.fail(f"the worker exited ({proc.returncode}) before its trial:\n{out}\n{err}")
        assert time.monotonic() < deadline, "the victim never started its trial"
        time.sleep(0.1)
    return json.loads(path.read_text())


def retry_of(trials, killed) -> optuna.trial.FrozenTrial:
    """The trial that re-ran ``killed``'s configuration (Optuna's retry callback links them)."""
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1, [(t.number, t.state.name, t.system_attrs) for t in trials]
    return retries[0]


# ---------------------------------------------------------------------------------------------
# no server needed


def test_more_workers_than_the_machine_runs_is_refused():
    with pytest.raises(UserError, match=r"--workers 9 is more than .*2 CPU cores: at most 8"):
        plan_slots(9, "cpu", gpus=[], cpus=2)
    with pytest.raises(UserError, match=r"2 GPUs: at most 16"):
        plan_slots(17, "auto", gpus=["0", "1"], cpus=1)
    assert len(plan_slots(16, "auto", gpus=["0", "1"], cpus=1)) == 16


def test_a_second_search_on_one_sqlite_file_is_refused_at_once(tmp_path):
    from automl_tl.storage import one_search_per_sqlite

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with (
        one_search_per_sqlite(url),
        pytest.raises(UserError, match="another search is running on .*optuna.db"),
        one_search_per_sqlite(url),
    ):
        pass
    with one_search_per_sqlite(url):  # released
        pass
    with (
        one_search_per_sqlite(f"journal:{tmp_path / 'j.log'}"),
        one_search_per_sqlite(f"journal:{tmp_path / 'j.log'}"),
    ):
        pass  # the journal takes many workers


def test_slots_round_robin_over_gpus_and_split_cpu_threads():
    slots = plan_slots(4, "auto", gpus=["0", "3"], cpus=16)
    assert [s.gpu for s in slots] == ["0", "3", "0", "3"]
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "3", "0", "3"]
    assert all(s.threads == 4 for s in slots)
    cpu = plan_slots(3, "auto", gpus=[], cpus=2)
    assert [s.gpu for s in cpu] == [None, None, None]
    assert [s.threads for s in cpu] == [1, 1, 1]
    assert "CUDA_VISIBLE_DEVICES" not in cpu[0].env() and cpu[0].env()["OMP_NUM_THREADS"] == "1"
    assert [s.threads for s in plan_slots(2, "cpu", gpus=["0"], cpus=5)] == [3, 2]
    assert [s.gpu for s in plan_slots(2, "cpu", gpus=["0"], cpus=2)] == [None, None]
    with pytest.raises(UserError, match="each of the 2 workers gets its own"):
        plan_slots(2, "cuda:1", gpus=["0", "1"], cpus=2)
    with pytest.raises(UserError, match="no GPU is visible"):
        plan_slots(2, "cuda", gpus=[], cpus=2)


def test_a_dead_or_zombie_process_is_not_alive():
    me = worker_identity()
    assert is_alive(me)
    assert is_alive({**me, "host": "some-other-node"})  # can't tell: assume alive
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 120
    while (
        Path(f"/proc/{proc.pid}/stat").exists()
        and "Z" not in Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1][:3]
    ):
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.05)
    assert not is_alive({"host": me["host"], "pid": proc.pid, "started": None})  # zombie
    proc.wait()
    assert not is_alive({"host": me["host"], "pid": proc.pid, "started": None})
    assert not is_alive({**me, "started": (me["started"] or 0) + 1})  # pid reused


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_file_storage_fails_and_retries_the_trial_of_a_dead_local_worker(tmp_path, monkeypatch):
    """No heartbeat on a journal file: a RUNNING trial whose worker process on this host is
    gone is failed and queued again, once, by whichever worker looks first."""
    from automl_tl import budget as workers

    url = f"journal:{tmp_path / 'j.log'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url, heartbeat_interval=1))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead, alive, silent = study.ask(), study.ask(), study.ask()
    dead.set_user_attr("worker", {**worker_identity(), "pid": gone.pid, "started": None})
    dead.suggest_float("lr", 1e-4, 1e-2, log=True)
    alive.set_user_attr("worker", worker_identity())
    monkeypatch.setattr(workers, "ORPHAN_AFTER_S", 3600)
    workers.recover_stale_trials(study, url)
    workers.recover_stale_trials(study, url)  # a second look changes nothing
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "RUNNING", "WAITING"]
    assert "died while it ran" in trials[dead.number].user_attrs["fail_reason"]
    retry = retry_of(trials, trials[dead.number])
    assert retry.params == trials[dead.number].params and "worker" not in retry.user_attrs
    monkeypatch.setattr(workers, "ORPHAN_AFTER_S", 0)  # one that never recorded its worker
    workers.recover_stale_trials(study, url)
    assert study.trials[silent.number].state.name == "FAIL"
    assert study.trials[alive.number].state.name == "RUNNING"


def test_without_a_server_postgres_tests_fail_in_ci_and_skip_elsewhere(tmp_path):
    (tmp_path / "test_needs_server.py").write_text(
        "from tests import postgres\n"
        "from tests.postgres import postgres_server  # noqa: F401\n"
        "postgres._bin_dir = lambda: None  # as on a machine without the package\n"
        "def test_needs_a_server(postgres_server):\n"
        "    pass\n"
    )

    def pytest_run(require: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO), "AUTOML_TL_REQUIRE_POSTGRES": require}
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-rE"]
            + ["--rootdir", str(tmp_path), str(tmp_path / "test_needs_server.py")],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )

    ci = pytest_run("1")
    assert ci.returncode == 1 and "1 error" in ci.stdout, ci.stdout
    assert "PostgreSQL is required here (AUTOML_TL_REQUIRE_POSTGRES=1)" in ci.stdout
    local = pytest_run("")
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout


def test_sqlite_with_several_workers_is_refused(tmp_path):
    study = write_study(tmp_path, '[search]\nbackbones = ["test_resnet"]\n')
    result = run_main("search", str(study), "--workers", "2", "--storage", "sqlite:///x.db")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --workers 2 cannot share sqlite:///x.db: SQLite")
    assert "--storage journal:PATH" in result.stderr and "postgresql://" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
    # a study already in its default SQLite file is not silently moved to a journal file
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "optuna.db").write_bytes(b"")
    result = run_main("search", str(study), "--workers", "2")
    assert result.returncode == 2
    assert "this study's SQLite storage" in result.stderr and "--workers 1" in result.stderr


def test_a_worker_with_other_data_refuses_to_join(tmp_path, registry):
    from automl_tl.data import load_splits

    make_study(tmp_path, 2)
    url = f"journal:{tmp_path / 'journal.log'}"

    def config(seed: int):
        raw = {"name": "tiny", "data": {"source": "folder:images", "seed": seed}}
        raw["search"] = {"storage": url, "backbones": ["test_resnet"]}
        return config_from_dict(raw, tmp_path / "tiny.toml")

    first = config(0)
    study = open_search_study(first, load_splits(first, registry))
    assert study.user_attrs["data"]["split_hash"]
    open_search_study(first, load_splits(first, registry))  # same data: joins
    other = config(1)
    with pytest.raises(DataError, match=r"refuses to join: the data no longer matches study"):
        open_search_study(other, load_splits(other, registry))


def run_budget_workers(url: str, workers: int, n_trials: int, seed: int = 0):
    """``workers`` threads, each with its own storage connection (as separate processes have),
    racing over a budget of very short trials; then each claims the retrain. The jitter is
    seeded (worker ``i`` draws from ``Random(seed * 1000 + i)``): a rare interleaving is not
    reproduced by the thread scheduler, but the delays that led to it are."""
    import random
    import threading

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    outcomes: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(workers)

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        try:
            study = optuna.create_study(
                study_name="budget",
                storage=open_storage(url, heartbeat_interval=HEARTBEAT),
                direction="maximize",
                load_if_exists=True,
            )
            budget = Budget(study, n_trials, url=url, poll=0.05)

            def objective(trial):
                budget.admit(trial)
                time.sleep(rng.uniform(0, 0.03))
                return trial.suggest_float("x", 0, 1)

            def jitter(study, trial):  # a worker may be held up between deciding and asking
                time.sleep(rng.uniform(0, 0.03))

            start.wait()
            if budget.room():
                study.optimize(objective, catch=(TrialSkipped,), callbacks=[budget, jitter])
            start.wait()  # everyone done, then everyone claims at once
            outcomes.append("WON" if claim_retrain(study, study.best_trial.number)[0] else "LOST")
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"budget workers still running (seed {seed})"
    assert not errors, (seed, errors)
    study = optuna.load_study(study_name="budget", storage=open_storage(url, heartbeat_interval=60))
    return study.get_trials(deepcopy=False), outcomes


@pytest.mark.slow
def test_budget_is_exact_and_retrain_claimed_once_on_journal(tmp_path):
    """Four workers racing over a 40-trial budget of very short trials: exactly 40 finish
    (MaxTrialsCallback alone overshoots here), and one worker wins the retrain claim."""
    trials, outputs = run_budget_workers(f"journal:{tmp_path / 'j.log'}", 4, 40)
    assert len(finished(trials)) == 40
    skipped = [t for t in trials if t.user_attrs.get("skipped")]
    assert all(t.state.name == "FAIL" for t in skipped)
    assert len(trials) == 40 + len(skipped)
    assert sorted(outputs) == ["LOST", "LOST", "LOST", "WON"]


# ---------------------------------------------------------------------------------------------
# --workers N on one node: the journal file


@pytest.mark.slow
def test_two_local_workers_share_a_journal_study(tmp_path):
    study = make_study(tmp_path, 4)
    (tmp_path / "joined").mkdir()
    barrier = {"BARRIER_DIR": str(tmp_path / "joined"), "BARRIER_N": "2"}
    result = run_cli("search", str(study), "--workers", "2", cwd=tmp_path, env=barrier)
    assert result.returncode == 0, result.stderr
    journal = tmp_path / "tiny" / "optuna-journal.log"
    assert journal.is_file() and not (tmp_path / "tiny" / "optuna.db").exists()
    assert "worker 0 (CPU, 1 thread, pid" in result.stdout
    assert "worker 1 (CPU, 1 thread, pid" in result.stdout
    assert "4 of 4 trials finished, 2 workers" in result.stdout
    assert result.stdout.count("retrained on") == 1
    assert (tmp_path / "tiny" / "best" / "model.safetensors").is_file()
    trials = trials_of(f"journal:{journal}")
    assert len(finished(trials)) == 4
    children = {t.user_attrs["worker"]["pid"] for t in finished(trials)}
    assert len(children) == 2
    # the race ran in the workers (spread over their GPUs), not after them in the parent; on
    # 12 validation images the best trial may stand alone (nothing to race: no race study)
    if "nothing to race" not in result.stdout:
        race = trials_of(f"journal:{journal}", "tiny:race")
        assert race and {t.user_attrs["worker"]["pid"] for t in race} <= children
    # the workers sampled different configurations (not one seeded sequence twice)
    params = [tuple(sorted(t.params.items())) for t in finished(trials)]
    assert len(set(params)) == 4
    # later commands (report, retrain, search) find the journal without --storage
    assert load_config(study).storage_url == f"journal:{journal}"


@pytest.mark.slow
def test_journal_worker_killed_mid_trial(tmp_path):
    """Journal storage has no heartbeat: a worker whose process is gone from this host is
    noticed by the others (and by the parent), its trial is failed and retried."""
    study = make_study(tmp_path, 3)
    marker = tmp_path / "victim.json"
    parent = Worker(study, "--workers", "2", env={"SLEEP_WORKER": "1", "SLEEP_MARKER": str(marker)})
    victim = wait_for(marker, parent)
    os.kill(victim["pid"], signal.SIGKILL)
    rc, out, err = parent.finish()
    assert rc == 1, err  # a worker failed, and the parent says so
    assert "worker 1 (CPU, 1 thread, pid" in out and "killed by SIGKILL" in out
    assert any(line.startswith("worker 0 (CPU") and ": done, " in line for line in out.splitlines())
    assert "3 of 3 trials finished" in out
    assert out.count("retrained on") == 1
    trials = trials_of(f"journal:{tmp_path / 'tiny' / 'optuna-journal.log'}")
    killed = next(t for t in trials if t.number == victim["trial"])
    assert killed.state.name == "FAIL"
    assert "died while it ran" in killed.user_attrs["fail_reason"]
    retry = retry_of(trials, killed)
    assert retry.params == killed.params and retry.state.name == "COMPLETE"
    assert retry.user_attrs["worker"]["pid"] != victim["pid"]
    assert len(finished(trials)) == 3


@pytest.mark.slow
def test_sigterm_to_the_parent_stops_every_worker(tmp_path):
    """SIGTERM (``scancel``, ``kill``) reaches each worker once, through the parent; their
    trials end as FAIL "interrupted" and the parent exits as a SIGTERMed command does."""
    study = make_study(tmp_path, 4)
    marker = tmp_path / "victim.json"
    parent = Worker(study, "--workers", "2", env={"SLEEP_WORKER": "1", "SLEEP_MARKER": str(marker)})
    victim = wait_for(marker, parent)  # worker 1 is in its trial
    journal = f"journal:{tmp_path / 'tiny' / 'optuna-journal.log'}"
    deadline = time.monotonic() + 120  # ... and worker 0 in one of its own (a slow start)
    while (
        len({(t.user_attrs.get("worker") or {}).get("pid") for t in trials_of(journal)} - {None})
        < 2
    ):
        assert parent.poll() is None and time.monotonic() < deadline, "worker 0 never began a trial"
        time.sleep(0.2)
    parent.send_signal(signal.SIGTERM)
    rc, out, err = parent.finish(timeout=120)
    assert rc == 128 + signal.SIGTERM, err
    trials = trials_of(journal)
    assert trials[victim["trial"]].state.name == "FAIL"
    assert all(t.state.name in ("COMPLETE", "FAIL", "WAITING") for t in trials)  # none RUNNING
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert all(t.user_attrs["fail_reason"] == "interrupted" for t in failed)
    # each interrupted configuration (that got as far as its parameters) is queued to run again
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == [
        t.number for t in failed if t.params
    ]
    assert victim["trial"] in [t.system_attrs["failed_trial"] for t in waiting]
    assert all(t.params == trials[t.system_attrs["failed_trial"]].params for t in waiting)
    pids = {t.user_attrs["worker"]["pid"] for t in trials if t.state.name != "WAITING"}
    me = worker_identity()
    assert len(pids) == 2
    assert not any(is_alive({"host": me["host"], "pid": p, "started": None}) for p in pids)


def _children_of(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGHUP])
def test_workers_do_not_outlive_a_killed_or_hung_up_parent(tmp_path, how):
    """SIGKILL of the --workers parent (an OOM kill) or SIGHUP (a closed terminal): no worker
    is left running on its own (they get SIGTERM: a parent-death signal, or the parent's
    forwarding), and their trials end as FAIL, never RUNNING."""
    study = make_study(tmp_path, 4)
    marker = tmp_path / "victim.json"
    parent = Worker(study, "--workers", "2", env={"SLEEP_WORKER": "1", "SLEEP_MARKER": str(marker)})
    wait_for(marker, parent)
    children = _children_of(parent.pid)
    assert len(children) == 2
    parent.send_signal(how)
    parent.finish(timeout=120)
    me = worker_identity()
    deadline = time.monotonic() + 60
    while any(is_alive({"host": me["host"], "pid": p, "started": None}) for p in children):
        assert time.monotonic() < deadline, "a worker outlived its parent"
        time.sleep(0.2)
    trials = trials_of(f"journal:{tmp_path / 'tiny' / 'optuna-journal.log'}")
    assert all(t.state.name != "RUNNING" for t in trials)


# ---------------------------------------------------------------------------------------------
# PostgreSQL: many nodes


@pytest.mark.postgres
@pytest.mark.slow
def test_budget_is_exact_and_retrain_claimed_once_on_postgres(tmp_path, postgres_url):
    trials, outputs = run_budget_workers(postgres_url, 4, 40)
    assert len(finished(trials)) == 40
    assert len(trials) == 40 + sum(1 for t in trials if t.user_attrs.get("skipped"))
    assert sorted(outputs) == ["LOST", "LOST", "LOST", "WON"]


@pytest.mark.postgres
@pytest.mark.slow
def test_three_workers_share_one_study_on_postgres(tmp_path, postgres_url, postgres_server):
    """Two "nodes" on one study: one runs ``--workers 2``, the other a single worker."""
    study = make_study(tmp_path, 6)
    (tmp_path / "joined").mkdir()
    barrier = {"BARRIER_DIR": str(tmp_path / "joined"), "BARRIER_N": "3"}
    nodes = [
        Worker(study, "--storage", postgres_url, *extra, env=barrier)
        for extra in (["--workers", "2"], [])
    ]
    peak, children = 0, {}
    deadline = time.monotonic() + 480
    while any(n.poll() is None for n in nodes):  # connections held at once; workers' argv
        if time.monotonic() > deadline:
            for n in nodes:
                n.kill()
            pytest.fail("the workers did not finish within 480 s")
        peak = max(peak, postgres_server.connections(postgres_url))
        for proc in Path("/proc").glob("[0-9]*"):  # the --workers node's worker processes
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == nodes[0].pid:
                    argv = (proc / "cmdline").read_bytes().split(b"\0")
                    children[proc.name] = b" ".join(argv).decode()
        time.sleep(0.25)
    (rc_a, out_a, err_a), (rc_b, out_b, err_b) = (n.finish() for n in nodes)
    assert rc_a == 0 and rc_b == 0, err_a + err_b
    assert len(children) == 2 and not any(PASSWORD in c for c in children.values())
    assert PASSWORD not in out_a + err_a + out_b + err_b
    assert "storage postgresql://postgres:***@127.0.0.1" in err_b  # the storage, as logged
    assert "6 of 6 trials finished, 2 workers" in out_a and "6 trials finished" in out_b
    trials = trials_of(postgres_url)
    assert len(finished(trials)) == 6  # the budget, not 3 × the budget
    assert all(t.state.name != "RUNNING" for t in trials)
    assert len({t.user_attrs["worker"]["pid"] for t in finished(trials)}) == 3
    assert (out_a + out_b).count("retrained on") == 1  # both nodes finish; one retrains
    # main thread + heartbeat thread per worker (+ the --workers parent); the pool caps at 4
    assert 3 <= peak <= 4 * 4, peak
    print("peak connections of 3 workers + 1 parent:", peak)


@pytest.mark.postgres
@pytest.mark.slow
def test_killed_worker_on_postgres_is_retried_by_the_survivor(tmp_path, postgres_url):
    study = make_study(tmp_path, 4)
    marker = tmp_path / "victim.json"
    sleep = {"SLEEP_WORKER": "1", "SLEEP_MARKER": str(marker)}
    victim = Worker(study, "--storage", postgres_url, env={**sleep, "AUTOML_TL_WORKER": "1"})
    survivor = Worker(study, "--storage", postgres_url, env={**sleep, "AUTOML_TL_WORKER": "0"})
    killed_number = wait_for(marker, victim)["trial"]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rc, out, err = survivor.finish()
    assert rc == 0, err
    trials = trials_of(postgres_url)
    killed = next(t for t in trials if t.number == killed_number)
    assert killed.state.name == "FAIL"  # failed by the heartbeat check, not by its worker
    assert killed.user_attrs["worker"]["pid"] == victim.pid
    retry = retry_of(trials, killed)
    assert retry.params == killed.params and retry.state.name == "COMPLETE"
    assert retry.user_attrs["worker"]["pid"] == survivor.pid
    assert len(finished(trials)) == 4
    assert out.count("retrained on") == 1
    assert f"trial {killed_number} lost its worker" in err
    # restarting the killed worker just rejoins: the budget is spent, the retrain claimed
    again = run_main("search", str(study), "--storage", postgres_url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "4 trials finished (0 run now)" in again.stdout
    assert "retrained on" not in again.stdout and "is retrained by another worker" in again.stderr
    assert len(trials_of(postgres_url)) == len(trials)
    for text in (out, err, again.stdout, again.stderr):
        assert PASSWORD not in text
    print(
        "kill test trial states:",
        {t.number: (t.state.name, t.system_attrs.get("failed_trial")) for t in trials},
    )


@pytest.mark.postgres
def test_a_wrong_password_is_one_line_without_the_password(tmp_path, postgres_server):
    study = write_study(tmp_path, '[search]\nbackbones = ["test_resnet"]\n')
    url = postgres_server.url().replace(PASSWORD, "wrong-" + PASSWORD[::-1])
    result = run_main("report", str(study), "--storage", url, "--no-files")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: cannot open storage postgresql://postgres:***@127.0.0.1"
    )
    assert PASSWORD[::-1] not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_budget_admits_by_trial_number(postgres_url):
    """The admission rule itself: finished + running trials with lower numbers vs the budget."""
    study = optuna.create_study(
        study_name="rule", storage=open_storage(postgres_url, heartbeat_interval=60)
    )
    budget = Budget(study, 3, url=postgres_url)
    first, second, third = study.ask(), study.ask(), study.ask()
    budget.admit(first)
    budget.admit(third)  # 0 finished + 2 running ahead < 3
    study.tell(second, 1.0)
    budget.admit(third)
    fourth = study.ask()
    with pytest.raises(TrialSkipped, match="budget of 3 was already covered"):
        budget.admit(fourth)  # 1 finished + 2 running ahead
    assert study.trials[fourth.number].user_attrs["skipped"] is True
    study.tell(fourth, state=optuna.trial.TrialState.FAIL)  # as optimize() does
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    budget.admit(study.ask())  # the failed trial gave its place back: 1 finished + 1 ahead
    won, _ = claim_retrain(study, 1)
    assert won and not claim_retrain(study, 1)[0]
