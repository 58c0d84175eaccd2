"""Tests of opticam.metrics.aggregate: streaming means and bootstrap confidence intervals."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from opticam.metrics import MetricAggregator, bootstrap_ci, to_paper_units
from opticam.metrics.aggregate import _MAX_DRAWS_PER_BLOCK
from opticam.names import METRICS


def test_mean_matches_numpy_and_ci_contains_it() -> None:
    values = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    agg = MetricAggregator()
    agg.update({"average_drop": values})
    s = agg.summary()["average_drop"]
    assert s["mean"] == pytest.approx(float(np.mean(values)), abs=1e-12)
    assert s["n"] == 400
    assert s["ci_low"] < s["mean"] < s["ci_high"]
    # A 95% interval of a mean of 400 draws with sd 2 is about +-1.96 * 2 / 20 = +-0.196.
    assert s["ci_high"] - s["ci_low"] == pytest.approx(2 * 1.96 * values.std() / 20, rel=0.15)
    narrow = agg.summary(confidence=0.5)["average_drop"]
    assert s["ci_low"] < narrow["ci_low"] < narrow["ci_high"] < s["ci_high"]


def test_bootstrap_is_deterministic_with_a_seed() -> None:
    values = np.random.default_rng(1).random(50)
    first = bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) == first
    assert bootstrap_ci(values, seed=8) != first
    assert bootstrap_ci(torch.tensor(values), seed=7) == first
    # A metric's interval does not depend on the other metrics collected with it.
    agg = MetricAggregator()
    agg.update({"other": values[::-1].copy(), "f1": values})
    assert agg.summary(seed=7)["f1"] == first


def test_nan_rows_are_ignored_per_metric() -> None:
    agg = MetricAggregator()
    agg.update(
        {
            "pointing_game": torch.tensor([1.0, float("nan"), 0.0, 1.0]),
            "average_gain": torch.tensor([10.0, 20.0, 30.0, 40.0]),
        }
    )
    s = agg.summary()
    assert s["pointing_game"]["n"] == 3
    assert s["pointing_game"]["mean"] == pytest.approx(2 / 3)
    assert s["average_gain"]["n"] == 4
    assert s["average_gain"]["mean"] == pytest.approx(25.0)
    ci = bootstrap_ci([1.0, float("nan"), 0.0, 1.0])
    assert ci == s["pointing_game"]


def test_empty_and_single_value() -> None:
    empty = bootstrap_ci([float("nan"), float("nan")])
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in ("mean", "ci_low", "ci_high"))
    assert bootstrap_ci([0.25]) == {"mean": 0.25, "ci_low": 0.25, "ci_high": 0.25, "n": 1}
    constant = bootstrap_ci([2.0] * 10)
    assert constant["ci_low"] == constant["ci_high"] == 2.0


def test_streaming_in_chunks_equals_one_update() -> None:
    rng = np.random.default_rng(2)
    drop, gain = rng.random(101), rng.random(101)
    gain[[3, 50]] = np.nan
    whole = MetricAggregator()
    whole.update({"average_drop": drop, "average_gain": gain})
    chunked = MetricAggregator()
    for start in range(0, 101, 17):
        chunked.update(
            {
                "average_drop": torch.tensor(drop[start : start + 17]),
                "average_gain": list(gain[start : start + 17]),
            }
        )
    assert chunked.summary(n_boot=300) == whole.summary(n_boot=300)
    np.testing.assert_array_equal(chunked.values("average_gain"), gain)
    assert chunked.names == ["average_drop", "average_gain"]
    chunked.reset()
    assert chunked.summary() == {} and chunked.names == []


def test_large_samples_are_resampled_in_blocks() -> None:
    # More values than fit one block of resamples: the blocks must still cover n_boot.
    n = _MAX_DRAWS_PER_BLOCK // 40 + 1
    values = np.random.default_rng(3).random(n)
    s = bootstrap_ci(values, n_boot=100)
    assert s["n"] == n
    assert s["ci_low"] < s["mean"] < s["ci_high"]
    assert s["ci_high"] - s["ci_low"] < 0.01


def test_update_rejects_bad_rows() -> None:
    agg = MetricAggregator()
    with pytest.raises(ValueError, match="differ in length"):
        agg.update({"f1": [1.0, 2.0], "box_acc": [1.0]})
    with pytest.raises(ValueError, match="one value per image"):
        agg.update({"insertion": np.ones((2, 3))})
    with pytest.raises(ValueError, match="must hold numbers"):
        agg.update({"f1": ["a", object()]})  # type: ignore[list-item]
    with pytest.raises(KeyError, match="unknown metric 'f2'"):
        agg.values("f2")
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0, 2.0], n_boot=0)


def test_paper_units_and_directions() -> None:
    per_image: dict[str, Any] = {
        "p_clean": torch.tensor([0.9, 0.8]),
        "drop": torch.tensor([0.1, 0.0]),
        "gain": torch.tensor([0.0, 0.5]),
        "increase": torch.tensor([0.0, 1.0]),
        "insertion_auc": torch.tensor([0.6, 0.7]),
        "insertion_curve": torch.ones(2, 5),
        "seconds": [0.5, 0.25],
    }
    out = to_paper_units(per_image)
    assert set(out) == {
        "average_drop",
        "average_gain",
        "average_increase",
        "insertion",
        "seconds_per_image",
    }
    np.testing.assert_allclose(out["average_drop"], [10.0, 0.0])
    np.testing.assert_allclose(out["average_increase"], [0.0, 100.0])
    np.testing.assert_allclose(out["insertion"], [60.0, 70.0])
    np.testing.assert_allclose(out["seconds_per_image"], [0.5, 0.25])
    assert {m.direction for m in METRICS} == {"lower", "higher"}
    lower = {m.name for m in METRICS if m.direction == "lower"}
    assert lower == {"average_drop", "deletion", "loc_error", "seconds_per_image"}
    assert all(m.scale == (1.0 if m.column == "seconds" else 100.0) for m in METRICS)
