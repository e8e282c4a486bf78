"""Make a weights file for ``example_cnn``: train it on a source task, save its state dict.

A team's checkpoint comes from its own training code; this script stands in for it. It
trains :class:`~automl_tl_example_backbone.ExampleCNN` on scikit-learn's handwritten digits
0-4 (a source task: the study may use other classes) for a few epochs on the CPU, and writes
the state dict as ``.safetensors``::

    python -m automl_tl_example_backbone.make_weights weights/example_cnn.safetensors

Then point the study at the file: ``[weights] example_cnn = "weights/example_cnn.safetensors"``.
automl-tl loads every tensor and replaces the 5-class head with one for the study's classes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from automl_tl_example_backbone import ExampleBackbone, ExampleCNN

SOURCE_CLASSES = 5  # digits 0-4


def source_task(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits 0-4 as float RGB batches at ``image_size``, normalized as the backbone expects."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < SOURCE_CLASSES
    x = torch.tensor(digits.images[keep], dtype=torch.float32).div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear").repeat(1, 3, 1, 1)
    cfg = ExampleBackbone().data_config(None)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(digits.target[keep], dtype=torch.int64)


def train(epochs: int = 4, seed: int = 0) -> tuple[ExampleCNN, float]:
    """ExampleCNN trained on the source task; returns it and its accuracy on that task."""
    torch.manual_seed(seed)
    x, y = source_task()
    model = ExampleCNN(SOURCE_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    return model, accuracy


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    model, accuracy = train(args.epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out))
    print(f"wrote {args.out}: example_cnn trained on digits 0-4, accuracy {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
