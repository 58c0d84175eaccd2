"""Saliency methods: Opti-CAM, pytorch-grad-cam baselines and Fake-CAM, one call shape.

``get_explainer(name, model, target_layer=None, **options)(images, targets)`` returns an
:class:`Explanation` with maps (B,1,H,W) in [0,1] on the images' device. Method names and
their classes are listed once, in :data:`opticam.names.METHODS`.

The first explainer a process builds tunes glibc's allocator for the many same-sized
buffers of iterative methods (:func:`opticam.allocator.tune_allocator`); importing this
package changes nothing.
"""

from opticam.methods.baselines import (
    CAM_METHODS,
    AblationCAMMethod,
    FakeCAM,
    GradCAMBaseline,
    GradCAMMethod,
    GradCAMPlusPlusMethod,
    HiResCAMMethod,
    LayerCAMMethod,
    ScoreCAMMethod,
    XGradCAMMethod,
)
from opticam.methods.common import (
    Explainer,
    Explanation,
    frozen,
    no_leaked_hooks,
    normalize_maps,
    upsample_normalize,
)
from opticam.methods.opticam import OptiCAM
from opticam.methods.registry import explainer_class, get_explainer
from opticam.names import KNOWN_METHODS, NORMALIZATIONS, OBJECTIVES, SCORES

__all__ = [
    "CAM_METHODS",
    "KNOWN_METHODS",
    "NORMALIZATIONS",
    "OBJECTIVES",
    "SCORES",
    "AblationCAMMethod",
    "Explainer",
    "Explanation",
    "FakeCAM",
    "GradCAMBaseline",
    "GradCAMMethod",
    "GradCAMPlusPlusMethod",
    "HiResCAMMethod",
    "LayerCAMMethod",
    "OptiCAM",
    "ScoreCAMMethod",
    "XGradCAMMethod",
    "explainer_class",
    "frozen",
    "get_explainer",
    "no_leaked_hooks",
    "normalize_maps",
    "upsample_normalize",
]
