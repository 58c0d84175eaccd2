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
        "map_bytes": data,
        "map_shape": list(saliency.shape),
        "map_format": "lowres",
        "input_height": size,
        "input_width": size,
        "normalization": "range",
    }


def status_for(shard: str, **kw: Any) -> store.ShardStatus:
    return store.ShardStatus(shard=shard, name=store.shard_name(shard), **kw)


# The columns versions 1 and 2 named otherwise, written out here instead of taken from
# store.RENAMED_COLUMNS: a rename the store forgets to read back then fails the tests.
VERSION_2_NAMES = {"map_bytes": "saliency", "map_shape": "saliency_shape"}
VERSION_1_NAMES = {**VERSION_2_NAMES, "map_format": "saliency_kind"}
# Where versions 1 and 2 wrote the rows files, written out for the same reason.
OLD_ROWS_FOLDER = "shards"


def _old_table(rows: list[dict[str, Any]], names: dict[str, str], version: str) -> pa.Table:
    """Rows with today's column names as a table under an older version's names."""
    fields = [f.with_name(names.get(f.name, f.name)) for f in store.SCHEMA]
    schema = pa.schema(fields, metadata={"opticam.schema_version": version})
    old = [{names.get(k, k): v for k, v in r.items()} for r in rows]
    return pa.Table.from_pylist(old, schema=schema)


def _write_version_1_run(run: Path, rows: list[dict[str, Any]]) -> None:
    """A run folder as schema version 1 wrote it: ``saliency``, ``saliency_shape`` and
    ``saliency_kind``, rows in ``shards/``, version "1"."""
    import pyarrow.parquet as pq

    (run / OLD_ROWS_FOLDER).mkdir(parents=True)
    table = _old_table(rows, VERSION_1_NAMES, "1")
    pq.write_table(table, run / OLD_ROWS_FOLDER / "s-1.parquet")
    job = {"data": "x.tar", "maps": "lowres"}
    (run / "run.json").write_text(json.dumps({"schema_version": "1", "job": job}))
