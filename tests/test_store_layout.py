"""opticam.store.layout: names in the run folder, atomic writes (local and S3), errors that stay."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from opticam import store


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


@pytest.mark.e2e
def test_s3_write_is_one_request_and_a_failed_put_leaves_nothing(
    bucket: str, s3_storage_options: dict[str, Any], monkeypatch: Any
) -> None:
    import s3fs

    url = f"{bucket}/run/rows/a.parquet"
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
        store.atomic_write_bytes(f"{bucket}/run/rows/b.parquet", b"x", s3_storage_options)
    monkeypatch.undo()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
    assert fs.ls(f"{bucket}/run/rows", detail=False) == [url[len("s3://") :]]
    assert fs.cat(url) == b"complete"


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


@pytest.mark.e2e
def test_a_write_to_a_missing_bucket_fails_for_good_in_one_line(
    s3_bucket: str, s3_storage_options: dict[str, Any]
) -> None:
    import s3fs

    from opticam.errors import StorageFailedError

    url = f"{s3_bucket}/run/rows/x.parquet"
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
