"""Saliency methods by name: ``get_explainer("opticam", model, iterations=50)``.

The name -> class mapping is :data:`opticam.names.METHODS` (torch-free, so configs can be
checked without torch); this module imports a method's class on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from opticam.errors import short_repr, shorten
from opticam.layers import ResolvedLayer, find_layer, resolve_target_layer
from opticam.methods.common import Explainer
from opticam.models import LoadedModel
from opticam.names import KNOWN_METHODS, METHODS

__all__ = ["KNOWN_METHODS", "explainer_class", "get_explainer"]


# Options about how the target layer's output is read, valid for every layer-based
# method (they override what the LoadedModel or the family default says).
_LAYER_OPTIONS = ("relu_features", "reshape_transform")


def explainer_class(name: str) -> type[Explainer]:
    """The :class:`Explainer` subclass of method ``name`` (:data:`opticam.names.METHODS`).

    Raises:
        ValueError: unknown method.
    """
    info = METHODS.get(name)
    if info is None:
        raise ValueError(f"unknown method {short_repr(name)} (known: {', '.join(KNOWN_METHODS)})")
    module, _, attr = info.class_path.partition(":")
    cls: type[Explainer] = getattr(importlib.import_module(module), attr)
    return cls


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
            :func:`opticam.layers.default_target_layer`).
        target_layer: dotted module name or the module itself; None means the
            LoadedModel's layer or the family default.
        **options: method options, e.g. ``iterations``, ``lr``, ``objective``, ``score``,
            ``normalization``, ``tolerance``, ``amp_dtype`` (Opti-CAM); ``batch_size``,
            ``normalization`` (pytorch-grad-cam methods); ``relu_features`` and
            ``reshape_transform`` for any layer-based method.

    Raises:
        ValueError: unknown method, unknown option, bad option value, or unknown layer.
    """
    cls = explainer_class(name)
    uses_layer = METHODS[name].uses_layer
    accepted = cls.options + getattr(cls, "objects", ()) + (_LAYER_OPTIONS if uses_layer else ())
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {shorten(', '.join(map(short_repr, unknown)))} for method {short_repr(name)} "
            f"(accepted: {', '.join(accepted) or 'none'})"
        )
    net = model.model if isinstance(model, LoadedModel) else model
    if not isinstance(net, nn.Module):
        raise ValueError(
            f"model must be a LoadedModel or a torch.nn.Module, got {type(model).__name__}"
        )
    if not uses_layer:
        return cls(net, **options)  # type: ignore[call-arg]

    layer = _layer(
        model,
        target_layer,
        relu_features=options.pop("relu_features", None),
        reshape_transform=options.pop("reshape_transform", None),
    )
    return cls(  # type: ignore[call-arg]
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
