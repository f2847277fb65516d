"""The attacker's own surrogate classifier (clean-label PGD, the LF trigger's universal
perturbation): a small CNN trained on the clean training set, cached per (data, recipe), and
the adversarial maths run against it."""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdx_study.archs import create_model
from bdx_study.attacks._base import Attack, AttackContext
from bdx_study.data import ImageData


def data_fingerprint(data: ImageData) -> str:
    """sha256 of a dataset's pixels (as stored) and labels: what an artifact was trained on."""
    h = hashlib.sha256()
    h.update(str((tuple(data.pixels.shape), str(data.pixels.dtype))).encode())
    h.update(data.pixels.contiguous().numpy().tobytes())
    h.update(data.y.contiguous().numpy().tobytes())
    return h.hexdigest()


def channel_stats(data: ImageData, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the images in [0, 1], chunk by chunk (no full float copy)."""
    c = data.shape[0]
    s, s2, n = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for start in range(0, len(data), chunk):
        x = data.images(slice(start, start + chunk)).double()
        s += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / max(n, 1)
    std = (s2 / max(n, 1) - mean * mean).clamp_min(1e-6).sqrt()
    return mean.tolist(), std.tolist()


def surrogate(attack: Attack, train: ImageData, context: AttackContext | None, *, epochs: int, seed: int) -> nn.Module:
    """A ``small_cnn`` trained on the clean ``train`` (Adam 1e-3, batch 128, ``epochs``), in eval
    mode on the CPU; taken from ``context.store`` when one was trained on the same data."""
    from bdx_study.training import fit  # training imports the attack contract

    context = context or AttackContext()
    mean, std = channel_stats(train)

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return create_model("small_cnn", attack.input_shape, attack.num_classes, mean, std)

    def train_it() -> dict[str, Tensor]:
        model = build().to(context.device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        fit(
            model,
            train,
            opt,
            epochs=epochs,
            batch_size=128,
            gen=torch.Generator().manual_seed(seed),
            device=context.device,
        )
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    identity = {
        "input_shape": list(attack.input_shape),
        "num_classes": attack.num_classes,
        "epochs": epochs,
        "seed": seed,
        "data": data_fingerprint(train),
    }
    if context.store is None:
        state = train_it()
    else:
        state, _ = context.store.get_or_build("surrogate", identity, train_it)
    model = build()
    model.load_state_dict(state)
    return model.eval()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    norm: Literal["l2", "linf"],
    step_size: float | None = None,
) -> Tensor:
    """Untargeted PGD: perturb ``x`` within an ``eps`` ball (L2 per image, or L-inf) to raise the
    cross-entropy of its true label ``y``; stays in [0, 1]. Step size: 2.5 eps / steps."""
    model.eval()
    alpha = 2.5 * eps / steps if step_size is None else step_size
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if norm == "linf":
                delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
            else:
                g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = delta + alpha * g
                factor = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                delta = delta * factor.view(-1, 1, 1, 1)
            delta = (x + delta).clamp(0.0, 1.0) - x
    return (x + delta).detach()
