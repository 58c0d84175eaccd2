"""Model sources: what each one builds and knows (:class:`SourceModel`), and the built-in ones.

A source is a function ``(target, spec, load_state) -> SourceModel``: ``target`` is what
follows ``KIND:`` in ``ModelSpec.source``, ``spec`` the whole spec, ``load_state`` a
callback that loads ``spec.checkpoint`` into a module (:func:`opticam.models.load_model`
passes its own: safe loading, short mismatch messages). A source reads from the spec only
what it needs to build the network (the checkpoint, the architecture's number of classes)
or to refuse a model it cannot describe; every other setting of the spec is applied
afterwards, in one place, by :func:`opticam.models.load_model`.

Built-in sources here: :func:`load_demo` (``demo``), :func:`load_torchvision`
(``torchvision:NAME[:WEIGHTS]``) and :func:`load_factory` (``factory:pkg.mod:fn``). The
timm and Hugging Face sources live in :mod:`opticam.zoo`. This module imports neither
:mod:`opticam.models` nor :mod:`opticam.zoo`, so both can use the record.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.error import URLError

from torch import nn

from opticam.config import ModelSpec
from opticam.errors import WeightsUnavailableError, short_repr

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SourceModel",
    "StateLoader",
    "load_demo",
    "load_factory",
    "load_torchvision",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# torchvision's classification presets crop 224 out of a 256 resize unless the weights
# say otherwise (their transforms carry crop_size / resize_size).
_TORCHVISION_INPUT_SIZE = 224
_TORCHVISION_RESIZE_SIZE = 256

#: Loads ``spec.checkpoint`` into a module (raises ``CheckpointError`` when it does not fit).
StateLoader = Callable[[nn.Module], None]


@dataclass
class SourceModel:
    """A network a source built, and what the source knows about feeding it.

    None means "the source does not say": :func:`opticam.models.load_model` then takes
    the spec's value or its documented default.

    Attributes:
        net: the classifier; takes images normalized with ``mean`` / ``std`` (or [0,1]
            images when those are None) and returns logits (B, num_classes).
        mean: per-channel mean for [0,1] images (3 values), or None when the net
            normalizes inside (the demo) or the source does not know.
        std: per-channel standard deviation for [0,1] images, or None.
        num_classes: number of logits, or None when unknown (a forward pass tells).
        input_size: side of the square model input, or None.
        resize_size: shorter side (``shorter``) or square side (``squash``) of the resize
            for ``input_size``, or None (then the resize is the input size: no crop).
        crop_fraction: ``input_size / resize_size`` as the source defines it (timm's
            ``crop_pct``), to rescale the resize for another input size; None keeps
            ``resize_size`` whatever the input size.
        default_layer: the CAM target layer the source names, or None to leave it to
            :func:`opticam.layers.default_target_layer`.
        interpolation: one of :data:`opticam.names.INTERPOLATIONS`, or None.
        resize_mode: one of :data:`opticam.names.RESIZE_MODES`, or None.
        crop_rounding: one of :data:`opticam.names.CROP_ROUNDINGS`, or None.
    """

    net: nn.Module
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_classes: int | None = None
    input_size: int | None = None
    resize_size: int | None = None
    crop_fraction: float | None = None
    default_layer: str | None = None
    interpolation: str | None = None
    resize_mode: str | None = None
    crop_rounding: str | None = None

    def resize_for(self, input_size: int) -> int:
        """The resize for ``input_size``, in the source's own terms.

        The source's ``resize_size`` when ``input_size`` is its own or when it has no
        ``crop_fraction``; ``floor(input_size / crop_fraction)`` for another input size
        when it has one; ``input_size`` itself (no crop) when it gives no resize at all.
        """
        rescale = self.crop_fraction is not None and input_size != self.input_size
        if self.resize_size is not None and not rescale:
            return self.resize_size
        if self.crop_fraction is not None:
            return max(1, math.floor(input_size / self.crop_fraction))
        return input_size


# --------------------------------------------------------------------------- demo


def load_demo(target: str, spec: ModelSpec, load_state: StateLoader) -> SourceModel:
    """Build ``demo``: the bundled classifier, or its architecture with ``spec.checkpoint``.

    The net normalizes inside (no mean or std here); 128 input, 128 resize, target layer
    ``features.block6``. Without a checkpoint the bundled weights' 10 classes; with one
    the architecture is built with ``spec.num_classes`` (default 10).

    Args:
        target: empty (the source is just ``demo``).
        spec: the model spec (checkpoint, num_classes).
        load_state: loads ``spec.checkpoint`` into a module.
    """
    del target
    import opticam.demo as demo

    if spec.checkpoint is None:
        net = demo.load_model()
        num_classes = demo.NUM_CLASSES
    else:
        from opticam.demo.model import DemoNet

        num_classes = spec.num_classes or demo.NUM_CLASSES
        net = DemoNet(num_classes=num_classes)
        load_state(net)
    return SourceModel(
        net=net,
        num_classes=num_classes,
        input_size=demo.DEMO_INPUT_SIZE,
        resize_size=demo.DEMO_INPUT_SIZE,
        default_layer=demo.DEMO_TARGET_LAYER,
    )


# --------------------------------------------------------------------------- torchvision


def load_torchvision(target: str, spec: ModelSpec, load_state: StateLoader) -> SourceModel:
    """Build ``torchvision:NAME[:WEIGHTS]`` (``target`` is ``NAME[:WEIGHTS]``).

    ImageNet's mean and std; the input and resize sizes of the weights' preset (224 and
    256 without weights); the number of classes of the weights, unknown without them
    (the architecture is then built with ``spec.num_classes`` when given, and
    ``spec.checkpoint`` is loaded into it).

    Args:
        target: the source after ``torchvision:``.
        spec: the model spec (checkpoint, num_classes).
        load_state: loads ``spec.checkpoint`` into a module.

    Raises:
        WeightsUnavailableError: the weights are neither cached nor downloadable.
        ValueError: unknown architecture or weights, weights and a checkpoint both given,
            or a ``num_classes`` that contradicts the weights.
    """
    import torchvision.models as tvm

    arch, _, weights_name = target.partition(":")
    known = tvm.list_models(module=tvm)
    if arch not in known:
        raise ValueError(
            f"unknown torchvision classification model {short_repr(arch)} (known: {', '.join(sorted(known))})"
        )
    if not weights_name:
        return SourceModel(
            net=_torchvision_without_weights(arch, spec, load_state),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            input_size=_TORCHVISION_INPUT_SIZE,
            resize_size=_TORCHVISION_RESIZE_SIZE,
        )
    weights = _torchvision_weights(arch, weights_name, spec)
    net = _download_torchvision(arch, weights)
    # The weights' own preset (e.g. crop 224 from a 232 resize for IMAGENET1K_V2).
    preset = getattr(weights.transforms, "keywords", {})
    return SourceModel(
        net=net,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes=len(weights.meta["categories"]),
        input_size=_preset_size(preset, "crop_size") or _TORCHVISION_INPUT_SIZE,
        resize_size=_preset_size(preset, "resize_size") or _TORCHVISION_RESIZE_SIZE,
    )


def _torchvision_without_weights(arch: str, spec: ModelSpec, load_state: StateLoader) -> nn.Module:
    """``arch`` with ``spec.num_classes`` (when given) and ``spec.checkpoint`` loaded.

    Without a checkpoint the weights are random, with a warning that points at the
    caller of :func:`opticam.models.load_model`.
    """
    import torchvision.models as tvm

    kwargs: dict[str, Any] = {}
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    net = tvm.get_model(arch, weights=None, **kwargs)
    if spec.checkpoint is None:
        # stack: this function, load_torchvision, load_model, its caller
        warnings.warn(
            f"torchvision:{arch} has neither weights nor a checkpoint: random weights",
            stacklevel=4,
        )
    else:
        load_state(net)
    return net


def _torchvision_weights(arch: str, weights_name: str, spec: ModelSpec) -> Any:
    """The weights enum member ``weights_name`` (or ``DEFAULT``) of ``arch``, checked.

    Raises:
        ValueError: a checkpoint as well, unknown weights, or a ``spec.num_classes``
            that is not the weights' number of categories.
    """
    import torchvision.models as tvm

    if spec.checkpoint is not None:
        raise ValueError(
            f"give either torchvision weights ({short_repr(weights_name)}) or a checkpoint "
            f"({short_repr(spec.checkpoint)}), not both; a checkpoint goes with 'torchvision:{arch}'"
        )
    enum = tvm.get_model_weights(arch)
    try:
        weights = enum[weights_name] if weights_name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ValueError(
            f"unknown weights {short_repr(weights_name)} for torchvision:{arch} "
            f"(known: DEFAULT, {', '.join(w.name for w in enum)})"
        ) from None
    categories = len(weights.meta["categories"])
    if spec.num_classes is not None and spec.num_classes != categories:
        raise ValueError(
            f"num_classes={spec.num_classes} contradicts {arch}:{weights.name}, which has "
            f"{categories} classes"
        )
    return weights


def _download_torchvision(arch: str, weights: Any) -> nn.Module:
    """``arch`` with ``weights`` from the torch cache or the network.

    Raises:
        WeightsUnavailableError: neither cached nor downloadable.
    """
    import torchvision.models as tvm

    try:
        return tvm.get_model(arch, weights=weights)
    except (URLError, OSError, ConnectionError) as err:
        raise WeightsUnavailableError(
            f"could not obtain torchvision weights {arch}:{weights.name} from {weights.url} "
            f"(no network? nothing in the torch cache at $TORCH_HOME/hub/checkpoints): {err}. "
            "Either download them once where a network exists (they are cached), or pass "
            f"the state_dict yourself: ModelSpec(source='torchvision:{arch}', "
            "checkpoint='<local path or s3://... URL of the .pth file>')"
        ) from err


def _preset_size(preset: dict[str, Any], key: str) -> int | None:
    """``crop_size`` or ``resize_size`` of a torchvision preset as one int, or None."""
    value = preset.get(key)
    if isinstance(value, Sequence):
        value = value[0]
    return value if isinstance(value, int) else None


# --------------------------------------------------------------------------- factory


def load_factory(target: str, spec: ModelSpec, load_state: StateLoader) -> SourceModel:
    """Build ``factory:package.module:function`` (``target`` is ``package.module:function``).

    ``function()`` returns the net; ``spec.checkpoint`` is loaded into it when given. What
    the net declares is what the source knows: ``input_mean`` and ``input_std`` (no
    ``input_mean``: taken as normalizing inside) and ``input_size`` (an int). The
    number of classes is unknown (a forward pass tells) and the resize is the input
    size; a ``default_target_layer`` attribute is read by :mod:`opticam.layers`.

    Raises:
        ValueError: the module cannot be imported, has no such function, or the function
            does not return an ``nn.Module``.
    """
    net = _call_factory(target)
    if spec.checkpoint is not None:
        load_state(net)
    mean = getattr(net, "input_mean", None)
    std = getattr(net, "input_std", None)
    declared_size = getattr(net, "input_size", None)
    return SourceModel(
        net=net,
        mean=None if mean is None else tuple(mean),
        std=None if std is None else tuple(std),
        input_size=declared_size if isinstance(declared_size, int) else None,
    )


def _call_factory(target: str) -> nn.Module:
    """Import ``package.module`` and call its ``function()``; the module it returns.

    Raises:
        ValueError: see :func:`load_factory`.
    """
    module_name, _, fn_name = target.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import factory module {short_repr(module_name)}: {err}") from err
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(
            f"factory {short_repr(fn_name)} not found (or not callable) in {short_repr(module_name)}"
        )
    net = fn()
    if not isinstance(net, nn.Module):
        raise ValueError(
            f"factory {short_repr(target)} returned {type(net).__name__}, expected a torch.nn.Module"
        )
    return net
