"""Read WebDataset tar shards from any fsspec URL, safely and without losing errors.

Three pieces:

- :func:`expand_shards` turns a shard pattern (braces, globs, lists; local,
  ``file://``, ``s3://`` or any fsspec protocol) into the list of shard URLs,
  and fails before any work when something named does not exist.
- :class:`ShardReader` streams one shard and yields decoded :class:`Sample`
  records. Bad samples become :class:`ErrorRecord` rows in ``reader.errors``
  and reading goes on; a truncated or unreadable shard is never reported as
  ``complete``.
- :func:`iter_batches` preprocesses and batches samples in a background thread
  so that loading overlaps with the model's compute.

webdataset's own pipeline is not used for reading on purpose: its default
decoders unpickle ``.pyd/.pkl/.pth`` members (code execution from a stranger's
shard), ``warn_and_continue`` sleeps half a second per error, it has no
``s3://`` opener and ``pipe:`` URLs run shell commands. The member grouping
follows its convention exactly (key = member path up to the first dot of the
basename, extension = the rest, lower-cased; consecutive members with the same
key form one sample).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import queue
import re
import subprocess
import tarfile
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol, Self

import fsspec
import torch
from fsspec.core import split_protocol, url_to_fs
from PIL import Image

from opticam.data.images import IMAGE_EXTENSIONS, decode_image
from opticam.data.types import (
    STAGE_BOXES,
    STAGE_DECODE,
    STAGE_KEY,
    STAGE_LABEL,
    STAGE_OPEN,
    STAGE_PREPROCESS,
    STAGE_TAR,
    STAGE_UNSAFE,
    Batch,
    Box,
    ErrorRecord,
    Sample,
)

__all__ = [
    "UNSAFE_EXTENSIONS",
    "NoShardsError",
    "PreprocessFn",
    "ShardReadError",
    "ShardReader",
    "expand_braces",
    "expand_shards",
    "iter_batches",
    "parse_boxes",
    "split_member_name",
    "storage_options_for",
]

UNSAFE_EXTENSIONS: frozenset[str] = frozenset({"pyd", "pkl", "pickle", "pth", "pt", "npy"})
"""Member extensions that webdataset would unpickle or load; opticam never reads them."""

DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
"""Members larger than this are skipped unread, so a hostile shard cannot exhaust memory."""

_MAX_BRACE_EXPANSION = 1_000_000
_GLOB_CHARS = re.compile(r"[*?\[]")
# Above this many names in one folder, one listing is cheaper than one request per name.
_LIST_INSTEAD_OF_EXISTS = 64


class NoShardsError(ValueError):
    """A shard pattern (or an element of a list of patterns) matched no existing shard."""


class ShardReadError(RuntimeError):
    """Raised by :meth:`ShardReader.check` when a shard was not read completely."""


# --------------------------------------------------------------------------- storage options


def storage_options_for(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """fsspec options for ``url``: the caller's options plus defaults for its protocol.

    For ``s3://`` (and ``s3a://``) URLs:

    - the endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` is passed as
      ``client_kwargs["endpoint_url"]`` unless the caller set an endpoint (s3fs does
      not read these variables itself in every version);
    - ``use_listings_cache`` defaults to ``False``: s3fs caches folder listings per
      process, so shards written by another process would otherwise stay invisible.

    Credentials are never added: s3fs finds them through the standard AWS chain
    (environment, config files, instance roles) unless the caller passes ``key`` /
    ``secret`` / ``profile``.

    Args:
        url: the URL the options are for.
        storage_options: the caller's options (not modified).

    Returns:
        A new dict of options.
    """
    options = dict(storage_options or {})
    protocol, _ = split_protocol(url)
    if protocol in ("s3", "s3a"):
        client_kwargs = dict(options.get("client_kwargs") or {})
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
            client_kwargs["endpoint_url"] = endpoint
            options["client_kwargs"] = client_kwargs
        options.setdefault("use_listings_cache", False)
    return options


# --------------------------------------------------------------------------- brace expansion


def _split_top_level(body: str) -> list[str]:
    """Split a brace body at commas that are not inside nested braces."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(body):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(body[start:index])
            start = index + 1
    parts.append(body[start:])
    return parts


_NUMERIC_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_LETTER_RANGE = re.compile(r"^([a-zA-Z])\.\.([a-zA-Z])(?:\.\.(-?\d+))?$")


def _range_values(first: int, last: int, step_text: str | None) -> range:
    step = abs(int(step_text)) if step_text else 1
    if step == 0:
        raise ValueError("a brace range step of 0 never ends")
    if first <= last:
        return range(first, last + 1, step)
    return range(first, last - 1, -step)


def _brace_alternatives(body: str) -> list[str] | None:
    """The alternatives a brace body stands for, or ``None`` if it is literal text."""
    parts = _split_top_level(body)
    if len(parts) > 1:
        return parts
    numeric = _NUMERIC_RANGE.match(body)
    if numeric:
        first_text, last_text, step_text = numeric.groups()
        values = _range_values(int(first_text), int(last_text), step_text)
        if len(values) > _MAX_BRACE_EXPANSION:
            raise ValueError(
                f"brace range {{{body}}} names {len(values)} items "
                f"(at most {_MAX_BRACE_EXPANSION} accepted)"
            )

        def zero_padded(text: str) -> bool:
            digits = text.lstrip("-")
            return len(digits) > 1 and digits.startswith("0")

        # Like bash and the braceexpand package: a leading zero on either end pads
        # every number to the width of the wider end ({000..099} -> 000, 001, ...).
        width = (
            max(len(first_text), len(last_text))
            if zero_padded(first_text) or zero_padded(last_text)
            else 0
        )
        return [f"{value:0{width}d}" for value in values]
    letters = _LETTER_RANGE.match(body)
    if letters:
        first_char, last_char, step_text = letters.groups()
        return [chr(code) for code in _range_values(ord(first_char), ord(last_char), step_text)]
    return None


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``{000..099}`` (zero padding kept), ``{a..e}``, ``{x,y}``.

    Ranges take an optional step (``{0..10..2}``); braces nest and multiply
    (``{a,b}-{0..1}`` -> ``a-0, a-1, b-0, b-1``). Braces that are neither a
    range nor contain a comma (``{}``, ``{abc}``) are kept literally, as in bash.

    Args:
        pattern: text with zero or more brace expressions.

    Returns:
        The expansions, in order (duplicates kept).
    """
    depth, start = 0, -1
    for index, char in enumerate(pattern):
        if char == "{":
            if depth == 0:
                start = index
            depth += 1
        elif char == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1 : index], pattern[index + 1 :]
                tails = expand_braces(tail)
                alternatives = _brace_alternatives(body)
                if alternatives is None:
                    middles = ["{" + inner + "}" for inner in expand_braces(body)]
                else:
                    middles = [inner for alt in alternatives for inner in expand_braces(alt)]
                total = len(middles) * len(tails)
                if total > _MAX_BRACE_EXPANSION:
                    raise ValueError(
                        f"pattern {pattern!r} expands to {total} names "
                        f"(at most {_MAX_BRACE_EXPANSION} accepted)"
                    )
                return [head + middle + rest for middle in middles for rest in tails]
    return [pattern]


# --------------------------------------------------------------------------- shard expansion


def _refuse_pipe(url: str) -> None:
    raise ValueError(
        f"refusing shard URL {url!r}: 'pipe:' URLs run shell commands; pass "
        "allow_pipe=True only for shard lists you wrote yourself"
    )


def _display_url(fs: Any, path: str) -> str:
    """The URL reported for a path: plain absolute path locally, protocol URL otherwise."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return str(path)
    return str(fs.unstrip_protocol(path))


def _existing_files(fs: Any, paths: list[str]) -> set[str]:
    """The subset of ``paths`` that exist as files, listing each folder once when cheaper."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    listable = not any(p in ("http", "https") for p in protocols)
    by_parent: dict[str, list[str]] = {}
    for path in paths:
        by_parent.setdefault(fs._parent(path), []).append(path)
    found: set[str] = set()
    for parent, group in by_parent.items():
        if listable and len(group) > _LIST_INSTEAD_OF_EXISTS:
            try:
                entries = fs.ls(parent, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                continue
            files = {
                fs._strip_protocol(e["name"]).rstrip("/")
                for e in entries
                if e.get("type") == "file"
            }
            found.update(path for path in group if path.rstrip("/") in files)
        else:
            found.update(path for path in group if fs.isfile(path))
    return found


def _expand_one(
    pattern: str, storage_options: Mapping[str, Any] | None, must_exist: bool
) -> list[str]:
    names = expand_braces(pattern)
    # One filesystem per protocol: building one per name would cost 100k
    # instantiations for a 100k-shard range.
    filesystems: dict[str | None, Any] = {}
    resolved: list[tuple[str, Any, str, bool]] = []  # (name, fs, path, is_glob)
    for name in names:
        protocol, _ = split_protocol(name)
        if "::" in name:
            fs, path = url_to_fs(name, **storage_options_for(name, storage_options))
        else:
            if protocol not in filesystems:
                fs, _ = url_to_fs(name, **storage_options_for(name, storage_options))
                fs.invalidate_cache()
                filesystems[protocol] = fs
            fs = filesystems[protocol]
            path = fs._strip_protocol(name)
        resolved.append((name, fs, path, bool(_GLOB_CHARS.search(path))))

    existing: dict[int, set[str]] = {}
    if must_exist:
        by_fs: dict[int, tuple[Any, list[str]]] = {}
        for _, fs, path, is_glob in resolved:
            if not is_glob:
                by_fs.setdefault(id(fs), (fs, []))[1].append(path)
        for key, (fs, paths) in by_fs.items():
            existing[key] = _existing_files(fs, paths)

    urls: list[str] = []
    missing: list[str] = []
    for name, fs, path, is_glob in resolved:
        if is_glob:
            matches = fs.glob(path, detail=True)
            files = sorted(p for p, info in matches.items() if info.get("type") == "file")
            urls.extend(_display_url(fs, p) for p in files)
        elif must_exist and path not in existing[id(fs)]:
            missing.append(name)
        else:
            urls.append(name if "::" in name else _display_url(fs, path))
    if not urls:
        raise NoShardsError(f"shard pattern {pattern!r} matched no files")
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise NoShardsError(
            f"shard pattern {pattern!r}: {len(missing)} of {len(names)} named shards "
            f"do not exist: {shown}{more}"
        )
    return urls


def expand_shards(
    spec: str | Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    allow_pipe: bool = False,
    must_exist: bool = True,
) -> list[str]:
    """Expand a shard specification into the list of shard URLs, checking they exist.

    Accepted forms, alone or mixed in a list:

    - a path or URL: ``/data/shard-000000.tar``, ``file:///data/x.tar``,
      ``s3://bucket/train/shard-000000.tar``, ``gcs://...``, ``memory://...``
      (anything fsspec knows);
    - a brace pattern: ``s3://b/shard-{000000..000099}.tar`` (zero padding kept),
      ``shard-{a,b}.tar``; every name it produces must exist;
    - a glob: ``s3://b/train/*.tar`` (matches are sorted).

    Args:
        spec: one pattern or a sequence of patterns.
        storage_options: fsspec options (endpoint, credentials, ...), completed
            per protocol by :func:`storage_options_for`.
        allow_pipe: pass ``pipe:`` URLs through (they run shell commands when read).
        must_exist: check that brace-expanded and literal names exist (one listing
            per folder); ``False`` skips the check (globs are always listed).

    Returns:
        Shard URLs in the order given, duplicates removed (first occurrence kept).
        Local shards are absolute paths; others keep their protocol (``s3://...``).

    Raises:
        NoShardsError: a pattern, or any element of the list, matched nothing, or
            named shards that do not exist (the message names the pattern).
        ValueError: a ``pipe:`` URL without ``allow_pipe``, an empty pattern, or a
            brace expression that expands to more than a million names.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise NoShardsError("no shard patterns given (empty list)")
    urls: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"shard pattern must be a non-empty string, got {pattern!r}")
        if pattern.startswith("pipe:"):
            if not allow_pipe:
                _refuse_pipe(pattern)
            urls.append(pattern)
            continue
        urls.extend(_expand_one(pattern, storage_options, must_exist))
    return list(dict.fromkeys(urls))


# --------------------------------------------------------------------------- members and fields


def split_member_name(name: str) -> tuple[str, str] | None:
    """Split a tar member name into ``(key, extension)`` the way webdataset does.

    The key is the member's path up to the first dot of its basename, the extension
    everything after that dot, lower-cased: ``train/n01/img_7.seg.PNG`` ->
    ``("train/n01/img_7", "seg.png")``. Names without a dot in the basename, hidden
    files (``.DS_Store``) and webdataset metadata (``__meta__``) give ``None``.
    """
    while name.startswith("./"):
        name = name[2:]
    folder, base = posixpath.split(name)
    if not folder and base.startswith("__") and base.endswith("__"):
        return None
    stem, dot, extension = base.partition(".")
    if not stem or not dot or not extension:
        return None
    return (posixpath.join(folder, stem) if folder else stem), extension.lower()


def parse_boxes(value: Any) -> list[Box]:
    """Validate boxes given as ``[[x0, y0, x1, y1], ...]`` in pixel-edge coordinates.

    Args:
        value: ``None`` (no boxes) or a list of 4-number lists with finite values,
            ``x0 <= x1`` and ``y0 <= y1``.

    Returns:
        The boxes as float tuples.

    Raises:
        ValueError: naming the first offending box and what is accepted.
    """
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ValueError(f"boxes must be a list [[x0, y0, x1, y1], ...], got {value!r}")
    boxes: list[Box] = []
    for index, box in enumerate(value):
        if (
            not isinstance(box, list | tuple)
            or len(box) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
        ):
            raise ValueError(f"box {index} must be 4 numbers [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise ValueError(f"box {index} has a non-finite coordinate: {box!r}")
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box {index} must have x0 <= x1 and y0 <= y1, got {box!r}")
        boxes.append((x0, y0, x1, y1))
    return boxes


def _parse_cls(data: bytes) -> int:
    text = data.decode("ascii", errors="replace").strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f".cls member must hold an integer, got {text[:40]!r}") from None


# --------------------------------------------------------------------------- tar reading


# Not in tarfile's public API (nor in its type stubs), but stable since Python 3.2.
_EOF_HEADER_ERROR: type[Exception] = getattr(tarfile, "EOFHeaderError")  # noqa: B009
_EMPTY_HEADER_ERROR: type[Exception] = getattr(tarfile, "EmptyHeaderError")  # noqa: B009


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Remembers, on the tar file, why reading the next header stopped."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            # tarfile ends iteration silently on a missing or partial header; only a
            # zero block (EOFHeaderError) is a real end-of-archive marker.
            if isinstance(tarfile_, _EndTrackingTarFile):
                tarfile_.end_reason = exc
            raise


class _EndTrackingTarFile(tarfile.TarFile):
    tarinfo = _EndTrackingTarInfo
    end_reason: Exception | None = None


@dataclass
class _Group:
    key: str
    members: dict[str, bytes]
    failed: bool = False


class ShardReader:
    """Stream the samples of one WebDataset shard.

    Iterating yields :class:`Sample` records in tar order. Nothing a shard contains
    can stop the iteration: every problem becomes an :class:`ErrorRecord` in
    :attr:`errors` and reading continues with the next sample.

    - Images: the first of ``.jpg``, ``.jpeg``, ``.png``, ``.webp`` present, decoded
      to RGB 8-bit (see :mod:`opticam.data.images`).
    - Label: ``.cls`` (integer text) or ``.json["label"]``; both present and
      different is an error.
    - Boxes: ``.json["boxes"]`` as ``[[x0, y0, x1, y1], ...]`` in original pixels.
    - ``.pyd``, ``.pkl``, ``.pickle``, ``.pth``, ``.pt``, ``.npy`` members are never
      read, let alone unpickled: the first one of a shard is reported once
      (stage ``"unsafe-member"``) and the sample is otherwise kept.
    - Other members are ignored.

    Error stages: ``"open"`` (URL cannot be opened), ``"tar"`` (truncated or
    unreadable tar; the sample being read at that point is dropped), ``"decode"``
    (corrupt, empty or missing image, bad json, oversized member), ``"label"``,
    ``"boxes"``, ``"key"`` (key repeated in the shard), ``"unsafe-member"``.

    A failure to open the URL is recorded, not raised, like every other problem:
    the caller decides (retry, fail the shard, or write the error row). Call
    :meth:`check` to turn an incomplete read into an exception.

    Args:
        url: shard URL (local path, ``file://``, ``s3://``, any fsspec URL;
            ``pipe:CMD`` only with ``allow_pipe``). Plain or compressed
            (``.tar.gz``, ...) tar streams are accepted.
        storage_options: fsspec options, completed by :func:`storage_options_for`.
        allow_pipe: permit ``pipe:`` URLs (they run a shell command).
        require_label: when ``True`` a sample without any label is an error
            (stage ``"label"``) and is not yielded; when ``False`` it is yielded
            with ``label=None``. A malformed label is always an error.
        max_member_bytes: members larger than this are skipped unread (stage
            ``"decode"``).

    Attributes:
        errors: problems found during the last (or current) iteration.
        complete: ``True`` only after an iteration reached the tar's
            end-of-archive marker without a stream error; ``False`` before, while
            iterating, after an early stop, or when the tar was truncated or
            unreadable.
        n_samples: samples yielded by the last (or current) iteration.

    Raises:
        ValueError: a ``pipe:`` URL without ``allow_pipe``.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        allow_pipe: bool = False,
        require_label: bool = True,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ) -> None:
        if url.startswith("pipe:") and not allow_pipe:
            _refuse_pipe(url)
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.allow_pipe = allow_pipe
        self.require_label = require_label
        self.max_member_bytes = max_member_bytes
        self.errors: list[ErrorRecord] = []
        self.complete = False
        self.n_samples = 0

    def __repr__(self) -> str:
        return f"ShardReader({self.url!r}, complete={self.complete}, n_samples={self.n_samples})"

    def _error(self, key: str | None, stage: str, message: str) -> None:
        self.errors.append(ErrorRecord(shard=self.url, key=key, stage=stage, message=message))

    def check(self) -> None:
        """Raise :class:`ShardReadError` unless the last iteration read the whole shard."""
        if not self.complete:
            shard_level = [e for e in self.errors if e.stage in (STAGE_OPEN, STAGE_TAR)]
            reason = shard_level[-1].message if shard_level else "iteration did not finish"
            raise ShardReadError(f"shard {self.url!r} was not read completely: {reason}")

    def __iter__(self) -> Iterator[Sample]:
        self.errors = []
        self.complete = False
        self.n_samples = 0
        process: subprocess.Popen[bytes] | None = None
        try:
            if self.url.startswith("pipe:"):
                process = subprocess.Popen(self.url[5:], shell=True, stdout=subprocess.PIPE)
                assert process.stdout is not None
                stream: IO[bytes] = process.stdout
            else:
                options = storage_options_for(self.url, self.storage_options)
                stream = fsspec.open(self.url, "rb", **options).open()
        except Exception as exc:
            self._error(None, STAGE_OPEN, f"cannot open shard: {type(exc).__name__}: {exc}")
            return
        try:
            reached_end = yield from self._samples(stream)
            if process is not None:
                stream.close()
                code = process.wait()
                if code != 0:
                    self._error(None, STAGE_TAR, f"pipe command exited with status {code}")
                    reached_end = False
            self.complete = reached_end
        finally:
            stream.close()
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    def _members(
        self, stream: IO[bytes], state: dict[str, Any]
    ) -> Iterator[tuple[str, str, bytes | None]]:
        """Yield ``(key, extension, data)`` per tar member; ``data`` is None for skipped ones.

        Stream errors end the iteration and are left in ``state["error"]``;
        ``state["end"]`` is True when the end-of-archive marker was read.
        """
        try:
            archive = _EndTrackingTarFile.open(fileobj=stream, mode="r|*")
        except Exception as exc:
            state["error"] = f"not a readable tar stream: {type(exc).__name__}: {exc}"
            return
        unsafe_seen = False
        try:
            for info in archive:
                if not info.isfile():
                    continue
                parts = split_member_name(info.name)
                if parts is None:
                    continue
                key, extension = parts
                if extension.rsplit(".", 1)[-1] in UNSAFE_EXTENSIONS:
                    if not unsafe_seen:
                        unsafe_seen = True
                        self._error(
                            key,
                            STAGE_UNSAFE,
                            f"member {info.name!r} ignored, never loaded: "
                            f"{', '.join(sorted(UNSAFE_EXTENSIONS))} members can run code "
                            "when unpickled (reported once per shard)",
                        )
                    continue
                if info.size > self.max_member_bytes:
                    yield key, extension, None
                    self._error(
                        key,
                        STAGE_DECODE,
                        f"member {info.name!r} has {info.size} bytes "
                        f"(more than max_member_bytes={self.max_member_bytes}); skipped",
                    )
                    continue
                member = archive.extractfile(info)
                data = member.read() if member is not None else b""
                yield key, extension, data
        except Exception as exc:
            state["error"] = f"tar stream broken: {type(exc).__name__}: {exc}"
            return
        end = archive.end_reason
        if isinstance(end, _EOF_HEADER_ERROR):
            state["end"] = True
        else:
            reason = "stream ends without the end-of-archive marker"
            if end is not None and not isinstance(end, _EMPTY_HEADER_ERROR):
                reason = f"unreadable member header ({type(end).__name__}: {end})"
            state["error"] = f"tar truncated or corrupt: {reason}"

    def _samples(self, stream: IO[bytes]) -> Generator[Sample, None, bool]:
        """Group members into samples; returns True when the whole tar was read."""
        state: dict[str, Any] = {"error": None, "end": False}
        seen_keys: set[str] = set()
        group: _Group | None = None
        for key, extension, data in self._members(stream, state):
            if group is None or key != group.key:
                if group is not None:
                    sample = self._build(group)
                    if sample is not None:
                        self.n_samples += 1
                        yield sample
                group = _Group(key, {})
                if key in seen_keys:
                    group.failed = True
                    self._error(
                        key, STAGE_KEY, f"key {key!r} occurs twice in the shard; later copy skipped"
                    )
                seen_keys.add(key)
            if data is None:
                group.failed = True
            elif extension in group.members:
                group.failed = True
                self._error(
                    key, STAGE_KEY, f"member '{key}.{extension}' occurs twice in one sample"
                )
            else:
                group.members[extension] = data
        if state["error"] is not None:
            # The sample being read when the stream broke may be missing members: drop it.
            self._error(group.key if group else None, STAGE_TAR, state["error"])
            return False
        if group is not None:
            sample = self._build(group)
            if sample is not None:
                self.n_samples += 1
                yield sample
        return bool(state["end"])

    def _build(self, group: _Group) -> Sample | None:
        """Decode one sample's members, or record why it cannot be used."""
        if group.failed:
            return None
        key, members = group.key, group.members
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                parsed = json.loads(members["json"])
            except (ValueError, UnicodeDecodeError) as exc:
                self._error(key, STAGE_DECODE, f"member '{key}.json' is not valid JSON: {exc}")
                return None
            if not isinstance(parsed, dict):
                self._error(
                    key,
                    STAGE_DECODE,
                    f"member '{key}.json' must hold an object, got {type(parsed).__name__}",
                )
                return None
            meta = parsed

        label: int | None = None
        if "cls" in members:
            try:
                label = _parse_cls(members["cls"])
            except ValueError as exc:
                self._error(key, STAGE_LABEL, str(exc))
                return None
        json_label = meta.get("label")
        if json_label is not None:
            if not isinstance(json_label, int) or isinstance(json_label, bool):
                self._error(
                    key, STAGE_LABEL, f"json 'label' must be an integer, got {json_label!r}"
                )
                return None
            if label is not None and label != json_label:
                self._error(
                    key, STAGE_LABEL, f".cls says {label} but json 'label' says {json_label}"
                )
                return None
            label = json_label
        if label is None and self.require_label:
            self._error(key, STAGE_LABEL, "no label: neither a .cls member nor a 'label' in .json")
            return None

        try:
            boxes = parse_boxes(meta.get("boxes"))
        except ValueError as exc:
            self._error(key, STAGE_BOXES, str(exc))
            return None

        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        if extension is None:
            self._error(
                key,
                STAGE_DECODE,
                f"no image member (.{', .'.join(IMAGE_EXTENSIONS)}); members: {sorted(members)}",
            )
            return None
        try:
            image = decode_image(members[extension])
        except ValueError as exc:
            self._error(key, STAGE_DECODE, f"member '{key}.{extension}': {exc}")
            return None
        return Sample(key=key, shard=self.url, image=image, label=label, boxes=boxes)


# --------------------------------------------------------------------------- batching


class PreprocessFn(Protocol):
    """``(image, boxes) -> (tensor (3, H, W) float32 in [0, 1], boxes (n, 4) float32)``."""

    def __call__(
        self, image: Image.Image, boxes: Sequence[Box]
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class _Done:
    pass


@dataclass
class _Failure:
    error: BaseException


def _collate(
    shard: str, items: list[tuple[str, torch.Tensor, int | None, torch.Tensor]], pin: bool
) -> Batch:
    images = torch.stack([image for _, image, _, _ in items])
    if pin:
        images = images.pin_memory()
    labels = torch.tensor(
        [-1 if label is None else label for _, _, label, _ in items], dtype=torch.int64
    )
    return Batch(
        shard=shard,
        keys=[key for key, _, _, _ in items],
        images=images,
        labels=labels,
        boxes=[boxes.to(torch.float32).reshape(-1, 4) for _, _, _, boxes in items],
    )


def iter_batches(
    source: ShardReader | Iterable[Sample],
    preprocess: PreprocessFn | Callable[..., tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    *,
    prefetch: int = 2,
    errors: list[ErrorRecord] | None = None,
    pin_memory: bool = False,
) -> Generator[Batch, None, None]:
    """Preprocess and batch samples in a background thread, overlapping with compute.

    A thread iterates ``source`` (decoding happens there too when it is a
    :class:`ShardReader`), applies ``preprocess`` and puts finished batches into a
    queue of at most ``prefetch`` batches, so reading is never more than
    ``prefetch`` batches ahead of the consumer.

    - A batch never mixes shards: a change of ``sample.shard`` closes the batch.
    - A sample whose preprocessing raises becomes an ``ErrorRecord`` with stage
      ``"preprocess"``, appended to ``errors`` if given, else to ``source.errors``
      when the source has such a list (a :class:`ShardReader`); with neither, the
      exception is raised to the consumer.
    - Any other exception in the thread is raised to the consumer.
    - When the consumer stops early (``break``, exception, ``close()``), the
      thread stops at its next sample and the source's iterator is closed.

    Args:
        source: a :class:`ShardReader` or any iterable of :class:`Sample`.
        preprocess: ``(image, boxes) -> (image (3, H, W) float32, boxes (n, 4))``,
            e.g. :class:`opticam.data.Preprocess`.
        batch_size: maximum samples per batch (>= 1); the last batch of a shard
            may be smaller.
        prefetch: batches prepared ahead (>= 1).
        errors: where preprocessing errors go (see above).
        pin_memory: pin batch images in page-locked memory (faster, asynchronous
            copies to a GPU); ignored without CUDA.

    Yields:
        :class:`Batch` with ``images`` ``(B, 3, H, W)``, ``labels`` ``(B,)`` (-1
        where unknown) and ``B`` box tensors ``(n_i, 4)``.

    Raises:
        ValueError: ``batch_size`` or ``prefetch`` below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    pin = pin_memory and torch.cuda.is_available()
    slots: queue.Queue[Batch | _Done | _Failure] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def sink() -> list[ErrorRecord] | None:
        if errors is not None:
            return errors
        # Looked up per error: ShardReader replaces its list when an iteration starts.
        found = getattr(source, "errors", None)
        return found if isinstance(found, list) else None

    def put(item: Batch | _Done | _Failure) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(source)
        try:
            items: list[tuple[str, torch.Tensor, int | None, torch.Tensor]] = []
            shard = ""
            for sample in iterator:
                if stop.is_set():
                    return
                if items and sample.shard != shard:
                    if not put(_collate(shard, items, pin)):
                        return
                    items = []
                shard = sample.shard
                try:
                    image, boxes = preprocess(sample.image, sample.boxes)
                except Exception as exc:
                    target = sink()
                    if target is None:
                        raise
                    target.append(
                        ErrorRecord(
                            shard=sample.shard,
                            key=sample.key,
                            stage=STAGE_PREPROCESS,
                            message=f"{type(exc).__name__}: {exc}",
                        )
                    )
                    continue
                items.append((sample.key, image, sample.label, torch.as_tensor(boxes)))
                if len(items) == batch_size:
                    if not put(_collate(shard, items, pin)):
                        return
                    items = []
            if items and not put(_collate(shard, items, pin)):
                return
            put(_Done())
        except BaseException as exc:
            put(_Failure(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="opticam-batches", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = slots.get(timeout=0.1)
            except queue.Empty:
                if not thread.is_alive() and slots.empty():
                    raise RuntimeError("batch loading thread ended without a result") from None
                continue
            if isinstance(item, _Done):
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        # Bounded wait: a thread blocked in a slow network read must not hang the
        # consumer; it is a daemon and exits at its next check of `stop`.
        thread.join(timeout=10.0)
