"""The team prior (issue 12): meta-features in the catalog, a greedy portfolio over earlier
studies, the sampler that runs it first, ``automl-tl prior``, bad input, shared catalogs."""

from __future__ import annotations

import json
import math
import re
import sqlite3

import optuna
import pytest
import torch

from automl_tl import registry_for
from automl_tl.catalog import Catalog
from automl_tl.config import config_from_dict
from automl_tl.data import Split, Splits
from automl_tl.prior import (
    Evaluation,
    PriorError,
    Task,
    build_prior,
    fits_study,
    greedy_portfolio,
    meta_features,
    publish,
    read_tasks,
    task_distance,
)
from automl_tl.samplers import (
    PortfolioSampler,
    PriorSampler,
    PriorSparingHyperbandPruner,
    make_pruner,
    make_sampler,
)
from automl_tl.space import suggest
from automl_tl.storage import set_trial_attr
from automl_tl.trials import PRIOR

from .conftest import SMALL_STUDY, TINY_STUDY, run_main, write_study
from .postgres import PASSWORD

FEATURES = {
    "classes": 10,
    "images_per_class": 20.0,
    "resolution": 32,
    "weights": "none",
    **{f"mean_{c}": 0.3 for c in "rgb"},
    **{f"std_{c}": 0.3 for c in "rgb"},
}
#: a configuration of TINY_STUDY's space (effective params)
GOOD = {
    "backbone": "test_convnext",
    "augmentation": "none",
    "aug_strength": 0.0,
    "unfreeze": "top_k",
    "unfreeze_depth": 1.0,
    "lr": 0.004,
    "weight_decay": 1e-4,
}


def _catalog(path, study: str, features: dict, trials: list[tuple[dict, float, float]]) -> None:
    """A catalog as a search leaves it: the dataset row and COMPLETE trials."""
    catalog = Catalog(path)
    catalog.record_dataset(study, features)
    for number, (params, value, seconds) in enumerate(trials):
        catalog.db["trials"].insert(
            {
                "study": study,
                "number": number,
                "state": "COMPLETE",
                "value": value,
                "params": json.dumps(params),
                "duration_s": seconds,
            }
        )


def _config(tmp_path, **search):
    raw = {
        "name": "new",
        "data": {"source": "digits", "image_size": 32},
        "search": {
            "backbones": ["test_resnet", "test_convnext"],
            "augmentations": ["none", "flip_crop"],
            "unfreeze": ["top_k", "layer_decay"],
            **search,
        },
    }
    return config_from_dict(raw, tmp_path / "new.toml")


def test_meta_features_of_a_split():
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    x[:, 0] = 255  # red
    split = Split(x, torch.tensor([0, 0, 1, 1]))
    splits = Splits(["a", "b"], split, Split(x[:2], torch.tensor([0, 1])), split, 8, "f", "h")
    f = meta_features(splits, "none")
    assert f == {
        "classes": 2,
        "images_per_class": 3.0,
        "resolution": 8,
        "weights": "none",
        "mean_r": 1.0,
        "mean_g": 0.0,
        "mean_b": 0.0,
        "std_r": 0.0,
        "std_g": 0.0,
        "std_b": 0.0,
    }


def test_task_distance_grows_with_what_differs():
    assert task_distance(FEATURES, FEATURES) == 0.0
    ten_times = {**FEATURES, "images_per_class": 200.0}
    assert task_distance(FEATURES, ten_times) == pytest.approx(1.0)
    pretrained = {**FEATURES, "weights": "timm"}
    assert task_distance(FEATURES, pretrained) == pytest.approx(math.sqrt(1 + 0.25**2))


def test_greedy_portfolio_covers_the_tasks_then_prefers_cheap_gains():
    # candidate 0 is good on task 0, 1 on task 1, 2 a bit of both
    scores = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.6]]
    assert greedy_portfolio(scores, [1.0, 1.0], 3) == [2, 0, 1]  # 1.2, then +0.4 each
    assert greedy_portfolio(scores, [1.0, 0.1], 2) == [0, 1]  # task 1 hardly counts
    # per second: the all-rounder at ten times the cost comes last
    assert greedy_portfolio(scores, [1.0, 1.0], 3, costs=[1.0, 1.0, 10.0]) == [0, 1, 2]


def test_prior_takes_the_best_of_the_nearest_task_first(tmp_path):
    bad = {**GOOD, "lr": 1e-2, "augmentation": "flip_crop", "aug_strength": 0.9}
    other = {**GOOD, "backbone": "test_resnet", "lr": 1e-4}
    _catalog(tmp_path / "a" / "catalog.db", "near", FEATURES, [(GOOD, 0.9, 5.0), (bad, 0.2, 5.0)])
    far = {**FEATURES, "classes": 100, "images_per_class": 1000.0, "weights": "timm"}
    _catalog(tmp_path / "b" / "catalog.db", "far", far, [(other, 0.8, 50.0), (GOOD, 0.3, 50.0)])
    config = _config(tmp_path, prior=["*/catalog.db"])
    tasks, warnings = read_tasks(config.search.prior, config.base_dir)
    assert warnings == [] and sorted(t.name for t in tasks) == ["far", "near"]
    prior = build_prior(tasks, FEATURES, 3, allowed=lambda p: fits_study(config, p))
    assert [t["name"] for t in prior.tasks] == ["near", "far"]
    assert prior.tasks[0]["distance"] == 0.0 and prior.tasks[0]["weight"] == 1.0
    first = prior.entries[0]
    assert first.params["backbone"] == "test_convnext" and first.params["lr"] == 0.004
    assert first.task == "near" and first.seconds == pytest.approx(5.0, rel=0.01)
    assert prior.backbones[0]["backbone"] == "test_convnext"
    # a backbone the study does not search never enters its portfolio
    narrow = _config(tmp_path, backbones=["test_resnet"], prior=["*/catalog.db"])
    prior = build_prior(tasks, FEATURES, 3, allowed=lambda p: fits_study(narrow, p))
    assert {e.params["backbone"] for e in prior.entries} == {"test_resnet"}


def test_the_sampler_runs_the_prior_first_and_marks_those_trials(tmp_path):
    _catalog(tmp_path / "a" / "catalog.db", "near", FEATURES, [(GOOD, 0.9, 5.0)])
    config = _config(tmp_path, prior=["a/catalog.db"], n_trials=12)
    tasks, _ = read_tasks(config.search.prior, config.base_dir)
    prior = build_prior(tasks, FEATURES, 4, allowed=lambda p: fits_study(config, p))
    sampler = make_sampler(config, prior)
    assert isinstance(sampler, PriorSampler)
    # the prior knew one configuration; the default portfolio's other backbone follows, and
    # TPE models from there: no random start-up
    assert len(prior.entries) == 1 and len(sampler.entries) == 2
    assert sampler.base._n_startup_trials == 2
    registry = registry_for()
    study = optuna.create_study(direction="maximize", sampler=sampler)
    chosen = []

    def objective(trial):
        chosen.append(suggest(trial, config, registry))
        return 0.5

    study.optimize(objective, n_trials=3)
    trials = study.get_trials()
    assert chosen[0].backbone == "test_convnext" and chosen[0].lr == pytest.approx(0.004)
    assert chosen[0].augmentation == "none" and chosen[0].unfreeze == "top_k"
    assert trials[0].user_attrs[PRIOR].startswith("#1 from near (")
    assert PRIOR not in trials[1].user_attrs  # the rest of the start-up: the default portfolio
    assert chosen[1].backbone == "test_resnet"


def _pruned_at(study, values, prior=None):
    """A trial reporting ``values`` per epoch (the prior's label set first, as
    PriorSampler.before_trial does it): the epoch it was pruned at, or None."""
    trial = study.ask()
    if prior:  # through the storage: the trial's cached copy does not see it
        set_trial_attr(study, trial, PRIOR, prior)
    for step, value in enumerate(values, start=1):
        trial.report(value, step)
        if step < len(values) and trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return step
    study.tell(trial, values[-1])
    return None


@pytest.mark.parametrize("pruner", ["hyperband", "median", "plain"])
def test_the_pruners_spare_the_priors_trials(tmp_path, pruner):
    if pruner == "plain":  # a plugin's metric: no dead-trial guard, still sparing
        made = PriorSparingHyperbandPruner(min_resource=1, max_resource=5, reduction_factor=3)
    else:
        made = make_pruner(_config(tmp_path, pruner=pruner, epochs=5))
    study = optuna.create_study(study_name="s", direction="maximize", pruner=made)
    study.set_user_attr("data", {"classes": [str(i) for i in range(10)]})
    for _ in range(12):  # strong trials in every bracket
        assert _pruned_at(study, [0.9] * 5) is None
    weak = [0.3] * 5  # above 1.5 x chance: only the base pruner can cut it
    assert _pruned_at(study, weak) is not None
    assert _pruned_at(study, weak, prior="#1 from near (a)") is None
    assert _pruned_at(study, weak) is not None  # the next trial without the prior: pruned
    if pruner != "plain":  # the dead-trial guard still cuts a prior's trial at chance
        assert _pruned_at(study, [0.1] * 5, prior="#2 from near (a)") == 2


def test_without_a_prior_the_sampler_is_as_before(tmp_path):
    config = _config(tmp_path)
    sampler = make_sampler(config)
    assert type(sampler) is PortfolioSampler
    assert make_sampler(config, None).entries == sampler.entries


@pytest.mark.slow
def test_a_search_records_meta_features_and_a_later_one_starts_from_them(searched, tmp_path):
    folder, *_ = searched
    with sqlite3.connect(folder / "tiny" / "catalog.db") as db:
        row = db.execute("select classes, images_per_class, resolution, weights from datasets")
        assert row.fetchall() == [(10, 143.8, 32, "none")]
    body = SMALL_STUDY.replace(
        "[search]", f'[search]\nprior = ["{folder}/*/catalog.db"]\nsampler = "random"'
    )
    study = write_study(tmp_path, body, name="later")
    built = run_main("prior", "build", str(study))
    assert built.returncode == 0, built.stderr
    # the table: header, rule, one row
    assert re.search(r"nearest earlier tasks \(1\):\nname .*\n[- ]+\ntiny ", built.stdout)
    shown = run_main("prior", "show", str(study), "--format", "json")
    prior = json.loads(shown.stdout)
    assert prior["tasks"][0]["name"] == "tiny" and len(prior["entries"]) >= 1
    result = run_main("search", str(study), "--device", "cpu", "--no-retrain", "--n-trials", "1")
    assert result.returncode == 0, result.stderr
    report = run_main("report", str(study), "--no-files", "--format", "json")
    trial = json.loads(report.stdout)["trials"][0]
    assert trial["prior"] == "#1 from tiny (" + str(folder / "tiny" / "catalog.db") + ")"
    expected = prior["entries"][0]["params"]
    assert trial["params"]["backbone"] == expected["backbone"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "matches no catalog file"),
        (lambda p: p.write_text("not a database"), "is not a SQLite database"),
        (
            lambda p: sqlite3.connect(p).execute("create table runs (x)").connection.commit(),
            "it has no trials table (tables: runs)",
        ),
        (
            lambda p: sqlite3.connect(p).execute("create table trials (study)").connection.commit(),
            "its trials table lacks number, state, value, params, duration_s",
        ),
    ],
)
def test_a_prior_that_is_no_catalog_is_one_message(tmp_path, setup, message):
    setup(tmp_path / "old.db")
    body = TINY_STUDY.replace("[search]", '[search]\nprior = ["old.db"]')
    study = write_study(tmp_path, body, name="p")
    result = run_main("search", str(study), "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "[search] prior" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "p" / "optuna.db").exists() or _no_trials(tmp_path / "p" / "optuna.db")


def _no_trials(db) -> bool:
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from trials").fetchone()[0] == 0


def test_an_unreachable_shared_catalog_is_a_warning(tmp_path):
    _catalog(tmp_path / "a" / "catalog.db", "near", FEATURES, [(GOOD, 0.9, 5.0)])
    url = "postgresql://team:hunter2-secret@127.0.0.1:1/catalog"
    tasks, warnings = read_tasks(["a/catalog.db", url], tmp_path)
    assert [t.name for t in tasks] == ["near"]  # the readable catalog still counts
    assert len(warnings) == 1 and "runs without it" in warnings[0]
    assert "team:***@127.0.0.1:1" in warnings[0] and "hunter2" not in warnings[0]


def test_prior_show_before_build_and_build_without_sources(tmp_path):
    result = run_main("prior", "publish", str(tmp_path / "catalog.db"))
    assert result.returncode == 2 and "give the catalog.db to copy" in result.stderr
    study = write_study(tmp_path, TINY_STUDY, name="none")
    result = run_main("prior", "show", str(study))
    assert result.returncode == 2 and "automl-tl prior build" in result.stderr
    result = run_main("prior", "build", str(study))
    assert result.returncode == 2 and "[search] prior is empty" in result.stderr


@pytest.mark.postgres
def test_a_shared_postgres_catalog_feeds_the_prior(tmp_path, postgres_url):
    _catalog(tmp_path / "a" / "catalog.db", "near", FEATURES, [(GOOD, 0.9, 5.0)])
    written = publish(Catalog(tmp_path / "a" / "catalog.db").db, postgres_url)
    assert written["datasets"] == 1 and written["trials"] == 1
    # the command does the same, and never shows the password
    result = run_main("prior", "publish", str(tmp_path / "a" / "catalog.db"), postgres_url)
    assert result.returncode == 0, result.stderr
    assert "published 1 datasets, 1 trials from" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
    publish(Catalog(tmp_path / "a" / "catalog.db").db, postgres_url)  # again: replaced, not doubled
    tasks, warnings = read_tasks([postgres_url], tmp_path)
    assert warnings == [] and [t.name for t in tasks] == ["near"]
    assert tasks[0].evaluations[0].params == GOOD and tasks[0].features == FEATURES
    with pytest.raises(PriorError):
        read_tasks([str(tmp_path / "missing*.db")], tmp_path)


def test_a_task_without_close_configurations_predicts_its_mean():
    task = Task("t", "o", FEATURES)
    from automl_tl.prior import Evaluation

    task.evaluations = [Evaluation(GOOD, 0.9, 1.0), Evaluation({**GOOD, "lr": 1e-5}, 0.1, 2.0)]
    assert task.predict(GOOD) == (1.0, 1.0)
    far = {**GOOD, "backbone": "x", "augmentation": "y", "unfreeze": "z"}
    assert task.predict(far) == (0.5, None)


@pytest.mark.postgres
@pytest.mark.slow
def test_a_search_adds_itself_to_the_shared_catalog_it_learns_from(tmp_path, postgres_url):
    body = SMALL_STUDY.replace("[search]", f'[search]\nprior = ["{postgres_url}"]')
    study = write_study(tmp_path, body, name="first")
    result = run_main("search", str(study), "--device", "cpu", "--no-retrain", "--n-trials", "1")
    assert result.returncode == 0, result.stderr
    assert "runs without it" not in result.stderr  # an empty shared catalog is no error
    tasks, warnings = read_tasks([postgres_url], tmp_path)
    assert warnings == [] and [t.name for t in tasks] == ["first"]
    assert tasks[0].features["classes"] == 3 and len(tasks[0].evaluations) == 1


def test_under_a_timeout_the_prior_prefers_score_per_second(tmp_path):
    cheap = {**GOOD, "backbone": "test_resnet", "unfreeze_depth": 0.0}
    bad = {**GOOD, "lr": 1e-2, "augmentation": "flip_crop", "aug_strength": 0.9}
    trials = [(GOOD, 0.9, 50.0), (cheap, 0.8, 1.0), (bad, 0.1, 50.0)]
    _catalog(tmp_path / "a" / "catalog.db", "near", FEATURES, trials)
    from automl_tl.prior import compute_prior

    untimed = compute_prior(_config(tmp_path, prior=["a/catalog.db"]), FEATURES, 2)
    assert [e.params["backbone"] for e in untimed.entries] == ["test_convnext", "test_resnet"]
    assert not untimed.per_second
    timed = compute_prior(_config(tmp_path, prior=["a/catalog.db"], timeout=600), FEATURES, 2)
    assert [e.params["backbone"] for e in timed.entries] == ["test_resnet", "test_convnext"]
    assert timed.per_second and timed.entries[0].seconds == 1.0


def _line_of_tasks(n: int) -> list[Task]:
    """``n`` earlier tasks on a line (classes 10 · 10^(0.1 i)), in groups of three whose best
    configuration is the group's own (lr 1e-4, 1e-3, 1e-2 …); a generalist (another backbone)
    is good on every task and best on none."""
    group_lrs = [10.0 ** (g - 4) for g in range(n // 3 + 1)]
    generalist = {**GOOD, "backbone": "test_resnet"}
    tasks = []
    for i in range(n):
        own = group_lrs[i // 3]
        evaluations = [
            Evaluation({**GOOD, "lr": lr}, 0.9 if lr == own else 0.1) for lr in group_lrs
        ]
        evaluations += [Evaluation(generalist, 0.7), Evaluation({**GOOD, "unfreeze": "lp_ft"}, 0.0)]
        tasks.append(
            Task(f"t{i}", "test", {**FEATURES, "classes": 10 * 10 ** (0.1 * i)}, evaluations)
        )
    return tasks


def test_with_a_long_history_the_prior_trusts_the_nearest_tasks():
    """With >= CHOOSE_NEIGHBOURS_FROM earlier tasks the prior chooses, by leave-one-out on them,
    to build its portfolio from the few nearest: each task's own group's configuration first,
    not the generalist that every task's many far neighbours outvote it for."""
    tasks = _line_of_tasks(9)
    new = {**FEATURES, "classes": 10 * 10 ** (0.1 * 4)}  # where t4 (group 1: lr 1e-3) lies
    prior = build_prior(tasks, new, 3)
    assert prior.neighbours is not None and prior.neighbours <= 3
    marks = prior.neighbour_marks
    assert set(marks) == {"1", "2", "3", "5", "all"}  # 8 needs more than 9 - 1 others
    assert marks[str(prior.neighbours)] > marks["all"]
    assert (
        prior.entries[0].params["lr"] == 1e-3
        and prior.entries[0].params["backbone"] == GOOD["backbone"]
    )
    weights = {t["name"]: t["weight"] for t in prior.tasks}
    assert sum(w > 0 for w in weights.values()) == prior.neighbours and weights["t0"] == 0.0
    # trusting every task, as below CHOOSE_NEIGHBOURS_FROM, starts with the generalist
    everyone = build_prior(tasks[:7], new, 3)
    assert everyone.neighbours is None and everyone.neighbour_marks == {}
    assert everyone.entries[0].params["backbone"] == "test_resnet"
    assert all(t["weight"] > 0 for t in everyone.tasks)


def test_prior_build_says_how_many_nearest_tasks_it_trusts(tmp_path):
    for task in _line_of_tasks(9):
        trials = [(e.params, e.score, 5.0) for e in task.evaluations]
        _catalog(tmp_path / task.name / "catalog.db", task.name, task.features, trials)
    body = TINY_STUDY.replace("[search]", f'[search]\nprior = ["{tmp_path}/*/catalog.db"]')
    study = write_study(tmp_path / "new", body, name="new")
    built = run_main("prior", "build", str(study))
    assert built.returncode == 0, built.stderr
    assert "nearest earlier tasks (9):" in built.stdout
    line = re.search(
        r"portfolio built from (.*) \(leave-one-out over the earlier tasks: (.*)\)", built.stdout
    )
    assert line, built.stdout
    prior = json.loads(run_main("prior", "show", str(study), "--format", "json").stdout)
    trusted = "all" if prior["neighbours"] is None else f"the {prior['neighbours']} nearest"
    assert line.group(1) == trusted and set(prior["neighbour_marks"]) == {"1", "2", "3", "5", "all"}
    assert line.group(2).startswith(f"1: {prior['neighbour_marks']['1']:.3f}, ")


def test_leave_one_out_holds_out_at_most_the_nearest_tasks(monkeypatch):
    """A long history's leave-one-out is bounded: only the MAX_FOLDS earlier tasks nearest
    the new dataset are held out in turn (here one: t4, where the new dataset lies, whose own
    group's configuration its nearest neighbour's portfolio starts with)."""
    import automl_tl.prior as prior_module

    tasks = _line_of_tasks(9)
    new = {**FEATURES, "classes": 10 * 10 ** (0.1 * 4)}
    every = build_prior(tasks, new, 3).neighbour_marks
    monkeypatch.setattr(prior_module, "MAX_FOLDS", 1)
    one = build_prior(tasks, new, 3).neighbour_marks
    assert one["1"] == 1.0 and one["all"] < 1.0 and one != every
