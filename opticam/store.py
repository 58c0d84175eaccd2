"""The run layout in object storage: Parquet schema, atomic writes, readers.

One run lives in one folder (any fsspec URL: a local path, ``s3://``, ...)::

    <output>/<run_id>/run.json                 job, config without secrets, versions, shards
    <output>/<run_id>/shards/<name>.parquet    one row per (image, method), schema SCHEMA
    <output>/<run_id>/errors/<name>.parquet    one row per bad sample / failed step
    <output>/<run_id>/report/                  written by opticam.report

``<name>`` is :func:`shard_name` of the shard URL: its basename without the ``.tar``
extension, made filename-safe, plus 8 hex digits of the SHA-256 of the full URL (two
shards called ``train/0.tar`` and ``val/0.tar`` never share a name).

A shard is *done* when ``shards/<name>.parquet`` exists. Every file here is written in one
piece: locally to a hidden temporary file in the same folder, then ``os.replace``; on
object stores with a single ``pipe_file`` of the fully serialized bytes (a completed PUT or
multipart upload is atomic on S3). A reader never sees a partial file, and a writer that
fails midway leaves nothing behind. The pipeline writes the errors file first and the shard
file last, so a done shard always has its errors file.

Shard-level status (complete or truncated, sample counts, time) is stored as JSON in the
key-value metadata (key ``opticam.shard_status``) of both files, and a truncated shard also
gets an error row with stage ``"incomplete"`` so that table-only readers see it too.

Maps are stored compactly (see :data:`SCHEMA` and :func:`decode_map`): ``saliency_kind
= "lowres"`` holds the low-resolution map ``s`` (h, w) as float16 little-endian row-major
bytes; the full map is ``n(up(s))`` with ``up`` bilinear upsampling (align_corners=False)
to ``input_height x input_width`` and ``n`` the row's ``normalization``. For the
scale-invariant normalizations (``range``, ``max``) ``s`` is stored divided by
``max |s|``, which keeps float16 precise and changes nothing after ``n``.
``saliency_kind = "full_png"`` holds the full map as an 8-bit grayscale PNG
(value = round(255 * m)), used for methods without a low-resolution form (Fake-CAM) or
when the config asks for full maps.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    from opticam.config import RunConfig

__all__ = [
    "ERRORS_SCHEMA",
    "MAP_KINDS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "STATUS_KEY",
    "RunCollisionError",
    "ShardStatus",
    "atomic_write_bytes",
    "check_run_json",
    "decode_map",
    "encode_full_png",
    "encode_lowres",
    "errors_url",
    "list_done_shards",
    "load_maps",
    "package_versions",
    "read_errors",
    "read_rows",
    "read_run_json",
    "read_shard_status",
    "report_url",
    "rows_to_table",
    "run_url",
    "shard_name",
    "shard_url",
    "write_errors",
    "write_run_json",
    "write_shard",
]

#: Version of the layout and of :data:`SCHEMA`; stored in run.json and file metadata.
SCHEMA_VERSION = "1"
#: Key of the shard status JSON in the Parquet key-value metadata.
STATUS_KEY = "opticam.shard_status"
MAP_KINDS = ("lowres", "full_png")

_F64 = pa.float64()
_CURVE = pa.list_(pa.float32())

#: One row per (image, method). Fractions, not percent: AD = 100 * mean(drop), etc.
SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),  # shard URL
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
        pa.field("saliency", pa.binary(), nullable=False),  # compact map, see module doc
        pa.field("saliency_shape", pa.list_(pa.int32()), nullable=False),  # [h, w]
        pa.field("saliency_kind", pa.string(), nullable=False),  # "lowres" | "full_png"
        pa.field("input_height", pa.int32(), nullable=False),
        pa.field("input_width", pa.int32(), nullable=False),
        pa.field("normalization", pa.string(), nullable=False),  # "range" | "max" | ...
    ],
    metadata={"opticam.schema_version": SCHEMA_VERSION},
)

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

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")


class RunCollisionError(ValueError):
    """A run folder already holds a run.json for a different job (same run id)."""


@dataclass
class ShardStatus:
    """What happened to one shard (stored in the Parquet metadata, see module doc).

    Attributes:
        shard: shard URL.
        name: :func:`shard_name` of it.
        complete: False when the tar was truncated/unreadable (rows hold what was read).
        n_samples: samples read from the shard (bad ones included).
        n_images: images with at least one row.
        n_rows: rows written (images x methods that succeeded).
        n_errors: error rows written.
        max_images: per-shard image limit of the run, or None.
        limit_reached: reading stopped at ``max_images``.
        seconds: wall time of the whole shard.
        device: where it ran.
        resize_size: the model's resize size (shorter side before the centre crop), so that
            readers can rebuild the exact model inputs from the data shards.
        finished: ISO 8601 UTC time the files were written.
    """

    shard: str
    name: str
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
    finished: str = ""
    schema_version: str = SCHEMA_VERSION


# --------------------------------------------------------------------------- paths


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def run_url(output: str, run_id: str) -> str:
    """``<output>/<run_id>``; a local output becomes an absolute path."""
    if "://" not in output:
        output = os.path.abspath(os.path.expanduser(output))
    return _join(output, run_id)


def shard_name(shard: str) -> str:
    """Filename-safe, unique name for a shard URL: ``<stem>-<sha256(url)[:8]>``.

    ``s3://bucket/train/shard-000003.tar`` -> ``shard-000003-1a2b3c4d``.
    """
    base = shard.rstrip("/").rsplit("/", 1)[-1]
    for suffix in _TAR_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    stem = _NAME_UNSAFE.sub("_", base).strip("._-")[:80] or "shard"
    digest = hashlib.sha256(shard.encode("utf-8")).hexdigest()[:8]
    return f"{stem}-{digest}"


def shard_url(run: str, shard: str) -> str:
    """URL of the rows file of ``shard`` (a shard URL) in run folder ``run``."""
    return _join(run, "shards", f"{shard_name(shard)}.parquet")


def errors_url(run: str, shard: str) -> str:
    """URL of the errors file of ``shard`` (a shard URL) in run folder ``run``."""
    return _join(run, "errors", f"{shard_name(shard)}.parquet")


def report_url(run: str) -> str:
    """URL of the report folder of run folder ``run``."""
    return _join(run, "report")


def _fs(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path


def _invalidate(fs: Any, path: str) -> None:
    # s3fs (and other object stores) cache listings; what another process wrote since
    # must be visible to a resume or a report.
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


# --------------------------------------------------------------------------- writes


def atomic_write_bytes(
    url: str, data: bytes, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write ``data`` to ``url`` so that no reader ever sees a partial file.

    Local files: a hidden temporary file in the destination folder is written, flushed,
    fsync'ed and renamed over the destination (``os.replace`` is atomic within a
    filesystem); on any error the temporary file is removed and the destination keeps its
    previous content (or stays absent). Other filesystems: one ``pipe_file`` call with the
    complete bytes, i.e. one PUT (or one completed multipart upload) on S3.
    """
    fs, path = _fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            # mkstemp creates 0600 files; results are meant to be shared like any file
            # written with the usual umask.
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    # Never fs.open(..., "wb") + incremental writes here: fsspec's buffered files commit
    # whatever was written when the context exits, also after an exception.
    fs.pipe_file(path, data)
    _invalidate(fs, path.rsplit("/", 1)[0])


def _table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _with_status(table: pa.Table, status: ShardStatus) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[STATUS_KEY.encode()] = json.dumps(asdict(status), sort_keys=True).encode()
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
                raise ValueError(f"row {i}: column {f.name!r} must not be null")
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def write_shard(
    run: str,
    table: pa.Table,
    status: ShardStatus,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write the rows of one shard (marks the shard done); returns the file URL."""
    if not table.schema.equals(SCHEMA, check_metadata=False):
        raise ValueError(f"shard table does not have the opticam schema:\n{table.schema}")
    url = shard_url(run, status.shard)
    atomic_write_bytes(url, _table_bytes(_with_status(table, status)), storage_options)
    return url


def write_errors(
    run: str,
    run_id: str,
    errors: Iterable[Any],
    status: ShardStatus,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write the error rows of one shard (possibly none); returns the file URL.

    Args:
        run: run folder URL.
        run_id: the run id (a column, so that error tables of runs can be concatenated).
        errors: records with ``shard``, ``key``, ``stage``, ``message`` attributes (e.g.
            :class:`opticam.data.ErrorRecord`) or mappings with those keys.
        status: the shard status stored in the file metadata.
    """
    rows = []
    for err in errors:
        get = err.get if isinstance(err, Mapping) else lambda k, e=err: getattr(e, k)
        rows.append(
            {
                "run_id": run_id,
                "shard": str(get("shard") or status.shard),
                "key": None if get("key") is None else str(get("key")),
                "stage": str(get("stage")),
                "message": str(get("message")),
            }
        )
    table = pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)
    url = errors_url(run, status.shard)
    atomic_write_bytes(url, _table_bytes(_with_status(table, status)), storage_options)
    return url


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes the results (absent ones omitted)."""
    import platform

    versions = {"python": platform.python_version()}
    for name in (
        "opticam",
        "torch",
        "torchvision",
        "grad-cam",
        "numpy",
        "pillow",
        "pyarrow",
        "webdataset",
        "fsspec",
        "s3fs",
        "prefect",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_run_json(
    run: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The run's ``run.json`` as a dict, or None when the run folder has none."""
    fs, path = _fs(_join(run, "run.json"), storage_options)
    _invalidate(fs, path.rsplit("/", 1)[0])
    try:
        with fs.open(path, "rb") as f:
            return dict(json.loads(f.read().decode("utf-8")))
    except FileNotFoundError:
        return None


def check_run_json(
    run: str, config: RunConfig, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The existing run.json of ``run`` (None if absent), after checking it is this job.

    Raises:
        RunCollisionError: the folder holds a run.json of a different job.
    """
    existing = read_run_json(run, storage_options)
    if existing is not None and existing.get("job") != config.job_description():
        raise RunCollisionError(
            f"run folder {run!r} already holds a different job (run id collision or a "
            f"hand-edited run.json); refusing to mix results. Existing job: "
            f"{json.dumps(existing.get('job'), sort_keys=True)}"
        )
    return existing


def write_run_json(
    run: str,
    config: RunConfig,
    shards: Sequence[Mapping[str, Any]],
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<run>/run.json``: job, config (no secrets), versions, shards, schema version.

    An existing run.json of the same job is updated (shard list, versions, config of the
    latest invocation); its ``created`` time is kept.

    Args:
        run: run folder URL.
        config: the job; only :meth:`RunConfig.public_dict` (no storage options) is stored.
        shards: one mapping per planned shard (``url``, ``name``, ``max_images``).

    Raises:
        RunCollisionError: the folder holds a run.json of a different job.
    """
    existing = check_run_json(run, config, storage_options)
    job = config.job_description()
    now = _now()
    payload = {
        "schema_version": SCHEMA_VERSION,
        "run_id": config.run_id,
        "job": job,
        "config": config.public_dict(),
        "shards": [dict(s) for s in shards],
        "versions": package_versions(),
        "created": (existing or {}).get("created", now),
        "updated": now,
    }
    data = json.dumps(payload, indent=2, sort_keys=True).encode("utf-8")
    atomic_write_bytes(_join(run, "run.json"), data, storage_options)
    return payload


# --------------------------------------------------------------------------- reads


def _parquet_files(folder: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, list[str]]:
    fs, path = _fs(folder, storage_options)
    _invalidate(fs, path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return fs, []
    files = [
        p
        for p in entries
        if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_"))
    ]
    return fs, sorted(files)


def list_done_shards(run: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names (:func:`shard_name`) of the shards whose rows file exists, sorted."""
    _, files = _parquet_files(_join(run, "shards"), storage_options)
    return [f.rsplit("/", 1)[-1][: -len(".parquet")] for f in files]


def _read_folder(
    folder: str,
    schema: pa.Schema,
    columns: Sequence[str] | None,
    storage_options: Mapping[str, Any] | None,
    filter: Any = None,
) -> pa.Table:
    fs, files = _parquet_files(folder, storage_options)
    if not files:
        empty = schema.empty_table()
        return empty.select(list(columns)) if columns is not None else empty
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    dataset = pads.dataset(
        files, schema=schema, format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs))
    )
    return dataset.to_table(columns=list(columns) if columns is not None else None, filter=filter)


def read_rows(
    run: str,
    columns: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    filter: Any = None,
) -> pa.Table:
    """All rows of the run's finished shards (an empty table with the schema if none).

    Args:
        run: run folder URL.
        columns: subset of :data:`SCHEMA` columns (skipping ``saliency`` is much faster).
        storage_options: fsspec options of the output.
        filter: optional ``pyarrow.dataset`` expression, e.g. ``pc.field("method") == "opticam"``.
    """
    return _read_folder(_join(run, "shards"), SCHEMA, columns, storage_options, filter)


def read_errors(run: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """All error rows of the run (schema :data:`ERRORS_SCHEMA`)."""
    return _read_folder(_join(run, "errors"), ERRORS_SCHEMA, None, storage_options)


def read_shard_status(
    run: str, storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The :class:`ShardStatus` (as dicts) of every shard that has an errors file.

    A shard with an errors file but no rows file was attempted and failed (or is being
    written); ``done`` in each dict says whether its rows file exists.
    """
    fs, files = _parquet_files(_join(run, "errors"), storage_options)
    done = set(list_done_shards(run, storage_options))
    out = []
    for path in files:
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        raw = meta.get(STATUS_KEY.encode())
        status = json.loads(raw) if raw else {"name": path.rsplit("/", 1)[-1][:-8]}
        status["done"] = status.get("name") in done
        out.append(status)
    return out


# --------------------------------------------------------------------------- maps


def encode_lowres(saliency: np.ndarray, normalization: str) -> bytes | None:
    """Low-resolution map (h, w) -> float16 little-endian row-major bytes, or None.

    For ``range`` and ``max`` normalization the map is divided by ``max |s|`` first (the
    normalized full map is unchanged). None means float16 cannot hold the map faithfully
    (non-finite values, or values beyond float16 range under another normalization): the
    caller stores a full PNG instead.
    """
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"low-resolution saliency must be (h, w), got shape {s.shape}")
    if not np.isfinite(s).all():
        return None
    if normalization in ("range", "max"):
        peak = float(np.abs(s).max()) if s.size else 0.0
        if peak > 0:
            s = s / peak
    elif np.abs(s).max(initial=0.0) > 6.0e4:
        return None
    return np.ascontiguousarray(s.astype("<f2")).tobytes()


def encode_full_png(saliency_map: np.ndarray) -> bytes:
    """Full-resolution map (H, W) in [0, 1] -> 8-bit grayscale PNG bytes (round(255 m))."""
    from PIL import Image

    m = np.asarray(saliency_map, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"full map must be (H, W), got shape {m.shape}")
    q = np.clip(np.rint(np.nan_to_num(m, nan=0.0) * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(q, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _upsample_normalize(
    saliency: np.ndarray, size: tuple[int, int], normalization: str
) -> np.ndarray:
    import torch

    s = torch.from_numpy(np.asarray(saliency, dtype=np.float32))[None, None]
    try:
        # The one definition of M = n(up(S)), shared with the methods themselves.
        from opticam.methods import upsample_normalize
    except ImportError:  # reading results must not need the methods' dependencies
        pass
    else:
        maps, _ = upsample_normalize(s, size, normalization)
        return np.asarray(maps[0, 0].detach().cpu().numpy(), dtype=np.float32)
    if normalization != "range":
        raise ValueError(
            f"rebuilding a map with normalization {normalization!r} needs opticam.methods"
        )
    up = torch.nn.functional.interpolate(s, size=size, mode="bilinear", align_corners=False)
    lo, hi = up.amin(), up.amax()
    out = torch.ones_like(up) if hi <= lo else (up - lo) / (hi - lo)
    return np.asarray(out[0, 0].numpy(), dtype=np.float32)


def decode_map(row: Mapping[str, Any]) -> np.ndarray:
    """Rebuild the full-resolution map (H, W) float32 in [0, 1] of one row.

    ``row`` needs ``saliency``, ``saliency_shape``, ``saliency_kind``, ``input_height``,
    ``input_width`` and ``normalization`` (see the module doc for the two kinds).
    """
    kind = row["saliency_kind"]
    h, w = (int(v) for v in row["saliency_shape"])
    size = (int(row["input_height"]), int(row["input_width"]))
    if kind == "lowres":
        s = np.frombuffer(row["saliency"], dtype="<f2").reshape(h, w).astype(np.float32)
        return _upsample_normalize(s, size, str(row["normalization"]))
    if kind == "full_png":
        from PIL import Image

        with Image.open(io.BytesIO(row["saliency"])) as img:
            q = np.asarray(img.convert("L"), dtype=np.float32)
        if q.shape != (h, w):
            raise ValueError(f"PNG map is {q.shape}, row says {(h, w)}")
        return q / 255.0
    raise ValueError(f"unknown saliency_kind {kind!r} (known: {', '.join(MAP_KINDS)})")


_MAP_COLUMNS = [
    "shard",
    "key",
    "method",
    "saliency",
    "saliency_shape",
    "saliency_kind",
    "input_height",
    "input_width",
    "normalization",
]


def load_maps(
    run: str,
    which: pa.Table | Iterable[Mapping[str, Any]] | Iterable[tuple[str, str, str]],
    storage_options: Mapping[str, Any] | None = None,
) -> dict[tuple[str, str, str], np.ndarray]:
    """Full-resolution maps of some rows, keyed by ``(shard, key, method)``.

    Args:
        run: run folder URL.
        which: rows that carry the map columns (a table from :func:`read_rows`, or
            dicts), or ``(shard URL, key, method)`` tuples to look up in the run.
        storage_options: fsspec options of the output.

    Returns:
        ``{(shard, key, method): map}``, each map (H, W) float32 in [0, 1].

    Raises:
        KeyError: a requested ``(shard, key, method)`` is not in the run.
    """
    rows: list[Mapping[str, Any]]
    if isinstance(which, pa.Table):
        rows = which.select(_MAP_COLUMNS).to_pylist()
    else:
        items = list(which)
        if items and all(isinstance(i, tuple) and len(i) == 3 for i in items):
            import pyarrow.compute as pc

            wanted = {(str(s), str(k), str(m)) for s, k, m in items}  # type: ignore[misc]
            shards = sorted({s for s, _, _ in wanted})
            keys = sorted({k for _, k, _ in wanted})
            expr = pc.field("shard").isin(shards) & pc.field("key").isin(keys)
            table = read_rows(run, _MAP_COLUMNS, storage_options, filter=expr)
            rows = [r for r in table.to_pylist() if (r["shard"], r["key"], r["method"]) in wanted]
            found = {(r["shard"], r["key"], r["method"]) for r in rows}
            missing = wanted - found
            if missing:
                raise KeyError(f"not in run {run!r}: {sorted(missing)[:5]}")
        else:
            rows = items  # type: ignore[assignment]
    return {(str(r["shard"]), str(r["key"]), str(r["method"])): decode_map(r) for r in rows}
