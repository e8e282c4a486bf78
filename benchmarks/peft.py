"""Parameter-efficient strategies vs full fine-tuning of the same backbone: time per training
step and optimizer memory, side by side in one process (issue 14, part B).

For each backbone (timm, ``weights = "none"``: the cost of a step does not depend on the
values), each arm — ``top_k`` at full depth (full fine-tuning), ``bitfit``, ``norm_fit``,
``lora``, all at full depth — is set up as ``fit()`` sets it up (the backbone's layer groups,
``UnfreezeStrategy.adapt``, ``set_trainable``, AdamW over the strategy's ``param_groups``)
and timed for ``--steps`` training steps (forward, backward, optimizer step) on one fixed
random batch after ``--warmup`` steps. Arms are interleaved within a round and the rounds
repeated (``--rounds``), so load on the machine hits every arm alike; a round's time of an
arm is its fastest step (the least disturbed by other processes), its ratio full's time over
the arm's; the figures are the mean ± sd and the minimum of the ratios over rounds. Optimizer memory is the bytes of AdamW's state after
a step (``exp_avg`` + ``exp_avg_sq``: 8 bytes per trained parameter). Each arm ends with the
strategy's ``merge`` and a strict ``load_state_dict`` into a plain ``timm.create_model``.

    nice -n 5 .venv/bin/python benchmarks/peft.py                    # figures for RESULTS.md
    nice -n 5 .venv/bin/python benchmarks/peft.py --quick            # seconds: the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from automl_tl import registry_for  # noqa: E402
from automl_tl.train import (  # noqa: E402
    adapt_model,
    merge_model,
    parameter_shapes,
    set_trainable,
)

ARMS = ("top_k", "bitfit", "norm_fit", "lora")
#: backbone -> image size (small enough for CPU, the architectures as they are)
FULL = {"resnet18": 128, "vit_tiny_patch16_224": 128, "vit_small_patch16_224": 128}
QUICK = {"test_resnet": 32, "test_vit": 32}
#: on a GPU: the sizes the backbones are made for, a realistic batch (benchmarks/gpu_check.py)
GPU = {"resnet50": 224, "vit_small_patch16_224": 224, "vit_base_patch16_224": 224}
#: the issue's target: a parameter-efficient step at least this much faster than full
#: fine-tuning's step of the same backbone
TARGET_SPEEDUP = 1.2


def figures(results: dict) -> dict:
    """``{arm}_speedup_{backbone}``: each parameter-efficient arm's mean speed-up, and
    ``verdicts`` against :data:`TARGET_SPEEDUP` (the flat form benchmarks/gpu_check.py reads)."""
    flat: dict = {"verdicts": {}}
    for backbone, res in results.items():
        for arm, row in res["arms"].items():
            if arm == "top_k":
                continue
            key = f"{arm}_speedup_{backbone}"
            flat[key] = row["speedup_mean"]
            ok = row["speedup_mean"] >= TARGET_SPEEDUP
            flat["verdicts"][key] = (f">= {TARGET_SPEEDUP:g}", "ok" if ok else "MISS")
    return flat


def parse_backbone(text: str) -> tuple[str, int]:
    name, sep, size = text.partition("=")
    if not sep or not size.isdigit():
        raise argparse.ArgumentTypeError(f"--backbone takes NAME=PIXELS, got {text!r}")
    return name, int(size)


class Arm:
    """One strategy on a fresh model, ready to step."""

    def __init__(
        self,
        registry,
        backbone: str,
        strategy: str,
        image_size: int,
        batch: int,
        device: str = "cpu",
    ):
        component = registry.get("backbones", backbone)
        self.device = torch.device(device)
        self.strategy = registry.get("unfreeze_strategies", strategy)
        torch.manual_seed(0)
        self.model = component.create(10, weights="none", image_size=image_size)
        self.created = parameter_shapes(self.model)
        groups = component.layer_groups(self.model)
        head = component.head_parameters(self.model)
        depth = len(groups)
        groups = adapt_model(self.strategy, self.model, groups, head, depth)
        trainable = self.strategy.trainable(0, 1, groups, head, depth)
        set_trainable(self.model, trainable)
        self.model.to(self.device)
        named = dict(self.model.named_parameters())
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [named[n] for n in g.names], "lr": 1e-4 * g.lr_scale}
                for g in self.strategy.param_groups(groups, head, depth)
            ]
        )
        self.trained = sum(named[n].numel() for n in trainable)
        self.total = sum(p.numel() for p in self.model.parameters())
        generator = torch.Generator().manual_seed(0)
        self.x = torch.rand(batch, 3, image_size, image_size, generator=generator).to(self.device)
        self.y = torch.randint(0, 10, (batch,), generator=generator).to(self.device)
        self.times: list[float] = []

    def step(self) -> float:
        self._sync()
        t0 = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._sync()  # a GPU's step is over when its kernels are
        return time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def optimizer_bytes(self) -> int:
        return sum(
            v.numel() * v.element_size()
            for state in self.optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v) and v.numel() > 1
        )

    def merged_loads_in_timm(self, backbone: str, image_size: int) -> bool:
        model = merge_model(self.strategy, self.model.cpu(), self.created)
        size = {"img_size": image_size} if "vit" in backbone else {}
        plain = timm.create_model(backbone, pretrained=False, num_classes=10, **size)
        plain.load_state_dict(model.state_dict(), strict=True)
        model.eval(), plain.eval()
        x = self.x[:2].cpu()
        with torch.no_grad():
            return bool(torch.allclose(plain(x), model(x), atol=1e-4))


def run(
    backbones: dict[str, int],
    rounds: int,
    steps: int,
    warmup: int,
    batch: int,
    registry=None,
    device: str = "cpu",
) -> dict:
    """Every arm on every backbone: per arm its step time, speed-up over full fine-tuning
    (mean, sd, min over rounds), trained parameters, optimizer bytes and whether the merged
    model loads in plain timm."""
    registry = registry or registry_for()
    results = {}
    for backbone, size in backbones.items():
        arms = {a: Arm(registry, backbone, a, size, batch, device) for a in ARMS}
        for arm in arms.values():
            for _ in range(warmup):
                arm.step()
        per_round: dict[str, list[float]] = {a: [] for a in ARMS}
        for _ in range(rounds):
            for name, arm in arms.items():  # interleaved: load hits every arm alike
                per_round[name].append(min(arm.step() for _ in range(steps)))
        full = per_round["top_k"]
        rows = {}
        for name, arm in arms.items():
            ratios = [f / t for f, t in zip(full, per_round[name])]
            rows[name] = {
                "step_seconds": statistics.median(per_round[name]),
                "speedup_mean": statistics.mean(ratios),
                "speedup_sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                "speedup_min": min(ratios),
                "trained_parameters": arm.trained,
                "parameters": arm.total,
                "optimizer_bytes": arm.optimizer_bytes(),
            }
        full_bytes = rows["top_k"]["optimizer_bytes"]
        for name, arm in arms.items():
            rows[name]["optimizer_memory_ratio"] = rows[name]["optimizer_bytes"] / full_bytes
            rows[name]["loads_in_plain_timm"] = arm.merged_loads_in_timm(backbone, size)
        results[backbone] = {"image_size": size, "arms": rows}
    return results


def markdown(results: dict, batch: int) -> str:
    lines = [
        f"| backbone (px, batch {batch}) | arm | s/step | speed-up vs full (mean ± sd, min) "
        "| trained params | optimizer state | vs full | plain timm loads |",
        "|---|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for backbone, res in results.items():
        for name, row in res["arms"].items():
            lines.append(
                f"| {backbone} ({res['image_size']}) | {'full (top_k)' if name == 'top_k' else name} "
                f"| {row['step_seconds']:.3f} "
                f"| {row['speedup_mean']:.2f} ± {row['speedup_sd']:.2f}, {row['speedup_min']:.2f} "
                f"| {row['trained_parameters']:,} of {row['parameters']:,} "
                f"| {row['optimizer_bytes'] / 2**20:.2f} MiB "
                f"| {row['optimizer_memory_ratio']:.3f} "
                f"| {'yes' if row['loads_in_plain_timm'] else 'NO'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny test models, a few steps")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust to load)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU: its own backbones)")
    parser.add_argument(
        "--backbone",
        action="append",
        type=parse_backbone,
        metavar="NAME=PIXELS",
        help="a timm backbone and its image size (repeatable; replaces the default set)",
    )
    parser.add_argument("--tiny", action="store_true", help="as --quick (benchmarks/gpu_check.py)")
    args = parser.parse_args(argv)
    args.quick = args.quick or args.tiny
    torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    if args.backbone:
        backbones = dict(args.backbone)
    else:
        backbones = QUICK if args.quick else GPU if gpu else FULL
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (2 if args.quick else 3)
    batch = args.batch or (4 if args.quick else 32 if gpu else 8)
    started = time.perf_counter()
    results = run(backbones, rounds, steps, args.warmup, batch, device=args.device)
    meta = {
        "command": " ".join(["benchmarks/peft.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rounds": rounds,
        "steps": steps,
        "batch": batch,
        "threads": args.threads,
        "device": args.device,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(markdown(results, batch))
    print(f"\n{meta['command']}: {meta['wall_seconds']} s, {rounds} rounds x {steps} steps")
    if args.json:
        flat = figures(results)
        args.json.write_text(json.dumps({**flat, "results": results, "meta": meta}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
