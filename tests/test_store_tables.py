"""opticam.store.tables: the schema, rows to a table, the readers (local and S3), version 1
runs (version 2 runs: tests/test_store_versions.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from store_rows import VERSION_1_NAMES, _write_version_1_run, lowres_row, status_for

from opticam import store

DOCUMENTED_COLUMNS = [
    ("run_id", pa.string(), False),
    ("shard", pa.string(), False),
    ("key", pa.string(), False),
    ("method", pa.string(), False),
    ("model", pa.string(), False),
    ("target_layer", pa.string(), True),
    ("label", pa.int64(), True),
    ("predicted", pa.int64(), False),
    ("target", pa.int64(), False),
    ("p_clean", pa.float64(), False),
    ("p_masked", pa.float64(), False),
    ("drop", pa.float64(), False),
    ("gain", pa.float64(), False),
    ("increase", pa.float64(), False),
    ("insertion_auc", pa.float64(), True),
    ("deletion_auc", pa.float64(), True),
    ("insertion_curve", pa.list_(pa.float32()), True),
    ("deletion_curve", pa.list_(pa.float32()), True),
    ("pointing_game", pa.float64(), True),
    ("energy_in_box", pa.float64(), True),
    ("f1", pa.float64(), True),
    ("loc_error", pa.float64(), True),
    ("box_acc", pa.float64(), True),
    ("iterations", pa.int32(), True),
    ("constant_map", pa.bool_(), False),
    ("seconds", pa.float64(), False),
    ("map_bytes", pa.binary(), False),
    ("map_shape", pa.list_(pa.int32()), False),
    ("map_format", pa.string(), False),
    ("input_height", pa.int32(), False),
    ("input_width", pa.int32(), False),
    ("normalization", pa.string(), False),
    ("prior_role", pa.string(), True),
    ("prior_sha256", pa.string(), True),
    ("channel_weights", pa.list_(pa.float32()), True),
]


def test_schema_matches_the_documented_columns() -> None:
    assert [(f.name, f.type, f.nullable) for f in store.SCHEMA] == DOCUMENTED_COLUMNS
    assert store.SCHEMA.metadata[b"opticam.schema_version"] == store.SCHEMA_VERSION.encode()
    assert store.ERRORS_SCHEMA.names == ["run_id", "shard", "key", "stage", "message"]


def test_rows_to_table_rejects_missing_unknown_and_null_columns() -> None:
    row = lowres_row("s", "k", "gradcam", np.ones((2, 2)), 4)
    assert store.rows_to_table([row]).schema.equals(store.SCHEMA)
    with pytest.raises(ValueError, match="missing \\['seconds'\\]"):
        store.rows_to_table([{k: v for k, v in row.items() if k != "seconds"}])
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        store.rows_to_table([{**row, "extra": 1}])
    with pytest.raises(ValueError, match="'predicted' must not be null"):
        store.rows_to_table([{**row, "predicted": None}])


def write_two_shards(run: str, options: dict[str, Any] | None = None) -> list[str]:
    shards = ["s3://data/a/shard-0.tar", "s3://data/b/shard-0.tar"]
    rng = np.random.default_rng(0)
    for i, shard in enumerate(shards):
        rows = [
            lowres_row(shard, f"k{j}", m, rng.random((4, 4)), 16)
            for j in range(3)
            for m in ("opticam", "gradcam")
        ]
        status = status_for(shard, n_rows=len(rows), complete=i == 0)
        errors = [{"shard": shard, "key": "bad", "stage": "decode", "message": "corrupt"}]
        store.write_errors(run, "r", errors if i else [], status, options)
        store.write_rows(run, store.rows_to_table(rows), status, options)
    return shards


def test_readers_on_a_local_run(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    assert store.list_done_rows(run) == []
    empty = store.read_rows(run)
    assert empty.num_rows == 0 and empty.schema.equals(store.SCHEMA)

    shards = write_two_shards(run)
    # A writer's leftover temp file is never mistaken for a shard.
    (Path(run) / "rows" / ".x.parquet.123.tmp").write_bytes(b"partial")
    assert store.list_done_rows(run) == sorted(store.shard_name(s) for s in shards)

    rows = store.read_rows(run, columns=["shard", "key", "method", "drop"])
    assert rows.num_rows == 12 and rows.column_names == ["shard", "key", "method", "drop"]
    errors = store.read_errors(run)
    assert errors.to_pylist() == [
        {"run_id": "r", "shard": shards[1], "key": "bad", "stage": "decode", "message": "corrupt"}
    ]
    status = {s["shard"]: s for s in store.read_statuses(run)}
    assert status[shards[0]]["complete"] is True and status[shards[1]]["complete"] is False
    assert all(s["done"] for s in status.values())


@pytest.mark.e2e
def test_readers_on_s3_see_files_written_by_another_client(
    bucket: str, s3_storage_options: dict[str, Any]
) -> None:
    import s3fs

    run = f"{bucket}/runs/r1"
    cached = {**s3_storage_options, "use_listings_cache": True}
    assert store.list_done_rows(run, cached) == []
    shards = write_two_shards(run, s3_storage_options)
    # A separate filesystem instance (another process, in effect) adds a shard.
    other = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
    source = store.rows_url(run, shards[0])[len("s3://") :]
    other.copy(source, source.replace(store.shard_name(shards[0]), "late-00000000"))
    assert len(store.list_done_rows(run, cached)) == 3
    assert store.read_rows(run, ["key"], cached).num_rows == 18
    assert store.read_errors(run, s3_storage_options).num_rows == 1


def test_the_manual_documents_every_column() -> None:
    """The manual's schema table (docs/output-schema.md) names exactly the columns the store
    writes."""
    page = Path(__file__).resolve().parents[1] / "docs" / "output-schema.md"
    section = page.read_text(encoding="utf-8").split("## Parquet schema", 1)[1].split("\n\n", 2)[1]
    documented: list[str] = []
    for line in section.splitlines()[2:]:
        first_cell = line.split("|")[1]
        documented += [name.strip(" `") for name in first_cell.split(",")]
    assert documented == store.SCHEMA.names


def test_version_1_runs_are_read_with_the_current_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rows = [
        lowres_row("s3://b/s.tar", f"k{i}", "opticam", rng.random((4, 4)), 16) for i in range(3)
    ]
    run = tmp_path / "old-run"
    _write_version_1_run(run, rows)
    table = store.read_rows(str(run))
    assert table.schema.equals(store.SCHEMA, check_metadata=False)
    assert table.column("map_format").to_pylist() == ["lowres"] * 3
    only = store.read_rows(str(run), ["key", "map_format"])
    assert only.column_names == ["key", "map_format"]
    maps = store.load_maps(str(run), [("s3://b/s.tar", "k1", "opticam")])
    expected = store.decode_map(rows[1])
    np.testing.assert_array_equal(maps[("s3://b/s.tar", "k1", "opticam")], expected)
    # A row dict straight from a version 1 file decodes too.
    old_row = {VERSION_1_NAMES.get(k, k): v for k, v in rows[1].items()}
    assert "saliency_kind" in old_row and "saliency" in old_row
    np.testing.assert_array_equal(store.decode_map(old_row), expected)


def test_is_done_checks_one_rows_file(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    shard = "s3://b/data/a.tar"
    assert not store.is_done(run, shard)
    table = store.rows_to_table([lowres_row(shard, "k", "gradcam", np.ones((2, 2)), 8)])
    store.write_rows(run, table, status_for(shard))
    assert store.is_done(run, shard) and not store.is_done(run, "s3://b/data/other.tar")
