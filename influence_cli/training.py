"""A minimal, deterministic training loop for the demos, benchmarks and smoke tests.

Attribution does not need it; it exists so that a model can be trained on the
bundled or local data with one seeded recipe (Adam, cross-entropy or squared
error, fixed data order per epoch), e.g. to retrain on subsets for the LDS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from influence_cli import task as task_lib


@dataclass
class TrainRecipe:
    """Hyper-parameters of `train_model`."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


def train_model(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, recipe: TrainRecipe, kind: str = "classification") -> nn.Module:
    """Trains `model` in place on in-memory tensors and returns it in eval mode.

    Args:
        inputs: [N, ...] float inputs (already transformed).
        targets: [N] class labels or [N, ...] regression targets.
    """
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    n = len(inputs)
    for _ in range(recipe.epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, recipe.batch_size):
            idx = order[s : s + recipe.batch_size]
            loss = task_lib.per_example_loss(model(inputs[idx]), targets[idx], kind).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Share of examples whose arg-max output is the label."""
    correct = 0
    for s in range(0, len(inputs), batch_size):
        correct += int((model(inputs[s : s + batch_size]).argmax(1) == labels[s : s + batch_size]).sum())
    return correct / max(1, len(inputs))
