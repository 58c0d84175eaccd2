"""Rows and run folders written by hand for the store's tests (tests/test_store_*.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from opticam import store


def lowres_row(
    shard: str, key: str, method: str, saliency: np.ndarray, size: int
) -> dict[str, Any]:
    data = store.encode_lowres(saliency, "range")
    assert data is not None
    return {
        "run_id": "r",
        "shard": shard,
        "key": key,
        "method": method,
        "model": "demo",
        "target_layer": "features",
        "label": 3,
        "predicted": 3,
        "target": 3,
        "p_clean": 0.5,
        "p_masked": 0.25,
        "drop": 0.5,
        "gain": 0.0,
        "increase": 0.0,
        "insertion_auc": None,
        "deletion_auc": None,
        "insertion_curve": None,
        "deletion_curve": None,
        "pointing_game": None,
        "energy_in_box": None,
        "f1": None,
        "loc_error": None,
        "box_acc": None,
        "iterations": 7,
        "constant_map": False,
        "seconds": 0.01,
        "saliency": data,
        "saliency_shape": list(saliency.shape),
        "map_format": "lowres",
        "input_height": size,
        "input_width": size,
        "normalization": "range",
    }


def status_for(shard: str, **kw: Any) -> store.ShardStatus:
    return store.ShardStatus(shard=shard, name=store.shard_name(shard), **kw)


def _write_version_1_run(run: Path, rows: list[dict[str, Any]]) -> None:
    """A run folder as schema version 1 wrote it: ``saliency_kind``, version "1"."""
    import pyarrow.parquet as pq

    fields = [
        pa.field("saliency_kind", f.type, f.nullable) if f.name == "map_format" else f
        for f in store.SCHEMA
    ]
    schema = pa.schema(fields, metadata={"opticam.schema_version": "1"})
    old = [{("saliency_kind" if k == "map_format" else k): v for k, v in r.items()} for r in rows]
    (run / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(old, schema=schema), run / "shards" / "s-1.parquet")
    job = {"data": "x.tar", "maps": "lowres"}
    (run / "run.json").write_text(json.dumps({"schema_version": "1", "job": job}))
