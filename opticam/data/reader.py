"""One WebDataset tar shard -> decoded :class:`Sample` records and :class:`ErrorRecord` rows.

:class:`ShardReader` streams one shard from any fsspec URL. Bad samples become
error records and reading goes on; a truncated or unreadable shard is never
reported as ``complete``.

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

import json
import math
import subprocess
import tarfile
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import IO, Any, Self

import fsspec
from webdataset.tariterators import base_plus_ext, group_by_keys

from opticam.data.images import IMAGE_EXTENSIONS, decode_image
from opticam.data.types import Box, ErrorRecord, Sample
from opticam.data.urls import refuse_pipe, storage_options_for
from opticam.names import (
    STAGE_BOXES,
    STAGE_DECODE,
    STAGE_KEY,
    STAGE_LABEL,
    STAGE_OPEN,
    STAGE_TAR,
    STAGE_UNSAFE,
)

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "UNSAFE_EXTENSIONS",
    "ShardReadError",
    "ShardReader",
    "parse_boxes",
    "split_member_name",
]

UNSAFE_EXTENSIONS: frozenset[str] = frozenset({"pyd", "pkl", "pickle", "pth", "pt", "npy"})
"""Member extensions that webdataset would unpickle or load; opticam never reads them."""

DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
"""Members larger than this are skipped unread, so a hostile shard cannot exhaust memory."""


class ShardReadError(RuntimeError):
    """Raised by :meth:`ShardReader.check` when a shard was not read completely."""


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


def _grouping_key(name: str) -> tuple[str | None, str | None]:
    """:func:`split_member_name` in the ``(None, None)`` form ``group_by_keys`` skips."""
    parts = split_member_name(name)
    return parts if parts is not None else (None, None)


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
    members: list[tarfile.TarInfo]  # set by TarFile.__init__; missing from typeshed


@dataclass(frozen=True)
class _Skipped:
    """Stands in for the data of a member that was not read (the reason is the message)."""

    message: str


@dataclass
class _TarState:
    """How the member loop ended: ``error`` if the stream broke, ``end`` at the marker.

    ``last`` is the ``(key, extension)`` of the member yielded last.
    """

    error: str | None = None
    end: bool = False
    last: tuple[str, str] = ("", "")


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

    Error stages (:data:`opticam.names.STAGES`): ``"open"`` (URL cannot be opened),
    ``"tar"`` (truncated or unreadable tar; the sample being read at that point is
    dropped), ``"decode"`` (corrupt, empty or missing image, bad json, oversized
    member), ``"label"``, ``"boxes"``, ``"key"`` (key repeated in the shard, or a
    member repeated in a sample), ``"unsafe-member"``.

    A failure to open the URL is recorded, not raised, like every other problem:
    the caller decides (retry, fail the shard, or write the error row). Call
    :meth:`check` to turn an incomplete read into an exception. Closing the
    iterator early (``break``, ``close()``) closes the stream.

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
            refuse_pipe(url)
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
        """Raise :class:`ShardReadError` unless the last iteration read the whole shard.

        Raises:
            ShardReadError: naming the shard and the last open or tar error.
        """
        if not self.complete:
            shard_level = [e for e in self.errors if e.stage in (STAGE_OPEN, STAGE_TAR)]
            reason = shard_level[-1].message if shard_level else "iteration did not finish"
            raise ShardReadError(f"shard {self.url!r} was not read completely: {reason}")

    def __iter__(self) -> Generator[Sample, None, None]:
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
        in stream mode, reading in small blocks). Stream errors end the iteration and
        are left in ``state.error``.
        """
        try:
            archive = _EndTrackingTarFile.open(fileobj=stream, mode="r|*")
        except Exception as exc:
            state.error = f"not a readable tar stream: {type(exc).__name__}: {exc}"
            return
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
                            f"member {info.name!r} ignored, never loaded: "
                            f"{', '.join(sorted(UNSAFE_EXTENSIONS))} members can run code "
                            "when unpickled (reported once per shard)",
                        )
                    continue
                if info.size > self.max_member_bytes:
                    data = _Skipped(
                        f"member {info.name!r} has {info.size} bytes "
                        f"(more than max_member_bytes={self.max_member_bytes}); skipped"
                    )
                else:
                    member = archive.extractfile(info)
                    data = member.read() if member is not None else b""
                state.last = (key, extension)
                yield {"fname": info.name, "data": data, "__url__": self.url}
        except Exception as exc:
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
                    self._error(key, STAGE_TAR, state.error)
                    return False
                if key in seen_keys:
                    self._error(
                        key, STAGE_KEY, f"key {key!r} occurs twice in the shard; later copy skipped"
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
            self._error(None, STAGE_TAR, state.error)
            return False
        return state.end

    def _build(self, key: str, members: Mapping[str, Any]) -> Sample | None:
        """Decode one sample's members (extension -> bytes or :class:`_Skipped`), or record why not."""
        skipped = next((data for data in members.values() if isinstance(data, _Skipped)), None)
        if skipped is not None:
            self._error(key, STAGE_DECODE, skipped.message)
            return None
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
