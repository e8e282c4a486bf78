"""Mixup / CutMix and label smoothing for multi-label studies (issue 15): mixed multi-hot
targets ``λ y_a + (1 - λ) y_b``, smoothing towards ½, what a multi-label study file still
refuses, and a searched-mixup multi-label study end to end (with its test intervals)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from automl_tl import Choice, fit
from automl_tl.config import config_from_dict, load_config
from automl_tl.data import Split, prepare_data
from automl_tl.recipe import BatchMixer, Recipe, mix_rows, smooth_multi_hot
from automl_tl.storage import open_study
from automl_tl.tasks import MultiLabel
from automl_tl.train import trial_loss

from .conftest import run_main
from .test_multilabel import pairs_study

Y = torch.tensor(
    [[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.float32
)


def _numbered_images(n: int, size: int = 8) -> torch.Tensor:
    """Image i is filled with i: a mixed pixel tells how much of which image it holds."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone()


def test_mixed_rows_by_hand():
    # timm's batch mode: image i mixed with image n-1-i at λ = 0.3
    lam = 0.3
    mixing = lam * torch.eye(4) + (1 - lam) * torch.eye(4).flip(0)
    mixed = mix_rows(Y[:4], mixing)
    expected = [
        [0.3, 0.0, 0.7, 1.0],  # 0.3 * [1,0,0,1] + 0.7 * [0,0,1,1]
        [0.7, 1.0, 0.7, 0.0],  # 0.3 * [0,1,0,0] + 0.7 * [1,1,1,0]
        [0.3, 1.0, 0.3, 0.0],  # 0.3 * [1,1,1,0] + 0.7 * [0,1,0,0]
        [0.7, 0.0, 0.3, 1.0],  # 0.3 * [0,0,1,1] + 0.7 * [1,0,0,1]
    ]
    assert torch.allclose(mixed, torch.tensor(expected), atol=1e-7)


def test_multilabel_mixup_targets_follow_the_drawn_lambda():
    x, y = _numbered_images(5), Y
    mixer = BatchMixer(Recipe(mixup_alpha=0.4), 4, seed=3, multilabel=True)
    mixed_x, target = mixer(x.clone(), y)
    lam = 1 - float(mixed_x[0, 0, 0, 0]) / 3  # image 0 = λ·0 + (1-λ)·3
    assert 0 < lam < 1
    for i in range(4):
        assert target[i].tolist() == pytest.approx((lam * y[i] + (1 - lam) * y[3 - i]).tolist())
    assert torch.equal(target[4], y[4]) and torch.equal(mixed_x[4], x[4])  # the odd one out
    # seeded: the same trial mixes the same way; a multi-label mixer never smooths
    again = BatchMixer(Recipe(mixup_alpha=0.4, label_smoothing=0.2), 4, seed=3, multilabel=True)
    assert torch.equal(again(x.clone(), y)[1], target)


def test_multilabel_cutmix_lambda_is_the_kept_area():
    x, y = _numbered_images(4, size=16), Y[:4]
    mixer = BatchMixer(Recipe(cutmix_alpha=1.0), 4, seed=0, multilabel=True)
    mixed_x, target = mixer(x.clone(), y)
    kept = float((mixed_x[0] == 0).float().mean())  # pixels of image 0 left in place
    assert 0 < kept < 1 and torch.equal(mixed_x[0] == 0, mixed_x[1] == 1)  # one box for all
    expected = kept * y + (1 - kept) * y.flip(0)
    assert torch.allclose(target, expected, atol=1e-6)


def test_matches_timms_own_multilabel_mixing_where_timm_has_it():
    import inspect

    from timm.data.mixup import mixup_target

    if "multi_label" not in inspect.signature(mixup_target).parameters:
        pytest.skip("this timm's mixup_target has no multi_label (timm >= 1.0.2x)")
    lam = 0.35
    mixing = lam * torch.eye(4) + (1 - lam) * torch.eye(4).flip(0)
    ours = mix_rows(Y[:4], mixing)
    assert torch.allclose(ours, mixup_target(Y[:4], 4, lam, multi_label=True), atol=1e-7)


def test_multilabel_label_smoothing_moves_targets_towards_half():
    assert smooth_multi_hot(torch.tensor([1.0, 0.0, 0.6]), 0.2).tolist() == pytest.approx(
        [0.9, 0.1, 0.58]
    )
    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    loss = trial_loss(MultiLabel("bce"), Recipe(label_smoothing=0.2), "none", [])
    expected = F.binary_cross_entropy_with_logits(logits, Y * 0.8 + 0.1)
    assert float(loss(logits, Y)) == pytest.approx(float(expected), rel=1e-6)
    plain = trial_loss(MultiLabel("bce"), Recipe(), "none", [])
    assert float(plain(logits, Y)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, Y)), rel=1e-6
    )


def test_fit_trains_a_multilabel_study_on_mixed_targets(registry):
    data = prepare_data(registry, "digit_pairs", image_size=16, task=MultiLabel())
    data = dataclasses.replace(
        data,
        train=Split(data.train.x[:48], data.train.y[:48], data.train.names[:48]),
        val=Split(data.val.x[:24], data.val.y[:24], data.val.names[:24]),
    )
    plain = Choice(backbone="test_resnet", lr=3e-3, epochs=1, batch_size=24)
    mixed = dataclasses.replace(plain, recipe=Recipe(mixup_alpha=0.4, label_smoothing=0.1))
    a = fit(plain, data, registry, device="cpu", seed=0)
    b = fit(mixed, data, registry, device="cpu", seed=0)
    # the same model, batches and steps: only the targets differ, so does the loss
    assert b.history[0].train_loss != a.history[0].train_loss
    assert 0 <= b.val["map"] <= 1 and set(b.val) >= {"map", "micro_f1", "subset_accuracy"}


# ---------------------------------------------------------------------------------------------
# the study file


BASE = {"name": "x", "data": {"source": "digit_pairs", "task": "multilabel"}}


def test_a_multilabel_study_takes_mixing_and_smoothing():
    search = {
        "mixup_alpha": [0.2, 0.4],
        "cutmix_alpha": 1.0,
        "mix_prob": [0.0, 1.0],
        "mix_switch_prob": 0.5,
        "label_smoothing": [0.0, 0.1],
    }
    config = config_from_dict({**BASE, "search": search})
    assert config.task.multilabel and config.search.mixup_alpha == [0.2, 0.4]
    assert config.search.cutmix_alpha == [1.0, 1.0] and config.search.label_smoothing == [0.0, 0.1]


def test_a_presets_imbalance_is_dropped_for_a_multilabel_study():
    config = config_from_dict({**BASE, "preset": "best"})
    assert config.search.imbalance is None  # not a searched dimension nobody uses
    assert config.search.mixup_alpha == [0.1, 0.8] and config.search.cutmix_alpha == [0.5, 1.0]
    single = config_from_dict({"name": "x", "preset": "best"})
    assert single.search.imbalance == ["none", "weighted", "focal", "sampler", "logit_adjust"]


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_multilabel_search_with_mixup_searched(tmp_path):
    study = pairs_study(
        tmp_path,
        60,
        "epochs = 1",
        "batch_size = 16",
        "mixup_alpha = [0.2, 0.4]",
        "cutmix_alpha = 1.0",
        "mix_prob = [0.5, 1.0]",
        "label_smoothing = 0.1",
    )
    result = run_main("search", str(study), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    trials = open_study(load_config(study)).get_trials()
    assert len(trials) == 2
    for trial in trials:
        assert 0.2 <= trial.params["mixup_alpha"] <= 0.4 and 0.5 <= trial.params["mix_prob"] <= 1
        assert "imbalance" not in trial.params and np.isfinite(trial.value)
    metrics = json.loads((tmp_path / "tiny" / "best" / "metrics.json").read_text())
    assert metrics["task"] == "multilabel"
    for name in ("map", "micro_f1", "macro_f1", "subset_accuracy"):
        low, high = metrics["test_interval"][name]
        assert low <= round(metrics["test"][name], 4) <= high
    assert "95 % intervals (bootstrap over test images): mAP [" in result.stdout
    board = run_main("report", str(study))
    assert board.returncode == 0, board.stderr
    low, high = metrics["test_interval"]["map"]
    assert f"map {metrics['test']['map']:.4f} [{low:.3f}, {high:.3f}]" in board.stdout
    page = (tmp_path / "tiny" / "report" / "index.html").read_text()
    assert "bootstrap over the test images for each metric" in page
