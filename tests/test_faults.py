"""Faults with real processes and sockets: a connection cut in the middle of reading a
shard from S3 (moto's server behind a cutting TCP proxy on loopback), and shards that
are not tars.

The rule under test: a shard is done only when all of it was read. A transient storage
failure reads the shard again from its start; a persistent one fails the shard (no rows
file, so a rerun computes it). Only bytes that are bad in storage (the same every time)
are recorded, as an incomplete or failed shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
import tiny
from faults import CuttingProxy

from opticam import pipeline, store
from opticam.config import RunConfig
from opticam.data import ShardStreamError
from opticam.demo import make_shards

N = 20  # samples in the shard


@pytest.fixture(autouse=True)
def tiny_factory(monkeypatch: pytest.MonkeyPatch) -> Any:
    tiny.register(monkeypatch)
    yield
    pipeline.clear_model_cache()


@pytest.fixture
def s3_shard(s3_bucket: str, s3_storage_options: dict[str, Any]) -> str:
    (url,) = make_shards(f"{s3_bucket}/data", 1, N, seed=3, storage_options=s3_storage_options)
    return url


def _through(proxy: CuttingProxy, options: dict[str, Any]) -> dict[str, Any]:
    client = {**options["client_kwargs"], "endpoint_url": proxy.url}
    return {**options, "client_kwargs": client}


def _config(shard: str, tmp_path: Path, options: dict[str, Any]) -> RunConfig:
    return RunConfig(
        data=shard,
        output=str(tmp_path / "out"),
        model={"source": tiny.FACTORY},
        methods=["fakecam"],
        metrics={"steps": 2},
        device="cpu",
        data_storage_options=options,
    )


def _size(url: str, options: dict[str, Any]) -> int:
    import s3fs

    return int(s3fs.S3FileSystem(**options).size(url))


@pytest.mark.e2e
def test_a_cut_connection_reads_the_shard_again_and_loses_nothing(
    s3_shard: str, s3_endpoint: str, s3_storage_options: dict[str, Any], tmp_path: Path
) -> None:
    port = urlsplit(s3_endpoint).port
    assert port is not None
    size = _size(s3_shard, s3_storage_options)
    # s3fs reads a range 5 times before it gives up: 6 cuts fail the first read of the
    # shard and the second read's first try.
    with CuttingProxy(port, cut_after=size // 2, cuts=6) as proxy:
        config = _config(s3_shard, tmp_path, _through(proxy, s3_storage_options))
        status = pipeline.process_shard(config, s3_shard, "cpu", retry_delays=(0.1,))
    assert proxy.cuts_made == 6
    assert status.complete and status.n_samples == N and status.n_images == N
    errors = pq.read_table(status.errors_url).to_pylist()
    assert errors == []


@pytest.mark.e2e
def test_a_connection_that_keeps_failing_fails_the_shard_and_leaves_it_to_do(
    s3_shard: str, s3_endpoint: str, s3_storage_options: dict[str, Any], tmp_path: Path
) -> None:
    port = urlsplit(s3_endpoint).port
    assert port is not None
    size = _size(s3_shard, s3_storage_options)
    with CuttingProxy(port, cut_after=size // 2, cuts=10**6) as proxy:
        config = _config(s3_shard, tmp_path, _through(proxy, s3_storage_options))
        with pytest.raises(ShardStreamError, match="storage failed"):
            pipeline.process_shard(config, s3_shard, "cpu", read_attempts=2, retry_delays=(0.1,))
    run = pipeline.run_url_of(config)
    assert store.list_done_rows(run) == []  # not done: a rerun computes it
    # The same job without the proxy then computes it in full.
    healthy = _config(s3_shard, tmp_path, s3_storage_options)
    assert healthy.run_id == config.run_id
    status = pipeline.process_shard(healthy, s3_shard, "cpu")
    assert status.complete and status.n_images == N


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip, not a tar" * 50])
def test_a_shard_that_is_not_a_tar_fails_with_an_error_row(content: bytes, tmp_path: Path) -> None:
    shard = tmp_path / "notatar.tar"
    shard.write_bytes(content)
    config = _config(str(shard), tmp_path, {})
    with pytest.raises(pipeline.ShardNotATarError, match="holds no tar"):
        pipeline.process_shard(config, str(shard), "cpu")
    run = pipeline.run_url_of(config)
    assert store.list_done_rows(run) == []
    errors = store.read_errors(run).to_pylist()
    assert [e["stage"] for e in errors] == ["not-a-tar"]


def test_a_tar_truncated_in_storage_is_done_but_flagged(tmp_path: Path) -> None:
    (url,) = make_shards(str(tmp_path / "data"), 1, N, seed=3)
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: len(data) // 2])
    config = _config(url, tmp_path, {})
    status = pipeline.process_shard(config, url, "cpu")
    assert not status.complete and 0 < status.n_images < N
    assert store.list_done_rows(pipeline.run_url_of(config)) == [store.shard_name(url)]
