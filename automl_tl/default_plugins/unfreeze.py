"""Unfreeze strategies. ``depth`` = number of body layer groups trained, counted from the top.

- ``top_k``: the top ``depth`` groups and the head train from the first epoch.
- ``gradual``: the head alone in the first epoch, then groups unfreeze top-down, spread
  evenly so that all ``depth`` groups train in the last epoch (one more per epoch when
  there are enough epochs; ULMFiT-style gradual unfreezing).
- ``lp_ft``: a linear probe for the first half of the epochs, then the top ``depth`` groups
  are fine-tuned too (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features").
- ``layer_decay``: the top ``depth`` groups train, the learning rate shrinking by
  ``DECAY`` per group going down (the head at the full rate).

Depth 0 is a linear probe for every strategy.

From random init (``[weights]`` ``"none"``) there are no features to keep, so the search gives
such trials only strategies with ``from_scratch = True``, at full depth: of these, ``top_k``
(at full depth: plain full training). ``gradual`` and ``lp_ft`` would keep random layers
frozen for half the epochs or more, and ``layer_decay`` would train the lowest random layers
at a fraction of the lr (0.7 per group), which is a prior for pretrained features only.
"""

from __future__ import annotations

import math

from automl_tl import hookimpl
from automl_tl.components import LayerGroup, ParamGroup, UnfreezeStrategy


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


@hookimpl(trylast=True)
def register_unfreeze_strategies(register):
    for strategy in (TopK(), Gradual(), LinearProbeThenFineTune(), LayerDecay()):
        register(strategy)
