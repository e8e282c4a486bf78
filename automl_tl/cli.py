"""The command line: ``automl-tl search | retrain | report | predict | plugins``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .errors import UserError

log = logging.getLogger("automl_tl")


#: C0/C1 control characters (ESC starts terminal escape sequences), bidi overrides, and lone
#: surrogates (undecodable bytes of a file name, kept by Python as U+DC80…U+DCFF)
_UNPRINTABLE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NEWLINE = re.compile("\n")
#: a spreadsheet runs a cell that starts with one of these as a formula
_FORMULA_START = ("=", "+", "-", "@")  # (tab and CR are escaped by printable() first)


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a non-UTF-8 file name (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, newlines: bool = False) -> str:
    """``text`` safe to print on a terminal: control characters, terminal escapes, bidi
    overrides and undecodable bytes of file names shown as ``\\xNN`` (newlines kept if asked)."""
    text = _UNPRINTABLE.sub(lambda m: _escape(m.group()), text)
    return text if newlines else _NEWLINE.sub("\\\\n", text)


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: printable, and a leading ``= + - @`` quoted
    with ``'`` so a file or class name is never run as a formula. Numbers pass unchanged."""
    if not isinstance(value, str):
        return value
    value = printable(value)
    return "'" + value if value.startswith(_FORMULA_START) else value


class _PrintableFilter(logging.Filter):
    """Log records reach a terminal: a file or class name's escape sequences are shown, not
    run (newlines of multi-line messages kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = printable(message, newlines=True)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    from .storage import RedactFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactFilter())
    handler.addFilter(_PrintableFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("automl_tl")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING if verbosity < 1 else optuna.logging.INFO)
    for optuna_handler in logging.getLogger("optuna").handlers:  # Optuna's own lines too
        optuna_handler.addFilter(RedactFilter())
    warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"


def _load(args: argparse.Namespace, **overrides: Any):
    from .config import load_config
    from .plugins import get_plugin_manager
    from .registry import Registry

    config = load_config(args.study, overrides)
    # the study's plugin files are absolute (config.py); --plugin paths are the cwd's
    pm, infos = get_plugin_manager([*config.plugins, *getattr(args, "plugin", [])])
    return config, pm, Registry.from_plugin_manager(pm)


def _device(name: str | None) -> str:
    """The device a command runs on, checked before anything starts (one message if bad)."""
    from .train import resolve_device

    resolve_device(name)
    return name or "auto"


def _storage_arg(args: argparse.Namespace) -> str | None:
    """``--storage``, else the ``AUTOML_TL_STORAGE`` environment variable (how ``--workers``
    hands a URL with a password to its workers: ``ps`` shows argv, not the environment)."""
    import os

    from .storage import STORAGE_ENV

    return getattr(args, "storage", None) or os.environ.get(STORAGE_ENV) or None


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "search.n_trials": getattr(args, "n_trials", None),
        "search.timeout": getattr(args, "timeout", None),
        "search.storage": _storage_arg(args),
        "data.seed": getattr(args, "seed", None),
        "preset": getattr(args, "preset", None),
    }


def _workers_plan(args: argparse.Namespace, config, registry, device: str) -> tuple[int, Any]:
    """(workers, trials per GPU) for ``--workers`` / ``--trials-per-gpu`` on this machine."""
    from .train import resolve_device
    from .workers import plan_workers, study_trials_per_gpu, visible_gpus

    cuda = resolve_device(device).type == "cuda"
    return plan_workers(
        args.workers,
        args.trials_per_gpu,
        cuda=cuda,
        gpus=visible_gpus() if cuda else [],
        auto_k=lambda: study_trials_per_gpu(config, registry),
    )


def cmd_search(args: argparse.Namespace) -> int:
    from .budget import search_deadline
    from .search import search
    from .trials import Direction
    from .workers import apply_memory_fraction, die_with_parent

    die_with_parent()  # a worker of `--workers N`: never outlive the parent
    apply_memory_fraction()  # a worker sharing its GPU (--trials-per-gpu): its share only
    config, pm, registry = _load(args, **_overrides(args))
    device = _device(args.device or config.search.device)
    deadline = search_deadline(args.deadline)  # --deadline, or the Slurm job's end
    workers, per_gpu = _workers_plan(args, config, registry, device)
    if workers != 1:
        return _search_with_workers(args, config, pm, registry, device, workers, per_gpu, deadline)
    from .progress import show_progress

    with show_progress(config, args.verbosity, pm=pm):  # live lines on a terminal
        outcome = search(
            config,
            registry,
            pm,
            device=device,
            retrain_best=not args.no_retrain,
            deadline=deadline,
            race=args.race,
        )
    _print_deadline_skips(outcome.skipped)
    if outcome.best is None:
        print(f"study {config.name}: no trial completed")
        return 1
    print(
        f"study {config.name}: {outcome.finished} trials finished ({outcome.ran} run now); best trial "
        f"#{outcome.best['number']} val {config.search.metric} {outcome.best['value']:.4f}"
    )
    if outcome.metrics:
        _print_retrained(config, outcome.metrics, outcome.model_dir)
    _print_selection(outcome.selection)
    _print_weights_comparison(
        outcome.comparison, config.search.metric, Direction.of(outcome.study).name
    )
    return 0


def _interval(metrics: dict[str, Any], key: str) -> str:
    low_high = (metrics.get("test_interval") or {}).get(key)
    return f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else ""


def _print_retrained(config, metrics: dict[str, Any], directory) -> None:
    """The retrained model's test scores with their 95 % intervals, and its calibration."""
    test = metrics["test"]
    if metrics.get("task") == "multilabel":
        tuned = (metrics.get("thresholds") or {}).get("tuned_on")
        print(
            f"retrained on {config.retrain.on}: test mAP {test['map']:.4f}, micro F1 "
            f"{test['micro_f1']:.4f}, macro F1 {test['macro_f1']:.4f}, subset accuracy "
            f"{test['subset_accuracy']:.4f} -> {directory}"
        )
        print(
            f"  trial #{metrics['trial']}; F1 at per-label thresholds tuned on {tuned} "
            f"(micro F1 at 0.5: {test['micro_f1_at_0.5']:.4f}); {metrics.get('test_images', '?')} "
            "test images"
        )
        if metrics.get("test_interval"):
            print(
                "  95 % intervals (bootstrap over test images): "
                f"mAP{_interval(metrics, 'map')}, micro F1{_interval(metrics, 'micro_f1')}, "
                f"macro F1{_interval(metrics, 'macro_f1')}, subset accuracy"
                f"{_interval(metrics, 'subset_accuracy')}"
            )
        return
    print(
        f"retrained on {config.retrain.on}: test accuracy {test['accuracy']:.4f}, balanced "
        f"{test['balanced_accuracy']:.4f}, macro F1 {test['macro_f1']:.4f} -> {directory}"
    )
    if metrics.get("test_interval"):
        print(
            f"  trial #{metrics['trial']}; 95 % intervals on {metrics.get('test_images', '?')} "
            f"test images: accuracy{_interval(metrics, 'accuracy')}, balanced"
            f"{_interval(metrics, 'balanced_accuracy')}, macro F1{_interval(metrics, 'macro_f1')}"
        )
    lat = metrics.get("latency")
    if lat:
        t = lat["target"]
        print(
            f"latency on {t['device']} ({t['runtime']}, {t['threads']} thread(s), batch "
            f"{t['batch_size']}): {lat['export_ms']:.3f} ms the export timed on its own, "
            f"{lat['trial_ms']:.3f} ms its trial (ratio {lat['ratio']:.2f})"
        )
    cal = metrics.get("calibration")
    if cal and cal.get("fitted_on"):
        print(
            f"calibrated: temperature {cal['temperature']:.3f} (fitted on {cal['fitted_on']}); "
            f"expected calibration error on test {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}"
        )


def _print_selection(data: dict[str, Any] | None) -> None:
    """The race (finalists, their scores, the winner) and single vs ensemble vs soup."""
    if not data:
        return
    sel = data["selection"]
    if sel["runs"]:
        how = f"{sel['folds']} folds of train+val" if sel["folds"] else "the study's split"
        print(
            f"race: {len(sel['finalists'])} finalists within ±{sel['standard_error']:.3f} of the "
            f"best, {sel['runs']} extra runs ({how}, {sel['repeats']} repeat(s); budget "
            f"{sel['budget']}, {sel['run_seconds']:.0f}s), chosen by {sel['rule']}:"
        )
        for r in sel["finalists"]:
            mark = "*" if r["trial"] == sel["winner"] else " "
            print(
                f"  {mark} trial #{r['trial']:<4} search {r['value']:.4f}  mean {r['mean']:.4f}  "
                f"lcb {r['lcb']:.4f}  ({len(r['scores'])} scores)"
            )
    for note in sel.get("notes") or []:
        print(f"  note: {note}")
    rows = [("single best", data.get("single")), ("ensemble", data.get("ensemble"))]
    rows.append(("soup", data.get("soup")))
    for label, row in rows:
        if not row:
            continue
        print(
            f"  {label:<12} test accuracy {row['test']['accuracy']:.4f}"
            f"{_interval(row, 'accuracy')}  ECE {row['ece']:.3f}  {row['ms_per_image']:.2f} ms/image"
            f"  {row['members']} model(s), {row['parameters']:,} parameters"
        )


def _print_weights_comparison(
    rows: list[dict[str, Any]] | None, metric: str, direction: str = "maximize"
) -> None:
    """Transferred vs scratch (when [weights] is searched): one line per weight source, and
    the difference between the best transferred and the best scratch model."""
    if not rows:
        return
    from .leaderboard import transfer_difference
    from .trials import Direction

    print("best per weight source (retrained, same budget):")
    for r in rows:
        test = (r["test"] or {}).get(metric)
        print(
            f"  {r['weights']:<28} best trial #{r['trial']} ({r['backbone']}, {r['trials']} "
            f"complete trials): val {r['val']:.4f}, test "
            + (f"{test:.4f}" if test is not None else "n/a (not retrained)")
        )
    diff = transfer_difference(rows, metric, Direction.named(direction))
    if diff is not None:
        d = diff["difference"]
        verdict = "pays" if diff["pays"] else "does not pay"
        if diff.get("inside_noise"):
            tail = (
                f", inside the noise (95 % interval ±{diff['noise']:.4f}): "
                "not a difference these test images can show"
            )
        else:
            tail = f" (95 % interval ±{diff['noise']:.4f})" if "noise" in diff else ""
        print(
            f"  transfer {verdict}: best transferred ({diff['weights']}) - scratch = {d:+.4f} "
            f"test {metric}{tail}"
        )


def _print_deadline_skips(skipped: list[dict[str, Any]]) -> None:
    if not skipped:
        return
    print(f"deadline: {len(skipped)} trial{'s' if len(skipped) != 1 else ''} not started:")
    for row in skipped:
        print(f"  #{row['number']}: {row['reason']}")


def _search_with_workers(
    args: argparse.Namespace,
    config,
    pm,
    registry,
    device: str,
    workers: int,
    per_gpu: int | None = None,
    deadline=None,
) -> int:
    """``search --workers N``: N local worker processes on one study (see automl_tl.workers)."""
    from .budget import deadline_skips
    from .leaderboard import best_summary, count_finished
    from .search import announce_export
    from .storage import storage_for_workers, url_to_env
    from .trials import Direction
    from .workers import retrain_after_search, retrain_slots, run_workers

    config.search.storage = storage_for_workers(config, workers)
    child_url, child_env = url_to_env(config.search.storage)  # a password: off the workers' argv

    def same_study(slot) -> list[str]:  # what every child of this search is given
        argv = ["--storage", child_url] if child_url else []
        argv += ["--device", "cuda" if slot.gpu else "cpu"]
        argv += ["--seed", str(args.seed)] if args.seed is not None else []
        argv += ["--preset", args.preset] if args.preset else []
        for plugin in args.plugin:
            argv += ["--plugin", plugin]
        return argv + ({-1: ["-q"], 0: []}.get(args.verbosity, ["-v"]))

    def child_args(slot) -> list[str]:
        argv = ["search", str(config.path), "--workers", "1", "--no-retrain"]
        # the race's runs are spread over the workers (their GPUs); the parent retrains
        argv += [] if args.no_retrain else ["--race"]
        for flag, value in (("--n-trials", args.n_trials), ("--timeout", args.timeout)):
            argv += [flag, str(value)] if value is not None else []
        argv += ["--deadline", deadline.iso()] if deadline is not None else []
        return argv + same_study(slot)

    from .progress import show_progress

    with show_progress(config, args.verbosity, workers=workers):  # one line per worker
        result = run_workers(
            config,
            registry,
            workers,
            device=device,
            child_args=child_args,
            env=child_env,
            per_gpu=per_gpu,
        )
    for w in result.workers:
        print(f"worker {w.slot.index} ({w.slot.label}, pid {w.pid}): {w.describe()}")
    finished, best = count_finished(result.study), best_summary(result.study)
    if best is None:
        print(f"study {config.name}: no trial completed")
        return 1
    budget = config.search.n_trials
    print(
        f"study {config.name}: {finished} of {budget} trials finished, {workers} workers; best "
        f"trial #{best['number']} val {config.search.metric} {best['value']:.4f}"
    )
    _print_deadline_skips(deadline_skips(result.study))
    if not args.no_retrain and (finished >= budget or not result.failed):
        from .data import load_splits

        splits = load_splits(config, registry)  # from the cache the workers shared

        def retrain_args(slot, jobs) -> list[str]:  # a retrain worker: its share of the retrains
            jobs_json = json.dumps([j.to_json() for j in jobs])
            return ["retrain", str(config.path), "--jobs", jobs_json, *same_study(slot)]

        # the race's choice, the winner's retrain, the ensemble and the soup
        # (automl_tl.selection), each weight source's best: side by side over the GPUs
        retrains = retrain_after_search(
            config,
            registry,
            result.study,
            splits,
            device=device,
            slots=retrain_slots(device),
            child_args=retrain_args,
            env=child_env,
        )
        for job, why in retrains.failed:
            print(f"error: the retrain of {job.describe()} failed: {why}", file=sys.stderr)
        if retrains.failed:
            print(
                f"  the study and the other retrains are kept; `automl-tl retrain {config.path} "
                "--trial N` retrains one again",
                file=sys.stderr,
            )
        if retrains.retrained is not None:
            directory, metrics = retrains.retrained
            announce_export(pm, config, directory, metrics)
            _print_retrained(config, metrics, directory)
            _print_selection(retrains.selection)
        if retrains.retrained is not None or retrains.failed:
            direction = Direction.of(result.study).name
            _print_weights_comparison(retrains.comparison, config.search.metric, direction)
        if retrains.failed:
            return 1
    return 1 if result.failed else 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from .config import check_named_weights
    from .retrain import retrain, retrain_chosen
    from .search import announce_export
    from .selection import recorded_selection

    config, pm, registry = _load(args, **_overrides(args))
    check_named_weights(config, registry)  # a [weights] typo: one message, before training
    device = _device(args.device or config.search.device)
    if args.jobs is not None:  # a retrain worker of `search --workers`: its share
        return _retrain_jobs(config, registry, args.jobs, device)
    chosen = None if args.trial is not None else recorded_selection(config)
    if chosen is not None:  # the search raced its finalists: best/ is the race's winner
        directory, metrics = retrain_chosen(config, registry, chosen, device=device)
    else:
        directory, metrics = retrain(config, registry, trial_number=args.trial, device=device)
    announce_export(pm, config, directory, metrics)
    test = metrics["test"]
    name, key = ("mAP", "map") if metrics.get("task") == "multilabel" else ("accuracy", "accuracy")
    print(
        f"trial {metrics['trial']} retrained on {metrics['retrained_on']}: test {name} {test[key]:.4f} -> {directory}"
    )
    return 0


def _retrain_jobs(config, registry, jobs_json: str, device: str) -> int:
    """``retrain --jobs JSON`` (a retrain worker that ``search --workers`` starts on a GPU
    after the search): its share of the retrains; the parent collects their results."""
    from ._util import failure_reason
    from .workers import RetrainJob, apply_memory_fraction, die_with_parent, run_retrain_jobs

    die_with_parent()  # never outlive the search that started it
    apply_memory_fraction()
    jobs = [RetrainJob.from_json(j) for j in json.loads(jobs_json)]
    failed = run_retrain_jobs(config, registry, jobs, device=device)
    for job, exc in failed:
        print(f"error: retrain of trial {job.trial} failed: {failure_reason(exc)}", file=sys.stderr)
    return 1 if failed else 0


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    from tabulate import tabulate

    def cell(value: Any) -> Any:
        return printable(value) if isinstance(value, str) else value

    return tabulate(
        [[cell(r.get(c)) for c in columns] for r in rows], headers=columns, floatfmt=".4g"
    )


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: spreadsheet_safe(r.get(c)) for c in columns})
    return buf.getvalue()


def cmd_report(args: argparse.Namespace) -> int:
    from .config import load_config
    from .leaderboard import leaderboard
    from .space import SHOWN_PARAMS, effective_params
    from .trials import Direction

    config = load_config(args.study, {"search.storage": _storage_arg(args)})
    device = _device(args.device or "cpu")
    data = leaderboard(config)
    if not args.no_files:  # plots + index.html in <output>/report/; stdout stays the data
        from .report import write_report_files

        data["report"] = write_report_files(config, data, args.plugin, device)
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return 0
    rows = []
    direction = Direction.named(data.get("direction"))  # best first: lower for a cost
    for t in sorted(data["trials"], key=lambda t: direction.key(t["value"])):
        rows.append(
            {
                "trial": t["number"],
                "state": t["state"],
                config.search.metric: t["value"],
                **{m: (t.get("measured") or {}).get(m) for m in config.search.measures},
                **{k: effective_params(t["params"]).get(k) for k in SHOWN_PARAMS},
                "weights": t.get("weights"),  # resolved: fixed sources too, a file's sha256
                "epochs": t["epochs_run"],
                "seconds": t["duration_s"],
                "fail_reason": t["fail_reason"],
                "prior": t.get("prior"),
            }
        )
    columns = [
        "trial",
        "state",
        config.search.metric,
        *config.search.measures,
        *SHOWN_PARAMS,
        "epochs",
        "seconds",
        "fail_reason",
    ]
    if any(r["prior"] for r in rows):  # the team prior chose some trials: say which
        columns.append("prior")
    if args.format == "csv":
        sys.stdout.write(_csv(rows, columns))
        return 0
    lower = ", lower is better" if not direction.higher_is_better else ""
    print(f"study {data['study']} ({len(rows)} trials, metric {data['metric']}{lower})")
    print(_table(rows, columns))
    skipped = data.get("skipped_images") or []
    if skipped:
        shown = ", ".join(f"{s['path']} ({s['reason']})" for s in skipped[:5])
        more = f", … ({len(skipped)} in all)" if len(skipped) > 5 else ""
        print(
            f'\nskipped {len(skipped)} unreadable image(s) (on_bad_image = "skip"): {shown}{more}'
        )
    if data.get("dead_at_chance"):
        print(
            f"\n{data['dead_at_chance']} trial(s) pruned at chance (the dead-trial guard: "
            "<= 1.5x chance from epoch 2 while another trial had left it)"
        )
    if data.get("selection_note"):
        print(f"\nnote: {data['selection_note']}")
    if data.get("pareto") is not None:
        print(
            f"\nPareto front ({', '.join(data['objectives'])}): trials "
            + (", ".join(map(str, data["pareto"])) or "none yet")
        )
    if data.get("best_model"):
        bm = data["best_model"]
        print(
            f"\nbest model (trial {bm['trial']}): test "
            + ", ".join(f"{k} {v:.4f}{_interval(bm, k)}" for k, v in bm["test"].items())
            + f" -> {bm['path']}"
        )
    if data.get("selection"):
        _print_selection(data["selection"])
    if data.get("weights"):
        print()
        _print_weights_comparison(data["weights"], config.search.metric, direction.name)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .export import load_model, predict_paths

    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k {args.top_k}: give 1 or more labels per image")
    # installed plugins load by themselves; a file or module plugin comes with --plugin
    model = load_model(args.model, device=_device(args.device or "cpu"), plugins=args.plugin)
    rows = predict_paths(model, args.paths, top_k=args.top_k)
    if model.multilabel:
        return _print_multilabel_predictions(rows, args.format, model.label_separator)
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


def _print_multilabel_predictions(rows: list[dict], fmt: str, separator: str) -> int:
    """A multi-label model's predictions: path, labels, scores; in CSV and the table the
    labels and scores of an image are one cell each, joined by the study's label
    separator (a space by default, like a multi-label CSV's labels cell)."""
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    else:
        flat = [
            {
                **r,
                "labels": separator.join(r.get("labels") or []),
                "scores": separator.join(f"{s:.6f}" for s in r.get("scores") or []),
            }
            for r in rows
        ]
        columns = ["path", "labels", "scores"] + (
            ["error"] if any("error" in r for r in rows) else []
        )
        if fmt == "csv":
            sys.stdout.write(_csv(flat, columns))
        else:
            print(_table(flat, columns))
    return 0 if all("error" not in r for r in rows) else 1


def cmd_check_data(args: argparse.Namespace) -> int:
    from .config import config_from_dict, load_config
    from .data import check_source, parse_source
    from .plugins import registry_needing

    overrides = {
        "data.image_size": args.image_size,
        "data.seed": args.seed,
        "data.val_fraction": args.val_fraction,
        "data.test_fraction": args.test_fraction,
    }
    if args.source.endswith(".toml"):
        config = load_config(args.source, overrides)
    else:  # a source: validate the settings exactly as a study file's [data]
        data = {"source": args.source}
        data.update({k.split(".")[1]: v for k, v in overrides.items() if v is not None})
        config = config_from_dict({"name": "check-data", "data": data})
    d = config.data
    # the study file's plugins run only if its dataset source comes from one of them
    registry = registry_needing(
        config.plugins, args.plugin, {"datasets": [parse_source(d.source)[0]]}
    )
    result = check_source(
        registry,
        d.source,
        image_size=d.image_size,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=d.seed,
        base_dir=config.base_dir,
        orientation=d.orientation,
        label_separator=d.label_separator,
    )
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(printable(_format_data_check(result), newlines=True))
    return 0 if result.usable else 1


def _format_data_check(check) -> str:
    """``check-data``'s text: counts per class and split, sizes, modes, problems."""
    from tabulate import tabulate

    from .data import SPLIT_NAMES

    s = check.settings
    multilabel = s.get("task") == "multilabel"
    lines = [
        f"{check.source}: {check.files} image files, {len(check.bad)} unreadable, "
        + (
            f"{len(check.class_names)} labels (multi-label: the counts are images per label)"
            if multilabel
            else f"{len(check.class_names)} classes"
        )
    ]
    if check.split_kind == "stratified":
        how = "iterative stratification" if multilabel else "stratified"
        lines.append(
            f"split: {how}, seed {s.get('seed')} (val {s.get('val_fraction')}, "
            f"test {s.get('test_fraction')})"
        )
    else:
        lines.append(f"split: {check.split_kind}")
    if check.class_names:
        columns = [c for c in (*SPLIT_NAMES, "unsplit") if c in check.counts]
        rows = [
            [cls, *(check.counts[c].get(cls, 0) for c in columns)]
            + [sum(check.counts[c].get(cls, 0) for c in columns)]
            for cls in check.class_names
        ]
        rows.append(["(all)", *(sum(r[i + 1] for r in rows) for i in range(len(columns) + 1))])
        lines += ["", tabulate(rows, headers=["class", *columns, "total"]), ""]
    if check.sizes:
        lines.append(
            f"image sizes (w x h): smallest {check.sizes['smallest']}, median "
            f"{check.sizes['median']}, largest {check.sizes['largest']}"
        )
    if check.modes:
        lines.append("modes: " + ", ".join(f"{k} {v}" for k, v in check.modes.items()))
    if check.formats:
        lines.append("formats: " + ", ".join(f"{k} {v}" for k, v in check.formats.items()))
    if check.bad:
        lines.append(f"unreadable files ({len(check.bad)}):")
        lines += [f"  {p}: {why}" for p, why in check.bad]
    if check.warnings:
        lines.append("warnings:")
        lines += [f"  - {w}" for w in check.warnings]
    if check.errors:
        lines.append("errors:")
        lines += [f"  - {e}" for e in check.errors]
    if check.suggestions:
        lines.append("suggestions:")
        lines += [f"  - {s}" for s in check.suggestions]
    if check.usable:
        lines.append("usable as is")
    else:
        why = []
        if check.bad:
            why.append(
                f"{len(check.bad)} unreadable file(s): fix or remove them, or set [data] "
                'on_bad_image = "skip" to leave them out'
            )
        if check.errors:
            why.append(f"{len(check.errors)} error(s) above")
        lines.append("NOT usable as is: " + "; ".join(why))
    return "\n".join(lines)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .plugins import get_plugin_manager
    from .pretrain import PretrainSpec, pretrain
    from .registry import Registry

    pm, _ = get_plugin_manager(args.plugin)
    out = Path(args.out)
    spec = PretrainSpec(
        backbone=args.backbone,
        source=args.data,
        image_size=args.image_size,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        augmentation=args.augmentation,
        aug_strength=args.aug_strength,
        seed=args.seed,
        init=args.init,
    )
    result = pretrain(
        spec,
        out,
        Registry.from_plugin_manager(pm),
        cache_dir=out.parent / "cache",
        device=_device(args.device or "auto"),
        force=args.force,
    )
    meta = result.meta
    print(
        f"{'up to date (cached)' if result.cached else 'pretrained'}: {meta['backbone']} on "
        f"{meta['source']} ({len(meta['classes'])} classes, {meta['epochs']} epochs), held-out "
        f"accuracy {meta['accuracy']:.4f} -> {result.path} (+ {result.path.with_suffix('.json').name})"
    )
    return 0


def cmd_prior(args: argparse.Namespace) -> int:
    """``prior build|show STUDY``, ``prior publish CATALOG URL`` (automl_tl.prior)."""
    from .errors import ConfigError
    from .prior import publish, read_study_prior

    if args.action == "publish":
        return _publish_catalog(args, publish)
    if args.url:
        raise UserError(f"prior {args.action} takes a study file only, not {args.url!r}")
    config, _, registry = _load(args)
    if args.action == "build":
        from .data import load_splits
        from .prior import meta_features, study_prior, study_weights
        from .samplers import startup_trials

        if not config.search.prior:
            raise ConfigError(
                f"{config.name}: [search] prior is empty, so there is no prior to build; list "
                'earlier studies\' catalogs there, e.g. prior = ["studies/*/catalog.db"]'
            )
        splits = load_splits(config, registry)
        features = meta_features(splits, study_weights(config))
        prior = study_prior(config, features, startup_trials(config), rebuild=True)
    else:
        prior = read_study_prior(config)
        if prior is None:
            raise UserError(
                f"{config.name} has no prior yet ({config.paths.prior} is missing); run "
                f"automl-tl prior build {args.study}"
            )
    if args.format == "json":
        print(json.dumps(prior.to_dict(), indent=2))
        return 0
    for warning in prior.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    f = prior.features
    print(
        f"{config.name}: {f['classes']} classes, {f['images_per_class']:g} images per class, "
        f"{f['resolution']} px, weights {f['weights']}"
    )
    print(f"\nnearest earlier tasks ({len(prior.tasks)}):")
    print(_table(prior.tasks[:10], ["name", "distance", "weight", "configurations", "origin"]))
    if prior.neighbour_marks:  # how many nearest tasks the portfolio trusts, and why
        trusted = "all" if prior.neighbours is None else f"the {prior.neighbours} nearest"
        marks = ", ".join(f"{k}: {v:.3f}" for k, v in prior.neighbour_marks.items())
        print(f"portfolio built from {trusted} (leave-one-out over the earlier tasks: {marks})")
    rows = [
        {
            "#": n + 1,
            **{k: e.params.get(k) for k in ("backbone", "augmentation", "aug_strength")},
            **{k: e.params.get(k) for k in ("unfreeze", "unfreeze_depth", "lr")},
            "expected": e.expected,
            "seconds": e.seconds,
            "from": e.task,
        }
        for n, e in enumerate(prior.entries)
    ]
    how = "per expected second ([search] timeout)" if prior.per_second else "by expected score"
    print(f"\nportfolio, run first ({how}):")
    print(_table(rows, list(rows[0]) if rows else ["#"]))
    if prior.backbones:
        print("\nbackbones as the prior ranks them:")
        print(_table(prior.backbones, ["backbone", "expected"]))
    print(f"\n-> {config.paths.prior}")
    return 0


def _publish_catalog(args: argparse.Namespace, publish) -> int:
    from pathlib import Path

    import sqlite_utils

    from .storage import redact

    if not args.url or "://" not in args.url:
        raise UserError(
            "prior publish CATALOG URL: give the catalog.db to copy and the shared catalog's "
            "URL, e.g. automl-tl prior publish studies/digits/catalog.db postgresql://host/team"
        )
    path = Path(args.study)
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a study's catalog.db (or bench/catalog.db)")
    written = publish(sqlite_utils.Database(path), args.url)
    shown = ", ".join(f"{n} {table}" for table, n in written.items()) or "nothing"
    print(f"published {shown} from {path} to {redact(args.url)}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    """``clean STUDY``: what the study no longer needs, one line each, and the total."""
    from .clean import clean

    config, _, registry = _load(args)
    found = clean(config, registry, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for item in found:
        print(f"{verb} {item.path} ({item.bytes / 1e6:.1f} MB): {item.what}")
    total = sum(item.bytes for item in found)
    print(f"{config.name}: {verb} {len(found)} item(s), {total / 1e6:.1f} MB")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .config import load_config
    from .export import check_timm_export, export_onnx, plain_timm_loads
    from .plugins import registry_needing

    config = load_config(args.study)
    if args.model != "best" and args.trial is not None:
        raise UserError("give --trial N or --model ensemble|soup, not both")
    directory = (
        config.paths.root / args.model if args.model != "best" else config.paths.model(args.trial)
    )
    files = check_timm_export(directory)
    if plain_timm_loads(directory):
        print(f"timm export: {directory} ({', '.join(files)})")
    else:  # a plugin's backbone: automl_tl.load_model with the plugin loaded
        print(
            f"export: {directory} ({', '.join(files)}); load it with automl_tl.load_model "
            "and the backbone's plugin (plain timm cannot build this architecture)"
        )
    if args.onnx:
        # the study's plugins run only when the model's backbone needs one (a trust boundary)
        registry = registry_needing(
            config.plugins,
            args.plugin,
            {"backbones": _export_backbones(directory)},
            base_dir=config.base_dir,
        )
        result = export_onnx(directory, opset=args.opset, registry=registry)
        print(
            f"onnx: {result.path} (opset {result.opset}); max abs difference vs PyTorch on a batch "
            f"of {result.batch}: {result.max_abs_diff:.2e}"
        )
    return 0


def _export_backbones(directory) -> list[str]:
    """The backbones an exported folder needs: its own, or its ensemble members'."""
    from .export import ENSEMBLE_FILE

    folders = [directory]
    if (directory / ENSEMBLE_FILE).is_file():
        spec = json.loads((directory / ENSEMBLE_FILE).read_text(encoding="utf-8"))
        folders = [directory / m["path"] for m in spec.get("members", [])]
    names = []
    for folder in folders:
        try:
            record = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        names.append((record.get("automl_tl") or {}).get("backbone") or record.get("architecture"))
    return [n for n in names if n]


def cmd_ensemble(args: argparse.Namespace) -> int:
    """``automl-tl ensemble A B ... -o DIR [--soup]``."""
    from pathlib import Path

    from .export import check_timm_export, export_ensemble

    folders = [Path(m) for m in args.models]
    for f in folders:
        check_timm_export(f)
    if args.soup:
        import json as _json

        from .export import export_model
        from .plugins import get_plugin_manager
        from .registry import Registry
        from .selection import soup_models

        soup = soup_models(folders)
        config = _json.loads((folders[0] / "config.json").read_text())
        registry = Registry.from_plugin_manager(get_plugin_manager(args.plugin)[0])
        backbone = registry.get("backbones", config.get("automl_tl", {}).get("backbone"))
        export_model(
            soup.model,
            backbone,
            Path(args.output),
            soup.label_names,
            soup.data_config,
            {"kind": "soup", "ingredients": [str(f) for f in folders]},
            extra={"temperature": soup.temperature},
        )
        print(f"soup of {len(folders)} models -> {args.output}")
    else:
        export_ensemble(folders, Path(args.output), metrics={"kind": "ensemble"})
        print(f"ensemble of {len(folders)} models -> {args.output}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import describe_plugins, format_plugins, get_plugin_manager
    from .registry import KINDS, Registry

    if args.words:
        return _plugins_subcommand(args)
    if args.check:
        return _check_plugin(args)
    if args.bench:
        return _bench_plugin(args)
    pm, infos = get_plugin_manager(args.plugin)
    registry = Registry.from_plugin_manager(pm)
    plugins = describe_plugins(pm, infos, registry)
    if args.format == "json":
        data: dict[str, Any] = {
            kind: [{"name": n, "plugin": registry.plugin_of(kind, n)} for n in registry.names(kind)]
            for kind in KINDS
        }
        data["plugins"] = plugins
        print(json.dumps(data, indent=2))
        return 0
    print(format_plugins(plugins))
    return 0


def _plugins_subcommand(args: argparse.Namespace) -> int:
    """``plugins new NAME [--kind KIND] [--dir DIR]``: write a plugin package."""
    from pathlib import Path

    from .scaffold import PluginNames, new_plugin

    if args.words[0] != "new" or len(args.words) != 2:
        raise UserError(
            f"`automl-tl plugins {' '.join(args.words)}`: write `automl-tl plugins new NAME "
            "[--kind backbone|policy|strategy|dataset|tracker]`, or `automl-tl plugins` to list"
        )
    written = new_plugin(args.words[1], args.kind, Path(args.dir) if args.dir else None)
    names = PluginNames.of(args.words[1])
    folder = written[0].parent
    print(f"wrote the {args.kind} plugin {names.name} ({names.distribution}) in {folder}:")
    for path in written:
        print(f"  {path.relative_to(folder)}")
    print(
        f"next, from {folder}: pip install -e '.[test]' && pytest tests/ && "
        f"automl-tl plugins --check {names.name}"
    )
    return 0


def _bench_plugin(args: argparse.Namespace) -> int:
    """``plugins --bench NAME``: the scorecard of a plugin's backbones (automl_tl.bench)."""
    from pathlib import Path

    from .bench import bench_plugin, format_card, to_dicts
    from .plugins import get_plugin_manager
    from .registry import Registry

    pm, _ = get_plugin_manager(args.plugin)
    name = Path(args.bench).stem if args.bench.endswith(".py") else args.bench
    if args.bench.endswith(".py") and args.bench not in args.plugin:
        pm, _ = get_plugin_manager([*args.plugin, args.bench])
    out = Path(args.out or "bench")
    weights = {}
    for item in args.bench_weights:
        backbone, sep, source = item.partition("=")
        if not sep or not source:
            raise UserError(
                f"--weights {item!r}: write BACKBONE=SOURCE, e.g. team_cnn=team.safetensors"
            )
        weights[backbone] = str(Path(source).resolve()) if Path(source).exists() else source
    rows = bench_plugin(
        name, Registry.from_plugin_manager(pm), out, device=args.device or "cpu", weights=weights
    )
    card = format_card(name, rows)
    card_path = out / f"{name}-card.md"
    card_path.write_text(card)
    if args.format == "json":
        print(
            json.dumps({"plugin": name, "card": str(card_path), "rows": to_dicts(rows)}, indent=2)
        )
    else:
        print(card)
        print(f"card: {card_path}; rows: {out / 'catalog.db'} (table benchmarks)")
    return 1 if any(r.error for r in rows if not r.reference) else 0


def _check_plugin(args: argparse.Namespace) -> int:
    """``plugins --check MODULE``: the contract tests on one plugin; exit 1 if any fails."""
    from dataclasses import asdict

    from .testing import check_plugin

    results = check_plugin(args.check, only=args.only, image_size=args.image_size)
    failed = [r for r in results if not r.ok]
    if args.format == "json":
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(f"checking plugin {args.check}")
        for r in results:
            print(f"  {r}")
        print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


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
        "--preset",
        help="fast, balanced or best: backbones, budget, epochs and the searched recipe for a "
        "study file that names only its data (its own keys win); see README, Presets",
    )
    p.add_argument(
        "--plugin", action="append", default=[], help="extra plugin module or .py file (repeatable)"
    )
    p.add_argument(
        "--no-retrain", action="store_true", help="leave the retrain to `automl-tl retrain`"
    )
    p.add_argument(
        "--workers",
        default="auto",
        help="worker processes on this node sharing the study, GPUs round robin or CPU "
        "threads split between them (default auto: every visible GPU x --trials-per-gpu with "
        "a CUDA device, one process on the CPU); default storage with several: a journal file",
    )
    p.add_argument("--race", action="store_true", help=argparse.SUPPRESS)  # --workers' children
    p.add_argument(
        "--trials-per-gpu",
        help="trials sharing each GPU, each with its share of the memory (K, or auto: from "
        "the backbones and the image size)",
    )
    p.add_argument(
        "--deadline",
        help="the search ends by then, leaving time for the race and the retrain: a date and time "
        "(2026-12-01T06:00) or a duration (90m, 2h); default: the Slurm job's end if set",
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
    p.add_argument("--preset", help="the preset the search ran with (search --preset)")
    p.add_argument("--plugin", action="append", default=[])
    p.add_argument("--jobs", help=argparse.SUPPRESS)  # search --workers' retrain workers
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
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="the k most probable labels per image (default 1; a multi-label model: every "
        "label above its threshold)",
    )
    p.add_argument("--device")
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        help="plugin module or .py file that registers the model's backbone (installed "
        "plugins load by themselves)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "check-data",
        help="check a dataset (unreadable files, class problems) without training",
        description="Decode every image and run every data check; print images per class per "
        "split, sizes, modes and unreadable files. Exit 0: usable as is; 1: problems listed; "
        "2: the source cannot be read.",
    )
    common(p, study=False)
    p.add_argument("source", help="folder:PATH, csv:PATH, digits, … or a study file (.toml)")
    p.add_argument("--image-size", type=int, help="decode size (default [data] image_size: 32)")
    p.add_argument("--seed", type=int, help="split seed (default [data] seed: 0)")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--test-fraction", type=float)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--plugin", action="append", default=[])
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser(
        "pretrain",
        help="train a backbone on a source dataset; weights a study names in [weights]",
        description="Supervised training of a backbone on a source dataset with the project's "
        "own loop; writes OUT (.safetensors, head removed) and OUT's .json sidecar (source, "
        "classes, epochs, accuracy). Cached by content: the same inputs again are instant. "
        "Decoded images are cached in OUT's folder, under cache/.",
    )
    common(p, study=False)
    p.add_argument("--backbone", required=True, help="e.g. test_resnet, resnet50")
    p.add_argument("--data", required=True, help="source dataset: digits:0-4, folder:PATH, …")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--augmentation", default="none", help="augmentation policy (default none)")
    p.add_argument("--aug-strength", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="none", help="start from: none, timm, a file, local-dir:DIR")
    p.add_argument("--device")
    p.add_argument("--force", action="store_true", help="retrain even when up to date")
    p.add_argument("--plugin", action="append", default=[])
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "export", help="check the study's timm export; --onnx writes model.onnx beside it"
    )
    common(p)
    p.add_argument("--trial", type=int, help="models/trial-N instead of best/")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="write model.onnx and compare it with PyTorch (pip install 'automl-tl[onnx]')",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--plugin", action="append", default=[])
    p.add_argument(
        "--model",
        choices=["best", "ensemble", "soup"],
        default="best",
        help="which of the study's models: best/ (default), ensemble/ or soup/",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "ensemble",
        help="combine exported models into one: an ensemble (default) or a weight soup (--soup)",
        description="An ensemble averages its members' probabilities (members must predict the "
        "same classes); a soup averages the weights of models of one backbone fine-tuned from "
        "the same weights. Either loads, predicts and exports to ONNX like one model.",
    )
    common(p, study=False)
    p.add_argument("models", nargs="+", help="exported model folders")
    p.add_argument("--output", "-o", required=True, help="folder to write")
    p.add_argument("--soup", action="store_true", help="average the weights instead")
    p.add_argument("--plugin", action="append", default=[])
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser(
        "prior",
        help="the team prior: build or show what a study learns from earlier ones; publish a "
        "catalog to a shared one",
        description="build STUDY: the study's prior from [search] prior (its data's "
        "meta-features, the nearest earlier tasks, the portfolio run first), written to "
        "<study>/prior.json; show STUDY: print it; publish CATALOG URL: copy a catalog's "
        "datasets, trials and benchmarks into a shared catalog database.",
    )
    p.add_argument("action", choices=("build", "show", "publish"))
    p.add_argument("study", metavar="STUDY|CATALOG", help="study file (publish: a catalog.db)")
    p.add_argument("url", nargs="?", help="publish: the shared catalog's URL")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--plugin", action="append", default=[])
    p.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity", default=0)
    p.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity")
    p.set_defaults(func=cmd_prior)

    p = sub.add_parser(
        "clean",
        help="remove decoded caches the study no longer uses and leftovers of killed exports",
    )
    common(p)
    p.add_argument("--dry-run", action="store_true", help="list what would go; remove nothing")
    p.add_argument("--plugin", action="append", default=[])
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser(
        "plugins",
        help="list plugins and what they register; --check one; `plugins new NAME` writes one",
    )
    common(p, study=False)
    p.add_argument(
        "words",
        nargs="*",
        metavar="new NAME",
        help="`new NAME`: write a ready plugin package (pyproject with the entry point, the "
        "component, its contract tests, a README) into ./automl-tl-NAME",
    )
    p.add_argument(
        "--kind",
        choices=["backbone", "policy", "strategy", "dataset", "tracker"],
        default="backbone",
        help="with `new`: what the plugin provides (default backbone)",
    )
    p.add_argument("--dir", help="with `new`: the folder to write (must not exist)")
    p.add_argument(
        "--bench",
        metavar="NAME",
        help="scorecard: each backbone of plugin NAME (entry-point name, module or .py file) "
        "beside two built-ins on a fixed suite of digits tasks",
    )
    p.add_argument("--out", help="with --bench: results folder (default ./bench)")
    p.add_argument(
        "--weights",
        dest="bench_weights",
        action="append",
        default=[],
        metavar="BACKBONE=SOURCE",
        help="with --bench: a backbone's own weights (a file, local-dir:DIR …); it runs from "
        "them and from scratch",
    )
    p.add_argument("--device", help="with --bench: cpu, cuda … (default cpu)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--plugin", action="append", default=[])
    p.add_argument(
        "--check",
        metavar="MODULE",
        help="run the contract tests on one plugin (module, .py file or entry-point name)",
    )
    p.add_argument("--only", metavar="PATTERN", help="with --check: the components to check")
    p.add_argument("--image-size", type=int, default=32, help="with --check: input size")
    p.set_defaults(func=cmd_plugins)
    return parser


def _stop_on_sigterm():
    """SIGTERM (a scheduler, `kill`) stops like Ctrl-C: as a KeyboardInterrupt, cleanly."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    from .storage import scrub

    args = build_parser().parse_args(argv)
    setup_logging(args.verbosity)
    previous = _stop_on_sigterm()
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {printable(scrub(str(exc)), newlines=True)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(
            "interrupted; completed trials are kept — run the same command again to resume",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if "SIGTERM" in exc.args else signal.SIGINT)
    except Exception:  # a bug: keep the traceback, but never a password in it
        import traceback

        sys.stderr.write(scrub(traceback.format_exc()))
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
