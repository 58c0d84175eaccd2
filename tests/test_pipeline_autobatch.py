"""Batch size auto and the out-of-memory backoff (simulated on the CPU, no GPU needed)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import tiny
import torch

from opticam import pipeline, store
from opticam.config import RunConfig
from opticam.demo import make_shards
from opticam.pipeline import autobatch, shard

#: Batches larger than this "do not fit" in the simulated device memory.
FITS = 2


@pytest.fixture(autouse=True)
def tiny_factory(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    tiny.register(monkeypatch)
    autobatch.clear_batch_sizes()
    yield
    pipeline.clear_model_cache()
    autobatch.clear_batch_sizes()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    # 12 images per shard: three batches of 4, or six of FITS.
    return make_shards(str(tmp_path_factory.mktemp("autobatch")), 2, 12, seed=5)


make_config = tiny.make_config


def count_explain_calls(monkeypatch: pytest.MonkeyPatch, fits: int | None) -> Counter[int]:
    """Count method calls per batch size; above ``fits`` images they run out of memory.

    The error is raised where a real one would be: inside one method's explain + score
    step (:func:`opticam.pipeline.scoring.method_rows`), under the per-method error
    handling of the shard loop.
    """
    calls: Counter[int] = Counter()
    real = shard.method_rows

    def explain(
        config: RunConfig, loaded: Any, method: str, explainer: Any, batch: Any, *a: Any
    ) -> Any:
        size = len(batch.keys)
        calls[size] += 1
        if calls.total() > 50:  # a BaseException: no handler in the pipeline catches it
            pytest.fail("the explain step is retried endlessly")
        if fits is not None and size > fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated): {size} images")
        return real(config, loaded, method, explainer, batch, *a)

    monkeypatch.setattr(shard, "method_rows", explain)
    return calls


def rows_by_image(config: RunConfig) -> dict[tuple[str, str], dict[str, Any]]:
    rows = store.read_rows(pipeline.run_url_of(config)).to_pylist()
    out = {}
    for row in rows:
        assert row.pop("seconds") >= 0  # time, not a result: compared only for sanity
        # Another batch size is another Opti-CAM job (its maps may depend on the batch).
        assert row.pop("run_id") == config.run_id
        out[(row["key"], row["method"])] = row
    assert len(out) == len(rows)
    return out


def test_split_batches_give_the_rows_of_the_smaller_batch_size(
    shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    fixed = make_config(shards, tmp_path / "fixed", batch_size=FITS)
    reference = pipeline.process_shard(fixed, shards[0], "cpu")

    calls = count_explain_calls(monkeypatch, FITS)
    split = make_config(shards, tmp_path / "split", batch_size=4)
    with caplog.at_level(logging.WARNING, logger="opticam.pipeline"):
        result = pipeline.process_shard(split, shards[0], "cpu")

    assert (result.n_images, result.n_rows, result.n_errors) == (12, 36, 0)
    assert (reference.n_images, reference.n_rows) == (12, 36)
    got, want = rows_by_image(split), rows_by_image(fixed)
    assert got.keys() == want.keys()
    for name, row in want.items():
        assert got[name] == row, name  # metrics, classes, maps (bytes), curves: all equal
    # In order too: the rows file lists images and methods as the fixed run does.
    order = ["key", "method"]
    assert store.read_rows(pipeline.run_url_of(split), order).to_pylist() == (
        store.read_rows(pipeline.run_url_of(fixed), order).to_pylist()
    )
    # The size that did not fit was tried once; every later batch went in halves.
    assert calls == {4: 1, 2: 6 * 3}  # the first method ran out: the others never got 4
    assert [r.levelno for r in caplog.records if "out of memory" in r.message] == [logging.WARNING]
    assert "batch size 2 from now on" in caplog.text

    # The next shard of the job starts at the learnt size: 4 is not tried again.
    calls.clear()
    pipeline.process_shard(split, shards[1], "cpu")
    assert calls == {2: 6 * 3}


def test_error_records_are_those_of_the_smaller_batch_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opticam.data import ShardWriter
    from opticam.demo import generate_sample

    url = str(tmp_path / "mixed-000000.tar")
    with ShardWriter(str(tmp_path / "mixed-%06d.tar"), per_shard=100) as writer:
        for i in range(7):
            image, label, _, _ = generate_sample(i, 5)
            # Two labels the model does not have: error records made with the batch's
            # targets (stage "label"), not by the reader.
            cls = tiny.N_CLASSES + 2 if i in (1, 4) else label
            writer.write(_encoded({"__key__": f"k{i}", "png": image, "cls": cls}))
    fixed = make_config(url, tmp_path / "fixed", batch_size=FITS, methods=["gradcam"])
    pipeline.process_shard(fixed, url, "cpu")
    count_explain_calls(monkeypatch, FITS)
    split = make_config(url, tmp_path / "split", batch_size=4, methods=["gradcam"])
    pipeline.process_shard(split, url, "cpu")

    def errors(config: RunConfig) -> list[tuple[str, str]]:
        table = store.read_errors(pipeline.run_url_of(config))
        return [(e["key"], e["stage"]) for e in table.to_pylist()]

    assert errors(split) == errors(fixed) == [("k1", "label"), ("k4", "label")]
    assert rows_by_image(split) == rows_by_image(fixed)


def _encoded(sample: dict[str, Any]) -> dict[str, Any]:
    import io

    buf = io.BytesIO()
    sample["png"].save(buf, format="PNG")
    return {**sample, "png": buf.getvalue()}


def test_out_of_memory_with_one_image_is_a_clear_error(
    shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_explain_calls(monkeypatch, 0)  # nothing fits
    config = make_config(shards, tmp_path, batch_size=4)
    with pytest.raises(pipeline.BatchOutOfMemoryError, match="single image") as info:
        pipeline.process_shard(config, shards[0], "cpu")
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert calls == {4: 1, 2: 1, 1: 1}  # 4, its first half, its first quarter: then stop
    assert store.list_done_rows(pipeline.run_url_of(config)) == []  # a rerun computes it


def test_other_method_errors_still_cost_error_rows_only(
    shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only out-of-memory splits a batch; any other error stays the method's error rows.
    tiny.break_method(monkeypatch)
    config = make_config(shards, tmp_path, methods=["gradcam", "fakecam"])
    result = pipeline.process_shard(config, shards[0], "cpu")
    errors = pq.read_table(result.errors_url).to_pylist()
    assert len(errors) == 12 and {e["stage"] for e in errors} == {"explain"}
    assert result.n_rows == 12


def test_auto_on_the_cpu_is_the_documented_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    many = make_shards(str(tmp_path / "many"), 1, autobatch.CPU_BATCH_SIZE + 3, seed=1)
    calls = count_explain_calls(monkeypatch, None)
    config = make_config(many, tmp_path / "out", batch_size="auto", methods=["fakecam"])
    pipeline.process_shard(config, many[0], "cpu")
    assert calls == {autobatch.CPU_BATCH_SIZE: 1, 3: 1}
    described = RunConfig.model_fields["batch_size"].description or ""
    assert f"on the CPU {autobatch.CPU_BATCH_SIZE} " in described
    assert pipeline.CPU_BATCH_SIZE == autobatch.CPU_BATCH_SIZE


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), (7, 7), ("7", 7)])
def test_batch_size_accepts_auto_and_ints(value: Any, expected: Any, tmp_path: Path) -> None:
    config = make_config("x.tar", tmp_path, batch_size=value)
    assert config.batch_size == expected
    # How a job without Opti-CAM runs, not what it computes: the run id does not change.
    baselines = {"methods": ["gradcam", "fakecam"]}
    assert (
        make_config("x.tar", tmp_path, batch_size=value, **baselines).run_id
        == make_config("x.tar", tmp_path, **baselines).run_id
    )
    # Opti-CAM's maps may depend on the images batched together: another job.
    assert config.run_id != make_config("x.tar", tmp_path).run_id


@pytest.mark.parametrize("value", [0, -3, "big", "AUTO "])
def test_bad_batch_sizes_are_refused(value: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        make_config("x.tar", tmp_path, batch_size=value)


def test_estimate_fits_a_line_through_two_probes() -> None:
    mib = 2**20
    # 100 MiB fixed + 50 MiB per image; 10 GiB free, 80 % of it usable.
    peaks = [100 * mib + 50 * mib * n for n in (2, 4)]
    size = autobatch.estimate_batch_size((2, 4), peaks, 10 * 1024 * mib, safety=0.8, cap=10_000)
    assert size == int((0.8 * 10 * 1024 - 100) / 50)
    assert autobatch.estimate_batch_size((2, 4), peaks, 10 * 1024 * mib, cap=64) == 64
    assert autobatch.estimate_batch_size((2, 4), peaks, 10 * mib) == 1  # never below 1
    # Memory that does not grow: the larger probe's peak per image, counted in full.
    flat = [400 * mib, 400 * mib]
    assert autobatch.estimate_batch_size((2, 4), flat, 1000 * mib, safety=0.8) == 8


class _FakeCuda:
    """Allocator counters of a card with ``free`` bytes where ``n`` images take ``cost(n)``."""

    def __init__(self, free: int, cost: Any) -> None:
        self.free, self.cost, self.peak, self.resets = free, cost, 0, 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 1000)
        monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 1000)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: 1000 + self.peak)
        monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (self.free, 2 * self.free))
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", self._reset)

    def _reset(self, device: Any = None) -> None:
        self.resets += 1
        self.peak = 0

    def run(self, n: int) -> None:
        self.peak = self.cost(n)


def test_auto_on_a_gpu_probes_once_per_job_and_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mib = 2**20
    card = _FakeCuda(free=8000 * mib, cost=lambda n: 200 * mib + 100 * mib * n)
    card.install(monkeypatch)
    probed: list[int] = []

    def probe(n: int) -> None:
        probed.append(n)
        card.run(n)

    config = make_config("x.tar", tmp_path, batch_size="auto")
    key = autobatch.size_key(config, (64, 64), "cuda:0")
    size = autobatch.initial_batch_size(config, key, "cuda:0", probe)
    assert size == int((0.8 * 8000 - 200) / 100) == 62
    assert probed == list(autobatch.PROBE_SIZES)
    # Remembered: the next shard of the job does not probe again.
    assert autobatch.initial_batch_size(config, key, "cuda:0", probe) == 62
    assert probed == list(autobatch.PROBE_SIZES)
    # Another input size (or model, methods, device) is another probe.
    other = autobatch.size_key(config, (128, 128), "cuda:0")
    autobatch.initial_batch_size(config, other, "cuda:0", probe)
    assert len(probed) == 2 * len(autobatch.PROBE_SIZES)
    # A size learnt from an out-of-memory error also bounds an int batch size.
    autobatch.remember_batch_size(key, 16)
    fixed = make_config("x.tar", tmp_path, batch_size=32)
    assert autobatch.initial_batch_size(fixed, key, "cuda:0", probe) == 16
    assert autobatch.initial_batch_size(fixed, other, "cpu", probe) == 32


def test_a_probe_that_runs_out_of_memory_gives_a_small_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _FakeCuda(free=10**9, cost=lambda n: 0).install(monkeypatch)

    def probe(n: int) -> None:
        if n > 2:
            raise torch.OutOfMemoryError("simulated")

    assert autobatch.probe_cuda(probe, "cuda:0") == 2
    assert autobatch.probe_cuda(lambda n: probe(n * 10), "cuda:0") == 1


def _fits(limit: int) -> Any:
    def work(start: int, stop: int) -> tuple[int, int]:
        if stop - start > limit:
            raise torch.OutOfMemoryError("simulated")
        return start, stop

    return work


def test_sizer_halves_odd_batches_and_covers_every_index() -> None:
    first: autobatch.SizeKey = ("a", "", "", "", "cpu")
    assert autobatch.BatchSizer(7, first, "cpu").run(7, _fits(4)) == [(0, 4), (4, 7)]
    second: autobatch.SizeKey = ("b", "", "", "", "cpu")
    sizer = autobatch.BatchSizer(7, second, "cpu")
    assert sizer.run(7, _fits(3)) == [(0, 2), (2, 4), (4, 6), (6, 7)]  # 7 -> 4 -> 2
    assert sizer.size == autobatch.remembered_batch_size(second) == 2
