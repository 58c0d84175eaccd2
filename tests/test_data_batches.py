"""Tests for opticam.data.batches: preprocess, collate and prefetch in a background thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

# Tar-building helpers shared with the reader's tests.
from test_data_reader import colour_image, encode, good_members, write_shards, write_tar

from opticam.data import Batch, ErrorRecord, Preprocess, Sample, ShardReader, iter_batches


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """Three shards of 4 samples (keys s<shard>_<i>), see ``write_shards``."""
    folder = tmp_path / "shards"
    write_shards(folder)
    return folder


def test_iter_batches_shapes_labels_and_shards(shard_dir: Path, tmp_path: Path) -> None:
    preprocess = Preprocess(12)
    urls = sorted(str(path) for path in shard_dir.glob("*.tar"))
    readers = [ShardReader(u) for u in urls]
    # Chain of 3 shards of 4 with batch_size 3: batches of 3, 1 per shard.
    chained = (sample for reader in readers for sample in reader)
    batches = list(iter_batches(chained, preprocess, 3, errors=[]))
    assert [len(b) for b in batches] == [3, 1, 3, 1, 3, 1]
    for batch in batches:
        assert isinstance(batch, Batch)
        assert batch.images.shape == (len(batch), 3, 12, 12)
        assert batch.images.dtype == torch.float32
        assert batch.images.min() >= 0.0 and batch.images.max() <= 1.0
        assert batch.labels.dtype == torch.int64 and batch.labels.shape == (len(batch),)
        assert len(batch.boxes) == len(batch)
        assert all(b.shape[1] == 4 and b.dtype == torch.float32 for b in batch.boxes)
        assert {k.split("_")[0] for k in batch.keys} == {f"s{urls.index(batch.shard)}"}
    keys = [k for b in batches for k in b.keys]
    assert keys == [f"s{i // 4}_{i % 4}" for i in range(12)]
    labels = torch.cat([b.labels for b in batches])
    assert labels.tolist() == [i % 5 for i in range(12)]

    # Unknown labels become -1.
    write_tar(
        tmp_path / "mixed.tar",
        [*good_members("l", 1), ("u.png", encode(colour_image(2)))],
    )
    reader = ShardReader(str(tmp_path / "mixed.tar"), require_label=False)
    (batch,) = list(iter_batches(reader, preprocess, 8))
    assert batch.keys == ["l", "u"] and batch.labels.tolist() == [1, -1]
    assert [b.shape for b in batch.boxes] == [(0, 4), (0, 4)]


def test_iter_batches_records_preprocess_errors(shard_dir: Path) -> None:
    good = Preprocess(8)

    def flaky(image: Image.Image, boxes: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if np.asarray(image)[0, 0, 0] == 7:  # sample index 1
            raise ValueError("cannot preprocess this one")
        return good(image, boxes)

    reader = ShardReader(str(shard_dir / "shard-000000.tar"))
    batches = list(iter_batches(reader, flaky, 2))
    assert [b.keys for b in batches] == [["s0_0", "s0_2"], ["s0_3"]]
    assert reader.errors == [
        ErrorRecord(
            shard=reader.url,
            key="s0_1",
            stage="preprocess",
            message="ValueError: cannot preprocess this one",
        )
    ]
    assert reader.complete

    # Without anywhere to record it, the error reaches the consumer.
    samples = list(ShardReader(str(shard_dir / "shard-000000.tar")))
    with pytest.raises(ValueError, match="cannot preprocess"):
        list(iter_batches(samples, flaky, 2))


def test_iter_batches_early_stop_does_not_hang(shard_dir: Path) -> None:
    closed = threading.Event()
    produced = []

    def endless() -> Any:
        try:
            index = 0
            while True:
                produced.append(index)
                yield Sample(
                    key=f"k{index}", shard="s", image=colour_image(index), label=1, boxes=[]
                )
                index += 1
        finally:
            closed.set()

    started = time.monotonic()
    batches = iter_batches(endless(), Preprocess(8), 2, prefetch=1)
    first = next(batches)
    assert first.keys == ["k0", "k1"]
    batches.close()
    assert closed.wait(5.0), "the source iterator was not closed"
    assert time.monotonic() - started < 5.0
    # Bounded read-ahead: at most a few batches were prepared beyond the consumer.
    assert len(produced) <= 2 * 4
    assert not any(t.name == "opticam-batches" and t.is_alive() for t in threading.enumerate())

    # Breaking out of a for loop over a real reader also stops it.
    reader = ShardReader(str(shard_dir / "shard-000000.tar"))
    for _ in iter_batches(reader, Preprocess(8), 1):
        break
    time.sleep(0.05)
    assert not reader.complete
    assert not any(t.name == "opticam-batches" and t.is_alive() for t in threading.enumerate())


def test_iter_batches_propagates_source_errors() -> None:
    def broken() -> Any:
        yield Sample(key="a", shard="s", image=colour_image(0), label=0)
        raise RuntimeError("source exploded")

    with pytest.raises(RuntimeError, match="source exploded"):
        list(iter_batches(broken(), Preprocess(8), 4))
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_batches([], Preprocess(8), 0))


@pytest.mark.parametrize("label", [2**63, -(2**63) - 1, 10**40, 1.5, "3", True])
def test_a_label_that_does_not_fit_int64_costs_its_sample_not_the_batch(label: Any) -> None:
    # A source other than ShardReader may hand over any label; collating it into the
    # batch's int64 tensor must not fail the samples batched with it.
    samples = [
        Sample(key=key, shard="s", image=colour_image(i), label=value)
        for i, (key, value) in enumerate([("a", 1), ("bad", label), ("b", 2**63 - 1)])
    ]
    errors: list[ErrorRecord] = []
    (batch,) = list(iter_batches(samples, Preprocess(12), 8, errors=errors))
    assert batch.keys == ["a", "b"] and batch.labels.tolist() == [1, 2**63 - 1]
    assert [(e.key, e.stage) for e in errors] == [("bad", "label")]
    assert "label" in errors[0].message and len(errors[0].message) < 300
