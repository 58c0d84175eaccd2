"""Step 2 of a batch: explain it with one method, score the maps, and make its rows.

For one method and one batch: the explanation (maps on the device), the AD/AG/AI terms
with the batch's clean probabilities, insertion/deletion with the predicted class (the
paper's protocol), localization for images with boxes, then one Parquet row per image
with the map in the run's :data:`~opticam.names.MAP_FORMATS` format. Every quantity
crosses to the host once per batch, never once per image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from opticam import store
from opticam.config import MetricsOptions, RunConfig
from opticam.data import ErrorRecord
from opticam.names import LOCALIZATION_COLUMNS, METHODS, STAGE_NONFINITE
from opticam.pipeline.targets import BatchTargets

__all__ = ["method_rows"]


def _host(values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in values.items()}


def _optional(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _insertion_deletion(
    options: MetricsOptions, model: Any, batch: BatchTargets, maps: torch.Tensor
) -> dict[str, torch.Tensor]:
    from opticam.metrics import insertion_deletion

    if not options.insertion_deletion:
        return {}
    kwargs: dict[str, Any] = {
        "steps": options.steps,
        "deletion_baseline": options.deletion_baseline,
    }
    if options.blur_sigma is not None:
        kwargs["blur_sigma"] = options.blur_sigma
    if options.blur_kernel is not None:
        kwargs["blur_kernel"] = options.blur_kernel
    return insertion_deletion(model, batch.images, maps, batch.predicted, **kwargs)


def method_rows(  # size: the row loop reads a dozen per-image arrays made just above it
    config: RunConfig,
    loaded: Any,
    method: str,
    explainer: Any,
    batch: BatchTargets,
    shard_url: str,
    errors: list[ErrorRecord],
    weights: bool = False,
) -> list[dict[str, Any]]:
    """Explain and score a batch with one method: a :data:`opticam.store.SCHEMA` row per image.

    An image whose map, masked score or insertion/deletion AUC is not finite (NaN or inf)
    gets an error record (stage ``"non-finite"``) in ``errors`` instead of a row, so no
    mean is ever computed from it.

    Args:
        config: the job (metric options, map format, run id).
        loaded: the :class:`opticam.models.LoadedModel`.
        method: the method's name.
        explainer: its explainer, bound to ``loaded``.
        batch: the batch's images and targets (:func:`~opticam.pipeline.choose_targets`).
        shard_url: the input shard's URL (the rows' ``shard`` column).
        errors: error records of images without a row are appended here.
        weights: keep the explanation's final channel weights (Opti-CAM's ``softmax(u*)``)
            in the ``channel_weights`` column (the class prior's calibration rows).
    """
    from opticam.metrics import faithfulness_terms, localization

    explanation = explainer(batch.images, batch.targets)
    maps = explanation.maps.detach()
    finite_maps = torch.isfinite(maps).flatten(1).all(dim=1)
    if not bool(finite_maps.all()):
        # Score a stand-in for the broken maps (the metrics refuse NaN) and drop their rows.
        maps = torch.where(finite_maps[:, None, None, None], maps, torch.zeros_like(maps))
    terms = _host(
        faithfulness_terms(loaded.model, batch.images, maps, batch.targets, p_clean=batch.p_clean)
    )
    curves = _host(_insertion_deletion(config.metrics, loaded.model, batch, maps))
    with_loc = config.metrics.localization and batch.has_boxes
    loc = _host(localization(maps, batch.boxes)) if with_loc else {}

    maps_np = maps[:, 0].float().cpu().numpy()
    low = explanation.saliency
    low_np = low[:, 0].detach().float().cpu().numpy() if low is not None else None
    diag = explanation.diagnostics
    iterations = diag["iterations"].cpu().numpy() if "iterations" in diag else None
    constant = diag["constant_map"].cpu().numpy() if "constant_map" in diag else None
    normalization = getattr(explainer, "normalization", None)
    channel = explanation.channel_weights if weights else None
    channel_np = None if channel is None else channel.detach().float().cpu().numpy()
    predicted = batch.predicted.cpu().numpy()
    targets = batch.targets.cpu().numpy()
    seconds = float(explanation.seconds) / max(len(batch.keys), 1)
    layer = loaded.target_layer_name if METHODS[method].uses_layer else None
    height, width = int(batch.images.shape[-2]), int(batch.images.shape[-1])
    keep_curves = bool(curves) and config.metrics.save_curves
    finite = finite_maps.cpu().numpy() & np.isfinite(terms["p_masked"])
    for name in ("insertion_auc", "deletion_auc"):
        if name in curves:
            finite &= np.isfinite(curves[name])

    # Per-image scores that are columns of the schema: the faithfulness terms (the
    # probabilities and the per-image AD/AG/AI terms) and the insertion/deletion AUCs.
    scores = {
        column: values
        for column, values in {**terms, **curves}.items()
        if column in store.SCHEMA.names and values.ndim == 1
    }
    localized = {column: loc[column] for column in LOCALIZATION_COLUMNS if column in loc}
    rows = []
    for i, key in enumerate(batch.keys):
        if not finite[i]:
            message = f"{method}: non-finite map or score (NaN or inf); no row for this image"
            errors.append(ErrorRecord(shard_url, key, STAGE_NONFINITE, message))
            continue
        blob, shape, fmt = store.encode_map(
            None if low_np is None else low_np[i], maps_np[i], normalization, config.map_format
        )
        # Every column of the schema, null unless set here; the scores by column name.
        row: dict[str, Any] = dict.fromkeys(store.SCHEMA.names)
        row.update(
            run_id=config.run_id,
            shard=shard_url,
            key=key,
            method=method,
            model=loaded.name,
            target_layer=layer,
            label=batch.labels[i],
            predicted=int(predicted[i]),
            target=int(targets[i]),
            iterations=None if iterations is None else int(iterations[i]),
            constant_map=bool(constant[i]) if constant is not None else False,
            seconds=seconds,
            map_bytes=blob,
            map_shape=shape,
            map_format=fmt,
            input_height=height,
            input_width=width,
            # Stored maps are already normalized for methods without a low-res form.
            normalization=normalization if fmt == "lowres" else (normalization or "none"),
        )
        for column, values in scores.items():
            row[column] = float(values[i])
        for column, values in localized.items():
            row[column] = _optional(float(values[i]))
        if channel_np is not None:
            row["channel_weights"] = channel_np[i].tolist()
        if keep_curves:
            row["insertion_curve"] = curves["insertion_curve"][i].tolist()
            row["deletion_curve"] = curves["deletion_curve"][i].tolist()
        rows.append(row)
    return rows
