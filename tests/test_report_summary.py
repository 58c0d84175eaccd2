"""opticam.report.summary: means and intervals against numpy, grouping, missing values, tables."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from report_run import METHODS, _column

from opticam.report import SUMMARY_SCHEMA, format_table, summarize, summary_markdown


def test_summary_means_match_numpy(full_run, full_report) -> None:
    _, rows = full_run
    summary = {r["method"]: r for r in full_report.summary}
    assert [r["method"] for r in full_report.summary] == list(METHODS)  # config order
    for method in METHODS:
        got = summary[method]
        assert got["model"] == "demo"
        assert got["images"] == 18
        expected = {
            "average_drop": 100 * np.mean(_column(rows, method, "drop")),
            "average_gain": 100 * np.mean(_column(rows, method, "gain")),
            "average_increase": 100 * np.mean(_column(rows, method, "increase")),
            "insertion": 100 * np.nanmean(_column(rows, method, "insertion_auc")),
            "deletion": 100 * np.nanmean(_column(rows, method, "deletion_auc")),
            "pointing_game": 100 * np.nanmean(_column(rows, method, "pointing_game")),
            "energy_in_box": 100 * np.nanmean(_column(rows, method, "energy_in_box")),
            "f1": 100 * np.nanmean(_column(rows, method, "f1")),
            "loc_error": 100 * np.nanmean(_column(rows, method, "loc_error")),
            "box_acc": 100 * np.nanmean(_column(rows, method, "box_acc")),
            "seconds_per_image": np.mean(_column(rows, method, "seconds")),
        }
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
            assert got[f"{name}_ci_low"] <= got[name] <= got[f"{name}_ci_high"], name
        # Images with boxes: even indices (9 of 18); constant maps: one gradcam row.
        assert got["images_with_boxes"] == 9
        assert got["constant_maps"] == (1 if method == "gradcam" else 0)
    assert full_report.summary[0]["run_id"] == rows[0]["run_id"]


def test_summarize_groups_by_model_and_method() -> None:
    import pyarrow as pa

    rows = {
        "model": ["a", "a", "b", "b", "b"],
        "method": ["gradcam", "opticam", "gradcam", "gradcam", "fakecam"],
        "drop": [0.5, 0.0, 0.2, 0.4, 0.1],
        "gain": [0.0, 0.8, 0.1, 0.3, 0.0],
        "increase": [0.0, 1.0, 1.0, 0.0, 0.0],
        "seconds": [1.0, 2.0, 3.0, 5.0, 0.5],
        "constant_map": [False, False, True, False, False],
    }
    for name in (
        "insertion_auc",
        "deletion_auc",
        "pointing_game",
        "energy_in_box",
        "f1",
        "loc_error",
        "box_acc",
    ):
        rows[name] = [None] * 5
    table = pa.table(rows)
    summary = summarize(table, method_order=["opticam", "gradcam"], n_boot=50)
    keys = [(r["model"], r["method"]) for r in summary]
    assert keys == [("a", "opticam"), ("a", "gradcam"), ("b", "gradcam"), ("b", "fakecam")]
    b_gradcam = summary[2]
    assert b_gradcam["images"] == 2
    assert b_gradcam["average_drop"] == pytest.approx(30.0)
    assert b_gradcam["average_increase"] == pytest.approx(50.0)
    assert b_gradcam["seconds_per_image"] == pytest.approx(4.0)
    assert b_gradcam["constant_maps"] == 1
    assert b_gradcam["insertion"] is None and b_gradcam["insertion_ci_low"] is None
    assert b_gradcam["images_with_boxes"] == 0
    # One image: the interval collapses onto the mean.
    single = summary[0]
    assert single["average_gain"] == single["average_gain_ci_low"] == pytest.approx(80.0)
    assert set(single) == set(SUMMARY_SCHEMA.names)


def _summary_row(method: str, drop: float | None, seconds: float) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(SUMMARY_SCHEMA.names)
    row.update(model="demo", method=method, images=10, images_with_boxes=0, constant_maps=0)
    if drop is not None:
        row.update(average_drop=drop, average_drop_ci_low=drop - 1, average_drop_ci_high=drop + 2)
    row.update(
        seconds_per_image=seconds,
        seconds_per_image_ci_low=seconds,
        seconds_per_image_ci_high=seconds,
    )
    return row


def test_markdown_and_terminal_tables() -> None:
    rows = [_summary_row("opticam", 1.25, 0.5), _summary_row("fakecam", None, 0.001234)]
    assert summary_markdown(rows) == (
        "| method | images | AD ↓ | s/img ↓ |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| opticam | 10 | 1.2 \\[0.2, 3.2\\] | 0.5 \\[0.5, 0.5\\] |\n"
        "| fakecam | 10 | – | 0.00123 \\[0.00123, 0.00123\\] |\n"
    )
    assert summary_markdown(rows, with_ci=False).splitlines()[2] == "| opticam | 10 | 1.2 | 0.5 |"
    text = format_table(rows, with_ci=False)
    assert text == (
        "method   images  AD ↓  s/img ↓\n"
        "-------  ------  ----  -------\n"
        "opticam      10   1.2      0.5\n"
        "fakecam      10     –  0.00123\n"
    )
    assert format_table([]) == "(no results yet)\n"
    two_models = [rows[0], {**rows[1], "model": "resnet"}]
    assert summary_markdown(two_models).startswith("| model | method |")


def test_missing_values_are_left_out_and_empty_metrics_are_none() -> None:
    """Null and NaN per-image values are excluded from a mean (not counted as 0), and a
    metric without any value is None, never NaN: the summary is strict JSON."""
    import pyarrow as pa

    rows = {
        "model": ["m"] * 4,
        "method": ["opticam"] * 4,
        "drop": [0.1, 0.3, 0.2, 0.2],
        "gain": [0.0, 0.4, 0.0, 0.0],
        "increase": [0.0, 1.0, 0.0, 1.0],
        "insertion_auc": [0.5, None, 0.7, float("nan")],
        "deletion_auc": [0.1, 0.2, 0.3, 0.4],
        "pointing_game": [1.0, 0.0, None, None],
        "seconds": [1.0, 1.0, 1.0, 1.0],
        "constant_map": [False, True, False, False],
    }
    for name in ("energy_in_box", "f1", "loc_error", "box_acc"):
        rows[name] = [None] * 4
    (summary,) = summarize(pa.table(rows), n_boot=200)
    assert summary["insertion"] == pytest.approx(60.0)  # (50 + 70) / 2, not / 4
    assert summary["pointing_game"] == pytest.approx(50.0)
    assert summary["images_with_boxes"] == 2
    assert summary["average_drop"] == pytest.approx(20.0)
    assert summary["insertion_ci_low"] <= 60.0 <= summary["insertion_ci_high"]
    for name in ("energy_in_box", "f1", "loc_error", "box_acc"):
        assert summary[name] is None
        assert summary[f"{name}_ci_low"] is None and summary[f"{name}_ci_high"] is None
    json.dumps(summary, allow_nan=False)  # the CLI and Prefect artifacts take it as JSON


def test_summary_metrics_are_the_one_table() -> None:
    from opticam.names import METRICS
    from opticam.report.summary import SOURCE_COLUMNS, better, metric_header

    assert (*(m.column for m in METRICS), "constant_map") == SOURCE_COLUMNS
    assert [metric_header(m) for m in METRICS][:3] == ["AD ↓", "AG ↑", "AI ↑"]
    assert metric_header("seconds_per_image") == "s/img ↓"
    assert better("insertion") == "higher is better" and better("deletion") == "lower is better"
    with pytest.raises(KeyError, match="unknown metric 'drop' .*average_drop"):
        better("drop")  # a per-image column, not a summary name
    names = SUMMARY_SCHEMA.names
    for m in METRICS:  # a mean and its interval per metric, under the summary name
        assert {m.name, f"{m.name}_ci_low", f"{m.name}_ci_high"} <= set(names)
