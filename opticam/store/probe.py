"""Prove that the output can be written, before a run does any work.

:func:`check_output` writes one small probe object into the output folder (the parent of
every run folder) and deletes it again. Each way this fails because of the user's setup
becomes an :class:`opticam.errors.OutputError` with one line that names the output URL,
what is wrong and what would fix it:

- a path under a regular file, or an output that is a file;
- a folder this user may not write in, a read-only file system, a full disk;
- an S3 endpoint that does not answer, no AWS credentials, a missing bucket, access
  denied, an invalid bucket name.

Anything else (a bug, a failing disk) keeps its own exception and traceback.

Why a write and not a look: only a write proves write access. ``exists``/``ls`` succeed
on a read-only folder or with read-only credentials, and on S3 a missing bucket and
missing credentials surface only on the first request. The probe is one PUT and one
DELETE (or one small file locally); its name is unique, so concurrent runs never meet.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Mapping
from typing import Any

from fsspec.asyn import sync
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

from opticam.errors import OutputError, short_repr
from opticam.redact import redact_url
from opticam.store.layout import atomic_write_bytes, filesystem, join

__all__ = [
    "CALL_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "PROBE_PREFIX",
    "READ_TIMEOUT_S",
    "TOTAL_ATTEMPTS",
    "check_output",
    "probe_options",
]

#: Seconds the probe waits for a TCP connection to an S3 endpoint (s3fs's default is 5).
CONNECT_TIMEOUT_S = 5
#: Seconds the probe waits for an S3 reply to a request of a few bytes (s3fs's: 15).
READ_TIMEOUT_S = 5
#: Requests botocore makes in all for one probe call, the first one included (botocore's
#: legacy default is 5, with backoff between them).
TOTAL_ATTEMPTS = 2
#: Seconds one probe call (the PUT, the DELETE) may take in all, retries included. The
#: timeouts above do not bound a PUT to an endpoint that accepts the connection and never
#: answers: botocore sends ``Expect: 100-continue`` and aiohttp waits for the 100 without
#: a limit (measured: a probe of such an endpoint never returned). This bound does.
CALL_TIMEOUT_S = 15
#: Start of every probe object's name: hidden, so no listing of run folders ever shows one.
PROBE_PREFIX = ".opticam-probe-"

_S3_PROTOCOLS = ("s3", "s3a")
_FIX = "choose another --output"


def probe_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``storage_options`` that makes a probe of ``url`` give up quickly.

    For S3 URLs, botocore's ``config_kwargs`` get a short connect timeout
    (:data:`CONNECT_TIMEOUT_S`), a short read timeout (:data:`READ_TIMEOUT_S`) and
    :data:`TOTAL_ATTEMPTS` attempts, so a dead endpoint fails in seconds instead of after
    five attempts with backoff. A value the caller set is kept (``retries.max_attempts``
    counts too): someone who asked for ten attempts on a flaky network gets them. Other
    URLs get an unchanged copy.
    """
    options = dict(storage_options or {})
    if get_protocol(url) not in _S3_PROTOCOLS:
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    config.setdefault("read_timeout", READ_TIMEOUT_S)
    retries = dict(config.get("retries") or {})
    if "max_attempts" not in retries:
        # botocore's max_attempts counts retries; total_max_attempts counts every request.
        retries.setdefault("total_max_attempts", TOTAL_ATTEMPTS)
    config["retries"] = retries
    options["config_kwargs"] = config
    return options


def check_output(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Prove that run folders can be written under the output folder ``url``.

    Creates the folder if needed (locally; object stores have no folders), writes a probe
    object named ``.opticam-probe-<uuid4>`` in it and deletes it. Locally the probe goes
    through :func:`opticam.store.layout.atomic_write_bytes`, the writer every result goes
    through; elsewhere through one ``pipe_file`` and one ``rm_file``, on a filesystem
    instance of its own (fsspec's cached one may hold credentials from an earlier
    environment) that gives up quickly (:func:`probe_options`).

    Args:
        url: the output folder (``RunConfig.output``): a local path, ``file://``,
            ``s3://bucket/prefix`` or any fsspec URL.
        storage_options: fsspec options for the output (``RunConfig.output_options()``).

    Raises:
        OutputError: the output cannot be written, in one line with the URL, the reason
            and the fix.
        Exception: anything the probe has no explanation for, unchanged.
    """
    protocol = get_protocol(url)
    if protocol in _S3_PROTOCOLS:
        _check_s3(url, probe_options(url, storage_options))
        return
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        _check_local(url, path, storage_options)
    else:
        _check_other(url, fs, path)


def _probe_name() -> str:
    return f"{PROBE_PREFIX}{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- local


def _nearest_existing(path: str) -> str:
    """``path`` or its closest ancestor that exists (``/`` at worst)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _check_local(url: str, path: str, storage_options: Mapping[str, Any] | None) -> None:
    probe = join(path, _probe_name())
    try:
        atomic_write_bytes(probe, b"opticam output probe\n", storage_options)
        os.unlink(probe)
    except OSError as err:
        # The writer names errors that stay; the probe explains the first write's own.
        raw = err.__cause__ if isinstance(err.__cause__, OSError) else err
        mapped = _local_error(url, path, raw)
        if mapped is None:
            raise
        raise mapped from raw


def _local_error(url: str, path: str, err: OSError) -> OutputError | None:
    """The :class:`OutputError` that explains ``err``; None when it is not the user's."""
    where = _nearest_existing(path)
    prefix = f"output {short_repr(redact_url(url))}:"
    if err.errno in (errno.ENOTDIR, errno.EEXIST) and not os.path.isdir(where):
        return OutputError(
            f"{prefix} {short_repr(where)} is a file, not a folder (remove it or {_FIX})"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return OutputError(
            f"{prefix} permission denied writing in {short_repr(where)} (make it writable or {_FIX})"
        )
    if err.errno == errno.EROFS:
        return OutputError(f"{prefix} {short_repr(where)} is on a read-only file system ({_FIX})")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"{prefix} no space left on the device of {short_repr(where)} (free some space or {_FIX})"
        )
    if err.errno == errno.ENAMETOOLONG:
        return OutputError(f"{prefix} the path is too long for this file system ({_FIX})")
    return None


# --------------------------------------------------------------------------- S3


def _endpoint(options: Mapping[str, Any]) -> str:
    """``the S3 endpoint '<url>'`` the options (or botocore's variables) point at."""
    client_kwargs = options.get("client_kwargs") or {}
    url = (
        client_kwargs.get("endpoint_url")
        or options.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    return f"the S3 endpoint {short_repr(url)}" if url else "AWS's S3 endpoint"


def _error_code(err: BaseException) -> str | None:
    """The S3 error code (``NoSuchBucket``...) of an error s3fs translated, if any."""
    response = getattr(err.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    return str(code) if code else None


def _check_s3(url: str, options: dict[str, Any]) -> None:  # noqa: C901 - one except clause per way an S3 write fails, each with its own fix
    import botocore.exceptions as boto

    # A fresh instance: fsspec caches one per set of options, and a cached one keeps the
    # credentials it found first, so the probe would test a past environment.
    fs, path = filesystem(url, {**options, "skip_instance_cache": True})
    # s3fs retries some connection errors itself, five times, on top of botocore's
    # attempts; the class attribute is read per instance, and this instance is ours.
    fs.retries = 1
    bucket = path.split("/", 1)[0]
    prefix = f"output {short_repr(redact_url(url))}:"
    if not bucket:
        raise OutputError(f"{prefix} no bucket in the URL (use s3://BUCKET/PREFIX)")
    probe = join(path, _probe_name())
    try:
        # fsspec's blocking wrappers (fs.pipe_file) take no time limit; fsspec.asyn.sync
        # does, around the same coroutines, and cancels them when it runs out.
        sync(fs.loop, fs._pipe_file, probe, b"opticam output probe\n", timeout=CALL_TIMEOUT_S)
        sync(fs.loop, fs._rm_file, probe, timeout=CALL_TIMEOUT_S)
    except (boto.NoCredentialsError, boto.PartialCredentialsError) as err:
        raise OutputError(
            f"{prefix} no AWS credentials ({err}) (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or pass --storage-option key=... "
            "--storage-option secret=...)"
        ) from err
    except (FSTimeoutError, boto.ReadTimeoutError, boto.ConnectTimeoutError) as err:
        raise OutputError(
            f"{prefix} {_endpoint(options)} did not answer in time "
            f"({type(err).__name__}) (check --s3-endpoint and that the server is running)"
        ) from err
    except (boto.ConnectionError, boto.HTTPClientError) as err:
        raise OutputError(
            f"{prefix} cannot reach {_endpoint(options)} "
            f"({type(err).__name__}) (check --s3-endpoint and that the server is running)"
        ) from err
    except boto.ParamValidationError as err:
        # botocore's text for a bad name quotes two long regexes; the rule is shorter.
        if "Invalid bucket name" in str(err):
            raise OutputError(
                f"{prefix} {short_repr(bucket)} is not a valid bucket name (3 to 63 lowercase letters, "
                f"digits, dots and hyphens; {_FIX})"
            ) from err
        raise OutputError(f"{prefix} {err} ({_FIX})") from err
    except FileNotFoundError as err:
        # s3fs turns every 404 into FileNotFoundError. S3 says NoSuchBucket; a bare 404 is
        # some other HTTP server at the endpoint (a web server, a proxy, a wrong port).
        code = _error_code(err)
        if code not in (None, "NoSuchBucket"):
            raise OutputError(
                f"{prefix} {_endpoint(options)} answered {code} {err} to a PUT, not an S3 "
                "error: is it an S3 server? (check --s3-endpoint)"
            ) from err
        raise OutputError(
            f"{prefix} bucket {short_repr(bucket)} does not exist (create it or {_FIX})"
        ) from err
    except PermissionError as err:
        raise OutputError(
            f"{prefix} access denied to bucket {short_repr(bucket)} ({err}) (check the credentials "
            f"and the bucket's policy, or {_FIX})"
        ) from err
    except OSError as err:
        if err.errno == errno.EINVAL:  # s3fs's InvalidBucketName
            raise OutputError(f"{prefix} {err} ({_FIX})") from err
        raise


# --------------------------------------------------------------------------- other fsspec


def _check_other(url: str, fs: Any, path: str) -> None:
    probe = join(path, _probe_name())
    prefix = f"output {short_repr(redact_url(url))}:"
    try:
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"opticam output probe\n")
        fs.rm_file(probe)
    except (NotADirectoryError, FileExistsError) as err:
        raise OutputError(f"{prefix} a part of the path is a file, not a folder ({_FIX})") from err
    except FileNotFoundError as err:
        raise OutputError(f"{prefix} the location does not exist ({err}) ({_FIX})") from err
    except PermissionError as err:
        raise OutputError(f"{prefix} permission denied ({err}) ({_FIX})") from err
