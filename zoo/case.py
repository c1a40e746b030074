"""What every zoo builder returns: an eval-mode model with example inputs."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class ModelCase:
    """An eval-mode model with example inputs; ``dynamic_batch`` maps input name -> batch axis."""

    name: str
    model: nn.Module
    args: tuple
    kwargs: dict
    dynamic_batch: dict[str, int]
    config: Any = None

    def run(self):
        """Run the model on its example inputs without autograd."""
        with torch.no_grad():
            return self.model(*self.args, **self.kwargs)

    def dynamic_shapes(self) -> dict:
        """``torch.export`` ``dynamic_shapes`` with one shared ``Dim("batch")`` for every input."""
        batch = torch.export.Dim("batch")
        return {name: {axis: batch} for name, axis in self.dynamic_batch.items()}


def hf_case(name: str, model: nn.Module, **inputs: torch.Tensor) -> ModelCase:
    """Wrap an HF model whose inputs are all batch-major keyword tensors."""
    return ModelCase(name, model.eval(), (), inputs, {k: 0 for k in inputs}, model.config)


def images(batch: int, channels: int, size: int) -> torch.Tensor:
    """Seeded random images (the same for every build)."""
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))
