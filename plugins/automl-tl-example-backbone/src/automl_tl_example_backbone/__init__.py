"""A team's own backbone for automl-tl: copy this package, rename it, replace the network.

What automl-tl needs from a backbone is :class:`automl_tl.Backbone`: ``create()`` builds the
network with a fresh head (optionally from a local weights file), ``layer_groups()`` orders
its body input -> output for the unfreeze strategies, ``data_config()`` says how to normalize
its input. ``register_backbones`` hands it to automl-tl; the entry point in pyproject.toml
makes automl-tl find this module once the package is installed.
``make_weights.py`` writes a weights file for it (see docs/writing-plugins.md).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

import automl_tl
from automl_tl.weights import load_weights


class ExampleCNN(nn.Module):
    """Three conv stages and a linear head; any nn.Module works the same way."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.stage1 = stage(3, width)
        self.stage2 = stage(width, width * 2)
        self.stage3 = stage(width * 2, width * 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width * 4, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.head(self.pool(x).flatten(1))


class ExampleBackbone(automl_tl.Backbone):
    name = "example_cnn"
    description = "template: a hand-written 3-stage CNN"

    def create(self, num_classes, weights="none", image_size=None):
        model = ExampleCNN(num_classes)
        if weights not in ("none", "", None):
            if weights == "timm" or weights.startswith("timm:"):
                raise automl_tl.UserError(
                    "example_cnn has no timm hub weights; use a local file or 'none'"
                )
            load_weights(model, Path(weights), self.head_parameters(model))
        return model

    def head_parameters(self, model):
        return ["head.weight", "head.bias"]

    def layer_groups(self, model):
        # ordered input -> output; the unfreeze depth counts these from the top
        return [
            [f"{stage}.{n}" for n, _ in getattr(model, stage).named_parameters()]
            for stage in ("stage1", "stage2", "stage3")
        ]

    def data_config(self, model):
        # the normalization the weights were trained with (make_weights.py uses it too)
        return automl_tl.DataConfig(
            input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
        )


@automl_tl.hookimpl
def register_backbones(register):
    register(ExampleBackbone())
