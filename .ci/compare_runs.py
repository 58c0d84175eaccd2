#!/usr/bin/env python3
"""Compare two run folders of the same job: equal apart from timings and timestamps.

    .venv/bin/python .ci/compare_runs.py BEFORE_RUN AFTER_RUN

Made for refactors that must change no output (issue 18): run the demo on the commit
before and on the commit after, then compare the two run folders. The script reads the
files with pyarrow alone, not with opticam's readers, so that a reader bug cannot hide a
writer change. It knows the layout and schema changes made on purpose and maps the old
names to the new ones before comparing:

- the rows files' folder, ``shards/`` before schema version 3, ``rows/`` since;
- the map columns ``saliency`` -> ``map_bytes`` and ``saliency_shape`` -> ``map_shape``
  (schema version 3), ``saliency_kind`` -> ``map_format`` (version 2);
- the class prior's columns and status fields (version 4), which an older file lacks:
  equal when the newer file's are null or at their defaults (no prior in the job).

What is left out, because it measures time or when things happened: the rows' ``seconds``
column, the statuses' ``seconds``, ``finished``, ``rows_bytes`` and ``rows_sha256`` (the
rows file holds those timings, so its size and hash follow them), the summary's
``seconds_per_image*`` columns and its ``s/img`` column, ``run.json``'s ``created`` and
``updated``. URLs in the statuses are compared from their run folder's name (the run id) on. The schema version
itself is printed, not compared.

Exit status 0 when everything else is equal, 1 otherwise (each difference is printed).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROWS_FOLDERS = ("rows", "shards")  # current first, then the name before schema version 3
RENAMED_COLUMNS = {
    "saliency": "map_bytes",  # schema version 3
    "saliency_shape": "map_shape",  # schema version 3
    "saliency_kind": "map_format",  # schema version 2
}
# Columns and status fields added on purpose: absent from an older file, they compare
# equal to a newer file's all-null column or the field's default.
ADDED_COLUMNS = {"prior_role", "prior_sha256", "channel_weights"}  # schema version 4
ADDED_STATUS = {"prior_sha256": "", "n_calibration": 0}  # schema version 4
ROW_TIMINGS = {"seconds"}
STATUS_TIMINGS = {"seconds", "finished", "rows_bytes", "rows_sha256"}
STATUS_PATHS = {"rows_url", "errors_url"}
SUMMARY_TIMING_PREFIX = "seconds_per_image"
RUN_JSON_TIMES = {"created", "updated"}
ROW_ORDER = ["shard", "key", "method"]


def main(argv: list[str]) -> int:
    """Compare the run folders named in ``argv``; print each difference."""
    if len(argv) != 2:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        print("usage: compare_runs.py BEFORE_RUN AFTER_RUN", file=sys.stderr)
        return 2
    before, after = (Path(a).resolve() for a in argv)
    for run in (before, after):
        if not (run / "run.json").is_file():
            print(f"{run}: no run.json, not a run folder", file=sys.stderr)
            return 2
    problems: list[str] = []
    problems += compare_run_json(before, after)
    problems += compare_tables(before, after, "rows", ROW_TIMINGS)
    problems += compare_tables(before, after, "errors", set())
    problems += compare_statuses(before, after)
    problems += compare_summary(before, after)
    for problem in problems:
        print(f"DIFFERENT {problem}")
    if problems:
        print(f"{len(problems)} difference(s)")
        return 1
    print("equal (timings and timestamps aside)")
    return 0


def rows_folder(run: Path) -> Path:
    """The folder that holds the run's rows files, under its current or older name."""
    for name in ROWS_FOLDERS:
        if (run / name).is_dir():
            return run / name
    return run / ROWS_FOLDERS[0]


def parquet_files(run: Path, kind: str) -> dict[str, Path]:
    """``{file name: path}`` of the run's rows or errors files."""
    folder = rows_folder(run) if kind == "rows" else run / kind
    return {p.name: p for p in sorted(folder.glob("*.parquet")) if not p.name.startswith(".")}


def renamed(table: pa.Table) -> pa.Table:
    """``table`` with the columns renamed on purpose under their current names."""
    return table.rename_columns([RENAMED_COLUMNS.get(n, n) for n in table.column_names])


def compare_tables(before: Path, after: Path, kind: str, leave_out: set[str]) -> list[str]:
    """Differences between the rows (or errors) files of two runs, file by file."""
    old, new = parquet_files(before, kind), parquet_files(after, kind)
    problems = (
        [f"{kind}: file sets {sorted(old)} != {sorted(new)}"] if old.keys() != new.keys() else []
    )
    print(f"{kind}: {len(old)} file(s) before, {len(new)} after")
    for name in sorted(old.keys() & new.keys()):
        a, b = (renamed(pq.read_table(p)) for p in (old[name], new[name]))
        for column in ADDED_COLUMNS & (set(b.column_names) - set(a.column_names)):
            if b.column(column).null_count == b.num_rows:
                b = b.drop_columns([column])
        if sorted(a.column_names) != sorted(b.column_names):
            problems.append(f"{kind}/{name}: columns {a.column_names} != {b.column_names}")
            continue
        keep = [c for c in b.column_names if c not in leave_out]
        order = [(c, "ascending") for c in ROW_ORDER if c in keep]
        a, b = (t.select(keep).sort_by(order) if order else t.select(keep) for t in (a, b))
        if a.num_rows != b.num_rows:
            problems.append(f"{kind}/{name}: {a.num_rows} rows != {b.num_rows}")
            continue
        for column in keep:
            if not a.column(column).equals(b.column(column).cast(a.schema.field(column).type)):
                problems.append(f"{kind}/{name}: column {column!r} differs")
    return problems


def stored_status(path: Path) -> dict[str, Any]:
    """The shard status JSON in a Parquet file's metadata (empty when it has none)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"opticam.shard_status")
    return dict(json.loads(raw)) if raw else {}


def comparable_status(status: dict[str, Any], run: Path) -> dict[str, Any]:
    """A status without its timings, with its run-folder URLs made relative."""
    out = {k: v for k, v in status.items() if k not in STATUS_TIMINGS | {"schema_version"}}
    for key, default in ADDED_STATUS.items():
        if status and out.get(key, default) == default:
            out.pop(key, None)
    for key in STATUS_PATHS & out.keys():
        out[key] = relative(str(out[key]), run)
    return out


def relative(url: str, run: Path) -> str:
    """``url`` after its run folder (named by the run id), with the rows folder under its
    current name."""
    text = url.rsplit(f"/{run.name}/", 1)[-1]
    return re.sub(rf"^({'|'.join(ROWS_FOLDERS)})/", f"{ROWS_FOLDERS[0]}/", text)


def compare_statuses(before: Path, after: Path) -> list[str]:
    """Differences between the statuses stored in the rows and errors files."""
    problems = []
    for kind in ("rows", "errors"):
        old, new = parquet_files(before, kind), parquet_files(after, kind)
        versions = set()
        for name in sorted(old.keys() & new.keys()):
            a, b = stored_status(old[name]), stored_status(new[name])
            versions.add((a.get("schema_version"), b.get("schema_version")))
            if comparable_status(a, before) != comparable_status(b, after):
                problems.append(f"{kind}/{name}: status {a} != {b}")
        print(f"{kind} statuses: schema version (before, after) {sorted(versions, key=str)}")
    return problems


def compare_summary(before: Path, after: Path) -> list[str]:
    """Differences between the reports' ``summary.parquet`` and ``summary.md``."""
    problems = []
    tables = [pq.read_table(run / "report" / "summary.parquet") for run in (before, after)]
    a, b = (
        t.select([c for c in t.column_names if not c.startswith(SUMMARY_TIMING_PREFIX)])
        for t in tables
    )
    if not a.equals(b):
        problems.append("report/summary.parquet differs")
    texts = [
        without_timing((run / "report" / "summary.md").read_text("utf-8"))
        for run in (before, after)
    ]
    if texts[0] != texts[1]:
        problems.append("report/summary.md differs")
    print(f"summary: {a.num_rows} method row(s), {len(texts[1].splitlines())} lines of summary.md")
    return problems


def without_timing(markdown: str) -> str:
    """summary.md with the last cell of each row of the tables whose last column is ``s/img`` blanked."""
    lines, timed = [], False
    for line in markdown.splitlines():
        if not line.startswith("|"):
            timed = False
        elif "s/img" in line:
            timed = True
        elif timed:
            cells = line.rstrip("|").split("|")
            line = "|".join([*cells[:-1], " · "]) + "|"
        lines.append(line)
    return "\n".join(lines)


def compare_run_json(before: Path, after: Path) -> list[str]:
    """Differences between the two ``run.json`` files (times left out)."""
    a, b = (json.loads((run / "run.json").read_text("utf-8")) for run in (before, after))
    print(
        f"run.json: run id {a.get('run_id')} -> {b.get('run_id')}, "
        f"schema version {a.get('schema_version')} -> {b.get('schema_version')}"
    )
    problems = []
    for key in sorted((a.keys() | b.keys()) - RUN_JSON_TIMES - {"schema_version"}):
        if a.get(key) != b.get(key):
            problems.append(f"run.json: {key!r} {a.get(key)!r} != {b.get(key)!r}")
    return problems


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
