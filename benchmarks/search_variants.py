#!/usr/bin/env python
"""Variants of the study's search, scored the way ``run.py --only search`` scores the default.

    python benchmarks/search_variants.py --seeds 5 --trials 12 --epochs 3 default portfolio

For each seed, random search runs once (its trace is kept in ``--cache``, so each variant
is paired with the very same random run); then each variant's sampler + pruner runs until a
completed trial reaches random's best or the cap (2x random's epochs), exactly as
``bench_search`` does. A variant is a function of the study config returning (sampler,
pruner); they are defined in ``VARIANTS`` below. Exploratory: RESULTS.md records what it found.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import optuna  # noqa: E402
import run  # noqa: E402  (benchmarks/run.py)
import torch  # noqa: E402

from automl_tl import study as study_mod  # noqa: E402
from automl_tl.portfolio import portfolio  # noqa: E402
from automl_tl.samplers import PortfolioSampler  # noqa: E402


def _tpe(config, n_startup: int, **kw):
    return optuna.samplers.TPESampler(
        multivariate=True,
        group=True,
        constant_liar=True,
        seed=config.data.seed,
        n_startup_trials=n_startup,
        **kw,
    )


def _hyperband(config, min_resource: int = 1, reduction_factor: int = 3, bootstrap: int = 0):
    return optuna.pruners.HyperbandPruner(
        min_resource=min_resource,
        max_resource=config.search.epochs,
        reduction_factor=reduction_factor,
        bootstrap_count=bootstrap,
    )


def _startup(config) -> int:
    return max(4, min(10, config.search.n_trials // 3))


def _with_portfolio(config, sampler):
    return PortfolioSampler(sampler, portfolio(config, _startup(config)))


VARIANTS = {
    # what the study does by default (study.make_sampler / make_pruner, whatever they are now)
    "default": lambda c: (study_mod.make_sampler(c), study_mod.make_pruner(c)),
    # the study as it was before [search] portfolio: TPE(startup = n/3 in [4, 10]) + Hyperband(1, 3)
    "tpe_hb": lambda c: (_tpe(c, _startup(c)), _hyperband(c)),
    "tpe_startup2_hb": lambda c: (_tpe(c, 2), _hyperband(c)),
    "tpe_independent_hb": lambda c: (
        optuna.samplers.TPESampler(seed=c.data.seed, n_startup_trials=_startup(c)),
        _hyperband(c),
    ),
    "portfolio_tpe_hb": lambda c: (_with_portfolio(c, _tpe(c, _startup(c))), _hyperband(c)),
    "portfolio_tpe_nopruner": lambda c: (
        _with_portfolio(c, _tpe(c, _startup(c))),
        optuna.pruners.NopPruner(),
    ),
    "portfolio_tpe_hb_min2": lambda c: (
        _with_portfolio(c, _tpe(c, _startup(c))),
        _hyperband(c, min_resource=2),
    ),
    # control: is it the portfolio or the model? random search after the same portfolio
    "portfolio_random": lambda c: (
        _with_portfolio(c, optuna.samplers.RandomSampler(seed=c.data.seed)),
        optuna.pruners.NopPruner(),
    ),
    "portfolio_random_hb": lambda c: (
        _with_portfolio(c, optuna.samplers.RandomSampler(seed=c.data.seed)),
        _hyperband(c),
    ),
    "qmc_tpe_hb": lambda c: (
        _QMCStart(
            optuna.samplers.QMCSampler(seed=c.data.seed, scramble=True),
            _tpe(c, _startup(c)),
            _startup(c),
        ),
        _hyperband(c),
    ),
}


class _QMCStart(optuna.samplers.BaseSampler):
    """Scrambled Sobol for the first ``n`` trials (numerical parameters; categorical ones come
    from QMC's independent sampler), then ``tpe``."""

    def __init__(self, qmc, tpe, n: int) -> None:
        self.qmc, self.tpe, self.n = qmc, tpe, n

    def _pick(self, trial):
        return self.qmc if trial.number < self.n else self.tpe

    def infer_relative_search_space(self, study, trial):
        return self._pick(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._pick(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, name, dist):
        return self._pick(trial).sample_independent(study, trial, name, dist)

    def before_trial(self, study, trial) -> None:
        self._pick(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._pick(trial).after_trial(study, trial, state, values)


def _random_trace(cache: Path, key: str, make):
    data = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in data:
        data[key] = make()
        cache.write_text(json.dumps(data))
    return [tuple(x) for x in data[key]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-images", type=int, default=600)
    p.add_argument("--cache", type=Path, default=Path("/tmp/automl-tl-random-traces.json"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("automl_tl").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    with contextlib.suppress(ImportError):
        from optuna.exceptions import ExperimentalWarning

        warnings.filterwarnings("ignore", category=ExperimentalWarning)
    torch.set_num_threads(1)
    device = torch.device("cpu")

    from automl_tl.plugins import get_plugin_manager

    pm, _ = get_plugin_manager()
    registry = run.registry_for()
    profile = dataclasses.replace(
        run.PROFILES["quick"],
        search_trials=args.trials,
        search_epochs=args.epochs,
        search_train_images=args.train_images,
    )
    splits = run.digits_at(registry, 32)
    splits = dataclasses.replace(splits, train=run._take(splits.train, args.train_images))
    budget = args.trials * args.epochs
    cap = int(profile.search_cap * budget)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="automl-tl-variants-") as tmp_name:
        tmp = Path(tmp_name)
        for variant in args.variants:
            per_seed = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                random_cfg = run._search_config(tmp, seed, "random", "none", profile)
                n = args.trials

                def make_random(cfg=random_cfg, n=n):
                    return run._run_search(
                        cfg, registry, pm, splits, device, lambda t, s: t.number + 1 >= n
                    )

                key = f"{seed}-{args.trials}x{args.epochs}-{args.train_images}"
                trace = _random_trace(args.cache, key, make_random)
                target = max(v for _, v in trace if v is not None)
                random_epochs = next(e for e, v in trace if v is not None and v >= target)

                cfg = run._search_config(tmp, seed, "tpe", "hyperband", profile)
                sampler, pruner = VARIANTS[variant](cfg)
                saved = study_mod.make_sampler, study_mod.make_pruner
                study_mod.make_sampler = lambda c, s=sampler: s
                study_mod.make_pruner = lambda c, p=pruner: p
                try:
                    tpe_trace = run._run_search(
                        cfg,
                        registry,
                        pm,
                        splits,
                        device,
                        lambda t, s, target=target: (
                            (t.value is not None and t.value >= target) or s >= cap
                        ),
                    )
                finally:
                    study_mod.make_sampler, study_mod.make_pruner = saved
                reached = [e for e, v in tpe_trace if v is not None and v >= target]
                epochs = reached[0] if reached else None
                ratio = random_epochs / epochs if epochs else random_epochs / cap
                best = max((v for _, v in tpe_trace if v is not None), default=float("nan"))
                per_seed.append(
                    {
                        "seed": seed,
                        "random_best": round(target, 4),
                        "random_epochs": random_epochs,
                        "epochs": epochs,
                        "trials": len(tpe_trace),
                        "best": round(best, 4),
                        "ratio": round(ratio, 3),
                    }
                )
                print(variant, per_seed[-1], flush=True)
            ratios = [s["ratio"] for s in per_seed]
            out[variant] = {"mean": round(statistics.mean(ratios), 3), "seeds": per_seed}
            print(
                f"== {variant} {args.trials}x{args.epochs}: mean {statistics.mean(ratios):.3f} "
                f"(median {statistics.median(ratios):.2f}) per seed "
                + ", ".join(
                    f"{r:.2f}{'' if s['epochs'] else '*'}" for r, s in zip(ratios, per_seed)
                ),
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
