"""Baselines (opticam.methods.baselines): pytorch-grad-cam adapters and Fake-CAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM, HiResCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from tiny import TinyNet
from torch import Tensor

from opticam.methods import (
    CAM_METHODS,
    FakeCAM,
    GradCAMBaseline,
    explainer_class,
    upsample_normalize,
)

torch.set_num_threads(1)


def _images(seed: int = 0, batch: int = 3) -> Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


TARGETS = torch.tensor([0, 3, 4])


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_every_method_gives_maps_in_unit_range(method: str) -> None:
    model = TinyNet(1)
    flags_before = [p.requires_grad for p in model.parameters()]
    result = explainer_class(method)(model, model.features, batch_size=4)(_images(1), TARGETS)
    assert result.maps.shape == (3, 1, 32, 32)
    assert result.saliency is not None and result.saliency.shape == (3, 1, 16, 16)
    assert torch.isfinite(result.maps).all()
    assert result.maps.min() >= 0 and result.maps.max() <= 1
    assert (result.saliency >= 0).all()  # pytorch-grad-cam's ReLU
    rebuilt, constant = upsample_normalize(result.saliency, (32, 32))
    assert torch.equal(rebuilt, result.maps)
    assert torch.equal(constant, result.diagnostics["constant_map"])
    # Frozen for the call only; no weight gradients; no hooks left behind.
    assert [p.requires_grad for p in model.parameters()] == flags_before
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_gradcam_equals_cam_for_a_gap_linear_head() -> None:
    """With logits = W GAP(A) + b, dg_c/dA_k = W[c,k] / (h w) everywhere, so
    Grad-CAM's saliency is relu(sum_k W[c,k] A_k) / (h w): class activation mapping."""
    model = TinyNet(2)
    x = _images(2)
    result = explainer_class("gradcam")(model, model.features)(x, TARGETS)
    with torch.no_grad():
        feats = model.features(x)
        expected = torch.relu(torch.einsum("bk,bkhw->bhw", model.fc.weight[TARGETS], feats))
    expected = expected.unsqueeze(1) / (16 * 16)
    assert torch.allclose(result.saliency, expected, atol=1e-6)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls,name", [(GradCAM, "gradcam"), (HiResCAM, "hirescam")])
def test_matches_pytorch_grad_cam_output(cls: type, name: str) -> None:
    """Same maps as the package's own call, up to its OpenCV resize and 1e-7 scaling."""
    model = TinyNet(3)
    x = _images(3)
    ours = explainer_class(name)(model, model.features)(x, TARGETS)
    with cls(model=model, target_layers=[model.features]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in TARGETS])
    keep = ~ours.diagnostics["constant_map"]
    assert keep.any()
    np.testing.assert_allclose(ours.maps[keep, 0].numpy(), theirs[keep.numpy()], atol=1e-4)
    for p in model.parameters():
        p.grad = None


def test_predicted_class_when_targets_omitted() -> None:
    model = TinyNet(0)
    x = _images(0)
    a = explainer_class("gradcampp")(model, model.features)(x)
    b = explainer_class("gradcampp")(model, model.features)(x, model(x).argmax(1))
    assert torch.equal(a.maps, b.maps)


def test_hooks_released_when_gradcam_raises() -> None:
    class Exploding(TinyNet):
        def forward(self, x: Tensor) -> Tensor:
            self.features(x)  # the package's hooks have fired
            raise RuntimeError("boom")

    model = Exploding()
    with pytest.raises(RuntimeError, match="boom"):
        explainer_class("gradcam")(model, model.features)(_images(), TARGETS)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_ablation_layer_put_back_when_ablation_cam_raises() -> None:
    class ExplodingHead(TinyNet):
        calls = 0

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            if self.calls == 3:  # first ablated forward pass: the layer is swapped out
                raise RuntimeError("boom")
            return super().forward(x)

    model = ExplodingHead()
    layer = model.features
    with pytest.raises(RuntimeError, match="boom"):
        explainer_class("ablationcam")(model, layer)(_images(), TARGETS)
    assert model.features is layer
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_scorecam_batch_size_does_not_change_maps() -> None:
    model = TinyNet(4)
    x = _images(4)
    a = explainer_class("scorecam")(model, model.features, batch_size=3)(x, TARGETS)
    b = explainer_class("scorecam")(model, model.features, batch_size=8)(x, TARGETS)
    assert torch.allclose(a.maps, b.maps, atol=1e-5)


def test_fakecam() -> None:
    x = _images(batch=2)
    result = FakeCAM(TinyNet())(x, [0, 1])
    expected = torch.ones(2, 1, 32, 32)
    expected[:, :, 0, 0] = 0
    assert torch.equal(result.maps, expected)
    assert result.saliency is None


def test_bad_options() -> None:
    model = TinyNet()
    with pytest.raises(ValueError, match="unknown method 'gradcam\\+' \\(known: opticam, "):
        explainer_class("gradcam+")
    with pytest.raises(TypeError, match="GradCAMBaseline is abstract"):
        GradCAMBaseline(model, model.features)
    with pytest.raises(ValueError, match="batch_size"):
        explainer_class("scorecam")(model, model.features, batch_size=0)


def _inplace_and_outofplace_resnet18() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random-weight torchvision resnet18 (inplace ReLUs) and a copy without them."""
    import copy

    import torchvision

    torch.manual_seed(0)
    inplace = torchvision.models.resnet18(num_classes=10).eval()
    plain = copy.deepcopy(inplace)
    for module in plain.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    assert any(isinstance(m, torch.nn.ReLU) and m.inplace for m in inplace.modules())
    return inplace, plain


_LAYER_METHODS = [(name, {"batch_size": 64}) for name in sorted(CAM_METHODS)] + [
    ("opticam", {"iterations": 3}),
    # Without its own ReLU, Opti-CAM would see the inplace ReLU's work on the features.
    ("opticam", {"iterations": 3, "relu_features": False}),
    ("opticam", {"iterations": 3, "start": "gradcam"}),
]


@pytest.mark.parametrize("method,options", _LAYER_METHODS)
def test_maps_do_not_see_a_later_inplace_relu(method: str, options: dict[str, object]) -> None:
    """``layer2.1.bn1`` feeds ``ReLU(inplace=True)``: the maps must come from the layer's
    output as it was, so they equal those of the same weights with out-of-place ReLUs."""
    from opticam.methods import get_explainer

    inplace, plain = _inplace_and_outofplace_resnet18()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([1, 2])
    got = get_explainer(method, inplace, target_layer="layer2.1.bn1", **options)(x, targets)
    want = get_explainer(method, plain, target_layer="layer2.1.bn1", **options)(x, targets)
    assert got.saliency is not None and want.saliency is not None
    # Real maps, so that the comparison below is not between two constant ones.
    assert not bool(got.diagnostics["constant_map"].any())
    torch.testing.assert_close(got.saliency, want.saliency, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.maps, want.maps, atol=1e-5, rtol=0)
    assert all(not m._forward_hooks and not m._backward_hooks for m in inplace.modules())
