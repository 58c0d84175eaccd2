"""The one tiny CNN of the test suite, cheap enough to optimise many times per test.

``TinyNet()`` takes 32x32 images to features A (B,8,16,16); ``build()`` is the factory
the pipeline, flow and CLI tests load as ``factory:tiny:build`` (64x64 input, 8x8
features, 10 classes). ``build_plain()`` is the same network without the attributes a
factory may declare (``input_size``, ``default_target_layer``), for tests that give
them on the command line instead.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import Tensor, nn

from opticam.config import RunConfig

#: Module name under which :func:`register` makes this module importable.
FACTORY_MODULE = "tiny"
FACTORY = f"factory:{FACTORY_MODULE}:build"
N_CLASSES = 10


class TinyNet(nn.Module):
    """Two convs -> features A -> global average pool -> linear, ``classes`` logits.

    ``stride`` is the first conv's stride (the second halves again). Weights are drawn
    from N(0, 0.5^2) with a generator seeded by ``seed``, so every test gets the same
    network for the same seed.
    """

    def __init__(self, seed: int = 0, classes: int = 5, stride: int = 1) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=stride, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class _FactoryNet(TinyNet):
    # What a factory model may declare (opticam.models.load_model reads both).
    default_target_layer = "features"
    input_size = 64


def build() -> nn.Module:
    """The factory model: 64x64 input, 8x8 features, :data:`N_CLASSES` classes."""
    return _FactoryNet(seed=0, classes=N_CLASSES, stride=4)


def build_plain() -> nn.Module:
    """The factory model without declared input size or layer (given by the caller)."""
    return TinyNet(seed=0, classes=N_CLASSES, stride=4)


def register(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make ``factory:tiny:build`` loadable in this process; returns that source."""
    module = types.ModuleType(FACTORY_MODULE)
    module.build = build  # type: ignore[attr-defined]
    module.build_plain = build_plain  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, FACTORY_MODULE, module)
    return FACTORY


def break_method(monkeypatch: pytest.MonkeyPatch, broken: str = "gradcam") -> None:
    """Make ``opticam.methods.get_explainer`` hand out a ``broken`` method that raises
    ``RuntimeError("<broken> exploded")`` on every batch; other methods stay real."""
    from opticam import methods

    real = methods.get_explainer

    def flaky(name: str, loaded: object, **options: object) -> object:
        if name != broken:
            return real(name, loaded, **options)  # type: ignore[arg-type]

        def boom(images: Tensor, targets: Tensor) -> object:
            raise RuntimeError(f"{broken} exploded")

        return boom

    monkeypatch.setattr(methods, "get_explainer", flaky)


def make_config(data: object, output: object, **changes: object) -> RunConfig:
    """A small pipeline job on :data:`FACTORY` (Opti-CAM at 3 iterations, Grad-CAM and
    Fake-CAM, 4 insertion/deletion steps, batches of 4 on the CPU); ``changes`` win."""
    fields: dict[str, object] = {
        "data": data,
        "output": str(output),
        "model": {"source": FACTORY},
        "methods": [{"name": "opticam", "options": {"iterations": 3}}, "gradcam", "fakecam"],
        "metrics": {"steps": 4},
        "device": "cpu",
        "batch_size": 4,
    }
    fields.update(changes)
    return RunConfig(**fields)  # type: ignore[arg-type]
