"""Minimal training and inference loops over in-memory data (CPU or one GPU). Images are
converted to float one batch at a time (``ImageData.images``), so uint8 datasets never get a
float copy."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bdx_study.data import DatasetInfo, ImageData, augment_batch

if TYPE_CHECKING:  # the attack contract imports this module's loop at run time
    from bdx_study.attacks import TrainingHook


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
    hook: TrainingHook | None = None,
) -> int:
    """Cross-entropy training in train() mode; ``scheduler`` steps once per epoch; training ends
    after ``epochs``, after ``max_steps`` optimizer steps, or once ``stop()`` (asked after every
    step) returns True. Returns the number of steps taken.

    ``hook`` (attacks that control training) sees every batch before augmentation and may
    replace it and add a loss term; see :class:`bdx_study.attacks.TrainingHook`."""
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    n = len(data)
    if hook is not None:
        hook.start(model, optimizer, device)
    try:
        for epoch in range(epochs):
            if hook is not None:
                hook.start_epoch(model, epoch, epochs)
            model.train()
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                x = data.images(idx).to(device, non_blocking=True)
                y = data.y[idx].to(device, non_blocking=True)
                extra = None
                if hook is not None:
                    x, y, extra, _, _ = hook.batch(x, y, idx, gen)
                if augment is not None:
                    x = augment_batch(x, augment, gen)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                if extra is not None:
                    loss = loss + extra
                loss.backward()
                optimizer.step()
                if hook is not None:
                    hook.after_step()
                steps += 1
                if (max_steps is not None and steps >= max_steps) or (stop is not None and stop()):
                    return steps
            if scheduler is not None:
                scheduler.step()
    finally:
        if hook is not None:
            hook.finish()
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


@torch.no_grad()
def predict_data(
    model: nn.Module,
    data: ImageData,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 512,
    device: torch.device | None = None,
) -> Tensor:
    """Predicted classes (N,) for ``data``, converted batch by batch; ``transform`` (e.g. a
    test-time trigger) is applied to each float batch first."""
    preds = []
    for idx in data.batches(batch_size):
        x = data.images(idx)
        if transform is not None:
            x = transform(x)
        preds.append(predict_proba(model, x, batch_size=batch_size, device=device).argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def accuracy(model: nn.Module, data: ImageData, *, device: torch.device | None = None) -> float:
    if len(data) == 0:
        return float("nan")
    return float((predict_data(model, data, device=device) == data.y).float().mean())
