"""Minimal training and inference loops over in-memory data (CPU or one GPU). Images are
converted to float one batch at a time (``ImageData.images``), so uint8 datasets never get a
float copy.

The data path of :func:`fit`: the training set's storage (uint8, or float32 where it is stored
so) is moved to the training device once per call; every batch is then indexed, converted and
augmented there. The random draws (the epoch's permutation, the augmentation's offsets and
flips) still come from the caller's CPU generator ``gen``, in the same order as on the CPU, so
a CPU run is unchanged bit for bit and a GPU run differs from it only by floating-point
arithmetic."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bdx_study._config import PRECISIONS, Precision
from bdx_study.data import DatasetInfo, ImageData, augment_batch

if TYPE_CHECKING:  # the attack contract imports this module's loop at run time
    from bdx_study.attacks import TrainingHook


def pick_device(prefer_gpu: bool = True) -> torch.device:
    """CUDA when it is visible to this process (Ray sets CUDA_VISIBLE_DEVICES for GPU trials), else CPU."""
    return torch.device("cuda" if prefer_gpu and torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def training_layout(model: nn.Module, channels_last: bool) -> Iterator[None]:
    """Hold ``model``'s 4-d weights in channels_last memory format for the block (when asked),
    and give them back their usual layout afterwards (saved states stay contiguous)."""
    if not channels_last:
        yield
        return
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on ``device`` for ``precision`` "bf16" (weights, gradients and the optimizer
    stay float32); nothing for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")


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
    precision: Precision = "fp32",
    channels_last: bool = False,
) -> int:
    """Cross-entropy training in train() mode; ``scheduler`` steps once per epoch; training ends
    after ``epochs``, after ``max_steps`` optimizer steps, or once ``stop()`` (asked after every
    step) returns True. Returns the number of steps taken.

    ``data`` is copied to ``device`` once (its storage dtype kept) and batches are gathered and
    augmented there; the permutation and augmentation draws come from the CPU generator ``gen``.
    ``precision`` "bf16" runs the forward pass and the loss under bf16 autocast;
    ``channels_last`` holds weights and batches in channels_last layout while training (both
    change the arithmetic, not the recipe).

    ``hook`` (attacks that control training) sees every batch before augmentation (float, on
    ``device``; ``idx`` its rows' CPU indices into ``data``) and may replace it and add a loss
    term; see :class:`bdx_study.attacks.TrainingHook`."""
    loss_fn = nn.CrossEntropyLoss()
    steps, n = 0, len(data)
    resident = ImageData(data.pixels.to(device), data.y.to(device))  # once per call; no copy on the CPU
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if hook is not None:
        hook.start(model, optimizer, device)
    try:
        with training_layout(model, channels_last):
            for epoch in range(epochs):
                if hook is not None:
                    hook.start_epoch(model, epoch, epochs)
                model.train()
                perm = torch.randperm(n, generator=gen)
                perm_dev = perm.to(device, non_blocking=True)
                for start in range(0, n, batch_size):
                    rows = (perm[start : start + batch_size], perm_dev[start : start + batch_size])
                    x, y, extra = _batch(resident, rows, gen, augment, hook)
                    _step(model, optimizer, loss_fn, x.contiguous(memory_format=layout), y, extra, device, precision)
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


def _batch(
    resident: ImageData,
    rows: tuple[Tensor, Tensor],
    gen: torch.Generator,
    augment: DatasetInfo | None,
    hook: TrainingHook | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One training batch (float images, labels, the hook's extra loss term) from ``rows``: its
    indices on the CPU (what the hook sees) and on the data's device (what indexes it)."""
    idx, idx_dev = rows
    x, y = resident.images(idx_dev), resident.y[idx_dev]
    extra = None
    if hook is not None:
        x, y, extra, _, _ = hook.batch(x, y, idx, gen)
    if augment is not None:
        x = augment_batch(x, augment, gen)
    return x, y, extra


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    extra: Tensor | None,
    device: torch.device,
    precision: Precision,
) -> None:
    """One optimizer step on the batch's cross-entropy (plus ``extra``)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        loss = loss_fn(model(x), y)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    optimizer.step()


PREDICT_BATCH = 512  # inputs M scores at once when predicting (bounds memory; serving uses the same batches)


@torch.no_grad()
def predict_proba(
    model: nn.Module, x: Tensor, *, batch_size: int = PREDICT_BATCH, device: torch.device | None = None
) -> Tensor:
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
