"""Every timm architecture as a backbone.

Weights per backbone (``[weights]`` in the study file):

- ``"none"``: random init (the scratch baseline);
- ``"timm"`` or ``"timm:TAG"``: timm's hub weights (``pretrained=True``), through the Hugging
  Face cache, so ``HF_HUB_OFFLINE=1`` with a pre-filled cache works with no network;
- a path to a ``.safetensors`` file or a torch checkpoint (read with ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from automl_tl import hookimpl
from automl_tl.components import Backbone
from automl_tl.errors import UserError
from automl_tl.weights import load_weights


class TimmBackbone(Backbone):
    """A timm model by architecture name, e.g. ``resnet50`` or ``test_vit``."""

    description = "timm model"

    def __init__(self, name: str) -> None:
        self.name = name

    def _create(self, num_classes: int, pretrained: bool, model_name: str, image_size: int | None):
        if image_size is not None:
            try:
                # Fixed-size models (ViTs) need the study's size; others reject the argument.
                return timm.create_model(
                    model_name, pretrained=pretrained, num_classes=num_classes, img_size=image_size
                )
            except TypeError:
                pass
        return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes)

    def create(
        self, num_classes: int, weights: str = "none", image_size: int | None = None
    ) -> nn.Module:
        if weights in ("none", "", None):
            return self._create(num_classes, False, self.name, image_size)
        if weights == "timm" or weights.startswith("timm:"):
            tag = weights.partition(":")[2]
            model_name = f"{self.name}.{tag}" if tag else self.name
            try:
                return self._create(num_classes, True, model_name, image_size)
            except Exception as exc:  # network, missing cache, unknown tag
                raise UserError(
                    f"cannot get timm hub weights for {model_name!r}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}. Without internet, pre-fill the "
                    "Hugging Face cache (HF_HOME, HF_HUB_OFFLINE=1) on a connected machine, or save "
                    f'the weights to a file and set [weights] {self.name} = "/path/model.safetensors".'
                ) from exc
        model = self._create(num_classes, False, self.name, image_size)
        load_weights(model, Path(weights), self.head_parameters(model))
        return model


@hookimpl(trylast=True)
def register_backbones(register):
    for name in timm.list_models():
        register(TimmBackbone(name))
