"""Target layers: lookup by name, defaults per family, their output as feature maps.

A layer's output is read as feature maps (B,C,h,w), through reshape transforms for
token grids.

Target layers are dotted module names relative to the unwrapped model (``"layer4"``,
``"features.42"``); names relative to the wrappers (``"model.layer4"``) are accepted too.
Defaults per family (see :func:`default_target_layer`): ResNet/ResNeXt/Wide-ResNet
``layer4``; VGG the ReLU before the last max-pool of ``features``; DenseNet ``features``;
MobileNet V2/V3, EfficientNet, ConvNeXt and SqueezeNet the last block of ``features``; ViT
the first norm (``ln_1``) of the last encoder block, whose tokens are reshaped to their
grid; Swin the first norm of its last block, channels-last maps moved to (B,C,h,w); timm
and Hugging Face families: :func:`family_layer` (see :mod:`opticam.zoo` for the rules).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from opticam.errors import short_repr
from opticam.wrappers import HFClassifier, Normalized

__all__ = [
    "FamilyLayer",
    "ResolvedLayer",
    "channels_last_reshape_transform",
    "default_target_layer",
    "family_layer",
    "find_layer",
    "layer_candidates",
    "resolve_target_layer",
    "token_grid_reshape",
    "unwrap",
    "vit_reshape_transform",
]


@dataclass
class ResolvedLayer:
    """A target layer and how to read its output as feature maps (B,C,h,w)."""

    module: nn.Module
    name: str
    reshape_transform: Callable[[Tensor], Tensor] | None
    relu_features: bool


def vit_reshape_transform(tokens: Tensor) -> Tensor:
    """ViT tokens (B, 1 + h*w, C) -> feature maps (B, C, h, w) on a square grid.

    The class token (index 0) is dropped; patch tokens are laid out row-major as
    torchvision's ``VisionTransformer`` makes them (so a 224 input with 16-pixel patches
    gives a 14x14 grid).
    """
    if tokens.dim() != 3:
        raise ValueError(f"expected ViT tokens of shape (B, 1+h*w, C), got {tuple(tokens.shape)}")
    n = tokens.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(
            f"cannot reshape {n} patch tokens (class token dropped) to a square grid; "
            "pass a reshape_transform for this model"
        )
    b, _, c = tokens.shape
    return tokens[:, 1:, :].reshape(b, side, side, c).permute(0, 3, 1, 2)


def channels_last_reshape_transform(features: Tensor) -> Tensor:
    """Channels-last feature maps (B, h, w, C) (torchvision's Swin) -> (B, C, h, w)."""
    if features.dim() != 4:
        raise ValueError(f"expected (B, h, w, C) features, got {tuple(features.shape)}")
    return features.permute(0, 3, 1, 2)


def _wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model`` and the modules inside its wrappers, outermost first.

    Wrappers: :class:`Normalized` and :class:`~opticam.wrappers.HFClassifier` (both hold the
    wrapped module as ``.model``).
    """
    chain = [model]
    while isinstance(chain[-1], Normalized | HFClassifier):
        chain.append(chain[-1].model)
    return chain


def unwrap(model: nn.Module) -> nn.Module:
    """The classifier inside the :class:`Normalized` / ``HFClassifier`` wrappers (or ``model``)."""
    return _wrapper_chain(model)[-1]


_FEATURE_LAYERS = (nn.Conv2d, nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)


# What a classifier head starts with: the global pooling that ends the feature maps, or a
# fully connected layer (SqueezeNet's classifier also holds a convolution).
_HEAD_LAYERS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)


def _holds_features(module: nn.Module) -> bool:
    return any(isinstance(m, _FEATURE_LAYERS) for m in module.modules())


def _is_head(module: nn.Module) -> bool:
    """Whether ``module`` or one of its children pools the maps away or is fully connected.

    Only the first level is looked at: blocks whose inner parts hold a pooling (a
    squeeze-excitation) or a linear layer (a transformer's MLP) are feature blocks.
    """
    parts = [module, *module.children()]
    return any(
        isinstance(m, _HEAD_LAYERS) or type(m).__name__ == "SelectAdaptivePool2d" for m in parts
    )


def _feature_path(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The child of ``module`` on the way to its last feature maps, or None at a leaf block.

    The last child that holds a convolution or a norm layer and has children itself,
    skipping heads (:func:`_is_head`: a classifier, an auxiliary classifier) unless every
    such child is one (a backbone that ends in its own pooling).
    """
    holders = [
        (n, c)
        for n, c in module.named_children()
        if _holds_features(c) and any(True for _ in c.children())
    ]
    if not holders:
        return None
    bodies = [(n, c) for n, c in holders if not _is_head(c)]
    return (bodies or holders)[-1]


def layer_candidates(model: nn.Module, limit: int = 40) -> list[str]:
    """Module names worth suggesting as target layers, relative to :func:`unwrap`.

    The top-level children, then the path to the last feature maps: at each level the
    children of the last child that holds a convolution or a norm layer and is not a
    head (see :func:`_feature_path`), down to the leaves, e.g. ``layer4.1`` in a ResNet,
    ``features.12`` in a SqueezeNet, ``resnet.encoder.stages.3`` in a Hugging Face ResNet
    or ``blocks.11.norm1`` in a timm ViT; a model inside a wrapper of the user's own is
    followed the same way (``net.features.12``). When there are more than ``limit``, the
    top-level names and the deepest ones are kept.
    """
    inner = unwrap(model)
    top = [name for name, _ in inner.named_children()]
    deeper: list[str] = []
    prefix, module = "", inner
    while (step := _feature_path(module)) is not None:
        name, module = step
        prefix = f"{prefix}{name}."
        deeper.extend(f"{prefix}{child}" for child, _ in module.named_children())
    room = max(limit - len(top), 0)
    names = top[:limit] + (deeper[-room:] if room else [])
    return list(dict.fromkeys(names))


def find_layer(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Resolve a dotted module name to ``(module, name relative to the unwrapped model)``.

    Names are looked up in the unwrapped classifier first (``"layer4"``), then relative
    to each wrapper around it (``"model.layer4"`` for a :class:`Normalized` wrapper,
    ``"model.model.vit..."`` for a normalized Hugging Face model).

    Raises:
        ValueError: no such module; the message lists candidate names.
    """
    chain = _wrapper_chain(model)
    inner = chain[-1]
    try:
        return inner.get_submodule(name), name
    except AttributeError:
        pass
    for depth in range(1, len(chain)):
        prefix = "model." * depth
        if name.startswith(prefix):
            try:
                return inner.get_submodule(name[len(prefix) :]), name[len(prefix) :]
            except AttributeError:
                pass
    candidates = ", ".join(layer_candidates(model))
    raise ValueError(
        f"unknown target layer {short_repr(name)} in {type(inner).__name__} "
        f"(candidates include: {candidates}; any dotted name from model.named_modules() works)"
    )


def default_target_layer(model: nn.Module) -> str:
    """The default CAM target layer of a classifier, as a dotted name (see module doc).

    Known torchvision, timm and Hugging Face families get the layers used in the
    literature (timm and Hugging Face: :func:`family_layer`); a module with a
    ``default_target_layer`` string attribute names its own; any other model gets the last
    top-level child that holds a convolution and no pooling/linear head, or, for a module
    with a single child (a wrapper of the user's own), that child's default.

    Raises:
        ValueError: nothing suitable found; the message lists candidate names.
    """
    inner = unwrap(model)
    declared = getattr(inner, "default_target_layer", None)
    if isinstance(declared, str):
        return declared
    family = _zoo_family(inner)
    if family is not None:
        return family.name
    known = _torchvision_layer(inner)
    if known is not None:
        return known
    return _fallback_layer(model, inner)


def _torchvision_layer(inner: nn.Module) -> str | None:
    """The default layer of a torchvision family, or None for another model."""
    import torchvision.models as tvm

    if isinstance(inner, tvm.ResNet):
        return "layer4"
    if isinstance(inner, tvm.VGG):
        layers = list(inner.features)
        pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        last = pools[-1] if pools else len(layers)
        # The activation that feeds the final max-pool: the last conv block's output.
        return f"features.{last - 1}"
    if isinstance(inner, tvm.DenseNet):
        return "features"
    if isinstance(
        inner, tvm.MobileNetV2 | tvm.MobileNetV3 | tvm.EfficientNet | tvm.ConvNeXt | tvm.SqueezeNet
    ):
        return f"features.{len(inner.features) - 1}"
    if isinstance(inner, tvm.VisionTransformer):
        blocks = list(inner.encoder.layers.named_children())
        return f"encoder.layers.{blocks[-1][0]}.ln_1"
    if isinstance(inner, tvm.SwinTransformer):
        stage = len(inner.features) - 1
        return f"features.{stage}.{len(inner.features[stage]) - 1}.norm1"
    return None


def _fallback_layer(model: nn.Module, inner: nn.Module) -> str:
    """The default layer of a model of no known family (see :func:`default_target_layer`)."""
    head_types = (nn.Linear, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
    chosen = None
    for name, child in inner.named_children():
        if _has_conv(child) and not any(isinstance(m, head_types) for m in child.modules()):
            chosen = name
    if chosen is None and len(list(inner.children())) == 1:
        # A wrapper of the user's own around one classifier: that classifier's default.
        ((name, child),) = inner.named_children()
        try:
            return f"{name}.{default_target_layer(child)}"
        except ValueError:
            pass
    if chosen is None:
        raise ValueError(
            f"no default target layer for {type(inner).__name__}; pass target_layer= "
            f"(candidates include: {', '.join(layer_candidates(model))})"
        )
    return chosen


def resolve_target_layer(
    model: nn.Module,
    name: str | None = None,
    *,
    relu_features: bool | None = None,
    reshape_transform: Callable[[Tensor], Tensor] | None = None,
) -> ResolvedLayer:
    """Resolve a target layer by name (or the family default) with its feature reading.

    Transformers get a reshape and ``relu_features=False`` unless told otherwise (ViT:
    :func:`vit_reshape_transform`; Swin: :func:`channels_last_reshape_transform`; timm
    and Hugging Face families: :func:`family_layer`, whose reading applies to
    any layer of the model); every other model gets no reshape and ``relu_features=True``.
    """
    import torchvision.models as tvm

    layer_name = name if name is not None else default_target_layer(model)
    module, layer_name = find_layer(model, layer_name)
    inner = unwrap(model)
    family = _zoo_family(inner)
    if family is not None:
        if reshape_transform is None:
            reshape_transform = family.reshape_transform
        if relu_features is None:
            relu_features = family.relu_features
        return ResolvedLayer(module, layer_name, reshape_transform, relu_features)
    transformer = isinstance(inner, tvm.VisionTransformer | tvm.SwinTransformer)
    if reshape_transform is None and isinstance(inner, tvm.VisionTransformer):
        reshape_transform = vit_reshape_transform
    if reshape_transform is None and isinstance(inner, tvm.SwinTransformer):
        reshape_transform = channels_last_reshape_transform
    if relu_features is None:
        relu_features = not transformer
    return ResolvedLayer(module, layer_name, reshape_transform, relu_features)


def _zoo_family(inner: nn.Module) -> Any:
    """:func:`family_layer` for timm / transformers models, else None."""
    if not type(inner).__module__.startswith(("timm.", "transformers.")):
        return None
    return family_layer(inner)


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


# --------------------------------------------------------------------------- timm and Hugging Face


def token_grid_reshape(
    tokens: Tensor, prefix_tokens: int = 1, grid: tuple[int, int] | None = None
) -> Tensor:
    """Transformer tokens (B, prefix + h*w, C) -> feature maps (B, C, h, w).

    The first ``prefix_tokens`` tokens (class, distillation, register tokens) are
    dropped; the rest are patch tokens in row-major order on ``grid`` = (h, w), or on a
    square grid when ``grid`` is None. Maps that are already 4-D (the output of a
    convolution such as the patch embedding) are returned as they are.

    Raises:
        ValueError: the token count does not fit the grid (a wrong prefix count, or an
            input size other than the model's).
    """
    if tokens.dim() == 4:
        return tokens
    if tokens.dim() != 3:
        raise ValueError(f"expected tokens of shape (B, N, C), got {tuple(tokens.shape)}")
    b, n, c = tokens.shape
    patches = n - prefix_tokens
    if grid is None:
        side = math.isqrt(max(patches, 0))
        grid = (side, side)
    if patches <= 0 or grid[0] * grid[1] != patches:
        raise ValueError(
            f"cannot reshape {n} tokens ({prefix_tokens} prefix tokens dropped) to a "
            f"{grid[0]}x{grid[1]} patch grid; pass a reshape_transform for this layer"
        )
    return tokens[:, prefix_tokens:, :].reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)


def _channels_last(features: Tensor) -> Tensor:
    return channels_last_reshape_transform(features)


@dataclass(frozen=True)
class FamilyLayer:
    """A family's default target layer and how to read its output as (B,C,h,w) maps."""

    name: str
    reshape_transform: Callable[[Tensor], Tensor] | None
    relu_features: bool


def family_layer(model: nn.Module) -> FamilyLayer | None:
    """The default target layer of a timm or transformers classifier (module doc), or None.

    ``model`` is the unwrapped classifier (:func:`unwrap`); None for a
    model from neither zoo, or one whose family has no rule here.
    """
    module = type(model).__module__
    if module.startswith("timm."):
        return _timm_layer(model)
    if module.startswith("transformers."):
        return _hf_layer(model)
    return None


def _timm_layer(model: nn.Module) -> FamilyLayer | None:
    blocks = getattr(model, "blocks", None)
    patch_embed = getattr(model, "patch_embed", None)
    if (
        isinstance(blocks, nn.Sequential | nn.ModuleList)
        and len(blocks) > 0
        and patch_embed is not None
        and hasattr(blocks[-1], "norm1")
    ):
        prefix = getattr(model, "num_prefix_tokens", None)
        if prefix is None:
            prefix = int(getattr(model, "cls_token", None) is not None)
        size = getattr(patch_embed, "grid_size", None)
        grid = None
        if size is not None and not getattr(model, "dynamic_img_size", False):
            grid = (int(size[0]), int(size[1]))
        reshape = functools.partial(token_grid_reshape, prefix_tokens=int(prefix), grid=grid)
        return FamilyLayer(f"blocks.{len(blocks) - 1}.norm1", reshape, relu_features=False)
    layers = getattr(model, "layers", None)
    last_blocks = (
        getattr(layers[-1], "blocks", None)
        if isinstance(layers, nn.Sequential | nn.ModuleList) and len(layers)
        else None
    )
    if (
        isinstance(last_blocks, nn.Sequential | nn.ModuleList)
        and len(last_blocks) > 0
        and hasattr(last_blocks[-1], "norm1")
    ):  # Swin (v1, v2): channels-last (B, H, W, C) maps
        assert layers is not None
        name = f"layers.{len(layers) - 1}.blocks.{len(last_blocks) - 1}.norm1"
        return FamilyLayer(name, _channels_last, relu_features=False)
    if type(model).__name__ == "EfficientNet" and hasattr(model, "bn2"):
        return FamilyLayer("bn2", None, relu_features=True)
    info = getattr(model, "feature_info", None)
    if isinstance(info, Sequence) and info and isinstance(info[-1], Mapping):
        stage = info[-1].get("module")
        if isinstance(stage, str) and stage:
            return FamilyLayer(stage, None, relu_features=True)
    return None


def _hf_prefix_tokens(model: nn.Module) -> int:
    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    count = sum(
        getattr(embeddings, name, None) is not None for name in ("cls_token", "distillation_token")
    )
    registers = getattr(embeddings, "register_tokens", None)
    if isinstance(registers, Tensor) and registers.dim() >= 2:
        count += int(registers.shape[1])
    return count


def _hf_layer(model: nn.Module) -> FamilyLayer | None:
    modules = list(model.named_modules())
    norms = [name for name, _ in modules if name.endswith("layernorm_before")]
    if norms:  # ViT, DeiT, Swin, ...: the last layer's first norm
        reshape = functools.partial(token_grid_reshape, prefix_tokens=_hf_prefix_tokens(model))
        return FamilyLayer(norms[-1], reshape, relu_features=False)
    tops = [name for name, _ in modules if name.endswith("top_activation")]
    if tops:  # EfficientNet: after the 1x1 head conv, BN and activation
        return FamilyLayer(tops[-1], None, relu_features=True)
    stages = [
        (name, m)
        for name, m in modules
        if name.rsplit(".", 1)[-1] == "stages" and isinstance(m, nn.ModuleList) and len(m) > 0
    ]
    if stages:
        name, stage_list = stages[-1]
        return FamilyLayer(f"{name}.{len(stage_list) - 1}", None, relu_features=True)
    return None
