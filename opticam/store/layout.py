"""Where a run's files live: the run folder, its names, and atomic writes to any fsspec URL.

One run lives in one folder (a local path, ``s3://``, ...)::

    <output>/<run_id>/run.json                 job, config without secrets, versions, shards
    <output>/<run_id>/rows/<name>.parquet      rows: one per (image, method)
    <output>/<run_id>/errors/<name>.parquet    one row per bad sample / failed step
    <output>/<run_id>/calibration/<name>.parquet   the class prior's calibration rows
    <output>/<run_id>/prior/<layer>.parquet    the class prior (jobs with start prior)
    <output>/<run_id>/report/                  written by opticam.report

``<name>`` is :func:`shard_name` of the input shard's URL: its basename without the
``.tar`` extension, made filename-safe, plus 8 hex digits of the SHA-256 of the full URL
(two shards called ``train/0.tar`` and ``val/0.tar`` never share a name). Two kinds of URL
meet here and are named apart everywhere: a *shard URL* is an input tar, a *rows URL*
(:func:`rows_url`) and an *errors URL* (:func:`errors_url`) are this run's output files
for it.

Runs written before schema version 3 hold their rows files in ``shards/``
(:data:`LEGACY_ROWS_FOLDERS`). New rows files always go to :data:`ROWS_FOLDER`; whatever
reads rows files finds them in either through :func:`find_rows_file` (one shard) or
:func:`list_rows_files` (the whole run), so an older run stays readable.

Every file is written in one piece (:func:`atomic_write_bytes`), so a reader never sees a
partial file and a writer that fails midway leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from opticam.errors import StorageFailedError
from opticam.redact import redact_text, redact_url

__all__ = [
    "CALIBRATION_FOLDER",
    "PRIOR_FOLDER",
    "calibration_url",
    "prior_url",
    "LEGACY_ROWS_FOLDERS",
    "ROWS_FOLDER",
    "atomic_write_bytes",
    "failing_for_good",
    "permanent_cause",
    "storage_failure",
    "invalidate",
    "is_local",
    "errors_url",
    "filesystem",
    "find_rows_file",
    "join",
    "list_parquet",
    "list_rows_files",
    "report_url",
    "rows_folders",
    "rows_url",
    "run_json_url",
    "run_url",
    "shard_file",
    "shard_name",
]

#: Folder of a run that its rows files are written to.
ROWS_FOLDER = "rows"
#: Folders that older versions wrote rows files to, read but never written: ``shards``
#: up to schema version 2. The one list of them; every reader goes through
#: :func:`rows_folders`.
LEGACY_ROWS_FOLDERS = ("shards",)
#: Folder of the calibration rows of a job with a class prior, one file per walked shard.
CALIBRATION_FOLDER = "calibration"
#: Folder of the class prior files of a job (one per target layer).
PRIOR_FOLDER = "prior"

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")


def join(base: str, *parts: str) -> str:
    """``base/part/...`` with single slashes (URLs and local paths alike)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def run_url(output: str, run_id: str) -> str:
    """``<output>/<run_id>``; a local output becomes an absolute path."""
    if "://" not in output:
        output = os.path.abspath(os.path.expanduser(output))
    return join(output, run_id)


def shard_file(shard_url: str) -> str:
    """The shard's file name, without credentials (what people look for in logs and the UI).

    ``s3://b/train/shard-03.tar`` -> ``shard-03.tar``.
    """
    return redact_url(shard_url).rstrip("/").rsplit("/", 1)[-1]


def shard_name(shard_url: str) -> str:
    """Filename-safe, unique name for a shard URL: ``<stem>-<sha256(url)[:8]>``.

    ``s3://bucket/train/shard-000003.tar`` -> ``shard-000003-1a2b3c4d``. The URL is hashed
    without its credentials (:func:`opticam.redact.redact_url`): a name never depends on
    a password.
    """
    shard_url = redact_url(shard_url)
    base = shard_file(shard_url)
    for suffix in _TAR_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    stem = _NAME_UNSAFE.sub("_", base).strip("._-")[:80] or "shard"
    digest = hashlib.sha256(shard_url.encode("utf-8")).hexdigest()[:8]
    return f"{stem}-{digest}"


def rows_url(run: str, shard_url: str) -> str:
    """URL of the rows file of input shard ``shard_url`` in run folder ``run``.

    That is where it is written; an older run may hold it in a legacy folder (see
    :func:`find_rows_file`).
    """
    return join(run, ROWS_FOLDER, f"{shard_name(shard_url)}.parquet")


def rows_folders(run: str) -> list[str]:
    """The folders of run folder ``run`` that may hold rows files, the current one first.

    That is :data:`ROWS_FOLDER`, then :data:`LEGACY_ROWS_FOLDERS`.
    """
    return [join(run, folder) for folder in (ROWS_FOLDER, *LEGACY_ROWS_FOLDERS)]


def errors_url(run: str, shard_url: str) -> str:
    """URL of the errors file of input shard ``shard_url`` in run folder ``run``."""
    return join(run, "errors", f"{shard_name(shard_url)}.parquet")


def calibration_url(run: str, shard_url: str) -> str:
    """URL of the calibration rows of input shard ``shard_url`` (jobs with a class prior)."""
    return join(run, CALIBRATION_FOLDER, f"{shard_name(shard_url)}.parquet")


def prior_url(run: str, layer: str) -> str:
    """URL of the class prior of target layer ``layer`` in run folder ``run``."""
    stem = _NAME_UNSAFE.sub("_", layer).strip("._-")[:80] or "layer"
    return join(run, PRIOR_FOLDER, f"{stem}.parquet")


def report_url(run: str) -> str:
    """URL of the report folder of run folder ``run``."""
    return join(run, "report")


def run_json_url(run: str) -> str:
    """URL of ``run.json`` in run folder ``run``."""
    return join(run, "run.json")


def filesystem(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` of a URL."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path


def is_local(fs: Any) -> bool:
    """Whether ``fs`` is the local filesystem (paths there are shown without a protocol)."""
    return isinstance(fs, LocalFileSystem)


def invalidate(fs: Any, path: str) -> None:
    """Forget cached listings of ``path``.

    s3fs (and other object stores) cache listings; what another process wrote since
    must be visible to a resume or a report.
    """
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def _parquet_entries(fs: Any, path: str) -> list[tuple[str, int | None]]:
    """``(path, size or None)`` of the Parquet files in folder ``path`` of ``fs``, sorted.

    Hidden and temporary files (``.name``, ``_name``) are left out; a missing folder is
    empty.
    """
    invalidate(fs, path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = str(entry["name"])
        base = name.rsplit("/", 1)[-1]
        if (
            entry.get("type") == "file"
            and base.endswith(".parquet")
            and not base.startswith((".", "_"))
        ):
            size = entry.get("size")
            found.append((name, None if size is None else int(size)))
    return sorted(found)


def list_parquet(folder: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, list[str]]:
    """``(fs, sorted paths)`` of the Parquet files in a folder (hidden/temp files left out)."""
    fs, path = filesystem(folder, storage_options)
    return fs, [p for p, _ in _parquet_entries(fs, path)]


def list_rows_files(
    run: str, storage_options: Mapping[str, Any] | None
) -> tuple[Any, dict[str, tuple[str, int | None]]]:
    """``(fs, {name: (path, size or None)})`` of every rows file of run folder ``run``.

    Sorted by name, from :data:`ROWS_FOLDER` and the :data:`LEGACY_ROWS_FOLDERS`.

    ``name`` is the file's name without ``.parquet`` (:func:`shard_name` of its shard). A
    name in more than one folder is taken from the first in :func:`rows_folders` order.
    One listing per folder: a run of today costs one listing more than its own folder.
    """
    fs, base = filesystem(run, storage_options)
    found: dict[str, tuple[str, int | None]] = {}
    for folder in rows_folders(base):
        for path, size in _parquet_entries(fs, folder):
            found.setdefault(path.rsplit("/", 1)[-1][: -len(".parquet")], (path, size))
    return fs, dict(sorted(found.items()))


def find_rows_file(
    run: str, name: str, storage_options: Mapping[str, Any] | None
) -> tuple[Any, str | None]:
    """``(fs, path or None)`` of the rows file called ``name`` in run folder ``run``.

    ``name`` is a :func:`shard_name`. The file is looked for in each of
    :func:`rows_folders` in turn, one request per folder tried (a done shard of today:
    one request, no listing).
    """
    fs, base = filesystem(run, storage_options)
    for folder in rows_folders(base):
        path = join(folder, f"{name}.parquet")
        invalidate(fs, folder)
        if fs.exists(path):
            return fs, path
    return fs, None


_PERMANENT_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the storage",
}
# What object stores (s3fs, gcsfs, adlfs) put in the messages of errors that stay.
_PERMANENT_WORDS = (
    ("NoSuchBucket", "the bucket does not exist"),
    ("bucket does not exist", "the bucket does not exist"),
    ("AccessDenied", "permission denied"),
    ("Access Denied", "permission denied"),
    ("QuotaExceeded", "a storage quota is exceeded"),
    ("quota", "a storage quota is exceeded"),
    ("InvalidAccessKeyId", "the credentials are refused"),
    ("SignatureDoesNotMatch", "the credentials are refused"),
    ("No space left", "no space left on device"),
    ("Read-only file system", "read-only file system"),
)


def permanent_cause(exc: BaseException) -> str | None:
    """Why a failed write will fail again however long one waits, or None (retry it).

    Errors that stay: no space, a quota, permission denied, a read-only file system
    (by ``errno``), and an object store's missing bucket, refused access or
    credentials, or quota (by the error code in the message). A missing folder is one
    too: writes create their folders, so it was removed while the run went on.
    """
    if isinstance(exc, StorageFailedError):
        return exc.cause
    for error in (exc, exc.__cause__, exc.__context__):
        if isinstance(error, OSError) and error.errno in _PERMANENT_ERRNOS:
            return _PERMANENT_ERRNOS[error.errno]
    if isinstance(exc, PermissionError):
        return "permission denied"
    text = str(exc)
    for word, cause in _PERMANENT_WORDS:
        if word.lower() in text.lower():
            return cause
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return "the output folder or bucket no longer exists"
    return None


def storage_failure(exc: BaseException, url: str) -> StorageFailedError | None:
    """The :class:`~opticam.errors.StorageFailedError` for a failed write of ``url``.

    None when the error may go away (a network hiccup: retry it).
    """
    if isinstance(exc, StorageFailedError):
        return exc
    cause = permanent_cause(exc)
    if cause is None:
        return None
    detail = redact_text(" ".join(str(exc).split()))
    return StorageFailedError(redact_url(url), cause, detail)


@contextlib.contextmanager
def failing_for_good(url: str) -> Any:
    """Make an error that will not go away, raised in the block, a storage failure.

    It becomes a :class:`~opticam.errors.StorageFailedError` naming ``url``; other
    errors pass unchanged.
    """
    try:
        yield
    except OSError as exc:
        failure = storage_failure(exc, url)
        if failure is None or failure is exc:
            raise
        raise failure from exc


def atomic_write_bytes(
    url: str, data: bytes, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write ``data`` to ``url`` so that no reader ever sees a partial file.

    Local files: a hidden temporary file in the destination folder is written, flushed,
    fsync'ed and renamed over the destination (``os.replace`` is atomic within a
    filesystem); on any error the temporary file is removed and the destination keeps its
    previous content (or stays absent). Other filesystems: one ``pipe_file`` call with the
    complete bytes, i.e. one PUT (or one completed multipart upload) on S3.

    Raises:
        opticam.errors.StorageFailedError: the storage refused the write for good (no
            space, a quota, permission, a read-only file system, a missing bucket).
        OSError: a failure that may go away (worth retrying).
    """
    with failing_for_good(url):
        _atomic_write(url, data, storage_options)


def _atomic_write(url: str, data: bytes, storage_options: Mapping[str, Any] | None) -> None:
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
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
    invalidate(fs, path.rsplit("/", 1)[0])
