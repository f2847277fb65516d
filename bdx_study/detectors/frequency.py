"""Frequency-domain detector (Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A
Frequency Perspective", ICCV 2021), per ../shared/reference/detectors.md.

Triggers leave high-frequency artefacts that natural images lack. A binary CNN looks at the
per-channel orthonormal 2-D DCT-II of an input and says whether it carries a trigger; the score
is **p(poison) - p(clean)** (continuous, in [-1, 1]; higher = more suspicious), or with
``freq_score: logit`` the logit difference, which ranks identically but does not saturate.

**Trained by the project** in :meth:`Frequency.fit`, on the defender's clean finetune images
only: every epoch, each clean image (after the dataset's training augmentation) is paired with a
copy carrying one *synthetic* trigger, drawn afresh from ``seed``; the evaluated attack's trigger
is never seen (``fit`` receives clean data only). The synthetic triggers, after the authors'
training notebook, with sizes scaled by s = H / 32 from their 32 px originals (one kind per
image, uniformly among ``freq_triggers``):

- ``solid_patch``: a rectangle of sides uniform in [max(2, round(2 s)), max(3, round(7 s))]
  pixels (independently for height and width), at a random one of the four corners, a uniform
  random margin in [0, round(5 s)] pixels from both edges, filled with one random colour
  (U(0, 1) per channel); the authors use a white block;
- ``noise_patch``: the same placement, filled with U(0, 1) noise per pixel and channel;
- ``gaussian_noise``: additive Gaussian noise, mean 25/255, standard deviation sqrt(v)/255 with
  v ~ U(10, 70) per image, independent per pixel and channel, clipped (the authors' GaussNoise);
- ``shadow``: a random triangle with vertices uniform in the lower half of the image, its pixels
  multiplied by 0.5 (a stand-in for the authors' albumentations RandomShadow);
- ``image_blend``: x + 0.3 x', clipped, x' another random image of the clean finetune data;
- ``smooth``: x + a sin(2 pi (f_r r / H + f_c c / W) + phi), clipped, with integer frequencies
  f_r, f_c uniform in [0, 3] (not both 0), a ~ U(0.05, 0.15), phi ~ U(0, 2 pi): a low-frequency
  stand-in for the paper's smooth trigger (its Section 5), which the paper adds by finetuning.

Network (the paper's 6-conv CNN, scaled): three stages of [conv3x3 -> ELU -> BN] x 2, 2x2
max-pool and dropout 0.2 / 0.3 / 0.4, with ``freq_width`` x (1, 2, 4) channels (paper: 32, i.e.
32/64/128; default 16 here for the CPU budget), then a linear layer to 2 logits; for 16, 28 and
32 px inputs the last feature map is 2x2, 3x3 and 4x4. Its input is the DCT of the [0, 1] image
(the paper's is of the uint8 image: the same up to x255 and 8-bit rounding), standardized per
coefficient by the clean finetune images' DCT mean and standard deviation (floored at 0.01), a
fixed affine map the paper's network has to learn. Trained with Adam (lr 1e-3, weight decay 1e-4
as the paper's L2 1e-4; the paper: Adadelta), batch 64, ``freq_epochs`` epochs.

Cost per input: one forward of this small CNN; it is not the victim and is not counted as a
victim forward. The fitted state is the CNN's weights (and its DCT standardization).

Peer differences: backdoor-toolbox loads the authors' pretrained CIFAR-10 Keras model (here it is
retrained per victim and resolution) and fills its poison scores from hard predictions, so its
AUROC partly uses hard labels; here the score is always continuous.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from bdx_study._lazy import LazyModule

from ._base import MAIN, DetectorFamily, DetectorParams, FitContext, Fitted, fit_param
from ._registry import register_detector

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from bdx_study.data import DatasetInfo

    from ._frequency_net import DctNet
else:
    torch = LazyModule("torch")


SyntheticTrigger = Literal["solid_patch", "noise_patch", "gaussian_noise", "shadow", "image_blend", "smooth"]
ALL_TRIGGERS: tuple[SyntheticTrigger, ...] = (
    "solid_patch",
    "noise_patch",
    "gaussian_noise",
    "shadow",
    "image_blend",
    "smooth",
)


class FrequencyParams(DetectorParams):
    freq_triggers: tuple[SyntheticTrigger, ...] = fit_param(
        MAIN, ALL_TRIGGERS, min_length=1, description="synthetic trigger kinds the CNN learns from (see the docs)"
    )
    freq_epochs: int = fit_param(MAIN, 30, ge=1, le=10_000, description="epochs over the clean + synthetic pairs")
    freq_lr: float = fit_param(MAIN, 1e-3, gt=0, le=1, description="Adam learning rate of the DCT classifier")
    freq_batch_size: int = fit_param(MAIN, 64, ge=2, description="batch size (paper: 64)")
    freq_width: int = fit_param(
        MAIN, 16, ge=1, le=256, description="channels of the first stage (x1, x2, x4; paper 32; 16 fits a CPU)"
    )
    freq_score: Literal["prob_diff", "logit"] = Field(
        "prob_diff", description="prob_diff: p(poison) - p(clean) (paper); logit: same ranking, never saturates"
    )

    @field_validator("freq_triggers")
    @classmethod
    def _distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"freq_triggers lists a kind twice: {list(v)}")
        return v


STD_FLOOR = 0.01  # floor of the per-coefficient DCT standard deviation (about 2.5 grey levels)
WEIGHT_DECAY = 1e-4  # the paper's L2 regularisation of every conv


# ------------------------------------------------------------------------------------ synthetic triggers


def _corner_boxes(n: int, h: int, w: int, gen: torch.Generator) -> Tensor:
    """(n, h, w) boolean rectangles: random sides and margin, at a random corner (scaled from 32 px)."""
    s = h / 32.0
    lo, hi = max(2, round(2 * s)), max(3, round(7 * s))
    ph = torch.randint(lo, hi + 1, (n,), generator=gen)
    pw = torch.randint(lo, hi + 1, (n,), generator=gen)
    margin = torch.randint(0, round(5 * s) + 1, (n,), generator=gen)
    corner = torch.randint(0, 4, (n,), generator=gen)
    top = torch.where(corner < 2, margin, h - margin - ph).clamp_min(0)
    left = torch.where(corner % 2 == 0, margin, w - margin - pw).clamp_min(0)
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    t, lf = top[:, None, None], left[:, None, None]
    return (rows >= t) & (rows < t + ph[:, None, None]) & (cols >= lf) & (cols < lf + pw[:, None, None])


def _shadow(n: int, h: int, w: int, gen: torch.Generator) -> Tensor:
    """(n, h, w) boolean triangles with vertices uniform in the lower half of the image."""
    vr = h / 2.0 + torch.rand(n, 3, generator=gen) * (h / 2.0)
    vc = torch.rand(n, 3, generator=gen) * w
    r = torch.arange(h, dtype=torch.float32)[None, :, None] + 0.5
    c = torch.arange(w, dtype=torch.float32)[None, None, :] + 0.5

    def edge(a: int, b: int) -> Tensor:
        ra, ca = vr[:, a, None, None], vc[:, a, None, None]
        rb, cb = vr[:, b, None, None], vc[:, b, None, None]
        return (cb - ca) * (r - ra) - (rb - ra) * (c - ca)

    e0, e1, e2 = edge(0, 1), edge(1, 2), edge(2, 0)
    return ((e0 >= 0) & (e1 >= 0) & (e2 >= 0)) | ((e0 <= 0) & (e1 <= 0) & (e2 <= 0))


def synthetic_triggers(
    x: Tensor, kinds: tuple[str, ...], gen: torch.Generator, others: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``x`` (N, C, H, W) in [0, 1] with one synthetic trigger each, and the kind index of each
    (into ``kinds``). ``others``: images for ``image_blend`` (default: ``x`` itself, shuffled).
    A pure function of its inputs and the generator's state (CPU tensors)."""
    n, ch, h, w = x.shape
    others = x if others is None or len(others) == 0 else others
    kind = torch.randint(0, len(kinds), (n,), generator=gen)
    # every random draw happens for every image, so one image's trigger never depends on the kinds of others
    box = _corner_boxes(n, h, w, gen)[:, None]
    colour = torch.rand(n, ch, 1, 1, generator=gen)
    noise_block = torch.rand(n, ch, h, w, generator=gen)
    std = torch.sqrt(10.0 + 60.0 * torch.rand(n, 1, 1, 1, generator=gen)) / 255.0
    gauss = 25.0 / 255.0 + std * torch.randn(n, ch, h, w, generator=gen)
    shade = _shadow(n, h, w, gen)[:, None]
    partner = others[torch.randint(0, len(others), (n,), generator=gen)]
    freq = torch.randint(0, 4, (n, 2), generator=gen)
    freq[:, 0] = torch.where(freq.sum(1) == 0, torch.ones_like(freq[:, 0]), freq[:, 0])
    amp = 0.05 + 0.1 * torch.rand(n, 1, 1, 1, generator=gen)
    phase = 2 * math.pi * torch.rand(n, 1, 1, 1, generator=gen)
    rr = torch.arange(h, dtype=torch.float32)[None, None, :, None] / h
    cc = torch.arange(w, dtype=torch.float32)[None, None, None, :] / w
    wave = amp * torch.sin(
        2 * math.pi * (freq[:, 0, None, None, None] * rr + freq[:, 1, None, None, None] * cc) + phase
    )

    variants = {
        "solid_patch": torch.where(box, colour.expand(n, ch, h, w), x),
        "noise_patch": torch.where(box, noise_block, x),
        "gaussian_noise": x + gauss,
        "shadow": torch.where(shade, 0.5 * x, x),
        "image_blend": x + 0.3 * partner,
        "smooth": x + wave,
    }
    out = x.clone()
    for i, k in enumerate(kinds):
        sel = kind == i
        out[sel] = variants[k][sel]
    return out.clamp(0.0, 1.0), kind


def train_dct_net(
    clean: Tensor, info: DatasetInfo, p: FrequencyParams, device: torch.device
) -> tuple[DctNet, dict[str, float]]:
    """Train a :class:`DctNet` on ``clean`` images vs their synthetic-trigger copies (see module
    docs), at least 2 of them; deterministic given ``p.seed`` (the global RNG state is saved
    and restored around it)."""
    from bdx_study.data import augment_batch

    from ._frequency_net import DctNet, dct2

    gen = torch.Generator().manual_seed(p.seed)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(p.seed)
        net = DctNet(tuple(clean.shape[1:]), p.freq_width)  # type: ignore[arg-type]
        coeffs = dct2(clean.double())
        net.get_buffer("dct_mean").copy_(coeffs.mean(0).float())
        net.get_buffer("dct_std").copy_(coeffs.std(0).clamp_min(STD_FLOOR).float())
        net = net.to(device)
        opt = torch.optim.Adam(net.parameters(), lr=p.freq_lr, weight_decay=WEIGHT_DECAY)
        loss_fn = torch.nn.CrossEntropyLoss()
        n, correct, seen, loss_sum = len(clean), 0, 0, 0.0
        for _ in range(p.freq_epochs):
            net.train()
            base = augment_batch(clean, info, gen)
            poisoned, _ = synthetic_triggers(base, p.freq_triggers, gen, others=clean)
            x = torch.cat([base, poisoned])
            y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
            perm = torch.randperm(2 * n, generator=gen)
            correct, seen, loss_sum = 0, 0, 0.0
            for i in range(0, 2 * n, p.freq_batch_size):
                idx = perm[i : i + p.freq_batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                xb, yb = x[idx].to(device), y[idx].to(device)
                opt.zero_grad(set_to_none=True)
                out = net(xb)
                loss = loss_fn(out, yb)
                loss.backward()
                opt.step()
                correct += int((out.argmax(1) == yb).sum())
                seen += len(idx)
                loss_sum += loss.item() * len(idx)
    net.eval()
    return net, {"last_epoch_train_acc": correct / max(seen, 1), "last_epoch_loss": loss_sum / max(seen, 1)}


# ------------------------------------------------------------------------------------ the family


@register_detector("frequency")
class Frequency(DetectorFamily[FrequencyParams]):
    """A DCT-domain CNN trained on clean vs synthetic-trigger images (input-only)."""

    Params = FrequencyParams
    components = (MAIN,)
    extra_columns = ("freq_poison_prob",)
    access = (
        "input-only: a small DCT-domain CNN trained on the defender's clean images vs synthetic triggers "
        "(no model access); 1 forward of that CNN per input, not a victim forward"
    )
    detects = frozenset({"patch", "blend"})

    def __init__(self, params: DetectorParams) -> None:
        super().__init__(params)
        self._net: tuple[Fitted, DctNet] | None = None

    def fit(self, component: str, ctx: FitContext) -> Fitted:
        if len(ctx.clean) < 2:
            raise ValueError(f"frequency needs at least 2 clean finetune images, got {len(ctx.clean)}")
        net, stats = train_dct_net(ctx.clean.x, ctx.info, self.params, ctx.device)
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        return Fitted(state, {**stats, "train_images": 2 * len(ctx.clean)})

    def _network(self, fitted: Fitted, device: torch.device) -> DctNet:
        """The classifier rebuilt from its state (once per fitted state)."""
        if self._net is None or self._net[0] is not fitted:
            from ._frequency_net import DctNet

            net = DctNet(tuple(fitted.tensors["dct_mean"].shape), self.params.freq_width)  # type: ignore[arg-type]
            net.load_state_dict(fitted.tensors)
            self._net = (fitted, net.to(device).eval())
        return self._net[1]

    def features(
        self, component: str, fitted: Fitted, model: nn.Module, x: Tensor, pred: Tensor, device: torch.device
    ) -> dict[str, Tensor]:
        with torch.no_grad():
            net = self._network(fitted, device)
            out = [net(x[i : i + 512].to(device)).double().cpu() for i in range(0, len(x), 512)]
        logits = torch.cat(out) if out else torch.empty(0, 2, dtype=torch.float64)
        return {"freq_logit": logits[:, 1] - logits[:, 0]}

    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        d = feats["freq_logit"].double()
        return d if self.params.freq_score == "logit" else torch.tanh(d / 2.0)  # = p(poison) - p(clean)

    def extras(self, feats: Mapping[str, Tensor], pred: Tensor) -> dict[str, Tensor]:
        return {"freq_poison_prob": torch.sigmoid(feats["freq_logit"].double())}
