"""Saliency methods: Opti-CAM, pytorch-grad-cam baselines and Fake-CAM, one call shape.

``get_explainer(name, model, target_layer=None, **options)(images, targets)`` returns an
:class:`Explanation` with maps (B,1,H,W) in [0,1] on the images' device.
"""

from opticam.methods.baselines import CAM_METHODS, FakeCAM, GradCAMBaseline
from opticam.methods.common import (
    NORMALIZATIONS,
    Explainer,
    Explanation,
    frozen,
    no_leaked_hooks,
    normalize_maps,
    upsample_normalize,
)
from opticam.methods.opticam import OBJECTIVES, SCORES, OptiCAM
from opticam.methods.registry import KNOWN_METHODS, get_explainer

__all__ = [
    "CAM_METHODS",
    "KNOWN_METHODS",
    "NORMALIZATIONS",
    "OBJECTIVES",
    "SCORES",
    "Explainer",
    "Explanation",
    "FakeCAM",
    "GradCAMBaseline",
    "OptiCAM",
    "frozen",
    "get_explainer",
    "no_leaked_hooks",
    "normalize_maps",
    "upsample_normalize",
]
