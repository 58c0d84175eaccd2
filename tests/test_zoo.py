"""Models from timm and Hugging Face transformers (opticam.zoo, through opticam.models).

Everything is offline: timm models are built with random weights (``pretrained=False``
touches no network) and Hugging Face models are tiny configs saved with
``save_pretrained`` (model and image processor) into a temporary folder.

- preprocessing equals the zoo's own evaluation transform, pixel for pixel in [0,1]:
  timm's exactly (``torch.equal``: the same torchvision resize and crop, normalization
  omitted by giving the transform mean 0 and std 1); Hugging Face's PIL backend within
  1e-6 after undoing its normalization (it rescales in float64, normalizes in float32);
- default target layers, their feature maps (B,C,h,w) on the expected grid, and Opti-CAM
  running on them, for the common families of both zoos;
- errors: a wrong layer lists useful candidates, a missing package says which extra to
  install, pretrained weights offline fail fast and say to pass --checkpoint, unsafe
  ``.bin`` files are refused;
- ``opticam run`` end to end with ``timm:resnet18 --checkpoint`` and ``hf:<folder>``.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from spec_settings import LATER
from torch import Tensor, nn

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from timm.data import create_transform, resolve_data_config  # noqa: E402

from opticam import store, zoo  # noqa: E402
from opticam.config import ModelSpec, RunConfig  # noqa: E402
from opticam.data import Preprocess  # noqa: E402
from opticam.demo import make_shards  # noqa: E402
from opticam.errors import (  # noqa: E402
    CheckpointError,
    MissingPackageError,
    WeightsUnavailableError,
)
from opticam.layers import ResolvedLayer, find_layer, resolve_target_layer  # noqa: E402
from opticam.methods import get_explainer  # noqa: E402
from opticam.models import load_model  # noqa: E402
from opticam.sources import SourceModel  # noqa: E402
from opticam.wrappers import Normalized  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
#: Odd sizes: wide, tall, small (upsampled), and long sides whose crop margins are odd.
IMAGE_SIZES = [(301, 227), (131, 517), (47, 39), (643, 483), (120, 75)]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def preprocess_of(built: SourceModel) -> Preprocess:
    return Preprocess(
        built.input_size,
        built.resize_size,
        interpolation=built.interpolation,
        resize_mode=built.resize_mode,
        crop_rounding=built.crop_rounding,
    )


def no_checkpoint(name: str) -> ModelSpec:
    # A checkpoint makes load_timm build with pretrained=False; the no-op loader below
    # stands for reading it, so no weights file is needed to test the preprocessing.
    return ModelSpec(source=f"timm:{name}", checkpoint="unused.pt")


def keep_random_weights(module: nn.Module) -> None:
    del module


# --------------------------------------------------------------------------- timm preprocessing


@pytest.mark.parametrize(
    ("name", "interpolation", "resize_mode", "resize_size"),
    [
        # resnet-style: bicubic, input 176, crop_pct 0.875 -> shorter side floor(176 / 0.875)
        ("resnet10t.c3_in1k", "bicubic", "shorter", 201),
        # ViT: bicubic, crop_pct 0.9 -> floor(224 / 0.9) = 248, mean/std 0.5
        ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "bicubic", "shorter", 248),
        # crop_mode squash, crop_pct 1.0: the whole image squashed to 384 x 384
        ("convnextv2_nano.fcmae_ft_in22k_in1k_384", "bicubic", "squash", 384),
    ],
)
def test_timm_preprocessing_equals_timm_eval_transform(
    name: str, interpolation: str, resize_mode: str, resize_size: int
) -> None:
    built = zoo.load_timm(name, no_checkpoint(name), keep_random_weights)
    assert (built.interpolation, built.resize_mode, built.resize_size) == (
        interpolation,
        resize_mode,
        resize_size,
    )
    config = resolve_data_config({}, model=built.net)
    assert built.mean == pytest.approx(config["mean"]) and built.std == pytest.approx(config["std"])
    # timm's own eval transform, its normalization made the identity.
    reference = create_transform(
        **{**config, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}, is_training=False
    )
    ours = preprocess_of(built)
    for i, (width, height) in enumerate(IMAGE_SIZES):
        image = random_image(width, height, seed=i)
        pixels, _ = ours(image)
        assert torch.equal(pixels, reference(image)), (name, width, height)


def test_timm_spec_overrides_and_tags() -> None:
    # NAME:TAG and NAME.TAG are the same model; the tag picks the preprocessing.
    a = zoo.load_timm("resnet18:tv_in1k", no_checkpoint("resnet18:tv_in1k"), keep_random_weights)
    b = zoo.load_timm("resnet18.tv_in1k", no_checkpoint("resnet18.tv_in1k"), keep_random_weights)
    assert (a.interpolation, a.resize_size) == (b.interpolation, b.resize_size) == ("bilinear", 256)
    # Another input size keeps timm's proportion: floor(160 / 0.875) = 182.
    assert a.resize_for(160) == 182 and a.resize_for(224) == 256
    with pytest.raises(ValueError, match=r"unknown tag 'nope' for timm model 'resnet18' \(known: "):
        zoo.load_timm("resnet18:nope", no_checkpoint("resnet18:nope"), keep_random_weights)
    with pytest.raises(ValueError, match="unknown timm model 'resnt18' .*resnet18"):
        zoo.load_timm("resnt18", no_checkpoint("resnt18"), keep_random_weights)


def test_timm_checkpoint_through_load_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), path)
    spec = ModelSpec(source="timm:resnet18", checkpoint=str(path), num_classes=7, input_size=64)
    loaded = load_model(spec)
    assert loaded.num_classes == 7 and loaded.target_layer_name == "layer4"
    # resnet18's default tag a1_in1k: bicubic, crop_pct 0.95 -> floor(64 / 0.95) = 67.
    assert loaded.preprocess() == Preprocess(64, 67, interpolation="bicubic")
    x = torch.rand(2, 3, 64, 64)
    assert isinstance(loaded.model, Normalized)
    expected = net((x - loaded.model.mean) / loaded.model.std)
    assert torch.allclose(loaded.model(x), expected, atol=1e-5)
    # The user's settings override timm's.
    given = spec.model_copy(update={"interpolation": "bilinear", "resize_size": 80})
    assert load_model(given).preprocess() == Preprocess(64, 80, interpolation="bilinear")
    # A checkpoint of another architecture: the usual short mismatch message.
    with pytest.raises(CheckpointError, match="does not fit 'timm:resnet34'.*missing"):
        load_model(ModelSpec(source="timm:resnet34", checkpoint=str(path), num_classes=7))


def record(built: SourceModel) -> dict[str, object]:
    """Every field of a source's record but the net."""
    fields = dict(vars(built))
    del fields["net"]
    return fields


def test_timm_source_knows_its_net() -> None:
    name = "resnet18.tv_in1k"
    built = zoo.load_timm(name, no_checkpoint(name), keep_random_weights)
    expected = {
        "mean": pytest.approx((0.485, 0.456, 0.406)),
        "std": pytest.approx((0.229, 0.224, 0.225)),
        "num_classes": 1000,
        "input_size": 224,
        "resize_size": 256,
        "crop_fraction": 0.875,
        "default_layer": None,  # opticam.layers knows timm's families
        "interpolation": "bilinear",
        "resize_mode": "shorter",
        "crop_rounding": "round",
    }
    assert record(built) == expected
    # The checkpoint's num_classes builds the head; the later settings stay out.
    spec = ModelSpec(source=f"timm:{name}", checkpoint="unused.pt", num_classes=7, **LATER)
    built = zoo.load_timm(name, spec, keep_random_weights)
    assert record(built) == {**expected, "num_classes": 7}


# --------------------------------------------------------------------------- timm layers


def features(layer: ResolvedLayer, model: nn.Module, x: Tensor) -> Tensor:
    """The target layer's output for ``x``, read as (B,C,h,w) feature maps."""
    seen: list[Any] = []
    handle = layer.module.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return layer.reshape_transform(seen[0]) if layer.reshape_transform else seen[0]


def check_opticam(model: nn.Module, x: Tensor) -> None:
    maps = get_explainer("opticam", model, iterations=2)(x, [0, 1]).maps
    assert maps.shape == (x.shape[0], 1, *x.shape[2:])
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


SWIN_TINY = {"depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "embed_dim": 16, "window_size": 2}


@pytest.mark.parametrize(
    ("name", "kwargs", "side", "layer", "shape", "transformer"),
    [
        ("resnet18", {}, 96, "layer4", (512, 3, 3), False),
        ("efficientnet_b0", {}, 96, "bn2", (1280, 3, 3), False),
        ("convnext_atto", {}, 96, "stages.3", (320, 3, 3), False),
        ("regnetx_002", {}, 96, "s4", (368, 3, 3), False),
        (
            "vit_tiny_patch16_224",
            {"img_size": 64, "depth": 2},
            64,
            "blocks.1.norm1",
            (192, 4, 4),
            True,
        ),
        # Class and distillation tokens: 2 + 16 tokens.
        (
            "deit_tiny_distilled_patch16_224",
            {"img_size": 64, "depth": 2},
            64,
            "blocks.1.norm1",
            (192, 4, 4),
            True,
        ),
        # Class + 4 register tokens, 14-pixel patches: 5 + 9 tokens.
        (
            "vit_small_patch14_reg4_dinov2",
            {"img_size": 42, "depth": 1, "num_classes": 5},
            42,
            "blocks.0.norm1",
            (384, 3, 3),
            True,
        ),
        # Channels-last (B, H, W, C) maps; 64 / 4 / 2^3 = 2.
        (
            "swin_tiny_patch4_window7_224",
            {"img_size": 64, **SWIN_TINY},
            64,
            "layers.3.blocks.0.norm1",
            (128, 2, 2),
            True,
        ),
    ],
)
def test_timm_default_layers(
    name: str,
    kwargs: dict[str, Any],
    side: int,
    layer: str,
    shape: tuple[int, int, int],
    transformer: bool,
) -> None:
    torch.manual_seed(0)
    model = Normalized(timm.create_model(name, pretrained=False, **kwargs), (0.5,) * 3, (0.5,) * 3)
    model.eval()
    resolved = resolve_target_layer(model)
    assert resolved.name == layer
    assert resolved.relu_features is not transformer
    x = torch.rand(2, 3, side, side)
    maps = features(resolved, model, x)
    assert maps.shape == (2, *shape)
    check_opticam(model, x)


def test_timm_vit_tokens_land_on_their_patch() -> None:
    # A non-square grid (2 x 4): token 1 + 2 prefix + (row * 4 + col) is patch (row, col).
    net = timm.create_model("deit_tiny_distilled_patch16_224", img_size=(32, 64), depth=1)
    resolved = resolve_target_layer(net.eval())
    assert resolved.reshape_transform is not None
    tokens = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    maps = resolved.reshape_transform(tokens)
    assert maps.shape == (2, 3, 2, 4)
    assert torch.equal(maps[1, :, 1, 2], tokens[1, 2 + 1 * 4 + 2])
    assert features(resolved, net, torch.rand(2, 3, 32, 64)).shape == (2, 192, 2, 4)
    with pytest.raises(ValueError, match=r"cannot reshape 9 tokens \(2 prefix tokens dropped\)"):
        resolved.reshape_transform(torch.zeros(1, 9, 3))


def test_wrong_layer_lists_deep_candidates() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)
    with pytest.raises(ValueError, match="unknown target layer 'blocks.9.norm1'") as err:
        find_layer(vit, "blocks.9.norm1")
    assert "blocks.1.norm1" in str(err.value) and "blocks.1.attn" in str(err.value)
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, **SWIN_TINY)
    with pytest.raises(ValueError, match="layers.3.blocks.0.norm1"):
        find_layer(swin, "layers.3.blocks.5.norm1")


# --------------------------------------------------------------------------- Hugging Face


def _tiny_vit() -> tuple[Any, Any]:
    config = transformers.ViTConfig(
        image_size=64, patch_size=16, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=5,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config)
    return model, transformers.ViTImageProcessor(size={"height": 64, "width": 64})


def _tiny_deit() -> tuple[Any, Any]:
    config = transformers.DeiTConfig(
        image_size=64, patch_size=16, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=5,
    )  # fmt: skip
    model = transformers.DeiTForImageClassificationWithTeacher(config)
    # Squash to 75 x 75, crop 64: an 11-pixel margin, where floor (5) and round (6) differ.
    processor = transformers.DeiTImageProcessor(
        size={"height": 75, "width": 75}, crop_size={"height": 64, "width": 64}
    )
    return model, processor


def _tiny_swin() -> tuple[Any, Any]:
    config = transformers.SwinConfig(
        image_size=64, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
        window_size=4, num_labels=5,
    )  # fmt: skip
    model = transformers.SwinForImageClassification(config)
    return model, transformers.ViTImageProcessor(size={"height": 64, "width": 64})


def _convnext_processor() -> Any:
    # ConvNext's rule: shorter side int(64 / 0.875) = 73, centre crop 64 (bicubic).
    return transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)


def _tiny_convnext() -> tuple[Any, Any]:
    config = transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5
    )
    return transformers.ConvNextForImageClassification(config), _convnext_processor()


def _tiny_resnet() -> tuple[Any, Any]:
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
    )
    return transformers.ResNetForImageClassification(config), _convnext_processor()


def _tiny_regnet() -> tuple[Any, Any]:
    config = transformers.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=5
    )
    return transformers.RegNetForImageClassification(config), _convnext_processor()


HF_MODELS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "vit": _tiny_vit,
    "deit": _tiny_deit,
    "swin": _tiny_swin,
    "convnext": _tiny_convnext,
    "resnet": _tiny_resnet,
    "regnet": _tiny_regnet,
}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each tiny model saved with its image processor, as ``save_pretrained`` does."""
    root = tmp_path_factory.mktemp("hf")
    folders = {}
    torch.manual_seed(0)
    for name, make in HF_MODELS.items():
        model, processor = make()
        folder = root / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def pil_processor(folder: str) -> Any:
    """The folder's image processor with the PIL backend (the reference implementation)."""
    major = int(transformers.__version__.split(".")[0])
    backend = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    return transformers.AutoImageProcessor.from_pretrained(folder, **backend)


@pytest.mark.parametrize(
    ("name", "interpolation", "resize_mode", "resize_size"),
    [
        ("vit", "bilinear", "squash", 64),  # ViT: straight to height x width, no crop
        ("deit", "bicubic", "squash", 75),  # squash, then crop_size
        ("convnext", "bicubic", "shorter", 73),  # crop_pct: shorter side, centre crop
    ],
)
def test_hf_preprocessing_equals_the_image_processor(
    hf_folders: dict[str, str], name: str, interpolation: str, resize_mode: str, resize_size: int
) -> None:
    loaded = load_model(ModelSpec(source=f"hf:{hf_folders[name]}"))
    assert (loaded.interpolation, loaded.resize_mode, loaded.resize_size) == (
        interpolation,
        resize_mode,
        resize_size,
    )
    assert loaded.crop_rounding == "floor" and loaded.input_size == (64, 64)
    processor = pil_processor(hf_folders[name])
    assert isinstance(loaded.model, Normalized)
    mean, std = loaded.model.mean[0], loaded.model.std[0]
    assert mean.flatten().tolist() == pytest.approx(processor.image_mean)
    assert std.flatten().tolist() == pytest.approx(processor.image_std)
    preprocess = loaded.preprocess()
    for i, (width, height) in enumerate(IMAGE_SIZES):
        image = random_image(width, height, seed=i)
        pixels, _ = preprocess(image)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(theirs * std + mean, pixels, rtol=0, atol=1e-6)


def test_hf_source_knows_its_net(hf_folders: dict[str, str]) -> None:
    folder = hf_folders["convnext"]

    def no_checkpoint_here(module: nn.Module) -> None:
        raise AssertionError("no checkpoint in this spec")

    processor = pil_processor(folder)  # its mean and std, for [0,1] images (rescale 1/255)
    expected = {
        "mean": pytest.approx(tuple(processor.image_mean)),
        "std": pytest.approx(tuple(processor.image_std)),
        "num_classes": 5,
        "input_size": 64,
        "resize_size": 73,  # int(64 / 0.875)
        "crop_fraction": 64 / 73,
        "default_layer": None,
        "interpolation": "bicubic",
        "resize_mode": "shorter",
        "crop_rounding": "floor",
    }
    for spec in (ModelSpec(source=f"hf:{folder}"), ModelSpec(source=f"hf:{folder}", **LATER)):
        built = zoo.load_hf(folder, spec, no_checkpoint_here)
        assert record(built) == expected


def test_hf_default_backend_is_close(hf_folders: dict[str, str]) -> None:
    # transformers 5 defaults to a torchvision backend that resizes tensors, not PIL
    # images: within 3/255 of the PIL backend (measured: 1/255 to 2/255 at most).
    processor = transformers.AutoImageProcessor.from_pretrained(hf_folders["vit"])
    preprocess = load_model(ModelSpec(source=f"hf:{hf_folders['vit']}")).preprocess()
    for i, (width, height) in enumerate(IMAGE_SIZES[:3]):
        image = random_image(width, height, seed=i)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0] * 0.5 + 0.5
        assert (theirs - preprocess(image)[0]).abs().max() <= 3 / 255 + 1e-6


def _last_hf_layer(model: nn.Module, name: str) -> nn.Module:
    """The module the literature's rule picks, found from the model's own attributes."""
    base: Any = model.base_model
    if name in ("vit", "deit"):
        layers = getattr(base, "layers", None) or base.encoder.layer  # transformers 5 / 4
        return layers[-1].layernorm_before  # type: ignore[no-any-return]
    if name == "swin":
        return base.encoder.layers[-1].blocks[-1].layernorm_before  # type: ignore[no-any-return]
    return base.encoder.stages[-1]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("name", "shape", "transformer"),
    [
        ("vit", (16, 4, 4), True),  # 1 + 16 tokens
        ("deit", (16, 4, 4), True),  # 2 + 16 tokens: class and distillation
        ("swin", (16, 8, 8), True),  # 64 tokens, no class token; 64 / 4 / 2
        ("convnext", (16, 8, 8), False),  # stride 4, then 2
        ("resnet", (16, 8, 8), False),  # stride 4 (conv + max-pool), then 1, 2
        ("regnet", (16, 8, 8), False),  # stride 2, then 2, 2
    ],
)
def test_hf_default_layers(
    hf_folders: dict[str, str], name: str, shape: tuple[int, int, int], transformer: bool
) -> None:
    loaded = load_model(ModelSpec(source=f"hf:{hf_folders[name]}"))
    hf_model = loaded.model.model.model  # Normalized -> HFClassifier -> transformers model
    assert loaded.target_layer is _last_hf_layer(hf_model, name)
    assert find_layer(loaded.model, loaded.target_layer_name)[0] is loaded.target_layer
    assert loaded.relu_features is not transformer
    assert (loaded.reshape_transform is not None) is transformer
    x = torch.rand(2, 3, 64, 64)
    layer = ResolvedLayer(
        loaded.target_layer, loaded.target_layer_name, loaded.reshape_transform, True
    )
    assert features(layer, loaded.model, x).shape == (2, *shape)
    check_opticam(loaded.model, x)
    # Opti-CAM through the LoadedModel (its layer, reshape and relu) too.
    maps = get_explainer("opticam", loaded, iterations=2)(x, [0, 1]).maps
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all()


def test_hf_wrong_layer_lists_candidates(hf_folders: dict[str, str]) -> None:
    loaded = load_model(ModelSpec(source=f"hf:{hf_folders['resnet']}"))
    with pytest.raises(ValueError, match="unknown target layer 'resnet.encoder.stages.3'") as err:
        find_layer(loaded.model, "resnet.encoder.stages.3")
    assert "resnet.encoder.stages.1" in str(err.value)
    # Names relative to either wrapper are accepted.
    module, name = find_layer(loaded.model, "model.model.resnet.encoder.stages.1")
    assert name == "resnet.encoder.stages.1" and module is loaded.target_layer


def test_hf_checkpoint_and_bin_files(hf_folders: dict[str, str], tmp_path: Path) -> None:
    reference = load_model(ModelSpec(source=f"hf:{hf_folders['resnet']}"))
    hf_model = reference.model.model.model
    x = torch.rand(2, 3, 64, 64)
    # A state_dict (the transformers model's keys) loaded into the folder's architecture.
    path = tmp_path / "resnet.pt"
    torch.save(hf_model.state_dict(), path)
    loaded = load_model(ModelSpec(source=f"hf:{hf_folders['resnet']}", checkpoint=str(path)))
    assert torch.allclose(loaded.model(x), reference.model(x), atol=1e-6)
    # A folder with a pytorch_model.bin only: read with torch.load(weights_only=True).
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_bytes((Path(hf_folders["resnet"]) / name).read_bytes())
    torch.save(hf_model.state_dict(), folder / "pytorch_model.bin")
    from_bin = load_model(ModelSpec(source=f"hf:{folder}"))
    assert torch.allclose(from_bin.model(x), reference.model(x), atol=1e-6)
    # ...so one holding Python objects is refused, trusted or not: no code runs.
    torch.save({**hf_model.state_dict(), "extra": _Marker()}, folder / "pytorch_model.bin")
    for trust in (False, True):
        with pytest.raises(CheckpointError, match="weights_only=True"):
            load_model(ModelSpec(source=f"hf:{folder}", trust_checkpoint=trust))
    assert not _Marker.ran


class _Marker:
    """Unpickling it would run code: sets ``ran``."""

    ran = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Marker._run, ())

    @staticmethod
    def _run() -> None:
        _Marker.ran = True


def test_hf_preprocessing_is_checked_against_the_processor(
    hf_folders: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A misread processor (here: torchvision's crop rounding) is an error when the model
    # loads, never a silent mismatch: the 11-pixel margin puts the crop one pixel off.
    read = zoo._hf_preprocessing
    monkeypatch.setattr(
        zoo, "_hf_preprocessing", lambda *args: {**read(*args), "crop_rounding": "round"}
    )
    with pytest.raises(ValueError, match=r"cannot reproduce the preprocessing of DeiTImage"):
        load_model(ModelSpec(source=f"hf:{hf_folders['deit']}"))


def test_hf_processor_opticam_cannot_reproduce_is_an_error(tmp_path: Path) -> None:
    model, _ = _tiny_resnet()
    model.save_pretrained(tmp_path)
    # Shorter side kept, no crop: inputs of any aspect ratio, no fixed input size.
    transformers.BitImageProcessor(
        size={"shortest_edge": 64}, do_center_crop=False
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"BitImageProcessor\w* keeps the aspect ratio"):
        load_model(ModelSpec(source=f"hf:{tmp_path}"))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("source", "package", "extra"),
    [("timm:resnet18", "timm", "timm"), ("hf:org/name", "transformers", "hf")],
)
def test_missing_package_says_which_extra(
    monkeypatch: pytest.MonkeyPatch, source: str, package: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import now raises ImportError
    expected = f"{extra}: models need the {package} package: pip install 'opticam[{extra}]'"
    with pytest.raises(MissingPackageError) as err:
        load_model(ModelSpec(source=source))
    assert str(err.value) == expected


@pytest.fixture
def empty_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing cached: Hugging Face and torch caches in an empty folder."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.mark.usefixtures("empty_caches")
def test_offline_pretrained_weights_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not zoo.hub_reachable()
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="not cached.*--checkpoint"):
        load_model(ModelSpec(source="timm:resnet18"))
    with pytest.raises(WeightsUnavailableError, match="hf:org/name is no local folder"):
        load_model(ModelSpec(source="hf:org/name"))
    assert time.monotonic() - start < 10


@pytest.mark.usefixtures("empty_caches")
def test_unreachable_hub_fails_fast_without_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    # No HF_HUB_OFFLINE: the probe finds the endpoint closed, so nothing retries.
    import huggingface_hub.constants

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the with-block ends
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"https://127.0.0.1:{port}")
    start = time.monotonic()
    assert not zoo.hub_reachable()
    with pytest.raises(WeightsUnavailableError, match="--checkpoint"):
        load_model(ModelSpec(source="timm:resnet18"))
    assert time.monotonic() - start < 10


@pytest.mark.e2e
def test_zoo_packages_load_only_with_a_zoo_source() -> None:
    code = "import opticam.models, opticam.zoo, opticam.pipeline, sys\n"
    code += "print(sorted({'timm', 'transformers'} & {m.split('.')[0] for m in sys.modules}))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_sources_in_the_spec() -> None:
    for source in (
        "timm:resnet18",
        "timm:resnet50:a1_in1k",
        "timm:vit_small_patch16_224.augreg_in21k_ft_in1k",
        "hf:google/vit-base-patch16-224",
        "hf:/models/my_vit",
    ):
        assert ModelSpec(source=source).source == source
    for source in ("timm:", "timm:resnet50.a1_in1k:a1_in1k", "hf:", "hf:a b"):
        with pytest.raises(ValueError, match="unknown model source .*timm:NAME"):
            ModelSpec(source=source)
    # Run ids of jobs without the new fields stay what they were; set, they count.
    plain = RunConfig(data="x.tar")
    assert "interpolation" not in plain.job_description()["model"]
    bicubic = RunConfig(data="x.tar", model=ModelSpec(interpolation="bicubic"))
    assert bicubic.job_description()["model"]["interpolation"] == "bicubic"
    assert bicubic.run_id != plain.run_id
    timm_run = RunConfig(data="/d/imagenet/a.tar", model=ModelSpec(source="timm:resnet50:a1_in1k"))
    hf_run = RunConfig(data="/d/imagenet/a.tar", model=ModelSpec(source="hf:google/vit-base"))
    assert timm_run.run_id.startswith("imagenet-resnet50-")
    assert hf_run.run_id.startswith("imagenet-vit-base-")


# --------------------------------------------------------------------------- end to end

# Both runs in one process: Prefect's temporary server starts once (about 15 s), which
# halves the time of two `python -m opticam run` processes.
_DRIVER = """
import sys
from opticam.cli import main
codes = [main(argv) for argv in {runs!r}]
sys.exit(max(codes))
"""


@pytest.mark.e2e
def test_opticam_run_with_timm_and_hf_models(hf_folders: dict[str, str], tmp_path: Path) -> None:
    shard = make_shards(str(tmp_path / "data"), 1, 3, seed=7)[0]
    torch.manual_seed(0)
    checkpoint = tmp_path / "resnet18.pt"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), checkpoint)
    common = ["--data", shard, "--device", "cpu", "--methods", "opticam,gradcam"]
    common += ["--iterations", "2", "--no-insertion-deletion", "--target", "predicted"]
    runs = [
        ["run", *common, "--output", str(tmp_path / "timm"), "--model", "timm:resnet18"]
        + ["--checkpoint", str(checkpoint), "--num-classes", "10", "--input-size", "64"],
        ["run", *common, "--output", str(tmp_path / "hf"), "--model", f"hf:{hf_folders['vit']}"],
    ]
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "OPTICAM_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "PYTHONPATH": str(REPO),
    }
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER.format(runs=runs)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    expected = {
        "timm": ("timm:resnet18", "layer4", 64, {"resize_size": math.floor(64 / 0.95), "interpolation": "bicubic", "resize_mode": "shorter", "crop_rounding": "round"}),
        "hf": (f"hf:{hf_folders['vit']}", "vit.", 64, {"resize_size": 64, "interpolation": "bilinear", "resize_mode": "squash", "crop_rounding": "floor"}),
    }  # fmt: skip
    for output, (model, layer, side, settings) in expected.items():
        (run,) = list((tmp_path / output).iterdir())
        rows = store.read_rows(str(run), ["model", "method", "target_layer", "input_height"])
        assert rows.num_rows == 3 * 2
        assert set(rows.column("model").to_pylist()) == {model}
        assert set(rows.column("method").to_pylist()) == {"opticam", "gradcam"}
        assert set(rows.column("input_height").to_pylist()) == {side}
        (target_layer,) = set(rows.column("target_layer").to_pylist())
        assert target_layer.startswith(layer)
        (status,) = store.read_statuses(str(run))
        assert {k: status[k] for k in settings} == settings
        assert (run / "report" / "index.html").is_file()
