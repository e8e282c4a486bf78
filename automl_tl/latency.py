"""What a multi-objective study measures on each trained model beside its metric: latency on
the declared target (``[search] latency``: device, CPU threads, batch size, runtime torch or
ONNX Runtime), parameters and weight size (``[search] objectives``, ``config.MEASURES``).

The same :func:`time_model` times a trial's model during the search and the exported model
afterwards (:func:`automl_tl.retrain.retrain` records both in ``metrics.json``), so the two
can be compared: the latency a trial was chosen for is the latency the export has.

Example::

    ms = time_model(model, image_size=32, target={"device": "cpu", "threads": 1,
                                                  "batch_size": 1, "runtime": "torch"})
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import UserError

#: untimed calls first (allocations, lazy initialisation, caches)
WARMUP = 5
#: timed calls, at least; more until MIN_SECONDS have passed. The median is reported (robust
#: to a busy machine's outliers)
REPEATS = 50
MIN_SECONDS = 0.5


def check_runtime(target: dict[str, Any]) -> None:
    """``runtime = "onnxruntime"`` needs the onnx extra installed; one message otherwise."""
    if target.get("runtime") != "onnxruntime":
        return
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as exc:
        raise UserError(
            f'[search] latency runtime = "onnxruntime" needs the onnx extra ({exc.name} is not '
            "installed): pip install 'automl-tl[onnx]', or measure with runtime = \"torch\""
        ) from None


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _median_ms(call, device: torch.device) -> float:
    for _ in range(WARMUP):
        call()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < REPEATS or (
        time.perf_counter() - started < MIN_SECONDS and len(times) < 100 * REPEATS
    ):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


@torch.inference_mode()
def _time_torch(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    return _median_ms(lambda: model(x), device)


def _time_onnxruntime(model: nn.Module, x: torch.Tensor, threads: int) -> float:
    import onnxruntime

    fd, path = tempfile.mkstemp(prefix="automl-tl-latency-", suffix=".onnx")
    os.close(fd)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
            torch.onnx.export(
                model, (x,), path, input_names=["image"], external_data=False, dynamo=True
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {"image": x.numpy()}
        return _median_ms(lambda: session.run(None, feed), torch.device("cpu"))
    finally:
        os.unlink(path)


def time_model(model: nn.Module, image_size: int, target: dict[str, Any]) -> float:
    """Median milliseconds of one forward call of a batch of ``target["batch_size"]`` images
    on ``target["device"]`` with ``target["threads"]`` CPU threads, in PyTorch or ONNX Runtime.
    ``model`` itself is left where it is (a copy is timed)."""
    device = torch.device(target["device"])
    copy_ = copy.deepcopy(model).float().eval().to(device)
    x = torch.randn(
        target["batch_size"], 3, image_size, image_size, generator=torch.Generator().manual_seed(0)
    ).to(device)
    with _threads(int(target["threads"])):
        if target["runtime"] == "onnxruntime":
            return _time_onnxruntime(copy_.cpu(), x.cpu(), int(target["threads"]))
        return _time_torch(copy_, x, device)


def model_size(model: nn.Module) -> dict[str, float]:
    """``params_m`` (millions of parameters) and ``model_mb`` (megabytes of weights and
    buffers as stored, 10^6 bytes)."""
    params = sum(p.numel() for p in model.parameters())
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"params_m": params / 1e6, "model_mb": stored / 1e6}


def measure(
    model: nn.Module, image_size: int, names: list[str], target: dict[str, Any]
) -> dict[str, float]:
    """The ``names`` (``config.MEASURES``) of ``model``; latency only when asked for."""
    out: dict[str, float] = {}
    if "latency_ms" in names:
        out["latency_ms"] = round(time_model(model, image_size, target), 4)
    sizes = model_size(model)
    for name in ("params_m", "model_mb"):
        if name in names:
            out[name] = round(sizes[name], 6)
    return out
