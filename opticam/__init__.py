"""opticam: dataset-scale Opti-CAM saliency maps, honestly evaluated.

The library never imports Prefect. The names below are imported lazily, so that
``import opticam`` (e.g. by the command line) does not pay for importing torch.

Quick start::

    import opticam
    loaded = opticam.load_model(opticam.ModelSpec(source="demo"))
    result = opticam.explain(loaded, images, targets)      # Opti-CAM by default
    result.maps                                            # (B,1,H,W) in [0,1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opticam.lazy import lazy_attributes

if TYPE_CHECKING:
    from torch import Tensor, nn

    from opticam.config import ModelSpec, RunConfig
    from opticam.methods import (
        Explainer,
        Explanation,
        get_explainer,
        upsample_normalize,
    )
    from opticam.models import LoadedModel, load_model
    from opticam.names import KNOWN_METHODS

__version__ = "0.1.0"

__all__ = [
    "KNOWN_METHODS",
    "Explainer",
    "Explanation",
    "LoadedModel",
    "ModelSpec",
    "RunConfig",
    "__version__",
    "explain",
    "get_explainer",
    "load_model",
    "upsample_normalize",
]

# Name -> module it comes from; the module is imported on first access. Config and names
# are torch-free, so ``opticam.ModelSpec`` or ``opticam.KNOWN_METHODS`` never load torch.
_LAZY = {
    "KNOWN_METHODS": "opticam.names",
    "ModelSpec": "opticam.config",
    "RunConfig": "opticam.config",
    "Explainer": "opticam.methods",
    "Explanation": "opticam.methods",
    "get_explainer": "opticam.methods",
    "upsample_normalize": "opticam.methods",
    "LoadedModel": "opticam.models",
    "load_model": "opticam.models",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


def explain(
    model: LoadedModel | nn.Module,
    images: Tensor,
    targets: Tensor | Sequence[int] | None = None,
    method: str = "opticam",
    target_layer: str | nn.Module | None = None,
    **options: Any,
) -> Explanation:
    """Saliency maps of ``model`` for ``images`` and their ``targets`` classes.

    Args:
        model: a :class:`~opticam.models.LoadedModel`, or any classifier taking (B,3,H,W)
            images in [0,1] (normalization inside); its target layer defaults per family.
        images: (B,3,H,W) float in [0,1], on the model's device.
        targets: (B,) class indices; None explains the predicted classes.
        method: one of ``KNOWN_METHODS`` (default ``"opticam"``).
        target_layer: dotted module name (or module); None for the default.
        **options: method options, e.g. ``iterations=50`` (see
            :func:`opticam.methods.get_explainer`).

    Returns:
        :class:`~opticam.methods.Explanation`: ``maps`` (B,1,H,W) in [0,1] on the images'
        device, ``saliency`` (B,1,h,w), per-image ``diagnostics``, ``seconds``.

    For many batches, build the explainer once with ``get_explainer`` and call it.
    """
    from opticam.methods import get_explainer

    explainer = get_explainer(method, model, target_layer=target_layer, **options)
    return explainer(images, targets)
