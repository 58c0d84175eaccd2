"""A small synthetic run for the report's tests, and readers of what the report wrote.

The run is written with the real store functions (run.json, rows and errors Parquet
files) next to a tiny data shard set written with ShardWriter, so the gallery reads real
inputs back. Expected numbers are recomputed in the tests with numpy from the rows.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Mapping, Sequence
from html.parser import HTMLParser
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from opticam import store
from opticam.config import RunConfig
from opticam.data.writer import ShardWriter

METHODS = ("opticam", "gradcam")


INPUT = 32  # model input side of the synthetic run


STEPS = 8  # insertion/deletion steps: curves have STEPS + 1 points


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
                "map_bytes": saliency,
                "map_shape": shape,
                "map_format": kind,
                "input_height": INPUT,
                "input_width": INPUT,
                "normalization": "range",
                "prior_role": None,
                "prior_sha256": None,
                "channel_weights": None,
            }
            rows.append(row)
        status = store.ShardStatus(shard=shard, name=store.shard_name(shard), n_rows=len(rows))
        errors = []
        if s == 0:
            errors.append(
                {"shard": shard, "key": "broken", "stage": "decode", "message": "bad <jpg>"}
            )
        store.write_errors(run, config.run_id, errors, status, storage_options=options)
        store.write_rows(run, store.rows_to_table(rows), status, storage_options=options)
        all_rows += rows
    return run, all_rows


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
