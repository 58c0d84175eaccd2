"""The run comparer of .ci/compare_runs.py: equal runs pass, a changed value does not."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from report_run import make_synthetic_run
from scripts import load_script

from opticam.report import build_report


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    return load_script(".ci/compare_runs.py", "compare_runs")


def _run(root: Path) -> Path:
    run, _ = make_synthetic_run(str(root), shards=2, per_shard=3)
    build_report(run, n_boot=20, seed=0, gallery_size=0)
    return Path(run)


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    """The same job run twice (new timestamps), the first run's folder copied aside."""
    first = _run(tmp_path / "job")
    before = tmp_path / "before" / first.name
    shutil.copytree(first, before)
    shutil.rmtree(tmp_path / "job")
    after = _run(tmp_path / "job")
    assert after == first
    return before, after


def _rewrite_rows(run: Path, compare: ModuleType, column: str, change) -> Path:
    path = next(iter(compare.parquet_files(run, "rows").values()))
    file = pq.ParquetFile(path)
    table = file.read()
    index = table.schema.get_field_index(column)
    table = table.set_column(index, table.schema.field(index), change(table.column(index)))
    pq.write_table(table.replace_schema_metadata(file.schema_arrow.metadata), path)
    return path


def test_two_runs_of_one_job_are_equal_apart_from_timings(compare, runs, capsys) -> None:
    before, after = runs
    _rewrite_rows(after, compare, "seconds", lambda c: pc.add(c, 1.0))
    assert compare.main([str(before), str(after)]) == 0
    assert "equal" in capsys.readouterr().out


def test_a_changed_value_is_a_difference_named_by_its_column(compare, runs, capsys) -> None:
    before, after = runs
    path = _rewrite_rows(after, compare, "drop", lambda c: pc.add(c, 1e-9))
    assert compare.main([str(before), str(after)]) == 1
    assert f"rows/{path.name}: column 'drop' differs" in capsys.readouterr().out


def test_the_older_layout_and_column_names_compare_equal(compare, runs) -> None:
    before, after = runs
    # As schema version 2 wrote them (spelt here, not taken from the script under test).
    old_names = {"map_bytes": "saliency", "map_shape": "saliency_shape"}
    folder = compare.rows_folder(before)
    legacy = before / "shards"
    for path in compare.parquet_files(before, "rows").values():
        file = pq.ParquetFile(path)
        table = file.read()
        table = table.rename_columns([old_names.get(n, n) for n in table.column_names])
        path.unlink()
        legacy.mkdir(exist_ok=True)
        pq.write_table(
            table.replace_schema_metadata(file.schema_arrow.metadata), legacy / path.name
        )
    if folder != legacy:
        shutil.rmtree(folder)
    assert compare.main([str(before), str(after)]) == 0


def test_a_run_from_before_the_prior_columns_compares_equal_unless_they_hold_values(
    compare, runs, capsys
) -> None:
    import json

    before, after = runs
    # As schema version 3 wrote them: no prior columns, no prior fields in the status.
    for path in compare.parquet_files(before, "rows").values():
        file = pq.ParquetFile(path)
        meta = dict(file.schema_arrow.metadata)
        status = json.loads(meta[b"opticam.shard_status"])
        for key in ("prior_sha256", "n_calibration"):
            del status[key]
        meta[b"opticam.shard_status"] = json.dumps(status).encode()
        table = file.read().drop_columns(["prior_role", "prior_sha256", "channel_weights"])
        pq.write_table(table.replace_schema_metadata(meta), path)
    assert compare.main([str(before), str(after)]) == 0
    capsys.readouterr()
    path = _rewrite_rows(
        after, compare, "prior_role", lambda c: pc.if_else(pc.is_null(c), "prior", c)
    )
    assert compare.main([str(before), str(after)]) == 1
    assert f"rows/{path.name}: columns" in capsys.readouterr().out
