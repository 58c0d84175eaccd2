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
        "prior_role": None,
        "prior_sha256": None,
        "channel_weights": None,
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


def _version_2_file(table: pa.Table, status: dict[str, Any]) -> bytes:
    """A Parquet file's bytes as version 2 wrote them: zstd, page checksums, the status."""
    import pyarrow.parquet as pq

    meta = {**(table.schema.metadata or {}), b"opticam.shard_status": json.dumps(status)}
    sink = pa.BufferOutputStream()
    pq.write_table(
        table.replace_schema_metadata(meta), sink, compression="zstd", write_page_checksum=True
    )
    return bytes(sink.getvalue())


def write_version_2_run(
    run: Path, rows: list[dict[str, Any]], run_json: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``rows`` (dicts with today's columns) to run folder ``run`` exactly as schema
    version 2 wrote them.

    Per shard (in the order the rows name them): ``errors/<name>.parquet`` with no error
    row and a status that records the size and SHA-256 of the rows file, then
    ``shards/<name>.parquet`` with the map columns ``saliency`` and ``saliency_shape``.
    Version "2" is in every file's metadata, in each status and in ``run.json``, which is
    ``run_json`` (default: a small one naming the shards) with that version.

    Returns:
        ``{shard URL: its rows file}``.
    """
    import hashlib

    by_shard: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    for folder in (OLD_ROWS_FOLDER, "errors"):
        (run / folder).mkdir(parents=True, exist_ok=True)
    files = {}
    for shard, shard_rows in by_shard.items():
        name = store.shard_name(shard)
        rows_file = run / OLD_ROWS_FOLDER / f"{name}.parquet"
        errors_file = run / "errors" / f"{name}.parquet"
        status = store.ShardStatus(
            shard=shard,
            name=name,
            rows_url=str(rows_file),
            errors_url=str(errors_file),
            n_samples=len({r["key"] for r in shard_rows}),
            n_images=len({r["key"] for r in shard_rows}),
            n_rows=len(shard_rows),
            device="cpu",
            finished="2025-01-01T00:00:00+00:00",
            schema_version="2",
        ).to_dict()
        data = _version_2_file(_old_table(shard_rows, VERSION_2_NAMES, "2"), status)
        recorded = {
            **status,
            "rows_bytes": len(data),
            "rows_sha256": hashlib.sha256(data).hexdigest(),
        }
        errors_schema = store.ERRORS_SCHEMA.with_metadata({"opticam.schema_version": "2"})
        errors_file.write_bytes(_version_2_file(errors_schema.empty_table(), recorded))
        rows_file.write_bytes(data)
        files[shard] = rows_file
    default = {
        "run_id": rows[0]["run_id"] if rows else "r",
        "job": {"data": sorted(by_shard), "map_format": "lowres"},
        "shards": [{"url": u, "name": store.shard_name(u), "max_images": None} for u in by_shard],
    }
    payload = {**(run_json or default), "schema_version": "2"}
    (run / "run.json").write_text(json.dumps(payload, indent=2, sort_keys=True))
    return files
