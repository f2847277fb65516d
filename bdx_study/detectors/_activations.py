"""M's layer activations, and one forward pass of M shared by everything that needs it.

A family whose features read M's hidden layers (TED) would run M again on every input it scores,
although serving has just run M to get the prediction. :func:`model_pass` runs M once on a batch,
with hooks on every convolution and linear layer when asked, and within its block
:func:`layer_activations` on that very batch returns what the pass recorded instead of running M
again: a committee with TED as a member serves M's forward once for the prediction and for TED.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from bdx_study._lazy import LazyModule

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
else:  # importable without torch: TED's module (read by validation) imports this one
    torch, nn = LazyModule("torch"), LazyModule("torch.nn")

LAYER_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear")  # the torch.nn classes whose outputs are recorded
ACTIVATION_BATCH = 128  # inputs whose activations are held at once (ResNet-18 on 32x32: ~0.3 GB)

# (model, batch key, activations) of the model_pass block in progress, if any
_PASS: ContextVar[tuple[nn.Module, tuple[Any, ...], list[Tensor]] | None] = ContextVar("bdx_model_pass", default=None)


def _key(x: Tensor) -> tuple[Any, ...]:
    """The identity of a batch: the same memory, shape and layout (a full slice of it matches)."""
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)


@contextmanager
def hooked_layers(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """While open, every forward of ``model`` fills the yielded dict with the flattened output of
    each conv and linear layer, keyed by module name in the order the layers ran."""
    acts: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[[nn.Module, Any, Tensor], None]:
        def fn(module: nn.Module, args: Any, out: Tensor) -> None:
            acts[name] = out.detach().flatten(1).float().clone()  # clone: an in-place ReLU may follow

        return fn

    types = tuple(getattr(nn, t) for t in LAYER_TYPES)
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, types)]
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


def _forward(model: nn.Module, x: Tensor, device: torch.device, record: bool) -> tuple[Tensor, list[Tensor]]:
    """(logits, activations if ``record``) of ``model`` on ``x``, in eval() mode (restored), without
    gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if not record:
                return model(x.to(device)), []
            with hooked_layers(model) as acts:
                logits = model(x.to(device))
        if not acts:
            raise ValueError(f"the model ({type(model).__name__}) has no conv or linear layer to read activations of")
        return logits, list(acts.values())
    finally:
        model.train(was_training)


def layer_activations(model: nn.Module, x: Tensor, device: torch.device) -> list[Tensor]:
    """Flattened activations (N, D_l) of every conv and linear layer of ``model`` on ``x``, on
    ``device``, in the order the layers run: the ones :func:`model_pass` recorded for this very
    batch, else from a forward pass now."""
    shared = _PASS.get()
    if shared is not None and shared[0] is model and shared[1] == _key(x):
        return shared[2]
    return _forward(model, x, device, record=True)[1]


@contextmanager
def model_pass(model: nn.Module, x: Tensor, device: torch.device, *, activations: bool) -> Iterator[Tensor]:
    """M's softmax probabilities on ``x`` (CPU), from one forward pass; with ``activations``, that
    pass also records every layer's output, and :func:`layer_activations` on ``x`` inside the block
    returns them (keep ``x`` to a batch whose activations fit in memory)."""
    logits, acts = _forward(model, x, device, record=activations)
    token = _PASS.set((model, _key(x), acts) if activations else None)
    try:
        yield torch.softmax(logits, dim=1).cpu()
    finally:
        _PASS.reset(token)
