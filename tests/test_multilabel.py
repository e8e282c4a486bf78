"""Multi-label classification: the task object (loss, metrics, thresholds), the sources (a
CSV labels column, digit_pairs), iterative-stratification splits, the bad inputs, and a
search -> export -> predict run end to end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from automl_tl import DataError
from automl_tl.config import config_from_dict
from automl_tl.data import assign_multilabel_splits, load_splits, prepare_data
from automl_tl.default_plugins.datasets import DigitPairs
from automl_tl.errors import ConfigError
from automl_tl.tasks import (
    MULTICLASS,
    MultiLabel,
    asymmetric_loss,
    average_precision,
    build,
    f1_scores,
    multilabel_metrics,
    predicted_labels,
    tune_thresholds,
)

from .conftest import run_main, write_study

# ---------------------------------------------------------------------------------------------
# the task object


def test_average_precision_matches_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(40) < 0.3
        y[0] = True
        scores = rng.integers(0, 6, 40) / 5.0  # many ties
        assert average_precision(scores, y) == pytest.approx(average_precision_score(y, scores))
    assert np.isnan(average_precision(np.array([0.1, 0.9]), np.array([0, 0])))


def test_average_precision_by_hand():
    # ranked: pos, neg, pos -> precision 1 at the first, 2/3 at the second positive
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1])) == pytest.approx(
        (1 + 2 / 3) / 2
    )


def test_tuned_thresholds_by_hand_and_never_worse_than_half():
    probs = np.array([[0.9, 0.2], [0.3, 0.4], [0.2, 0.1], [0.1, 0.35]])
    y = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    t = tune_thresholds(probs, y)
    # label 0: keep 0.9 and 0.3 (F1 = 1), cut halfway to 0.2; label 1: keep 0.4, 0.35
    assert t.tolist() == pytest.approx([0.25, 0.275])
    rng = np.random.default_rng(1)
    probs = rng.random((200, 5))
    y = (probs + rng.normal(0, 0.3, probs.shape)) > 0.8
    tuned = f1_scores(probs >= tune_thresholds(probs, y), y)[1]
    assert tuned >= f1_scores(probs >= 0.5, y)[1]
    # a label with no positive keeps 0.5
    assert tune_thresholds(probs[:, :1], np.zeros((200, 1)))[0] == 0.5


def test_multilabel_metrics_exact():
    probs = np.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.75]])
    y = np.array([[1, 0], [1, 1], [0, 0]])
    m = multilabel_metrics(probs, y, thresholds=[0.5, 0.5])
    # predictions: {0}, {0, 1}, {1}: tp 3, fp 1, fn 0 -> micro F1 6/7; label 1 F1 2/3
    assert m["micro_f1"] == pytest.approx(6 / 7)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["subset_accuracy"] == pytest.approx(2 / 3)
    assert m["map"] == pytest.approx((1 + 1 / 2) / 2)  # label 1's positive ranks second
    assert predicted_labels(probs, ["a", "b"], [0.5, 0.72]) == [
        [("a", 0.9)],
        [("a", 0.8)],
        [("b", 0.75)],
    ]


def test_losses():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.2, 3.0]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    bce = F.binary_cross_entropy_with_logits(logits, y)
    assert MultiLabel("bce").loss(logits, y) == pytest.approx(float(bce))
    plain = asymmetric_loss(logits, y, gamma_neg=0, gamma_pos=0, clip=0)
    assert float(plain) == pytest.approx(float(bce), rel=1e-5)
    # the asymmetric loss down-weights the negatives: below BCE here
    assert float(MultiLabel("asymmetric").loss(logits, y)) < float(bce)
    # soft targets (mixup of multi-hot rows) are taken as they are
    soft = MultiLabel().loss(logits, y * 0.7)
    assert float(soft) == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, y * 0.7)))
    assert MULTICLASS.loss(logits, torch.tensor([0, 2])) == pytest.approx(
        float(F.cross_entropy(logits, torch.tensor([0, 2])))
    )
    assert build("multilabel", "asymmetric").to_dict() == {
        "task": "multilabel",
        "loss": "asymmetric",
    }


# ---------------------------------------------------------------------------------------------
# sources and splits


def _write_csv(folder: Path, rows: list[str], header: str = "path,labels", n_images: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    records = DigitPairs().load(None, folder).records
    for i in range(n_images or len(rows)):
        Image.fromarray(records[i].image).save(folder / f"{i}.png")
    (folder / "data.csv").write_text("\n".join([header, *rows]) + "\n")
    return folder / "data.csv"


def _pairs_csv(folder: Path, n: int = 60, separator: str = " ") -> Path:
    records = DigitPairs().load(None, folder).records[:n]
    rows = [f"{i}.png,{separator.join(r.labels)}" for i, r in enumerate(records)]
    return _write_csv(folder, rows)


def test_digit_pairs_are_fixed_distinct_and_multilabel():
    a, b = DigitPairs().load(None, Path(".")), DigitPairs().load(None, Path("."))
    assert len(a.records) == 1200 and a.class_names == [str(d) for d in range(10)]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.records[:50], b.records[:50]))
    assert len({r.image.tobytes() for r in a.records}) == 1200  # no copies across splits
    sizes = [len(r.labels) for r in a.records]
    assert set(sizes) == {1, 2} and a.records[0].image.shape == (16, 16)
    hard = DigitPairs().load("hard", Path("."))
    assert max(len(r.labels) for r in hard.records) == 4
    with pytest.raises(DataError, match="digit_pairs:easy is not a variant"):
        DigitPairs().load("easy", Path("."))


def test_csv_labels_column_makes_the_study_multilabel(tmp_path, registry):
    csv = _pairs_csv(tmp_path / "data", separator=";")
    study = write_study(
        tmp_path,
        f'[data]\nsource = "csv:{csv}"\nimage_size = 16\nlabel_separator = ";"\n',
    )
    from automl_tl.config import load_config

    config = load_config(study)
    assert (config.data.task, config.search.metric) == ("multilabel", "map")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = load_splits(config, registry)
    assert splits.task.multilabel and splits.train.y.shape[1] == 10
    assert sum(map(len, (splits.train, splits.val, splits.test))) == 60
    summary = splits.summary()
    assert summary["task"] == "multilabel"
    first = DigitPairs().load(None, tmp_path).records[0]
    where = {
        n: (part, i)
        for part in ("train", "val", "test")
        for i, n in enumerate(getattr(splits, part).names)
    }
    part, row = where[str(tmp_path / "data" / "0.png")]
    on = torch.nonzero(getattr(splits, part).y[row]).flatten().tolist()
    assert tuple(splits.class_names[i] for i in on) == first.labels


def test_iterative_stratification_is_seeded_and_keeps_label_shares():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 6)) < [0.5, 0.3, 0.2, 0.1, 0.05, 0.4]).astype(np.float32)
    y[y.sum(1) == 0, 0] = 1
    from automl_tl.components import Record

    records = [Record(f"{i}.png", labels=("x",)) for i in range(300)]
    names = [str(c) for c in range(6)]
    a = assign_multilabel_splits(records, y, names, 0.2, 0.2, seed=3)
    b = assign_multilabel_splits(records, y, names, 0.2, 0.2, seed=3)
    c = assign_multilabel_splits(records, y, names, 0.2, 0.2, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(300))
    # iterative stratification trades exact sizes for label shares: within a few images
    assert all(abs(len(a[k]) - n) <= 8 for k, n in (("train", 180), ("val", 60), ("test", 60)))
    for part, share in (("val", 0.2), ("test", 0.2)):
        got = y[a[part]].sum(0) / y.sum(0)
        assert np.all(np.abs(got - share) <= 0.05), (part, got)


def test_fixed_split_column_is_kept(tmp_path, registry):
    records = DigitPairs().load(None, tmp_path).records[:40]
    rows = [
        f"{i}.png,{' '.join(r.labels)},{'test' if i < 10 else ''}" for i, r in enumerate(records)
    ]
    csv = _write_csv(tmp_path / "d", rows, header="path,labels,split")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = prepare_data(registry, f"csv:{csv}", image_size=16, task=MultiLabel(), seed=0)
    assert sorted(Path(n).name for n in splits.test.names) == sorted(f"{i}.png" for i in range(10))


# ---------------------------------------------------------------------------------------------
# bad input: one clear message each, exit 2, nothing created


def _cli_refuses(tmp_path, body: str, *message: str) -> None:
    # one small backbone: the backbone checks before the data are not what is tested
    body += "" if "[search]" in body else "[search]\n"
    study = write_study(tmp_path, body + 'backbones = ["test_resnet"]\n')
    result = run_main("search", str(study), "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for part in message:
        assert part in result.stderr, result.stderr
    db = tmp_path / "tiny" / "optuna.db"  # the storage may exist (the study's direction is
    if db.exists():  # checked before the data): no trial was created in it
        import sqlite3

        with sqlite3.connect(db) as conn:
            tables = {r[0] for r in conn.execute("select name from sqlite_master")}
            if "trials" in tables:
                assert conn.execute("select count(*) from trials").fetchone() == (0,)


def test_rows_mixing_single_and_multilabel_forms(tmp_path):
    csv = _write_csv(
        tmp_path / "d", ["0.png,3,", "1.png,,1 4", "2.png,,2"], header="path,label,labels"
    )
    _cli_refuses(
        tmp_path,
        f'[data]\nsource = "csv:{csv}"\n',
        "mixes single-label rows (a label cell: lines 2)",
        "multi-label rows (a labels cell: lines 3, 4)",
    )


def test_empty_labels_cell(tmp_path):
    csv = _write_csv(tmp_path / "d", ["0.png,3 1", "1.png,", "2.png,2"])
    _cli_refuses(tmp_path, f'[data]\nsource = "csv:{csv}"\n', "data.csv:3: empty labels cell")


def test_a_label_on_one_image_only(tmp_path):
    records = DigitPairs().load(None, tmp_path).records[:30]
    rows = [f"{i}.png,{' '.join(r.labels)}" for i, r in enumerate(records)]
    rows[0] = "0.png,unicorn 1"
    csv = _write_csv(tmp_path / "d", rows)
    _cli_refuses(
        tmp_path,
        f'[data]\nsource = "csv:{csv}"\n',
        "label 'unicorn' appears in only 1 image; each label needs at least 3 (train, val, test)",
    )


def test_multiclass_metric_for_a_multilabel_study(tmp_path):
    csv = _pairs_csv(tmp_path / "d", n=10)
    _cli_refuses(
        tmp_path,
        f'[data]\nsource = "csv:{csv}"\n[search]\nmetric = "balanced_accuracy"\n',
        '[search] metric = "balanced_accuracy" is a multiclass metric, but this study is '
        "multilabel (its CSV has a labels column); choose one of: map, micro_f1, macro_f1, "
        "subset_accuracy",
    )


def test_multiclass_task_set_for_multilabel_data(tmp_path):
    _cli_refuses(
        tmp_path,
        '[data]\nsource = "digit_pairs"\ntask = "multiclass"\n',
        "digit_pairs gives several labels per image (multi-label records); set [data] task = "
        '"multilabel"',
    )


def test_config_rejects_mismatched_metric_and_empty_separator():
    with pytest.raises(ConfigError, match='"map" is a multilabel metric, but this study is'):
        config_from_dict({"name": "x", "search": {"metric": "map"}})
    with pytest.raises(ConfigError, match="label_separator is empty"):
        config_from_dict({"name": "x", "data": {"label_separator": ""}})
    with pytest.raises(DataError, match="max_per_class caps images per class"):
        prepare_data(
            __import__("automl_tl").registry_for(),
            "digit_pairs",
            image_size=16,
            task=MultiLabel(),
            max_per_class=5,
        )


# ---------------------------------------------------------------------------------------------
# end to end: search -> best/ -> predict, plain timm


def pairs_study(tmp_path: Path, n: int, *search: str) -> Path:
    """A two-trial study of ``n`` digit pairs in a CSV at 16 px: one backbone, no race;
    ``search``: more ``[search]`` lines."""
    csv = _pairs_csv(tmp_path / "d", n=n)
    lines = [
        f'[data]\nsource = "csv:{csv}"\nimage_size = 16',
        "[selection]\nrace = false",
        '[search]\nn_trials = 2\nbackbones = ["test_resnet"]\naugmentations = ["none"]',
        'unfreeze = ["top_k"]\npruner = "none"',
        *search,
    ]
    return write_study(tmp_path, "\n".join(lines) + "\n")


@pytest.mark.slow
def test_search_export_predict_end_to_end(tmp_path):
    study = pairs_study(
        tmp_path, 90, "epochs = 2", "batch_size = 32", 'multilabel_loss = "asymmetric"'
    )
    result = run_main("search", str(study), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "test mAP" in result.stdout and "F1 at per-label thresholds tuned on" in result.stdout
    best = tmp_path / "tiny" / "best"
    config = json.loads((best / "config.json").read_text())
    record = config["automl_tl"]
    assert record["task"] == "multilabel" and len(record["thresholds"]) == 10
    assert "temperature" not in record
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["metric"] == "map"
    assert set(metrics["test"]) >= {"map", "micro_f1", "macro_f1", "subset_accuracy"}
    assert metrics["thresholds"]["values"] == record["thresholds"]
    import timm

    assert timm.create_model(f"local-dir:{best}", pretrained=True).num_classes == 10
    # predict: every label above its threshold, path,labels,scores space-separated
    from automl_tl.export import load_model

    loaded = load_model(best)
    probs = torch.sigmoid(loaded.model(loaded.preprocess([tmp_path / "d" / "0.png"])))[0]
    expected = [
        loaded.label_names[i]
        for i in torch.argsort(-probs).tolist()
        if probs[i] >= record["thresholds"][i]
    ]
    out = run_main("predict", str(best), str(tmp_path / "d" / "0.png"), "--format", "csv")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header == "path,labels,scores"
    assert row.split(",")[1] == " ".join(expected)
    top2 = run_main(
        "predict", str(best), str(tmp_path / "d" / "0.png"), "--format", "json", "--top-k", "2"
    )
    assert len(json.loads(top2.stdout)[0]["labels"]) == 2
    board = run_main("report", str(study), "--format", "json")
    assert board.returncode == 0, board.stderr
    data = json.loads(board.stdout)
    assert data["metric"] == "map" and data["best_model"]["task"] == "multilabel"
    assert data["best_model"]["test"]["map"] == metrics["test"]["map"]
    written = {f["file"] for f in data["report"]["files"] if f["written"]}
    assert {"per_label_ap.png", "label_cooccurrence.png"} <= written
    assert not {"confusion_matrix.png", "misclassified.png", "reliability.png"} & {
        f["file"] for f in data["report"]["files"]
    }
    from automl_tl.catalog import Catalog

    (model_row,) = Catalog(tmp_path / "tiny" / "catalog.db").db["models"].rows
    assert model_row["task"] == "multilabel" and model_row["test_map"] == metrics["test"]["map"]


@pytest.mark.slow
def test_the_multilabel_demo_study_runs(tmp_path):
    """The README's `automl-tl search studies/digit_pairs.toml` and `predict ... --format csv`
    on a copy, one trial."""
    from .conftest import REPO

    study = tmp_path / "digit_pairs.toml"
    study.write_text((REPO / "studies" / "digit_pairs.toml").read_text())
    result = run_main("search", str(study), "--n-trials", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "digit_pairs" / "best" / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["data"]["sizes"] == {
        "train": 718,
        "val": 241,
        "test": 241,
    }
    assert f"test mAP {metrics['test']['map']:.4f}" in result.stdout
    images = tmp_path / "images"
    images.mkdir()
    for i, record in enumerate(DigitPairs().load(None, tmp_path).records[:3]):
        Image.fromarray(record.image).save(images / f"{i}.png")
    out = run_main(
        "predict", str(tmp_path / "digit_pairs" / "best"), str(images), "--format", "csv"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "path,labels,scores" and len(out.stdout.splitlines()) == 4


def test_ensembles_and_soups_of_multilabel_models_are_refused(tmp_path):
    from automl_tl import UserError
    from automl_tl.export import check_single_label

    for name, task in (("a", "multilabel"), ("b", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"automl_tl": {"task": task}}))
    check_single_label([tmp_path / "b"], "ensembles")
    with pytest.raises(UserError, match="a is a multi-label model; soups of multi-label models"):
        check_single_label([tmp_path / "b", tmp_path / "a"], "soups")


def test_check_data_counts_images_per_label(tmp_path):
    csv = _pairs_csv(tmp_path / "d", n=40)
    result = run_main("check-data", f"csv:{csv}", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["settings"]["task"] == "multilabel" and data["usable"]
    records = DigitPairs().load(None, tmp_path).records[:40]
    per_label = {c: sum(c in r.labels for r in records) for c in data["classes"]}
    totals = {
        c: sum(data["counts"][s].get(c, 0) for s in ("train", "val", "test")) for c in per_label
    }
    assert totals == per_label
    text = run_main("check-data", f"csv:{csv}")
    assert "split: iterative stratification, seed 0" in text.stdout


def test_micro_batches_accumulate_a_multilabel_batchs_gradient():
    import contextlib

    from automl_tl.train import TaskLoss, _backward

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    x, y = torch.randn(10, 3, 2, 2), (torch.rand(10, 4) < 0.4).float()
    for task in (MultiLabel("bce"), MultiLabel("asymmetric")):
        grads, losses = [], []
        for micro in (10, 4, 2):
            model.zero_grad()
            losses.append(
                float(_backward(model, x, y, micro, contextlib.nullcontext, False, TaskLoss(task)))
            )
            grads.append([p.grad.clone() for p in model.parameters()])
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        assert losses[2] == pytest.approx(losses[0], rel=1e-5)
        for other in grads[1:]:
            for a, b in zip(grads[0], other):
                assert torch.allclose(a, b, atol=1e-6)


def test_imbalance_is_refused_for_a_multilabel_study(tmp_path):
    """The class-imbalance answers assume one label per image: one message naming the key
    and the fix; mixing, smoothing (tests/test_multilabel_recipe.py), EMA and the other
    regularizers are accepted."""
    _cli_refuses(
        tmp_path,
        '[data]\nsource = "digit_pairs"\ntask = "multilabel"\n'
        '[search]\nimbalance = ["none", "focal"]\nmixup_alpha = 0.2\n',
        "error: [search] imbalance: the class-imbalance answers (class weights, focal loss, a "
        "class-balanced sampler, logit adjustment) assume one label per image, and this study "
        "is multilabel; "
        'remove it (for rare labels try [search] multilabel_loss = "asymmetric"; mixup, CutMix, '
        "label smoothing and the other regularizers work for both)",
    )
    base = {"name": "x", "data": {"source": "digit_pairs", "task": "multilabel"}}
    config = config_from_dict({**base, "search": {"ema_decay": 0.99, "clip_grad": 1.0}})
    assert config.task.multilabel and config.search.ema_decay == [0.99, 0.99]
