"""Frequency: the DCT is orthonormal and invertible, synthetic triggers are seeded and only of
the chosen kinds, training is deterministic and leaves the global RNG alone, and the score is
continuous (never a hard label)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdx_study.data import dataset_info
from bdx_study.detectors import create_detector
from bdx_study.detectors._frequency_net import dct2, dct_matrix, idct2
from bdx_study.detectors.frequency import (
    ALL_TRIGGERS,
    FrequencyParams,
    synthetic_triggers,
    train_dct_net,
)


@pytest.mark.parametrize("n", [8, 16, 28, 32])
def test_dct_is_orthonormal_and_invertible(n: int) -> None:
    d = dct_matrix(n, torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64))
    x = torch.rand(3, 2, n, n + 4, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = dct2(x)
    torch.testing.assert_close(idct2(y), x)
    assert y.pow(2).sum().item() == pytest.approx(x.pow(2).sum().item())  # energy is preserved
    scipy_fft = pytest.importorskip("scipy.fft")
    np.testing.assert_allclose(y.numpy(), scipy_fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1)), atol=1e-10)


@pytest.mark.parametrize("shape", [(1, 16, 16), (1, 28, 28), (3, 32, 32)])
def test_synthetic_triggers_are_seeded_and_of_the_chosen_kinds(shape: tuple[int, int, int]) -> None:
    x = torch.full((60, *shape), 0.4)
    a, kind_a = synthetic_triggers(x, ALL_TRIGGERS, torch.Generator().manual_seed(1))
    b, kind_b = synthetic_triggers(x, ALL_TRIGGERS, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(kind_a, kind_b)
    assert a.min() >= 0 and a.max() <= 1
    assert set(kind_a.tolist()) == set(range(len(ALL_TRIGGERS)))
    changed = (a - x).abs().flatten(1).amax(1) > 0
    assert changed.all()  # every kind leaves a mark on a flat grey image
    # a patch stays small and in the image; only the chosen kinds are drawn
    patch, kind = synthetic_triggers(x, ("noise_patch",), torch.Generator().manual_seed(2))
    assert (kind == 0).all()
    side = max(3, round(7 * shape[1] / 32))  # the paper's 7 px on 32 px, scaled
    pixels = ((patch - x).abs().amax(1) > 0).flatten(1).sum(1)
    assert pixels.min() >= 4 and pixels.max() <= side * side


def test_training_is_deterministic_and_restores_the_global_rng() -> None:
    info = dataset_info("digits")
    clean = torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.2
    p = FrequencyParams(freq_epochs=2, freq_width=4, freq_batch_size=16, seed=7)
    state = torch.get_rng_state()
    a, stats = train_dct_net(clean, info, p, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = train_dct_net(clean, info, p, torch.device("cpu"))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert 0 <= stats["last_epoch_train_acc"] <= 1


def test_score_is_the_continuous_probability_difference() -> None:
    logit = torch.tensor([-40.0, -1.0, 0.0, 2.5, 40.0], dtype=torch.float64)
    probs = torch.softmax(torch.stack([torch.zeros_like(logit), logit], 1), 1)
    pred = torch.zeros(5, dtype=torch.long)
    s = create_detector("frequency").score({"freq_logit": logit}, pred)
    torch.testing.assert_close(s, probs[:, 1] - probs[:, 0])
    assert len(set(s[1:4].tolist())) == 3  # not thresholded into hard labels
    s = create_detector("frequency", {"freq_score": "logit"}).score({"freq_logit": logit}, pred)
    assert s.tolist() == logit.tolist()  # same ranking, no saturation at +-1
