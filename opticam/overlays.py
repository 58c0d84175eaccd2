"""Overlay PNGs for a few images: the library side of ``opticam explain``.

:func:`write_overlays` reads image files (any fsspec URL), explains them with one or more
methods and writes one ``<stem>-<method>.png`` per image and method: the saliency map over
the model's input. No Prefect, no run folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opticam.config import ModelSpec, OptiCAMOptions
from opticam.errors import ConfigError, UserError, short_repr

if TYPE_CHECKING:
    from PIL import Image

    from opticam.methods.common import Explainer
    from opticam.models import LoadedModel

__all__ = ["Overlay", "write_overlays"]


@dataclass(frozen=True)
class Overlay:
    """One written overlay.

    Attributes:
        path: the PNG written.
        method: the method whose map it shows.
        image: the image URL it was made from.
        target: the class explained.
        probability: the model's softmax probability of ``target`` on the clean image.
    """

    path: Path
    method: str
    image: str
    target: int
    probability: float


def write_overlays(
    images: Sequence[str],
    out: str | Path,
    *,
    model: ModelSpec | None = None,
    methods: Sequence[str] = ("opticam",),
    opticam_options: Mapping[str, Any] | None = None,
    target_class: int | None = None,
    device: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
) -> list[Overlay]:
    """Explain ``images`` and write their overlay PNGs into the folder ``out``.

    Args:
        images: image URLs (JPEG, PNG, WebP; any fsspec URL).
        out: folder to write to (created if missing).
        model: the classifier (default: the bundled demo).
        methods: method names (``opticam``, ``gradcam``, ...).
        opticam_options: Opti-CAM options given by the caller (only with ``opticam``
            among the methods; a preset never replaces one, see
            :class:`~opticam.config.OptiCAMOptions`).
        target_class: the class to explain for every image; None explains each image's
            predicted class.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        storage_options: fsspec options for the image and checkpoint URLs.

    Returns:
        One :class:`Overlay` per image and method, in method order.

    Raises:
        opticam.errors.UserError: an image that cannot be read or that preprocessing
            would refuse, an unknown method or option, a target class out of range.
    """
    import torch

    from opticam.models import load_model
    from opticam.pipeline import resolve_device
    from opticam.report.colors import overlay

    chosen = resolve_device(device)[0]
    storage = dict(storage_options or {})
    given_options = dict(opticam_options or {})
    # Read first: a typo should not wait for a model to load.
    pictures = _read_pictures(images, storage)
    names = [m.strip().lower() for m in methods if m.strip()]
    if given_options and "opticam" not in names:
        raise ConfigError(f"Opti-CAM options given, but method opticam is not in {names}")
    loaded = load_model(model or ModelSpec(), chosen, storage_options=storage)
    explainers = _explainers(names, given_options, loaded)
    preprocess = loaded.preprocess()
    batch = torch.stack([preprocess(p, [])[0] for p in pictures]).to(chosen)
    with torch.no_grad():
        probs = torch.softmax(loaded.model(batch).float(), dim=1)
    if target_class is not None:
        if not 0 <= target_class < loaded.num_classes:
            raise ConfigError(
                f"target class {target_class} out of range (0..{loaded.num_classes - 1})"
            )
        targets = torch.full((len(pictures),), target_class, dtype=torch.long, device=chosen)
    else:
        targets = probs.argmax(dim=1)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for method, explainer in explainers.items():
        maps = explainer(batch, targets).maps[:, 0].detach().cpu().numpy()
        for i, url in enumerate(images):
            stem = Path(url.rstrip("/").rsplit("/", 1)[-1]).stem
            path = folder / f"{stem}-{method}.png"
            overlay(batch[i].cpu().numpy(), maps[i]).save(path)
            c = int(targets[i])
            written.append(Overlay(path, method, url, c, float(probs[i, c])))
    return written


def _read_pictures(images: Sequence[str], storage: Mapping[str, Any]) -> list[Image.Image]:
    """Decode every image, refusing one that cannot be read or that preprocessing would."""
    import fsspec

    from opticam.data import decode_image
    from opticam.data.preprocess import check_aspect_ratio

    pictures = []
    for url in images:
        try:
            with fsspec.open(url, "rb", **storage) as f:
                pictures.append(decode_image(f.read()))
            check_aspect_ratio(*pictures[-1].size)  # what preprocessing would refuse
        except FileNotFoundError:
            raise UserError(f"image {short_repr(url)} not found") from None
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read image {short_repr(url)}: {err}") from err
    return pictures


def _explainers(
    names: list[str], given_options: Mapping[str, Any], loaded: LoadedModel
) -> dict[str, Explainer]:
    """One explainer per method name; Opti-CAM's gets the options the caller gave."""
    from opticam.methods import get_explainer

    explainers = {}
    for method in names:
        options = OptiCAMOptions(**given_options) if method == "opticam" else None
        given = {k: getattr(options, k) for k in given_options} if options else {}
        try:
            explainers[method] = get_explainer(method, loaded, **given)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    return explainers
