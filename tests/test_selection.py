"""Selection you can trust: finalists within one standard error, the race (resumable, claimed
run by run), early stopping at the best epoch, greedy ensembles and soups, temperature
scaling, 95 % intervals — unit tests on known answers, then one tiny study through the CLI."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch

from automl_tl import selection
from automl_tl.config import config_from_dict
from automl_tl.data import Split, Splits
from automl_tl.errors import ConfigError, UserError
from automl_tl.scores import (
    average_state_dicts,
    bootstrap_interval,
    caruana_selection,
    difference_in_noise,
    fit_temperature,
    metric_intervals,
    pack,
    reliability,
    unpack,
    wilson_interval,
)
from automl_tl.train import Choice, fit

from .conftest import write_study

# ---------------------------------------------------------------------------------------------
# finalists and the plan


def _study_with(values: list[float], val_images: int) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("data", {"sizes": {"val": val_images}})
    for v in values:
        study.add_trial(
            optuna.trial.create_trial(
                value=v,
                params={"x": 0.0},
                distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
            )
        )
    return study


def test_finalists_are_the_trials_within_one_binomial_standard_error():
    # best 0.9 on 100 images: SE = sqrt(0.9 * 0.1 / 100) = 0.03, so >= 0.87 is a finalist
    study = _study_with([0.80, 0.90, 0.88, 0.87, 0.86, 0.9], val_images=100)
    found = selection.finalists(study, limit=5)
    assert found.standard_error == pytest.approx(0.03)
    assert found.numbers == [1, 5, 2, 3]  # best first, ties by trial number
    assert found.within == 4 and found.note is None


def test_finalists_are_capped_with_a_note():
    study = _study_with([0.5] * 6, val_images=10)
    found = selection.finalists(study, limit=3)
    assert found.numbers == [0, 1, 2] and found.within == 6
    assert "racing the top 3" in found.note


def test_a_perfect_score_keeps_one_image_of_error():
    # p = 1 would give SE 0; one image's worth (sqrt(1/n)/sqrt(n)) keeps near-ties in
    study = _study_with([1.0, 0.95, 0.5], val_images=20)
    assert selection.finalists(study, limit=5).numbers == [0, 1]


def _config(**selection_keys):
    return config_from_dict({"name": "t", "search": {"n_trials": 10}, "selection": selection_keys})


def test_the_plan_stays_within_the_budget():
    plan = selection.plan_runs(_config(repeats=2, budget=8), [3, 1, 4, 7], folds=0)
    assert plan.finalists == [3, 1, 4, 7] and len(plan.runs) == 8
    assert len({r.key for r in plan.runs}) == 8
    plan = selection.plan_runs(_config(repeats=1, budget=6), [3, 1, 4, 7], folds=3)
    assert plan.finalists == [3, 1] and len(plan.runs) == 6  # dropped from the last
    assert "racing 2 of 4 finalists" in plan.notes[0]
    plan = selection.plan_runs(_config(repeats=1, budget=4), [3, 1], folds=3)
    assert len(plan.runs) == 4 and "2 of 3 runs per finalist" in plan.notes[-1]


def _splits(per_class_train=6, per_class_val=2, classes=3, size=8) -> Splits:
    def split(per_class, offset):
        y = torch.arange(classes).repeat_interleave(per_class)
        g = torch.Generator().manual_seed(offset)
        x = torch.randint(0, 255, (len(y), 3, size, size), dtype=torch.uint8, generator=g)
        return Split(x, y, [f"#{offset + i}" for i in range(len(y))])

    return Splits(
        class_names=[str(c) for c in range(classes)],
        train=split(per_class_train, 0),
        val=split(per_class_val, 1000),
        test=split(4, 2000),
        image_size=size,
        fingerprint="f",
        split_hash="h",
    )


def test_folds_are_stratified_disjoint_and_cover_train_and_val():
    splits = _splits()
    parts = selection.fold_indices(splits, repeat=0, folds=4, seed=0)
    everything = torch.cat(parts)
    assert sorted(everything.tolist()) == list(range(24))  # 3 classes x (6 + 2)
    y = torch.cat([splits.train.y, splits.val.y])
    for p in parts:
        assert torch.bincount(y[p], minlength=3).tolist() == [2, 2, 2]
    again = selection.fold_indices(splits, repeat=0, folds=4, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))  # the same on every worker
    other = selection.fold_indices(splits, repeat=1, folds=4, seed=0)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))
    data, held = selection.run_splits(splits, selection.Run(0, 0, 1, 4), seed=0)
    assert len(data.train) == 18 and len(data.val) == 6 and torch.equal(held, parts[1])
    assert data.split_hash != splits.split_hash  # the feature cache tells folds apart


def test_folds_default_from_images_per_class_and_are_checked():
    splits = _splits(per_class_train=6, per_class_val=2)  # 2 val images per class: folds
    assert selection.folds_for(_config(), splits) == 5
    assert selection.folds_for(_config(folds=0), splits) == 0
    big = _splits(per_class_train=40, per_class_val=12)  # enough validation images: none
    assert selection.folds_for(_config(), big) == 0
    with pytest.raises(UserError, match=r"folds = 9 is more than the 8 images of the smallest"):
        selection.folds_for(_config(folds=9), splits)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"selection": {"repeats": 0}}, "[selection] repeats = 0 is too small"),
        ({"selection": {"rule": "max"}}, "[selection] rule = 'max' is not allowed"),
        (
            {"search": {"n_trials": 3}, "selection": {"finalists": 5}},
            "[selection] finalists = 5 is more than the 3 trials",
        ),
        ({"search": {"patience": -1}}, "[search] patience = -1 is too small"),
    ],
)
def test_bad_selection_settings_are_one_clear_message(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"name": "t", **raw})
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------
# scores


def test_wilson_interval_values():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    low, high = wilson_interval(100, 100)
    assert high == 1.0 and round(low, 4) == 0.963


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_images():
    g = torch.Generator().manual_seed(0)

    def sample(n):
        y = torch.randint(0, 4, (n,), generator=g)
        pred = torch.where(
            torch.rand(n, generator=g) < 0.7, y, torch.randint(0, 4, (n,), generator=g)
        )
        return y, pred

    y, pred = sample(100)
    ci = metric_intervals(y, pred, 4)
    acc = float((y == pred).double().mean())
    assert ci["accuracy"][0] <= acc <= ci["accuracy"][1]
    for key in ("balanced_accuracy", "macro_f1"):
        assert 0 <= ci[key][0] < ci[key][1] <= 1
    y2, pred2 = sample(2000)
    wide = bootstrap_interval(y, pred, 4, "balanced_accuracy")
    narrow = bootstrap_interval(y2, pred2, 4, "balanced_accuracy")
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 2


def test_a_difference_inside_the_noise_is_called_so():
    assert difference_in_noise(0.80, 100, 0.78, 100)[1] is True
    assert difference_in_noise(0.95, 1000, 0.80, 1000)[1] is False


def test_temperature_scaling_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5000, 5, generator=g)
    y = torch.multinomial((logits / 2.5).softmax(1), 1, generator=g).flatten()
    t = fit_temperature(logits.log_softmax(1), y)
    assert t == pytest.approx(2.5, rel=0.05)
    before = reliability(logits.log_softmax(1), y)["ece"]
    after = reliability((logits / t).log_softmax(1), y)["ece"]
    assert after < before / 3


def test_packed_predictions_round_trip():
    lp = torch.randn(7, 3).log_softmax(1)
    back = unpack(json.loads(json.dumps(pack(lp))))
    assert back.shape == (7, 3) and torch.allclose(back, lp, atol=1e-2)


def test_caruana_selection_finds_the_complementary_pair():
    # A is right on the first half, B on the second, C always guesses; A + B is best
    n = 40
    y = torch.tensor([0, 1] * (n // 2))
    sure = torch.full((n, 2), 0.1)
    sure[torch.arange(n), y] = 0.9
    wrong = 1 - sure
    a = torch.where(torch.arange(n).unsqueeze(1) < n // 2, sure, torch.full((n, 2), 0.5))
    b = torch.where(torch.arange(n).unsqueeze(1) >= n // 2, sure, torch.full((n, 2), 0.5))
    c = wrong
    counts = caruana_selection([x.log() for x in (a, b, c)], y)
    assert counts[2] == 0 and counts[0] >= 1 and counts[1] >= 1
    assert abs(counts[0] - counts[1]) <= 1  # symmetric: equal weight
    # with replacement: a model better than all others alone is picked, repeatedly if needed
    assert caruana_selection([sure.log(), c.log()], y) == [1, 0]


def test_the_ensemble_rule_weighs_every_finalist_alike_or_climbs_greedily():
    from automl_tl.selection import ensemble_counts

    y = torch.tensor([0, 1] * 10)
    right = torch.full((20, 2), 0.2)
    right[torch.arange(20), y] = 0.8
    unsure = torch.full((20, 2), 0.5)
    wrong = 1 - right
    held_out = [right, unsure, wrong]
    assert ensemble_counts("uniform", held_out, y, "accuracy") == [1, 1, 1]
    # greedy: Caruana's selection on the log-probabilities (the right model alone here)
    greedy = ensemble_counts("greedy", held_out, y, "accuracy")
    assert greedy == caruana_selection([p.log() for p in held_out], y, score="accuracy")
    assert greedy == [1, 0, 0]


def test_soup_averages_weights_and_keeps_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}
    out = average_state_dicts([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and int(out["n"]) == 5
    weighted = average_state_dicts([a, b], [3, 1])
    assert torch.allclose(weighted["w"], torch.tensor([1.5, 3.0]))


# ---------------------------------------------------------------------------------------------
# early stopping


def test_early_stopping_stops_after_patience_and_keeps_the_best_epoch(registry):
    splits = _splits(size=16)
    # lr 0: the validation score never moves, so the first epoch stays the best one
    choice = Choice(backbone="test_resnet", lr=0.0, epochs=6, batch_size=8, unfreeze="top_k")
    result = fit(choice, splits, registry, device="cpu", patience=2, keep_predictions=True)
    assert len(result.history) == 3 and result.stopped_early
    assert result.best_epoch == 0
    assert result.val_log_probs.shape == (len(splits.val), 3)
    choice.epochs = 3
    full = fit(choice, splits, registry, device="cpu")
    assert len(full.history) == 3 and not full.stopped_early


# ---------------------------------------------------------------------------------------------
# claims and a race that resumes


def test_a_run_is_claimed_once_and_taken_again_after_an_interrupt():
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name="s")
    assert selection.claim(study, "s:race:k") is True
    # the same process asking again: an earlier, interrupted call of this process held it
    assert selection.claim(study, "s:race:k") is True
    marker = optuna.load_study(study_name="s:race:k", storage=study._storage)
    marker.set_user_attr("claimed_by", {"host": "elsewhere", "pid": 1})  # alive, not us
    assert selection.claim(study, "s:race:k") is False
    selection.release(study, "s:race:k")
    assert selection.claim(study, "s:race:k") is True


STUDY = """
[data]
source = "digits"
image_size = 16
seed = 0
max_per_class = 10

[search]
n_trials = 3
backbones = ["test_resnet"]
augmentations = ["none"]
unfreeze = ["top_k"]
epochs = 2
batch_size = 32
pruner = "none"
sampler = "random"
patience = 1
portfolio = false

[selection]
finalists = 2
folds = 2
"""


def test_an_interrupted_race_resumes_with_the_runs_not_done(tmp_path, registry, monkeypatch):
    from automl_tl.config import load_config
    from automl_tl.data import load_splits

    config = load_config(write_study(tmp_path, STUDY))
    config.selection.budget = 20  # more than the default's n_trials: every run is planned
    splits = load_splits(config, registry)
    study = optuna.create_study(
        study_name=config.name, storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize"
    )
    for value in (0.5, 0.45):
        study.add_trial(
            optuna.trial.create_trial(
                value=value,
                params={
                    "backbone": "test_resnet",
                    "augmentation": "none",
                    "unfreeze": "top_k",
                    "unfreeze_depth": 1.0,
                    "lr": 3e-3,
                    "weight_decay": 1e-4,
                },
                distributions={
                    "backbone": optuna.distributions.CategoricalDistribution(["test_resnet"]),
                    "augmentation": optuna.distributions.CategoricalDistribution(["none"]),
                    "unfreeze": optuna.distributions.CategoricalDistribution(["top_k"]),
                    "unfreeze_depth": optuna.distributions.FloatDistribution(0, 1),
                    "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                    "weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True),
                },
            )
        )
    plan = selection.plan_runs(config, [0, 1], folds=2)
    assert len(plan.runs) == 4
    real_fit, calls = selection.fit, []

    def interrupted_after_two(*args, **kwargs):  # Ctrl-C during the third run
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(selection, "fit", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        selection.race(config, registry, study, splits, plan, device="cpu")
    race_study = selection.open_race_study(study)
    assert len(race_study.trials) == 2
    monkeypatch.setattr(selection, "fit", real_fit)
    done = selection.race(config, registry, study, splits, plan, device="cpu", poll=0.05)
    assert sorted(done) == sorted(r.key for r in plan.runs)
    assert len(race_study.get_trials()) == 4  # nothing ran twice
    for t in race_study.get_trials():
        assert 0 <= t.value <= 1 and t.user_attrs["best_epoch"] in (1, 2)
        assert unpack(t.user_attrs["val_log_probs"]).shape[1] == 10
    from automl_tl.catalog import Catalog, catalog_path

    assert len(Catalog(catalog_path(config)).races(config.name)) == 4


# ---------------------------------------------------------------------------------------------
# end to end through the command line, in process


@pytest.mark.slow
def test_search_races_calibrates_and_exports_ensemble_and_soup(tmp_path, capsys):
    from automl_tl.cli import main
    from automl_tl.export import load_model

    path = write_study(tmp_path, STUDY.replace("n_trials = 3", "n_trials = 4"))
    assert main(["search", str(path), "-q"]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "tiny"
    metrics = json.loads((root / "best" / "metrics.json").read_text())
    chosen = json.loads((root / "selection.json").read_text())
    sel = chosen["selection"]
    assert metrics["trial"] == sel["winner"] and metrics["selection"]["winner"] == sel["winner"]
    # error bars and calibration
    low, high = metrics["test_interval"]["accuracy"]
    assert low <= metrics["test"]["accuracy"] <= high
    assert "95 % intervals" in out and "[" in out
    cal = metrics["calibration"]
    assert cal["fitted_on"] and cal["temperature"] > 0 and 0 <= cal["ece_after"] <= 1
    config = json.loads((root / "best" / "config.json").read_text())
    assert config["automl_tl"]["temperature"] == cal["temperature"]
    # the retrain trains the epochs the finalists agreed on
    assert metrics["epochs"] == sel["epochs"] and sel["epochs"] in (1, 2)
    # the race: recorded in the storage and resumable
    if sel["runs"]:
        assert "race:" in out
        race = optuna.load_study(study_name="tiny:race", storage=f"sqlite:///{root / 'optuna.db'}")
        assert len(race.get_trials()) == sel["runs"]
    # single vs ensemble vs soup, on test, with their cost
    assert "single best" in out and chosen["single"]["ms_per_image"] > 0
    if "ensemble" in chosen:  # the default rule: every finalist, with equal weights
        assert chosen["ensemble"]["member_trials"] == {str(r["trial"]): 1 for r in sel["finalists"]}
    for kind in ("ensemble", "soup"):
        if kind in chosen:
            loaded = load_model(root / kind)
            assert loaded.label_names == [str(i) for i in range(10)]
            assert 0 <= chosen[kind]["test"]["accuracy"] <= 1
    # the same command again: nothing is raced or retrained twice
    before = (root / "best" / "model.safetensors").stat().st_mtime_ns
    assert main(["search", str(path), "-q"]) == 0
    assert (root / "best" / "model.safetensors").stat().st_mtime_ns == before
    if sel["runs"]:
        assert len(race.get_trials()) == sel["runs"]
    # report: json carries the intervals and the selection
    capsys.readouterr()
    assert main(["report", str(path), "--format", "json", "--no-files"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["best_model"]["test_interval"]["accuracy"] == [low, high]
    assert data["selection"]["selection"]["winner"] == sel["winner"]
    assert math.isfinite(data["best_model"]["calibration"]["ece_before"])


def test_folds_larger_than_the_smallest_class_stop_the_search_before_training(tmp_path, capsys):
    from automl_tl.cli import main

    path = write_study(tmp_path, STUDY.replace("folds = 2", "folds = 11"))
    assert main(["search", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "[selection] folds = 11 is more than the" in err and "Traceback" not in err
    assert not (tmp_path / "tiny" / "optuna.db").exists() or not optuna.get_all_study_names(
        f"sqlite:///{tmp_path / 'tiny' / 'optuna.db'}"
    )


def test_ensembles_and_soups_of_mismatched_models_are_refused(tmp_path, registry, capsys):
    from automl_tl.cli import main
    from automl_tl.components import DataConfig

    def export(name, backbone, classes):
        b = registry.get("backbones", backbone)
        b.export(
            b.create(len(classes), image_size=32),
            tmp_path / name,
            classes,
            DataConfig((3, 32, 32), (0.5,) * 3, (0.25,) * 3),
        )
        return str(tmp_path / name)

    a = export("a", "test_resnet", ["x", "y"])
    b = export("b", "test_resnet", ["x", "z"])
    c = export("c", "test_convnext", ["x", "y"])
    assert main(["ensemble", a, b, "-o", str(tmp_path / "e")]) == 2
    assert "different class lists" in capsys.readouterr().err
    assert main(["ensemble", a, c, "-o", str(tmp_path / "s"), "--soup"]) == 2
    assert "across architectures" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists()
    # a valid ensemble predicts like one model, and its probabilities are the members' mean
    d = export("d", "test_convnext", ["x", "y"])
    assert main(["ensemble", a, d, "-o", str(tmp_path / "ok")]) == 0
    from automl_tl.export import load_model

    x = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    members = [load_model(p) for p in (a, d)]
    mean = sum(m.calibrated_module()(m.preprocess(x)).softmax(-1) for m in members) / 2
    ensemble = load_model(tmp_path / "ok")
    got = ensemble.calibrated_module()(ensemble.preprocess(x)).softmax(-1)
    assert torch.allclose(got, mean, atol=1e-5)
    assert ensemble.predict(x)[0][0][0] in ("x", "y")


def test_the_default_race_budget_never_more_than_doubles_the_search():
    from automl_tl.config import SelectionSection

    assert SelectionSection().race_budget(4) == 4
    assert SelectionSection().race_budget(60) == 20
    assert SelectionSection(budget=7).race_budget(60) == 7


def test_caruana_selection_climbs_the_metric_it_is_given():
    """With the study's metric as the score (a plugin's, say: recall of class 1), greedy
    selection keeps the member that serves it, not the most accurate one."""
    y = torch.tensor([0, 0, 0, 1])
    accurate = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])  # 3/4, recall 0
    recall = torch.tensor([[0.4, 0.6], [0.4, 0.6], [0.9, 0.1], [0.1, 0.9]])  # 2/4, recall 1

    def recall_of_1(probs, labels):
        picked = probs.argmax(1)
        return float((picked[labels == 1] == 1).double().mean())

    logs = [accurate.log(), recall.log()]
    counts = caruana_selection(logs, y, score=recall_of_1)
    mix = (counts[0] * accurate + counts[1] * recall) / sum(counts)
    assert counts[1] > 0 and recall_of_1(mix, y) == 1.0
    calls = []
    caruana_selection(logs, y, score=lambda p, t: calls.append(1) or recall_of_1(p, t))
    assert calls  # the given score is what is climbed


# ---------------------------------------------------------------------------------------------
# finalists trained at different searched image sizes: each scored at its own size


TWO_SIZES = """
[data]
source = "digits:0-2"
image_size = [16, 24]
seed = 0

[search]
n_trials = 2
backbones = ["test_resnet"]
augmentations = ["none"]
unfreeze = ["top_k"]
epochs = 1
pruner = "none"

[weights]
default = "timm"
"""


def _sized(tmp_path, registry):
    """A study searching sizes 16 and 24 px, its splits at 16 px, and a model exported at
    each size (random init, another seed each: different predictions)."""
    from automl_tl.components import DataConfig
    from automl_tl.config import load_config
    from automl_tl.data import load_splits
    from automl_tl.export import export_model

    config = load_config(write_study(tmp_path, TWO_SIZES))
    splits = load_splits(config, registry)
    backbone = registry.get("backbones", "test_resnet")
    folders = {}
    for seed, (size, folder) in enumerate([(16, config.paths.best), (24, config.paths.model(1))]):
        torch.manual_seed(seed)
        export_model(
            backbone.create(3, image_size=size).eval(),
            backbone,
            folder,
            splits.class_names,
            DataConfig((3, size, size), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            {"trial": seed},
        )
        folders[size] = folder
    return config, splits, folders


def test_an_ensembles_members_are_each_scored_at_their_own_size(tmp_path, registry):
    from automl_tl.data import splits_at
    from automl_tl.export import export_ensemble, load_model

    config, splits, folders = _sized(tmp_path, registry)
    at_size = selection.sized_splits(config, registry, splits)
    assert splits.image_size == 16 and at_size(24).image_size == 24
    assert torch.equal(at_size(24).val.y, splits.val.y)  # the same images, in the same order
    out = export_ensemble(
        [folders[16], folders[24]], tmp_path / "ensemble", weights=[1, 2], temperature=1.5
    )
    ensemble = load_model(out)
    assert ensemble.image_size == 24 and ensemble.model.sizes == [16, 24]
    got = selection.model_log_probs(ensemble, "val", at_size)
    # by hand: each member on the validation images decoded at its own size, then the
    # weighted mean of the probabilities, divided by the temperature
    probs = []
    for size in (16, 24):
        member = load_model(folders[size])
        x = splits_at(config, registry, splits, size).val.x
        assert x.shape[-1] == size
        with torch.no_grad():
            probs.append(member.model(member.preprocess(x)).float().softmax(-1))
    mean = (1 * probs[0] + 2 * probs[1]) / 3
    expected = (mean.clamp_min(1e-12).log() / 1.5).log_softmax(-1)
    assert got.shape == (len(splits.val), 3)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    # the member at 24 px fed the 16 px images (upsampled), as before: other predictions
    big = load_model(folders[24])
    with torch.no_grad():
        upsampled = big.model(big.preprocess(splits.val.x)).float().softmax(-1)
    assert not torch.allclose(upsampled, probs[1], atol=1e-3)
    # the test score of the ensemble is that of these predictions on the test split
    scored = selection.score_model(out, splits, registry=registry, at_size=at_size)
    test = selection.model_log_probs(ensemble, "test", at_size)
    accuracy = (test.argmax(1) == splits.test.y).double().mean().item()
    assert scored["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_a_soup_skips_and_refuses_ingredients_of_another_size(tmp_path, registry, capsys):
    from automl_tl.cli import main

    config, splits, folders = _sized(tmp_path, registry)
    at_16 = {"backbone": "test_resnet", "image_size": 16}
    assert selection.soup_mismatch(config, {"backbone": "test_resnet"}, at_16, splits) is None
    assert selection.soup_mismatch(config, {**at_16, "image_size": 24}, at_16, splits) == (
        "trained at 24 px, the winner at 16 px: weights trained at another image size are "
        "not averaged"
    )
    # the study's selection: finalist 1 (24 px) is skipped, with the reason in selection.json
    config.selection.ensemble = False
    study = optuna.create_study(direction="maximize")
    for size in (16, 24):
        study.add_trial(
            optuna.trial.create_trial(
                value=0.5,
                params={"backbone": "test_resnet", "image_size": size},
                distributions={
                    "backbone": optuna.distributions.CategoricalDistribution(["test_resnet"]),
                    "image_size": optuna.distributions.CategoricalDistribution([16, 24]),
                },
            )
        )
    chosen = selection.Selection(
        winner=0,
        argmax=0,
        rule="mean",
        finalists=[{"trial": 0}, {"trial": 1}],
        standard_error=0.0,
        val_images=len(splits.val),
        folds=0,
        repeats=1,
        budget=1,
        runs=0,
        run_seconds=0.0,
        epochs=None,
        temperature=None,
    )
    out = selection.build_extras(config, registry, study, splits, chosen, device="cpu")
    assert "soup" not in out
    assert out["soup_skipped"] == {
        "1": "trained at 24 px, the winner at 16 px: weights trained at another image size are "
        "not averaged"
    }
    assert out["soup_note"] == (
        "no other finalist shares the winner's backbone, weights and image size"
    )
    assert json.loads(config.paths.selection.read_text())["soup_skipped"] == out["soup_skipped"]
    # by hand: automl-tl ensemble A B --soup refuses two sizes
    soup = tmp_path / "soup"
    assert main(["ensemble", str(folders[16]), str(folders[24]), "-o", str(soup), "--soup"]) == 2
    err = capsys.readouterr().err
    assert "cannot average models trained at different image sizes" in err
    assert "Traceback" not in err and not soup.exists()
