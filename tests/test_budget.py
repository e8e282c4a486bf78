"""The global budget and the retrain claim on their own: exact under concurrency, and a claim
whose holder died or whose model is missing is taken again."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from automl_tl.budget import Budget, TrialSkipped, worker_identity
from automl_tl.retrain import best_dir_for, claim_retrain, finish_claim
from automl_tl.storage import open_storage, storage_of

from .conftest import run_main, write_study


def _journal_study(tmp_path, name="s"):
    url = f"journal:{tmp_path / 'j.log'}"
    storage = open_storage(url)
    return optuna.create_study(study_name=name, storage=storage, load_if_exists=True), url


def test_admit_counts_finished_and_earlier_running_or_waiting_trials(tmp_path):
    study, url = _journal_study(tmp_path)
    budget = Budget(study, 3, url=url, poll=0.01)
    study.enqueue_trial({"x": 0.5})  # WAITING, number 0
    first = study.ask()  # takes the waiting one: RUNNING 0
    second, third = study.ask(), study.ask()
    budget.admit(third)  # 0 finished + 2 ahead < 3
    study.tell(first, 1.0)
    study.tell(second, 0.5)
    fourth = study.ask()
    with pytest.raises(
        TrialSkipped, match=r"budget of 3 was already covered .*2 finished, 1 running"
    ):
        budget.admit(fourth)
    assert fourth.user_attrs["skipped"] is True
    assert budget.counts() == (2, 2)
    assert budget.counts(before=fourth.number) == (2, 1)


def test_room_waits_for_a_running_trial_of_another_worker_and_takes_its_place(tmp_path):
    study, url = _journal_study(tmp_path)
    budget = Budget(study, 1, url=url, poll=0.02, timeout=30)
    other = study.ask()
    other.set_user_attr("worker", worker_identity())  # alive: this very process

    def fail_later():
        time.sleep(0.3)
        study.tell(other, state=TrialState.FAIL)

    thread = threading.Thread(target=fail_later)
    started = time.monotonic()
    thread.start()
    assert budget.room() is True  # its trial failed: the budget needs this worker again
    thread.join(timeout=10)
    assert time.monotonic() - started >= 0.25
    study.tell(study.ask(), 1.0)
    assert budget.room() is False  # spent


def test_room_gives_up_at_the_timeout(tmp_path):
    study, url = _journal_study(tmp_path)
    study.ask().set_user_attr("worker", worker_identity())
    budget = Budget(study, 1, url=url, poll=0.02, timeout=0.2)
    assert budget.room() is False


@pytest.mark.parametrize("seed", [0, 1])
def test_budget_is_exact_with_racing_workers(tmp_path, seed):
    """Four workers (threads, one journal file) with seeded jitter between deciding and
    asking: exactly n_trials finish, never more."""
    url = f"journal:{tmp_path / 'j.log'}"
    optuna.create_study(study_name="race", storage=open_storage(url))
    n_trials, workers = 12, 4
    errors: list[BaseException] = []
    start = threading.Barrier(workers)

    def worker(index: int) -> None:
        rng = random.Random(seed * 100 + index)
        try:
            study = optuna.load_study(study_name="race", storage=open_storage(url))
            budget = Budget(study, n_trials, url=url, poll=0.01, timeout=60)

            def objective(trial):
                budget.admit(trial)
                time.sleep(rng.uniform(0, 0.02))
                return trial.suggest_float("x", 0, 1)

            def jitter(study, trial):
                time.sleep(rng.uniform(0, 0.02))

            start.wait(timeout=30)
            if budget.room():
                study.optimize(objective, catch=(TrialSkipped,), callbacks=[budget, jitter])
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    study = optuna.load_study(study_name="race", storage=open_storage(url))
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) == n_trials
    assert TrialState.RUNNING not in states


# ---------------------------------------------------------------------------------------------
# the retrain claim


def _claim_study(study):
    return optuna.load_study(
        study_name=f"{study.study_name}:retrain:trial-0", storage=storage_of(study)
    )


def _dead_worker() -> dict:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return {**worker_identity(), "pid": gone.pid, "started": None}


def _export(folder, trial):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"trial": trial}))
    (folder / "model.safetensors").write_bytes(b"x")


def test_a_claim_is_won_once_while_its_holder_lives(tmp_path):
    study, _ = _journal_study(tmp_path)
    won, me = claim_retrain(study, 0, tmp_path / "best")
    assert won and me["pid"] == worker_identity()["pid"]
    lost, holder = claim_retrain(study, 0, tmp_path / "best")
    assert not lost and holder["pid"] == me["pid"]


def test_a_claim_whose_holder_died_before_finishing_is_taken_again(tmp_path):
    study, _ = _journal_study(tmp_path)
    assert claim_retrain(study, 0, tmp_path / "best")[0]
    _claim_study(study).set_user_attr("claimed_by", _dead_worker())  # killed mid-retrain
    won, _ = claim_retrain(study, 0, tmp_path / "best")
    assert won
    assert not claim_retrain(study, 0, tmp_path / "best")[0]  # now held by a live process


def test_a_finished_claim_holds_while_its_model_exists_and_not_after(tmp_path):
    study, _ = _journal_study(tmp_path)
    best = tmp_path / "best"
    assert claim_retrain(study, 0, best)[0]
    _export(best, 0)
    finish_claim(study, 0)
    _claim_study(study).set_user_attr("claimed_by", _dead_worker())  # its process has ended
    assert not claim_retrain(study, 0, best)[0]  # done, and best/ holds trial 0
    _export(best, 7)  # best/ now holds another trial
    assert claim_retrain(study, 0, best)[0]


def test_exactly_one_worker_takes_over_a_stale_claim(tmp_path):
    study, url = _journal_study(tmp_path)
    assert claim_retrain(study, 0)[0]
    _claim_study(study).set_user_attr("claimed_by", _dead_worker())
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def take():
        mine = optuna.load_study(study_name="s", storage=open_storage(url))
        barrier.wait(timeout=30)
        results.append(claim_retrain(mine, 0)[0])

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [False, False, False, True]


def test_best_is_not_replaced_by_a_lower_scoring_trial(tmp_path):
    from automl_tl import load_config

    config = load_config(write_study(tmp_path, "[search]\nbackbones = ['test_resnet']\n"))
    study = optuna.create_study(direction="maximize")
    for value in (0.9, 0.8, 0.95):
        study.add_trial(
            create_trial(
                value=value, params={"x": value}, distributions={"x": FloatDistribution(0, 1)}
            )
        )
    trials = study.get_trials()
    paths = config.paths
    assert best_dir_for(config, study, trials[1]) == paths.best  # nothing there yet
    _export(paths.best, 0)
    assert best_dir_for(config, study, trials[1]) == paths.model(1)  # 0.8 < 0.9: its own folder
    assert best_dir_for(config, study, trials[2]) == paths.best  # 0.95 > 0.9: replaces it


def test_the_same_command_again_retrains_after_a_retrain_was_killed(tmp_path):
    """Ctrl-C or a kill during the retrain leaves a claim and no best/; running the search
    again (as the CLI advises) must retrain, not skip it as "retrained by another worker"."""
    from automl_tl import load_config
    from automl_tl.storage import open_study

    path = write_study(
        tmp_path,
        """
        [data]
        source = "digits"
        image_size = 16
        max_per_class = 10
        [search]
        n_trials = 1
        backbones = ["test_resnet"]
        augmentations = ["none"]
        unfreeze = ["top_k"]
        epochs = 1
        pruner = "none"
        """,
    )
    assert run_main("search", str(path), "--device", "cpu", "--no-retrain", "-q").returncode == 0
    config = load_config(path)
    study = open_study(config)
    assert claim_retrain(study, study.best_trial.number, config.paths.best)[0]
    _claim_study(study).set_user_attr("claimed_by", _dead_worker())  # the retrain was killed
    assert not config.paths.best.exists()
    assert run_main("search", str(path), "--device", "cpu", "-q").returncode == 0
    assert logging.getLogger("optuna.study._optimize").filters == []  # search() cleans up
    metrics = json.loads((config.paths.best / "metrics.json").read_text())
    assert metrics["trial"] == study.best_trial.number


def test_one_catalog_per_node_on_a_shared_filesystem_with_several_nodes(tmp_path, monkeypatch):
    """SQLite's WAL does not work across hosts: with a database-server storage (several nodes)
    and the study folder on NFS, Lustre …, each node writes its own catalog file."""
    import socket

    from automl_tl import _util, catalog, load_config
    from automl_tl._util import filesystem_type

    mounts = (
        "proc /proc proc rw 0 0\n"
        "server:/export /mnt/shared nfs4 rw 0 0\n"
        "/dev/sda1 /mnt/shared/local\\040disk ext4 rw 0 0\n"
    )
    assert filesystem_type("/mnt/shared/studies/x", mounts) == "nfs4"
    assert filesystem_type("/mnt/shared/local disk/x", mounts) == "ext4"
    assert filesystem_type("/elsewhere", mounts) is None

    config = load_config(write_study(tmp_path, "[search]\nbackbones = ['test_resnet']\n"))
    assert catalog.catalog_path(config) == config.paths.catalog  # SQLite, local disk
    config.search.storage = "postgresql://u@db/x"
    assert catalog.catalog_path(config) == config.paths.catalog  # local disk: one node's folder
    monkeypatch.setattr(catalog, "filesystem_type", lambda path: "lustre")
    assert catalog.catalog_path(config).name == f"catalog-{socket.gethostname()}.db"
    assert _util.filesystem_type(tmp_path) is not None  # this machine's /proc/self/mounts


def test_liveness_across_pid_namespaces_and_reboots():
    """A worker in another container of this hostname (another PID namespace) is assumed
    alive, whatever its pid means here; one of an earlier boot of this host is dead."""
    from automl_tl.budget import is_alive

    me = worker_identity()
    assert is_alive(me)
    dead = _dead_worker()
    assert not is_alive(dead)
    if me["pidns"]:
        assert is_alive({**dead, "pidns": "pid:[4026531999]"})  # its pid is not ours to read
    if me["boot"]:
        assert not is_alive({**me, "boot": "another-boot-id"})  # this very pid, but rebooted
    assert is_alive({**dead, "host": "another-node"})  # can't tell: assume alive


def test_passwords_hidden_in_every_url_form():
    from automl_tl.storage import STORAGE_ENV, redact, scrub, url_to_env

    assert redact("postgresql://bob:s3/cr et@db/x") == "postgresql://bob:***@db/x"
    assert redact("postgresql://bob@db/x?password=hunter2&sslmode=require") == (
        "postgresql://bob@db/x?password=***&sslmode=require"
    )
    assert (
        redact("mysql+pymysql://root:pa@ss@db:3306/optuna")
        == "mysql+pymysql://root:***@db:3306/optuna"
    )
    url = "postgresql://bob@db/x?password=hunter2"
    assert "hunter2" not in scrub(f"could not connect (password hunter2 refused) to {url}", url)
    # workers get a URL with a password in their environment, never on their command line
    assert url_to_env(url) == (None, {STORAGE_ENV: url})
    assert url_to_env("mysql://root:pw@db/o") == (None, {STORAGE_ENV: "mysql://root:pw@db/o"})
    assert url_to_env("postgresql://bob@db/x") == ("postgresql://bob@db/x", {})
    assert url_to_env("journal:/tmp/j.log") == ("journal:/tmp/j.log", {})


def test_optunas_own_log_lines_are_scrubbed(capsys):
    from automl_tl.cli import setup_logging

    logger = logging.getLogger("automl_tl")
    optuna_handlers = logging.getLogger("optuna").handlers
    saved = (logger.handlers[:], logger.level, logger.propagate, optuna.logging.get_verbosity())
    saved_filters = [h.filters[:] for h in optuna_handlers]
    setup_logging(1)
    try:
        optuna.logging.get_logger("optuna.storages").warning("retrying mysql://root:topsecret@db/x")
        assert "topsecret" not in capsys.readouterr().err
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[:3]
        optuna.logging.set_verbosity(saved[3])
        for handler, filters in zip(optuna_handlers, saved_filters):
            handler.filters[:] = filters


def test_a_claim_held_by_another_node_expires_after_ten_median_trials(tmp_path):
    """A node that died on another host cannot be seen: its claim stands for ten median
    trials (at least 10 minutes), then the retrain (or race run) is taken again, so the
    other nodes neither wait for ever nor skip it for ever."""
    import datetime as dt

    from automl_tl.budget import claim_expiry, holder_gone

    study, _ = _journal_study(tmp_path)
    assert claim_expiry(study) == 600.0  # no complete trial yet: the floor
    long_ago = (dt.datetime.now() - dt.timedelta(hours=2)).isoformat(timespec="seconds")
    just_now = dt.datetime.now().isoformat(timespec="seconds")
    elsewhere = {**worker_identity(), "host": "another-node"}
    assert holder_gone({**elsewhere, "at": just_now}, 600.0) is None
    assert "on another node claimed it" in holder_gone({**elsewhere, "at": long_ago}, 600.0)
    assert holder_gone({**worker_identity(), "at": long_ago}, 600.0) is None  # alive, here
    assert claim_retrain(study, 0, tmp_path / "best")[0]
    claim = _claim_study(study)
    claim.set_user_attr("claimed_by", {**elsewhere, "at": just_now})
    assert not claim_retrain(study, 0, tmp_path / "best")[0]
    claim.set_user_attr("claimed_by", {**elsewhere, "at": long_ago})
    assert claim_retrain(study, 0, tmp_path / "best")[0]
