"""Public API: opticam.explain and the method registry (opticam.methods.registry)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import opticam
from opticam.methods import KNOWN_METHODS, Explanation, get_explainer
from opticam.models import LoadedModel
from opticam.wrappers import Normalized

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """A 3-layer CNN at 32x32: features (B,8,8,8) -> GAP -> 4 logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _options(method: str) -> dict[str, object]:
    return {"iterations": 3} if method == "opticam" else {}


@pytest.mark.parametrize("method", KNOWN_METHODS)
def test_every_method_through_explain(method: str) -> None:
    model = TinyNet()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = opticam.explain(model, x, torch.tensor([0, 1, 3]), method=method, **_options(method))
    assert isinstance(result, Explanation)
    assert result.maps.shape == (3, 1, 32, 32)
    assert result.maps.dtype == torch.float32 and result.maps.device == x.device
    assert torch.isfinite(result.maps).all()
    assert result.maps.min() >= 0 and result.maps.max() <= 1
    assert result.seconds > 0
    assert result.diagnostics["constant_map"].shape == (3,)
    if method != "fakecam":
        assert result.saliency is not None and result.saliency.shape == (3, 1, 8, 8)


def test_unknown_method_and_option() -> None:
    model = TinyNet()
    with pytest.raises(ValueError) as err:
        get_explainer("gradcam+", model)
    assert str(err.value) == (
        "unknown method 'gradcam+' (known: opticam, gradcam, gradcampp, xgradcam, scorecam, "
        "ablationcam, layercam, hirescam, fakecam)"
    )
    with pytest.raises(ValueError, match="unknown option\\(s\\) 'iters' for method 'opticam'"):
        get_explainer("opticam", model, iters=5)
    with pytest.raises(ValueError, match="unknown option\\(s\\) 'lr' for method 'gradcam'"):
        get_explainer("gradcam", model, lr=0.1)
    with pytest.raises(ValueError, match="unknown target layer 'features.9'"):
        get_explainer("opticam", model, target_layer="features.9")


def test_target_layer_by_name_module_and_default() -> None:
    model = TinyNet()
    x = torch.rand(2, 3, 32, 32)
    default = opticam.explain(model, x, [0, 1], method="gradcam")
    by_name = opticam.explain(model, x, [0, 1], method="gradcam", target_layer="features")
    by_module = opticam.explain(model, x, [0, 1], method="gradcam", target_layer=model.features)
    assert torch.equal(default.maps, by_name.maps) and torch.equal(default.maps, by_module.maps)
    early = opticam.explain(model, x, [0, 1], method="gradcam", target_layer="features.1")
    assert early.saliency is not None and early.saliency.shape == (2, 1, 16, 16)


def test_loaded_model_and_predicted_targets() -> None:
    net = TinyNet()
    wrapped = Normalized(net, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()
    loaded = LoadedModel(
        model=wrapped,
        target_layer=net.features,
        target_layer_name="features",
        input_size=(32, 32),
        resize_size=32,
        num_classes=4,
        reshape_transform=None,
        relu_features=True,
        name="test",
    )
    x = torch.rand(2, 3, 32, 32)
    predicted = wrapped(x).argmax(1)
    a = opticam.explain(loaded, x, None, iterations=2)
    b = opticam.explain(loaded, x, predicted, iterations=2)
    assert torch.allclose(a.maps, b.maps)
    # A layer name relative to the wrapper works for a LoadedModel too.
    c = opticam.explain(loaded, x, predicted, method="gradcam", target_layer="model.features.1")
    assert c.saliency is not None and c.saliency.shape == (2, 1, 16, 16)
