"""The bundled demo classifier: a small CNN for the synthetic shapes dataset.

``DemoNet`` takes images ``x`` of shape (B,3,128,128) with values in [0,1] and
returns logits (B,10). Input normalization lives inside the model (buffers), so a
masked image ``x * M`` has black (zero) pixels where ``M = 0``, as Opti-CAM assumes.

Architecture (MobileNet-like, about 7.3 M multiply-adds per image)::

    stem    3x3 conv, stride 2        3 -> 16   64x64
    block1  depthwise-separable, s2  16 -> 32   32x32
    block2  depthwise-separable      32 -> 32   32x32  (residual)
    block3  depthwise-separable, s2  32 -> 64   16x16
    block4  depthwise-separable      64 -> 64   16x16  (residual)
    block5  depthwise-separable, s2  64 -> 128   8x8
    block6  depthwise-separable     128 -> 128   8x8   (residual)  <- CAM target layer
    global average pooling, linear 128 -> 10, divide by ``temperature``

Every block ends in a ReLU, so the target layer's activations ``A`` (B,128,8,8) are
non-negative, like ResNet's ``layer4``. ``temperature`` is a buffer set after
training (see :mod:`opticam.demo.train`) so that the classifier is confident but
not saturated, like an ImageNet classifier: the median softmax probability of the
true class on held-out images is about 0.9 rather than 0.999, which keeps Average
Gain, ``(o - p) / (1 - p)``, a meaningful number.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from opticam.demo.generate import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES

__all__ = [
    "CLASS_NAMES",
    "DEMO_INPUT_SIZE",
    "DEMO_TARGET_LAYER",
    "DEMO_WEIGHTS",
    "NUM_CLASSES",
    "DemoNet",
    "load_model",
]

DEMO_INPUT_SIZE = IMAGE_SIZE
DEMO_TARGET_LAYER = "features.block6"
DEMO_WEIGHTS = Path(__file__).with_name("demo_classifier.pt")

# ImageNet statistics: conventional, and close enough to this data's statistics.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class _SeparableBlock(nn.Module):
    """Depthwise 3x3 conv + pointwise 1x1 conv, each with BatchNorm; ReLU'd output.

    ``y = relu(x + pw(relu(dw(x))))`` when shapes allow a residual connection,
    ``y = relu(pw(relu(dw(x))))`` otherwise; x (B,Cin,H,W) -> y (B,Cout,H/s,W/s).
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
        )
        self.pointwise = nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.pointwise(self.depthwise(x))
        if self.residual:
            y = y + x
        # Not in place: CAM hooks keep a reference to this output.
        return self.act(y)


class DemoNet(nn.Module):
    """Small CNN for 128x128 images in [0,1]; see the module docstring for its layers.

    Args:
        num_classes: number of output logits.
        width: channels of the stem; later stages use 2x, 4x and 8x this.
    """

    temperature: Tensor
    mean: Tensor
    std: Tensor

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16) -> None:
        super().__init__()
        w = width
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1))
        # Logits are divided by this; 1 during training, set afterwards.
        self.register_buffer("temperature", torch.ones(()))
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("stem", _ConvBNReLU(3, w, 2)),
                    ("block1", _SeparableBlock(w, 2 * w, 2)),
                    ("block2", _SeparableBlock(2 * w, 2 * w, 1)),
                    ("block3", _SeparableBlock(2 * w, 4 * w, 2)),
                    ("block4", _SeparableBlock(4 * w, 4 * w, 1)),
                    ("block5", _SeparableBlock(4 * w, 8 * w, 2)),
                    ("block6", _SeparableBlock(8 * w, 8 * w, 1)),
                ]
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B,3,H,W) in [0,1] -> logits (B,num_classes), already divided by T."""
        x = (x - self.mean) / self.std
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.dropout(x)) / self.temperature


def load_model(weights: str | Path | None = None) -> nn.Module:
    """The demo classifier with its bundled weights, in eval mode on the CPU.

    Args:
        weights: a state_dict file to load instead of the bundled one.

    The file is read with ``torch.load(..., weights_only=True)``: a state_dict of
    tensors only, no pickled code.
    """
    path = Path(weights) if weights is not None else DEMO_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"demo classifier weights not found at {path}; "
            "train them with `python -m opticam.demo.train`"
        )
    model = DemoNet()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
