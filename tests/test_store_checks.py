"""Damaged rows files: found when planning, set aside, computed again, left out of reports."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import tiny

from opticam import pipeline, store
from opticam.demo import make_shards

# ``factory:tiny:build`` resolves to the suite's TinyNet (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("tiny_factory")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return make_shards(str(tmp_path_factory.mktemp("demo")), 4, 3, seed=5)


def finished_run(shards: list[str], output: Path) -> tuple[Any, str, list[Path]]:
    """A run of every shard with Fake-CAM only; returns (config, run URL, rows files)."""
    config = tiny.make_config(shards, output, methods=["fakecam"])
    for url in shards:
        pipeline.process_shard(config, url, "cpu")
    run = pipeline.run_url_of(config)
    return config, run, [Path(store.rows_url(run, url)) for url in shards]


def test_the_errors_file_records_the_rows_file_as_written(
    shards: list[str], tmp_path: Path
) -> None:
    _, run, files = finished_run(shards[:1], tmp_path)
    status = store.read_statuses(run)[0]
    data = files[0].read_bytes()
    assert status["rows_bytes"] == len(data)
    assert status["rows_sha256"] == hashlib.sha256(data).hexdigest()
    assert store.check_done_rows(run).done == [store.shard_name(shards[0])]


def test_damaged_rows_files_are_set_aside_and_computed_again(
    shards: list[str], tmp_path: Path
) -> None:
    config, run, files = finished_run(shards, tmp_path)
    originals = [f.read_bytes() for f in files]
    names = [store.shard_name(u) for u in shards]
    # Other bytes of the same size, half a file, an empty file, another shard's rows.
    files[0].write_bytes(bytes(len(originals[0])))
    files[1].write_bytes(originals[1][: len(originals[1]) // 2])
    files[2].write_bytes(b"")
    shutil.copyfile(files[3], tmp_path / "copy")
    os.replace(tmp_path / "copy", files[0].with_name("elsewhere.parquet"))
    damaged = [f.read_bytes() for f in files[:3]]

    checked = store.check_done_rows(run)
    assert checked.done == [names[3]]
    assert "bytes" in checked.damaged[names[1]] and "written" in checked.damaged[names[1]]
    assert checked.damaged[names[2]] == "the file is empty"
    assert "not a readable Parquet file" in checked.damaged[names[0]]
    assert "another shard" in checked.damaged["elsewhere"]

    plan = pipeline.plan_shards(config)
    pending = pipeline.pending_shards(config, plan)
    assert [p["name"] for p in pending] == names[:3]
    assert sorted(pending.damaged) == sorted(names[:3])  # 'elsewhere' is not planned
    for name, data in zip(names[:3], damaged, strict=True):
        why, moved = pending.damaged[name]
        assert Path(moved).parent == Path(run) / "damaged" and why
        assert Path(moved).read_bytes() == data  # kept for a person to look at
    assert [f.exists() for f in files] == [False, False, False, True]

    for p in pending:
        pipeline.process_shard(config, p["url"], "cpu")
    again = store.check_done_rows(run)
    assert sorted(again.done) == sorted(names) and list(again.damaged) == ["elsewhere"]
    assert store.read_rows(run, ["key"]).num_rows == 12 + 3  # 'elsewhere' holds 3 rows


def test_a_run_written_before_sizes_were_recorded_is_checked_by_its_footer(
    shards: list[str], tmp_path: Path
) -> None:
    _, run, files = finished_run(shards[:2], tmp_path)
    for path in (Path(run) / "errors").iterdir():
        path.unlink()  # no recorded size for either shard
    assert len(store.check_done_rows(run).done) == 2
    files[0].write_bytes(files[0].read_bytes()[:-10])
    checked = store.check_done_rows(run)
    assert list(checked.damaged) == [store.shard_name(shards[0])]


def test_bytes_changed_inside_a_page_are_caught_when_read(
    shards: list[str], tmp_path: Path
) -> None:
    _, run, files = finished_run(shards[:2], tmp_path)
    data = bytearray(files[0].read_bytes())
    key_column = store.SCHEMA.get_field_index("key")
    column = pq.ParquetFile(files[0]).metadata.row_group(0).column(key_column)
    data[column.data_page_offset + column.total_compressed_size // 2] ^= 0xFF
    assert store.check_done_rows(run).damaged == {}  # size and footer intact: planned done
    files[0].write_bytes(bytes(data))
    unreadable: dict[str, str] = {}
    rows = store.read_rows(run, ["key", "shard"], unreadable=unreadable)
    assert set(rows.column("shard").to_pylist()) == {shards[1]}
    assert list(unreadable) == [str(files[0])]
    assert "could not be read" in unreadable[str(files[0])]


def test_the_report_names_an_unreadable_file_and_builds_from_the_rest(
    shards: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from opticam import cli

    _, run, files = finished_run(shards[:3], tmp_path)
    files[1].write_bytes(b"not parquet at all")
    errors_file = Path(store.errors_url(run, shards[2]))
    errors_file.write_bytes(errors_file.read_bytes()[:20])
    assert cli.main(["report", run]) == 0
    summary = (Path(run) / "report" / "summary.md").read_text()
    assert files[1].name in summary and errors_file.name in summary
    assert "could not be read" in summary
    html = (Path(run) / "report" / "index.html").read_text()
    assert files[1].name in html
    table = pq.read_table(Path(run) / "report" / "summary.parquet").to_pylist()
    assert [r["images"] for r in table] == [6]  # shards 0 and 2, 3 images each
