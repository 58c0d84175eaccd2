"""Run folders written by schema version 2 (rows files in ``shards/``, map columns
``saliency`` and ``saliency_shape``) read back like the same rows written today."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from report_run import make_synthetic_run
from store_rows import lowres_row, status_for, write_version_2_run

from opticam import cli, store
from opticam.config import RunConfig


def some_rows() -> list[dict]:
    """Rows of two shards: low-resolution maps, and one full PNG map per shard."""
    rng = np.random.default_rng(11)
    rows = []
    for shard in ("s3://b/train/0.tar", "s3://b/val/0.tar"):
        for i in range(3):
            rows.append(lowres_row(shard, f"k{i}", "opticam", rng.random((4, 4)), 16))
        full = rng.random((16, 16))
        png = {"map_bytes": store.encode_full_png(full), "map_shape": [16, 16]}
        rows.append({**lowres_row(shard, "k0", "fakecam", full, 16), **png})
        rows[-1].update(map_format="full_png", normalization="none", target_layer=None)
    return rows


def write_today(run: str, rows: list[dict]) -> None:
    for shard in dict.fromkeys(r["shard"] for r in rows):
        mine = [r for r in rows if r["shard"] == shard]
        status = status_for(shard, n_rows=len(mine))
        store.write_errors(run, "r", [], status)
        store.write_rows(run, store.rows_to_table(mine), status)


def test_a_version_2_run_reads_back_like_the_same_rows_written_today(tmp_path: Path) -> None:
    rows = some_rows()
    today, old = str(tmp_path / "today"), tmp_path / "old"
    write_today(today, rows)
    files = write_version_2_run(old, rows)
    assert sorted(p.parent.name for p in files.values()) == ["shards", "shards"]
    assert pq.read_schema(files[rows[0]["shard"]]).metadata[b"opticam.schema_version"] == b"2"

    table = store.read_rows(str(old))
    assert table.equals(store.read_rows(today)) and table.num_rows == len(rows)
    some = ["key", "map_shape", "map_format"]
    assert store.read_rows(str(old), some).equals(store.read_rows(today, some))
    only_val = pc.field("shard") == "s3://b/val/0.tar"
    assert store.read_rows(str(old), ["key"], filter=only_val).num_rows == 4

    # Maps: from read_rows' table, by (shard, key, method), and from a file read as is.
    expected = store.load_maps(today, store.read_rows(today))
    assert len(expected) == len(rows)
    wanted = list(expected)
    raw = pq.read_table(files[rows[0]["shard"]])
    assert "saliency" in raw.column_names and "map_bytes" not in raw.column_names
    from_file = store.load_maps(str(old), raw)
    assert len(from_file) == 4
    for got in (store.load_maps(str(old), table), store.load_maps(str(old), wanted), from_file):
        assert set(got) <= set(expected) and (len(got) == len(expected) or got is from_file)
        for k, saliency_map in got.items():
            np.testing.assert_array_equal(saliency_map, expected[k])
    png_row = raw.slice(3, 1).to_pylist()[0]  # a row dict under the old names
    assert png_row["map_format"] == "full_png"
    key = (png_row["shard"], png_row["key"], png_row["method"])
    np.testing.assert_array_equal(store.decode_map(png_row), expected[key])

    names = sorted(store.shard_name(s) for s in files)
    assert store.list_done_rows(str(old)) == store.list_done_rows(today) == names
    for shard in files:
        assert store.is_done(str(old), shard)
        status = store.read_status(str(old), shard)
        assert status is not None and (status.n_rows, status.schema_version) == (4, "2")
    assert not store.is_done(str(old), "s3://b/other.tar")
    assert store.read_status(str(old), "s3://b/other.tar") is None
    statuses = store.read_statuses(str(old))
    assert [s["done"] for s in statuses] == [True, True]
    assert all(s["rows_bytes"] == files[s["shard"]].stat().st_size for s in statuses)


def test_check_done_rows_accepts_a_version_2_run_and_sets_damaged_files_aside(
    tmp_path: Path,
) -> None:
    rows = some_rows()
    run = tmp_path / "old"
    files = write_version_2_run(run, rows)
    names = sorted(store.shard_name(s) for s in files)
    checked = store.check_done_rows(str(run))
    assert (checked.done, checked.damaged) == (names, {})

    damaged = files[rows[0]["shard"]]
    damaged.write_bytes(damaged.read_bytes()[:-10])
    name = store.shard_name(rows[0]["shard"])
    checked = store.check_done_rows(str(run))
    assert checked.done == [n for n in names if n != name]
    assert "bytes" in checked.damaged[name]
    moved = Path(store.set_aside(str(run), name))
    assert moved.parent == run / "damaged" and not damaged.exists()
    assert store.list_done_rows(str(run)) == checked.done
    assert not store.is_done(str(run), rows[0]["shard"])


def test_a_version_2_run_is_never_resumed_and_its_report_is_todays(tmp_path: Path) -> None:
    run, rows = make_synthetic_run(str(tmp_path / "today"), shards=2, per_shard=4)
    run_json = store.read_run_json(run)
    assert run_json is not None
    old = tmp_path / "old" / run_json["run_id"]
    write_version_2_run(old, rows, run_json=run_json)

    config = RunConfig.model_validate(run_json["config"])
    assert config.run_id == run_json["run_id"]  # the same job
    with pytest.raises(store.RunCollisionError, match="schema version 2, this is version 4"):
        store.check_run_json(str(old), config)
    with pytest.raises(store.RunCollisionError, match="stay readable"):
        store.write_run_json(str(old), config, run_json["shards"])
    assert json.loads((old / "run.json").read_text())["schema_version"] == "2"  # untouched
    assert store.read_rows(str(old)).equals(store.read_rows(run))

    assert cli.main(["report", run]) == 0
    assert cli.main(["report", str(old)]) == 0
    summary = pq.read_table(old / "report" / "summary.parquet")
    assert summary.equals(pq.read_table(Path(run) / "report" / "summary.parquet"))
    page = (old / "report" / "index.html").read_text()
    assert "<td>shards finished</td><td>2 of 2</td>" in page
    assert "per-image rows in <code>shards/*.parquet</code>" in page
    assert (old / "report" / "figures" / "gallery.png").exists()  # its maps were decoded
    assert (
        "per-image rows in <code>rows/*.parquet</code>"
        in (Path(run) / "report" / "index.html").read_text()
    )
