"""Baseline CAM methods through pytorch-grad-cam, and Fake-CAM.

Each CAM method computes a low-resolution map from the target layer's activations ``A``
(B,K,h,w) and, for gradient methods, the gradients ``dA = d g_c / d A`` of the class
logit::

    Grad-CAM     S = relu(sum_k mean_hw(dA_k) A_k)
    Grad-CAM++   S = relu(sum_k w_k A_k), w_k = sum_hw alpha_k relu(dA_k) (Chattopadhay et al.)
    XGrad-CAM    S = relu(sum_k w_k A_k), w_k = sum_hw dA_k A_k / sum_hw A_k
    HiRes-CAM    S = relu(sum_k dA_k * A_k)
    Layer-CAM    S = relu(sum_k relu(dA_k) * A_k)
    Score-CAM    S = relu(sum_k w_k A_k), w = softmax_k g_c(f(x * n(up(A_k))))
    Ablation-CAM S = relu(sum_k w_k A_k), w_k = (g_c - g_c(A with channel k zeroed)) / g_c

The weights and maps come from pytorch-grad-cam (its ``get_cam_image``, with the ReLU it
applies); only the last step is ours: the map is returned as ``saliency`` (B,1,h,w) and
``maps = upsample_normalize(saliency)``, the same up + n as Opti-CAM, instead of the
package's OpenCV resize and its ``1e-7``-regularized scaling. So every method's maps are
rebuilt from its stored low-resolution map the same way.

Gradients are taken with respect to the activations only: the model's weights are frozen
for the call (their ``requires_grad`` flags restored afterwards) and the input carries
``requires_grad`` so that autograd reaches the target layer. All hooks are removed, and an
ablated layer put back, also when a call raises.

The target layer's output is recorded by :class:`_LayerRecorder` instead of the package's
``ActivationsAndGradients``: the package keeps a view of the output, which an in-place op
after the layer (``ReLU(inplace=True)``, ResNet's ``out += identity``) overwrites on the
CPU, so the maps would be computed from the ReLU'd features instead of the layer's.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from pytorch_grad_cam import (
    AblationCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam import ablation_cam as _ablation_module
from pytorch_grad_cam import score_cam as _score_module
from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.find_layers import replace_layer_recursive
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from opticam.errors import short_repr
from opticam.methods.common import (
    Explainer,
    Explanation,
    check_target_range,
    frozen,
    no_leaked_hooks,
    predicted_classes,
    upsample_normalize,
)
from opticam.names import METHODS, NORMALIZATIONS

__all__ = [
    "CAM_METHODS",
    "AblationCAMMethod",
    "FakeCAM",
    "GradCAMBaseline",
    "GradCAMMethod",
    "GradCAMPlusPlusMethod",
    "HiResCAMMethod",
    "LayerCAMMethod",
    "ScoreCAMMethod",
    "XGradCAMMethod",
]


class GradCAMBaseline(Explainer):
    """A pytorch-grad-cam method with this project's call shape and up + n.

    One subclass per method sets :attr:`cam_class`; :data:`opticam.names.METHODS` maps
    each method name to its subclass.

    Args:
        model: classifier taking (B,3,H,W) images in [0,1].
        target_layer: the CAM target layer.
        reshape_transform: maps the layer's output to (B,K,h,w) (ViT tokens), or None.
        relu_features: accepted for a uniform interface; pytorch-grad-cam reads the
            layer's raw output (ResNet's layer4 is already ReLU'd).
        batch_size: masked/ablated images per forward pass inside Score-CAM and
            Ablation-CAM (their cost is K forward passes per image).
        normalization: ``n`` in ``maps = n(up(saliency))``: ``range`` (default), ``max``
            or ``sigmoid``.

    Diagnostics: ``constant_map`` (B,) bool, e.g. a Grad-CAM map that the ReLU zeroed.

    Not for concurrent calls on one model object from several threads: pytorch-grad-cam's
    hooks record every forward pass through the layer, and Ablation-CAM swaps the layer
    in place. Use one model per thread (as the pipeline does: one per device).
    """

    #: The pytorch-grad-cam class that computes the low-resolution map.
    cam_class: ClassVar[type[BaseCAM]]
    options: ClassVar[tuple[str, ...]] = ("batch_size", "normalization")

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module,
        *,
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        relu_features: bool = True,
        batch_size: int = 32,
        normalization: str = "range",
    ) -> None:
        super().__init__(model)
        if not hasattr(type(self), "cam_class"):
            raise TypeError(
                "GradCAMBaseline is abstract: use a method's subclass, e.g. GradCAMMethod, "
                "or opticam.methods.get_explainer(name, model)"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {short_repr(batch_size)}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {short_repr(normalization)} (known: {', '.join(NORMALIZATIONS)})"
            )
        self.target_layer = target_layer
        self.reshape_transform = reshape_transform
        self.relu_features = relu_features
        self.batch_size = batch_size
        self.normalization = normalization

    def explain(self, images: Tensor, targets: Tensor | None) -> Explanation:
        """Run the pytorch-grad-cam method; see the module docstring."""
        if targets is None:
            targets = predicted_classes(self.model, images)
        with frozen(self.model), no_leaked_hooks(self.model), self._cam() as cam:
            low = self._low_resolution(cam, images, targets)
        saliency = torch.from_numpy(low).to(images.device).unsqueeze(1)
        maps, constant = upsample_normalize(saliency, images.shape[-2:], self.normalization)
        return Explanation(maps=maps, saliency=saliency, diagnostics={"constant_map": constant})

    @contextlib.contextmanager
    def _cam(self) -> Iterator[BaseCAM]:
        """A pytorch-grad-cam object whose hooks and layer swaps never outlive the call."""
        cls = self.cam_class
        layers = [self.target_layer]
        cam: BaseCAM
        if cls is AblationCAM:
            # A fresh ablation layer per call: the package's default argument is one
            # shared, stateful instance.
            ablation = AblationLayerVit() if self.reshape_transform is not None else AblationLayer()
            cam = AblationCAM(
                self.model,
                layers,
                reshape_transform=self.reshape_transform,
                ablation_layer=ablation,
                batch_size=self.batch_size,
            )
        else:
            cam = cls(self.model, layers, reshape_transform=self.reshape_transform)
            # Score-CAM reads its chunk size from this attribute.
            cam.batch_size = self.batch_size  # type: ignore[attr-defined]
        cam.activations_and_grads.release()
        cam.activations_and_grads = _LayerRecorder(  # type: ignore[assignment]
            self.model, self.target_layer, self.reshape_transform
        )
        try:
            with _quiet_progress():
                yield cam
        finally:
            cam.activations_and_grads.release()
            if isinstance(cam, AblationCAM):
                # Puts the target layer back if an error left the ablation layer in.
                replace_layer_recursive(self.model, cam.ablation_layer, self.target_layer)
            cam.outputs = None  # type: ignore[attr-defined]

    def _low_resolution(self, cam: BaseCAM, images: Tensor, targets: Tensor) -> np.ndarray:
        """The method's ReLU'd map (B,h,w) from pytorch-grad-cam's machinery."""
        recorder = cam.activations_and_grads
        x = images.detach().clone()
        if cam.uses_gradients:
            # Weights are frozen: the input must require grad for autograd to reach the
            # target layer (and record its output gradient through the package's hook).
            x.requires_grad_(True)
        with torch.set_grad_enabled(cam.uses_gradients):
            outputs = recorder(x)
        check_target_range(targets, outputs.shape[1])
        if cam.uses_gradients:
            outputs.gather(1, targets.unsqueeze(1)).sum().backward()
        if not recorder.activations:
            raise ValueError(
                f"target layer {type(self.target_layer).__name__} did not run in the "
                "model's forward pass"
            )
        # The last call of the layer: the output that reaches the head.
        activations = recorder.activations[-1].numpy()
        grads = recorder.gradients[-1].numpy() if cam.uses_gradients else None
        del outputs
        # Score-CAM and Ablation-CAM run many more forward passes: without this the
        # recording hooks would copy every one of their activations to the CPU.
        recorder.release()
        if activations.ndim != 4:
            raise ValueError(
                f"target layer activations must be (B,K,h,w), got {activations.shape}; "
                "token outputs need a reshape_transform"
            )
        categories = [ClassifierOutputTarget(int(c)) for c in targets.tolist()]
        # Ablation-CAM divides by the clean score, which can be 0: the resulting inf/NaN
        # weights are zeroed below instead of warned about here.
        with torch.no_grad(), np.errstate(divide="ignore", invalid="ignore"):
            low = cam.get_cam_image(
                x.detach(), self.target_layer, categories, activations, grads, False
            )
            low = np.nan_to_num(np.asarray(low, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        # pytorch-grad-cam's own ReLU on the weighted sum (BaseCAM.compute_cam_per_layer).
        return np.maximum(low, 0)


class _LayerRecorder:
    """The target layer's output and its gradient, as the layer returned them.

    Stands in for pytorch-grad-cam's ``ActivationsAndGradients`` (same attributes and
    calls: ``activations``, ``gradients``, ``__call__``, ``release``). The forward hook
    keeps the layer's own output and hands the rest of the model a copy, so in-place ops
    after the layer change only the copy; the gradient recorded is that of the layer's
    output, reached through the copy.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        reshape_transform: Callable[[Tensor], Tensor] | None,
    ) -> None:
        self.model = model
        self.layer = layer
        self.reshape_transform = reshape_transform
        self.activations: list[Tensor] = []
        self.gradients: list[Tensor] = []
        self.handles = [layer.register_forward_hook(self._record)]

    def _record(self, _module: nn.Module, _inputs: object, output: object) -> Tensor:
        if not isinstance(output, Tensor):
            raise ValueError(
                f"target layer {type(self.layer).__name__} returns {type(output).__name__}, "
                "not a tensor; choose another layer"
            )
        self.activations.append(self._shaped(output.detach()).cpu())
        if output.requires_grad:
            output.register_hook(self._record_gradient)
        return output.clone()

    def _record_gradient(self, grad: Tensor) -> None:
        # Backward visits the layer's calls last to first: prepend to keep call order.
        self.gradients.insert(0, self._shaped(grad.detach()).cpu())

    def _shaped(self, tensor: Tensor) -> Tensor:
        return self.reshape_transform(tensor) if self.reshape_transform is not None else tensor

    def __call__(self, x: Tensor) -> Tensor:
        """Forward ``x`` through the model, recording the layer's output afresh."""
        self.activations = []
        self.gradients = []
        out: Tensor = self.model(x)
        return out

    def release(self) -> None:
        """Drop what was recorded and remove the hook (idempotent)."""
        self.activations = []
        self.gradients = []
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class FakeCAM(Explainer):
    """Fake-CAM (Opti-CAM paper, section on metrics): all ones but the top-left pixel.

    A map that explains nothing yet scores a near-perfect Average Drop: the reason AD
    must be read together with Average Gain. ``saliency`` is None.
    """

    options: ClassVar[tuple[str, ...]] = ()

    def explain(self, images: Tensor, targets: Tensor | None) -> Explanation:
        """Maps (B,1,H,W): ones, with ``maps[:, :, 0, 0] = 0``."""
        b, _, h, w = images.shape
        maps = torch.ones(b, 1, h, w, device=images.device)
        maps[:, :, 0, 0] = 0.0
        constant = torch.zeros(b, dtype=torch.bool, device=images.device)
        return Explanation(maps=maps, saliency=None, diagnostics={"constant_map": constant})


class GradCAMMethod(GradCAMBaseline):
    """Grad-CAM (Selvaraju et al.) through pytorch-grad-cam."""

    cam_class = GradCAM


class GradCAMPlusPlusMethod(GradCAMBaseline):
    """Grad-CAM++ (Chattopadhay et al.) through pytorch-grad-cam."""

    cam_class = GradCAMPlusPlus


class XGradCAMMethod(GradCAMBaseline):
    """XGrad-CAM (Fu et al.) through pytorch-grad-cam."""

    cam_class = XGradCAM


class ScoreCAMMethod(GradCAMBaseline):
    """Score-CAM (Wang et al.) through pytorch-grad-cam."""

    cam_class = ScoreCAM


class AblationCAMMethod(GradCAMBaseline):
    """Ablation-CAM (Desai and Ramaswamy) through pytorch-grad-cam."""

    cam_class = AblationCAM


class LayerCAMMethod(GradCAMBaseline):
    """Layer-CAM (Jiang et al.) through pytorch-grad-cam."""

    cam_class = LayerCAM


class HiResCAMMethod(GradCAMBaseline):
    """HiRes-CAM (Draelos and Carin) through pytorch-grad-cam."""

    cam_class = HiResCAM


#: Method name -> pytorch-grad-cam class, read off :data:`opticam.names.METHODS`.
CAM_METHODS: dict[str, type[BaseCAM]] = {
    name: globals()[info.class_path.rsplit(":", 1)[1]].cam_class
    for name, info in METHODS.items()
    if info.class_path.startswith(f"{__name__}:") and info.uses_layer
}


def _silent_tqdm(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
    return iterable


_PROGRESS_LOCK = threading.Lock()
_PROGRESS_USERS = 0
_PROGRESS_SAVED: list[tuple[types.ModuleType, Any]] = []


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence the per-image tqdm bars of Score-CAM and Ablation-CAM during a call.

    Scoped to pytorch-grad-cam's two modules and restored when the last concurrent user
    leaves; a dataset run would otherwise print one progress bar per image.
    """
    global _PROGRESS_USERS
    with _PROGRESS_LOCK:
        if _PROGRESS_USERS == 0:
            shim = types.SimpleNamespace(tqdm=_silent_tqdm)
            for module in (_score_module, _ablation_module):
                _PROGRESS_SAVED.append((module, module.tqdm))  # type: ignore[attr-defined]
                module.tqdm = shim  # type: ignore[attr-defined]
        _PROGRESS_USERS += 1
    try:
        yield
    finally:
        with _PROGRESS_LOCK:
            _PROGRESS_USERS -= 1
            if _PROGRESS_USERS == 0:
                for module, original in _PROGRESS_SAVED:
                    module.tqdm = original  # type: ignore[attr-defined]
                _PROGRESS_SAVED.clear()
