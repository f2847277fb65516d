"""Cognitive Distillation: the mask is optimised through the model (gradients flow, and the
passes are counted), M is left exactly as it was, and batching does not change a mask."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from bdx_study.detectors import Fitted, create_detector
from bdx_study.detectors.cognitive_distillation import distill_masks, mask_from, total_variation
from bdx_study.stages import count_passes

CPU = torch.device("cpu")


def test_total_variation() -> None:
    assert total_variation(torch.full((2, 1, 4, 4), 0.7)).tolist() == [0.0, 0.0]
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2
    # 12 vertical and 12 horizontal neighbour pairs, each differing by 1, over 16 values
    assert total_variation(checker.float().view(1, 1, 4, 4)).item() == pytest.approx(24 / 16)


def test_mask_gradient_flows_and_model_is_untouched(planted: dict[str, Any]) -> None:
    model = copy.deepcopy(planted["blend"]["model"])
    for p in model.parameters():
        p.grad = None
    before = copy.deepcopy(model.state_dict())
    x = planted["splits"].evaluation.x[:6]
    steps = 3
    with count_passes() as cost:
        masks = distill_masks(model, x, steps=steps, lr=0.1, gamma=0.01, beta=1.0, colours=torch.rand(steps, 1))
    assert masks.shape == (6, 1, 16, 16) and masks.min() >= 0 and masks.max() <= 1
    start = mask_from(torch.ones(1))
    assert (masks - start).abs().amax() > 0.05  # the optimiser moved every mask ...
    assert masks.view(6, -1).std(1).min() > 0  # ... per pixel, through the model's gradient
    assert cost.forward == 6 * (1 + steps) and cost.backward == 6 * steps
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_a_mask_does_not_depend_on_its_batch(planted: dict[str, Any]) -> None:
    model = planted["blend"]["model"]
    x = planted["splits"].evaluation.x[:5]
    family = create_detector("cognitive_distillation", {"cd_steps": 3})
    pred = torch.zeros(5, dtype=torch.long)
    together = family.features("main", Fitted(), model, x, pred, CPU)["cd_mask_l1"]
    alone = torch.cat(
        [family.features("main", Fitted(), model, x[i : i + 1], pred[:1], CPU)["cd_mask_l1"] for i in range(5)]
    )
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-3)
    assert family.score({"cd_mask_l1": together}, pred).tolist() == (-together).tolist()
