"""TED: nearest-neighbour ranks on a hand-made pool, the layers it hooks, and its outlier model."""

from __future__ import annotations

import torch
from torch import nn

from bdx_study.archs import create_model
from bdx_study.detectors.ted import (
    choose_pool,
    first_class_rank,
    fit_outlier_model,
    layer_activations,
    outlier_scores,
    rank_vectors,
)

CPU = torch.device("cpu")


def test_first_class_rank_by_hand() -> None:
    dist = torch.tensor([[0.5, 0.1, 0.3, 0.2], [0.5, 0.1, 0.3, 0.2], [0.5, 0.1, 0.3, 0.2]])
    labels = torch.tensor([1, 0, 1, 2])
    # pool by distance: entries 1 (class 0), 3 (class 2), 2 (class 1), 0 (class 1)
    assert first_class_rank(dist, labels, torch.tensor([0, 2, 1])).tolist() == [0, 1, 2]
    assert first_class_rank(dist, labels, torch.tensor([5, 5, 5])).tolist() == [4, 4, 4]  # no such class
    excluded = dist.clone()
    excluded[0, 1] = float("inf")  # entry 1 left out: class 0 is absent for row 0
    assert first_class_rank(excluded, labels, torch.tensor([0, 0, 0])).tolist() == [4, 0, 0]


def test_rank_vectors_on_a_hand_made_pool() -> None:
    # two "layers" of 1-d activations; the pool: class 0 at 0 and 1, class 1 at 10 and 11 (layer 1),
    # the classes swapped in layer 2
    pool = [torch.tensor([[0.0], [1.0], [10.0], [11.0]]), torch.tensor([[10.0], [11.0], [0.0], [1.0]])]
    labels = torch.tensor([0, 0, 1, 1])
    x = [torch.tensor([[0.2], [10.4]]), torch.tensor([[0.2], [0.3]])]
    ranks = rank_vectors(x, pool, labels, torch.tensor([1, 1]), "euclidean")
    # input 0 (predicted 1): near class 0 in layer 1 (rank 2), near class 1 in layer 2 (rank 0): a jump
    # input 1 (predicted 1): class 1 is nearest in both layers
    assert ranks.tolist() == [[2.0, 0.0], [0.0, 0.0]]
    # leave-one-out: pool entry 2 ranked without itself finds entry 3 first
    loo = rank_vectors(pool, pool, labels, labels, "euclidean", exclude=torch.arange(4))
    assert loo.tolist() == [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    cos = rank_vectors(x, pool, labels, torch.tensor([1, 1]), "cosine")
    assert cos.shape == (2, 2)


def test_outlier_model_flags_what_the_pool_never_does() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.rand(200, 1, generator=g) * 10
    pool = torch.cat([t, t, 0.1 * torch.randn(200, 1, generator=g)], 1)  # ranks move together in layers 1-2
    model = fit_outlier_model(pool, 0.6)
    assert int(model["kept"]) == 1
    normal = torch.tensor([[5.0, 5.0, 0.0]])
    odd = torch.tensor([[9.0, 0.0, 0.0]])  # rank high early, low late: the backdoor signature
    recon, maha = outlier_scores(torch.cat([normal, odd]), model)
    assert recon[1] > 10 * recon[0] and maha[1] > 10 * maha[0]


def test_hooks_see_every_conv_and_linear_layer_before_inplace_relu() -> None:
    model = create_model("small_cnn", (1, 16, 16), 10, (0.5,), (0.5,)).eval()
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    acts = layer_activations(model, x, CPU)
    assert [a.shape[1] for a in acts] == [32 * 256, 32 * 256, 64 * 64, 64 * 64, 128, 10]
    fc1 = next(m for m in model.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        body = model.body
        h = body[:-3]((x - model.get_buffer("mean")) / model.get_buffer("std"))
        assert torch.equal(acts[4], fc1(h))  # the stored output, not the ReLU that ran in place on it
    assert (acts[4] < 0).any()


def test_pool_takes_correct_images_per_class() -> None:
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 0, 1, 1, 0])  # image 1 and image 5 misclassified
    idx = choose_pool(y, pred, 2, 3, seed=0)
    assert sorted(idx.tolist()) == [0, 2, 3, 4]
    assert len(choose_pool(y, pred, 1, 3, seed=0)) == 2
