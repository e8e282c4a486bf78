"""Does transfer pay? The best trial of each weight source, retrained and tested side by side.

When ``[weights]`` lists several sources (``default = ["pretrain:digits:0-4", "none"]``) the
source is a study parameter (``weights``), so one study holds transferred and scratch trials.
It is compared, not optimized: :class:`AlternatingSampler` gives the sources turns by trial
number, so each gets the same share of the budget (a sampler left to choose would spend it on
whichever looked better after a few noisy trials, and the loser would be under-searched),
while the study's own sampler (TPE, GP, random) chooses everything else. After the search
retrains the overall best into ``best/``, the best trial of every other source is retrained
into ``models/trial-N/`` the same way (same split, same ``[retrain] on``, same seed rule), so
the report can put their test scores next to each other.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .config import StudyConfig
from .samplers import WrappingSampler

log = logging.getLogger("automl_tl")


class AlternatingSampler(WrappingSampler):
    """``base`` samples every parameter but ``param``, which cycles through ``choices``.

    Trial *n* gets ``choices[n % len(choices)]``, so each choice gets every k-th trial of the
    budget, with any number of workers. ``base`` never models ``param`` (it is left out of
    its relative search space) but learns from every trial's other parameters.
    """

    def __init__(self, base: optuna.samplers.BaseSampler, param: str, choices: list) -> None:
        super().__init__(base)
        self.param, self.choices = param, list(choices)

    def infer_relative_search_space(self, study, trial):
        space = self.base.infer_relative_search_space(study, trial)
        return {name: d for name, d in space.items() if name != self.param}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name == self.param:
            return self.choices[trial.number % len(self.choices)]
        return self.base.sample_independent(study, trial, param_name, param_distribution)


def alternate_weights(
    config: StudyConfig, sampler: optuna.samplers.BaseSampler
) -> optuna.samplers.BaseSampler:
    """``sampler``, wrapped so a searched ``weights`` source takes turns (else unchanged)."""
    for backbone in config.search.backbones:
        choices = config.weight_choices(backbone)
        if choices:  # every list in [weights] is the same list (config.py checks)
            if config.search.pruner != "none":
                warnings.warn(
                    f'[search] pruner = "{config.search.pruner}" compares trials of every weight '
                    "source at equal epochs, where pretrained ones lead early: it cuts scratch "
                    'trials short and flatters transfer. Set pruner = "none" for an even '
                    "comparison.",
                    stacklevel=2,
                )
            return AlternatingSampler(sampler, "weights", choices)
    return sampler


def weights_label(config: StudyConfig, params: dict[str, Any]) -> str:
    """A trial's weight source as written in ``[weights]`` (searched or fixed)."""
    if "weights" in params:
        return str(params["weights"])
    backbone = params.get("backbone", "")
    value = config.weights_entry(backbone)
    return value if isinstance(value, str) else "?"


def best_by_weights(
    config: StudyConfig, study: optuna.Study
) -> dict[str, optuna.trial.FrozenTrial]:
    """The best complete trial of each weight source (only sources with a complete trial)."""
    best: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        label = weights_label(config, t.params)
        if label not in best or t.value > best[label].value:
            best[label] = t
    return best


def searches_weights(config: StudyConfig) -> bool:
    """True when some backbone's weight source is a searched choice."""
    return any(config.weight_choices(b) for b in config.search.backbones)


def _model_dir(config: StudyConfig, trial_number: int) -> Path | None:
    """Where the retrained model of ``trial_number`` is, if it has been retrained."""
    for folder in (
        config.output_dir / "best",
        config.output_dir / "models" / f"trial-{trial_number}",
    ):
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        if metrics.get("trial") == trial_number:
            return folder
    return None


def comparison(config: StudyConfig, study: optuna.Study) -> list[dict[str, Any]] | None:
    """Per weight source: its best trial, val score and the retrained model's test metrics.

    None unless the study searched the weight source. Rows are sorted by test score (then val)
    so the first row is the source that paid most.
    """
    if not searches_weights(config):
        return None
    rows = []
    for label, t in best_by_weights(config, study).items():
        folder = _model_dir(config, t.number)
        test = None
        if folder is not None:
            metrics = json.loads((folder / "metrics.json").read_text())
            test = {k: v for k, v in metrics.get("test", {}).items() if k != "confusion_matrix"}
        rows.append(
            {
                "weights": label,
                "scratch": label == "none",
                "trial": t.number,
                "backbone": t.params.get("backbone"),
                "val": t.value,
                "trials": sum(
                    1
                    for x in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if weights_label(config, x.params) == label
                ),
                "test": test,
                "path": str(folder) if folder else None,
            }
        )
    metric = config.search.metric
    rows.sort(key=lambda r: ((r["test"] or {}).get(metric, -1.0), r["val"]), reverse=True)
    return rows


def retrain_per_weights(
    config: StudyConfig, registry, study: optuna.Study, splits, *, device: str = "auto"
) -> list[dict[str, Any]] | None:
    """Retrain the best trial of every weight source not yet retrained; return :func:`comparison`."""
    from .study import retrain

    if not searches_weights(config):
        return None
    for label, t in best_by_weights(config, study).items():
        if _model_dir(config, t.number) is None:
            log.info("retraining the best %r trial (#%d) for the comparison", label, t.number)
            retrain(
                config, registry, trial_number=t.number, device=device, study=study, splits=splits
            )
    return comparison(config, study)


def summary_lines(rows: list[dict[str, Any]], metric: str) -> list[str]:
    """One line per weight source, and the difference between the best transferred and scratch."""
    lines = []
    for r in rows:
        test = (r["test"] or {}).get(metric)
        lines.append(
            f"  {r['weights']:<28} best trial #{r['trial']} ({r['backbone']}, {r['trials']} "
            f"complete trials): val {r['val']:.4f}, test "
            + (f"{test:.4f}" if test is not None else "n/a (not retrained)")
        )
    scratch = [r for r in rows if r["scratch"] and r["test"]]
    transferred = [r for r in rows if not r["scratch"] and r["test"]]
    if scratch and transferred:
        diff = transferred[0]["test"][metric] - scratch[0]["test"][metric]
        lines.append(
            f"  transfer {'pays' if diff > 0 else 'does not pay'}: best transferred "
            f"({transferred[0]['weights']}) - scratch = {diff:+.4f} test {metric}"
        )
    return lines
