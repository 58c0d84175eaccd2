"""Per-shard leases: exactly one taker, stale leases taken over, concurrent workers split
the shards, locally and on S3 (moto's server)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tiny

from opticam import pipeline, store
from opticam.config import RunConfig
from opticam.demo import make_shards
from opticam.store import leases


@pytest.fixture(autouse=True)
def tiny_factory(monkeypatch: pytest.MonkeyPatch) -> Any:
    tiny.register(monkeypatch)
    yield
    pipeline.clear_model_cache()


def _racers(run: str, shard: str, owners: list[str], **kw: Any) -> list[Any]:
    """Every owner tries to take the lease at the same moment; what each got."""
    barrier = threading.Barrier(len(owners))
    got: list[Any] = [None] * len(owners)

    def take(i: int) -> None:
        barrier.wait()
        got[i] = leases.acquire(run, shard, owners[i], **kw)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(owners))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_of_many_simultaneous_takers_exactly_one_wins(tmp_path: Path) -> None:
    got = _racers(str(tmp_path), "s3://b/a.tar", [f"w{i}" for i in range(8)])
    winners = [g for g in got if g is not None]
    assert len(winners) == 1 and winners[0].generation == 0
    assert leases.current_lease(str(tmp_path), "s3://b/a.tar").owner == winners[0].owner
    assert leases.acquire(str(tmp_path), "s3://b/a.tar", "late") is None  # still live


def test_a_stale_lease_is_taken_over_once_and_renewal_moves_on(tmp_path: Path) -> None:
    run, shard = str(tmp_path), "/data/b.tar"
    dead = leases.acquire(run, shard, "dead-worker", ttl=0.05)
    assert dead is not None
    time.sleep(0.1)
    got = _racers(run, shard, ["a", "b", "c"])
    (taker,) = [g for g in got if g is not None]
    assert taker.generation == 1
    renewed = leases.renew(taker)
    assert renewed is not None and renewed.generation == 2
    assert leases.renew(dead) is None  # the dead owner cannot come back
    leases.release(renewed)
    assert leases.current_lease(run, shard) is None


@pytest.mark.e2e
def test_leases_on_s3_are_exclusive(s3_bucket: str, s3_storage_options: dict[str, Any]) -> None:
    import s3fs

    run = f"{s3_bucket}/runs/r1"
    owners = ["a", "b", "c", "d"]
    got = _racers(run, "s3://data/x.tar", owners, storage_options=s3_storage_options)
    (winner,) = [g for g in got if g is not None]
    assert s3fs.S3FileSystem(**s3_storage_options).exists(winner.url)
    again = leases.acquire(run, "s3://data/x.tar", "e", storage_options=s3_storage_options)
    assert again is None


def test_two_workers_split_the_shards_and_compute_each_once(tmp_path: Path) -> None:
    shards = make_shards(str(tmp_path / "data"), 4, 3, seed=9)
    config = RunConfig(
        data=shards,
        output=str(tmp_path / "out"),
        model={"source": tiny.FACTORY},
        methods=["fakecam"],
        metrics={"steps": 2},
        device="cpu",
    )
    computed: dict[str, list[str]] = {"w1": [], "w2": []}
    barrier = threading.Barrier(2)

    def worker(owner: str) -> None:
        barrier.wait()
        for url in shards:  # both walk the same plan in the same order
            status = pipeline.process_shard(config, url, "cpu", owner=owner)
            if not status.skipped:
                computed[owner].append(url)

    threads = [threading.Thread(target=worker, args=(o,)) for o in computed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(computed["w1"] + computed["w2"]) == sorted(shards)  # each exactly once
    run = pipeline.run_url_of(config)
    assert len(store.list_done_rows(run)) == 4
    assert leases.current_lease(run, shards[0]) is None  # released after writing


def test_a_live_lease_of_another_worker_skips_the_shard_without_writing(tmp_path: Path) -> None:
    (url,) = make_shards(str(tmp_path / "data"), 1, 2, seed=4)
    config = RunConfig(
        data=url, output=str(tmp_path / "out"), model={"source": tiny.FACTORY},
        methods=["fakecam"], metrics={"steps": 2}, device="cpu",
    )  # fmt: skip
    run = pipeline.run_url_of(config)
    assert leases.acquire(run, url, "other-host:123:abc") is not None
    status = pipeline.process_shard(config, url, "cpu", owner="me")
    assert status.skipped and status.held_by == "other-host:123:abc"
    assert store.list_done_rows(run) == []
    assert not (Path(run) / "errors").exists()


@pytest.mark.e2e
def test_the_lease_of_an_ended_process_on_this_host_is_free_at_once(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    ended = f"{socket.gethostname()}:{proc.stdout.strip()}:abcd"
    assert leases.acquire(str(tmp_path), "/d/a.tar", ended) is not None
    assert leases.owner_gone(ended)
    taken = leases.acquire(str(tmp_path), "/d/a.tar", "next-run")
    assert taken is not None and taken.generation == 1
    # A live owner (this process) or one on another host keeps its lease.
    me = leases.new_owner()
    assert not leases.owner_gone(me) and not leases.owner_gone("elsewhere:1:x")
    assert leases.acquire(str(tmp_path), "/d/b.tar", me) is not None
    assert leases.acquire(str(tmp_path), "/d/b.tar", "other") is None
