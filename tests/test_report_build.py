"""opticam.report.build: the files of a report, partial and empty runs, missing data, S3."""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from report_run import METHODS, _column, _parse, _read, make_synthetic_run

from opticam import store
from opticam.report import SUMMARY_SCHEMA, build_report, summarize
from opticam.report.build import _mean_curve, _preprocess_options, _resize_size


def test_report_is_deterministic_and_seeded(full_run, full_report) -> None:
    run, _ = full_run
    before = {url: _read(url) for url in full_report.files}
    again = build_report(run, n_boot=200, seed=0)
    assert again.summary == full_report.summary
    assert again.files == full_report.files
    for url in again.files:  # byte for byte: page, tables and every figure
        assert _read(url) == before[url], url
    other = summarize(store.read_rows(run), method_order=METHODS, n_boot=200, seed=1)
    assert other[0]["average_drop"] == full_report.summary[0]["average_drop"]
    assert other[0]["average_drop_ci_low"] != full_report.summary[0]["average_drop_ci_low"]


def test_report_files_exist(full_run, full_report) -> None:
    run, _ = full_run
    folder = f"{run}/report"
    assert full_report.index_url == f"{folder}/index.html"
    assert full_report.files[-1] == full_report.index_url  # written last
    names = {f[len(folder) + 1 :] for f in full_report.files}
    assert names == {
        "index.html",
        "summary.md",
        "summary.parquet",
        "figures/faithfulness.png",
        "figures/insertion_deletion.png",
        "figures/localization.png",
        "figures/curves.png",
        "figures/distributions.png",
        "figures/gallery.png",
    }
    for url in full_report.files:
        assert os.path.getsize(url) > 0
        if url.endswith(".png"):
            with Image.open(url) as image:
                assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_summary_parquet_and_markdown(full_run, full_report) -> None:
    run, _ = full_run
    table = pq.read_table(f"{run}/report/summary.parquet")
    assert table.schema.equals(SUMMARY_SCHEMA, check_metadata=False)
    assert table.to_pylist() == full_report.summary

    markdown = _read(f"{run}/report/summary.md").decode("utf-8")
    assert markdown.startswith(f"# Opti-CAM summary — {full_report.summary[0]['run_id']}\n")
    assert markdown.endswith(full_report.summary_markdown)
    assert "Model: demo\n" in markdown
    assert json.loads(table.schema.metadata[b"opticam.bootstrap"]) == {
        "confidence": 0.95,
        "n_boot": 200,
        "seed": 0,
    }
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table_lines[0].strip("|").split("|")]
    assert header[:3] == ["method", "images", "AD ↓"]
    assert header[3:6] == ["AG ↑", "AI ↑", "Ins ↑"]
    assert "Del ↓" in header and "LE ↓" in header and "s/img ↓" in header
    assert len(table_lines) == 2 + len(METHODS)
    opticam = full_report.summary[0]
    cells = [c.strip() for c in table_lines[2].strip("|").split("|")]
    assert cells[0] == "opticam" and cells[1] == "18"
    ad = (opticam["average_drop"], opticam["average_drop_ci_low"], opticam["average_drop_ci_high"])
    assert cells[2] == f"{ad[0]:.1f} \\[{ad[1]:.1f}, {ad[2]:.1f}\\]"  # [ escaped: never a link
    assert "do-not-show-me" not in markdown


def test_preprocess_options_sources() -> None:
    defaults = {"interpolation": "bilinear", "resize_mode": "shorter", "crop_rounding": "round"}
    assert _preprocess_options(None, []) == defaults
    # Statuses from before the settings were recorded: the spec, then the old behaviour.
    old = [{"name": "a", "resize_size": 256}]
    assert _preprocess_options({"config": {"model": {"source": "demo"}}}, old) == defaults
    spec = {"config": {"model": {"source": "f:a:b", "interpolation": "box", "resize_mode": None}}}
    assert _preprocess_options(spec, old) == {**defaults, "interpolation": "box"}
    recorded = [{**old[0], "interpolation": "bicubic", "resize_mode": "squash"}]
    recorded[0]["crop_rounding"] = "floor"
    assert _preprocess_options(spec, recorded) == {
        "interpolation": "bicubic",
        "resize_mode": "squash",
        "crop_rounding": "floor",
    }


def test_report_builds_when_data_is_gone(tmp_path) -> None:
    run, _ = make_synthetic_run(str(tmp_path), shards=1, per_shard=4)
    for name in os.listdir(tmp_path / "data"):
        os.remove(tmp_path / "data" / name)
    result = build_report(run, n_boot=20)
    text = _read(result.index_url).decode("utf-8")
    assert "not shown" in text
    assert f"{run}/report/figures/gallery.png" in result.files  # maps alone
    assert len(result.summary) == 2


def test_resize_size_sources() -> None:
    def run_json(**model: Any) -> dict[str, Any]:
        return {"config": {"model": model}}

    recorded = [{"name": "a", "resize_size": 256}]
    assert _resize_size(run_json(source="torchvision:resnet50"), recorded) == (256, True)
    assert _resize_size(run_json(source="torchvision:vgg16", resize_size=232), []) == (232, True)
    assert _resize_size(run_json(source="demo"), []) == (128, True)
    assert _resize_size(run_json(source="factory:pkg.mod:fn"), []) == (None, True)
    assert _resize_size(run_json(source="torchvision:resnet50"), []) == (None, False)
    assert _resize_size(None, []) == (None, False)


def test_partial_run(tmp_path) -> None:
    run, rows = make_synthetic_run(str(tmp_path), shards=3, per_shard=4, finished=2)
    # The third shard failed: an errors file without a rows file.
    third = store.read_run_json(run)["shards"][2]["url"]
    status = store.ShardStatus(shard=third, name=store.shard_name(third))
    failure = {"shard": third, "key": None, "stage": "open", "message": "cannot open shard"}
    store.write_errors(run, rows[0]["run_id"], [failure], status)
    result = build_report(run, n_boot=20, gallery_size=2)
    assert [r["images"] for r in result.summary] == [8, 8]
    assert result.summary[0]["average_drop"] == pytest.approx(
        100 * np.mean(_column(rows, "opticam", "drop")), rel=1e-12
    )
    text = _read(result.index_url).decode("utf-8")
    assert "Partial run: 2 of 3 shards" in text
    assert "<td>shards finished</td><td>2 of 3</td>" in text
    assert "<td>shards failed (no rows yet)</td><td>1</td>" in text
    assert "<td>error rows</td><td>2</td>" in text
    assert "cannot open shard" in text
    assert "Partial run: 2 of 3 shards" in result.summary_markdown


def test_empty_run_gives_valid_report(tmp_path) -> None:
    run, _ = make_synthetic_run(str(tmp_path), shards=2, per_shard=2, finished=0)
    result = build_report(run)
    assert result.summary == []
    folder = f"{run}/report"
    assert sorted(result.files) == sorted(
        [f"{folder}/index.html", f"{folder}/summary.md", f"{folder}/summary.parquet"]
    )
    table = pq.read_table(f"{folder}/summary.parquet")
    assert table.num_rows == 0 and table.schema.equals(SUMMARY_SCHEMA, check_metadata=False)
    text = _read(result.index_url).decode("utf-8")
    parsed = _parse(text)
    assert parsed.body_rows == 0 and parsed.headers == ["method", "images"]
    assert "No results yet" in text
    assert "(no results yet)" in result.summary_markdown


def test_folder_without_anything(tmp_path) -> None:
    result = build_report(str(tmp_path / "nothing-here"))
    assert result.summary == []
    assert "no run.json" in _read(result.index_url).decode("utf-8")


def test_stale_figures_are_removed(tmp_path) -> None:
    run, _ = make_synthetic_run(str(tmp_path), shards=1, per_shard=3)
    first = build_report(run, n_boot=20, gallery_size=2)
    assert f"{run}/report/figures/gallery.png" in first.files
    second = build_report(run, n_boot=20, gallery_size=0)
    assert f"{run}/report/figures/gallery.png" not in second.files
    assert not os.path.exists(f"{run}/report/figures/gallery.png")
    assert "gallery.png" not in _read(second.index_url).decode("utf-8")


@pytest.mark.e2e
def test_report_on_s3(s3_bucket, s3_storage_options) -> None:
    run, rows = make_synthetic_run(
        f"{s3_bucket}/exp", shards=2, per_shard=3, storage_options=s3_storage_options
    )
    result = build_report(run, storage_options=s3_storage_options, n_boot=20, gallery_size=2)
    assert result.index_url.startswith("s3://")
    fs = fsspec.filesystem("s3", **s3_storage_options)
    for url in result.files:
        assert fs.size(url) > 0
    text = fs.cat(result.index_url).decode("utf-8")
    assert '<table id="summary">' in text
    assert "not shown" not in text  # inputs read back from S3 data shards
    assert result.summary[1]["average_gain"] == pytest.approx(
        100 * np.mean(_column(rows, "gradcam", "gain")), rel=1e-12
    )


def test_mean_curve_handles_nulls_and_lengths() -> None:
    import pyarrow as pa

    same = pa.chunked_array([pa.array([[0.0, 1.0, 0.5], None, [1.0, 0.0, 0.5]])])
    np.testing.assert_allclose(_mean_curve(same), [0.5, 0.5, 0.5])
    mixed = pa.chunked_array([pa.array([[0.0, 1.0], [0.0, 0.5, 1.0]])])
    np.testing.assert_allclose(_mean_curve(mixed), [0.0, 0.5, 1.0])
    assert _mean_curve(pa.chunked_array([pa.array([None], pa.list_(pa.float32()))])) is None


def test_invalid_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="gallery_size"):
        build_report(str(tmp_path), gallery_size=-1)
    with pytest.raises(ValueError, match="n_boot"):
        build_report(str(tmp_path), n_boot=0)
