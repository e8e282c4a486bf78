#!/usr/bin/env python
"""Every GPU figure of issue 17 in one call, within a time budget: JSON plus a table.

    benchmarks/gpu_check.sh [OUT]                   # on a GPU node (under 7 minutes)
    python benchmarks/gpu_check.py --device cpu --tiny --out OUT    # the CPU smoke run (tests)

Parts, most important first; each runs in its own process with what is left of the budget
(``--seconds``, default 400: the 7 minutes less start-up), so a slow part costs only itself and
the parts after it are recorded as skipped, never lost:

1. ``benchmarks/run.py --only syncs,loop`` — host syncs per step (target 0), trial loop vs
   bare loop for resnet50 / vit_small at 224 px, resnet18 / convnext_atto at 64 px,
   efficientnet_b0 at 224 px, peak memory;
2. ``--only compiled`` — fit() with compile vs a compiled bare loop (target >= 0.95);
3. ``--only augment`` — every policy's share of the step (target <= 5 %) and epoch ratio;
4. ``--only packing`` — aggregate images/s of 1, 2, 4 trials per GPU (target >= 2x);
5. ``--only fit`` — a whole fit(): set-up, epochs, evaluation;
6. ``benchmarks/peft.py`` — BitFit / norm-fit / LoRA step vs full fine-tuning of resnet50,
   ViT-S and ViT-B at 224 px (issue 14's target >= 1.2x; on a CPU it was met on resnet18 and
   missed on ViT-tiny);
7. ``pytest -k sync tests/test_gpu_nodes.py`` — the sync-count test (GPU only);
8. ``automl-tl search --workers auto --trials-per-gpu auto`` on a tiny study (GPU only): the
   whole path with packed workers, their memory fraction and MPS when its daemon runs.

Writes ``OUT/gpu_check.json`` (every figure, its target and verdict, each part's seconds and
output tail) and ``OUT/gpu_check.md`` (the table for benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "benchmarks" / "run.py"
PEFT = REPO / "benchmarks" / "peft.py"

#: (name, run.py benches or a command kind, at most seconds) in the order they run
PARTS: list[tuple[str, str, int]] = [
    ("loop", "syncs,loop", 170),
    ("compiled", "compiled", 100),
    ("augment", "augment", 70),
    ("packing", "packing", 100),
    ("fit", "fit", 40),
    ("peft", "peft", 60),
    ("sync-test", "pytest", 60),
    ("search", "search", 90),
]

SEARCH_STUDY = """
name = "gpu-check"
[data]
source = "digits"
image_size = 32
[search]
n_trials = 8
backbones = ["test_resnet", "test_convnext"]
augmentations = ["none", "flip_crop"]
unfreeze = ["top_k"]
epochs = 2
pruner = "none"
[selection]
finalists = 1
"""


def _tail(text: str, n: int = 2000) -> str:
    return text[-n:] if text else ""


def _run(cmd: list[str], seconds: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=max(1.0, seconds),
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"stopped at its {seconds:.0f} s limit"
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    return {
        "status": status,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(cmd),
        "stdout_tail": _tail(out),
        "stderr_tail": _tail(err),
    }


def run_part(
    name: str, what: str, seconds: float, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    py = sys.executable
    if what == "pytest":
        if args.device != "cuda":
            return {"status": "skipped: needs a GPU", "seconds": 0.0}
        return _run(
            [
                py,
                "-m",
                "pytest",
                "tests/test_gpu_nodes.py",
                "-k",
                "sync",
                "-q",
                "-p",
                "no:randomly",
            ],
            seconds,
        )
    if what == "search":
        if args.device != "cuda":
            return {"status": "skipped: needs a GPU", "seconds": 0.0}
        folder = out / "search"
        folder.mkdir(parents=True, exist_ok=True)
        study = folder / "gpu-check.toml"
        study.write_text(SEARCH_STUDY)  # its outputs go beside it, under OUT/search/
        return _run(
            [
                py,
                "-m",
                "automl_tl.cli",
                "search",
                str(study),
                "--device",
                "cuda",
                "--workers",
                "auto",
                "--trials-per-gpu",
                "auto",
                "--no-retrain",
            ],
            seconds,
            env={"AUTOML_TL_LOAD_PLUGINS": ""},
        )
    json_path = out / f"{name}.json"
    if what == "peft":
        cmd = [py, str(PEFT), "--device", args.device, "--json", str(json_path)]
    else:
        cmd = [py, str(RUN), "--device", args.device, "--only", what, "--json", str(json_path)]
    if args.tiny:
        cmd.append("--tiny")
    part = _run(cmd, seconds)
    if json_path.exists():
        part["results"] = json.loads(json_path.read_text())
    return part


def figures(parts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every figure the parts produced, with its target and verdict (run.py's TARGETS)."""
    rows = []
    for name, part in parts.items():
        results = part.get("results") or {}
        verdicts = results.get("verdicts") or {}
        for key, value in results.items():
            if key in ("details", "meta", "verdicts") or not isinstance(value, (int, float)):
                continue
            target, status = verdicts.get(key, ("-", ""))
            rows.append(
                {
                    "part": name,
                    "figure": key,
                    "value": None if isinstance(value, float) and math.isnan(value) else value,
                    "target": target,
                    "verdict": status,
                }
            )
    return rows


def table(rows: list[dict[str, Any]], parts: dict[str, dict[str, Any]]) -> str:
    lines = ["| figure | value | target | verdict |", "|---|---|---|---|"]
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:.3f}"
        lines.append(f"| {r['figure']} | {value} | {r['target']} | {r['verdict']} |")
    lines += ["", "| part | status | seconds |", "|---|---|---|"]
    for name, part in parts.items():
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', 0):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--seconds", type=float, default=400.0, help="the whole budget")
    parser.add_argument("--tiny", action="store_true", help="run.py's tiny sizes (smoke run)")
    parser.add_argument(
        "--parts", help=f"comma-separated subset of: {', '.join(p for p, _, _ in PARTS)}"
    )
    args = parser.parse_args(argv)
    wanted = set(args.parts.split(",")) if args.parts else {p for p, _, _ in PARTS}
    unknown = wanted - {p for p, _, _ in PARTS}
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parts: dict[str, dict[str, Any]] = {}
    for name, what, cap in PARTS:
        if name not in wanted:
            continue
        left = args.seconds - (time.perf_counter() - started)
        if left < 10:
            parts[name] = {"status": "skipped: the time budget is spent", "seconds": 0.0}
            continue
        # the caps share out a GPU's 7 minutes; the tiny CPU smoke run has only the budget
        parts[name] = run_part(name, what, left if args.tiny else min(cap, left), args, args.out)
        print(
            f"[{time.perf_counter() - started:6.1f}s] {name}: {parts[name]['status']}", flush=True
        )
    rows = figures(parts)
    report = {
        "figures": rows,
        "parts": parts,
        "meta": {
            "device": args.device,
            "tiny": args.tiny,
            "budget_seconds": args.seconds,
            "seconds": round(time.perf_counter() - started, 1),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(
                [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
            ),
        },
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    text = table(rows, parts)
    (args.out / "gpu_check.md").write_text(text)
    print()
    print(text)
    print(textwrap.fill(f"written: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
