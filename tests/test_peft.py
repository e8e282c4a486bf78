"""Parameter-efficient strategies (bitfit, norm_fit, lora): what trains, the LoRA merge, the
export plain timm loads, and the widened strategy contract (adapt / merge)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from automl_tl import Choice, ParamGroup, UnfreezeStrategy, fit
from automl_tl.adapters import LoRAConv2d, LoRALinear, add_lora, merge_lora
from automl_tl.data import Split, prepare_data
from automl_tl.export import export_model
from automl_tl.testing import check_strategy
from automl_tl.train import adapt_model, merge_model, parameter_shapes, set_trainable

from .conftest import REPO, TEST_BACKBONES, needs, run_main

PEFT = ["bitfit", "norm_fit", "lora"]
PLUGINS_DOC = (REPO / "docs" / "writing-plugins.md").read_text()


def _expected(strategy: str, model: nn.Module, top: list[str]) -> set[str]:
    """What each strategy should train of the top groups, by its definition (not its code)."""
    modules = dict(model.named_modules())
    owner = {n: modules[n.rpartition(".")[0]] for n in top}
    if strategy == "bitfit":
        return {n for n in top if n.rpartition(".")[2] in ("bias", "q_bias", "v_bias")}
    if strategy == "norm_fit":
        return {n for n in top if "Norm" in type(owner[n]).__name__}
    matrices = {
        n
        for n in top
        if n.endswith(".weight")
        and (type(owner[n]) is nn.Linear or (type(owner[n]) is nn.Conv2d and owner[n].groups == 1))
    }
    adapters = {f"{n.rpartition('.')[0]}.lora_{x}" for n in matrices for x in "ab"}
    return (set(top) - matrices) | adapters


@pytest.mark.parametrize("backbone", TEST_BACKBONES)
@pytest.mark.parametrize("strategy", PEFT)
def test_a_step_updates_only_the_strategys_parameters(registry, backbone, strategy):
    component = registry.get("backbones", backbone)
    torch.manual_seed(0)
    model = component.create(3, image_size=32)
    groups, head = component.layer_groups(model), component.head_parameters(model)
    depth = 2
    top = [n for g in groups[-depth:] for n in g]
    expected = set(head) | _expected(strategy, model, top)  # before adapt() changes the model
    unfreeze = registry.get("unfreeze_strategies", strategy)
    adapted = adapt_model(unfreeze, model, groups, head, depth)
    trainable = unfreeze.trainable(0, 1, adapted, head, depth)
    assert trainable == expected
    assert trainable - set(head), f"{strategy} trains nothing of {backbone}'s top groups"
    set_trainable(model, trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable and set(head) <= changed
    body = sum(p.numel() for n, p in model.named_parameters() if n not in head and n in before)
    trained = sum(p.numel() for n, p in model.named_parameters() if n in trainable - set(head))
    assert 0 < trained < body  # parameter-efficient: a fraction of the body trains


def _plain_timm(name: str, num_classes: int = 3) -> nn.Module:
    """The architecture straight from timm, at the tests' 32 px (a ViT's position embedding
    depends on it)."""
    size = {"img_size": 32} if name == "test_vit" else {}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **size)


@pytest.mark.parametrize("backbone", TEST_BACKBONES)
def test_lora_merge_keeps_outputs_and_gives_back_the_timm_model(registry, backbone):
    component = registry.get("backbones", backbone)
    torch.manual_seed(0)
    model = component.create(3, image_size=32)
    groups, head = component.layer_groups(model), component.head_parameters(model)
    created = parameter_shapes(model)
    lora = registry.get("unfreeze_strategies", "lora")
    adapted = adapt_model(lora, model, groups, head, len(groups))
    assert any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in model.modules())
    assert any(n.endswith(".lora_a") for g in adapted for n in g)
    with torch.no_grad():  # stand-in for training: B starts at zero, which would hide a bad merge
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.2)
    x = torch.rand(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        adapted_out = model(x)
        merged = merge_model(lora, model, created)
        merged_out = merged(x)
    assert not any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in merged.modules())
    assert torch.allclose(adapted_out, merged_out, atol=1e-5), (
        (adapted_out - merged_out).abs().max()
    )
    plain = _plain_timm(backbone)
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), adapted_out, atol=1e-5)


def test_lora_layers_add_their_update_and_merge_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(96, 5))
    x = torch.rand(2, 3, 8, 8)
    reference = model(x).detach()
    added = add_lora(model, ["0", "2"], rank=2, alpha=4.0)
    assert added == {"0": ["0.lora_a", "0.lora_b"], "2": ["2.lora_a", "2.lora_b"]}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["0.lora_a"] == (2, 3, 3, 3) and shapes["0.lora_b"] == (6, 2, 1, 1)
    assert shapes["2.lora_a"] == (2, 96) and shapes["2.lora_b"] == (5, 2)
    assert torch.equal(model(x), reference)  # B starts at zero: the pretrained function
    with torch.no_grad():
        model[2].lora_b.fill_(0.5)
        model[0].lora_b.fill_(0.25)
    out = model(x).detach()
    assert not torch.allclose(out, reference)
    merge_lora(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.Flatten, nn.Linear]
    assert torch.allclose(model(x), out, atol=1e-5)
    with pytest.raises(ValueError, match="LoRA adapts nn.Linear/Conv2d"):
        add_lora(model, ["1"])


def test_a_lora_linear_on_tokens_is_the_hand_computed_update_and_trains_only_its_factors():
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    layer.weight.requires_grad_(False)
    adapted = LoRALinear.wrap(layer, rank=3, alpha=6.0)
    with torch.no_grad():
        adapted.lora_b.normal_()
    x = torch.rand(2, 5, 12).transpose(0, 1)  # (tokens, batch, features), not contiguous
    expected = x @ layer.weight.T + layer.bias + 2.0 * (x @ adapted.lora_a.T) @ adapted.lora_b.T
    out = adapted(x)
    assert out.shape == (5, 2, 7)
    assert torch.allclose(out, expected, atol=1e-6)
    out.square().sum().backward()
    assert adapted.weight.grad is None
    assert adapted.lora_a.grad is not None and adapted.lora_b.grad is not None


@pytest.fixture(scope="module")
def few_digits(registry):
    digits = prepare_data(registry, "digits:0-2", image_size=32, seed=0)

    def first(split, n):
        return Split(split.x[:n], split.y[:n], split.names[:n])

    return dataclasses.replace(
        digits, train=first(digits.train, 64), val=first(digits.val, 32), fingerprint="few-peft"
    )


def _lora_export(registry, data, folder, backbone):
    """fit() with lora (the adapters merged at its end) and export_model: the model, the folder."""
    choice = Choice(
        backbone=backbone, unfreeze="lora", unfreeze_depth=1.0, lr=1e-2, epochs=1, batch_size=32
    )
    result = fit(choice, data, registry, device="cpu", seed=0)
    assert not any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in result.model.modules())
    export_model(result.model, result.backbone, folder, data.class_names, result.data_config, {})
    return result.model, folder


@pytest.mark.parametrize("backbone", ["test_vit", "test_resnet"])
def test_a_lora_model_exports_to_plain_timm(registry, few_digits, tmp_path, backbone):
    model, out = _lora_export(registry, few_digits, tmp_path / "best", backbone)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == backbone
    plain = _plain_timm(backbone)
    plain.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), model.eval()(x), atol=1e-5)


@pytest.mark.slow  # torch.onnx's exporter: ~10-50 s
def test_a_lora_model_exports_to_onnx(registry, few_digits, tmp_path):
    needs("onnx")
    from automl_tl.export import export_onnx

    _, out = _lora_export(registry, few_digits, tmp_path / "best", "test_resnet")
    check = export_onnx(out)
    assert (out / "model.onnx").is_file() and check.max_abs_diff < 1e-3


# ---------------------------------------------------------------------------------------------
# the contract: a parameter-efficient plugin passes, broken ones are refused with their reason


def _docs_plugin(tmp_path):
    block = re.search(
        r"<!-- studies/peft_strategies.py -->\n```python\n(.*?)```", PLUGINS_DOC, flags=re.S
    )
    assert block, "docs/writing-plugins.md: no block after <!-- studies/peft_strategies.py -->"
    (tmp_path / "studies").mkdir()
    path = tmp_path / "studies" / "peft_strategies.py"
    path.write_text(block.group(1))
    return path, block.group(1)


def test_the_documented_bitfit_and_lora_plugin_passes_the_check(tmp_path, monkeypatch):
    path, _ = _docs_plugin(tmp_path)
    assert "automl-tl plugins --check studies/peft_strategies.py" in PLUGINS_DOC
    monkeypatch.chdir(tmp_path)
    result = run_main("plugins", "--check", "studies/peft_strategies.py")
    assert result.returncode == 0, result.stdout + result.stderr
    check = "contract (linear probe at 0, param groups, adapt and merge)"
    assert f"  ok    unfreeze strategy biases_only: {check}" in result.stdout
    assert f"  ok    unfreeze strategy low_rank: {check}" in result.stdout


def test_the_documented_lora_without_its_merge_is_refused(tmp_path, monkeypatch):
    path, source = _docs_plugin(tmp_path)
    path.write_text(source.replace("return merge_lora(model)", "return model"))
    monkeypatch.chdir(tmp_path)
    result = run_main("plugins", "--check", "studies/peft_strategies.py")
    assert result.returncode == 1
    assert "  FAIL  unfreeze strategy low_rank: contract" in result.stdout
    # depth 1 adds no adapter (the probe's top group is a LayerNorm alone); depth 2 does
    assert "strategy 'low_rank': after merge() at depth 2 the model must have exactly" in (
        result.stdout
    )
    assert "  ok    unfreeze strategy biases_only: contract" in result.stdout


class _Lossy(UnfreezeStrategy):
    """LoRA whose merge drops the adapters instead of folding them in."""

    name = "lossy"

    def adapt(self, model, groups, head, depth):
        top = {n for g in groups[len(groups) - depth :] for n in g} if depth else set()
        layers = [m for m, _ in model.named_modules() if f"{m}.weight" in top and m != "norm"]
        added = add_lora(model, [m for m in layers if "block" not in m], rank=2)
        return [g + [p for m in added for p in added[m] if f"{m}.weight" in g] for g in groups]

    def merge(self, model):
        for name, module in list(model.named_modules()):
            if isinstance(module, (LoRALinear, LoRAConv2d)):
                plain = module.merged()
                with torch.no_grad():
                    plain.weight.copy_(module.weight)  # the update is lost
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, plain)
        return model

    def param_groups(self, groups, head, depth):
        top = groups[len(groups) - depth :] if depth else []
        return [ParamGroup(list(head) + [n for g in top for n in g])]


def test_contract_refuses_a_merge_that_changes_the_outputs():
    with pytest.raises(AssertionError, match=r"merge\(\) at depth \d changed the model's outputs"):
        check_strategy(_Lossy())


def test_contract_refuses_adapters_at_depth_zero():
    class Eager(_Lossy):
        def adapt(self, model, groups, head, depth):
            add_lora(model, ["head"])
            return groups

    with pytest.raises(AssertionError, match="at depth 0 must leave the model unchanged"):
        check_strategy(Eager())


def test_contract_refuses_a_strategy_that_trains_nothing_of_the_top_group():
    class Hollow(_Lossy):
        def adapt(self, model, groups, head, depth):
            return [[] for _ in groups]

        def merge(self, model):
            return model

    with pytest.raises(AssertionError, match="depth 1 must include the top group"):
        check_strategy(Hollow())


def test_contract_refuses_adapt_that_loses_a_group():
    class Short(_Lossy):
        def adapt(self, model, groups, head, depth):
            return groups[1:]

    with pytest.raises(AssertionError, match="adapt\\(\\) must return a list of 4 layer groups"):
        check_strategy(Short())


def test_the_host_refuses_a_model_left_with_adapters(registry, few_digits):
    lora = registry.get("unfreeze_strategies", "lora")
    model = registry.get("backbones", "test_resnet").create(3, image_size=32)
    created = parameter_shapes(model)
    component = registry.get("backbones", "test_resnet")
    adapt_model(lora, model, component.layer_groups(model), component.head_parameters(model), 1)
    unmerged = type(lora)()
    unmerged.merge = lambda model: model
    with pytest.raises(RuntimeError, match="after merge\\(\\) the model differs from the backbone"):
        merge_model(unmerged, model, created)
    assert merge_model(lora, model, created) is model


# ---------------------------------------------------------------------------------------------
# benchmarks/peft.py (figures in benchmarks/RESULTS.md): a smoke run on the test models


def test_peft_benchmark_runs_every_arm_on_tiny_models(registry):
    import importlib.util
    import math

    spec = importlib.util.spec_from_file_location("peft_bench", REPO / "benchmarks" / "peft.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.run(
        {"test_resnet": 32}, rounds=2, steps=1, warmup=0, batch=2, registry=registry
    )
    arms = results["test_resnet"]["arms"]
    assert list(arms) == ["top_k", "bitfit", "norm_fit", "lora"]
    full = arms["top_k"]
    assert full["trained_parameters"] == full["parameters"] and full["speedup_mean"] == 1.0
    for name, row in arms.items():
        assert row["optimizer_bytes"] == 8 * row["trained_parameters"]  # AdamW: 2 fp32 states
        assert math.isfinite(row["speedup_mean"]) and row["speedup_min"] > 0
        assert row["loads_in_plain_timm"] is True, name
        if name != "top_k":
            assert row["optimizer_memory_ratio"] < 0.2, name
    assert "| test_resnet (32) | lora |" in bench.markdown(results, 2)
    # the flat figures benchmarks/gpu_check.py reads: each arm's speed-up and its verdict
    flat = bench.figures(results)
    assert set(flat) == {
        "verdicts",
        "bitfit_speedup_test_resnet",
        "norm_fit_speedup_test_resnet",
        "lora_speedup_test_resnet",
    }
    assert flat["lora_speedup_test_resnet"] == arms["lora"]["speedup_mean"]
    verdict = flat["verdicts"]["lora_speedup_test_resnet"]
    assert verdict == (">= 1.2", "ok" if arms["lora"]["speedup_mean"] >= 1.2 else "MISS")


@pytest.mark.slow  # a search of 2 trials and its retrain (~20-40 s on 2 cores)
def test_a_search_with_the_peft_strategies_exports_a_plain_timm_best(tmp_path, pretrained_digits):
    from automl_tl import load_model

    from .conftest import write_study

    study = write_study(
        tmp_path,
        f"""
        [data]
        source = "digits:5-9"
        image_size = 32
        seed = 0

        [search]
        n_trials = 2
        backbones = ["test_resnet"]
        augmentations = ["none"]
        unfreeze = ["lora"]
        unfreeze_depth = [0.5, 1.0]
        epochs = 1
        pruner = "none"

        [weights]
        test_resnet = "{pretrained_digits.path}"
        """,
        name="peft",
    )
    result = run_main("search", str(study), "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    best = tmp_path / "peft" / "best"
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["params"]["unfreeze"] == "lora"
    plain = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    plain.load_state_dict(load_file(str(best / "model.safetensors")), strict=True)
    loaded = load_model(best)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), loaded.model.eval()(x), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the LoRA rank: [search] lora_rank, a parameter of lora trials only, rebuilt by retrain


def _lora_study(
    tmp_path, ranks: str = "[4, 8, 16]", unfreeze: str = '["top_k", "lora"]', load: bool = True
):
    from automl_tl import load_config

    from .conftest import write_study

    path = write_study(
        tmp_path,
        f"""
        [data]
        source = "digits:0-2"
        image_size = 32
        seed = 0

        [search]
        n_trials = 2
        backbones = ["test_resnet"]
        augmentations = ["none"]
        unfreeze = {unfreeze}
        lora_rank = {ranks}
        epochs = 1
        batch_size = 32
        pruner = "none"

        [weights]
        default = "timm"
        """,
        name="lorarank",
    )
    return path, load_config(path) if load else None


def test_the_rank_is_a_parameter_of_lora_trials_only(registry, tmp_path):
    import optuna

    from automl_tl.space import choice_from_params, suggest

    _, config = _lora_study(tmp_path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {"top_k": 0, "lora": 0}
    for _ in range(16):
        trial = study.ask()
        choice = suggest(trial, config, registry)
        seen[choice.unfreeze] += 1
        if choice.unfreeze == "lora":
            assert trial.params["lora_rank"] in (4, 8, 16)
            assert choice.strategy_options == {"rank": trial.params["lora_rank"]}
        else:
            assert "lora_rank" not in trial.params and choice.strategy_options == {}
        assert choice_from_params(trial.params, config).strategy_options == choice.strategy_options
        study.tell(trial, 0.5)
    assert seen["top_k"] and seen["lora"]
    # one rank fixes it: no parameter, the study file's value
    _, fixed = _lora_study(tmp_path / "fixed", ranks="16", unfreeze='["lora"]')
    trial = optuna.create_study().ask()
    assert suggest(trial, fixed, registry).strategy_options == {"rank": 16}
    assert "lora_rank" not in trial.params
    assert choice_from_params(trial.params, fixed).strategy_options == {"rank": 16}
    # a lora trial of before [search] lora_rank (no parameter) keeps the rank it trained with
    old = choice_from_params(trial.params, config)
    assert old.strategy_options == {} and registry.get("unfreeze_strategies", "lora").rank == 8


# rank 4 on the top two groups, by hand from the layer shapes (A: r x fan-in, B: out x r):
# test_resnet's convolutions (out, in, kh, kw): layer3.0 conv1 (48, 48, 1, 1), conv2
# (48, 48, 3, 3), conv3 and downsample (192, 48, 1, 1); layer4.0 conv1 (96, 192, 3, 3), conv2
# (96, 96, 3, 3), downsample (96, 192, 1, 1). test_vit's blocks 4 and 5: qkv 64->192, proj
# 64->64, fc1 64->192, fc2 192->64 (the final norm has no matrix).
RANK_4_ADAPTERS = {
    "test_resnet": 4 * (48 + 48)
    + 4 * (48 * 9 + 48)
    + 2 * 4 * (48 + 192)
    + 4 * (192 * 9 + 96)
    + 4 * (96 * 9 + 96)
    + 4 * (192 + 96),
    "test_vit": 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 192) + (192 + 64)),
}


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_a_rank_4_trial_has_exactly_the_rank_4_adapters(registry, backbone):
    from automl_tl.train import configured_strategy

    assert RANK_4_ADAPTERS == {"test_resnet": 16512, "test_vit": 7168}
    component = registry.get("backbones", backbone)
    counts = {}
    for rank in (4, 16):
        model = component.create(3, image_size=32)
        groups, head = component.layer_groups(model), component.head_parameters(model)
        choice = Choice(backbone=backbone, unfreeze="lora", strategy_options={"rank": rank})
        strategy = configured_strategy(registry, choice)
        assert strategy.rank == rank and strategy.alpha == 2 * rank
        adapted = adapt_model(strategy, model, groups, head, 2)
        layers = [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAConv2d))]
        assert {m.lora_a.shape[0] for m in layers} == {rank} and {m.scale for m in layers} == {2.0}
        counts[rank] = sum(
            model.get_parameter(n).numel() for g in adapted for n in g if ".lora_" in n
        )
    assert counts[4] == RANK_4_ADAPTERS[backbone]
    assert counts[16] == 4 * RANK_4_ADAPTERS[backbone]  # no layer is narrower than 16
    assert registry.get("unfreeze_strategies", "lora").rank == 8  # the registered one untouched


def test_retrain_rebuilds_the_trials_rank_and_merges_for_plain_timm(registry, few_digits, tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    from automl_tl.retrain import retrain
    from automl_tl.space import choice_from_params

    from .conftest import create_study

    _, config = _lora_study(tmp_path, ranks="[4, 16]", unfreeze='["lora"]')
    config.weights = {"default": "none"}  # nothing downloaded: adapters on a random body
    params = {
        "backbone": "test_resnet",
        "augmentation": "none",
        "unfreeze": "lora",
        "unfreeze_depth": 1.0,
        "lora_rank": 16,
        "lr_finetune": 3e-3,
        "weight_decay": 1e-4,
    }
    distributions = {
        "backbone": CategoricalDistribution(["test_resnet"]),
        "augmentation": CategoricalDistribution(["none"]),
        "unfreeze": CategoricalDistribution(["lora"]),
        "unfreeze_depth": FloatDistribution(0.0, 1.0),
        "lora_rank": CategoricalDistribution([4, 16]),
        "lr_finetune": FloatDistribution(3e-5, 3e-3, log=True),
        "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    }
    study = create_study(config)
    study.add_trial(
        create_trial(
            state=TrialState.COMPLETE, value=0.5, params=params, distributions=distributions
        )
    )
    folder, _ = retrain(config, registry, trial_number=0, device="cpu", splits=few_digits)
    exported = load_file(str(folder / "model.safetensors"))
    plain = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    plain.load_state_dict(exported, strict=True)  # merged: the backbone's own tensors

    choice = choice_from_params(study.trials[0].params, config)
    assert choice.strategy_options == {"rank": 16}

    def weights_at(rank):
        again = dataclasses.replace(choice, strategy_options={"rank": rank})
        result = fit(
            again,
            few_digits,
            registry,
            device="cpu",
            seed=0,
            train_on="train+val",
            evaluate_on=None,
        )
        return result.model.state_dict()

    rank_16 = weights_at(16)
    assert all(torch.equal(exported[k], rank_16[k]) for k in exported)
    rank_4 = weights_at(4)
    assert not all(torch.equal(exported[k], rank_4[k]) for k in exported)


@pytest.mark.parametrize(
    "value, shown",
    [("0", "0"), ("-4", "-4"), ("[4, 2.5]", "2.5"), ('"8"', "'8'"), ("[]", None), ("[8, 8]", None)],
)
def test_a_bad_lora_rank_is_one_message(tmp_path, value, shown):
    path, _ = _lora_study(tmp_path)
    path.write_text(path.read_text().replace("lora_rank = [4, 8, 16]", f"lora_rank = {value}"))
    result = run_main("search", str(path), "--no-retrain", "--device", "cpu")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    if shown is None:
        assert lines[0].startswith("error: [search] lora_rank ")
    else:
        assert lines[0].startswith(
            f"error: [search] lora_rank = {value.strip()!s}".replace('"8"', "'8'")
        ), lines[0]
        assert f"{shown} is not a positive integer" in lines[0]
        assert "write a list to search it (e.g. [4, 8, 16]) or one integer (e.g. 8)" in lines[0]
    assert not (tmp_path / "lorarank" / "optuna.db").exists()  # no trial created


def test_a_lora_rank_without_the_lora_strategy_is_refused(tmp_path):
    """A rank with no lora strategy to use it would be silently ignored: one message."""
    path, _ = _lora_study(tmp_path, unfreeze='["top_k"]', load=False)
    result = run_main("search", str(path), "--no-retrain", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: [search] lora_rank = [4, 8, 16] has no effect: [search] unfreeze = ['top_k'] "
        'has no "lora" strategy; add "lora" to unfreeze, or remove lora_rank'
    )
    assert not (tmp_path / "lorarank" / "optuna.db").exists()


def test_portfolio_and_prior_carry_the_rank(tmp_path):
    from automl_tl.portfolio import portfolio
    from automl_tl.prior import fits_study, study_params

    _, config = _lora_study(tmp_path, unfreeze='["lora"]')
    assert portfolio(config, 1)[0]["lora_rank"] == 8  # LoRA's usual rank, when listed
    config.search.lora_rank = [4, 16]
    assert portfolio(config, 1)[0]["lora_rank"] == 16  # else the middle listed one
    earlier = {
        "backbone": "test_resnet",
        "augmentation": "none",
        "unfreeze": "lora",
        "unfreeze_depth": 1.0,
        "lr": 1e-3,
        "weight_decay": 1e-4,
    }
    assert fits_study(config, {**earlier, "lora_rank": 16})["lora_rank"] == 16
    assert "lora_rank" not in fits_study(config, {**earlier, "lora_rank": 8})  # not searched
    assert study_params(config, {**earlier, "lora_rank": 4}, 0)["lora_rank"] == 4
    config.search.lora_rank = [8]  # fixed: no parameter
    assert "lora_rank" not in portfolio(config, 1)[0]
