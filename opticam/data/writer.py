"""Writing WebDataset shards to any fsspec URL.

webdataset's ``TarWriter`` never closes a file object it is handed, so this
module owns the file objects itself and closes every one of them, also when
writing fails halfway.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import fsspec
import webdataset as wds

from opticam.errors import short_repr

__all__ = ["ShardWriter", "encode_member"]


def encode_member(value: Any) -> bytes:
    """Encode one sample field to bytes (bytes pass, str -> utf-8, dict/list -> JSON, int -> text)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise TypeError("booleans are ambiguous as shard members; encode them explicitly")
    if isinstance(value, int):
        return str(value).encode("ascii")
    if isinstance(value, dict | list):
        return json.dumps(value).encode("utf-8")
    raise TypeError(f"cannot encode a shard member of type {type(value).__name__}")


class ShardWriter:
    """Write samples into numbered tar shards of at most ``per_shard`` samples.

    Args:
        pattern: URL with one ``%d``-style slot, e.g. ``s3://bucket/demo/shard-%06d.tar``.
        per_shard: samples per shard (>= 1).
        storage_options: extra fsspec options (endpoint, credentials, ...).
        start_index: number of the first shard.
        mtime: modification time stamped on every tar member; the fixed default makes the
            same samples give byte-identical shards. ``None`` stamps the current time.

    Every sample is a mapping with ``__key__`` and members keyed by extension
    (``jpg``, ``cls``, ``json``, ...); values are encoded by :func:`encode_member`.
    ``urls`` lists the shards written so far, closed and complete.
    """

    def __init__(
        self,
        pattern: str,
        per_shard: int,
        storage_options: Mapping[str, Any] | None = None,
        start_index: int = 0,
        mtime: float | None = 0.0,
    ) -> None:
        if per_shard < 1:
            raise ValueError(f"per_shard must be >= 1, got {per_shard}")
        try:
            pattern % 0
        except TypeError as exc:
            raise ValueError(
                f"shard pattern {short_repr(pattern)} needs one %d slot, e.g. 'shard-%06d.tar'"
            ) from exc
        self.pattern = pattern
        self.per_shard = per_shard
        self.storage_options = dict(storage_options or {})
        self.index = start_index
        self.mtime = mtime
        self.urls: list[str] = []
        self._count = 0
        self._file: Any = None
        self._tar: wds.TarWriter | None = None
        self._url: str | None = None

    def _open(self) -> None:
        self._url = self.pattern % self.index
        self.index += 1
        self._file = fsspec.open(self._url, "wb", **self.storage_options).open()
        self._tar = wds.TarWriter(self._file, mtime=self.mtime)
        self._count = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        try:
            self._tar.close()
        finally:
            self._file.close()
            assert self._url is not None
            self.urls.append(self._url)
            self._tar = None
            self._file = None

    def write(self, sample: Mapping[str, Any]) -> None:
        """Append one sample, starting a new shard when the current one is full."""
        if "__key__" not in sample:
            raise ValueError("every sample needs a '__key__'")
        if self._tar is None or self._count >= self.per_shard:
            self._close_current()
            self._open()
        encoded: dict[str, str | bytes] = {"__key__": str(sample["__key__"])}
        for name, value in sample.items():
            if name.startswith("__"):
                continue
            encoded[name] = encode_member(value)
        assert self._tar is not None
        self._tar.write(encoded)
        self._count += 1

    def close(self) -> None:
        """Finish the last shard and close its file."""
        self._close_current()

    def __enter__(self) -> ShardWriter:
        """The writer itself; leaving the ``with`` block closes it."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the last shard, or delete it when the block raised while writing it."""
        if self._tar is not None and exc[0] is not None:
            # Never leave a half-written shard behind that looks complete.
            url = self._url
            try:
                self._tar.close()
            finally:
                self._file.close()
                self._tar = None
                self._file = None
            fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
            if fs.exists(path):
                fs.rm(path)
            return
        self.close()
