"""Unfreeze strategies. ``depth`` = number of body layer groups trained, counted from the top.

- ``top_k``: the top ``depth`` groups and the head train from the first epoch.
- ``gradual``: the head alone in the first epoch, then groups unfreeze top-down, spread
  evenly so that all ``depth`` groups train in the last epoch (one more per epoch when
  there are enough epochs; ULMFiT-style gradual unfreezing).
- ``lp_ft``: a linear probe for the first half of the epochs, then the top ``depth`` groups
  are fine-tuned too (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features").
- ``layer_decay``: the top ``depth`` groups train, the learning rate shrinking by
  ``DECAY`` per group going down (the head at the full rate).

Parameter-efficient strategies train part of the top ``depth`` groups (the head in full):

- ``bitfit``: only the biases (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient
  Fine-tuning for Transformer-based Masked Language-models").
- ``norm_fit``: only the normalization layers' affine parameters (BatchNorm, LayerNorm,
  GroupNorm, …; Frankle et al. 2021, "Training BatchNorm and Only BatchNorm").
- ``lora``: every ``nn.Linear`` and ``nn.Conv2d`` (zero padding, no channel groups) of those
  groups gets a low-rank adapter (rank: the trial's ``lora_rank``, searched from ``[search]
  lora_rank``, default 4, 8 or 16; alpha = 2 x rank, so the scale alpha / rank is 2 at every
  rank) (:mod:`automl_tl.adapters`, Hu et al. 2021) and its weight
  stays frozen; the groups' other parameters (biases, norms, depthwise convolutions, tokens)
  train as with ``top_k``. The adapters are merged into the weights after training, so the
  exported model is the backbone's own architecture.

They skip the weight gradients of the frozen matrices and keep no optimizer state for them
(see benchmarks/RESULTS.md for the measured per-step speed and optimizer memory).

Depth 0 is a linear probe for every strategy.

From random init (``[weights]`` ``"none"``) there are no features to keep, so the search gives
such trials only strategies with ``from_scratch = True``, at full depth: of these, ``top_k``
(at full depth: plain full training). ``gradual`` and ``lp_ft`` would keep random layers
frozen for half the epochs or more, and ``layer_decay`` would train the lowest random layers
at a fraction of the lr (0.7 per group), which is a prior for pretrained features only.
"""

from __future__ import annotations

import math

from torch import nn

from automl_tl import hookimpl
from automl_tl.adapters import add_lora, can_adapt, merge_lora
from automl_tl.components import LayerGroup, ParamGroup, UnfreezeStrategy
from automl_tl.errors import UserError


def _top(groups: list[LayerGroup], depth: int) -> list[LayerGroup]:
    depth = max(0, min(depth, len(groups)))
    return groups[len(groups) - depth :] if depth else []


def _flat(groups: list[LayerGroup]) -> list[str]:
    return [n for g in groups for n in g]


class TopK(UnfreezeStrategy):
    name = "top_k"
    description = "train the top k layer groups and the head"
    from_scratch = True  # at full depth: the whole body trains from the first epoch

    def param_groups(self, groups, head, depth):
        return [ParamGroup(list(head) + _flat(_top(groups, depth)))]


class Gradual(TopK):
    name = "gradual"
    description = "head first, then unfreeze top-down until k groups train in the last epoch"
    from_scratch = False  # random layers frozen for most epochs

    def trainable(self, epoch, epochs, groups, head, depth):
        unfrozen = math.ceil(depth * epoch / max(1, epochs - 1))
        return set(head) | set(_flat(_top(groups, unfrozen)))


class LinearProbeThenFineTune(TopK):
    name = "lp_ft"
    description = "linear probe for the first half of the epochs, then fine-tune the top k"
    from_scratch = False  # probes random features for half the epochs

    @staticmethod
    def probe_epochs(epochs: int) -> int:
        return max(1, epochs // 2) if epochs > 1 else epochs

    def trainable(self, epoch, epochs, groups, head, depth):
        if epoch < self.probe_epochs(epochs):
            return set(head)
        return set(head) | set(_flat(_top(groups, depth)))


class LayerDecay(UnfreezeStrategy):
    name = "layer_decay"
    description = "top k groups trainable, lr × 0.7 per group going down"
    DECAY = 0.7

    def param_groups(self, groups, head, depth):
        out = [ParamGroup(list(head), 1.0)]
        for i, group in enumerate(reversed(_top(groups, depth)), start=1):
            out.append(ParamGroup(list(group), self.DECAY**i))
        return out


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> the module that holds it directly."""
    return {
        f"{prefix}.{n}" if prefix else n: module
        for prefix, module in model.named_modules()
        for n, _ in module.named_parameters(recurse=False)
    }


def is_normalization(module: nn.Module) -> bool:
    """BatchNorm / InstanceNorm, LayerNorm, GroupNorm, RMSNorm and timm's variants of them
    (``BatchNormAct2d``, ``LayerNorm2d``, ``RmsNorm``: a class name with "Norm")."""
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return True
    return "norm" in type(module).__name__.lower()


def is_bias(name: str) -> bool:
    """A bias term: ``bias``, or a named one such as timm's ``q_bias`` / ``v_bias``."""
    last = name.rsplit(".", 1)[-1]
    return last == "bias" or last.endswith("_bias")


class BitFit(TopK):
    name = "bitfit"
    description = "train only the biases of the top k groups, and the head"
    from_scratch = False  # a random body with trained biases is still a random body

    def adapt(self, model, groups, head, depth):
        return [[n for n in g if is_bias(n)] for g in groups]


class NormFit(TopK):
    name = "norm_fit"
    description = (
        "train only the normalization layers (scale, shift) of the top k groups, and the head"
    )
    from_scratch = False

    def adapt(self, model, groups, head, depth):
        owners = _owners(model)
        return [[n for n in g if is_normalization(owners[n])] for g in groups]


class LoRA(TopK):
    name = "lora"
    description = (
        "low-rank adapters on the Linear/Conv2d layers of the top k groups (merged on export)"
    )
    from_scratch = False

    def __init__(self, rank: int = 8) -> None:
        #: the adapters' rank; 8 (the registered strategy's) for a trial with none, as
        #: trials of studies from before ``[search] lora_rank`` trained
        self.rank = rank

    @property
    def alpha(self) -> float:
        """2 x rank: the update's scale alpha / rank is 2 at every rank (the usual choice, so
        a searched rank changes the update's capacity, not its step size)."""
        return 2.0 * self.rank

    def configure(self, **options):
        unknown = {k: v for k, v in options.items() if k != "rank"}
        if unknown:
            return super().configure(**unknown)  # refused, naming them
        rank = options.get("rank", self.rank)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise UserError(f"the lora strategy's rank must be an integer >= 1, got {rank!r}")
        return LoRA(rank)

    def adapt(self, model, groups, head, depth):
        top = {n for g in _top(groups, depth) for n in g}
        owners = _owners(model)
        targets = {}  # module name -> the weight that stays frozen
        for name in top:
            prefix, _, last = name.rpartition(".")
            if last == "weight" and prefix and can_adapt(owners[name]):
                targets[prefix] = name
        added = add_lora(model, sorted(targets), self.rank, self.alpha)
        frozen = set(targets.values())
        out = []
        for group in groups:
            kept = []
            for n in group:
                if n in frozen:
                    kept += added[n.rpartition(".")[0]]
                else:
                    kept.append(n)
            out.append(kept)
        return out

    def merge(self, model):
        return merge_lora(model)


#: trained with top_k's schedule; opt-in in a study's [search] unfreeze (docs/architecture.md)
PARAMETER_EFFICIENT = ("bitfit", "norm_fit", "lora")


@hookimpl(trylast=True)
def register_unfreeze_strategies(register):
    for strategy in (
        TopK(),
        Gradual(),
        LinearProbeThenFineTune(),
        LayerDecay(),
        BitFit(),
        NormFit(),
        LoRA(),
    ):
        register(strategy)
