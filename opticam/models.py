"""Classifiers to explain: what to load (``ModelSpec``) and what comes back (``LoadedModel``).

Every model handed to the saliency methods takes images ``x`` of shape (B,3,H,W) with
values in [0,1] and returns logits (B,num_classes). Input normalization lives inside the
model, so that a masked image ``x * M`` is black where ``M = 0`` (METHOD.md section 1).
Models trained on normalized inputs are wrapped in :class:`Normalized`.

Sources (``ModelSpec.source``):

- ``"demo"``: the bundled demo classifier (:mod:`opticam.demo`), normalization inside.
- ``"torchvision:NAME[:WEIGHTS]"``: a torchvision architecture, e.g.
  ``"torchvision:resnet50:IMAGENET1K_V2"`` (weights come from the torch cache, or are
  downloaded where a network exists), or ``"torchvision:resnet50"`` with
  ``checkpoint=`` a state_dict at any fsspec URL.
- ``"factory:package.module:function"``: ``function()`` returns an ``nn.Module``; a
  ``checkpoint`` is loaded into it when given.
- ``"timm:NAME[:TAG]"`` (or ``NAME.TAG``): a timm model, pretrained weights through timm
  (cached, or downloaded where a network exists) or ``checkpoint=`` a state_dict; needs
  ``pip install 'opticam[timm]'``.
- ``"hf:ORG/NAME"`` or ``"hf:FOLDER"``: a Hugging Face transformers image classifier from
  the Hub or a ``save_pretrained`` folder (model and image processor), never with remote
  code; needs ``pip install 'opticam[hf]'``.

Each source is one function that builds the network and says what it knows about feeding
it, as a :class:`~opticam.sources.SourceModel` (demo, torchvision and factory:
:mod:`opticam.sources`; timm and hf bring their own preprocessing, read and checked as
:mod:`opticam.zoo` says). :func:`load_model` then applies the spec's fields over the
source's values, one rule per setting (its docstring lists them), and the result is
carried by :class:`LoadedModel` to every place that builds a
:class:`~opticam.data.Preprocess` (:meth:`LoadedModel.preprocess`).

Target layers (names, defaults per family, reshape transforms): :mod:`opticam.layers`.
The wrappers (:class:`Normalized`, ``HFClassifier``): :mod:`opticam.wrappers`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec
import torch
from torch import Tensor, nn

from opticam.config import ModelSpec
from opticam.errors import CheckpointError, WeightsUnavailableError, short_repr
from opticam.layers import resolve_target_layer
from opticam.sources import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SourceModel,
    StateLoader,
    load_demo,
    load_factory,
    load_torchvision,
)
from opticam.wrappers import Normalized

if TYPE_CHECKING:
    from opticam.data import Preprocess

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CheckpointError",
    "LoadedModel",
    "ModelSpec",
    "WeightsUnavailableError",
    "load_checkpoint",
    "load_model",
]

#: The input side of a model whose spec and source both leave it open.
DEFAULT_INPUT_SIZE = 224

_T = TypeVar("_T")


@dataclass
class LoadedModel:
    """A classifier ready to explain.

    Attributes:
        model: eval mode, parameters frozen, takes (B,3,H,W) images in [0,1].
        target_layer: the CAM target layer (a submodule of ``model``).
        target_layer_name: its dotted name relative to :func:`unwrap` (``model``).
        input_size: (H, W) of the model input.
        resize_size: shorter side before the centre crop (``resize_mode="shorter"``), or
            the side of the square the image is squashed to (``"squash"``).
        num_classes: number of logits.
        reshape_transform: maps the layer's output to (B,C,h,w) (ViT tokens), or None.
        relu_features: whether Opti-CAM ReLUs the target layer's features.
        name: the source, e.g. ``"demo"`` or ``"torchvision:resnet50:IMAGENET1K_V2"``.
        interpolation: resampling filter of the resize (:data:`opticam.names.INTERPOLATIONS`).
        resize_mode: ``"shorter"`` or ``"squash"`` (:data:`opticam.names.RESIZE_MODES`).
        crop_rounding: ``"round"`` (torchvision, timm) or ``"floor"`` (Hugging Face).
        mean: per-channel mean the model subtracts from [0,1] images (its
            :class:`Normalized` wrapper), or None when that wrapper is absent (the demo
            model normalizes inside its own code; a factory that declares no
            ``input_mean`` is taken as normalizing inside, too).
        std: per-channel standard deviation it divides by, or None with ``mean``.
    """

    model: nn.Module
    target_layer: nn.Module
    target_layer_name: str
    input_size: tuple[int, int]
    resize_size: int
    num_classes: int
    reshape_transform: Callable[[Tensor], Tensor] | None
    relu_features: bool
    name: str
    interpolation: str = "bilinear"
    resize_mode: str = "shorter"
    crop_rounding: str = "round"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def description(self) -> dict[str, Any]:
        """What the loaded model applies, as JSON values (``run.json``'s ``loaded_model``).

        The settings a spec may leave to the model's family, its weights or its factory:
        ``source``, ``target_layer``, ``input_size``, ``resize_size``, ``num_classes``,
        ``mean`` and ``std`` (None: no normalization inside), ``relu_features``,
        ``interpolation``, ``resize_mode``, ``crop_rounding``.
        """
        return {
            "source": self.name,
            "target_layer": self.target_layer_name,
            "input_size": list(self.input_size),
            "resize_size": self.resize_size,
            "num_classes": self.num_classes,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "relu_features": self.relu_features,
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "crop_rounding": self.crop_rounding,
        }

    def preprocess(self) -> Preprocess:
        """The :class:`~opticam.data.Preprocess` that makes this model's inputs."""
        from opticam.data import Preprocess

        return Preprocess(
            self.input_size,
            self.resize_size,
            interpolation=self.interpolation,
            resize_mode=self.resize_mode,
            crop_rounding=self.crop_rounding,
        )

    def preprocess_settings(self) -> dict[str, Any]:
        """What a shard status records so that readers rebuild :meth:`preprocess`."""
        return {
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "crop_rounding": self.crop_rounding,
        }


def load_checkpoint(
    url: str, *, trust: bool = False, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Tensor]:
    """Read a state_dict from any fsspec URL.

    Common wrappers are unpacked (``{"state_dict": ...}``, ``{"model": ...}``) and a
    ``"module."`` prefix left by DataParallel is stripped.

    Args:
        url: local path or fsspec URL.
        trust: allow arbitrary pickled objects (``weights_only=False``). Never for files
            from strangers: unpickling runs code.
        storage_options: passed to fsspec (credentials, endpoint).

    Raises:
        CheckpointError: unreadable file, refused pickled objects, or not a state_dict.
    """
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
            data = f.read()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {short_repr(url)}: {err}") from err
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
        if not trust and "weights_only" in str(err).lower().replace(" ", "_"):
            raise CheckpointError(
                f"checkpoint {short_repr(url)} holds Python objects that safe loading "
                "(torch.load(weights_only=True)) refuses; save a plain state_dict "
                "(model.state_dict()) or, only if you trust the file, set "
                f"trust_checkpoint=True. Details: {err}"
            ) from err
        raise CheckpointError(f"cannot load checkpoint {short_repr(url)}: {err}") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {short_repr(url)} is not a state_dict (a mapping of parameter names to "
            f"tensors); got {type(obj).__name__}"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_model(  # size: 40 of its lines are the docstring, where the override rule is stated
    spec: ModelSpec,
    device: str | torch.device = "cpu",
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Build the classifier a spec describes, on ``device``, ready to explain.

    The source (:mod:`opticam.sources`, :mod:`opticam.zoo`) builds the network and says
    what it knows about feeding it (a :class:`~opticam.sources.SourceModel`); then, here
    and nowhere else, each setting is the spec's value when given, else the source's,
    else a default:

    - ``mean`` and ``std``, each on its own: the spec's, else the source's. Without a
      mean the model gets no normalization wrapper (the net normalizes inside, or takes
      [0,1] images) and a std alone is ignored; with a mean and no std anywhere, the std
      is 1.
    - ``input_size``: the spec's, else the source's, else 224.
    - ``resize_size``: the spec's, else the source's resize for that input size
      (:meth:`~opticam.sources.SourceModel.resize_for`: its own for its own input, in
      its crop proportion for another one where it has one, else its fixed resize), else
      the input size (no crop).
    - ``interpolation`` and ``resize_mode``: the spec's, else the source's, else
      ``bilinear`` and ``shorter``; ``crop_rounding`` (no spec field): the source's, else
      ``round``.
    - ``num_classes``: the spec's, else the source's (sources refuse a spec that
      contradicts their weights), else counted by one forward pass.
    - ``target_layer``: the spec's, else the source's, else the family default
      (:func:`opticam.layers.default_target_layer`); ``relu_features``: the spec's, else
      the layer family's.

    The model is put in eval mode with its parameters frozen (``requires_grad=False``):
    saliency methods need gradients with respect to inputs or masks, never weights.

    Args:
        spec: what to load.
        device: where the model lives.
        storage_options: fsspec options for reading ``spec.checkpoint`` (kept out of the
            spec so that credentials never land in a run description).

    Raises:
        WeightsUnavailableError: torchvision, timm or Hugging Face weights not cached and
            not downloadable.
        CheckpointError: the checkpoint cannot be read or does not fit.
        MissingPackageError: a timm or hf source without its package installed.
        ValueError: bad source, weights name, or target layer.
    """
    kind, _, target = spec.source.partition(":")

    def load_state(module: nn.Module) -> None:
        _load_state(module, spec, storage_options)

    built = _source(kind)(target, spec, load_state)
    mean = _given(spec.mean, built.mean)
    std = _given(spec.std, built.std)
    input_size = _given(spec.input_size, built.input_size) or DEFAULT_INPUT_SIZE
    resize_size = _given(spec.resize_size, built.resize_for(input_size))
    model: nn.Module = built.net
    applied: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    if mean is not None:
        applied = _floats(mean), _floats(std if std is not None else (1.0, 1.0, 1.0))
        model = Normalized(model, *applied)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    layer = resolve_target_layer(
        model, spec.target_layer or built.default_layer, relu_features=spec.relu_features
    )
    num_classes = _given(spec.num_classes, built.num_classes)
    if num_classes is None:
        num_classes = _infer_num_classes(model, input_size, device)
    return LoadedModel(
        model=model,
        target_layer=layer.module,
        target_layer_name=layer.name,
        input_size=(input_size, input_size),
        resize_size=resize_size,
        num_classes=int(num_classes),
        reshape_transform=layer.reshape_transform,
        relu_features=layer.relu_features,
        name=spec.source,
        interpolation=_given(spec.interpolation, built.interpolation) or "bilinear",
        resize_mode=_given(spec.resize_mode, built.resize_mode) or "shorter",
        crop_rounding=built.crop_rounding or "round",
        mean=None if applied is None else applied[0],
        std=None if applied is None else applied[1],
    )


def _source(kind: str) -> Callable[[str, ModelSpec, StateLoader], SourceModel]:
    """The source function for ``KIND`` (``ModelSpec`` has checked the spelling).

    The zoo is imported only for its own kinds, so that loading another model never
    loads :mod:`opticam.zoo`'s dependencies.
    """
    if kind in ("timm", "hf"):
        import opticam.zoo as zoo

        return zoo.load_timm if kind == "timm" else zoo.load_hf
    return {"demo": load_demo, "torchvision": load_torchvision, "factory": load_factory}[kind]


def _given(value: _T | None, fallback: _T) -> _T:
    """``value`` unless it is None, else ``fallback``: the spec's setting over the source's."""
    return value if value is not None else fallback


def _floats(values: Sequence[float]) -> tuple[float, ...]:
    """A mean or std (per channel) as plain floats, whatever sequence a factory gave."""
    return tuple(float(v) for v in values)


def _some(names: Sequence[str], shown: int = 3) -> str:
    """``"a, b, c, ... and 117 more"``: the first ``shown`` names and a count of the rest."""
    listed = ", ".join(names[:shown])
    rest = len(names) - shown
    return f"{listed}, ... and {rest} more" if rest > 0 else listed


def _state_mismatch(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str:
    """Why ``state`` does not fit a model whose state_dict is ``expected``, in one short line.

    Counts and the first few names of the missing keys, the unexpected keys and the
    keys with another shape, e.g. ``missing 102 keys (conv1.weight, bn1.weight,
    bn1.bias, ... and 99 more); unexpected 3 keys (...)``; empty when all fit. Whole
    key lists (what ``load_state_dict`` prints) run to thousands of characters for an
    architecture mix-up.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {tuple(state[k].shape)} in the checkpoint, {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    parts = [
        f"{label} {len(names)} key{'s' if len(names) != 1 else ''} ({_some(names, shown)})"
        for label, names, shown in (
            ("missing", missing, 3),
            ("unexpected", unexpected, 3),
            ("other shape for", reshaped, 1),
        )
        if names
    ]
    return "; ".join(parts)


def _load_state(net: nn.Module, spec: ModelSpec, storage_options: Mapping[str, Any] | None) -> None:
    """Load ``spec.checkpoint`` into ``net``; a misfit is a one-line :class:`CheckpointError`."""
    assert spec.checkpoint is not None
    state = load_checkpoint(
        spec.checkpoint, trust=spec.trust_checkpoint, storage_options=storage_options
    )
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        # torch's own message lists every key; it is kept (cut short) only when a
        # module's load hook raised something the key comparison cannot see.
        reason = _state_mismatch(net.state_dict(), state)
        if not reason:
            text = " ".join(str(err).split())
            reason = text if len(text) <= 300 else f"{text[:300]} ..."
        raise CheckpointError(
            f"checkpoint {short_repr(spec.checkpoint)} does not fit {short_repr(spec.source)} "
            f"(a different architecture, or set num_classes?): {reason}"
        ) from err


def _infer_num_classes(model: nn.Module, input_size: int, device: str | torch.device) -> int:
    """The number of logits ``model`` returns for one black ``input_size`` image."""
    # One small forward is cheap and, unlike guessing from the last nn.Linear, also right
    # for conv heads (SqueezeNet) and heads registered before the trunk.
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, input_size, input_size, device=device))
    return int(logits.shape[-1])
