"""Tests of opticam.report: summary numbers, files, HTML, gallery, partial/empty runs, S3.

A small synthetic run is written with the real store functions (run.json, rows and errors
Parquet files) next to a tiny data shard set written with ShardWriter, so the gallery
reads real inputs back. Expected numbers are recomputed here with numpy from the rows.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from html.parser import HTMLParser
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from opticam import store
from opticam.config import RunConfig
from opticam.data import Preprocess, ShardReader
from opticam.data.writer import ShardWriter
from opticam.report import (
    SUMMARY_SCHEMA,
    build_report,
    format_table,
    summarize,
    summary_markdown,
)
from opticam.report.build import _mean_curve, _preprocess_options, _resize_size
from opticam.report.colors import colorize, overlay
from opticam.report.gallery import Gallery, GalleryItem, build_gallery, choose_gallery_images
from opticam.report.page import Figure, PageContent, redact, render_index

METHODS = ("opticam", "gradcam")
INPUT = 32  # model input side of the synthetic run
STEPS = 8  # insertion/deletion steps: curves have STEPS + 1 points


# --------------------------------------------------------------------------- synthetic run


def _image_bytes(rng: np.random.Generator, width: int, height: int) -> bytes:
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_synthetic_run(
    root: str,
    *,
    shards: int = 3,
    per_shard: int = 6,
    finished: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    model: str = "demo",
    resize_size: int | None = INPUT,
    keys: Sequence[str] | None = None,
    methods: Sequence[str] = METHODS,
    models: Sequence[str] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Write data shards and a run with ``finished`` (default: all) shards done.

    Per image and method the row has random fractions; every third image has no
    insertion/deletion (null); images with an even index have a box (localization values),
    the others null. The first method's maps are stored low-res (4x4), the others' as full
    PNGs.

    ``keys`` (one per image, default ``img0000``, ...), ``methods`` and ``models`` (default:
    ``model`` alone) name what the rows hold; run.json always describes ``model`` and
    :data:`METHODS`, the only names a :class:`RunConfig` accepts.

    Returns:
        ``(run_url, rows)``: the run folder and every row written (as dicts).
    """
    rng = np.random.default_rng(seed)
    options = dict(storage_options or {})
    data_pattern = f"{root}/data/shard-%06d.tar"
    samples = []
    with ShardWriter(data_pattern, per_shard, storage_options=options) as writer:
        for i in range(shards * per_shard):
            width, height = 40 + (i % 3) * 4, 36
            boxes = [[4.0, 6.0, 20.0, 30.0]] if i % 2 == 0 else []
            label = int(i % 5)
            key = f"img{i:04d}" if keys is None else keys[i]
            writer.write(
                {
                    "__key__": key,
                    "png": _image_bytes(rng, width, height),
                    "json": {"label": label, "boxes": boxes},
                }
            )
            samples.append((i, key, label, boxes))
    data_urls = writer.urls
    config = RunConfig(
        data=f"{root}/data/shard-{{000000..{shards - 1:06d}}}.tar",
        output=f"{root}/runs",
        model={"source": model, "input_size": INPUT, "resize_size": resize_size},
        methods=list(METHODS),
        metrics={"steps": STEPS},
        storage_options={"key": "AKIA-not-real", "secret": "do-not-show-me"},
    )
    run = store.run_url(config.output, config.run_id)
    planned = [{"url": u, "name": store.shard_name(u), "max_images": None} for u in data_urls]
    store.write_run_json(run, config, planned, storage_options=options)

    all_rows = []
    done = shards if finished is None else finished
    for s, shard in enumerate(data_urls[:done]):
        rows = []
        for (i, key, label, boxes), row_model, method in itertools.product(
            samples[s * per_shard : (s + 1) * per_shard], models or (model,), methods
        ):
            p_clean = float(rng.uniform(0.05, 0.95))
            p_masked = float(rng.uniform(0.0, 1.0))
            if method == methods[0]:
                lowres = rng.random((4, 4)).astype(np.float32)
                saliency = store.encode_lowres(lowres, "range")
                shape, kind = [4, 4], "lowres"
            else:
                full = rng.random((INPUT, INPUT))
                saliency = store.encode_full_png(full)
                shape, kind = [INPUT, INPUT], "full_png"
            with_curves = i % 3 != 0
            located = bool(boxes)
            row = {
                "run_id": config.run_id,
                "shard": shard,
                "key": key,
                "method": method,
                "model": row_model,
                "target_layer": "features.3" if method != "fakecam" else None,
                "label": label,
                "predicted": int((label + i) % 5),
                "target": label,
                "p_clean": p_clean,
                "p_masked": p_masked,
                "drop": max(0.0, p_clean - p_masked) / p_clean,
                "gain": max(0.0, p_masked - p_clean) / (1.0 - p_clean),
                "increase": float(p_clean < p_masked),
                "insertion_auc": float(rng.random()) if with_curves else None,
                "deletion_auc": float(rng.random()) if with_curves else None,
                "insertion_curve": rng.random(STEPS + 1).tolist() if with_curves else None,
                "deletion_curve": rng.random(STEPS + 1).tolist() if with_curves else None,
                "pointing_game": float(rng.integers(0, 2)) if located else None,
                "energy_in_box": float(rng.random()) if located else None,
                "f1": float(rng.random()) if located else None,
                "loc_error": float(rng.random()) if located else None,
                "box_acc": float(rng.integers(0, 2)) if located else None,
                "iterations": 100 if method == "opticam" else None,
                "constant_map": bool(i == 1 and method == "gradcam"),
                "seconds": float(rng.uniform(0.01, 0.2)),
                "saliency": saliency,
                "saliency_shape": shape,
                "map_format": kind,
                "input_height": INPUT,
                "input_width": INPUT,
                "normalization": "range",
            }
            rows.append(row)
        status = store.ShardStatus(shard=shard, name=store.shard_name(shard), n_rows=len(rows))
        errors = []
        if s == 0:
            errors.append(
                {"shard": shard, "key": "broken", "stage": "decode", "message": "bad <jpg>"}
            )
        store.write_errors(run, config.run_id, errors, status, storage_options=options)
        store.write_shard(run, store.rows_to_table(rows), status, storage_options=options)
        all_rows += rows
    return run, all_rows


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    return make_synthetic_run(str(tmp_path_factory.mktemp("full")))


@pytest.fixture(scope="module")
def full_report(full_run: tuple[str, list[dict[str, Any]]]) -> Any:
    return build_report(full_run[0], n_boot=200, seed=0)


def _column(rows: list[dict[str, Any]], method: str, name: str) -> np.ndarray:
    values = [r[name] for r in rows if r["method"] == method]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _read(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


class _Collector(HTMLParser):
    """Collects tags with their attributes, and the summary table's structure."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.table_depth = 0
        self.section: str | None = None
        self.body_rows = 0
        self.headers: list[str] = []
        self.text: list[str] = []  # every text node, character references resolved
        self._in_th = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "table" and attributes.get("id") == "summary":
            self.table_depth = 1
        elif self.table_depth:
            if tag in ("thead", "tbody"):
                self.section = tag
            elif tag == "tr" and self.section == "tbody":
                self.body_rows += 1
            elif tag == "th":
                self._in_th = True
                self.headers.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self.table_depth:
            self.table_depth = 0
        if tag == "th":
            self._in_th = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_th and self.table_depth:
            self.headers[-1] += data


def _parse(html_text: str) -> _Collector:
    collector = _Collector()
    collector.feed(html_text)
    return collector


# --------------------------------------------------------------------------- summary


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


# --------------------------------------------------------------------------- files


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


def test_html_is_self_contained(full_run, full_report) -> None:
    run, _ = full_run
    text = _read(full_report.index_url).decode("utf-8")
    parsed = _parse(text)
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == 6  # five figures and the gallery
    for attrs in images:
        src = attrs["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    tags = {tag for tag, _ in parsed.tags}
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    for _, attrs in parsed.tags:
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not value.startswith(("http:", "https:", "//")), value
    links = {attrs.get("href") for tag, attrs in parsed.tags if tag == "a"}
    assert {"summary.md", "summary.parquet"} <= links
    assert parsed.body_rows == len(METHODS)
    assert parsed.headers[:3] == ["method", "images", "AD ↓"]
    assert "AG ↑" in parsed.headers and "Del ↓" in parsed.headers
    # Config shown without secrets; error counts shown.
    assert "do-not-show-me" not in text and "AKIA-not-real" not in text
    shown = "".join(parsed.text)
    assert '"steps": 8' in shown
    assert "bad <jpg>" in shown and "bad <jpg>" not in text  # escaped error message
    assert "error rows" in text


HOSTILE = '<script>alert("x")</script> & \'"><img src=x onerror=alert(1)>'


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_text_from_the_run_is_never_markup() -> None:
    # Every place where data from the run reaches the page: method and model names, keys,
    # shard URLs, stages, error messages, notes, config values and package versions.
    png = _tiny_png()
    row = {"model": f"m{HOSTILE}", "method": f"opticam{HOSTILE}", "images": 3}
    row.update(average_drop=1.0, average_drop_ci_low=0.5, average_drop_ci_high=1.5)
    other = {**row, "model": "plain", "method": "gradcam"}
    item = GalleryItem(
        shard=f"s3://b/{HOSTILE}.tar", key=f"k{HOSTILE}", label=1, predicted=1, target=1
    )
    content = PageContent(
        run_id=f"run{HOSTILE}",
        run_url=f"s3://bucket/{HOSTILE}",
        run_json={
            "config": {"model": {"source": f"demo{HOSTILE}"}, "note": HOSTILE},
            "versions": {f"pkg{HOSTILE}": HOSTILE},
        },
        summary=[row, other],
        counts=[(f"count{HOSTILE}", HOSTILE)],
        notes=[f"note{HOSTILE}"],
        figures=[Figure("faithfulness.png", f"title{HOSTILE}", f"caption{HOSTILE}", png)],
        gallery=Gallery(f"model{HOSTILE}", [f"opticam{HOSTILE}"], [item], [HOSTILE], png),
        errors_by_stage={f"stage{HOSTILE}": 1},
        error_rows=[
            {"shard": f"s3://b/{HOSTILE}", "key": HOSTILE, "stage": "decode", "message": HOSTILE}
        ],
    )
    text = render_index(content)
    parsed = _parse(text)
    tags = [tag for tag, _ in parsed.tags]
    assert "script" not in tags
    assert tags.count("img") == 2  # the figure and the gallery, nothing injected
    assert not any(name.startswith("on") for _, attrs in parsed.tags for name in attrs)
    assert "<script>" not in text and 'alert("x")' not in text
    # The text reads exactly as given, once the page's character references are resolved.
    shown = "".join(parsed.text)
    for expected in (
        f"opticam{HOSTILE}",
        f"m{HOSTILE}",
        f"note{HOSTILE}",
        f"count{HOSTILE}",
        f"stage{HOSTILE}",
        f"k{HOSTILE}",
        f"caption{HOSTILE}",
        f"Opti-CAM report — run{HOSTILE}",
        json.dumps(HOSTILE),  # the config, as JSON
        f"pkg{HOSTILE}",
        f"s3://bucket/{HOSTILE}",
    ):
        assert expected in shown, expected
    alts = [attrs.get("alt") for tag, attrs in parsed.tags if tag == "img"]
    assert alts == [f"title{HOSTILE}", f"saliency maps of k{HOSTILE}"]
    titles = [attrs.get("title") for tag, attrs in parsed.tags if tag == "th" and "title" in attrs]
    assert titles == ["Average Drop: lower is better"]


def test_redact_removes_secret_looking_values() -> None:
    config = {
        "data": "s3://user:hunter2@bucket/x.tar",
        "storage_options": {"key": "k"},
        "nested": [{"aws_secret_access_key": "s", "token": "t", "target_layer": "layer4"}],
    }
    public = redact(config)
    assert public["data"] == "s3://user:<redacted>@bucket/x.tar"
    assert public["storage_options"] == "<redacted>"
    assert public["nested"][0] == {
        "aws_secret_access_key": "<redacted>",
        "token": "<redacted>",
        "target_layer": "layer4",
    }


# --------------------------------------------------------------------------- gallery


def test_gallery_reads_inputs_and_maps(full_run) -> None:
    run, rows = full_run
    table = store.read_rows(run)
    chosen = choose_gallery_images(table, "demo", METHODS, 3)
    assert chosen == choose_gallery_images(
        table.take(list(range(table.num_rows))[::-1]), "demo", METHODS, 3
    )
    first_shard = min(r["shard"] for r in rows)
    assert all(shard == first_shard for shard, _ in chosen)  # reads one data shard only
    gallery = build_gallery(run, table, list(METHODS), size=3)
    assert [(i.shard, i.key) for i in gallery.items] == chosen
    assert gallery.png is not None and gallery.png.startswith(b"\x89PNG")
    for item in gallery.items:
        assert item.image is not None and item.image.shape == (INPUT, INPUT, 3)
        assert item.image.min() >= 0.0 and item.image.max() <= 1.0
        index = int(item.key[3:])
        assert len(item.boxes) == (1 if index % 2 == 0 else 0)
        for method in METHODS:
            assert item.maps[method].shape == (INPUT, INPUT)
            source = next(r for r in rows if r["key"] == item.key and r["method"] == method)
            np.testing.assert_allclose(item.maps[method], store.decode_map(source))
            assert item.scores[method] == (source["drop"], source["gain"])
    assert gallery.notes == []
    guessed = build_gallery(run, table, list(METHODS), size=1, resize_known=False)
    assert any("resize size" in note for note in guessed.notes)
    # 0 -> no gallery, nothing read.
    assert build_gallery(run, table, list(METHODS), size=0).png is None


def test_gallery_preprocesses_inputs_like_the_run(full_run) -> None:
    # A timm / Hugging Face model's settings (from the shard statuses) reach the gallery.
    run, _ = full_run
    table = store.read_rows(run)
    options = {"interpolation": "bicubic", "resize_mode": "squash", "crop_rounding": "floor"}
    gallery = build_gallery(
        run, table, list(METHODS), size=3, resize_size=INPUT + 5, preprocess_options=options
    )
    preprocess = Preprocess(INPUT, INPUT + 5, **options)
    samples = {
        sample.key: sample
        for shard in {item.shard for item in gallery.items}
        for sample in ShardReader(shard, require_label=False)
    }
    plain = Preprocess(INPUT, INPUT + 5)
    assert len(gallery.items) == 3
    for item in gallery.items:
        sample = samples[item.key]
        image, boxes = preprocess(sample.image, sample.boxes)
        np.testing.assert_array_equal(item.image, image.permute(1, 2, 0).numpy())
        np.testing.assert_array_equal(item.boxes, boxes.numpy().reshape(-1, 4))
        assert not np.array_equal(item.image, plain(sample.image)[0].permute(1, 2, 0).numpy())


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


def test_gallery_draws_maps_with_the_report_colour_map() -> None:
    from opticam.report.gallery import _draw

    # A black input under a map of ones shows the overlay's half-strength dark red; a map
    # of zeros without an input shows the colour map's own low end, dark blue.
    with_input = GalleryItem("s", "a", 0, 0, 0, image=np.zeros((INPUT, INPUT, 3), np.float32))
    with_input.maps["m"] = np.ones((INPUT, INPUT), np.float32)
    alone = GalleryItem("s", "b", 0, 0, 0)
    alone.maps["m"] = np.zeros((INPUT, INPUT), np.float32)
    png = _draw(Gallery("demo", ["m"], [with_input, alone], [], None))
    assert png is not None
    with Image.open(io.BytesIO(png)) as picture:
        pixels = np.asarray(picture.convert("RGB")).reshape(-1, 3)
    expected = {
        "overlay": np.asarray(overlay(np.zeros((INPUT, INPUT, 3)), np.ones((INPUT, INPUT))))[0, 0],
        "colorize": np.rint(255 * colorize(np.zeros((1, 1)))[0, 0]),
    }
    assert tuple(expected["overlay"]) == (64, 0, 0) and tuple(expected["colorize"]) == (0, 0, 128)
    for name, colour in expected.items():
        # Each map cell is about 190 x 215 pixels of one colour at the report's 100 dpi;
        # matplotlib truncates float colours to 8 bits where overlay rounds: 1 level apart.
        close = (np.abs(pixels.astype(np.int64) - colour) <= 1).all(axis=1)
        assert close.sum() > 10_000, name


def test_choose_gallery_prefers_images_with_every_method() -> None:
    import pyarrow as pa

    table = pa.table(
        {
            "model": ["m"] * 5,
            "shard": ["s0", "s0", "s0", "s1", "s1"],
            "key": ["a", "a", "b", "c", "c"],
            "method": ["x", "y", "x", "x", "y"],
        }
    )
    assert choose_gallery_images(table, "m", ["x", "y"], 5) == [("s0", "a"), ("s1", "c")]
    assert choose_gallery_images(table, "m", ["x", "y"], 1) == [("s0", "a")]
    assert len(choose_gallery_images(table, "m", ["x", "z"], 5)) == 3  # none complete
    assert choose_gallery_images(table, "other", ["x"], 5) == []


def test_report_builds_when_data_is_gone(tmp_path) -> None:
    run, _ = make_synthetic_run(str(tmp_path), shards=1, per_shard=4)
    for name in os.listdir(tmp_path / "data"):
        os.remove(tmp_path / "data" / name)
    result = build_report(run, n_boot=20)
    text = _read(result.index_url).decode("utf-8")
    assert "not shown" in text
    assert f"{run}/report/figures/gallery.png" in result.files  # maps alone
    assert len(result.summary) == 2


# --------------------------------------------------------------------------- partial / empty


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


def test_the_page_shows_the_normalization_and_layer_the_model_applied(tmp_path) -> None:
    config = RunConfig(data=f"{tmp_path}/d/shard-0.tar", output=f"{tmp_path}/runs")
    run = store.run_url(config.output, config.run_id)
    applied = {"target_layer": "features.12", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.2, 1]}
    store.write_run_json(run, config, [], loaded_model=applied)
    text = _read(build_report(run).index_url).decode("utf-8")
    assert "input normalization <code>mean (0.5, 0.5, 0.5), std (0.25, 0.2, 1)</code>" in text
    assert "target layer <code>features.12</code>" in text
    assert "loaded_model" in text  # and in the run configuration shown below
    store.write_run_json(run, config, [], loaded_model={**applied, "mean": None, "std": None})
    text = _read(build_report(run).index_url).decode("utf-8")
    assert "input normalization <code>none applied by opticam" in text


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


# --------------------------------------------------------------------------- formatting


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


def test_best_mean_is_bold_by_displayed_value() -> None:
    from opticam.names import METRICS_BY_NAME
    from opticam.report.page import _best

    drop, gain = METRICS_BY_NAME["average_drop"], METRICS_BY_NAME["average_gain"]
    rows = [
        {"model": "a", "average_drop": 1.04, "average_gain": 5.0},
        {"model": "a", "average_drop": 1.01, "average_gain": 5.0},
        {"model": "a", "average_drop": 3.0, "average_gain": 5.0},
        {"model": "b", "average_drop": 9.0, "average_gain": None},
    ]
    assert _best(rows, drop) == {0, 1}  # both read 1.0; lower is better
    assert _best(rows, gain) == set()  # all tie: nothing stands out; b has one method
