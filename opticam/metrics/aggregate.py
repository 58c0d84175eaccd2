"""Dataset-level summaries of per-image metrics: means with bootstrap confidence intervals.

The per-image functions (:mod:`.faithfulness`, :mod:`.localization`) return
fractions under per-image names (``drop``, ``insertion_auc``, ...). The summary
uses the paper's names and units: :func:`to_paper_units` maps one to the other
(percent), so that the mean of a column is the paper's number, e.g.
``mean(100 * drop) = AD``. Both names, the scale and the direction of every metric
come from the one table :data:`opticam.names.METRICS`. :class:`MetricAggregator`
streams such columns, batch after batch, and summarises each as its mean with a
percentile bootstrap confidence interval. NaN rows (e.g. localization on an image without boxes)
are left out per metric, and ``n`` says how many rows were used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict

import numpy as np
import torch
from torch import Tensor

from opticam.errors import short_repr
from opticam.names import METRICS_BY_COLUMN

__all__ = [
    "MetricSummary",
    "to_paper_units",
    "bootstrap_ci",
    "MetricAggregator",
]


# Bootstrap resamples are drawn in blocks of at most this many indices, so memory stays
# bounded (32 MiB of int64) however many images there are.
_MAX_DRAWS_PER_BLOCK = 1 << 22

ArrayLike = Tensor | np.ndarray | Sequence[float] | float


class MetricSummary(TypedDict):
    """Summary of one metric: mean, confidence interval and number of non-NaN rows."""

    mean: float
    ci_low: float
    ci_high: float
    n: int


def _to_numpy(values: ArrayLike, name: str) -> np.ndarray:
    """1-D float64 copy of ``values`` (a 0-d value counts as one row)."""
    if isinstance(values, Tensor):
        array = values.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"metric {short_repr(name)} must hold numbers (tensor, array or list), "
                f"got {type(values).__name__}"
            ) from error
    if array.ndim > 1:
        raise ValueError(
            f"metric {short_repr(name)} must be one value per image (1-D), got {array.shape}"
        )
    return array.reshape(-1)


def to_paper_units(per_image: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    """Rename and rescale per-image columns to the paper's summary metrics.

    For every :class:`opticam.names.Metric` ``m``, the column ``m.column`` becomes
    ``m.name`` with ``values * m.scale``: ``drop -> average_drop``, ``gain ->
    average_gain``, ``increase -> average_increase``, ``insertion_auc -> insertion``,
    ``deletion_auc -> deletion`` and the localization columns keep their names, all times
    100 (percent); ``seconds -> seconds_per_image`` times 1. Keys not in
    :data:`opticam.names.METRICS_BY_COLUMN` (``p_clean``, curves, ...) are left out.

    Args:
        per_image: per-image columns, e.g. the dicts returned by the metric functions.

    Returns:
        Dict of 1-D float64 arrays keyed by summary metric name.
    """
    out: dict[str, np.ndarray] = {}
    for key, values in per_image.items():
        metric = METRICS_BY_COLUMN.get(key)
        if metric is not None:
            out[metric.name] = _to_numpy(values, key) * metric.scale
    return out


def bootstrap_ci(
    values: ArrayLike, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> MetricSummary:
    """Mean of ``values`` with a percentile bootstrap confidence interval.

    NaN values are dropped first. ``n_boot`` resamples of size ``n`` are drawn with
    replacement (``numpy.random.default_rng(seed)``), their means ``m_1..m_{n_boot}``
    computed, and the interval is their ``(1 - confidence)/2`` and ``(1 + confidence)/2``
    quantiles (numpy's linear interpolation). The result depends only on the values,
    ``n_boot`` and ``seed``.

    Args:
        values: 1-D values (tensor, array or list).
        confidence: coverage in (0, 1).
        n_boot: number of bootstrap resamples, >= 1.
        seed: seed of the resampling generator.

    Returns:
        ``{"mean", "ci_low", "ci_high", "n"}``; mean and bounds are NaN when ``n == 0``,
        and the bounds equal the mean when ``n == 1``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {short_repr(confidence)}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {short_repr(n_boot)}")
    array = _to_numpy(values, "values")
    array = array[~np.isnan(array)]
    n = int(array.size)
    if n == 0:
        nan = float("nan")
        return {"mean": nan, "ci_low": nan, "ci_high": nan, "n": 0}
    mean = float(array.mean())
    if n == 1:
        return {"mean": mean, "ci_low": mean, "ci_high": mean, "n": 1}

    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    rows = max(1, min(n_boot, _MAX_DRAWS_PER_BLOCK // n))
    for start in range(0, n_boot, rows):
        count = min(rows, n_boot - start)
        means[start : start + count] = array[rng.integers(0, n, size=(count, n))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": mean, "ci_low": float(low), "ci_high": float(high), "n": n}


class MetricAggregator:
    """Streaming collector of per-image metrics, summarised with bootstrap CIs.

    Example::

        agg = MetricAggregator()
        for batch in batches:
            agg.update(to_paper_units(faithfulness_terms(...)))
        agg.summary()  # {"average_drop": {"mean": ..., "ci_low": ..., "ci_high": ..., "n": ...}}

    Values are copied to the CPU as float64 at ``update`` (one transfer per metric and
    batch). Streaming the rows in any chunking gives the same summary as one update.
    """

    def __init__(self) -> None:
        self._chunks: dict[str, list[np.ndarray]] = {}

    def update(self, values: Mapping[str, ArrayLike]) -> None:
        """Append one batch of per-image values.

        Args:
            values: metric name -> 1-D values (tensor on any device, array, list or a
                single number). All entries of one update must have the same length.
                NaN marks a row where the metric is undefined.
        """
        arrays = {name: _to_numpy(v, name) for name, v in values.items()}
        lengths = {name: a.size for name, a in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"per-image metrics in one update differ in length: {lengths}")
        for name, array in arrays.items():
            self._chunks.setdefault(name, []).append(array)

    @property
    def names(self) -> list[str]:
        """Metric names seen so far, in the order they first appeared."""
        return list(self._chunks)

    def values(self, name: str) -> np.ndarray:
        """All rows of one metric, NaNs included, as a 1-D float64 array."""
        if name not in self._chunks:
            raise KeyError(
                f"unknown metric {short_repr(name)} (seen: {', '.join(self._chunks) or 'none'})"
            )
        return np.concatenate(self._chunks[name])

    def summary(
        self, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0
    ) -> dict[str, MetricSummary]:
        """Mean, percentile bootstrap CI and count of every metric (see :func:`bootstrap_ci`).

        Each metric is resampled with its own generator seeded by ``seed``, so a metric's
        interval does not depend on which other metrics were collected.

        Returns:
            metric name -> ``{"mean", "ci_low", "ci_high", "n"}``, NaN rows ignored.
        """
        return {
            name: bootstrap_ci(self.values(name), confidence=confidence, n_boot=n_boot, seed=seed)
            for name in self._chunks
        }

    def reset(self) -> None:
        """Forget every value collected."""
        self._chunks.clear()
