"""Pack an image folder or a CSV list of images into WebDataset shards.

Two sources are understood:

- ImageFolder layout ``root/<class_name>/**/<image>``: classes are the sorted
  names of the sub-folders of ``root`` and label ids their positions (as in
  ``torchvision.datasets.ImageFolder``).
- A CSV file with rows ``path,label[,boxes]`` (an optional header row names
  the columns ``path``, ``label``, ``boxes`` and optionally ``class_name``);
  paths are relative to the CSV's folder unless absolute or a URL, ``label`` may
  be empty for unlabelled images, ``boxes`` is JSON text
  ``[[x0, y0, x1, y1], ...]`` in original pixels.

Each sample is written with its original image bytes under its own extension
(a ``.jpg`` stays a ``.jpg`` member, a ``.png`` a ``.png`` member), so pixels
round-trip exactly, plus ``cls`` (when labelled) and ``json`` with ``label``,
``class_name`` (when known), ``path`` (relative source path) and ``boxes``
(when given).

Keys are derived from the relative path: every character outside
``[A-Za-z0-9_-]`` (dots, slashes, spaces) becomes ``_``, so keys never contain
the dot at which webdataset splits member names; a key that would repeat gets a
``_<n>`` suffix.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from PIL import Image

from opticam.data.images import IMAGE_EXTENSIONS, IMAGE_FORMATS, identify_format
from opticam.data.reader import parse_boxes
from opticam.data.types import Box
from opticam.data.urls import storage_options_for
from opticam.data.writer import ShardWriter
from opticam.errors import short_repr

__all__ = ["PackItem", "collect_csv", "collect_image_folder", "make_key", "pack"]

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class PackItem:
    """One image to pack.

    Attributes:
        url: where the image bytes are read from.
        relpath: path relative to the source root (recorded in the json, basis of the key).
        extension: lower-case image extension used as the member name (``jpg``, ``png``, ...).
        label: class index, or ``None`` for an unlabelled image.
        class_name: class name when known.
        boxes: boxes in original pixels.
        origin: where the item was listed (for error messages), e.g. ``CSV 'x.csv' line 3``.
    """

    url: str
    relpath: str
    extension: str
    label: int | None
    class_name: str | None = None
    boxes: list[Box] = field(default_factory=list)
    origin: str = ""


def make_key(relpath: str) -> str:
    """A WebDataset-safe key from a relative path: ``a/b.c/img.01.jpg`` -> ``a_b_c_img_01``.

    The extension is removed, then every character outside ``[A-Za-z0-9_-]``
    becomes ``_`` (no dots: webdataset splits member names at the first dot).
    """
    stem = relpath.rsplit(".", 1)[0] if "." in posixpath.basename(relpath) else relpath
    key = _KEY_UNSAFE.sub("_", stem.strip("/"))
    return key or "_"


def _extension(path: str) -> str:
    base = posixpath.basename(path)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _unsupported(path: str) -> ValueError:
    return ValueError(
        f"unsupported image file {short_repr(path)} (extension {short_repr(_extension(path))}); "
        f"accepted: {', '.join('.' + e for e in IMAGE_EXTENSIONS)}"
    )


def collect_image_folder(
    root: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    skip_unsupported: bool = False,
) -> list[PackItem]:
    """List the images of an ImageFolder tree ``root/<class_name>/**/<image>``.

    Args:
        root: folder path or URL.
        storage_options: fsspec options for reading ``root``.
        skip_unsupported: ignore files with other extensions instead of raising.
            Hidden files (``.DS_Store``) and non-image files directly in ``root``
            (a README) are always ignored.

    Returns:
        Items sorted by class then path; labels are indices into the sorted class names.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folders, images directly in ``root``, a class folder
            without images, or a file with an unsupported extension.
    """
    fs, base = url_to_fs(root, **storage_options_for(root, storage_options))
    base = base.rstrip("/")
    if not fs.isdir(base):
        raise FileNotFoundError(
            f"image folder {short_repr(root)} does not exist or is not a folder"
        )
    entries = fs.ls(base, detail=True)
    classes = sorted(
        posixpath.basename(e["name"].rstrip("/"))
        for e in entries
        if e["type"] == "directory"
        and not posixpath.basename(e["name"].rstrip("/")).startswith(".")
    )
    loose = [
        e["name"]
        for e in entries
        if e["type"] == "file" and _extension(e["name"]) in IMAGE_EXTENSIONS
    ]
    if loose:
        raise ValueError(
            f"image folder {short_repr(root)} has images directly in it (e.g. {loose[0]!r}); "
            "the ImageFolder layout needs root/<class_name>/<image> (or use a CSV source)"
        )
    if not classes:
        raise ValueError(
            f"image folder {short_repr(root)} has no class sub-folders; expected root/<class_name>/<image>"
        )
    items: list[PackItem] = []
    for label, class_name in enumerate(classes):
        folder = f"{base}/{class_name}"
        files = sorted(fs.find(folder))
        count = 0
        for path in files:
            relpath = path[len(base) + 1 :]
            if any(part.startswith(".") for part in relpath.split("/")):
                continue
            extension = _extension(path)
            if extension not in IMAGE_EXTENSIONS:
                if skip_unsupported:
                    continue
                raise _unsupported(fs.unstrip_protocol(path))
            items.append(
                PackItem(
                    url=fs.unstrip_protocol(path),
                    relpath=relpath,
                    extension=extension,
                    label=label,
                    class_name=class_name,
                )
            )
            count += 1
        if count == 0:
            raise ValueError(
                f"class folder {short_repr(class_name)} in {short_repr(root)} contains no images"
            )
    return items


def _resolve(csv_url: str, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    folder = csv_url.rsplit("/", 1)[0] if "/" in csv_url else "."
    return f"{folder}/{path}"


def collect_csv(csv_url: str, storage_options: Mapping[str, Any] | None = None) -> list[PackItem]:
    """Read a CSV list of images: ``path,label[,boxes]`` per row, optional header.

    Args:
        csv_url: path or URL of the CSV file.
        storage_options: fsspec options for the CSV and the images.

    Returns:
        Items in file order.

    Raises:
        ValueError: an empty file, or a row that cannot be used; the message names
            the row's line number and content.
    """
    with fsspec.open(
        csv_url, "rt", encoding="utf-8", newline="", **storage_options_for(csv_url, storage_options)
    ) as handle:
        lines = list(csv.reader(handle))
    rows = [
        (number, row) for number, row in enumerate(lines, start=1) if any(c.strip() for c in row)
    ]
    if not rows:
        raise ValueError(
            f"CSV {short_repr(csv_url)} has no rows; expected 'path,label[,boxes]' lines"
        )
    columns, rows = _csv_columns(csv_url, rows)
    return [_csv_item(csv_url, columns, number, row) for number, row in rows]


def _csv_columns(
    csv_url: str, rows: list[tuple[int, list[str]]]
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The CSV's column names and its data rows: the header's when the first row is one."""
    columns = ["path", "label", "boxes"]
    first = [cell.strip().lower() for cell in rows[0][1]]
    if "path" in first:
        columns = first
        rows = rows[1:]
        unknown = set(columns) - {"path", "label", "boxes", "class_name"}
        if unknown or "label" not in columns:
            raise ValueError(
                f"CSV {short_repr(csv_url)} header {first}: columns must be path, label "
                f"and optionally boxes, class_name (unknown: {sorted(unknown)})"
            )
    return columns, rows


def _csv_item(csv_url: str, columns: list[str], number: int, row: list[str]) -> PackItem:
    """One CSV row (line ``number``) as an item, or ValueError naming the line."""
    where = f"CSV {short_repr(csv_url)} line {number} ({','.join(row)!r})"
    if len(row) > len(columns) or len(row) < 2:
        raise ValueError(f"{where}: expected columns {', '.join(columns)}, got {len(row)} fields")
    record = dict(zip(columns, (cell.strip() for cell in row), strict=False))
    path = record.get("path", "")
    if not path:
        raise ValueError(f"{where}: empty path")
    extension = _extension(path)
    if extension not in IMAGE_EXTENSIONS:
        raise ValueError(f"{where}: {_unsupported(path)}")
    return PackItem(
        url=_resolve(csv_url, path),
        relpath=path.lstrip("/"),
        extension=extension,
        label=_csv_label(where, record.get("label", "")),
        class_name=record.get("class_name") or None,
        boxes=_csv_boxes(where, record.get("boxes", "")),
        origin=where,
    )


def _csv_label(where: str, text: str) -> int | None:
    """A CSV row's label: a class index, or None when the cell is empty."""
    if not text:
        return None
    try:
        label = int(text)
    except ValueError:
        raise ValueError(
            f"{where}: label must be an integer or empty, got {short_repr(text)}"
        ) from None
    if label < 0:
        raise ValueError(
            f"{where}: label {label} is negative; labels are class indices 0..N-1 "
            "(leave it empty for an unlabelled image)"
        )
    return label


def _csv_boxes(where: str, text: str) -> list[Box]:
    """A CSV row's boxes (a JSON list of ``[x0, y0, x1, y1]``); none when the cell is empty."""
    if not text:
        return []
    try:
        boxes = parse_boxes(json.loads(text))
    except ValueError as exc:
        raise ValueError(f"{where}: bad boxes: {exc}") from None
    # The reader drops such boxes with an error record; at packing time a reversed box
    # is more likely a wrong column order, so refuse it here.
    for index, (x0, y0, x1, y1) in enumerate(boxes):
        if x1 < x0 or y1 < y0:
            raise ValueError(
                f"{where}: bad boxes: box {index} must have x0 <= x1 and y0 <= y1, "
                f"got {[x0, y0, x1, y1]}"
            )
    return boxes


def _check_image(data: bytes, item: PackItem) -> None:
    """Cheap header check: the file must be a JPEG, PNG or WebP image (what the reader opens)."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            image.size  # noqa: B018 - reading the header is the check
    except Exception as exc:
        found = identify_format(data)
        if found is not None and found not in IMAGE_FORMATS:
            raise ValueError(
                f"{item.url!r} is not a readable image: its bytes are {found}, not one of "
                f"{', '.join(IMAGE_FORMATS)}"
            ) from exc
        raise ValueError(
            f"{short_repr(item.url)} is not a readable image: {type(exc).__name__}: {exc}"
        ) from exc


def pack(
    source: str,
    url_pattern: str,
    per_shard: int,
    storage_options: Mapping[str, Any] | None = None,
    *,
    source_storage_options: Mapping[str, Any] | None = None,
    prefix: str = "shard",
    shuffle_seed: int | None = None,
    skip_unsupported: bool = False,
) -> list[str]:
    """Pack an ImageFolder tree or a CSV list into shards of ``per_shard`` samples.

    Args:
        source: an ImageFolder root or a ``.csv`` file (local path or any fsspec URL).
        url_pattern: destination, either a pattern with one ``%d`` slot
            (``s3://bucket/train/shard-%06d.tar``) or a folder / prefix, which
            becomes ``<folder>/<prefix>-%06d.tar``.
        per_shard: samples per shard (>= 1); the last shard may hold fewer.
        storage_options: fsspec options for the destination.
        source_storage_options: fsspec options for the source (default: none).
        prefix: shard file name prefix when ``url_pattern`` is a folder.
        shuffle_seed: shuffle the samples with this seed before packing (shards
            of a class-sorted folder otherwise hold one class each); ``None`` keeps
            the source order.
        skip_unsupported: ImageFolder only: ignore non-image files instead of raising.

    Returns:
        The URLs of the shards written, in order.

    Raises:
        ValueError: empty source, unreadable CSV row, unsupported extension, an
            unreadable image (all naming the offending item).
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    if source.lower().endswith(".csv"):
        items = collect_csv(source, source_storage_options)
    else:
        items = collect_image_folder(
            source, source_storage_options, skip_unsupported=skip_unsupported
        )
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)

    folder_pattern = f"{url_pattern.rstrip('/')}/{prefix}-%06d.tar"
    pattern = url_pattern if "%" in url_pattern else folder_pattern
    destination_options = storage_options_for(pattern, storage_options)

    used: set[str] = set()
    with ShardWriter(pattern, per_shard, storage_options=destination_options) as writer:
        for item in items:
            key = base = make_key(item.relpath)
            suffix = 1
            while key in used:
                key = f"{base}_{suffix}"
                suffix += 1
            used.add(key)
            try:
                options = storage_options_for(item.url, source_storage_options)
                with fsspec.open(item.url, "rb", **options) as handle:
                    data = handle.read()
            except OSError as exc:
                origin = f" ({item.origin})" if item.origin else ""
                raise ValueError(
                    f"cannot read image {short_repr(item.url)}{origin}: {exc}"
                ) from exc
            _check_image(data, item)
            meta: dict[str, Any] = {"path": item.relpath}
            sample: dict[str, Any] = {"__key__": key, item.extension: data}
            if item.label is not None:
                sample["cls"] = item.label
                meta["label"] = item.label
            if item.class_name is not None:
                meta["class_name"] = item.class_name
            if item.boxes:
                meta["boxes"] = [list(box) for box in item.boxes]
            sample["json"] = meta
            writer.write(sample)
    return list(writer.urls)
