"""Every timm architecture as a backbone.

Weights per backbone (``[weights]`` in the study file; the host resolves relative paths and
``pretrain:SOURCE`` before a backbone sees them):

- ``"none"``: random init (the scratch baseline);
- ``"timm"`` or ``"timm:TAG"``: timm's hub weights (``pretrained=True``), through the Hugging
  Face cache, so ``HF_HUB_OFFLINE=1`` with a pre-filled cache works with no network; when the
  file cannot be had, one message names the repository and file and how to supply them; the
  tag is checked against timm's registry before a search starts (``check_weights``);
- ``"local-dir:DIR"``: a timm export folder (``config.json`` + ``model.safetensors``), e.g. a
  previous study's ``best/``, so one study's model seeds another;
- a path to a ``.safetensors`` file or a torch checkpoint (read with ``weights_only=True``).

Local weights go through :func:`automl_tl.weights.load_weights`: a head with another class
count is replaced, an input convolution trained on another channel count is adapted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from automl_tl import hookimpl
from automl_tl.components import Backbone
from automl_tl.errors import UserError, did_you_mean
from automl_tl.weights import load_weights, local_dir_weights


def _hub_source(model_name: str) -> tuple[str, str]:
    """(where, what): the Hugging Face repo (or URL) and file timm reads for ``model_name``."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        return "", ""
    if cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id}", cfg.hf_hub_filename or "model.safetensors"
    if cfg.url:
        return cfg.url, cfg.url.rsplit("/", 1)[-1]
    return "", ""


#: architecture name -> whether it takes ``drop_path_rate`` (TimmBackbone.regularizers)
_TAKES_DROP_PATH: dict[str, bool] = {}


class TimmBackbone(Backbone):
    """A timm model by architecture name, e.g. ``resnet50`` or ``test_vit``."""

    description = "timm model"

    def __init__(self, name: str) -> None:
        self.name = name

    def _create(
        self,
        num_classes: int,
        pretrained: bool,
        model_name: str,
        image_size: int | None,
        **options: Any,
    ):
        if image_size is not None:
            try:
                # Fixed-size models (ViTs) need the study's size; others reject the argument.
                return timm.create_model(
                    model_name,
                    pretrained=pretrained,
                    num_classes=num_classes,
                    img_size=image_size,
                    **options,
                )
            except TypeError:
                pass
        return timm.create_model(
            model_name, pretrained=pretrained, num_classes=num_classes, **options
        )

    def regularizers(self) -> frozenset[str]:
        """``{"drop_path"}`` when the architecture takes ``drop_path_rate`` (most timm
        models; not VGG, say): found once by building the model without weights."""
        if self.name not in _TAKES_DROP_PATH:
            try:
                with torch.random.fork_rng(devices=[]):  # a trial's seeded init stays as it was
                    timm.create_model(
                        self.name, pretrained=False, num_classes=2, drop_path_rate=0.1
                    )
                _TAKES_DROP_PATH[self.name] = True
            except TypeError:
                _TAKES_DROP_PATH[self.name] = False
        return frozenset({"drop_path"}) if _TAKES_DROP_PATH[self.name] else frozenset()

    def _hub(self, num_classes: int, tag: str, image_size: int | None, **options: Any) -> nn.Module:
        self.check_weights(f"timm:{tag}" if tag else "timm")
        model_name = f"{self.name}.{tag}" if tag else self.name
        where, filename = _hub_source(model_name)
        if not where:
            raise UserError(
                f"timm has no pretrained weights for {model_name!r}; use another [weights] source "
                '("none", a local file, local-dir:DIR or pretrain:SOURCE)'
            )
        try:
            return self._create(num_classes, True, model_name, image_size, **options)
        except Exception as exc:  # network, missing cache entry
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise UserError(
                f"cannot get timm hub weights for {model_name!r}: {filename} from {where} is "
                f"neither in the Hugging Face cache nor downloadable ({type(exc).__name__}: "
                f"{reason}). Supply it one of two ways: on a connected machine run `python -c "
                f"\"import timm; timm.create_model('{model_name}', pretrained=True)\"` and copy "
                "its Hugging Face cache (HF_HOME, default ~/.cache/huggingface) here, then run "
                f"with HF_HUB_OFFLINE=1; or download {filename} yourself and set [weights] "
                f'{self.name} = "/path/{filename}".'
            ) from exc

    def pretrained_tags(self) -> list[str]:
        """The hub tags timm knows for this architecture (``a1_in1k``, ...), from its registry."""
        return [n.partition(".")[2] for n in timm.list_pretrained(f"{self.name}.*")]

    def check_weights(self, source: str) -> None:
        """``"none"``, ``"timm"`` (the default tag) and ``"timm:TAG"`` with a tag timm knows
        for the architecture; checked offline in timm's registry, nothing is downloaded."""
        if source == "none":
            return
        name, _, tag = source.partition(":")
        tags = self.pretrained_tags()
        if name == "timm" and (tag in tags or not tag and tags):
            return
        if name == "timm" and not tags:
            raise UserError(f"{self.name} has no pretrained weights in timm")
        if name == "timm":
            raise UserError(
                f'{self.name} has no pretrained tag "{tag}"{did_you_mean(tag, tags)}; '
                f"known tags: {', '.join(tags)}"
            )
        takes = (
            f'it takes "timm" (default tag {tags[0]}) or "timm:TAG"; known tags: ' + ", ".join(tags)
            if tags
            else "timm has no pretrained weights for it"
        )
        raise UserError(
            f'{self.name} has no weight source "{source}"{did_you_mean(name, ["timm"])}; {takes}'
        )

    def create(
        self,
        num_classes: int,
        weights: str = "none",
        image_size: int | None = None,
        drop_path_rate: float | None = None,
    ) -> nn.Module:
        options = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
        if weights in ("none", "", None):
            return self._create(num_classes, False, self.name, image_size, **options)
        if weights == "timm" or weights.startswith("timm:"):
            return self._hub(num_classes, weights.partition(":")[2], image_size, **options)
        if weights.startswith("local-dir:"):
            path = local_dir_weights(weights[len("local-dir:") :], self.name)
        else:
            path = Path(weights)
        model = self._create(num_classes, False, self.name, image_size, **options)
        load_weights(model, path, self.head_parameters(model))
        return model


@hookimpl(trylast=True)
def register_backbones(register):
    for name in timm.list_models():
        register(TimmBackbone(name))
