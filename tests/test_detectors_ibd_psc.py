"""IBD-PSC: which BN layers are scaled, how the start layer is picked, and what a fit stores."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bdx_study.archs import Classifier
from bdx_study.data import DatasetInfo, ImageData
from bdx_study.detectors import FitContext, create_detector
from bdx_study.detectors.ibd_psc import bn_layers, layer_counts, scaled_copy, select_start

CPU = torch.device("cpu")
INFO = DatasetInfo("probe", (1, 1, 1), 2, (0.0,), (1.0,), crop_padding=0, horizontal_flip=False)
WEIGHTS = (1.0, 2.0, 4.0, 8.0)  # how much each BN layer (first .. last) moves the decision


class Probe(nn.Module):
    """A hand-built two-class net: predicts class 1 iff sum_j WEIGHTS[j] * bn_j.weight exceeds the
    input's value. With every BN weight 1 the sum is 15; scaling the last m BN layers by 1.5 adds
    4, 6, 7, 7.5 for m = 1..4 (scaling the first ones would add 0.5, 1.5, 3.5, 7.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm1d(1) for _ in WEIGHTS)

    def forward(self, x: Tensor) -> Tensor:
        s = sum(w * bn.weight[0] for w, bn in zip(WEIGHTS, self.bns, strict=True))
        margin = x.flatten(1)[:, :1] - s
        return torch.cat([margin, -margin], 1)


def _probe_data() -> ImageData:
    # label 0 everywhere; an input of value t is misread once the sum exceeds t
    t = torch.tensor([17.0, 20.0, 20.0, 21.5, 21.5, 21.5, 21.5, 22.2, 22.2, 30.0])  # errors 0.1, 0.3, 0.7, 0.9
    return ImageData(t.view(-1, 1, 1, 1), torch.zeros(len(t), dtype=torch.long))


def _ctx(model: nn.Module) -> FitContext:
    data = _probe_data()
    return FitContext(model=model.eval(), clean=data, holdout=data.take(slice(0, 0)), info=INFO, device=CPU)


def test_scaled_copy_scales_only_the_last_layers() -> None:
    model = Classifier(Probe(), (0.0,), (1.0,))
    twin = scaled_copy(model, 2, 1.5)
    assert [bn.weight.item() for bn in bn_layers(twin)] == [1.0, 1.0, 1.5, 1.5]
    assert [bn.bias.item() for bn in bn_layers(twin)] == [0.0, 0.0, 0.0, 0.0]  # 0 x 1.5
    assert [bn.weight.item() for bn in bn_layers(model)] == [1.0] * 4  # M untouched
    assert isinstance(twin, Classifier)  # a Classifier copy: its forwards are counted


def test_select_start_smallest_count_above_xi() -> None:
    errors = torch.tensor([0.1, 0.3, 0.7, 0.9])
    assert select_start(errors, 0.6, 5) == (3, True)
    assert select_start(errors, 0.05, 5) == (1, True)
    # never reached: the window of n counts that ends with every layer scaled
    assert select_start(errors, 0.95, 2) == (3, False)
    assert select_start(errors, 0.95, 5) == (1, False)
    assert layer_counts(3, 5, 4) == [3, 4, 4, 4, 4]
    assert layer_counts(1, 3, 20) == [1, 2, 3]


def test_fit_picks_the_start_layer_on_a_hand_built_model() -> None:
    model = Classifier(Probe(), (0.0,), (1.0,))
    family = create_detector("ibd_psc", {"psc_xi": 0.6, "psc_num_models": 2})
    fitted = family.fit("main", _ctx(model))
    assert int(fitted.tensors["start_layer"]) == 3
    torch.testing.assert_close(fitted.tensors["clean_errors"], torch.tensor([0.1, 0.3, 0.7, 0.9], dtype=torch.float64))
    assert fitted.meta["xi_reached"] and fitted.meta["bn_layers"] == 4
    # scoring: copies with the last 3 and the last 4 layers scaled (sums 22 and 22.5)
    x = torch.tensor([21.0, 22.3, 40.0]).view(-1, 1, 1, 1)
    pred = model(x).argmax(1)
    conf = family.features("main", fitted, model, x, pred, CPU)["psc_conf"]
    assert conf.shape == (3, 2)
    flipped = conf < 0.5  # the copy predicts another class than M
    assert flipped.tolist() == [[True, True], [False, True], [False, False]]
    assert family.score({"psc_conf": conf}, pred).shape == (3,)


def test_a_model_without_batchnorm_is_refused() -> None:
    body = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    family = create_detector("ibd_psc")
    with pytest.raises(ValueError, match="no affine BatchNorm layer"):
        family.fit("main", _ctx(Classifier(body, (0.0,), (1.0,))))
