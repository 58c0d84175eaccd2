"""Tests for opticam.data.shards, the compatibility module: old imports keep working.

The behaviour itself is tested where it lives: tests/test_data_urls.py,
tests/test_data_reader.py and tests/test_data_batches.py.
"""

from __future__ import annotations

import opticam.data
import opticam.names
from opticam.data import batches, reader, shards, types, urls

# Everything opticam.data.shards exported before it was split, and where it lives now.
OLD_PUBLIC_NAMES = {
    "UNSAFE_EXTENSIONS": reader,
    "DEFAULT_MAX_MEMBER_BYTES": reader,
    "NoShardsError": urls,
    "PreprocessFn": batches,
    "ShardReadError": reader,
    "ShardReader": reader,
    "expand_braces": urls,
    "expand_shards": urls,
    "iter_batches": batches,
    "parse_boxes": reader,
    "split_member_name": reader,
    "storage_options_for": urls,
}


def test_old_names_are_the_new_objects() -> None:
    assert sorted(shards.__all__) == sorted(OLD_PUBLIC_NAMES)
    for name, module in OLD_PUBLIC_NAMES.items():
        assert getattr(shards, name) is getattr(module, name), name
        assert name in module.__all__, name
        if hasattr(opticam.data, name):
            assert getattr(opticam.data, name) is getattr(module, name), name


def test_package_exports_the_same_names() -> None:
    # opticam.data.__all__ before the split (the split must not drop a name).
    before = {
        *("IMAGE_EXTENSIONS", "UNSAFE_EXTENSIONS", "Batch", "Box", "ErrorRecord", "Geometry"),
        *("NoShardsError", "Preprocess", "Sample", "ShardReadError", "ShardReader"),
        *("ShardWriter", "decode_image", "expand_braces", "expand_shards", "iter_batches"),
        *("make_key", "pack", "parse_boxes", "storage_options_for", "to_rgb"),
    }
    assert before <= set(opticam.data.__all__)
    added_since = {"ShardPatternError", "ShardStreamError", "ImageTooLargeError"}
    added_since |= {"IMAGE_FORMATS", "ImageFormatError"}  # issue 17: the accepted formats
    assert set(opticam.data.__all__) - before == added_since
    for name in before:
        getattr(opticam.data, name)


def test_stage_names_come_from_the_registry() -> None:
    stages = [name for name in types.__all__ if name.startswith("STAGE_")]
    assert len(stages) == 8
    for name in stages:
        assert getattr(types, name) == getattr(opticam.names, name), name
        assert getattr(types, name) in opticam.names.STAGES, name
