"""One WebDataset tar shard -> decoded :class:`Sample` records and :class:`ErrorRecord` rows.

:class:`ShardReader` streams one shard from any fsspec URL. Bad samples become
error records and reading goes on; a truncated or unreadable shard is never
reported as ``complete``. Three ways a read can fail are kept apart:

- the bytes are a tar cut short or corrupt: the samples before the damage are
  yielded, an error record (stage ``"tar"``) says where it broke, ``complete`` is
  False. Reading again gives the same.
- the bytes are not a tar at all, or there are none: nothing is yielded, an error
  record (stage ``"not-a-tar"``), ``readable`` is False.
- the storage failed while streaming (a connection reset, a timeout):
  :class:`ShardStreamError` is raised out of the iteration, because reading again
  may well succeed (:func:`is_storage_error` tells these apart).

What comes from webdataset (``webdataset.tariterators``): the grouping of tar
members into samples (:func:`~webdataset.tariterators.group_by_keys`: consecutive
members with the same key form one sample; a member name repeated inside a sample
is an error) and the member-name convention
(:func:`~webdataset.tariterators.base_plus_ext`: key = member path up to the first
dot of the basename, extension = the rest, lower-cased).

What does not, on purpose:

- webdataset's decoders and its ``WebDataset`` pipeline: the default decoders
  unpickle ``.pyd/.pkl/.pth`` members (code execution from a stranger's shard),
  ``warn_and_continue`` sleeps half a second per error, it has no ``s3://``
  opener and ``pipe:`` URLs run shell commands. Members are decoded here by
  :func:`opticam.data.images.decode_image`, :func:`json.loads` and
  :func:`parse_boxes`, and pickle-like members are never read.
- :func:`~webdataset.tariterators.tar_file_iterator`: see :meth:`ShardReader._members`
  for why the member loop is this module's own.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Self

import fsspec
from webdataset.tariterators import base_plus_ext, group_by_keys

from opticam.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageTooLargeError,
    decode_image,
)
from opticam.data.types import Box, ErrorRecord, Sample
from opticam.data.urls import refuse_pipe, storage_options_for
from opticam.errors import short_repr, shorten
from opticam.names import (
    STAGE_BOXES,
    STAGE_DECODE,
    STAGE_KEY,
    STAGE_LABEL,
    STAGE_NOT_TAR,
    STAGE_OPEN,
    STAGE_TAR,
    STAGE_TOO_LARGE,
    STAGE_UNSAFE,
)

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "LABEL_MAX",
    "UNSAFE_EXTENSIONS",
    "ShardReadError",
    "ShardReader",
    "ShardStreamError",
    "box_problem",
    "is_storage_error",
    "parse_boxes",
    "parse_label",
    "split_member_name",
]

UNSAFE_EXTENSIONS: frozenset[str] = frozenset({"pyd", "pkl", "pickle", "pth", "pt", "npy"})
"""Member extensions that webdataset would unpickle or load; opticam never reads them."""

DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
"""Members larger than this are skipped unread, so a hostile shard cannot exhaust memory."""


LABEL_MAX = 2**63 - 1
"""The largest label accepted: labels are stored in int64 columns and tensors."""


class ShardReadError(RuntimeError):
    """Raised by :meth:`ShardReader.check` when a shard was not read completely."""


class ShardStreamError(OSError):
    """The storage failed while a shard was streamed: read the whole shard again.

    Raised out of the iteration of a :class:`ShardReader` (never recorded as an error
    record) when reading the shard's bytes failed in a way that may not happen again
    (:func:`is_storage_error`): a connection reset, a timeout, an S3 error after
    s3fs's own retries. The samples already yielded came from an intact start of the
    shard, but what follows is unknown, so the caller retries the shard from its
    start rather than keeping a shortened result. The storage's exception is
    ``__cause__``.

    Attributes:
        url: the shard URL.
        n_samples: samples the iteration had yielded before the failure.
        reason: the storage's exception as ``"Type: message"``.
    """

    def __init__(self, url: str, n_samples: int, reason: str) -> None:
        super().__init__(
            f"shard {short_repr(url)}: the storage failed after {n_samples} samples were read "
            f"({reason}); read the shard again from its start"
        )
        self.url = url
        self.n_samples = n_samples
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with this class's constructor arguments.

        OSError would pickle its own arguments instead; Prefect and process pools pickle
        exceptions.
        """
        return type(self), (self.url, self.n_samples, self.reason)


# --------------------------------------------------------------------------- error kinds

# What the bytes of a broken tar raise, the same on every read. gzip.BadGzipFile is
# an OSError (with fsspec's compression= option); tarfile's own stream decompression
# raises tarfile.ReadError instead. (bz2 via fsspec's compression= raises a bare
# OSError for bad data, which is taken for a storage failure: it fails again on retry.)
_FORMAT_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
)

# Transport errors of the HTTP stacks under fsspec's remote filesystems that are not
# OSError subclasses: the base classes, by module. Looked up in sys.modules only: an
# exception of a module that was never imported cannot have been raised.
_TRANSPORT_ERRORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("aiohttp", ("ClientError",)),  # ClientPayloadError, ServerDisconnectedError, ...
    ("botocore.exceptions", ("BotoCoreError", "ClientError")),  # ResponseStreamingError
    ("urllib3.exceptions", ("HTTPError",)),  # ProtocolError, ReadTimeoutError, ...
    ("http.client", ("HTTPException",)),  # IncompleteRead
)


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc``, raised while reading a shard's bytes, is the storage failing.

    The storage failing (worth reading the shard again) is: any :class:`OSError`,
    which covers ``ConnectionError``, ``TimeoutError`` (and fsspec's
    ``FSTimeoutError``, an ``asyncio.TimeoutError``), aiohttp's ``ClientOSError``,
    s3fs's translations of S3 errors and its ``FileExpired`` (the object changed
    while read); and the transport errors of aiohttp, botocore, urllib3 and
    ``http.client`` that are not OSErrors (aiohttp's ``ClientPayloadError`` and
    botocore's ``ResponseStreamingError`` are what s3fs raises for a connection cut
    during ``read()``). An exception raised ``from`` one of these counts as one.

    Not the storage (the bytes are bad, and will be again): tarfile's errors,
    ``EOFError``, ``zlib.error`` and ``gzip.BadGzipFile`` (an OSError), and anything
    else.

    Args:
        exc: the exception raised by reading.

    Returns:
        True when reading the shard again may succeed.
    """
    transport = tuple(
        getattr(module, name)
        for module_name, names in _TRANSPORT_ERRORS
        if (module := sys.modules.get(module_name)) is not None
        for name in names
    )
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:  # a cycle of causes ends too
        seen.add(id(cause))
        if isinstance(cause, _FORMAT_ERRORS):
            return False
        if isinstance(cause, (OSError, *transport)):
            return True
        cause = cause.__cause__
    return False


# --------------------------------------------------------------------------- members and fields


def split_member_name(name: str) -> tuple[str, str] | None:
    """Split a tar member name into ``(key, extension)`` the way webdataset does.

    webdataset's :func:`~webdataset.tariterators.base_plus_ext` does the split: the
    key is the member's path up to the first dot of its basename, the extension
    everything after that dot, lower-cased here: ``train/n01/img_7.seg.PNG`` ->
    ``("train/n01/img_7", "seg.png")``. A leading ``./`` is dropped (``tar -C dir .``
    writes it). Names without a dot in the basename (including webdataset metadata
    such as ``__meta__``), hidden files (``.DS_Store``), names ending in a dot and
    extensions starting with ``__`` give ``None``: webdataset reserves ``__key__``,
    ``__url__``, ``__bad__``... for its own fields, and ``group_by_keys`` would take
    ``k.__bad__`` as "drop sample k" without a word.

    Args:
        name: the member's path inside the tar.

    Returns:
        ``(key, extension)``, or ``None`` when the member is not part of a sample.
    """
    while name.startswith("./"):
        name = name[2:]
    key, extension = base_plus_ext(name)
    # base_plus_ext splits "dir/.DS_Store" into ("dir/", "DS_Store"): an empty stem.
    if not key or not extension or key.endswith("/") or extension.startswith("__"):
        return None
    return key, extension.lower()


def _as_text(text: str) -> str:
    r"""``text`` with undecodable bytes of a member name written as ``\xNN`` escapes.

    tarfile decodes member names as UTF-8 with ``surrogateescape``: bytes that are
    not UTF-8 become lone surrogates, which no UTF-8 writer (Parquet, JSON, a
    terminal) accepts. Here they become the four characters ``\xff``.
    """
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _grouping_key(name: str) -> tuple[str | None, str | None]:
    """:func:`split_member_name` in the ``(None, None)`` form ``group_by_keys`` skips."""
    parts = split_member_name(name)
    return parts if parts is not None else (None, None)


def parse_boxes(value: Any) -> list[Box]:
    """Read boxes given as ``[[x0, y0, x1, y1], ...]`` in pixel-edge coordinates.

    Only the form is checked here; whether a box has an area and lies on its image
    is :func:`box_problem`'s question, which needs the image's size.

    Args:
        value: ``None`` (no boxes) or a list of 4-number lists with finite values.

    Returns:
        The boxes as float tuples.

    Raises:
        ValueError: naming the first offending box and what is accepted.
    """
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ValueError(f"boxes must be a list [[x0, y0, x1, y1], ...], got {short_repr(value)}")
    boxes: list[Box] = []
    for index, box in enumerate(value):
        if (
            not isinstance(box, list | tuple)
            or len(box) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
        ):
            raise ValueError(
                f"box {index} must be 4 numbers [x0, y0, x1, y1], got {short_repr(box)}"
            )
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except OverflowError:  # an integer beyond the float range (about 1.8e308)
            x0 = y0 = x1 = y1 = math.inf
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise ValueError(
                f"box {index} has a coordinate that is not a finite float: {short_repr(box)}"
            )
        boxes.append((x0, y0, x1, y1))
    return boxes


def box_problem(box: Box, width: int, height: int) -> str | None:
    """Why a box cannot locate anything in a ``width x height`` image, or None if it can.

    A box needs an area (``x0 < x1`` and ``y0 < y1``) and some of it on the image
    ``[0, width] x [0, height]``. A box partly outside is fine: preprocessing clips
    it to the image (and to the crop).

    Args:
        box: ``(x0, y0, x1, y1)`` in original-image pixel-edge coordinates.
        width: image width ``W``.
        height: image height ``H``.

    Returns:
        A message naming the box and the image size, or None.
    """
    x0, y0, x1, y1 = box
    shown = "[" + ", ".join(f"{v:g}" for v in box) + "]"
    if x1 <= x0 or y1 <= y0:
        return f"box {shown} has no area (x0 < x1 and y0 < y1 needed; image {width}x{height})"
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return f"box {shown} lies fully outside the {width}x{height} image"
    return None


def parse_label(value: Any, where: str) -> int:
    """Check one label value read from a sample: an integer that fits an int64 column.

    Negative values pass (the reader decides what they mean); booleans, floats
    (``3.0`` too: a label is a class index, not a measurement), strings, lists,
    dicts and integers beyond ``-2**63 .. 2**63 - 1`` do not.

    Args:
        value: the label as decoded (an int from ``.cls``, any JSON value from ``.json``).
        where: the field, for the message (``".cls"``, ``"json 'label'"``).

    Returns:
        The label.

    Raises:
        ValueError: naming the field, the value (shortened) and what is accepted.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(
            f"{where} must be an integer class index, got {type(value).__name__} "
            f"{short_repr(value)}"
        )
    if not -LABEL_MAX - 1 <= value <= LABEL_MAX:
        raise ValueError(
            f"{where} {short_repr(value)} does not fit a 64-bit integer "
            f"(labels are class indices 0..N-1, at most {LABEL_MAX})"
        )
    return value


_CLS_TEXT = re.compile(r"[+-]?[0-9]+")
# More digits than any int64 has (19), with room for leading zeros; longer texts are
# refused before int() (which refuses more than 4300 digits with its own message).
_CLS_MAX_DIGITS = 40


def _parse_cls(data: bytes) -> int:
    """The label a ``.cls`` member holds: one decimal integer as UTF-8 text.

    Surrounding whitespace and a UTF-8 byte order mark (as Windows editors write
    it) are allowed; anything else (an empty member, other bytes than UTF-8, a
    float, ``1_000``, non-ASCII digits, a value beyond int64) is refused.

    Raises:
        ValueError: naming the member's content (shortened) and what is accepted.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f".cls member is not UTF-8 text: {short_repr(data)}; it must hold an integer"
        ) from None
    text = text.strip()
    if not text:
        raise ValueError(".cls member is empty (or only whitespace); it must hold an integer")
    if not _CLS_TEXT.fullmatch(text):
        raise ValueError(f".cls member must hold an integer, got {short_repr(text)}")
    if len(text.lstrip("+-")) > _CLS_MAX_DIGITS:
        raise ValueError(
            f".cls {short_repr(text)} does not fit a 64-bit integer "
            f"(labels are class indices 0..N-1, at most {LABEL_MAX})"
        )
    return parse_label(int(text), ".cls")


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
    members: list[tarfile.TarInfo]  # set by TarFile.__init__; missing from typeshed


@dataclass(frozen=True)
class _Skipped:
    """Stands in for the data of a member that was not read (the reason is the message)."""

    message: str


@dataclass
class _TarState:
    """How the member loop ended: ``error`` if the stream broke, ``end`` at the marker.

    ``stage`` is the error's stage (``"tar"``, or ``"not-a-tar"`` when no tar header
    could be read at all); ``last`` is the ``(key, extension)`` of the member yielded
    last.
    """

    error: str | None = None
    stage: str = STAGE_TAR
    end: bool = False
    last: tuple[str, str] = ("", "")


def _not_a_tar(exc: Exception) -> str:
    """The message for a shard whose start tarfile refused (``exc``, a ReadError)."""
    # tarfile raises ReadError("empty file") from its EmptyHeaderError when the
    # stream (after any decompression) has no bytes at all.
    if isinstance(exc.__context__, _EMPTY_HEADER_ERROR):
        return "the shard is empty (0 bytes, or a compressed stream holding none): not a tar"
    return (
        f"not a tar archive (plain, gzip, bz2 or xz): no tar header at its start "
        f"({type(exc).__name__}: {exc})"
    )


class ShardReader:  # size: an 84-line docstring, the reference of what a shard may hold
    r"""Stream the samples of one WebDataset shard.

    Iterating yields :class:`Sample` records in tar order. Nothing a shard contains
    can stop the iteration: every problem becomes an :class:`ErrorRecord` in
    :attr:`errors` and reading continues with the next sample.

    - Images: the first of ``.jpg``, ``.jpeg``, ``.png``, ``.webp`` present, decoded
      to RGB 8-bit (see :mod:`opticam.data.images`), at most ``max_pixels`` pixels.
      Its bytes must be one of :data:`~opticam.data.images.IMAGE_FORMATS` (JPEG,
      PNG, WebP), whatever the extension: any other format (EPS, PDF, BMP, ...) is
      an error (stage ``"decode"``) naming it, and no other decoder sees the bytes.
    - Label: ``.cls`` (one decimal integer as UTF-8 text, a byte order mark and
      surrounding whitespace allowed) or ``.json["label"]`` (a JSON integer;
      ``null`` is no label); both present and different is an error, and so is
      any other value, or an integer that does not fit int64 (stage ``"label"``). A negative label is not a class index: with
      ``require_label`` it is an error (stage ``"label"``, the sample is not
      yielded); without, it reads as "no label" (``label=None``), what ``-1`` means
      in unlabelled sets.
    - Boxes: ``.json["boxes"]`` as ``[[x0, y0, x1, y1], ...]`` in original pixels.
      A box without area (``x1 <= x0`` or ``y1 <= y0``) or lying fully outside the
      image is dropped with an error record (stage ``"boxes"``) and the sample is
      yielded with its other boxes: the image is still explainable, only that box
      cannot be scored. Boxes partly outside are kept (preprocessing clips them).
      Boxes that are not lists of 4 finite numbers make the sample an error.
    - Each field is checked on its own, and a bad value costs its sample one
      error record that names the field and quotes the value shortened
      (:func:`short_repr`), never the shard. A key whose member names are not
      UTF-8 is refused (stage ``"key"``), shown with ``\xNN`` escapes.
    - ``.pyd``, ``.pkl``, ``.pickle``, ``.pth``, ``.pt``, ``.npy`` members are never
      read, let alone unpickled: the first one of a shard is reported once
      (stage ``"unsafe-member"``) and the sample is otherwise kept.
    - Other members are ignored.

    Error stages (:data:`opticam.names.STAGES`): ``"open"`` (URL cannot be opened),
    ``"not-a-tar"`` (empty file, or no tar header at its start; nothing read),
    ``"tar"`` (truncated or corrupt tar; the sample being read at that point is
    dropped), ``"decode"`` (corrupt, empty or missing image, bad json),
    ``"too-large"`` (a member over ``max_member_bytes``, skipped unread, or an image
    over ``max_pixels``, refused from its header), ``"label"``, ``"boxes"``, ``"key"``
    (key repeated in the shard, or a member repeated in a sample),
    ``"unsafe-member"``.

    A failure to open the URL is recorded, not raised, like every other problem
    with the shard's contents: the caller decides (retry, fail the shard, or write
    the error row). The one exception is the storage failing in the middle of the
    stream (:class:`ShardStreamError`, raised): then nothing is known about the rest
    of the shard. Call :meth:`check` to turn an incomplete read into an exception.
    Closing the iterator early (``break``, ``close()``) closes the stream.

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
            ``"too-large"``).
        max_pixels: images with more pixels (width x height) are refused from
            their header, before decoding (stage ``"too-large"``); see
            :data:`opticam.data.images.DEFAULT_MAX_PIXELS`.

    Attributes:
        errors: problems found during the last (or current) iteration.
        complete: ``True`` only after an iteration reached the tar's
            end-of-archive marker without a stream error; ``False`` before, while
            iterating, after an early stop, or when the tar was truncated or
            unreadable.
        readable: ``True`` once an iteration has read the start of a tar archive
            (a first member header, or the end-of-archive marker of an empty
            archive). ``False`` before, and after an iteration that could not open
            the URL (stage ``"open"``) or found no tar in it (stage ``"not-a-tar"``:
            a 0-byte file, or other bytes); then ``n_samples == 0``, ``complete``
            is ``False``, and the shard has nothing to give: fail it rather than
            record it as read. A tar cut short later on stays ``readable``.
        n_samples: samples yielded by the last (or current) iteration.

    Raises:
        ValueError: a ``pipe:`` URL without ``allow_pipe``, or a size limit below 1.
        ShardStreamError: (from the iteration) the storage failed while the shard
            was streamed; read it again from its start.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        allow_pipe: bool = False,
        require_label: bool = True,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if url.startswith("pipe:") and not allow_pipe:
            refuse_pipe(url)
        for name, limit in (("max_member_bytes", max_member_bytes), ("max_pixels", max_pixels)):
            if limit < 1:
                raise ValueError(f"{name} must be at least 1, got {short_repr(limit)}")
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.allow_pipe = allow_pipe
        self.require_label = require_label
        self.max_member_bytes = max_member_bytes
        self.max_pixels = max_pixels
        self.errors: list[ErrorRecord] = []
        self.complete = False
        self.readable = False
        self.n_samples = 0

    def __repr__(self) -> str:
        """The URL and what the last iteration read."""
        return f"ShardReader({self.url!r}, complete={self.complete}, n_samples={self.n_samples})"

    def _error(self, key: str | None, stage: str, message: str) -> None:
        self.errors.append(
            ErrorRecord(
                shard=self.url,
                key=None if key is None else _as_text(key),
                stage=stage,
                message=_as_text(message),
            )
        )

    def _raise_if_storage(self, exc: Exception) -> None:
        """Raise :class:`ShardStreamError` from ``exc`` when it is the storage failing."""
        if is_storage_error(exc):
            reason = f"{type(exc).__name__}: {exc}"
            raise ShardStreamError(self.url, self.n_samples, reason) from exc

    def check(self) -> None:
        """Raise :class:`ShardReadError` unless the last iteration read the whole shard.

        Raises:
            ShardReadError: naming the shard and the last open or tar error.
        """
        if not self.complete:
            shard_level = [
                e for e in self.errors if e.stage in (STAGE_OPEN, STAGE_NOT_TAR, STAGE_TAR)
            ]
            reason = shard_level[-1].message if shard_level else "iteration did not finish"
            raise ShardReadError(f"shard {short_repr(self.url)} was not read completely: {reason}")

    def __iter__(self) -> Generator[Sample, None, None]:
        """Read the shard from its start; see the class docstring."""
        self.errors = []
        self.complete = False
        self.readable = False
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
        self, stream: IO[bytes], state: _TarState
    ) -> Generator[dict[str, Any], None, None]:
        """Yield the tar's members as webdataset's ``{"fname", "data", "__url__"}`` dicts.

        This is :func:`webdataset.tariterators.tar_file_iterator` plus the two things
        it cannot do, which is why the loop is kept here (about 30 lines):

        - Tell a truncated tar from a complete one. ``tar_file_iterator`` iterates a
          plain ``tarfile.open(fileobj, "r|*")``, and tarfile ends iteration without
          an error when the next header is missing or cut short. Shown by
          ``test_truncated_tar_is_incomplete[member-boundary]`` and ``[header]``:
          fed through ``tar_file_iterator`` the cut tars read as complete. Here the
          header error is remembered (:class:`_EndTrackingTarFile`) and only a zero
          block counts as the end (``state.end``).
        - Skip a member by its size. ``tar_file_iterator``'s ``select_files`` sees
          only the name, and it reads every selected member whole; an over-size
          member is yielded here as :class:`_Skipped` without reading it.

        Pickle-like and unnamed members are skipped unread (tarfile seeks past them
        in stream mode, reading in small blocks). Errors of the bytes end the
        iteration and are left in ``state.error``; errors of the storage raise
        :class:`ShardStreamError`.
        """
        try:
            archive = _EndTrackingTarFile.open(fileobj=stream, mode="r|*")
        except Exception as exc:
            self._raise_if_storage(exc)
            state.stage = STAGE_NOT_TAR
            state.error = _not_a_tar(exc)
            return
        self.readable = True
        unsafe_seen = False
        try:
            for info in archive:
                # As tar_file_iterator does: without this a stream-mode TarFile keeps
                # every header it has read.
                archive.members = []
                parts = split_member_name(info.name) if info.isfile() else None
                if parts is None:
                    continue
                key, extension = parts
                data: bytes | _Skipped
                if extension.rsplit(".", 1)[-1] in UNSAFE_EXTENSIONS:
                    if not unsafe_seen:
                        unsafe_seen = True
                        self._error(
                            key,
                            STAGE_UNSAFE,
                            f"member {short_repr(info.name)} ignored, never loaded: "
                            f"{', '.join(sorted(UNSAFE_EXTENSIONS))} members can run code "
                            "when unpickled (reported once per shard)",
                        )
                    continue
                if info.size > self.max_member_bytes:
                    data = _Skipped(
                        f"member {short_repr(info.name)} has {info.size} bytes "
                        f"(more than max_member_bytes={self.max_member_bytes}); skipped"
                    )
                else:
                    member = archive.extractfile(info)
                    data = member.read() if member is not None else b""
                state.last = (key, extension)
                yield {"fname": info.name, "data": data, "__url__": self.url}
        except Exception as exc:
            self._raise_if_storage(exc)
            state.error = f"tar stream broken: {type(exc).__name__}: {exc}"
            return
        end = archive.end_reason
        if isinstance(end, _EOF_HEADER_ERROR):
            state.end = True
        else:
            reason = "stream ends without the end-of-archive marker"
            if end is not None and not isinstance(end, _EMPTY_HEADER_ERROR):
                reason = f"unreadable member header ({type(end).__name__}: {end})"
            state.error = f"tar truncated or corrupt: {reason}"

    def _samples(self, stream: IO[bytes]) -> Generator[Sample, None, bool]:
        """Group members into samples with webdataset; returns True when the whole tar was read."""
        state = _TarState()
        failed: set[str] = set()

        def repeated_member(exc: Exception) -> bool:
            # group_by_keys raises ValueError for a member name repeated inside one
            # sample, while handling the member the loop yielded last; anything else
            # is a bug and is raised.
            if not isinstance(exc, ValueError):
                raise exc
            key, extension = state.last
            failed.add(key)
            self._error(key, STAGE_KEY, f"member '{key}.{extension}' occurs twice in one sample")
            return True

        seen_keys: set[str] = set()
        members = self._members(stream, state)
        try:
            for grouped in group_by_keys(members, keys=_grouping_key, handler=repeated_member):
                key = grouped.pop("__key__")
                del grouped["__url__"]
                if state.error is not None:
                    # The stream broke: group_by_keys hands over the sample being read,
                    # which may be missing members. Drop it.
                    self._error(key, state.stage, state.error)
                    return False
                if key in seen_keys:
                    self._error(
                        key,
                        STAGE_KEY,
                        f"key {short_repr(key)} occurs twice in the shard; later copy skipped",
                    )
                    continue
                seen_keys.add(key)
                sample = None if key in failed else self._build(key, grouped)
                if sample is not None:
                    self.n_samples += 1
                    yield sample
        finally:
            members.close()
        if state.error is not None:
            self._error(None, state.stage, state.error)
            return False
        return state.end

    def _build(self, key: str, members: Mapping[str, Any]) -> Sample | None:
        """Decode one sample's members (extension -> bytes or :class:`_Skipped`), or record why not."""
        try:
            _check_members(key, members)
            meta = _sample_meta(key, members)
            label = _sample_label(members, meta, self.require_label)
            boxes = _sample_boxes(meta)
            image = _sample_image(key, members, self.max_pixels)
        except _Refused as refused:
            self._error(key, refused.stage, refused.message)
            return None
        kept: list[Box] = []
        for index, box in enumerate(boxes):
            problem = box_problem(box, *image.size)
            if problem is None:
                kept.append(box)
            else:
                self._error(key, STAGE_BOXES, f"{problem} (box {index}; dropped, image kept)")
        return Sample(key=key, shard=self.url, image=image, label=label, boxes=kept)


# --------------------------------------------------------------------------- one sample


class _Refused(Exception):
    """Why a sample is not yielded: the error record's stage and message."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message


def _check_members(key: str, members: Mapping[str, Any]) -> None:
    """Refuse a key that is not UTF-8 text and a sample with a member skipped for its size."""
    if _as_text(key) != key:
        raise _Refused(
            STAGE_KEY,
            f"key {short_repr(_as_text(key))} is not UTF-8 text (its tar member names hold "
            "other bytes, shown as \\x escapes); sample skipped",
        )
    skipped = next((data for data in members.values() if isinstance(data, _Skipped)), None)
    if skipped is not None:
        raise _Refused(STAGE_TOO_LARGE, skipped.message)


def _sample_meta(key: str, members: Mapping[str, Any]) -> dict[str, Any]:
    """The sample's ``.json`` object (empty without one); refused when it is not an object."""
    if "json" not in members:
        return {}
    if not members["json"].strip():
        raise _Refused(STAGE_DECODE, f"member '{key}.json' is empty; it must hold an object")
    try:
        parsed = json.loads(members["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        # UnicodeDecodeError is a ValueError: bytes that are not UTF-8/16/32 text.
        reason = shorten(f"{type(exc).__name__}: {exc}")
        raise _Refused(STAGE_DECODE, f"member '{key}.json' is not valid JSON: {reason}") from None
    except RecursionError:
        raise _Refused(
            STAGE_DECODE, f"member '{key}.json' nests arrays or objects too deeply to be read"
        ) from None
    if not isinstance(parsed, dict):
        raise _Refused(
            STAGE_DECODE, f"member '{key}.json' must hold an object, got {type(parsed).__name__}"
        )
    return parsed


def _sample_label(
    members: Mapping[str, Any], meta: Mapping[str, Any], required: bool
) -> int | None:
    """The sample's label from ``.cls`` and ``.json["label"]``; None when it has none.

    A negative label means "no label" unless a label is ``required``; a missing or
    negative label then refuses the sample, and so does a malformed one or two that
    disagree.
    """
    label: int | None = None
    if "cls" in members:
        try:
            label = _parse_cls(members["cls"])
        except ValueError as exc:
            raise _Refused(STAGE_LABEL, str(exc)) from None
    json_label = meta.get("label")
    if json_label is not None:
        try:
            json_label = parse_label(json_label, "json 'label'")
        except ValueError as exc:
            raise _Refused(STAGE_LABEL, str(exc)) from None
        if label is not None and label != json_label:
            raise _Refused(STAGE_LABEL, f".cls says {label} but json 'label' says {json_label}")
        label = json_label
    if label is not None and label < 0:
        if required:
            raise _Refused(
                STAGE_LABEL,
                f"label {label} is negative; labels are class indices 0..N-1 "
                "(N: the model's number of classes)",
            )
        label = None
    if label is None and required:
        raise _Refused(STAGE_LABEL, "no label: neither a .cls member nor a 'label' in .json")
    return label


def _sample_boxes(meta: Mapping[str, Any]) -> list[Box]:
    """The boxes of the sample's ``.json`` (:func:`parse_boxes`)."""
    try:
        return parse_boxes(meta.get("boxes"))
    except ValueError as exc:
        raise _Refused(STAGE_BOXES, str(exc)) from None


def _sample_image(key: str, members: Mapping[str, Any], max_pixels: int) -> Image.Image:
    """The sample's image, decoded from the first image member present."""
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if extension is None:
        raise _Refused(
            STAGE_DECODE,
            f"no image member (.{', .'.join(IMAGE_EXTENSIONS)}); members: "
            f"{short_repr(sorted(members))}",
        )
    try:
        image = decode_image(members[extension], max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise _Refused(STAGE_TOO_LARGE, f"member '{key}.{extension}': {exc}") from None
    except ValueError as exc:
        raise _Refused(STAGE_DECODE, f"member '{key}.{extension}': {exc}") from None
    return image
