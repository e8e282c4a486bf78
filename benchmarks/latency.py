#!/usr/bin/env python
"""Is the latency a multi-objective search measures the latency the export has?

For each backbone and runtime, several times: a model is created, timed in this process as
the search times a trial's model (``automl_tl.latency.time_model`` right after training),
exported (``export_model``), and the export is timed standalone in a fresh Python process
(``load_model`` + the same timing, nothing else loaded). Printed per backbone: the trial's and
the export's median milliseconds, their ratio (mean ± standard deviation over repeats) and how
many repeats agree within 10 % (issue 12's target). ``--json`` keeps everything,
``--markdown`` prints the table for benchmarks/RESULTS.md.

    python benchmarks/latency.py                # 3 backbones x torch (+ onnxruntime) x 5
    python benchmarks/latency.py --quick        # 1 backbone, torch, 2 repeats

Nothing is downloaded: the backbones are timm's tiny test models at random init.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("AUTOML_TL_LOAD_PLUGINS", "")  # only the built-in components
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STANDALONE = """
import json, sys
from automl_tl import latency
from automl_tl.export import load_model
loaded = load_model(sys.argv[1], device="cpu")
target = json.loads(sys.argv[2])
print(latency.time_model(loaded.model, loaded.image_size, target))
"""


def one(backbone: str, runtime: str, size: int, threads: int, folder: Path) -> dict:
    from automl_tl import registry_for
    from automl_tl.components import DataConfig
    from automl_tl.export import export_model
    from automl_tl.latency import time_model

    registry = registry_for()
    component = registry.get("backbones", backbone)
    model = component.create(3, weights="none", image_size=size).eval()
    target = {"device": "cpu", "threads": threads, "batch_size": 1, "runtime": runtime}
    trial_ms = time_model(model, size, target)
    cfg = component.data_config(model)
    export_model(
        model,
        component,
        folder,
        ["a", "b", "c"],
        DataConfig((3, size, size), cfg.mean, cfg.std),
        {"study": "latency-benchmark"},
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(folder), json.dumps(target)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    export_ms = float(proc.stdout.strip().splitlines()[-1])
    return {"trial_ms": trial_ms, "export_ms": export_ms, "ratio": export_ms / trial_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    backbones = ["test_resnet"] if args.quick else ["test_resnet", "test_vit", "test_efficientnet"]
    runtimes = ["torch"]
    if not args.quick:
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401

            runtimes.append("onnxruntime")
        except ImportError:
            pass
    repeats = 2 if args.quick else args.repeats
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in backbones:
            for runtime in runtimes:
                runs = [
                    one(backbone, runtime, args.size, args.threads, Path(tmp) / f"{backbone}-{i}")
                    for i in range(repeats)
                ]
                ratios = [r["ratio"] for r in runs]
                rows.append(
                    {
                        "backbone": backbone,
                        "runtime": runtime,
                        "trial_ms": statistics.median(r["trial_ms"] for r in runs),
                        "export_ms": statistics.median(r["export_ms"] for r in runs),
                        "ratio_mean": statistics.fmean(ratios),
                        "ratio_sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                        "within_10": sum(abs(x - 1) <= 0.10 for x in ratios),
                        "repeats": repeats,
                        "runs": runs,
                    }
                )
                r = rows[-1]
                print(
                    f"{backbone:<18} {runtime:<12} trial {r['trial_ms']:.3f} ms  export "
                    f"{r['export_ms']:.3f} ms  ratio {r['ratio_mean']:.3f} ± {r['ratio_sd']:.3f}  "
                    f"within 10 %: {r['within_10']}/{repeats}",
                    flush=True,
                )
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load": os.getloadavg(),
        "threads": args.threads,
        "size": args.size,
    }
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.markdown:
        print("\n| backbone | runtime | trial ms | export ms (own process) | ratio | within 10 % |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['backbone']} | {r['runtime']} | {r['trial_ms']:.3f} | {r['export_ms']:.3f}"
                f" | {r['ratio_mean']:.3f} ± {r['ratio_sd']:.3f} | {r['within_10']}/{r['repeats']} |"
            )


if __name__ == "__main__":
    main()
