"""GPU nodes at full use (issue 17), tested on the CPU with the device list faked where the
code asks for it (``workers.plan_workers`` / ``plan_slots`` take the GPUs as an argument):
workers and trials per GPU, the deadline, out-of-memory accumulation, the sync-free
confusion matrix, the compile policy, pretraining spread over workers."""

from __future__ import annotations

import contextlib
import datetime
import time

import optuna
import pytest
import torch

from automl_tl import budget as budget_module
from automl_tl.errors import UserError
from automl_tl.workers import (
    GPU_MEMORY_SHARE,
    auto_trials_per_gpu,
    plan_slots,
    plan_workers,
)

from .conftest import SMALL_STUDY, run_main, write_study

EIGHT = [str(i) for i in range(8)]


# ---------------------------------------------------------------------------------------------
# --workers auto, --trials-per-gpu


def test_workers_auto_is_one_per_gpu_times_k_on_cuda_and_one_on_the_cpu():
    assert plan_workers("auto", None, cuda=True, gpus=EIGHT) == (8, None)
    assert plan_workers("auto", 3, cuda=True, gpus=EIGHT) == (24, 3)
    assert plan_workers("auto", "auto", cuda=True, gpus=["0", "1"], auto_k=lambda: 4) == (8, 4)
    assert plan_workers("auto", None, cuda=False, gpus=[]) == (1, None)  # as before on the CPU
    assert plan_workers("3", None, cuda=False, gpus=[]) == (3, None)
    assert plan_workers(5, None, cuda=True, gpus=["0", "1"]) == (5, None)  # round robin


def test_more_workers_than_gpus_times_k_and_k_below_one_are_refused():
    with pytest.raises(
        UserError, match=r"--workers 9 is more than 2 GPUs x --trials-per-gpu 4 = 8"
    ):
        plan_workers(9, 4, cuda=True, gpus=["0", "1"])
    with pytest.raises(UserError, match=r"--trials-per-gpu 0: give a whole number of at least 1"):
        plan_workers("auto", 0, cuda=True, gpus=EIGHT)
    with pytest.raises(UserError, match=r"--workers -1: give a whole number"):
        plan_workers("-1", None, cuda=False, gpus=[])


def test_auto_trials_per_gpu_packs_small_models_at_small_images():
    assert auto_trials_per_gpu(64, 11.7e6) == 4  # resnet18 at 64 px
    assert auto_trials_per_gpu(32, 88e6) == 2  # a large model at tiny images
    assert auto_trials_per_gpu(128, 5.3e6) == 2
    assert auto_trials_per_gpu(128, 88e6) == 1
    assert auto_trials_per_gpu(224, 3.7e6) == 1  # convnext_atto at 224: one trial fills it


def test_slots_sharing_a_gpu_split_its_memory_and_note_mps():
    slots = plan_slots(16, "cuda", gpus=EIGHT, cpus=32, per_gpu=2, mps=True)
    assert [s.gpu for s in slots[:9]] == [*EIGHT, "0"]
    assert {s.memory_fraction for s in slots} == {round(GPU_MEMORY_SHARE / 2, 4)}
    env = slots[0].env()
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["AUTOML_TL_MEMORY_FRACTION"] == "0.4750"
    assert env["OMP_NUM_THREADS"] == "2"
    assert slots[0].label == "GPU 0 (48% of its memory, MPS), 2 threads"
    alone = plan_slots(8, "cuda", gpus=EIGHT, cpus=8)  # one per GPU: the whole GPU, no cap
    assert {s.memory_fraction for s in alone} == {None}
    assert "AUTOML_TL_MEMORY_FRACTION" not in alone[0].env()
    packed = plan_slots(12, "cuda", gpus=["0", "1", "2", "3"], cpus=4)  # 3 per GPU, round robin
    assert packed[0].memory_fraction == round(GPU_MEMORY_SHARE / 3, 4) and not packed[0].mps


def test_memory_fraction_is_applied_only_where_cuda_is(monkeypatch):
    from automl_tl.workers import apply_memory_fraction, mps_running

    monkeypatch.setenv("AUTOML_TL_MEMORY_FRACTION", "0.25")
    assert apply_memory_fraction() == (0.25 if torch.cuda.is_available() else None)
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/nonexistent-mps")
    assert mps_running() is False


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trials-per-gpu", "0"], "error: --trials-per-gpu 0: give a whole number of at least 1"),
        (["--workers", "0"], "error: --workers 0: give a whole number of at least 1"),
        (
            ["--deadline", "2020-01-01T00:00"],
            "error: the deadline (--deadline: 2020-01-01T00:00:00) has passed",
        ),
        (["--deadline", "soon"], "error: --deadline 'soon' is neither a date and time"),
        (["--device", "cuda"], "error: device 'cuda': no CUDA device is visible here"),
    ],
)
def test_bad_gpu_node_input_is_one_message_and_starts_nothing(tmp_path, args, expected):
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    study = write_study(tmp_path, SMALL_STUDY)
    result = run_main("search", str(study), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert not (tmp_path / "tiny" / "optuna.db").exists()


# ---------------------------------------------------------------------------------------------
# the deadline


def test_deadline_reads_a_time_a_duration_and_slurms_end():
    now = 1_000_000.0
    assert budget_module.parse_deadline("90m", now) == now + 5400
    assert budget_module.parse_deadline("+1h30m", now) == now + 5400
    assert budget_module.parse_deadline("45", now) == now + 45
    at = datetime.datetime(2030, 1, 2, 3, 4, 5).timestamp()
    assert budget_module.parse_deadline("2030-01-02T03:04:05", now) == at
    with pytest.raises(ValueError):
        budget_module.parse_deadline("1h30", now)
    slurm = {"SLURM_JOB_END_TIME": str(int(now + 600))}
    deadline = budget_module.search_deadline("2h", slurm, now)  # the earlier of the two
    assert (deadline.at, deadline.source) == (now + 600, "SLURM_JOB_END_TIME")
    assert budget_module.search_deadline("5m", slurm, now).source == "--deadline"
    assert budget_module.search_deadline(None, {}, now) is None
    with pytest.raises(UserError, match="SLURM_JOB_END_TIME.*has passed 400 s ago"):
        budget_module.search_deadline(None, {"SLURM_JOB_END_TIME": str(now - 400)}, now)


def _timed_trial(study, backbone: str, seconds: float, rate: float) -> None:
    from optuna.distributions import CategoricalDistribution

    trial = optuna.trial.create_trial(
        value=0.5,
        params={"backbone": backbone},
        distributions={"backbone": CategoricalDistribution(["test_resnet", "test_vit"])},
        user_attrs={"images_per_s": rate, "device": "cpu"},
    )
    trial.datetime_start = datetime.datetime(2026, 1, 1, 12, 0, 0)
    trial.datetime_complete = trial.datetime_start + datetime.timedelta(seconds=seconds)
    study.add_trial(trial)


def test_a_trial_that_would_end_after_the_deadline_is_skipped_and_said_so(registry, tmp_path):
    from automl_tl import Choice, config_from_dict
    from automl_tl.data import prepare_data
    from automl_tl.plugins import get_plugin_manager
    from automl_tl.search import Objective

    splits = prepare_data(registry, "digits:0-2", image_size=16, seed=0)
    config = config_from_dict(
        {
            "name": "t",
            "search": {"output": str(tmp_path), "backbones": ["test_resnet", "test_vit"]},
            "selection": {"race": False},  # the race's share: the test below
        }
    )
    study = optuna.create_study(direction="maximize")
    _timed_trial(study, "test_resnet", seconds=100.0, rate=10.0)  # a slow backbone here
    _timed_trial(study, "test_vit", seconds=20.0, rate=1e6)
    deadline = budget_module.Deadline(time.time() + 300, "--deadline")
    objective = Objective(
        config, registry, get_plugin_manager()[0], splits, "cpu", deadline=deadline
    )
    n_train, n_val = len(splits.train), len(splits.val)
    assert (n_train, n_val) == (322, 108)
    assert objective.reserve(study) == pytest.approx(100.0 * (n_train + n_val) / n_train)
    fast = Choice(backbone="test_vit", unfreeze_depth=1.0, epochs=1)
    assert objective.late(study.ask(), fast) is None
    slow = Choice(backbone="test_resnet", unfreeze_depth=1.0, epochs=5)
    trial = study.ask()
    with pytest.raises(budget_module.TrialSkipped, match="test_resnet would take ~"):
        objective.admit_before_deadline(trial, slow)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    (skip,) = budget_module.deadline_skips(study)
    assert skip["number"] == trial.number and skip["reason"].endswith("kept for the retrain")
    # after DEADLINE_SKIPS_TO_STOP in a row the search stops: nothing fits any more
    assert objective.late_in_a_row == 1


def test_the_deadline_reserve_keeps_the_races_time_shared_by_its_workers(
    registry, tmp_path, monkeypatch
):
    """A trial that would fit with the retrain's time alone is not started when the race's
    runs (after the search, shared by the workers racing) would no longer fit."""
    from automl_tl import Choice, config_from_dict
    from automl_tl.data import prepare_data
    from automl_tl.plugins import get_plugin_manager
    from automl_tl.search import Objective
    from automl_tl.selection import race_size

    splits = prepare_data(registry, "digits:0-2", image_size=16, seed=0)

    def objective(selection, seconds_left):
        config = config_from_dict(
            {
                "name": "t",
                "search": {"output": str(tmp_path), "backbones": ["test_resnet", "test_vit"]},
                "selection": selection,
            }
        )
        deadline = budget_module.Deadline(time.time() + seconds_left, "--deadline")
        return config, Objective(
            config, registry, get_plugin_manager()[0], splits, "cpu", deadline=deadline
        )

    study = optuna.create_study(direction="maximize")
    _timed_trial(study, "test_vit", seconds=10.0, rate=1e6)  # longest trial: 10 s on 322 images
    retrain = 10.0 * 430 / 322
    config, plain = objective({"race": False}, 60)
    assert race_size(config, splits) == (0, 0) and plain.reserve(study) == pytest.approx(retrain)
    config, raced = objective({"finalists": 3, "repeats": 2}, 60)
    assert race_size(config, splits) == (6, 322)
    assert raced.reserve(study) == pytest.approx(retrain + 6 * 10.0)
    choice = Choice(backbone="test_vit", unfreeze_depth=1.0, epochs=1)
    assert plain.late(study.ask(), choice) is None  # ~0 s + 13 s of retrain fit in 60 s
    why = raced.late(study.ask(), choice)  # + 60 s of race do not
    assert why is not None and why.endswith("are kept for the race and the retrain")
    monkeypatch.setenv(budget_module.RACERS_ENV, "4")  # --workers 4: 2 rounds of 4 runs
    assert raced.reserve(study) == pytest.approx(retrain + 2 * 10.0)
    assert raced.late(study.ask(), choice) is None
    config, folded = objective({"folds": 3, "finalists": 2}, 60)
    assert race_size(config, splits) == (6, 430 - 430 // 3)  # 2 of 3 folds of train+val


def test_budget_stops_when_the_time_left_is_the_retrains(tmp_path):
    study = optuna.create_study(direction="maximize")
    soon = budget_module.Deadline(time.time() + 30, "--deadline")
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert budget_module.Budget(study, 5, url=url, stop_at=soon, reserve=lambda: 10.0).room()
    assert not budget_module.Budget(study, 5, url=url, stop_at=soon, reserve=lambda: 60.0).room()


# ---------------------------------------------------------------------------------------------
# the hot path: out-of-memory accumulation, the sync-free confusion matrix, the eval batch


def test_micro_batches_accumulate_the_whole_batchs_gradient():
    from automl_tl.train import _backward

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x, y = torch.randn(10, 3, 2, 2), torch.randint(0, 5, (10,))
    grads, losses = [], []
    for micro in (10, 4, 2):  # 1, 2 and 5 micro-batches (10 // 4 = 2 parts of 5)
        model.zero_grad()
        losses.append(float(_backward(model, x, y, micro, contextlib.nullcontext, False)))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(
        losses[0], rel=1e-6
    )
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_micro_batches_never_fall_below_the_minimum():
    from automl_tl.train import MIN_MICRO_BATCH, _micro_batches

    assert _micro_batches(64, 64) == 1 and _micro_batches(64, 32) == 2
    assert _micro_batches(65, 2) == 32  # 32 parts of 2 or 3 images: none of 1
    assert _micro_batches(3, MIN_MICRO_BATCH) == 1


def test_confusion_matrix_without_bincount_counts_the_same():
    from automl_tl.train import add_to_confusion

    generator = torch.Generator().manual_seed(3)
    n = 7
    confusion = torch.zeros(n * n, dtype=torch.int64)
    labels, predictions = [], []
    for size in (50, 1, 33):
        y = torch.randint(0, n, (size,), generator=generator)
        p = torch.randint(0, n, (size,), generator=generator)
        add_to_confusion(confusion, y, p, n)
        labels.append(y)
        predictions.append(p)
    y, p = torch.cat(labels), torch.cat(predictions)
    expected = torch.bincount(y * n + p, minlength=n * n)
    assert torch.equal(confusion, expected) and int(confusion.sum()) == 84
    assert int(confusion.view(n, n)[int(y[0]), int(p[0])]) >= 1


def test_eval_batch_grows_at_low_resolution_on_a_gpu_only():
    from automl_tl.train import EVAL_BATCH_MAX, eval_batch_size

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert eval_batch_size(64, 64, cpu) == 256  # the CPU as before
    assert eval_batch_size(16, 32, cpu) == 64
    assert eval_batch_size(64, 224, cuda) == 256
    assert eval_batch_size(64, 64, cuda) == EVAL_BATCH_MAX
    assert eval_batch_size(64, 160, cuda) == 496
    assert eval_batch_size(16, 64, cuda, shrunk=True) == 64  # after out-of-memory: small


def _kornia_host_reads(module, x) -> list[str]:
    """The reads back to the host (``.item()`` / ``bool()``, ``nonzero``, a boolean-mask
    index) made inside Kornia's code during one call of ``module``: on a GPU, where Kornia
    draws its parameters on the device, each is a sync. Host draws of automl_tl's own
    (which images, which order) are not counted: they never touch the device."""
    import traceback

    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = []

    def in_kornia(name: str) -> None:
        frames = [
            f
            for f in traceback.extract_stack()
            if "/kornia/" in f.filename or "/automl_tl/" in f.filename
        ]
        if frames and "/kornia/" in frames[-1].filename:
            where = frames[-1].filename.split("/kornia/")[-1]
            reads.append(f"{name} at kornia/{where}:{frames[-1].lineno}")

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            masked = name in ("aten.index", "aten.index_put_", "aten.index_put") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())
            )
            if masked or name in ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select"):
                in_kornia(name)
            return func(*args, **(kwargs or {}))

    class ToPython(TorchFunctionMode):  # tolist() and friends do not reach the dispatcher
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "tolist":
                in_kornia("tolist")
            return func(*args, **(kwargs or {}))

    module(x)  # warm-up: lazy set-up is not the step
    with Reads(), ToPython():
        module(x)
    return reads


@pytest.mark.parametrize("policy", ["flip_crop", "crop", "color"])
def test_kornia_ops_read_nothing_back_to_the_host(registry, policy):
    """Kornia 0.9 applies an op with p < 1 (the flip at p = 0.5 s, the grayscale at 0.2 s) to
    every row and blends with torch.where (``_blend_by_prob``), no boolean-mask index; the
    batched crop reads no box size; the colour jitter's order is drawn on the host."""
    module = registry.get("augmentation_policies", policy).build(0.5, 32)
    torch.manual_seed(0)
    assert _kornia_host_reads(module, torch.rand(16, 3, 32, 32)) == []


def test_color_jitter_in_host_order_is_kornias_jitter_of_the_drawn_order():
    import kornia.augmentation as K

    from automl_tl.default_plugins.kornia_policies import ColorJitterInHostOrder

    jitter = ColorJitterInHostOrder(0.2, 0.2, 0.2, 0.05)
    x = torch.rand(8, 3, 16, 16)
    torch.manual_seed(3)
    first = jitter(x)
    torch.manual_seed(3)
    order = jitter.orders[int(torch.randint(24, ()))]  # the draw forward() makes first
    expected = K.ColorJitter(0.2, 0.2, 0.2, 0.05, p=1.0, order=order)(x)
    torch.manual_seed(3)
    torch.testing.assert_close(first, expected)  # seeded: the same order and factors
    torch.testing.assert_close(jitter(x), first)
    drawn = {jitter.orders[int(torch.randint(24, ()))] for _ in range(500)}
    assert len(drawn) == 24  # every order of the four steps is used


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA host syncs: needs a GPU")
@pytest.mark.parametrize("augmentation", ["none", "flip_crop", "color"])
def test_no_host_sync_per_training_step_on_a_gpu(registry, augmentation):
    """CUDA's sync debug mode counts the host syncs of a fit: twice the training steps must
    not add one (the per-epoch reads of the loss and the scores stay, a per-step one fails)."""
    import dataclasses
    import warnings

    from automl_tl import Choice, fit
    from automl_tl.data import Split, prepare_data

    digits = prepare_data(registry, "digits", image_size=32, seed=0)

    def syncs(n_train: int) -> int:
        data = dataclasses.replace(
            digits,
            train=Split(
                digits.train.x[:n_train], digits.train.y[:n_train], digits.train.names[:n_train]
            ),
        )
        choice = Choice(
            backbone="test_resnet",
            augmentation=augmentation,
            aug_strength=0.5 if augmentation != "none" else 0.0,
            unfreeze_depth=1.0,
            epochs=2,
            batch_size=32,
        )
        fit(choice, data, registry, device="cuda", feature_cache=False)  # warm-up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fit(choice, data, registry, device="cuda", feature_cache=False)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message).lower() for w in caught)

    assert syncs(512) == syncs(256)  # 16 vs 8 steps per epoch: 0 syncs per step


# ---------------------------------------------------------------------------------------------
# compile only where it pays, and say why not


def _few(splits, n: int):
    """``splits`` with only the first ``n`` training and validation images (fast fits)."""
    import dataclasses

    from automl_tl.data import Split

    def first(split):
        return Split(split.x[:n], split.y[:n], split.names[:n])

    return dataclasses.replace(splits, train=first(splits.train), val=first(splits.val))


def test_compile_decision_says_why_not():
    from automl_tl.train import COMPILE_PAYS_AT, COMPILE_SECONDS, compile_decision

    same, growing = [{"fc.w"}, {"fc.w"}], [{"fc.w"}, {"fc.w", "body.w"}]
    assert compile_decision(False, same) is None  # not asked
    assert compile_decision(True, same) == "yes"  # speed unknown: as asked
    assert (
        compile_decision("eager", same, expected_seconds=COMPILE_PAYS_AT * COMPILE_SECONDS) == "yes"
    )
    short = compile_decision(True, same, expected_seconds=30.0)
    assert short == "no: the trial should take ~30 s, less than 10 times the ~60 s a compile costs"
    assert compile_decision(True, growing).startswith("no: the trainable layers change")
    assert compile_decision(True, same, cached_features=True).startswith("no: the head trains")


def test_a_gradual_trial_asked_to_compile_runs_eagerly_and_says_so(registry):
    from automl_tl import Choice, fit
    from automl_tl.data import prepare_data

    data = _few(prepare_data(registry, "digits:0-2", image_size=16, seed=0), 64)
    choice = Choice(
        backbone="test_resnet", unfreeze="gradual", unfreeze_depth=1.0, epochs=2, batch_size=32
    )
    result = fit(choice, data, registry, device="cpu", compile="eager", feature_cache=False)
    assert result.compiled.startswith("no: the trainable layers change between epochs")
    plain = fit(choice, data, registry, device="cpu", feature_cache=False)
    assert plain.compiled is None
    assert [r.train_loss for r in result.history] == [r.train_loss for r in plain.history]


# ---------------------------------------------------------------------------------------------
# pretraining spread over the workers of a node


@pytest.mark.slow
def test_pretraining_takes_the_backbone_no_other_worker_is_building(registry, tmp_path):
    """With test_resnet's build held by another worker (its lock), this one builds test_vit
    first, then waits for test_resnet's and builds it once the lock is free."""
    import fcntl
    import threading

    from automl_tl import load_config
    from automl_tl.pretrain import ensure_study_weights

    path = write_study(
        tmp_path,
        """
        [data]
        source = "digits:5-6"
        image_size = 16
        [search]
        backbones = ["test_resnet", "test_vit"]
        [pretrain]
        epochs = 1
        [weights]
        test_resnet = "pretrain:digits:0-1"
        test_vit = "pretrain:digits:0-1"
        """,
    )
    config = load_config(path)
    folder = tmp_path / "tiny" / "pretrained"
    folder.mkdir(parents=True)
    resnet = folder / "test_resnet--digits-0-1.safetensors"
    vit = folder / "test_vit--digits-0-1.safetensors"
    held = open(folder / f".{resnet.name}.lock", "w")  # noqa: SIM115 (released below)
    fcntl.flock(held, fcntl.LOCK_EX)
    results = []
    worker = threading.Thread(
        target=lambda: results.extend(ensure_study_weights(config, registry, device="cpu"))
    )
    worker.start()
    deadline = time.monotonic() + 120
    while not vit.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vit.exists() and not resnet.exists()  # the free one first; the held one waits
    fcntl.flock(held, fcntl.LOCK_UN)
    held.close()
    worker.join(timeout=120)
    assert [(r.path.name, r.cached) for r in results] == [(resnet.name, False), (vit.name, False)]


@pytest.mark.slow
def test_the_documented_gpu_node_command_runs_on_the_cpu(tmp_path):
    """docs/cluster.md's `search … --trials-per-gpu auto --deadline 2h`: on the CPU it is
    one process as before (the trials per GPU are ignored, with a warning), and a deadline
    two hours away skips nothing."""
    study = write_study(tmp_path, SMALL_STUDY)
    result = run_main(
        "search",
        str(study),
        "--trials-per-gpu",
        "auto",
        "--deadline",
        "2h",
        "--n-trials",
        "1",
        "--no-retrain",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    assert "--trials-per-gpu is for CUDA devices; ignored on the CPU" in result.stderr
    assert "1 trials finished" in result.stdout and "deadline:" not in result.stdout


# ---------------------------------------------------------------------------------------------
# the retrains after the search, fanned out over the GPUs


def test_retrains_get_one_slot_per_gpu_and_stay_in_this_process_with_one():
    from automl_tl.workers import retrain_slots

    slots = retrain_slots("cuda", gpus=EIGHT, cpus=16)
    assert [s.gpu for s in slots] == EIGHT  # a GPU each, its whole memory
    assert {s.memory_fraction for s in slots} == {None} and {s.threads for s in slots} == {2}
    assert retrain_slots("cuda", gpus=["0"], cpus=16) == []  # one GPU: serial, as before
    assert retrain_slots("cpu") == []  # the CPU: serial, as before


def test_a_killed_or_failed_retrain_worker_is_named_with_why():
    from automl_tl.workers import RetrainJob, Slot, WorkerOutcome, _why_failed

    slot = Slot(1, "1", 8)
    winner = RetrainJob(4, selection={"winner": 4})
    killed = WorkerOutcome(slot, 4321, returncode=-9)
    assert (
        _why_failed(killed, winner)
        == "retrain worker 1 (GPU 1, 8 threads, pid 4321) was killed by SIGKILL"
    )
    assert winner.describe() == "trial 4 (the race's winner, into best/)"
    failed = WorkerOutcome(slot, 4321, returncode=1)
    failed.last_lines.extend(
        [
            "error: retrain of trial 4 failed: out of memory: OutOfMemoryError",
            "error: retrain of trial 9 failed: x",
        ]
    )
    assert _why_failed(failed, winner).endswith(
        ": retrain of trial 4 failed: out of memory: OutOfMemoryError"
    )
    assert killed.describe().startswith("killed by SIGKILL after 0 trials finished")


WEIGHTS_STUDY = """
[data]
source = "digits:0-2"
image_size = 16
seed = 0
[search]
n_trials = 2
backbones = ["test_resnet"]
augmentations = ["none"]
unfreeze = ["top_k"]
epochs = 1
batch_size = 32
pruner = "none"
[selection]
race = false
[weights]
test_resnet = ["none", "w.safetensors"]
"""


def _weights_file(registry, folder) -> None:
    """``folder/w.safetensors``: test_resnet's weights (seeded), WEIGHTS_STUDY's second source."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = registry.get("backbones", "test_resnet").create(5, image_size=16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, str(folder / "w.safetensors")
    )


def _searched_by_hand(registry, folder, trials_from=None):
    """A study of WEIGHTS_STUDY in ``folder`` with two complete trials (one per weight
    source, the scratch one best), made by hand, or copied from ``trials_from``."""

    from automl_tl import load_config
    from automl_tl.data import load_splits
    from automl_tl.search import open_search_study
    from automl_tl.space import suggest

    _weights_file(registry, folder)
    config = load_config(write_study(folder, WEIGHTS_STUDY))
    splits = load_splits(config, registry)
    study = open_search_study(config, splits, registry)
    if trials_from is not None:
        for t in trials_from:
            study.add_trial(t)
        return config, study, splits
    for weights, value in (("none", 0.9), ("w.safetensors", 0.8)):
        study.enqueue_trial({"weights": weights})
        trial = study.ask()
        suggest(trial, config, registry)
        study.tell(trial, value)
    return config, study, splits


def _files(config) -> dict[str, bytes]:
    root = config.output_dir
    return {
        str(p.relative_to(root)): p.read_bytes()
        for folder in (root / "best", root / "models")
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_retrains_fan_out_over_slots_and_export_what_the_serial_path_does(registry, tmp_path):
    """Two slots (CPU ones standing in for GPUs: the planning is the same): the winner's and
    the other weight source's retrains run in two worker processes at once, and best/,
    models/trial-1/, the catalog rows and the comparison are the serial path's. A retrain
    whose worker fails is named; the other one's model is kept."""
    import json

    from automl_tl.catalog import Catalog, catalog_path
    from automl_tl.workers import RetrainJob, fan_out_retrains, plan_slots, retrain_after_search

    serial_config, serial_study, serial_splits = _searched_by_hand(registry, tmp_path / "serial")
    config, study, splits = _searched_by_hand(
        registry, tmp_path / "fanned", serial_study.get_trials()
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker of a two-slot plan on two cores: same sums
    try:
        serial = retrain_after_search(
            serial_config,
            registry,
            serial_study,
            serial_splits,
            device="cpu",
            slots=[],
            child_args=None,
        )
    finally:
        torch.set_num_threads(threads)

    def child_args(slot, jobs):
        return [
            "retrain",
            str(config.path),
            "--device",
            "cpu",
            "--jobs",
            json.dumps([j.to_json() for j in jobs]),
        ]

    slots = plan_slots(2, "cpu", gpus=[], cpus=2)
    fanned = retrain_after_search(
        config, registry, study, splits, device="cpu", slots=slots, child_args=child_args
    )
    assert fanned.failed == [] and serial.failed == []
    first, second = fanned.workers
    assert first.slot.index != second.slot.index and first.pid != second.pid
    assert max(first.started, second.started) < min(first.ended, second.ended)  # side by side
    assert (
        sorted(_files(config))
        == sorted(_files(serial_config))
        == [
            "best/config.json",
            "best/metrics.json",
            "best/model.safetensors",
            "models/trial-1/config.json",
            "models/trial-1/metrics.json",
            "models/trial-1/model.safetensors",
        ]
    )
    for name in ("best/model.safetensors", "models/trial-1/model.safetensors"):
        assert _files(config)[name] == _files(serial_config)[name], name
    directory, metrics = fanned.retrained
    assert directory == config.paths.best and metrics["trial"] == 0
    assert metrics["test"] == serial.retrained[1]["test"]
    assert metrics["selection"] == serial.retrained[1]["selection"]
    assert [r["test"] for r in fanned.comparison] == [r["test"] for r in serial.comparison]
    rows = {
        k: sorted(
            (r["trial"], r["test_accuracy"]) for r in Catalog(catalog_path(c)).db["models"].rows
        )
        for k, c in (("fanned", config), ("serial", serial_config))
    }
    assert (
        rows["fanned"]
        == rows["serial"]
        == [(0, metrics["test"]["accuracy"]), (1, rows["serial"][1][1])]
    )

    # a retrain whose worker fails is named with why; the other worker's model is kept
    failed, _ = fan_out_retrains(
        config,
        [RetrainJob(1, weights="w.safetensors"), RetrainJob(7, weights="none")],
        slots,
        child_args,
    )
    ((job, why),) = failed
    assert (
        job.trial == 7 and job.describe() == "trial 7 (the best 'none' trial, into models/trial-7/)"
    )
    assert why.startswith("retrain worker 1 (CPU, 1 thread, pid ") and "has no trial 7" in why
    assert json.loads((config.paths.model(1) / "metrics.json").read_text())["trial"] == 1
    assert len(study.get_trials()) == 2


@pytest.mark.slow
def test_search_with_workers_fans_its_retrains_out_and_prints_them(registry, tmp_path, monkeypatch):
    """`search --workers 2` on a node planned as two GPUs (two CPU slots stand in: the
    planner is faked, nothing else): the winner and the other weight source's best are
    retrained by two retrain workers, and the summary is the serial path's."""
    from automl_tl import workers

    _weights_file(registry, tmp_path)
    study = write_study(tmp_path, WEIGHTS_STUDY)
    monkeypatch.setattr(
        workers, "retrain_slots", lambda device: workers.plan_slots(2, "cpu", gpus=[], cpus=2)
    )
    result = run_main("search", str(study), "--workers", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "[retrain 0] " in result.stderr and "[retrain 1] " in result.stderr
    assert "retraining 2 models side by side" in result.stderr
    assert "retrained on train+val: test accuracy" in result.stdout
    rows = result.stdout.split("best per weight source (retrained, same budget):\n")[1].splitlines()
    assert len(rows) >= 2 and all("n/a" not in r for r in rows[:2]), result.stdout
    assert len(list((tmp_path / "tiny" / "models").glob("trial-*/model.safetensors"))) == 1
