"""Data layer: WebDataset shards on any fsspec URL -> decoded samples -> model batches.

- :func:`expand_shards` (:mod:`~opticam.data.urls`): shard patterns (braces, globs,
  lists) -> existing shard URLs.
- :class:`ShardReader` (:mod:`~opticam.data.reader`): safe streaming of one shard into
  :class:`Sample` records, with every problem of its contents recorded as an
  :class:`ErrorRecord`; the storage failing mid-stream raises :class:`ShardStreamError`
  (read the shard again).
- :class:`Preprocess`: torchvision classification preset (resize, centre crop) for
  images and boxes alike.
- :func:`iter_batches` (:mod:`~opticam.data.batches`): background-thread preprocessing
  and batching into :class:`Batch`.
- :func:`pack`: ImageFolder tree or CSV list -> shards.
- :class:`ShardWriter`: numbered shards at any fsspec URL.
"""

from opticam.data.batches import iter_batches
from opticam.data.images import (
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    ImageFormatError,
    ImageTooLargeError,
    decode_image,
    to_rgb,
)
from opticam.data.pack import make_key, pack
from opticam.data.preprocess import Geometry, Preprocess
from opticam.data.reader import (
    UNSAFE_EXTENSIONS,
    ShardReader,
    ShardReadError,
    ShardStreamError,
    parse_boxes,
)
from opticam.data.types import Batch, Box, ErrorRecord, Sample
from opticam.data.urls import (
    NoShardsError,
    ShardPatternError,
    expand_braces,
    expand_shards,
    storage_options_for,
)
from opticam.data.writer import ShardWriter

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "UNSAFE_EXTENSIONS",
    "Batch",
    "Box",
    "ErrorRecord",
    "Geometry",
    "ImageFormatError",
    "ImageTooLargeError",
    "NoShardsError",
    "Preprocess",
    "ShardPatternError",
    "Sample",
    "ShardReadError",
    "ShardReader",
    "ShardStreamError",
    "ShardWriter",
    "decode_image",
    "expand_braces",
    "expand_shards",
    "iter_batches",
    "make_key",
    "pack",
    "parse_boxes",
    "storage_options_for",
    "to_rgb",
]
