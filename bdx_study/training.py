"""Minimal training and inference loops over in-memory tensors (CPU or one GPU)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bdx_study.data import DatasetInfo, ImageData, augment_batch


def pick_device(prefer_gpu: bool = True) -> torch.device:
    """CUDA when it is visible to this process (Ray sets CUDA_VISIBLE_DEVICES for GPU trials), else CPU."""
    return torch.device("cuda" if prefer_gpu and torch.cuda.is_available() else "cpu")


def fit(
    model: nn.Module,
    data: ImageData,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    gen: torch.Generator,
    augment: DatasetInfo | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    stop: Callable[[], bool] | None = None,
    max_steps: int | None = None,
    device: torch.device = torch.device("cpu"),
) -> int:
    """Cross-entropy training in train() mode; ``scheduler`` steps once per epoch; training ends
    after ``epochs``, after ``max_steps`` optimizer steps, or once ``stop()`` (asked after every
    step) returns True. Returns the number of steps taken."""
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    n = len(data)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            x = data.x[idx]
            if augment is not None:
                x = augment_batch(x, augment, gen)
            x, y = x.to(device, non_blocking=True), data.y[idx].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
            steps += 1
            if (max_steps is not None and steps >= max_steps) or (stop is not None and stop()):
                return steps
        if scheduler is not None:
            scheduler.step()
    return steps


@torch.no_grad()
def predict_proba(model: nn.Module, x: Tensor, *, batch_size: int = 512, device: torch.device | None = None) -> Tensor:
    """Softmax probabilities (N, classes) on the CPU, model in eval() mode (restored afterwards)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = [x[i : i + batch_size] for i in range(0, len(x), batch_size)] or [x[:0]]
    out = [torch.softmax(model(c.to(device)), dim=1).cpu() for c in chunks]
    model.train(was_training)
    return torch.cat(out)


def accuracy(model: nn.Module, data: ImageData, *, device: torch.device | None = None) -> float:
    if len(data) == 0:
        return float("nan")
    pred = predict_proba(model, data.x, device=device).argmax(1)
    return float((pred == data.y).float().mean())
