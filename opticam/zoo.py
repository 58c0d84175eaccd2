"""Models from the zoos: ``timm:NAME[:TAG]`` and ``hf:ORG/NAME`` / ``hf:FOLDER``.

Both are sources (:mod:`opticam.sources`): each returns a
:class:`~opticam.sources.SourceModel` with a classifier on normalized inputs and everything
:func:`opticam.models.load_model` needs to wrap it for [0,1] images (METHOD.md section 1):
mean and std (applied inside the model by :class:`~opticam.wrappers.Normalized`), the
number of classes, and the evaluation preprocessing as :class:`~opticam.data.Preprocess`
settings, which the spec's fields override. Neither package is imported
before a zoo source is loaded; a missing one is a :class:`MissingPackageError` that says
which extra to install.

timm (``pip install 'opticam[timm]'``)
    ``timm.create_model(NAME[.TAG])``. Without a checkpoint the pretrained weights come
    through timm's own loading (``pretrained=True``: the Hugging Face Hub, safetensors
    first, ``.bin`` files read with ``torch.load(weights_only=True)``). With a checkpoint
    the model is built with ``pretrained=False`` (``num_classes`` from the spec) and the
    state_dict is loaded like any other (:func:`opticam.models.load_checkpoint`). The
    preprocessing is timm's evaluation transform,
    ``create_transform(**resolve_data_config({}, model=model), is_training=False)``, minus
    the normalization: ``crop_mode="center"`` resizes the shorter side to
    ``floor(input_size / crop_pct)``, ``"squash"`` resizes to that square, both with the
    model's interpolation (mostly bicubic), then the input is centre-cropped.

Hugging Face transformers (``pip install 'opticam[hf]'``)
    ``AutoModelForImageClassification.from_pretrained`` (never ``trust_remote_code``)
    wrapped in :class:`HFClassifier`, which returns the ``.logits``. Weights: the
    ``model.safetensors`` file where there is one; a ``pytorch_model.bin`` is read by
    transformers with ``torch.load(weights_only=True)``, always (read in the sources of
    transformers 4.40.0 and 5.24.0; 5.x also refuses ``.bin`` files with torch < 2.6),
    so a ``.bin`` holding Python objects is a :class:`~opticam.models.CheckpointError`
    and ``trust_checkpoint`` does not apply to it. With a ``checkpoint`` the
    architecture comes from the source's config and the state_dict (keys as in
    ``model.state_dict()`` of the transformers model; read like any other checkpoint,
    so ``trust_checkpoint`` applies) is loaded into it. The
    preprocessing is read from the image processor (``AutoImageProcessor``, its PIL
    backend): ``size={"height", "width"}`` squashes to that size (ViT), ``size=
    {"shortest_edge"}`` with ConvNext's ``crop_pct`` resizes the shorter side to
    ``int(size / crop_pct)`` and centre-crops ``size`` (squashes when ``size >= 384``),
    other ``shortest_edge`` processors resize the shorter side and crop ``crop_size``;
    crops start at ``floor(margin / 2)``. Rescaling and normalization fold into one
    mean/std for [0,1] inputs. The result is checked against the processor itself on two
    synthetic images when the model loads: a processor opticam cannot reproduce is an
    error, never a silent mismatch.

Offline
    Pretrained weights that are neither cached nor downloadable are a
    :class:`~opticam.models.WeightsUnavailableError` that says to pass a checkpoint. Before
    any download the Hub's host is probed once (a TCP connection, :data:`PROBE_TIMEOUT`
    seconds; skipped where a proxy is configured); with ``HF_HUB_OFFLINE=1`` or no answer
    only the local cache is read, so an offline machine fails in moments instead of
    retrying for a minute.

Target layers (:func:`family_layer`)
    timm: ViT-like models (ViT, DeiT, BEiT, EVA, ... : ``blocks`` with ``norm1``) the first
    norm of the last block, ``blocks.{-1}.norm1``, tokens reshaped to the patch grid after
    dropping ``num_prefix_tokens`` (class, distillation and register tokens); Swin the
    first norm of the last block, ``layers.{-1}.blocks.{-1}.norm1``, channels-last maps
    moved to (B,C,h,w); EfficientNet ``bn2`` (the 1x1 head conv's BN + activation, like
    torchvision's ``features[-1]``); every other timm model the output of its last
    feature stage, ``feature_info[-1]`` (ResNet ``layer4``, ConvNeXt ``stages.3``,
    RegNet ``s4``, DenseNet ``features.norm5``, ...). Hugging Face: transformers (ViT,
    DeiT, Swin, ...) the ``layernorm_before`` of their last layer, tokens reshaped
    (prefix tokens counted from the embeddings: class, distillation, registers; Swin has
    none); EfficientNet ``efficientnet.encoder.top_activation``; CNNs with
    ``encoder.stages`` (ResNet, ConvNeXt, RegNet, ...) their last stage. Transformers get
    ``relu_features=False``, every other family ``True``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import math
import os
import pickle
import re
import socket
import urllib.request
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image
from torch import nn

from opticam.config import ModelSpec
from opticam.errors import CheckpointError, MissingPackageError, WeightsUnavailableError, short_repr
from opticam.names import INTERPOLATIONS
from opticam.sources import SourceModel, StateLoader
from opticam.wrappers import HFClassifier

__all__ = [
    "PROBE_TIMEOUT",
    "hub_reachable",
    "load_hf",
    "load_timm",
]

#: Seconds the Hub's host has to accept a TCP connection before it counts as unreachable.
PROBE_TIMEOUT = 3.0

# A Hub model id: NAME or ORG/NAME (letters, digits, '-', '_', '.').
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TRUE = {"1", "ON", "YES", "TRUE"}
# PIL's resampling filters by number (PIL.Image.Resampling, also transformers'
# PILImageResampling) -> opticam's interpolation names.
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# timm's default eval crop_pct when a config has none.
_TIMM_CROP_PCT = 0.875


# --------------------------------------------------------------------------- shared


def _require(package: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(package)
    except ImportError as err:
        message = f"{extra}: models need the {package} package: pip install 'opticam[{extra}]'"
        if getattr(err, "name", None) != package:  # installed, but something it needs is not
            message += f" ({err})"
        raise MissingPackageError(message) from err


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set now or when huggingface_hub loaded."""
    if any(
        os.environ.get(name, "").strip().upper() in _TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether downloads from the Hugging Face Hub may be tried (see the module doc).

    False in offline mode, or when the endpoint's host (``HF_ENDPOINT``, default
    huggingface.co) does not accept a TCP connection within ``timeout`` seconds. True
    without probing where a proxy is configured for its scheme: the proxy decides.
    """
    if _hub_offline():
        return False
    try:
        from huggingface_hub import constants

        endpoint = str(constants.ENDPOINT)
    except ImportError:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parts = urlsplit(endpoint)
    if urllib.request.getproxies().get(parts.scheme):
        return True
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _floats(value: Any, what: str) -> tuple[float, ...]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"expected 3 values of {what}, got {short_repr(value)}")
    return tuple(values)


# --------------------------------------------------------------------------- timm


def load_timm(target: str, spec: ModelSpec, load_state: StateLoader) -> SourceModel:
    """Build ``timm:target`` (``NAME``, ``NAME.TAG`` or ``NAME:TAG``), see the module doc.

    Args:
        target: the source after ``timm:``.
        spec: the model spec (checkpoint, num_classes; input_size and resize_mode only to
            accept a model whose own input or crop mode opticam cannot take).
        load_state: loads ``spec.checkpoint`` into a module (safe loading, mismatch
            messages: :func:`opticam.models.load_model` passes its own).

    Raises:
        MissingPackageError: timm is not installed.
        WeightsUnavailableError: no checkpoint and no pretrained weights to be had.
        ValueError: unknown model or tag, non-square input, a crop mode opticam lacks.
    """
    timm = _require("timm", "timm")
    name, cfg = _timm_name(timm, target)
    if spec.checkpoint is not None:
        kwargs: dict[str, Any] = {}
        if spec.num_classes is not None:
            kwargs["num_classes"] = spec.num_classes
        net = timm.create_model(name, pretrained=False, **kwargs)
        load_state(net)
    else:
        net = _timm_pretrained(timm, name, target, cfg, spec)
    return _timm_source(net, name, spec)


def _timm_name(timm: ModuleType, target: str) -> tuple[str, Any]:
    """The timm name ``NAME[.TAG]`` for ``target`` and its pretrained config (or None).

    Raises:
        ValueError: unknown model (with close names) or unknown tag (with the known ones).
    """
    from timm.models import get_pretrained_cfg

    arch, _, tag = target.replace(":", ".", 1).partition(".")
    name = f"{arch}.{tag}" if tag else arch
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"close: {', '.join(close)}; " if close else ""
        raise ValueError(f"unknown timm model {short_repr(arch)} ({hint}see timm.list_models())")
    try:
        return name, get_pretrained_cfg(name)
    except RuntimeError:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        raise ValueError(
            f"unknown tag {short_repr(tag)} for timm model {short_repr(arch)} (known: {', '.join(tags) or 'none'})"
        ) from None


def _timm_pretrained(
    timm: ModuleType, name: str, target: str, cfg: Any, spec: ModelSpec
) -> nn.Module:
    """The timm model ``name`` with its pretrained weights, from the cache when offline.

    Raises:
        ValueError: ``spec.num_classes`` contradicts the weights, or they have no head.
        WeightsUnavailableError: no weights, or not cached and not downloadable.
    """
    cfg_classes = getattr(cfg, "num_classes", None)
    if spec.num_classes is not None and cfg_classes and spec.num_classes != cfg_classes:
        raise ValueError(
            f"num_classes={spec.num_classes} contradicts timm:{name}, whose weights have "
            f"{cfg_classes} classes (a checkpoint of yours goes with --checkpoint)"
        )
    how = (
        f"Either download them once where a network exists (they are cached in "
        f"$HF_HOME), or pass the state_dict yourself: --checkpoint <local path or "
        f"s3://... URL> (ModelSpec(source='timm:{target}', checkpoint=...))"
    )
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsUnavailableError(
            f"timm has no pretrained weights for {short_repr(name)}; pass --checkpoint <state_dict "
            "at any fsspec URL> to load your own"
        )
    kwargs: dict[str, Any] = {}
    if not hub_reachable():
        cached = _timm_cached_weights(cfg)
        if cached is None:
            raise WeightsUnavailableError(
                f"timm weights for {short_repr(name)} are not cached and the Hugging Face Hub "
                f"cannot be reached (offline, or HF_HUB_OFFLINE=1). {how}"
            )
        kwargs["pretrained_cfg_overlay"] = {"file": cached}
    try:
        net: nn.Module = timm.create_model(name, pretrained=True, **kwargs)
    except OSError as err:  # urllib's URLError and huggingface_hub's errors included
        raise WeightsUnavailableError(
            f"could not obtain timm weights for {short_repr(name)}: {err}. {how}"
        ) from err
    if not getattr(net, "num_classes", 1):
        raise ValueError(f"timm:{name} has no classifier head (num_classes=0)")
    return net


def _timm_source(net: nn.Module, name: str, spec: ModelSpec) -> SourceModel:
    """What timm's evaluation data config says about feeding ``net`` (see the module doc).

    Raises:
        ValueError: a non-square input without ``spec.input_size``, or a crop mode
            opticam cannot reproduce without ``spec.resize_mode``.
    """
    from timm.data import resolve_data_config

    data = resolve_data_config({}, model=net)
    _, height, width = (int(v) for v in data["input_size"])
    if height != width and spec.input_size is None:
        raise ValueError(
            f"timm:{name} takes {height}x{width} inputs; opticam needs a square input: "
            "pass --input-size"
        )
    crop_pct = float(data.get("crop_pct") or _TIMM_CROP_PCT)
    crop_mode = data.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash") and spec.resize_mode is None:
        raise ValueError(
            f"timm:{name} uses crop_mode={short_repr(crop_mode)}, which opticam cannot reproduce; "
            "choose one with --resize-mode (and --resize-size)"
        )
    interpolation = str(data.get("interpolation") or "bilinear")
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic" if interpolation == "random" else "bilinear"
    return SourceModel(
        net=net,
        mean=_floats(data["mean"], "mean"),
        std=_floats(data["std"], "std"),
        num_classes=int(getattr(net, "num_classes", 0) or 0) or None,
        input_size=height,
        resize_size=math.floor(height / crop_pct),
        crop_fraction=crop_pct,
        interpolation=interpolation,
        resize_mode="squash" if crop_mode == "squash" else "shorter",
        crop_rounding="round",
    )


def _timm_cached_weights(cfg: Any) -> str | None:
    """A local file holding ``cfg``'s pretrained weights, without touching the network."""
    if cfg.file and os.path.isfile(cfg.file):
        return str(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = str(cfg.hf_hub_id).partition("@")
        filename = cfg.hf_hub_filename or "pytorch_model.bin"
        names = [filename]
        if filename.endswith(".bin"):  # timm's loader prefers the safetensors twin
            names.insert(
                0, filename[: -len(".bin")].replace("pytorch_model", "model") + ".safetensors"
            )
        for candidate in names:
            found = try_to_load_from_cache(repo, candidate, revision=revision or None)
            if isinstance(found, str):
                return found
    if cfg.url:
        path = os.path.join(
            torch.hub.get_dir(), "checkpoints", os.path.basename(urlsplit(cfg.url).path)
        )
        if os.path.isfile(path):
            return path
    return None


# --------------------------------------------------------------------------- Hugging Face


def load_hf(target: str, spec: ModelSpec, load_state: StateLoader) -> SourceModel:
    """Build ``hf:target`` (a Hub model id or a local folder), see the module doc.

    Args:
        target: the source after ``hf:``.
        spec: the model spec (checkpoint, trust_checkpoint, num_classes).
        load_state: loads ``spec.checkpoint`` into a module (see :func:`load_timm`).

    Raises:
        MissingPackageError: transformers is not installed.
        WeightsUnavailableError: a Hub model that is not cached and cannot be downloaded.
        ValueError: no such folder or Hub model, not an image classifier, or an image
            processor whose preprocessing opticam cannot reproduce.
    """
    transformers = _require("transformers", "hf")
    folder = os.path.expanduser(target)
    local = os.path.isdir(folder)
    if not local and not _HUB_ID_RE.match(target):
        raise ValueError(
            f"hf:{target}: no such folder, and not a Hugging Face Hub model id (ORG/NAME)"
        )
    location = folder if local else target
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if not local and not hub_reachable():
        kwargs["local_files_only"] = True
    with _quiet_progress(transformers):
        return _build_hf(transformers, target, folder, local, location, kwargs, spec, load_state)


@contextlib.contextmanager
def _quiet_progress(transformers: ModuleType) -> Iterator[None]:
    """Turn transformers' per-file progress bars off while loading (opticam shows its own)."""
    logging: Any = getattr(getattr(transformers, "utils", None), "logging", None)
    enabled = bool(getattr(logging, "is_progress_bar_enabled", lambda: False)())
    if enabled:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _build_hf(
    transformers: ModuleType,
    target: str,
    folder: str,
    local: bool,
    location: str,
    kwargs: dict[str, Any],
    spec: ModelSpec,
    load_state: StateLoader,
) -> SourceModel:
    """Load the config, image processor and model of ``hf:target``; what :func:`load_hf` returns.

    Errors of transformers and of reading weights become opticam's (see :func:`load_hf`).
    """
    try:
        config = transformers.AutoConfig.from_pretrained(location, **kwargs)
        processor = _image_processor(transformers, location, kwargs)
        if spec.checkpoint is None:
            if spec.num_classes is not None and spec.num_classes != config.num_labels:
                raise ValueError(
                    f"num_classes={spec.num_classes} contradicts hf:{target}, which has "
                    f"{config.num_labels} labels (a checkpoint of yours goes with --checkpoint)"
                )
            model = transformers.AutoModelForImageClassification.from_pretrained(
                location, config=config, **kwargs
            )
        else:
            if spec.num_classes is not None and spec.num_classes != config.num_labels:
                config.num_labels = spec.num_classes
            model = transformers.AutoModelForImageClassification.from_config(config)
            load_state(model)
    except OSError as err:  # transformers' "not found", "offline", "no weights file" ...
        text = " ".join(str(err).split())
        if local:
            raise ValueError(
                f"hf:{target}: cannot load the folder {short_repr(folder)}: {text}"
            ) from err
        if kwargs.get("local_files_only"):
            raise WeightsUnavailableError(
                f"hf:{target} is no local folder, not in the Hugging Face cache, and the Hub "
                "cannot be reached (offline, or HF_HUB_OFFLINE=1). Download it once where a "
                "network exists, or "
                f"save it with save_pretrained (model and image processor) into a folder and "
                f"pass hf:<folder>. ({text})"
            ) from err
        if "not a valid model identifier" in text or "404" in text:
            raise ValueError(
                f"hf:{target}: no such folder, and no such model on the Hugging Face Hub ({text})"
            ) from err
        raise WeightsUnavailableError(f"could not obtain hf:{target}: {text}") from err
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"hf:{target}: its pytorch_model.bin holds Python objects that safe loading "
            "(torch.load(weights_only=True)) refuses; transformers reads .bin files no other "
            "way (trust_checkpoint does not change that), so convert the weights to "
            "model.safetensors, or pass a plain state_dict with --checkpoint"
        ) from err
    except KeyError as err:  # an unknown model_type in an old transformers
        raise ValueError(f"hf:{target}: transformers does not know this model ({err})") from err
    model = model.float().eval()
    num_classes = int(getattr(model.config, "num_labels", 0) or 0)
    settings = _hf_preprocessing(processor, target)
    _check_against_processor(processor, settings, target)
    return SourceModel(net=HFClassifier(model), num_classes=num_classes or None, **settings)


def _image_processor(transformers: ModuleType, location: str, kwargs: dict[str, Any]) -> Any:
    """The model's image processor, PIL backend (the reference implementation)."""
    major = int(str(transformers.__version__).split(".")[0])
    backend = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    try:
        return transformers.AutoImageProcessor.from_pretrained(location, **kwargs, **backend)
    except OSError as err:
        if "preprocessor_config.json" in str(err) or "image processor" in str(err).lower():
            raise ValueError(
                f"hf:{location} has no image processor (preprocessor_config.json): save it "
                "next to the model with AutoImageProcessor...save_pretrained(folder)"
            ) from err
        raise


def _size_dict(value: Any) -> dict[str, int]:
    """An image processor's ``size`` / ``crop_size`` (dict, SizeDict or int) as a dict."""
    if value is None:
        return {}
    if isinstance(value, int):
        return {"height": value, "width": value}
    if isinstance(value, Mapping):
        items = dict(value)
    else:
        keys = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")
        items = {k: getattr(value, k, None) for k in keys}
    return {k: int(v) for k, v in items.items() if v is not None}


def _hf_preprocessing(processor: Any, target: str) -> dict[str, Any]:
    """SourceModel fields (all but net and num_classes) from an image processor.

    Raises:
        ValueError: a processor that does not resize, resamples with a filter opticam
            lacks, or makes inputs opticam cannot (see :func:`_hf_geometry`).
    """
    kind = type(processor).__name__
    if not getattr(processor, "do_resize", True):
        raise _cannot_reproduce(target, kind, "does not resize")
    resample = getattr(processor, "resample", None)
    interpolation = _PIL_FILTERS.get(int(resample), "") if resample is not None else "bilinear"
    if interpolation not in INTERPOLATIONS:
        raise _cannot_reproduce(target, kind, f"resamples with {short_repr(resample)}")
    mode, resize, side = _hf_geometry(processor, target)
    mean, std = _hf_normalization(processor)
    return {
        "mean": mean,
        "std": std,
        "input_size": side,
        "resize_size": resize,
        "interpolation": interpolation,
        "resize_mode": mode,
        "crop_rounding": "floor",
        "crop_fraction": side / resize,
    }


def _cannot_reproduce(target: str, kind: str, why: str) -> ValueError:
    """The error for an image processor (class name ``kind``) opticam cannot reproduce."""
    return ValueError(
        f"hf:{target}: the image processor {kind} {why}, which opticam cannot reproduce"
    )


def _hf_geometry(processor: Any, target: str) -> tuple[str, int, int]:
    """Resize mode, resize side and input side of an image processor (see the module doc).

    Raises:
        ValueError: another ``size`` than height/width or shortest_edge, a ConvNext
            processor that crops twice, no fixed input size, or non-square inputs.
    """
    kind = type(processor).__name__
    size = _size_dict(getattr(processor, "size", None))
    crop = (
        _size_dict(getattr(processor, "crop_size", None))
        if getattr(processor, "do_center_crop", False)
        else {}
    )
    out: tuple[int, int] | None = None
    if set(size) == {"height", "width"}:
        mode, resize, out = (
            "squash",
            (size["height"], size["width"]),
            (size["height"], size["width"]),
        )
    elif set(size) == {"shortest_edge"}:
        mode, resize, out = _hf_shortest_edge(processor, size["shortest_edge"])
        if out is not None and crop:
            raise _cannot_reproduce(target, kind, "crops twice (crop_pct and do_center_crop)")
    else:
        raise _cannot_reproduce(target, kind, f"resizes to {size}")
    if crop:
        out = (crop["height"], crop["width"])
    if out is None:
        raise _cannot_reproduce(
            target, kind, "keeps the aspect ratio without a crop (no fixed input size)"
        )
    if out[0] != out[1] or resize[0] != resize[1]:
        raise _cannot_reproduce(
            target, kind, f"makes non-square inputs (resize {resize}, input {out})"
        )
    return mode, resize[0], out[0]


def _hf_shortest_edge(
    processor: Any, edge: int
) -> tuple[str, tuple[int, int], tuple[int, int] | None]:
    """Mode, resize and input (None: the crop decides) of a ``shortest_edge`` processor.

    ConvNext's processors crop by ``crop_pct`` themselves below an edge of 384 (the
    shorter side to ``int(edge / crop_pct)``, then a centre crop of ``edge``) and warp to
    ``edge`` x ``edge`` from 384 on. Others resize the shorter side to ``edge``; their
    input size is their ``crop_size``.
    """
    if not type(processor).__name__.startswith("ConvNext"):
        return "shorter", (edge, edge), None
    crop_pct = float(getattr(processor, "crop_pct", None) or 224 / 256)
    if edge < 384:  # shorter side to edge / crop_pct, then centre crop
        return "shorter", (int(edge / crop_pct),) * 2, (edge, edge)
    return "squash", (edge, edge), (edge, edge)  # warped to edge x edge, no crop


def _hf_normalization(processor: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The processor's rescaling and normalization as one mean and std for [0,1] images."""
    rescale = float(getattr(processor, "rescale_factor", 1 / 255))
    scale = 255.0 * rescale if getattr(processor, "do_rescale", True) else 255.0
    if getattr(processor, "do_normalize", True):
        mean = _floats(processor.image_mean, "image_mean")
        std = _floats(processor.image_std, "image_std")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    # processor: (255 x * rescale - mean) / std = (x - mean / scale) / (std / scale)
    return tuple(m / scale for m in mean), tuple(s / scale for s in std)


def _check_against_processor(processor: Any, settings: Mapping[str, Any], target: str) -> None:
    """Raise ValueError unless Preprocess + normalization equals the processor's output.

    Two synthetic images (a wide and a tall one, odd sizes so that crop margins are odd)
    go through both; the largest difference, measured in [0,1] pixels, must stay below
    1e-4 (float rounding: the processor rescales in float64, opticam divides in float32).
    """
    from opticam.data import Preprocess

    preprocess = Preprocess(
        settings["input_size"],
        settings["resize_size"],
        interpolation=settings["interpolation"],
        resize_mode=settings["resize_mode"],
        crop_rounding=settings["crop_rounding"],
    )
    rng = np.random.default_rng(0)
    side = int(settings["input_size"])
    worst = 0.0
    std = torch.tensor(settings["std"]).view(3, 1, 1)
    mean = torch.tensor(settings["mean"]).view(3, 1, 1)
    for width, height in ((side * 3 // 2 + 7, side + 3), (side + 5, side * 4 // 3 + 3)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours, _ = preprocess(image)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0].float()
        if theirs.shape != ours.shape:
            raise ValueError(
                f"hf:{target}: the image processor {type(processor).__name__} makes "
                f"{tuple(theirs.shape)} inputs, opticam's reading of it {tuple(ours.shape)}"
            )
        worst = max(worst, float((theirs * std + mean - ours).abs().max()))
    if worst > 1e-4:
        raise ValueError(
            f"hf:{target}: opticam cannot reproduce the preprocessing of "
            f"{type(processor).__name__} (pixels differ by up to {worst:.4f})"
        )
