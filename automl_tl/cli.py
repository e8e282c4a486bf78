"""The command line: ``automl-tl search | retrain | report | predict | plugins``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .errors import UserError

log = logging.getLogger("automl_tl")


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("automl_tl")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING if verbosity < 1 else optuna.logging.INFO)
    warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"


def _load(args: argparse.Namespace, **overrides: Any):
    from .config import load_config
    from .plugins import get_plugin_manager
    from .registry import Registry

    config = load_config(args.study, overrides)
    pm, infos = get_plugin_manager(
        [*config.plugins, *getattr(args, "plugin", [])], base_dir=config.base_dir
    )
    return config, pm, Registry.from_plugin_manager(pm)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "search.n_trials": getattr(args, "n_trials", None),
        "search.timeout": getattr(args, "timeout", None),
        "search.storage": getattr(args, "storage", None),
        "data.seed": getattr(args, "seed", None),
    }


def cmd_search(args: argparse.Namespace) -> int:
    from .study import search

    config, pm, registry = _load(args, **_overrides(args))
    device = args.device or config.search.device
    outcome = search(config, registry, pm, device=device, retrain_best=not args.no_retrain)
    if outcome.best is None:
        print(f"study {config.name}: no trial completed")
        return 1
    print(
        f"study {config.name}: {outcome.finished} trials finished ({outcome.ran} run now); best trial "
        f"#{outcome.best['number']} val {config.search.metric} {outcome.best['value']:.4f}"
    )
    if outcome.metrics:
        test = outcome.metrics["test"]
        print(
            f"retrained on {config.retrain.on}: test accuracy {test['accuracy']:.4f}, balanced "
            f"{test['balanced_accuracy']:.4f}, macro F1 {test['macro_f1']:.4f} -> {outcome.model_dir}"
        )
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from .study import retrain

    config, pm, registry = _load(args, **_overrides(args))
    directory, metrics = retrain(
        config, registry, trial_number=args.trial, device=args.device or config.search.device
    )
    test = metrics["test"]
    print(
        f"trial {metrics['trial']} retrained on {metrics['retrained_on']}: test accuracy {test['accuracy']:.4f} -> {directory}"
    )
    return 0


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    from tabulate import tabulate

    return tabulate([[r.get(c) for c in columns] for r in rows], headers=columns, floatfmt=".4g")


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c) for c in columns})
    return buf.getvalue()


def cmd_report(args: argparse.Namespace) -> int:
    from .config import load_config
    from .space import PARAM_NAMES
    from .study import report

    config = load_config(args.study, {"search.storage": args.storage})
    data = report(config)
    if not args.no_files:  # plots + index.html in <output>/report/; stdout stays the data
        from .report import write_report_files

        data["report"] = write_report_files(config, data, args.plugin, args.device or "cpu")
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return 0
    rows = []
    for t in sorted(data["trials"], key=lambda t: (t["value"] is None, -(t["value"] or 0))):
        rows.append(
            {
                "trial": t["number"],
                "state": t["state"],
                config.search.metric: t["value"],
                **{k: t["params"].get(k) for k in PARAM_NAMES},
                "epochs": t["epochs_run"],
                "seconds": t["duration_s"],
                "fail_reason": t["fail_reason"],
            }
        )
    columns = [
        "trial",
        "state",
        config.search.metric,
        *PARAM_NAMES,
        "epochs",
        "seconds",
        "fail_reason",
    ]
    if args.format == "csv":
        sys.stdout.write(_csv(rows, columns))
        return 0
    print(f"study {data['study']} ({len(rows)} trials, metric {data['metric']})")
    print(_table(rows, columns))
    if data.get("best_model"):
        bm = data["best_model"]
        print(
            f"\nbest model (trial {bm['trial']}): test "
            + ", ".join(f"{k} {v:.4f}" for k, v in bm["test"].items())
            + f" -> {bm['path']}"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .export import load_model, predict_paths

    model = load_model(args.model, device=args.device or "cpu")
    rows = predict_paths(model, args.paths, top_k=args.top_k)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        sys.stdout.write(
            _csv(
                rows,
                ["path", "label", "score"] + (["error"] if any("error" in r for r in rows) else []),
            )
        )
    else:
        print(_table(rows, ["path", "label", "score"]))
    return 0 if all(r.get("label") is not None for r in rows) else 1


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import get_plugin_manager
    from .registry import KINDS, Registry

    pm, infos = get_plugin_manager(args.plugin)
    registry = Registry.from_plugin_manager(pm)
    data = {
        kind: [{"name": n, "plugin": registry.plugin_of(kind, n)} for n in registry.names(kind)]
        for kind in KINDS
    }
    if args.format == "json":
        data["plugins"] = [
            {"name": i.name, "source": i.source, "version": i.version, "location": i.location}
            for i in infos.values()
        ]
        print(json.dumps(data, indent=2))
        return 0
    for info in infos.values():
        counts = {kind: sum(1 for e in data[kind] if e["plugin"] == info.name) for kind in KINDS}
        version = f" {info.version}" if info.version else ""
        print(f"{info.name}{version} [{info.source}]")
        for kind, count in counts.items():
            if not count:
                continue
            names = [e["name"] for e in data[kind] if e["plugin"] == info.name]
            shown = (
                ", ".join(names)
                if len(names) <= 12
                else ", ".join(names[:6]) + f", … ({count} in all)"
            )
            print(f"  {kind.replace('_', ' ')}: {shown}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="automl-tl", description="Automated transfer learning for image classification."
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__import__('automl_tl').__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, study: bool = True) -> None:
        if study:
            p.add_argument("study", help="study file (.toml), e.g. studies/digits.toml")
        p.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity", default=0)
        p.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity")

    p = sub.add_parser("search", help="search, then retrain and export the best configuration")
    common(p)
    p.add_argument(
        "--n-trials", type=int, help="override [search] n_trials (finished trials in the study)"
    )
    p.add_argument("--timeout", type=float, help="override [search] timeout, seconds")
    p.add_argument("--storage", help="Optuna storage URL (default: SQLite in the study folder)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default [search] device: auto)")
    p.add_argument("--seed", type=int, help="override [data] seed")
    p.add_argument(
        "--plugin", action="append", default=[], help="extra plugin module or .py file (repeatable)"
    )
    p.add_argument(
        "--no-retrain", action="store_true", help="leave the retrain to `automl-tl retrain`"
    )
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "retrain", help="retrain the best (or --trial N) configuration and export it"
    )
    common(p)
    p.add_argument("--trial", type=int, help="trial number (default: the best)")
    p.add_argument("--storage")
    p.add_argument("--device")
    p.add_argument("--seed", type=int)
    p.add_argument("--plugin", action="append", default=[])
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser(
        "report", help="leaderboard of every trial; plots and index.html in <output>/report/"
    )
    common(p)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--storage")
    p.add_argument(
        "--no-files", action="store_true", help="print only; don't write <output>/report/"
    )
    p.add_argument("--device", help="where the best model predicts the test split (cpu)")
    p.add_argument("--plugin", action="append", default=[])
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="predict labels of images with an exported model")
    common(p, study=False)
    p.add_argument("model", help="exported model folder, e.g. studies/digits/best")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--device")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("plugins", help="list plugins and what they register")
    common(p, study=False)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--plugin", action="append", default=[])
    p.set_defaults(func=cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbosity)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "interrupted; completed trials are kept — run the same command again to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
