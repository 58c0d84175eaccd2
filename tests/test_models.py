"""Models (opticam.models): specs, sources, checkpoints, target layers."""

from __future__ import annotations

import json
import textwrap
import urllib.error
from pathlib import Path

import pydantic
import pytest
import tiny
import torch
import torchvision.models as tvm
from spec_settings import LATER
from torch import nn

from opticam import models
from opticam.errors import CheckpointError, WeightsUnavailableError
from opticam.layers import (
    default_target_layer,
    find_layer,
    resolve_target_layer,
    vit_reshape_transform,
)
from opticam.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    ModelSpec,
    load_checkpoint,
    load_model,
)
from opticam.sources import SourceModel, load_demo, load_factory, load_torchvision
from opticam.wrappers import Normalized

torch.set_num_threads(1)


def _meta(name: str) -> nn.Module:
    # Structure without the cost of initializing (or storing) real weights.
    with torch.device("meta"):
        return tvm.get_model(name, weights=None)


@pytest.mark.parametrize(
    "arch,layer,layer_type",
    [
        ("resnet18", "layer4", nn.Sequential),
        ("resnext50_32x4d", "layer4", nn.Sequential),
        ("vgg11_bn", "features.27", nn.ReLU),
        ("vgg16_bn", "features.42", nn.ReLU),
        ("densenet121", "features", nn.Sequential),
        ("mobilenet_v2", "features.18", nn.Module),
        ("mobilenet_v3_small", "features.12", nn.Module),
        ("efficientnet_b0", "features.8", nn.Module),
        ("convnext_tiny", "features.7", nn.Sequential),
        ("squeezenet1_0", "features.12", tvm.squeezenet.Fire),
        ("squeezenet1_1", "features.12", tvm.squeezenet.Fire),
        ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", nn.LayerNorm),
        ("swin_t", "features.7.1.norm1", nn.LayerNorm),
    ],
)
def test_default_target_layer_per_family(arch: str, layer: str, layer_type: type) -> None:
    model = Normalized(_meta(arch), IMAGENET_MEAN, IMAGENET_STD)
    assert default_target_layer(model) == layer
    resolved = resolve_target_layer(model)
    assert resolved.name == layer
    assert isinstance(resolved.module, layer_type)
    transformer = arch.startswith(("vit", "swin"))
    assert resolved.relu_features is not transformer
    assert (resolved.reshape_transform is not None) is transformer
    if arch.startswith("vgg"):
        # The activation right before the last max-pool.
        features = unwrap_features(model)
        assert isinstance(features[int(layer.split(".")[1]) + 1], nn.MaxPool2d)


def unwrap_features(model: Normalized) -> nn.Sequential:
    return model.model.features  # type: ignore[return-value]


def test_unknown_layer_lists_candidates() -> None:
    model = Normalized(_meta("resnet18"), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="unknown target layer 'layer5'") as err:
        find_layer(model, "layer5")
    assert "layer4" in str(err.value) and "layer4.1" in str(err.value)
    # Names relative to the wrapper are accepted too.
    module, name = find_layer(model, "model.layer4")
    assert name == "layer4" and module is model.model.layer4


class _UserWrapper(nn.Module):
    """A wrapper of a user's own: opticam does not know it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "arch,wrapped,last_block",
    [
        ("squeezenet1_1", False, "features.12"),
        ("squeezenet1_1", True, "net.features.12"),
        ("convnext_tiny", False, "features.7.2"),
        ("googlenet", False, "inception5b"),
        ("resnet18", True, "net.layer4.1"),
    ],
)
def test_unknown_layer_suggests_the_last_feature_blocks(
    arch: str, wrapped: bool, last_block: str
) -> None:
    """Not the head's layers (SqueezeNet's and ConvNeXt's classifiers hold a conv or a
    norm, GoogLeNet's auxiliary classifiers come last): the blocks before the pooling."""
    with torch.device("meta"):
        net = tvm.get_model(
            arch, weights=None, **({"init_weights": False} if arch == "googlenet" else {})
        )
    model = _UserWrapper(net) if wrapped else Normalized(net, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="unknown target layer 'nope'") as err:
        find_layer(model, "nope")
    listed = str(err.value).split("candidates include: ")[1].split(";")[0].split(", ")
    assert last_block in listed
    # The deepest names listed are inside that block, none inside a classifier.
    assert listed[-1].startswith(f"{last_block}.")
    assert not any(".classifier." in f".{n}." or ".aux" in f".{n}" for n in listed[-8:])


def test_default_target_layer_inside_a_wrapper_of_the_users_own() -> None:
    from opticam.methods import get_explainer

    with torch.device("meta"):
        assert default_target_layer(_UserWrapper(tvm.resnet18())) == "net.layer4"
    torch.manual_seed(0)
    model = _UserWrapper(tvm.squeezenet1_1(num_classes=5)).eval()
    assert default_target_layer(model) == "net.features.12"
    result = get_explainer("gradcam", model)(torch.rand(2, 3, 64, 64), [0, 1])
    assert result.saliency is not None and result.saliency.shape == (2, 1, 3, 3)


def test_vit_reshape_transform() -> None:
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    maps = vit_reshape_transform(tokens)
    assert maps.shape == (2, 3, 4, 4)
    # Patch token 1 + (row * 4 + col) lands at (row, col); the class token is dropped.
    assert torch.equal(maps[1, :, 2, 3], tokens[1, 1 + 2 * 4 + 3])
    with pytest.raises(ValueError, match="square grid"):
        vit_reshape_transform(torch.zeros(1, 1 + 12, 3))


def test_spec_validation() -> None:
    with pytest.raises(pydantic.ValidationError, match="unknown model source"):
        ModelSpec(source="hub:resnet50")
    with pytest.raises(pydantic.ValidationError):
        ModelSpec(input_size=0)
    with pytest.raises(pydantic.ValidationError):
        ModelSpec(source="demo", checkpoints="x")  # type: ignore[call-arg]
    assert ModelSpec(source="torchvision:resnet50:IMAGENET1K_V2").checkpoint is None


def test_torchvision_checkpoint_from_local_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = tvm.mobilenet_v3_small(num_classes=7).eval()
    path = tmp_path / "mnv3.pt"
    torch.save({"state_dict": net.state_dict()}, path)
    spec = ModelSpec(source="torchvision:mobilenet_v3_small", checkpoint=str(path), num_classes=7)
    loaded = load_model(spec)
    assert loaded.num_classes == 7
    assert loaded.target_layer_name == "features.12"
    assert loaded.input_size == (224, 224) and loaded.resize_size == 256
    assert (loaded.mean, loaded.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert loaded.name == "torchvision:mobilenet_v3_small"
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.training
    # Normalization inside: the loaded model on [0,1] images == the net on normalized ones.
    x = torch.rand(1, 3, 64, 64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net((x - mean) / std), atol=1e-5)
    # A checkpoint for another number of classes does not fit, and says how to fix it.
    wrong = ModelSpec(source="torchvision:mobilenet_v3_small", checkpoint=str(path))
    with pytest.raises(CheckpointError, match="num_classes"):
        load_model(wrong)


class Payload:
    """A custom class: pickled by reference, refused by weights_only loading."""

    def __init__(self) -> None:
        self.note = "hello"


def test_weights_only_refuses_pickled_objects(tmp_path: Path) -> None:
    state = nn.Linear(2, 3).state_dict()
    path = tmp_path / "custom.pt"
    torch.save({"state_dict": state, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        load_checkpoint(str(path))
    loaded = load_checkpoint(f"file://{path}", trust=True)
    assert set(loaded) == {"weight", "bias"}
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_checkpoint(str(tmp_path / "list.pt"))


def test_checkpoint_of_another_architecture_gives_a_short_error(tmp_path: Path) -> None:
    torch.save(tvm.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "mnv3.pt")
    spec = ModelSpec(source="torchvision:resnet18", checkpoint=str(tmp_path / "mnv3.pt"))
    with pytest.raises(CheckpointError) as info:
        load_model(spec)
    message = str(info.value)
    # torch's own message lists all 122 + 244 keys: 11,003 characters.
    assert len(message) < 400 and "\n" not in message
    expected = tvm.resnet18(weights=None).state_dict()
    got = torch.load(tmp_path / "mnv3.pt")
    n_missing = len(set(expected) - set(got))
    n_unexpected = len(set(got) - set(expected))
    assert f"missing {n_missing} keys (conv1.weight, bn1.weight, bn1.bias, ... and " in message
    assert f"{n_missing - 3} more)" in message
    assert f"unexpected {n_unexpected} keys (features.0.0.weight, " in message
    assert "does not fit 'torchvision:resnet18'" in message

    # Same architecture, other number of classes: the shapes are named, briefly.
    torch.save(tvm.resnet18(weights=None, num_classes=7).state_dict(), tmp_path / "r7.pt")
    spec = ModelSpec(source="torchvision:resnet18", checkpoint=str(tmp_path / "r7.pt"))
    with pytest.raises(CheckpointError) as info:
        load_model(spec)
    message = str(info.value)
    assert len(message) < 400 and "num_classes" in message and "missing" not in message
    assert (
        "other shape for 2 keys (fc.weight (7, 512) in the checkpoint, (1000, 512) in the model"
        in message
    )


def test_dataparallel_prefix_stripped(tmp_path: Path) -> None:
    state = {f"module.{k}": v for k, v in nn.Linear(2, 3).state_dict().items()}
    torch.save(state, tmp_path / "dp.pt")
    assert set(load_checkpoint(str(tmp_path / "dp.pt"))) == {"weight", "bias"}


def test_offline_weights_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    with pytest.raises(WeightsUnavailableError) as err:
        load_model(ModelSpec(source="torchvision:resnet18:IMAGENET1K_V1"))
    message = str(err.value)
    assert "no network" in message
    assert "checkpoint=" in message and "torchvision:resnet18'" in message


def test_unknown_torchvision_names() -> None:
    with pytest.raises(ValueError, match="unknown torchvision classification model 'resnet5'"):
        load_model(ModelSpec(source="torchvision:resnet5"))
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        load_model(ModelSpec(source="torchvision:resnet18:IMAGENET9K"))
    with pytest.raises(ValueError, match="not both"):
        load_model(ModelSpec(source="torchvision:resnet18:DEFAULT", checkpoint="/x.pt"))


FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def tiny():
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        )
        net.input_mean = (0.5, 0.5, 0.5)
        net.input_std = (0.25, 0.25, 0.25)
        net.input_size = 32
        return net

    def not_a_module():
        return 42
    """
)


def test_factory_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_factory_mod.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model(ModelSpec(source="factory:my_factory_mod:tiny"))
    assert isinstance(loaded.model, Normalized)
    assert torch.allclose(loaded.model.std.flatten(), torch.tensor([0.25] * 3))
    assert loaded.num_classes == 3
    assert loaded.input_size == (32, 32) and loaded.resize_size == 32
    assert loaded.target_layer_name == "0" and loaded.relu_features
    # The normalization the factory declared is what the LoadedModel reports as applied.
    assert (loaded.mean, loaded.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    described = loaded.description()
    assert (described["mean"], described["std"]) == ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert described["target_layer"] == "0" and described["input_size"] == [32, 32]
    assert json.loads(json.dumps(described)) == described  # JSON values only
    # A checkpoint is loaded into the factory's module.
    state = {k: torch.zeros_like(v) for k, v in loaded.model.model.state_dict().items()}
    torch.save(state, tmp_path / "zeros.pt")
    spec = ModelSpec(
        source="factory:my_factory_mod:tiny",
        checkpoint=str(tmp_path / "zeros.pt"),
        target_layer="1",
    )
    zeroed = load_model(spec)
    assert zeroed.target_layer_name == "1"
    assert all(float(p.abs().sum()) == 0 for p in zeroed.model.parameters())
    with pytest.raises(ValueError, match="expected a torch.nn.Module"):
        load_model(ModelSpec(source="factory:my_factory_mod:not_a_module"))
    with pytest.raises(ValueError, match="cannot import factory module"):
        load_model(ModelSpec(source="factory:no_such_module_xyz:tiny"))


def test_demo_source() -> None:
    demo = pytest.importorskip("opticam.demo")
    if not Path(demo.model.DEMO_WEIGHTS).is_file():
        pytest.skip("demo weights not trained yet")
    loaded = load_model(ModelSpec())
    assert loaded.target_layer_name == demo.DEMO_TARGET_LAYER
    assert loaded.input_size == (128, 128) and loaded.resize_size == 128
    assert loaded.num_classes == demo.NUM_CLASSES
    with torch.no_grad():
        assert loaded.model(torch.rand(2, 3, 128, 128)).shape == (2, demo.NUM_CLASSES)


def test_demo_source_with_checkpoint(tmp_path: Path) -> None:
    """The demo architecture with any state_dict (works before the bundled weights exist)."""
    from opticam.demo.model import DEMO_TARGET_LAYER, DemoNet
    from opticam.methods import get_explainer

    torch.manual_seed(0)
    torch.save(DemoNet().state_dict(), tmp_path / "demo.pt")
    loaded = load_model(ModelSpec(source="demo", checkpoint=str(tmp_path / "demo.pt")))
    assert not isinstance(loaded.model, Normalized)  # normalization is inside already
    assert loaded.target_layer_name == DEMO_TARGET_LAYER
    assert loaded.input_size == (128, 128) and loaded.resize_size == 128
    x = torch.rand(2, 3, 128, 128)
    for method in ("opticam", "gradcam"):
        options = {"iterations": 2} if method == "opticam" else {}
        result = get_explainer(method, loaded, **options)(x, [0, 1])
        assert result.saliency is not None and result.saliency.shape == (2, 1, 8, 8)
        assert result.maps.shape == (2, 1, 128, 128)


# --------------------------------------------------------------------------- sources


def _no_checkpoint(module: nn.Module) -> None:
    raise AssertionError("the source loaded a checkpoint the spec does not give")


def _record(built: SourceModel) -> dict[str, object]:
    """Every field of a source's record but the net."""
    fields = dict(vars(built))
    del fields["net"]
    return fields


def test_demo_source_knows_its_net(tmp_path: Path) -> None:
    from opticam.demo.model import DEMO_TARGET_LAYER, DemoNet

    expected = {
        "mean": None,  # the net normalizes inside
        "std": None,
        "num_classes": 10,
        "input_size": 128,
        "resize_size": 128,
        "crop_fraction": None,
        "default_layer": DEMO_TARGET_LAYER,
        "interpolation": None,
        "resize_mode": None,
        "crop_rounding": None,
    }
    bundled = load_demo("", ModelSpec(), _no_checkpoint)
    assert isinstance(bundled.net, DemoNet) and _record(bundled) == expected
    assert _record(load_demo("", ModelSpec(**LATER), _no_checkpoint)) == expected
    # With a checkpoint: the architecture for spec.num_classes, the state loaded into it.
    loaded: list[nn.Module] = []
    spec = ModelSpec(checkpoint=str(tmp_path / "demo.pt"), num_classes=4, **LATER)
    built = load_demo("", spec, loaded.append)
    assert loaded == [built.net] and built.net.fc.out_features == 4  # type: ignore[union-attr]
    assert _record(built) == {**expected, "num_classes": 4}


def test_torchvision_source_knows_its_net() -> None:
    expected = {
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "num_classes": None,  # no weights: a forward pass tells, unless the spec does
        "input_size": 224,
        "resize_size": 256,
        "crop_fraction": None,
        "default_layer": None,
        "interpolation": None,
        "resize_mode": None,
        "crop_rounding": None,
    }
    with pytest.warns(UserWarning, match="random weights"):
        built = load_torchvision(
            "resnet18", ModelSpec(source="torchvision:resnet18"), _no_checkpoint
        )
    assert isinstance(built.net, tvm.ResNet) and _record(built) == expected
    # spec.num_classes builds the head; the spec's later settings stay out of the record.
    loaded: list[nn.Module] = []
    spec = ModelSpec(source="torchvision:resnet18", checkpoint="x.pt", num_classes=7, **LATER)
    built = load_torchvision("resnet18", spec, loaded.append)
    assert loaded == [built.net] and built.net.fc.out_features == 7  # type: ignore[union-attr]
    assert _record(built) == expected


def _weights_without_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's get_model builds the architecture for the weights' classes instead
    of downloading them (offline tests of what the source reads from the weights)."""
    real = tvm.get_model

    def offline(name: str, weights: object = None, **kwargs: object) -> nn.Module:
        if weights is not None:
            kwargs["num_classes"] = len(weights.meta["categories"])  # type: ignore[attr-defined]
        return real(name, weights=None, **kwargs)

    monkeypatch.setattr(tvm, "get_model", offline)


def test_torchvision_source_reads_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    _weights_without_download(monkeypatch)
    source = "torchvision:efficientnet_b1:IMAGENET1K_V2"
    built = load_torchvision(
        "efficientnet_b1:IMAGENET1K_V2", ModelSpec(source=source), _no_checkpoint
    )
    # The weights' classes and preset: crop 240 out of a 255 resize.
    assert (built.num_classes, built.input_size, built.resize_size) == (1000, 240, 255)
    assert (built.mean, built.std) == (IMAGENET_MEAN, IMAGENET_STD)
    # The weights' count stands; a spec that contradicts it is refused.
    assert (
        load_torchvision(
            "efficientnet_b1:IMAGENET1K_V2", ModelSpec(source=source, num_classes=1000), print
        ).num_classes
        == 1000
    )
    with pytest.raises(ValueError, match="num_classes=5 contradicts"):
        load_torchvision(
            "efficientnet_b1:IMAGENET1K_V2", ModelSpec(source=source, num_classes=5), print
        )


def test_factory_source_knows_what_the_net_declares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_factory_mod.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = ModelSpec(source="factory:my_factory_mod:tiny")
    built = load_factory("my_factory_mod:tiny", spec, _no_checkpoint)
    declared = {
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "num_classes": None,
        "input_size": 32,
        "resize_size": None,
        "crop_fraction": None,
        "default_layer": None,  # a default_target_layer attribute is read by opticam.layers
        "interpolation": None,
        "resize_mode": None,
        "crop_rounding": None,
    }
    assert _record(built) == declared
    later = ModelSpec(source=spec.source, num_classes=5, **LATER)
    assert _record(load_factory("my_factory_mod:tiny", later, _no_checkpoint)) == declared
    # A net that declares nothing: the source knows nothing.
    plain = FACTORY + "\ndef plain():\n    return nn.Sequential(nn.Conv2d(3, 4, 3))\n"
    (tmp_path / "my_plain_factory_mod.py").write_text(plain)
    built = load_factory("my_plain_factory_mod:plain", spec, _no_checkpoint)
    assert set(_record(built).values()) == {None}


@pytest.mark.parametrize(
    ("built", "input_size", "resize"),
    [
        (SourceModel(nn.Identity(), input_size=224, resize_size=256), 224, 256),
        # No crop fraction: the source's resize, whatever the input.
        (SourceModel(nn.Identity(), input_size=224, resize_size=256), 96, 256),
        # A crop fraction: its own resize for its own input, in proportion for another.
        (SourceModel(nn.Identity(), input_size=64, resize_size=73, crop_fraction=0.875), 64, 73),
        (SourceModel(nn.Identity(), input_size=64, resize_size=73, crop_fraction=0.875), 96, 109),
        # No resize at all: the input size (no crop).
        (SourceModel(nn.Identity(), input_size=32), 48, 48),
        (SourceModel(nn.Identity()), 224, 224),
    ],
)
def test_resize_for(built: SourceModel, input_size: int, resize: int) -> None:
    assert built.resize_for(input_size) == resize


# --------------------------------------------------------------------------- load_model's rule


def _net() -> nn.Module:
    # Family default layer: "2", the last top-level conv; 3 logits.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def _loaded_from(
    monkeypatch: pytest.MonkeyPatch, spec: dict[str, object], source: dict[str, object]
) -> LoadedModel:
    """load_model on a spec, with a source that returns ``SourceModel(_net(), **source)``."""

    def fake_source(target: str, spec: ModelSpec, load_state: object) -> SourceModel:
        return SourceModel(_net(), **source)  # type: ignore[arg-type]

    monkeypatch.setattr(models, "_source", lambda kind: fake_source)
    return load_model(ModelSpec(source="factory:fake.module:build", **spec))  # type: ignore[arg-type]


SPEC_MEAN, SOURCE_MEAN = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
SPEC_STD, SOURCE_STD = (0.5, 0.6, 0.7), (0.2, 0.3, 0.4)


def _both(setting: str, spec: object, source: object, default: object) -> list[object]:
    """Three cases of one setting: spec and source given, source only, neither."""
    return [
        pytest.param(setting, {setting: spec}, {setting: source}, spec, id=f"{setting}-spec"),
        pytest.param(setting, {}, {setting: source}, source, id=f"{setting}-source"),
        pytest.param(setting, {}, {}, default, id=f"{setting}-default"),
    ]


@pytest.mark.parametrize(
    ("setting", "spec", "source", "expected"),
    [
        *_both("input_size", 48, 40, 224),
        *_both("interpolation", "bicubic", "nearest", "bilinear"),
        *_both("resize_mode", "shorter", "squash", "shorter"),
        *_both("num_classes", 4, 6, 3),  # default: the forward pass counts the net's 3
        # resize_size: for the source's own input, its own resize; default: no crop.
        *_both("resize_size", 50, 45, 224),
        pytest.param(
            "resize_size",
            {"input_size": 60},
            {"input_size": 40, "resize_size": 45, "crop_fraction": 0.8},
            75,
            id="resize_size-source-rescaled",
        ),  # fmt: skip
        pytest.param(
            "resize_size",
            {"input_size": 60},
            {"input_size": 40, "resize_size": 45},
            45,
            id="resize_size-source-fixed",
        ),
        pytest.param("crop_rounding", {}, {"crop_rounding": "floor"}, "floor", id="crop-source"),
        pytest.param("crop_rounding", {}, {}, "round", id="crop-default"),
        # mean and std: each the spec's, else the source's; no mean, no normalization.
        *_both("mean", SPEC_MEAN, SOURCE_MEAN, None),
        pytest.param(
            "std",
            {"std": SPEC_STD},
            {"mean": SOURCE_MEAN, "std": SOURCE_STD},
            SPEC_STD,
            id="std-spec",
        ),
        pytest.param(
            "std",
            {"mean": SPEC_MEAN},
            {"mean": SOURCE_MEAN, "std": SOURCE_STD},
            SOURCE_STD,
            id="std-source",
        ),
        pytest.param("std", {"mean": SPEC_MEAN}, {}, (1.0, 1.0, 1.0), id="std-default"),
        pytest.param("std", {"std": SPEC_STD}, {}, None, id="std-without-mean"),
        pytest.param(
            "mean", {"std": SPEC_STD}, {"mean": SOURCE_MEAN}, SOURCE_MEAN, id="mean-source-spec-std"
        ),
    ],
)
def test_load_model_takes_the_spec_then_the_source_then_the_default(
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    spec: dict[str, object],
    source: dict[str, object],
    expected: object,
) -> None:
    loaded = _loaded_from(monkeypatch, spec, source)
    described = loaded.description()
    value = loaded.input_size[0] if setting == "input_size" else getattr(loaded, setting)
    assert value == expected
    if setting in ("mean", "std"):
        # What is described is what the model applies.
        assert isinstance(loaded.model, Normalized) is (expected is not None)
        if expected is not None:
            applied = loaded.model.mean if setting == "mean" else loaded.model.std
            assert tuple(applied.flatten().tolist()) == pytest.approx(expected)
            assert described[setting] == pytest.approx(list(expected))  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("spec", "source", "expected"),
    [
        pytest.param({"target_layer": "1"}, {"default_layer": "0"}, "1", id="spec"),
        pytest.param({}, {"default_layer": "0"}, "0", id="source"),
        pytest.param({}, {}, "2", id="family-default"),
    ],
)
def test_load_model_target_layer_rule(
    monkeypatch: pytest.MonkeyPatch,
    spec: dict[str, object],
    source: dict[str, object],
    expected: str,
) -> None:
    loaded = _loaded_from(monkeypatch, spec, source)
    assert loaded.target_layer_name == expected
    assert loaded.target_layer is loaded.model.get_submodule(expected)


def test_mean_without_std_takes_the_sources_std(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One rule for every source: a spec's mean alone keeps the source's std (before,
    torchvision and factory sources took a std of 1, timm and hf sources their own)."""
    mean = (0.1, 0.2, 0.3)
    x = torch.rand(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="random weights"):
        loaded = load_model(ModelSpec(source="torchvision:resnet18", mean=mean))
    assert (loaded.mean, loaded.std) == (mean, IMAGENET_STD)
    assert isinstance(loaded.model, Normalized)
    net = loaded.model.model
    expected = net(
        (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    )
    assert torch.allclose(loaded.model(x), expected)
    # A std alone keeps the source's mean.
    with pytest.warns(UserWarning, match="random weights"):
        loaded = load_model(ModelSpec(source="torchvision:resnet18", std=(0.5, 0.5, 0.5)))
    assert (loaded.mean, loaded.std) == (IMAGENET_MEAN, (0.5, 0.5, 0.5))

    (tmp_path / "my_factory_mod.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model(ModelSpec(source="factory:my_factory_mod:tiny", mean=mean))
    assert (loaded.mean, loaded.std) == (mean, (0.25, 0.25, 0.25))
    assert torch.allclose(loaded.model.std.flatten(), torch.tensor([0.25] * 3))
    # The demo normalizes inside: no std to keep, so a mean alone divides by 1.
    demo = load_model(ModelSpec(mean=mean))
    assert (demo.mean, demo.std) == (mean, (1.0, 1.0, 1.0))


def test_num_classes_outcomes_per_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision: the weights' count; demo: the spec's or 10; factory: the spec's or a
    forward pass; torchvision without weights: the spec's or a forward pass."""
    with pytest.warns(UserWarning, match="random weights"):
        assert load_model(ModelSpec(source="torchvision:squeezenet1_1")).num_classes == 1000
    with pytest.warns(UserWarning, match="random weights"):
        spec = ModelSpec(source="torchvision:squeezenet1_1", num_classes=7)
        assert load_model(spec).num_classes == 7
    assert load_model(ModelSpec()).num_classes == 10
    tiny.register(monkeypatch)
    assert load_model(ModelSpec(source="factory:tiny:build_plain")).num_classes == tiny.N_CLASSES
    assert load_model(ModelSpec(source="factory:tiny:build_plain", num_classes=4)).num_classes == 4
    _weights_without_download(monkeypatch)
    loaded = load_model(ModelSpec(source="torchvision:efficientnet_b1:IMAGENET1K_V2"))
    assert (loaded.num_classes, loaded.input_size, loaded.resize_size) == (1000, (240, 240), 255)
