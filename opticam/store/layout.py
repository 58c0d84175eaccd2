"""Where a run's files live: the run folder, its names, and atomic writes to any fsspec URL.

One run lives in one folder (a local path, ``s3://``, ...)::

    <output>/<run_id>/run.json                 job, config without secrets, versions, shards
    <output>/<run_id>/shards/<name>.parquet    rows: one per (image, method)
    <output>/<run_id>/errors/<name>.parquet    one row per bad sample / failed step
    <output>/<run_id>/report/                  written by opticam.report

``<name>`` is :func:`shard_name` of the input shard's URL: its basename without the
``.tar`` extension, made filename-safe, plus 8 hex digits of the SHA-256 of the full URL
(two shards called ``train/0.tar`` and ``val/0.tar`` never share a name). Two kinds of URL
meet here and are named apart everywhere: a *shard URL* is an input tar, a *rows URL*
(:func:`rows_url`) and an *errors URL* (:func:`errors_url`) are this run's output files
for it.

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
    "atomic_write_bytes",
    "failing_for_good",
    "permanent_cause",
    "storage_failure",
    "invalidate",
    "is_local",
    "errors_url",
    "filesystem",
    "join",
    "list_parquet",
    "report_url",
    "rows_url",
    "run_json_url",
    "run_url",
    "shard_file",
    "shard_name",
]

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
    """The shard's file name, without credentials: ``s3://b/train/shard-03.tar`` ->
    ``shard-03.tar`` (what people look for in logs and in the Prefect UI)."""
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
    """URL of the rows file of input shard ``shard_url`` in run folder ``run``."""
    return join(run, "shards", f"{shard_name(shard_url)}.parquet")


def errors_url(run: str, shard_url: str) -> str:
    """URL of the errors file of input shard ``shard_url`` in run folder ``run``."""
    return join(run, "errors", f"{shard_name(shard_url)}.parquet")


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


def list_parquet(folder: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, list[str]]:
    """``(fs, sorted paths)`` of the Parquet files in a folder (hidden/temp files left out)."""
    fs, path = filesystem(folder, storage_options)
    invalidate(fs, path)
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
    """The :class:`~opticam.errors.StorageFailedError` for a failed write of ``url``, or
    None when the error may go away (a network hiccup: retry it)."""
    if isinstance(exc, StorageFailedError):
        return exc
    cause = permanent_cause(exc)
    if cause is None:
        return None
    detail = redact_text(" ".join(str(exc).split()))
    return StorageFailedError(redact_url(url), cause, detail)


@contextlib.contextmanager
def failing_for_good(url: str) -> Any:
    """Turn an error that will not go away, raised in the block, into a
    :class:`~opticam.errors.StorageFailedError` naming ``url``; others pass unchanged."""
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
