"""Is a done shard really done? Checking rows files, and setting damaged ones aside.

A rows file can be damaged after it was written: a failed copy, a sync tool, bit rot, a
person who replaced it. Such a file must not count as done, and it must not stop a report.

- :func:`check_done_rows` is what the planner runs: for every rows file in the run's
  listing (``rows/``, and ``shards/`` of a run written before schema version 3), its
  size against the size its errors file recorded (the listing gives the size for free),
  and its Parquet footer (one small read): the footer must parse, hold the opticam
  status, name this shard, and count the rows that status counts.
- :func:`set_aside` moves a damaged file to ``<run>/damaged/`` (never deletes it), so
  the shard is computed again and the bytes stay for a person to look at.
- :func:`readable_files` is what readers run: the files whose footer parses, and why
  the others could not be read.

Bytes changed inside a data page of a file of the right size are found when the file
is read: rows files are written with Parquet page checksums and read with them verified.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from opticam.errors import shorten
from opticam.store.layout import (
    failing_for_good,
    filesystem,
    find_rows_file,
    invalidate,
    is_local,
    join,
    list_rows_files,
)
from opticam.store.tables import STATUS_KEY

__all__ = [
    "DAMAGED_FOLDER",
    "DoneCheck",
    "check_done_rows",
    "readable_files",
    "set_aside",
]

#: Folder of the run that damaged rows files are moved to.
DAMAGED_FOLDER = "damaged"
# Footers read at once from an object store (one small ranged GET each).
_READERS = 16


@dataclass
class DoneCheck:
    """What :func:`check_done_rows` found.

    Attributes:
        done: shard names whose rows file passed every check, sorted.
        damaged: ``{shard name: why the file cannot count as done}``.
    """

    done: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)


def _footer(fs: Any, path: str) -> tuple[Any, dict[str, Any] | None]:
    """``(Parquet metadata, stored status or None)`` of one file; raises when unreadable."""
    with fs.open(path, "rb") as f:
        meta = pq.read_metadata(f)
    raw = (meta.metadata or {}).get(STATUS_KEY.encode())
    return meta, (dict(json.loads(raw)) if raw else None)


def _why_unreadable(exc: BaseException) -> str:
    return shorten(f"not a readable Parquet file ({type(exc).__name__}: {exc})")


def _problem(fs: Any, path: str, name: str, size: int | None, recorded: Any) -> str | None:
    """Why the rows file at ``path`` cannot count as shard ``name`` done, or None."""
    if size == 0:
        return "the file is empty"
    if isinstance(recorded, int) and size is not None and size != recorded:
        return f"the file holds {size} bytes; {recorded} were written"
    try:
        meta, status = _footer(fs, path)
    except Exception as exc:  # any bytes at all may be there
        return _why_unreadable(exc)
    if status is None:
        return "the file holds no opticam shard status (not written by opticam?)"
    if status.get("name") != name:
        return f"the file holds the rows of another shard ({shorten(str(status.get('name')))})"
    if status.get("n_rows") != meta.num_rows:
        return f"the file holds {meta.num_rows} rows; its status counts {status.get('n_rows')}"
    return None


def _recorded_sizes(fs: Any, folder: str, names: list[str]) -> dict[str, Any]:
    """``{name: rows_bytes}`` from the errors files' statuses (missing ones left out)."""

    def read(name: str) -> tuple[str, Any]:
        try:
            _, status = _footer(fs, f"{folder}/{name}.parquet")
        except Exception:  # no errors file, or a damaged one: nothing recorded to check
            return name, None
        return name, (status or {}).get("rows_bytes")

    with ThreadPoolExecutor(1 if is_local(fs) else _READERS) as pool:
        return {n: size for n, size in pool.map(read, names) if size is not None}


def check_done_rows(run: str, storage_options: Mapping[str, Any] | None = None) -> DoneCheck:
    """Check every rows file of a run (see the module doc); nothing is moved or changed.

    Args:
        run: run folder URL.
        storage_options: fsspec options of the output.

    Returns:
        The :class:`DoneCheck`: good shard names, and damaged ones with the reason.
    """
    fs, files = list_rows_files(run, storage_options)
    if not files:
        return DoneCheck()
    names = list(files)
    _, base = filesystem(run, storage_options)
    recorded = _recorded_sizes(fs, join(base, "errors"), names)

    def check(name: str) -> tuple[str, str | None]:
        path, size = files[name]
        return name, _problem(fs, path, name, size, recorded.get(name))

    result = DoneCheck()
    with ThreadPoolExecutor(1 if is_local(fs) else _READERS) as pool:
        for name, problem in pool.map(check, names):
            if problem is None:
                result.done.append(name)
            else:
                result.damaged[name] = problem
    return result


def set_aside(run: str, name: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Move shard ``name``'s rows file to ``<run>/damaged/<name>.<UTC time>.parquet``.

    The file is taken from ``rows/``, or from ``shards/`` in a run written before schema
    version 3.

    Returns:
        The URL it was moved to.

    Raises:
        FileNotFoundError: the run holds no rows file called ``name``.
        opticam.errors.StorageFailedError: the storage refused the move for good.
        OSError: the move failed (the file then stays where it was).
    """
    fs, source = find_rows_file(run, name, storage_options)
    if source is None:
        raise FileNotFoundError(f"no rows file {name}.parquet in {run}")
    _, base = filesystem(run, storage_options)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = join(base, DAMAGED_FOLDER, f"{name}.{stamp}.parquet")
    with failing_for_good(f"{run}/{DAMAGED_FOLDER}"):
        if is_local(fs):
            fs.makedirs(join(base, DAMAGED_FOLDER), exist_ok=True)
        fs.mv(source, target)
    invalidate(fs, source.rsplit("/", 1)[0])
    return str(fs.unstrip_protocol(target)) if not is_local(fs) else target


def readable_files(fs: Any, paths: list[str]) -> tuple[list[str], dict[str, str]]:
    """``(paths whose Parquet footer parses, {other path: why})``, in the given order."""

    def check(path: str) -> tuple[str, str | None]:
        try:
            with fs.open(path, "rb") as f:
                pq.read_metadata(f)
        except Exception as exc:  # any bytes at all may be there
            return path, _why_unreadable(exc)
        return path, None

    good: list[str] = []
    bad: dict[str, str] = {}
    with ThreadPoolExecutor(1 if is_local(fs) else _READERS) as pool:
        for path, problem in pool.map(check, paths):
            if problem is None:
                good.append(path)
            else:
                bad[path] = problem
    return good, bad
