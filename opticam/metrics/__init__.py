"""Metrics of saliency maps: faithfulness, localization and dataset-level aggregation.

Faithfulness is AD/AG/AI and insertion/deletion; aggregation gives bootstrap confidence
intervals.

All per-image functions take and return torch tensors on the inputs' device; see
``METHOD.md`` sections 2-4 for the definitions.
"""

from opticam.metrics.aggregate import (
    MetricAggregator,
    MetricSummary,
    bootstrap_ci,
    to_paper_units,
)
from opticam.metrics.faithfulness import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BLUR_KERNEL,
    DEFAULT_BLUR_SIGMA,
    DEFAULT_CPU_BATCH_SIZE,
    DEFAULT_STEPS,
    MAP_TOLERANCE,
    average_drop,
    average_gain,
    average_increase,
    class_probabilities,
    curve_auc,
    faithfulness_terms,
    gaussian_blur,
    insertion_deletion,
    saliency_ranks,
)
from opticam.metrics.localization import (
    LOCALIZATION_METRICS,
    box_iou,
    boxes_union_mask,
    largest_component_box,
    localization,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CPU_BATCH_SIZE",
    "DEFAULT_BLUR_KERNEL",
    "DEFAULT_BLUR_SIGMA",
    "DEFAULT_STEPS",
    "LOCALIZATION_METRICS",
    "MAP_TOLERANCE",
    "MetricAggregator",
    "MetricSummary",
    "average_drop",
    "average_gain",
    "average_increase",
    "bootstrap_ci",
    "box_iou",
    "boxes_union_mask",
    "class_probabilities",
    "curve_auc",
    "faithfulness_terms",
    "gaussian_blur",
    "insertion_deletion",
    "largest_component_box",
    "localization",
    "saliency_ranks",
    "to_paper_units",
]
