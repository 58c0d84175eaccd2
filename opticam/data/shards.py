"""Compatibility module: the old home of shard expansion, reading and batching.

Its three jobs now live in one module each; import from there in new code:

- :mod:`opticam.data.urls`: shard patterns -> shard URLs (:func:`expand_shards`,
  :func:`expand_braces`, :func:`storage_options_for`, :class:`NoShardsError`);
- :mod:`opticam.data.reader`: one tar -> samples and error records
  (:class:`ShardReader`, :class:`ShardReadError`, :func:`parse_boxes`,
  :func:`split_member_name`, :data:`UNSAFE_EXTENSIONS`);
- :mod:`opticam.data.batches`: preprocess, batch, prefetch (:func:`iter_batches`,
  :class:`PreprocessFn`).

This module only re-exports those names, so that ``from opticam.data.shards import X``
keeps working for every name it used to export.
"""

from opticam.data.batches import PreprocessFn, iter_batches
from opticam.data.reader import (
    DEFAULT_MAX_MEMBER_BYTES,
    UNSAFE_EXTENSIONS,
    ShardReader,
    ShardReadError,
    parse_boxes,
    split_member_name,
)
from opticam.data.urls import NoShardsError, expand_braces, expand_shards, storage_options_for

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
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
