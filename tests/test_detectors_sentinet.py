"""SentiNet: masks come from the model's own Grad-CAM (no oracle boxes), the fooled/avgconf
probes, and the boundary fit and signed distance."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from bdx_study.detectors.sentinet import (
    aggregate,
    boundary,
    fit_envelope,
    gradcam,
    last_conv,
    signed_distance,
    top_mask,
)


def test_mask_covers_the_planted_patch(planted: dict[str, Any]) -> None:
    """The Grad-CAM mask of triggered inputs covers the BadNet patch; that of clean inputs does
    not. Only the model and the inputs are used: no trigger location is given."""
    model, attack = planted["patch"]["model"], planted["patch"]["attack"]
    x = planted["splits"].evaluation.x[:64]
    patch = attack.mask  # (1, H, W): used only to measure the coverage
    name, layer = last_conv(model)
    assert isinstance(layer, torch.nn.Conv2d) and name
    for inputs, low, high in ((attack.apply_trigger(x), 0.8, 1.0), (x, 0.0, 0.3)):
        pred = model(inputs).argmax(1)
        mask = top_mask(gradcam(model, inputs, pred, layer), 0.15)
        assert mask.shape == (len(x), 1, 16, 16)
        assert torch.all(mask.sum((1, 2, 3)) == round(0.15 * 256))
        coverage = float(((mask * patch).sum((1, 2, 3)) / patch.sum()).mean())
        assert low <= coverage <= high, coverage


def test_gradcam_leaves_the_model_untouched(planted: dict[str, Any]) -> None:
    model = copy.deepcopy(planted["patch"]["model"])
    for p in model.parameters():
        p.grad = None
    before = copy.deepcopy(model.state_dict())
    x = planted["splits"].evaluation.x[:8]
    gradcam(model, x, model(x).argmax(1), last_conv(model)[1])
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_fooled_counts_only_changed_predictions() -> None:
    hit = torch.tensor([[True, True, False, True]])
    conf = torch.tensor([[0.9, 0.5, 0.7, 0.3]])
    pool_pred = torch.tensor([2, 1, 1, 1])  # pool image 0 is already predicted 2: it cannot be fooled
    fooled, avgconf = aggregate(hit, conf, torch.tensor([2]), pool_pred)
    assert fooled.item() == pytest.approx(2 / 3) and avgconf.item() == pytest.approx(0.6)
    exclude = torch.tensor([[False, True, False, False]])  # the input itself is pool image 1
    fooled, avgconf = aggregate(hit, conf, torch.tensor([2]), pool_pred, exclude)
    assert fooled.item() == pytest.approx(1 / 2) and avgconf.item() == pytest.approx((0.9 + 0.7 + 0.3) / 3)


def test_envelope_fit_and_signed_distance() -> None:
    # per bin of 0.02 from 0.3: a low point, and the bin maximum on 0.45 - a + a^2 at the centre
    k = torch.arange(20, dtype=torch.float64)
    centre = 0.31 + 0.02 * k
    low = torch.where(k == 0, 0.3, 0.305 + 0.02 * k)
    a = torch.cat([low, centre])
    f = torch.cat([torch.zeros(20, dtype=torch.float64), 0.45 - centre + centre**2])
    coef, span, bins = fit_envelope(a, f, 0.02)
    assert bins == 20
    assert coef.tolist() == pytest.approx([0.45, -1.0, 1.0], abs=1e-6)
    assert span.tolist() == pytest.approx([0.3, 0.69])
    # held flat outside the clean range
    assert boundary(torch.tensor([0.0, 1.0]), coef, span).tolist() == pytest.approx(boundary(span, coef, span).tolist())
    flat, wide = torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    d = signed_distance(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.8, 0.1, 0.3]), flat, wide)
    assert d.tolist() == pytest.approx([0.5, -0.2, 0.0], abs=1e-6)
    line = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # fooled = avgconf
    d = signed_distance(torch.tensor([0.2]), torch.tensor([0.8]), line, wide)
    assert d.item() == pytest.approx(0.6 / math.sqrt(2), abs=1e-3)
    assert signed_distance(torch.empty(0), torch.empty(0), line, wide).shape == (0,)
    # a single bin: a constant
    coef, _, bins = fit_envelope(torch.tensor([0.5, 0.5]), torch.tensor([0.1, 0.4]), 0.02)
    assert bins == 1 and coef.tolist() == pytest.approx([0.4, 0.0, 0.0])
