"""Saliency methods by name: ``get_explainer("opticam", model, iterations=50)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from opticam.methods.baselines import CAM_METHODS, FakeCAM, GradCAMBaseline
from opticam.methods.common import Explainer
from opticam.methods.opticam import OptiCAM
from opticam.models import LoadedModel, ResolvedLayer, find_layer, resolve_target_layer
from opticam.names import KNOWN_METHODS

__all__ = ["KNOWN_METHODS", "get_explainer"]


# Options about how the target layer's output is read, valid for every layer-based
# method (they override what the LoadedModel or the family default says).
_LAYER_OPTIONS = ("relu_features", "reshape_transform")


def get_explainer(
    name: str,
    model: LoadedModel | nn.Module,
    *,
    target_layer: str | nn.Module | None = None,
    **options: Any,
) -> Explainer:
    """A saliency method bound to a model: ``explainer(images, targets) -> Explanation``.

    Args:
        name: one of :data:`KNOWN_METHODS`.
        model: a :class:`~opticam.models.LoadedModel`, or any classifier taking
            (B,3,H,W) images in [0,1] (its target layer then defaults per family, see
            :func:`opticam.models.default_target_layer`).
        target_layer: dotted module name or the module itself; None means the
            LoadedModel's layer or the family default.
        **options: method options, e.g. ``iterations``, ``lr``, ``objective``, ``score``,
            ``normalization``, ``tolerance``, ``amp_dtype`` (Opti-CAM); ``batch_size``,
            ``normalization`` (pytorch-grad-cam methods); ``relu_features`` and
            ``reshape_transform`` for any layer-based method.

    Raises:
        ValueError: unknown method, unknown option, bad option value, or unknown layer.
    """
    if name not in KNOWN_METHODS:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(KNOWN_METHODS)})")
    cls: type[Explainer] = (
        OptiCAM if name == "opticam" else FakeCAM if name == "fakecam" else GradCAMBaseline
    )
    accepted = cls.options + (_LAYER_OPTIONS if cls is not FakeCAM else ())
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {name!r} "
            f"(accepted: {', '.join(accepted) or 'none'})"
        )
    net = model.model if isinstance(model, LoadedModel) else model
    if not isinstance(net, nn.Module):
        raise ValueError(
            f"model must be a LoadedModel or a torch.nn.Module, got {type(model).__name__}"
        )
    if cls is FakeCAM:
        return FakeCAM(net)

    layer = _layer(
        model,
        target_layer,
        relu_features=options.pop("relu_features", None),
        reshape_transform=options.pop("reshape_transform", None),
    )
    if cls is OptiCAM:
        return OptiCAM(
            net,
            layer.module,
            reshape_transform=layer.reshape_transform,
            relu_features=layer.relu_features,
            **options,
        )
    assert name in CAM_METHODS
    return GradCAMBaseline(
        name,
        net,
        layer.module,
        reshape_transform=layer.reshape_transform,
        relu_features=layer.relu_features,
        **options,
    )


def _layer(
    model: LoadedModel | nn.Module,
    target_layer: str | nn.Module | None,
    *,
    relu_features: bool | None,
    reshape_transform: Callable[[Tensor], Tensor] | None,
) -> ResolvedLayer:
    """The target layer, from the LoadedModel, a name, a module, or the family default."""
    if isinstance(model, LoadedModel):
        if target_layer is None:
            module, layer_name = model.target_layer, model.target_layer_name
        elif isinstance(target_layer, str):
            module, layer_name = find_layer(model.model, target_layer)
        else:
            module, layer_name = target_layer, _name_of(model.model, target_layer)
        return ResolvedLayer(
            module,
            layer_name,
            reshape_transform if reshape_transform is not None else model.reshape_transform,
            relu_features if relu_features is not None else model.relu_features,
        )
    if isinstance(target_layer, nn.Module):
        resolved = resolve_target_layer(
            model,
            _name_of(model, target_layer),
            relu_features=relu_features,
            reshape_transform=reshape_transform,
        )
        return resolved
    return resolve_target_layer(
        model, target_layer, relu_features=relu_features, reshape_transform=reshape_transform
    )


def _name_of(model: nn.Module, layer: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is layer:
            return name
    raise ValueError(
        f"target layer {type(layer).__name__} is not a submodule of {type(model).__name__}"
    )
