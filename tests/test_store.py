"""Run layout: schema, atomic writes, run.json, readers and map round trips (local and S3)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from opticam import store
from opticam.config import RunConfig

SECRET = "SUPER-SECRET-VALUE-42"

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
    ("saliency", pa.binary(), False),
    ("saliency_shape", pa.list_(pa.int32()), False),
    ("map_format", pa.string(), False),
    ("input_height", pa.int32(), False),
    ("input_width", pa.int32(), False),
    ("normalization", pa.string(), False),
]


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


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh bucket (created without a LocationConstraint, which moto rejects for
    us-east-1; the shared ``s3_bucket`` fixture passes one through s3fs)."""
    import uuid

    import boto3

    name = f"store-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


# --------------------------------------------------------------------------- schema & names


def test_schema_matches_the_documented_columns() -> None:
    assert [(f.name, f.type, f.nullable) for f in store.SCHEMA] == DOCUMENTED_COLUMNS
    assert store.SCHEMA.metadata[b"opticam.schema_version"] == store.SCHEMA_VERSION.encode()
    assert store.ERRORS_SCHEMA.names == ["run_id", "shard", "key", "stage", "message"]


def test_shard_names_are_safe_stable_and_unique() -> None:
    a = store.shard_name("s3://bucket/train/shard-000003.tar")
    b = store.shard_name("s3://bucket/val/shard-000003.tar")
    assert a.startswith("shard-000003-") and b.startswith("shard-000003-") and a != b
    assert a == store.shard_name("s3://bucket/train/shard-000003.tar")
    weird = store.shard_name("/data/../we ird/sh?ard*:1.tar.gz")
    assert weird.startswith("sh_ard_1-")
    assert all(c.isalnum() or c in "._-" for c in weird)
    assert store.shard_name("gs://b/").startswith("b-")


def test_run_url_makes_local_outputs_absolute(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    assert store.run_url("./runs", "abc") == f"{tmp_path}/runs/abc"
    assert store.run_url("s3://b/runs/", "abc") == "s3://b/runs/abc"


def test_rows_to_table_rejects_missing_unknown_and_null_columns() -> None:
    row = lowres_row("s", "k", "gradcam", np.ones((2, 2)), 4)
    assert store.rows_to_table([row]).schema.equals(store.SCHEMA)
    with pytest.raises(ValueError, match="missing \\['seconds'\\]"):
        store.rows_to_table([{k: v for k, v in row.items() if k != "seconds"}])
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        store.rows_to_table([{**row, "extra": 1}])
    with pytest.raises(ValueError, match="'predicted' must not be null"):
        store.rows_to_table([{**row, "predicted": None}])


# --------------------------------------------------------------------------- atomic writes


def test_local_atomic_write_failing_midway_leaves_nothing(tmp_path: Path, monkeypatch: Any) -> None:
    target = tmp_path / "out" / "file.parquet"

    def broken_fsync(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk gone"):
        store.atomic_write_bytes(str(target), b"x" * 100_000)
    assert list((tmp_path / "out").iterdir()) == []  # no final file, no temp file


def test_local_atomic_write_failure_keeps_the_previous_content(
    tmp_path: Path, monkeypatch: Any
) -> None:
    target = tmp_path / "file.bin"
    store.atomic_write_bytes(str(target), b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.atomic_write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_s3_write_is_one_request_and_a_failed_put_leaves_nothing(
    bucket: str, s3_storage_options: dict[str, Any], monkeypatch: Any
) -> None:
    import s3fs

    url = f"{bucket}/run/shards/a.parquet"
    original_call = s3fs.S3FileSystem._call_s3
    calls: list[str] = []

    async def spy(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        if method == "put_object" and kwargs.get("Key", "").endswith("b.parquet"):
            raise ConnectionError("network dropped")
        return await original_call(self, method, *args, **kwargs)

    def no_streaming(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a buffered S3 file would commit partial data on error")

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", spy)
    monkeypatch.setattr(s3fs.core.S3File, "__init__", no_streaming)
    store.atomic_write_bytes(url, b"complete", s3_storage_options)
    assert [c for c in calls if c != "list_objects_v2"] == ["put_object"]

    with pytest.raises(OSError):
        store.atomic_write_bytes(f"{bucket}/run/shards/b.parquet", b"x", s3_storage_options)
    monkeypatch.undo()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
    assert fs.ls(f"{bucket}/run/shards", detail=False) == [url[len("s3://") :]]
    assert fs.cat(url) == b"complete"


# --------------------------------------------------------------------------- run.json


def test_run_json_has_no_secrets_and_refuses_another_job(tmp_path: Path) -> None:
    config = RunConfig(
        data="s3://b/d/shard-{0..3}.tar",
        output=str(tmp_path),
        storage_options={"key": "AKIA", "secret": SECRET},
    )
    run = store.run_url(config.output, config.run_id)
    shards = [{"url": "s3://b/d/shard-0.tar", "name": "shard-0-x", "max_images": None}]
    first = store.write_run_json(run, config, shards)
    text = (Path(run) / "run.json").read_text()
    assert SECRET not in text and "AKIA" not in text
    saved = json.loads(text)
    assert saved["run_id"] == config.run_id
    assert saved["schema_version"] == store.SCHEMA_VERSION
    assert saved["job"] == config.job_description()
    assert saved["shards"] == shards
    assert "torch" in saved["versions"] and "pyarrow" in saved["versions"]

    assert "loaded_model" not in saved

    # What the loaded model applied is recorded next to the job, never in it.
    applied = {"source": "factory:m:f", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    store.write_run_json(run, config, shards, loaded_model=applied)
    saved = json.loads((Path(run) / "run.json").read_text())
    assert saved["loaded_model"] == applied
    assert saved["job"] == config.job_description() and saved["run_id"] == config.run_id

    # Same job on another device: allowed, creation time kept.
    again = config.model_copy(update={"device": "cuda:1"})
    second = store.write_run_json(run, again, shards)
    assert second["created"] == first["created"]
    assert json.loads((Path(run) / "run.json").read_text())["config"]["device"] == "cuda:1"
    # A write without it keeps what was recorded.
    assert json.loads((Path(run) / "run.json").read_text())["loaded_model"] == applied

    other = RunConfig(data="s3://b/d/shard-{0..2}.tar", output=str(tmp_path))
    with pytest.raises(store.RunCollisionError, match="different job"):
        store.write_run_json(run, other, shards)
    assert store.read_run_json(str(tmp_path / "nothing")) is None


# --------------------------------------------------------------------------- readers


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
        store.write_shard(run, store.rows_to_table(rows), status, options)
    return shards


def test_readers_on_a_local_run(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    assert store.list_done_shards(run) == []
    empty = store.read_rows(run)
    assert empty.num_rows == 0 and empty.schema.equals(store.SCHEMA)

    shards = write_two_shards(run)
    # A writer's leftover temp file is never mistaken for a shard.
    (Path(run) / "shards" / ".x.parquet.123.tmp").write_bytes(b"partial")
    assert store.list_done_shards(run) == sorted(store.shard_name(s) for s in shards)

    rows = store.read_rows(run, columns=["shard", "key", "method", "drop"])
    assert rows.num_rows == 12 and rows.column_names == ["shard", "key", "method", "drop"]
    errors = store.read_errors(run)
    assert errors.to_pylist() == [
        {"run_id": "r", "shard": shards[1], "key": "bad", "stage": "decode", "message": "corrupt"}
    ]
    status = {s["shard"]: s for s in store.read_statuses(run)}
    assert status[shards[0]]["complete"] is True and status[shards[1]]["complete"] is False
    assert all(s["done"] for s in status.values())


def test_readers_on_s3_see_files_written_by_another_client(
    bucket: str, s3_storage_options: dict[str, Any]
) -> None:
    import s3fs

    run = f"{bucket}/runs/r1"
    cached = {**s3_storage_options, "use_listings_cache": True}
    assert store.list_done_shards(run, cached) == []
    shards = write_two_shards(run, s3_storage_options)
    # A separate filesystem instance (another process, in effect) adds a shard.
    other = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
    source = store.rows_url(run, shards[0])[len("s3://") :]
    other.copy(source, source.replace(store.shard_name(shards[0]), "late-00000000"))
    assert len(store.list_done_shards(run, cached)) == 3
    assert store.read_rows(run, ["key"], cached).num_rows == 18
    assert store.read_errors(run, s3_storage_options).num_rows == 1


# --------------------------------------------------------------------------- maps


def test_lowres_round_trip_matches_upsample_normalize(tmp_path: Path) -> None:
    from opticam.methods import upsample_normalize

    run = str(tmp_path / "run")
    rng = np.random.default_rng(1)
    saliency = rng.normal(size=(7, 7)) * 1e4  # large values: scaled before float16
    expected, _ = upsample_normalize(torch.from_numpy(saliency)[None, None], (50, 50), "range")
    shard = "/data/x.tar"
    rows = [lowres_row(shard, "k", "opticam", saliency, 50)]
    status = status_for(shard)
    store.write_shard(run, store.rows_to_table(rows), status)

    by_tuple = store.load_maps(run, [(shard, "k", "opticam")])
    by_rows = store.load_maps(run, store.read_rows(run))
    for maps in (by_tuple, by_rows):
        got = maps[(shard, "k", "opticam")]
        assert got.shape == (50, 50) and got.dtype == np.float32
        assert got.min() >= 0.0 and got.max() <= 1.0
        np.testing.assert_allclose(got, expected[0, 0].numpy(), atol=2e-3)
    with pytest.raises(KeyError, match="not in run"):
        store.load_maps(run, [(shard, "k", "gradcam")])


def test_full_png_round_trip_is_within_one_quantization_step() -> None:
    rng = np.random.default_rng(2)
    full = rng.random((33, 21)).astype(np.float32)
    full[0, 0], full[1, 1] = 0.0, 1.0
    row = {
        "saliency": store.encode_full_png(full),
        "saliency_shape": [33, 21],
        "map_format": "full_png",
        "input_height": 33,
        "input_width": 21,
        "normalization": "none",
    }
    got = store.decode_map(row)
    assert got.shape == (33, 21) and got.dtype == np.float32
    assert np.abs(got - full).max() <= 0.5 / 255 + 1e-6
    assert got[0, 0] == 0.0 and got[1, 1] == 1.0


def test_encode_lowres_scaling_rules() -> None:
    s = np.array([[0.0, 2.0], [-4.0, 1.0]])
    scaled = np.frombuffer(store.encode_lowres(s, "range") or b"", dtype="<f2")
    np.testing.assert_allclose(scaled, [0.0, 0.5, -1.0, 0.25])
    raw = np.frombuffer(store.encode_lowres(s, "sigmoid") or b"", dtype="<f2")
    np.testing.assert_allclose(raw, s.ravel())  # sigmoid is not scale invariant: kept
    assert store.encode_lowres(s * 1e6, "sigmoid") is None  # beyond float16
    assert store.encode_lowres(np.array([[np.nan, 1.0]]), "range") is None
    constant = np.frombuffer(store.encode_lowres(np.zeros((2, 2)), "range") or b"", "<f2")
    assert (constant == 0).all()
    with pytest.raises(ValueError, match="unknown map_format"):
        store.decode_map(
            {
                "map_format": "jpeg",
                "saliency_shape": [1, 1],
                "input_height": 1,
                "input_width": 1,
                "saliency": b"",
            }
        )


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
    old_row = {("saliency_kind" if k == "map_format" else k): v for k, v in rows[1].items()}
    np.testing.assert_array_equal(store.decode_map(old_row), expected)


def test_a_version_1_run_folder_is_never_resumed(tmp_path: Path) -> None:
    run = tmp_path / "old-run"
    _write_version_1_run(run, [])
    config = RunConfig(data="x.tar", output=str(tmp_path))
    with pytest.raises(store.RunCollisionError, match="schema version 1, this is version 2"):
        store.check_run_json(str(run), config)
    assert json.loads((run / "run.json").read_text())["schema_version"] == "1"  # untouched


def test_is_done_checks_one_rows_file(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    shard = "s3://b/data/a.tar"
    assert not store.is_done(run, shard)
    table = store.rows_to_table([lowres_row(shard, "k", "gradcam", np.ones((2, 2)), 8)])
    store.write_shard(run, table, status_for(shard))
    assert store.is_done(run, shard) and not store.is_done(run, "s3://b/data/other.tar")


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (28, "no space left on device"),
        (122, "disk quota exceeded"),
        (30, "read-only file system"),
        (13, "permission denied"),
    ],
)
def test_errors_that_stay_are_told_from_hiccups(code: int, cause: str) -> None:
    from opticam.store.layout import permanent_cause

    assert permanent_cause(OSError(code, os.strerror(code))) == cause
    assert permanent_cause(OSError(code, "x").with_traceback(None)) == cause
    # Hiccups are retried: a reset connection, a timeout, a 503.
    assert permanent_cause(ConnectionResetError(104, "Connection reset by peer")) is None
    assert permanent_cause(TimeoutError("read timed out")) is None
    assert permanent_cause(OSError("503 Service Unavailable")) is None


def test_a_write_to_a_missing_bucket_fails_for_good_in_one_line(
    s3_bucket: str, s3_storage_options: dict[str, Any]
) -> None:
    import s3fs

    from opticam.errors import StorageFailedError

    url = f"{s3_bucket}/run/shards/x.parquet"
    s3fs.S3FileSystem(**s3_storage_options).rm(s3_bucket, recursive=True)
    with pytest.raises(StorageFailedError) as caught:
        store.atomic_write_bytes(url, b"data", s3_storage_options)
    message = str(caught.value)
    assert caught.value.cause == "the bucket does not exist" and url in message
    assert "\n" not in message and len(message) < 400
    from opticam_flows.explain import is_transient_error

    assert not is_transient_error(caught.value)


def test_a_disk_full_error_on_a_local_write_names_the_file_and_keeps_the_old_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from opticam.errors import StorageFailedError

    target = tmp_path / "run" / "run.json"
    store.atomic_write_bytes(str(target), b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageFailedError, match="no space left on device, writing .*run.json"):
        store.atomic_write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old" and sorted(os.listdir(target.parent)) == ["run.json"]
