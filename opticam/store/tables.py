"""The run's tables: Parquet schemas, shard status, and writing and reading rows and errors.

- ``rows/<name>.parquet`` holds the *rows* of one input shard, one per (image, method),
  with schema :data:`SCHEMA`. Its presence means the shard is done. Runs written before
  schema version 3 hold it in ``shards/``, which every reader here reads too
  (:data:`opticam.store.layout.LEGACY_ROWS_FOLDERS`).
- ``errors/<name>.parquet`` holds its *error rows* (:data:`ERRORS_SCHEMA`), one per bad
  sample or failed step, with the ``stage`` names of :data:`opticam.names.STAGES`. The
  pipeline writes it first, so a done shard always has one.

What happened to a shard (:class:`ShardStatus`: complete or truncated, counts, time) is
stored as JSON in the key-value metadata (key :data:`STATUS_KEY`) of both files, and a
truncated shard also gets an error row with stage ``"incomplete"`` so that table-only
readers see it too.

Schema versions: version 2 renamed the map format column ``saliency_kind`` to
``map_format`` (the config field and CLI flag have the same name); version 3 moved the
rows files from ``shards/`` to ``rows/`` and renamed the map columns ``saliency`` and
``saliency_shape`` to ``map_bytes`` and ``map_shape`` (:data:`RENAMED_COLUMNS`); version
4 added the class prior's columns (``prior_role``, ``prior_sha256``, ``channel_weights``),
which read as null in older runs. :func:`read_rows` reads runs of every version and always returns the current schema.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from opticam.errors import short_repr, shorten
from opticam.redact import redact_text, redact_url
from opticam.store.layout import (
    atomic_write_bytes,
    errors_url,
    find_rows_file,
    is_local,
    join,
    list_parquet,
    list_rows_files,
    rows_url,
    shard_name,
)

__all__ = [
    "ERRORS_SCHEMA",
    "RENAMED_COLUMNS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "STATUS_KEY",
    "ShardStatus",
    "is_done",
    "list_done_rows",
    "previous_names",
    "read_errors",
    "read_rows",
    "read_statuses",
    "rows_file_bytes",
    "rows_to_table",
    "write_errors",
    "write_rows",
]

logger = logging.getLogger("opticam.store")

#: Version of the layout and of :data:`SCHEMA`; stored in run.json and file metadata.
SCHEMA_VERSION = "4"
#: Key of the shard status JSON in the Parquet key-value metadata.
STATUS_KEY = "opticam.shard_status"

_F64 = pa.float64()
_CURVE = pa.list_(pa.float32())

#: One row per (image, method). Fractions, not percent: AD = 100 * mean(drop), etc.
SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),  # input shard URL
        pa.field("key", pa.string(), nullable=False),  # sample __key__
        pa.field("method", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("target_layer", pa.string()),  # null for methods without a layer
        pa.field("label", pa.int64()),  # ground truth, null when unknown
        pa.field("predicted", pa.int64(), nullable=False),  # argmax of the clean logits
        pa.field("target", pa.int64(), nullable=False),  # class explained
        pa.field("p_clean", _F64, nullable=False),  # softmax prob of target, clean image
        pa.field("p_masked", _F64, nullable=False),  # same on x * M
        pa.field("drop", _F64, nullable=False),  # max(0, p - o) / p
        pa.field("gain", _F64, nullable=False),  # max(0, o - p) / (1 - p)
        pa.field("increase", _F64, nullable=False),  # [p < o] as 0.0 / 1.0
        pa.field("insertion_auc", _F64),  # predicted class; null when disabled
        pa.field("deletion_auc", _F64),
        pa.field("insertion_curve", _CURVE),  # steps + 1 probabilities
        pa.field("deletion_curve", _CURVE),
        pa.field("pointing_game", _F64),  # localization: null without boxes
        pa.field("energy_in_box", _F64),
        pa.field("f1", _F64),
        pa.field("loc_error", _F64),
        pa.field("box_acc", _F64),
        pa.field("iterations", pa.int32()),  # Opti-CAM optimizer steps; null otherwise
        pa.field("constant_map", pa.bool_(), nullable=False),  # map was constant (all ones)
        pa.field("seconds", _F64, nullable=False),  # method time per image (batch time / B)
        pa.field("map_bytes", pa.binary(), nullable=False),  # the map, see opticam.store.maps
        pa.field("map_shape", pa.list_(pa.int32()), nullable=False),  # [h, w] of map_bytes
        pa.field("map_format", pa.string(), nullable=False),  # "lowres" | "full_png"
        pa.field("input_height", pa.int32(), nullable=False),
        pa.field("input_width", pa.int32(), nullable=False),
        pa.field("normalization", pa.string(), nullable=False),  # "range" | "max" | ...
        # The class prior (schema 4); null in jobs without one. names.PRIOR_ROLES.
        pa.field("prior_role", pa.string()),
        pa.field("prior_sha256", pa.string()),  # the prior a "prior"/"fallback" row used
        pa.field("channel_weights", pa.list_(pa.float32())),  # softmax(u*), calibration rows
    ],
    metadata={"opticam.schema_version": SCHEMA_VERSION},
)

#: Every column renamed since schema version 1, as ``(old name, new name, version that
#: renamed it)``. Files of older versions are read back under the current names
#: (:func:`read_rows`, :func:`opticam.store.decode_map`); the one list of renames.
RENAMED_COLUMNS = (
    ("saliency_kind", "map_format", "2"),
    ("saliency", "map_bytes", "3"),
    ("saliency_shape", "map_shape", "3"),
)


def _previous_names() -> dict[str, tuple[str, ...]]:
    renamed_to = {old: new for old, new, _ in RENAMED_COLUMNS}
    found: dict[str, list[str]] = {}
    for old, new, _ in sorted(RENAMED_COLUMNS, key=lambda r: int(r[2]), reverse=True):
        while new in renamed_to:  # renamed again later: file it under today's name
            new = renamed_to[new]
        found.setdefault(new, []).append(old)
    return {name: tuple(olds) for name, olds in found.items()}


_PREVIOUS_NAMES = _previous_names()


def previous_names(column: str) -> tuple[str, ...]:
    """The names a current :data:`SCHEMA` column had in older schema versions, newest first.

    Empty for a column never renamed: ``previous_names("map_bytes")`` is
    ``("saliency",)``.
    """
    return _PREVIOUS_NAMES.get(column, ())


#: One row per sample or step that failed (key null for a shard-level problem).
ERRORS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ],
    metadata={"opticam.schema_version": SCHEMA_VERSION},
)


@dataclass
class ShardStatus:
    """What happened to one input shard.

    Stored in its files' metadata, returned by :func:`opticam.pipeline.process_shard`,
    and passed around by the flows.

    Attributes:
        shard: the input shard's URL.
        name: :func:`opticam.store.shard_name` of it.
        rows_url: URL of its rows file in the run.
        errors_url: URL of its errors file in the run.
        complete: False when the tar was truncated/unreadable (rows hold what was read).
        n_samples: samples read from the shard (bad ones included).
        n_images: images with at least one row.
        n_rows: rows written (images x methods that succeeded).
        n_errors: error rows written.
        max_images: per-shard image limit of the run, or None.
        limit_reached: reading stopped at ``max_images``.
        seconds: wall time of the whole shard.
        device: where it ran.
        resize_size: the model's resize size (shorter side before the centre crop, or the
            squashed side), so that readers can rebuild the exact model inputs from the
            data shards, with the three settings below.
        interpolation: the resize's resampling filter (``bilinear`` before it was recorded).
        resize_mode: ``shorter`` or ``squash`` (``shorter`` before it was recorded).
        crop_rounding: ``round`` or ``floor`` (``round`` before it was recorded).
        finished: ISO 8601 UTC time the files were written.
        skipped: True when nothing was computed: the shard was already done, or another
            worker holds its lease (then ``held_by`` names that worker).
        held_by: the lease owner that kept this call from computing the shard.
        worker: the Prefect worker whose flow run computed the shard (executor
            ``deployments``); empty for a local run.
        rows_bytes: size of the rows file as written; recorded in the errors file's
            status (a file cannot hold its own size), None before it was recorded.
        rows_sha256: SHA-256 (hex) of the rows file as written; like ``rows_bytes``.
        prior_sha256: SHA-256 (hex) of the class prior file the shard's Opti-CAM rows
            started from (``<run>/prior/<layer>.parquet``); empty in a job without one.
        n_calibration: images of the shard in the prior's calibration sample (explained
            at the paper's setting before the rest of the job).
        schema_version: :data:`SCHEMA_VERSION` of the files.
    """

    shard: str
    name: str
    rows_url: str = ""
    errors_url: str = ""
    complete: bool = True
    n_samples: int = 0
    n_images: int = 0
    n_rows: int = 0
    n_errors: int = 0
    max_images: int | None = None
    limit_reached: bool = False
    seconds: float = 0.0
    device: str = ""
    resize_size: int | None = None
    interpolation: str = "bilinear"
    resize_mode: str = "shorter"
    crop_rounding: str = "round"
    finished: str = ""
    skipped: bool = False
    held_by: str = ""
    worker: str = ""
    rows_bytes: int | None = None
    rows_sha256: str = ""
    prior_sha256: str = ""
    n_calibration: int = 0
    schema_version: str = field(default=SCHEMA_VERSION)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (what a Prefect task returns)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardStatus:
        """The status of a dict from :meth:`to_dict` or a file's metadata (extra keys ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------- writes


def _table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    # Page checksums: a reader that verifies them finds bytes changed in storage.
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue()


def rows_file_bytes(table: pa.Table, status: ShardStatus) -> bytes:
    """The bytes of a shard's rows file: ``table`` (schema :data:`SCHEMA`) and its status.

    Raises:
        ValueError: the table does not have the opticam schema.
    """
    if not table.schema.equals(SCHEMA, check_metadata=False):
        raise ValueError(f"rows table does not have the opticam schema:\n{table.schema}")
    return _table_bytes(_with_status(table, status))


def _with_status(table: pa.Table, status: ShardStatus) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    public = {**asdict(status), "shard": redact_url(status.shard)}
    meta[STATUS_KEY.encode()] = json.dumps(public, sort_keys=True).encode()
    return table.replace_schema_metadata(meta)


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts with every :data:`SCHEMA` column) -> a table with exactly that schema.

    Raises:
        ValueError: a column is missing or unknown, or a non-nullable value is None.
    """
    names = set(SCHEMA.names)
    for i, row in enumerate(rows):
        missing = names - set(row)
        unknown = set(row) - names
        if missing or unknown:
            raise ValueError(
                f"row {i} does not match the opticam schema: missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}"
            )
        for f in SCHEMA:
            if not f.nullable and row[f.name] is None:
                raise ValueError(f"row {i}: column {short_repr(f.name)} must not be null")
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def write_rows(
    run: str,
    table: pa.Table | bytes,
    status: ShardStatus,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write the rows file of one shard (marks the shard done); returns its URL.

    Args:
        run: run folder URL.
        table: the rows (schema :data:`SCHEMA`), or the file's bytes from
            :func:`rows_file_bytes` (so that their size and checksum could be recorded
            first).
        status: the shard status stored in the file metadata (``table`` given).
        storage_options: fsspec options of the output.
    """
    data = table if isinstance(table, bytes) else rows_file_bytes(table, status)
    url = rows_url(run, status.shard)
    atomic_write_bytes(url, data, storage_options)
    return url


def write_errors(
    run: str,
    run_id: str,
    errors: Iterable[Any],
    status: ShardStatus,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write the error rows of one shard (possibly none); returns the errors URL.

    Args:
        run: run folder URL.
        run_id: the run id (a column, so that error tables of runs can be concatenated).
        errors: records with ``shard``, ``key``, ``stage``, ``message`` attributes (e.g.
            :class:`opticam.data.ErrorRecord`) or mappings with those keys.
        status: the shard status stored in the file metadata.
        storage_options: fsspec options of the output.
    """
    rows = []
    for err in errors:
        get = err.get if isinstance(err, Mapping) else lambda k, e=err: getattr(e, k)
        # Messages may quote a URL with its credentials (an exception's text).
        rows.append(
            {
                "run_id": run_id,
                "shard": redact_url(str(get("shard") or status.shard)),
                "key": None if get("key") is None else str(get("key")),
                "stage": str(get("stage")),
                "message": redact_text(str(get("message"))),
            }
        )
    table = pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)
    url = errors_url(run, status.shard)
    atomic_write_bytes(url, _table_bytes(_with_status(table, status)), storage_options)
    return url


# --------------------------------------------------------------------------- reads


def is_done(run: str, shard_url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether the rows file of one shard exists.

    One request for a done shard (two for one not done, which may be in the legacy
    folder of an older run), never a listing.
    """
    _, path = find_rows_file(run, shard_name(shard_url), storage_options)
    return path is not None


def list_done_rows(run: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names (:func:`opticam.store.shard_name`) of the shards whose rows file exists, sorted.

    Found in ``rows/``, or in ``shards/`` for a run written before schema version 3.
    """
    _, files = list_rows_files(run, storage_options)
    return list(files)


def _dataset(files: list[str], fs: Any, schema: pa.Schema) -> pads.Dataset:
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    # Page checksums verified: bytes changed in storage fail the read of that file.
    parquet = pads.ParquetFileFormat(
        default_fragment_scan_options=pads.ParquetFragmentScanOptions(
            page_checksum_verification=True
        )
    )
    return pads.dataset(
        files, schema=schema, format=parquet, filesystem=PyFileSystem(FSSpecHandler(fs))
    )


def _read_table(
    files: list[str],
    fs: Any,
    schema: pa.Schema,
    unreadable: dict[str, str] | None,
    columns: list[str] | None = None,
    filter: Any = None,
) -> pa.Table:
    """The files' rows as one table.

    Files that cannot be read are left out, logged, and named in ``unreadable``
    (``{URL: why}``) when the caller passes a dict.
    """
    from opticam.store.checks import readable_files

    good, bad = readable_files(fs, files)

    def left_out(path: str, why: str) -> None:
        url = path if is_local(fs) else str(fs.unstrip_protocol(path))
        logger.warning("left out of what was read: %s: %s", redact_url(url), why)
        if unreadable is not None:
            unreadable[redact_url(url)] = why

    for path, why in bad.items():
        left_out(path, why)
    empty = schema.empty_table() if columns is None else schema.empty_table().select(columns)
    if not good:
        return empty
    try:
        return _dataset(good, fs, schema).to_table(columns=columns, filter=filter)
    except (OSError, pa.ArrowException):
        pass  # a damaged page somewhere: read file by file to keep the others
    tables = []
    for path in good:
        try:
            tables.append(_dataset([path], fs, schema).to_table(columns=columns, filter=filter))
        except (OSError, pa.ArrowException) as exc:
            left_out(path, shorten(f"its data could not be read ({type(exc).__name__}: {exc})"))
    return pa.concat_tables(tables) if tables else empty


# What rows files of every version are read with: the current columns (nullable, since a
# file of an older version lacks the renamed ones) plus their previous names. Columns a
# file lacks read as null, so one dataset reads a run of any version, or of several.
_READ_SCHEMA = pa.schema(
    [f.with_nullable(True) for f in SCHEMA]
    + [f.with_name(old).with_nullable(True) for f in SCHEMA for old in previous_names(f.name)],
    metadata=SCHEMA.metadata,
)


def read_rows(
    run: str,
    columns: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    filter: Any = None,
    *,
    unreadable: dict[str, str] | None = None,
) -> pa.Table:
    """All rows of the run's finished shards (an empty table with the schema if none).

    Runs written with an older schema version are read too: rows files in the legacy
    ``shards/`` folder, and renamed columns under the current names (a ``filter`` on a
    renamed column sees null in files that hold it under its old name). A rows file that cannot be read (damaged in storage) is left out and logged.

    Args:
        run: run folder URL.
        columns: subset of :data:`SCHEMA` columns (skipping ``map_bytes`` is much faster).
        storage_options: fsspec options of the output.
        filter: optional ``pyarrow.dataset`` expression, e.g. ``pc.field("method") == "opticam"``.
        unreadable: a dict that receives ``{file URL: why}`` for each file left out.

    Raises:
        KeyError: a column that is not in :data:`SCHEMA`.
    """
    wanted = list(SCHEMA.names if columns is None else columns)
    unknown = [c for c in wanted if c not in SCHEMA.names]
    if unknown:
        raise KeyError(f"unknown column(s) {unknown} (known: {', '.join(SCHEMA.names)})")
    fs, found = list_rows_files(run, storage_options)
    files = [path for path, _ in found.values()]
    if not files:
        return SCHEMA.empty_table().select(wanted)
    read = wanted + [old for c in wanted for old in previous_names(c)]
    table = _read_table(files, fs, _READ_SCHEMA, unreadable, columns=read, filter=filter)
    for column in wanted:
        olds = list(previous_names(column))
        if olds:  # each file holds one of the names: the others read as null
            merged = pc.coalesce(table.column(column), *(table.column(o) for o in olds))
            table = table.set_column(table.schema.get_field_index(column), column, merged)
            table = table.drop_columns(olds)
    return table.cast(pa.schema([SCHEMA.field(c) for c in wanted], metadata=SCHEMA.metadata))


def read_errors(
    run: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    unreadable: dict[str, str] | None = None,
) -> pa.Table:
    """All error rows of the run (schema :data:`ERRORS_SCHEMA`).

    Damaged files are left out, logged, and named in ``unreadable`` as in
    :func:`read_rows`.
    """
    fs, files = list_parquet(join(run, "errors"), storage_options)
    if not files:
        return ERRORS_SCHEMA.empty_table()
    return _read_table(files, fs, ERRORS_SCHEMA, unreadable)


def read_status(
    run: str, shard_url: str, storage_options: Mapping[str, Any] | None = None
) -> ShardStatus | None:
    """The status stored in a shard's rows file, or None when the shard is not done."""
    fs, path = find_rows_file(run, shard_name(shard_url), storage_options)
    if path is None:
        return None
    try:
        stored = _stored_status(fs, path)
    except FileNotFoundError:
        return None
    if stored is None:
        return ShardStatus(shard="", name=shard_name(shard_url))
    return ShardStatus.from_dict(stored)


def _stored_status(fs: Any, path: str) -> dict[str, Any] | None:
    """The status JSON in a Parquet file's metadata (:data:`STATUS_KEY`), or None."""
    with fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    raw = meta.get(STATUS_KEY.encode())
    return dict(json.loads(raw)) if raw else None


def read_statuses(
    run: str, storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The :class:`ShardStatus` (as dicts) of every shard that has an errors file.

    A shard with an errors file but no rows file was attempted and failed (or is being
    written); ``done`` in each dict says whether its rows file exists.
    """
    fs, files = list_parquet(join(run, "errors"), storage_options)
    done = set(list_done_rows(run, storage_options))
    out = []
    for path in files:
        try:
            stored = _stored_status(fs, path)
        except Exception:  # a damaged errors file: the shard is known by its name only
            stored = None
        status = stored or {"name": path.rsplit("/", 1)[-1][:-8]}
        status["done"] = status.get("name") in done
        out.append(status)
    return out
