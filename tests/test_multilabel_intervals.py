"""95 % bootstrap intervals of the multi-label test metrics (issue 15): each resample scored
exactly as the point estimate, perfect predictions, seeding, width against test size."""

from __future__ import annotations

import numpy as np
import pytest

from automl_tl.scores import multilabel_intervals, resampled_multilabel_metrics
from automl_tl.tasks import MULTILABEL_METRICS, multilabel_metrics, tune_thresholds


def _predictions(n: int, labels: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy probabilities of ``n`` images, rounded to two decimals (many ties)."""
    rng = np.random.default_rng(seed)
    y = rng.random((n, labels)) < 0.3
    y[0] = True  # every label has a positive image
    probs = np.clip(0.35 * y + 0.65 * rng.random((n, labels)), 0, 1).round(2)
    return probs, y


def test_each_resample_scores_as_the_resampled_images_do():
    probs, y = _predictions(80)
    thresholds = tune_thresholds(probs, y)
    rng = np.random.default_rng(1)
    draws = rng.integers(0, 80, (6, 80))
    draws[0, :40] = 0  # a resample dominated by one image (labels missing from it)
    weights = np.stack([np.bincount(d, minlength=80) for d in draws]).astype(float)
    got = resampled_multilabel_metrics(probs, y, thresholds, weights)
    for row, index in enumerate(draws):
        expected = multilabel_metrics(probs[index], y[index], thresholds)
        for name in MULTILABEL_METRICS:
            assert got[name][row] == pytest.approx(expected[name], abs=1e-12), (row, name)


def test_perfect_predictions_give_one_one():
    _, y = _predictions(40)
    intervals = multilabel_intervals(y.astype(float), y, [0.5] * 5, samples=200)
    assert intervals == {name: [1.0, 1.0] for name in MULTILABEL_METRICS}


def test_intervals_hold_the_estimate_are_seeded_and_narrow_with_more_images():
    probs, y = _predictions(100)
    thresholds = tune_thresholds(probs, y)
    point = multilabel_metrics(probs, y, thresholds)
    a = multilabel_intervals(probs, y, thresholds, seed=3)
    assert a == multilabel_intervals(probs, y, thresholds, seed=3)
    assert a != multilabel_intervals(probs, y, thresholds, seed=4)
    for name in MULTILABEL_METRICS:
        low, high = a[name]
        assert low < point[name] < high, name
    big_probs, big_y = _predictions(1600)
    big = multilabel_intervals(big_probs, big_y, tune_thresholds(big_probs, big_y), seed=3)
    for name in MULTILABEL_METRICS:
        # 16x the images: about a quarter of the width
        assert big[name][1] - big[name][0] < 0.5 * (a[name][1] - a[name][0]), name


def test_thresholds_left_out_are_tuned_once_on_the_images():
    probs, y = _predictions(60)
    assert multilabel_intervals(probs, y, seed=0) == multilabel_intervals(
        probs, y, tune_thresholds(probs, y), seed=0
    )
    assert multilabel_intervals(probs[:0], y[:0]) == {m: [0.0, 1.0] for m in MULTILABEL_METRICS}
