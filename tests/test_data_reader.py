"""Tests for opticam.data.reader: safe tar reading, grouping, error records, completeness.

The tar-building helpers here are also used by tests/test_data_batches.py.
"""

from __future__ import annotations

import errno
import gzip
import http.client
import io
import json
import pickle
import sys
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import aiohttp
import botocore.exceptions
import fsspec
import numpy as np
import pytest
import s3fs
import urllib3.exceptions
from fsspec.exceptions import FSTimeoutError
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from PIL import Image
from s3fs.utils import FileExpired
from test_data_images import blank_png, refuse_loading

from opticam.data import (
    UNSAFE_EXTENSIONS,
    Sample,
    ShardReader,
    ShardReadError,
    ShardStreamError,
    ShardWriter,
    expand_shards,
    parse_boxes,
)
from opticam.data import reader as reader_module
from opticam.data.reader import is_storage_error, split_member_name

# ----------------------------------------------------------------------------- helpers


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def colour_image(index: int, size: tuple[int, int] = (24, 16)) -> Image.Image:
    """A small image whose pixels identify ``index``."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[..., 0] = index * 7 % 256
    array[..., 1] = np.arange(size[0], dtype=np.uint8)[None, :] * 5
    array[..., 2] = np.arange(size[1], dtype=np.uint8)[:, None] * 9
    return Image.fromarray(array, "RGB")


def write_tar(path: Path, members: list[tuple[str, bytes]], *, gz: bool = False) -> bytes:
    """Write a tar (optionally gzipped) with the given (name, data) members; returns its bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    if gz:
        data = gzip.compress(data)
    path.write_bytes(data)
    return data


def good_members(key: str, index: int, label: int | None = None) -> list[tuple[str, bytes]]:
    members = [(f"{key}.png", encode(colour_image(index)))]
    members.append((f"{key}.cls", str(index if label is None else label).encode()))
    return members


def keys_of(samples: list[Sample]) -> list[str]:
    return [s.key for s in samples]


def errors_of(reader: ShardReader) -> list[tuple[str | None, str]]:
    return [(e.key, e.stage) for e in reader.errors]


def write_shards(folder: Path) -> list[str]:
    """Three shards of 4 samples (keys s<shard>_<i>) written by ShardWriter; their URLs."""
    with ShardWriter(str(folder / "shard-%06d.tar"), 4) as writer:
        for index in range(12):
            writer.write(
                {
                    "__key__": f"s{index // 4}_{index % 4}",
                    "png": encode(colour_image(index)),
                    "cls": index % 5,
                    "json": {"boxes": [[1, 2, 10, 12]], "class_name": f"c{index % 5}"},
                }
            )
    return writer.urls


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """The folder of :func:`write_shards`'s three shards."""
    folder = tmp_path / "shards"
    write_shards(folder)
    return folder


# ----------------------------------------------------------------------------- reading


def test_read_local_shards(shard_dir: Path) -> None:
    urls = expand_shards(str(shard_dir / "shard-{000000..000002}.tar"))
    samples: list[Sample] = []
    for url in urls:
        reader = ShardReader(url)
        assert not reader.complete  # nothing claimed before reading
        got = list(reader)
        assert reader.complete and reader.errors == [] and reader.n_samples == 4
        assert all(s.shard == url for s in got)
        samples.extend(got)
    assert keys_of(samples) == [f"s{i // 4}_{i % 4}" for i in range(12)]
    for index, sample in enumerate(samples):
        assert sample.label == index % 5
        assert sample.boxes == [(1.0, 2.0, 10.0, 12.0)]
        assert sample.image.mode == "RGB"
        assert np.array_equal(np.asarray(sample.image), np.asarray(colour_image(index)))


@pytest.mark.e2e
def test_read_from_s3_with_env_endpoint(
    s3_bucket: str,
    s3_storage_options: dict[str, Any],
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with ShardWriter(f"{s3_bucket}/data/part-%04d.tar", 3, s3_storage_options) as writer:
        for index in range(7):
            writer.write({"__key__": f"k{index}", "png": encode(colour_image(index)), "cls": index})
    # Only the environment names the endpoint: AWS_ENDPOINT_URL must be honoured.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    urls = expand_shards(f"{s3_bucket}/data/*.tar")
    assert urls == writer.urls
    samples: list[Sample] = []
    for url in urls:
        reader = ShardReader(url)
        samples.extend(reader)
        assert reader.complete and reader.errors == []
    assert keys_of(samples) == [f"k{i}" for i in range(7)]
    assert [s.label for s in samples] == list(range(7))
    assert np.array_equal(np.asarray(samples[5].image), np.asarray(colour_image(5)))

    missing = ShardReader(f"{s3_bucket}/data/part-0009.tar")
    assert list(missing) == []
    assert errors_of(missing) == [(None, "open")] and not missing.complete


@pytest.mark.e2e
def test_pipe_urls_only_when_allowed(tmp_path: Path, shard_dir: Path) -> None:
    sentinel = tmp_path / "ran"
    command = f"pipe:touch {sentinel}; cat {shard_dir / 'shard-000000.tar'}"
    with pytest.raises(ValueError, match="allow_pipe"):
        ShardReader(command)
    assert not sentinel.exists()
    reader = ShardReader(command, allow_pipe=True)
    assert len(list(reader)) == 4 and reader.complete
    assert sentinel.exists()
    failing = ShardReader(f"pipe:cat {shard_dir / 'shard-000000.tar'}; exit 3", allow_pipe=True)
    assert len(list(failing)) == 4
    assert not failing.complete
    assert failing.errors[-1].stage == "tar" and "status 3" in failing.errors[-1].message


def test_bad_samples_become_error_records(tmp_path: Path) -> None:
    jpeg = encode(colour_image(3), "JPEG")
    members = [
        *good_members("a", 1),
        ("corrupt.jpg", jpeg[: len(jpeg) // 2]),  # truncated JPEG data
        ("corrupt.cls", b"1"),
        *good_members("b", 2),
        ("empty.jpg", b""),  # zero-byte member
        ("empty.cls", b"2"),
        ("text.png", b"this is not an image"),  # member that is not an image
        ("text.cls", b"3"),
        *good_members("c", 3),
        ("nolabel.png", encode(colour_image(4))),  # no .cls, no json label
        ("badjson.png", encode(colour_image(5))),
        ("badjson.json", b"{not json"),
        ("badcls.png", encode(colour_image(6))),
        ("badcls.cls", b"seven"),
        ("noimage.cls", b"1"),
        ("noimage.txt", b"hello"),
        ("badbox.png", encode(colour_image(7))),
        ("badbox.json", json.dumps({"label": 1, "boxes": [[5, 5, 1]]}).encode()),
        ("clash.png", encode(colour_image(8))),
        ("clash.cls", b"1"),
        ("clash.json", b'{"label": 2}'),
        *good_members("d", 4),
        ("a.txt", b"key a again, not adjacent"),
    ]
    shard = tmp_path / "bad.tar"
    write_tar(shard, members)
    reader = ShardReader(str(shard))
    samples = list(reader)
    assert keys_of(samples) == ["a", "b", "c", "d"]
    assert reader.complete
    assert errors_of(reader) == [
        ("corrupt", "decode"),
        ("empty", "decode"),
        ("text", "decode"),
        ("nolabel", "label"),
        ("badjson", "decode"),
        ("badcls", "label"),
        ("noimage", "decode"),
        ("badbox", "boxes"),
        ("clash", "label"),
        ("a", "key"),
    ]
    assert all(e.shard == str(shard) for e in reader.errors)
    messages = {e.key: e.message for e in reader.errors}
    assert "0 bytes" in messages["empty"]
    assert "4 numbers" in messages["badbox"]
    assert "'seven'" in messages["badcls"]

    # Without require_label the unlabelled sample is yielded with label None.
    lenient = ShardReader(str(shard), require_label=False)
    by_key = {s.key: s for s in lenient}
    assert by_key["nolabel"].label is None
    assert ("nolabel", "label") not in errors_of(lenient)


def test_json_label_and_boxes(tmp_path: Path) -> None:
    shard = tmp_path / "json.tar"
    write_tar(
        shard,
        [
            ("x.webp", encode(colour_image(1), "WEBP")),
            ("x.json", json.dumps({"label": 4, "boxes": [[0, 0, 3.5, 2]]}).encode()),
            ("y.jpeg", encode(colour_image(2), "JPEG")),
            ("y.cls", b" 7\n"),
            ("y.json", b'{"label": 7}'),
        ],
    )
    samples = list(ShardReader(str(shard)))
    assert [(s.key, s.label, s.boxes) for s in samples] == [
        ("x", 4, [(0.0, 0.0, 3.5, 2.0)]),
        ("y", 7, []),
    ]


@pytest.mark.parametrize(
    ("where", "kept", "lost"),
    [
        # Cut inside k2.png's data: k0, k1 were complete when k2 began; k2 is lost.
        ("inside-data", ["k0", "k1"], "k2"),
        # Cut exactly before k2's header, or inside it: k1 might have had more
        # members, so it is dropped rather than guessed complete.
        ("member-boundary", ["k0"], "k1"),
        ("header", ["k0"], "k1"),
    ],
)
def test_truncated_tar_is_incomplete(
    tmp_path: Path, where: str, kept: list[str], lost: str
) -> None:
    members = [m for i in range(4) for m in good_members(f"k{i}", i)]
    full = write_tar(tmp_path / "full.tar", members)
    full_reader = ShardReader(str(tmp_path / "full.tar"))
    assert len(list(full_reader)) == 4 and full_reader.complete
    full_reader.check()

    with tarfile.open(tmp_path / "full.tar") as archive:
        offsets = [info.offset for info in archive]
    k2_png = offsets[4]  # header of k2.png
    cut = {"inside-data": k2_png + 512 + 100, "member-boundary": k2_png, "header": k2_png + 200}
    shard = tmp_path / f"cut-{where}.tar"
    shard.write_bytes(full[: cut[where]])
    reader = ShardReader(str(shard))
    assert keys_of(list(reader)) == kept
    assert reader.complete is False
    assert [(e.shard, e.key, e.stage) for e in reader.errors] == [(str(shard), lost, "tar")]
    with pytest.raises(ShardReadError, match="not read completely"):
        reader.check()


def test_unreadable_and_missing_shards(tmp_path: Path) -> None:
    full = write_tar(tmp_path / "full.tar", good_members("k", 1))
    shards = {
        "zero.tar": b"",
        "zero.tar.gz": gzip.compress(b""),
        "junk.tar": b"\x01" * 3000,
        "text.tar": b"a text file, not a tar\n" * 50,
        "short.tar": full[:200],  # cut inside its first header: nothing to read
    }
    messages = {}
    for name, data in shards.items():
        (tmp_path / name).write_bytes(data)
        reader = ShardReader(str(tmp_path / name))
        assert list(reader) == []
        assert errors_of(reader) == [(None, "not-a-tar")], name
        assert not reader.readable and not reader.complete and reader.n_samples == 0
        with pytest.raises(ShardReadError, match="not a tar"):
            reader.check()
        messages[name] = reader.errors[0].message
    assert "empty (0 bytes" in messages["zero.tar"] and "empty" in messages["zero.tar.gz"]
    assert "no tar header" in messages["junk.tar"] and "no tar header" in messages["short.tar"]

    # A tar cut after its first header is a truncated tar, not "not a tar".
    (tmp_path / "cut.tar").write_bytes(full[:700])
    cut = ShardReader(str(tmp_path / "cut.tar"))
    assert list(cut) == []
    assert errors_of(cut) == [("k", "tar")] and cut.readable and not cut.complete
    # An empty archive (just the end marker) is a tar with no samples.
    (tmp_path / "empty.tar").write_bytes(bytes(1024))
    empty = ShardReader(str(tmp_path / "empty.tar"))
    assert list(empty) == [] and empty.readable and empty.complete and empty.errors == []

    missing = ShardReader(str(tmp_path / "absent.tar"))
    assert list(missing) == []
    assert errors_of(missing) == [(None, "open")] and not missing.complete
    assert not missing.readable
    with pytest.raises(ShardReadError, match="absent.tar"):
        missing.check()


def test_gzipped_shard(tmp_path: Path) -> None:
    members = [m for i in range(3) for m in good_members(f"g{i}", i)]
    data = write_tar(tmp_path / "s.tar.gz", members, gz=True)
    reader = ShardReader(str(tmp_path / "s.tar.gz"))
    assert keys_of(list(reader)) == ["g0", "g1", "g2"] and reader.complete
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    cut = ShardReader(str(tmp_path / "cut.tar.gz"))
    list(cut)
    assert not cut.complete and cut.errors[-1].stage == "tar"


class _CreatesFile:
    """Unpickling this calls ``open(path, 'w')``: a stand-in for arbitrary code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def extracted_names(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of every member whose data the reader reads (the rest is skipped)."""
    names: list[str] = []
    tar_class = reader_module._EndTrackingTarFile
    original = tar_class.extractfile

    def spy(self: tarfile.TarFile, member: Any) -> IO[bytes] | None:
        names.append(member.name)
        return original(self, member)

    monkeypatch.setattr(tar_class, "extractfile", spy)
    return names


def test_pickle_members_are_never_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "pwned.txt"
    payload = pickle.dumps(_CreatesFile(str(target)))
    # The payload is live: unpickling it elsewhere does create a file.
    probe = tmp_path / "probe.txt"
    pickle.loads(pickle.dumps(_CreatesFile(str(probe)))).close()
    assert probe.exists()

    unsafe = [
        ("a.pyd", payload),
        ("b.pkl", payload),
        ("b.pickle", payload),
        ("b.seg.PTH", payload),  # the last part of the extension decides, in any case
        ("c.pt", payload),
        ("c.npy", payload),
    ]
    assert {name.rsplit(".", 1)[-1].lower() for name, _ in unsafe} == UNSAFE_EXTENSIONS
    shard = tmp_path / "evil.tar"
    write_tar(shard, [*good_members("a", 1), *unsafe[:1], *unsafe[1:4], *good_members("b", 2)])
    read = extracted_names(monkeypatch)
    reader = ShardReader(str(shard))
    samples = list(reader)
    assert not target.exists()
    assert keys_of(samples) == ["a", "b"]
    assert reader.complete
    assert errors_of(reader) == [("a", "unsafe-member")]  # once per shard
    assert "a.pyd" in reader.errors[0].message
    # Never even read into memory: only the safe members were extracted.
    assert read == ["a.png", "a.cls", "b.png", "b.cls"]


def test_oversize_member_skipped_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    small, big = encode(colour_image(1)), encode(Image.fromarray(noise, "RGB"))
    assert len(small) < 1000 < len(big)
    shard = tmp_path / "big.tar"
    write_tar(
        shard,
        [
            ("a.png", small),
            ("a.cls", b"1"),
            ("big.png", big),
            ("big.cls", b"2"),
            ("c.png", small),
            ("c.cls", b"3"),
        ],
    )
    read = extracted_names(monkeypatch)
    reader = ShardReader(str(shard), max_member_bytes=1000)
    assert keys_of(list(reader)) == ["a", "c"]
    assert reader.complete
    assert errors_of(reader) == [("big", "too-large")]
    assert f"{len(big)} bytes" in reader.errors[0].message
    assert "max_member_bytes=1000" in reader.errors[0].message
    assert "big.png" not in read
    # With the default limit the same member is read.
    assert keys_of(list(ShardReader(str(shard)))) == ["a", "big", "c"]


def test_repeated_member_in_one_sample(tmp_path: Path) -> None:
    shard = tmp_path / "twice.tar"
    write_tar(
        shard,
        [
            *good_members("a", 1),
            ("b.png", encode(colour_image(2))),
            ("b.cls", b"2"),
            ("b.cls", b"3"),  # same member twice in a row: which label is meant?
            *good_members("c", 3),
        ],
    )
    reader = ShardReader(str(shard))
    assert keys_of(list(reader)) == ["a", "c"]
    assert reader.complete
    assert errors_of(reader) == [("b", "key")]
    assert "'b.cls' occurs twice in one sample" in reader.errors[0].message


def test_members_that_are_not_sample_fields_are_ignored(tmp_path: Path) -> None:
    shard = tmp_path / "extras.tar"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        folder = tarfile.TarInfo("./sub")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for name, data in [
            ("__meta__", b"webdataset metadata"),
            ("README", b"no extension"),
            ("./sub/.DS_Store", b"hidden"),
            ("./sub/k.PNG", encode(colour_image(1))),
            ("./sub/k.cls", b"1"),
            ("./sub/k.txt", b"other members are ignored"),
            ("./sub/k.__bad__", b"1"),  # webdataset's field meaning "drop this sample"
            ("./sub/k.__key__", b"not the key"),
            ("trailing.", b"empty extension"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    shard.write_bytes(buffer.getvalue())
    reader = ShardReader(str(shard))
    samples = list(reader)
    assert [(s.key, s.label) for s in samples] == [("sub/k", 1)]
    assert reader.complete and reader.errors == []


def test_closing_the_iterator_closes_the_stream(
    shard_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[IO[bytes]] = []
    real_open = fsspec.open

    def tracking_open(url: str, mode: str = "rb", **options: Any) -> Any:
        handle = real_open(url, mode, **options)
        real_handle_open = handle.open

        def open_and_track() -> IO[bytes]:
            stream = real_handle_open()
            opened.append(stream)
            return stream

        handle.open = open_and_track
        return handle

    monkeypatch.setattr(reader_module.fsspec, "open", tracking_open)
    reader = ShardReader(str(shard_dir / "shard-000000.tar"))
    samples = iter(reader)
    assert next(samples).key == "s0_0"
    assert len(opened) == 1 and not opened[0].closed
    samples.close()  # type: ignore[attr-defined]  # iter() is typed Iterator; it is a generator
    assert opened[0].closed
    assert not reader.complete and reader.n_samples == 1
    # A full read closes it too.
    assert len(list(reader)) == 4
    assert len(opened) == 2 and opened[1].closed


def test_image_modes_convert_to_rgb(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    rgb = np.stack([gray, 255 - gray, np.full_like(gray, 30)], axis=-1)
    alpha = np.where(gray > 100, 255, 0).astype(np.uint8)
    palette = Image.fromarray(rgb, "RGB").quantize(colors=16)
    sixteen = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 3).astype(np.uint16)
    cmyk = Image.fromarray(rgb, "RGB").convert("CMYK")
    images = {
        "gray": (Image.fromarray(gray, "L"), "PNG", np.stack([gray] * 3, axis=-1)),
        "palette": (palette, "PNG", np.asarray(palette.convert("RGB"))),
        "rgba": (
            Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
            "PNG",
            rgb,  # alpha dropped, colour kept (torchvision's loader does the same)
        ),
        "la": (Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG", np.stack([gray] * 3, -1)),
        "cmyk": (cmyk, "JPEG", None),
        "sixteen": (
            Image.fromarray(sixteen),
            "PNG",
            np.stack([np.round(sixteen / 65535 * 255).astype(np.uint8)] * 3, axis=-1),
        ),
    }
    members = []
    for key, (image, fmt, _) in images.items():
        members.append((f"{key}.{'jpg' if fmt == 'JPEG' else 'png'}", encode(image, fmt)))
        members.append((f"{key}.cls", b"0"))
    write_tar(tmp_path / "modes.tar", members)
    reader = ShardReader(str(tmp_path / "modes.tar"))
    decoded = {s.key: s.image for s in reader}
    assert reader.errors == []
    assert Image.open(io.BytesIO(members[-2][1])).mode in ("I;16", "I")  # really 16-bit
    for key, (_, _, expected) in images.items():
        assert decoded[key].mode == "RGB" and decoded[key].size == (8, 8)
        if expected is not None:
            assert np.array_equal(np.asarray(decoded[key]), expected), key
    # CMYK through JPEG is lossy: compare with the RGB original loosely.
    difference = np.abs(np.asarray(decoded["cmyk"]).astype(int) - rgb.astype(int))
    assert difference.mean() < 12


def test_member_names_and_boxes_parsing() -> None:
    assert split_member_name("a/b.c/img_7.seg.PNG") == ("a/b.c/img_7", "seg.png")
    assert split_member_name("./k.jpg") == ("k", "jpg")
    assert split_member_name("README") is None
    assert split_member_name("dir/.DS_Store") is None
    assert split_member_name("__meta__") is None
    assert split_member_name("k.__key__") is None
    assert parse_boxes(None) == []
    assert parse_boxes([[0, 1, 2, 3]]) == [(0.0, 1.0, 2.0, 3.0)]
    for bad in ([0, 1, 2, 3], [[0, 1, 2]], [[0, 1, "2", 3]], [[0, 0, float("nan"), 1]], "x"):
        with pytest.raises(ValueError, match="box"):
            parse_boxes(bad)


# ----------------------------------------------------------------------------- labels and boxes


def test_negative_label_is_reported_as_negative(tmp_path: Path) -> None:
    shard = tmp_path / "negative.tar"
    write_tar(
        shard,
        [
            *good_members("a", 1),
            ("neg_cls.png", encode(colour_image(2))),
            ("neg_cls.cls", b"-3"),
            ("neg_json.png", encode(colour_image(3))),
            ("neg_json.json", b'{"label": -1}'),
            ("none.png", encode(colour_image(4))),
            *good_members("b", 0),  # 0 is a class index like any other
        ],
    )
    reader = ShardReader(str(shard))
    assert [(s.key, s.label) for s in reader] == [("a", 1), ("b", 0)]
    assert errors_of(reader) == [("neg_cls", "label"), ("neg_json", "label"), ("none", "label")]
    messages = [e.message for e in reader.errors]
    assert messages[0].startswith("label -3 is negative; labels are class indices 0..N-1")
    assert messages[1].startswith("label -1 is negative")
    assert messages[2].startswith("no label")  # a missing label is still said so

    # When labels are not needed, a negative one means "unlabelled", like a missing one.
    lenient = ShardReader(str(shard), require_label=False)
    assert [(s.key, s.label) for s in lenient] == [
        ("a", 1),
        ("neg_cls", None),
        ("neg_json", None),
        ("none", None),
        ("b", 0),
    ]
    assert lenient.errors == []


def test_boxes_without_area_or_outside_the_image_are_dropped(tmp_path: Path) -> None:
    # colour_image is 24 x 16 pixels.
    boxes = [
        [1, 2, 10, 12],  # fine
        [5, 5, 5, 9],  # zero width
        [5, 9, 8, 3],  # y1 < y0
        [24, 0, 30, 5],  # right of the image, touching its edge only
        [-9, -9, -1, 4],  # left of and above it
        [20, 10, 40, 40],  # partly outside: kept, preprocessing clips it
    ]
    shard = tmp_path / "boxes.tar"
    write_tar(
        shard,
        [
            ("k.png", encode(colour_image(1))),
            ("k.json", json.dumps({"label": 2, "boxes": boxes}).encode()),
            *good_members("m", 3),
        ],
    )
    reader = ShardReader(str(shard))
    samples = list(reader)
    assert keys_of(samples) == ["k", "m"] and reader.complete
    assert samples[0].boxes == [(1.0, 2.0, 10.0, 12.0), (20.0, 10.0, 40.0, 40.0)]
    assert errors_of(reader) == [("k", "boxes")] * 4
    messages = [e.message for e in reader.errors]
    assert messages[0] == (
        "box [5, 5, 5, 9] has no area (x0 < x1 and y0 < y1 needed; image 24x16) "
        "(box 1; dropped, image kept)"
    )
    assert messages[1].startswith("box [5, 9, 8, 3] has no area")
    assert messages[2].startswith("box [24, 0, 30, 5] lies fully outside the 24x16 image")
    assert messages[3].startswith("box [-9, -9, -1, 4] lies fully outside the 24x16 image")


# ----------------------------------------------------------------------------- image size


def test_image_over_max_pixels_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = blank_png(4000, 3000)  # 12 megapixels of 16-bit zeros: 24 MB decoded
    assert len(big) < 60_000
    shard = tmp_path / "pixels.tar"
    write_tar(
        shard,
        [*good_members("a", 1), ("big.png", big), ("big.cls", b"2"), *good_members("c", 3)],
    )
    refuse_loading(monkeypatch, (4000, 3000))
    reader = ShardReader(str(shard), max_pixels=10_000_000)
    assert keys_of(list(reader)) == ["a", "c"] and reader.complete
    assert errors_of(reader) == [("big", "too-large")]
    assert "4000x3000 = 12,000,000 pixels" in reader.errors[0].message
    assert "max_pixels=10,000,000" in reader.errors[0].message
    with pytest.raises(ValueError, match="max_pixels must be at least 1, got 0"):
        ShardReader(str(shard), max_pixels=0)


# ----------------------------------------------------------------------------- storage failures


class FlakyFile(AbstractBufferedFile):
    """A remote file as fsspec makes them (S3File, HTTPFile, GCSFile), failing midway.

    Reads go through fsspec's read-ahead cache to ``_fetch_range``, which raises as a
    dropped connection does once a read reaches past ``fail_after`` bytes.
    """

    def __init__(self, fs: FlakyFileSystem, path: str) -> None:
        self.data, self.fail_after, self.error = fs.data, fs.fail_after, fs.error
        super().__init__(fs, path, mode="rb", block_size=512, size=len(fs.data))

    def _fetch_range(self, start: int, end: int) -> bytes:
        if end > self.fail_after:
            raise self.error()
        return self.data[start:end]


class FlakyFileSystem(AbstractFileSystem):
    """``flaky://`` URLs: one file's bytes, served by :class:`FlakyFile`."""

    protocol = "flaky"
    cachable = False

    def __init__(
        self, data: bytes, fail_after: int, error: Callable[[], Exception], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.data, self.fail_after, self.error = data, fail_after, error

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> FlakyFile:
        return FlakyFile(self, path)


@pytest.fixture
def flaky_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register ``flaky://`` with fsspec for one test."""
    registry = sys.modules["fsspec.registry"]._registry  # type: ignore[attr-defined]
    monkeypatch.setitem(registry, "flaky", FlakyFileSystem)


def _cause_cycle() -> RuntimeError:
    first, second = RuntimeError("first"), RuntimeError("second")
    first.__cause__, second.__cause__ = second, first
    return first


def _raised_from(cause: BaseException) -> RuntimeError:
    try:
        raise RuntimeError("wrapped by a library") from cause
    except RuntimeError as exc:
        return exc


# What the storage stacks under fsspec raise when a connection breaks during read():
# OSErrors, and the transport errors of aiohttp, botocore, urllib3 and http.client.
STORAGE_ERRORS: dict[str, Callable[[], BaseException]] = {
    "connection-reset": lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "timeout": lambda: TimeoutError("The read operation timed out"),
    "fsspec-timeout": FSTimeoutError,
    "aiohttp-payload": lambda: aiohttp.ClientPayloadError("Response payload is not completed"),
    "aiohttp-disconnected": aiohttp.ServerDisconnectedError,
    "aiohttp-oserror": lambda: aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset"),
    "botocore-streaming": lambda: botocore.exceptions.ResponseStreamingError(
        error=aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset")
    ),
    "botocore-read-timeout": lambda: botocore.exceptions.ReadTimeoutError(endpoint_url="x"),
    "urllib3-protocol": lambda: urllib3.exceptions.ProtocolError("Connection broken"),
    "http-incomplete": lambda: http.client.IncompleteRead(b"partial", 100),
    "s3fs-file-changed": lambda: FileExpired("bucket/shard.tar", "etag"),
    "raised-from-reset": lambda: _raised_from(ConnectionResetError(errno.ECONNRESET, "reset")),
}
# What bytes that are not a whole tar raise: the same on every read.
FORMAT_ERRORS: dict[str, Callable[[], BaseException]] = {
    "tar-read": lambda: tarfile.ReadError("unexpected end of data"),
    "tar-header": lambda: tarfile.HeaderError("bad checksum"),
    "eof": lambda: EOFError("Compressed file ended before the end-of-stream marker"),
    "zlib": lambda: zlib.error("Error -3 while decompressing data"),
    "bad-gzip": lambda: gzip.BadGzipFile("Not a gzipped file"),  # an OSError
    "value": lambda: ValueError("I/O operation on closed file"),
    "cause-cycle": _cause_cycle,
}


@pytest.mark.parametrize("name", sorted(STORAGE_ERRORS))
def test_storage_errors_are_classified_as_storage(name: str) -> None:
    assert is_storage_error(STORAGE_ERRORS[name]())


@pytest.mark.parametrize("name", sorted(FORMAT_ERRORS))
def test_format_errors_are_not_storage_errors(name: str) -> None:
    assert not is_storage_error(FORMAT_ERRORS[name]())


def flaky_shard(tmp_path: Path, n: int = 8) -> tuple[bytes, list[int]]:
    """A tar of ``n`` samples with noisy 40x40 PNGs; its bytes and each sample's end offset."""
    noise = np.random.default_rng(1).integers(0, 256, (n, 40, 40, 3), dtype=np.uint8)
    members = []
    for index in range(n):
        members += [(f"k{index}.png", encode(Image.fromarray(noise[index], "RGB")))]
        members += [(f"k{index}.cls", str(index).encode())]
    data = write_tar(tmp_path / "whole.tar", members)
    with tarfile.open(tmp_path / "whole.tar") as archive:
        ends = [info.offset_data + info.size for info in archive][1::2]
    return data, ends


@pytest.mark.parametrize("name", sorted(STORAGE_ERRORS))
@pytest.mark.parametrize("where", ["first-read", "mid-stream"])
def test_storage_failure_while_streaming_raises(
    tmp_path: Path, flaky_protocol: None, name: str, where: str
) -> None:
    data, ends = flaky_shard(tmp_path)
    fail_after = 0 if where == "first-read" else len(data) // 2
    url = "flaky://bucket/shard-000003.tar"
    options = {"data": data, "fail_after": fail_after, "error": STORAGE_ERRORS[name]}
    reader = ShardReader(url, storage_options=options)
    keys: list[str] = []
    with pytest.raises(ShardStreamError) as info:
        for sample in reader:
            keys.append(sample.key)
    error = info.value
    assert error.url == url and error.n_samples == len(keys) == reader.n_samples
    assert isinstance(error, OSError)
    assert url in str(error) and "read the shard again" in str(error)
    # The storage's own exception, as raised by its read(), is the cause.
    assert type(error.__cause__) is type(STORAGE_ERRORS[name]())
    assert not reader.complete
    assert [e for e in reader.errors if e.stage in ("tar", "not-a-tar")] == []
    if where == "mid-stream":
        # Samples whose bytes all came before the failure were yielded, in order.
        assert 0 < len(keys) < len(ends) and keys == [f"k{i}" for i in range(len(keys))]
        assert ends[len(keys) - 1] <= fail_after and reader.readable
    else:
        assert keys == [] and not reader.readable

    # The same bytes cut at the same place are recorded, not raised: a truncated tar,
    # or (cut before its first header) not a tar.
    (tmp_path / "cut.tar").write_bytes(data[: max(fail_after, 1)])
    cut = ShardReader(str(tmp_path / "cut.tar"))
    list(cut)
    assert not cut.complete
    assert cut.errors[-1].stage == ("tar" if where == "mid-stream" else "not-a-tar")


def test_shard_stream_error_survives_pickling() -> None:
    error = ShardStreamError("s3://b/shard-000001.tar", 17, "ClientPayloadError: cut")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ShardStreamError)
    assert (copy.url, copy.n_samples, copy.reason, str(copy)) == (
        error.url,
        error.n_samples,
        error.reason,
        str(error),
    )
    assert "after 17 samples" in str(copy) and "ClientPayloadError: cut" in str(copy)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "make_error",
    [
        # aiohttp's own payload error passes aiobotocore unchanged; s3fs retries it first.
        lambda: aiohttp.ClientPayloadError("Response payload is not completed"),
        # A reset socket, raw, and as aiobotocore's body read wraps a ClientOSError.
        lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        lambda: botocore.exceptions.ResponseStreamingError(
            error=aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer")
        ),
    ],
    ids=["client-payload", "connection-reset", "response-streaming"],
)
def test_s3_connection_cut_mid_stream_raises(
    s3_bucket: str,
    s3_storage_options: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    make_error: Callable[[], Exception],
) -> None:
    from aiobotocore.response import AioStreamingBody

    data, _ = flaky_shard(tmp_path)
    url = f"{s3_bucket}/shard-000000.tar"
    fs = fsspec.filesystem("s3", **s3_storage_options)
    fs.pipe_file(url, data)

    body_reads = []
    real_read = AioStreamingBody.read

    async def read_then_cut(self: AioStreamingBody, amt: int | None = None) -> bytes:
        # The first ranged GET of the shard arrives whole; every later one is cut.
        body_reads.append(amt)
        if len(body_reads) > 1:
            raise make_error()
        return bytes(await real_read(self, amt))

    monkeypatch.setattr(AioStreamingBody, "read", read_then_cut)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)  # s3fs's retries, kept short
    # Small blocks, so that the shard takes two ranged GETs: the first one (32 KB and
    # a tar block) holds the first samples whole.
    options = {**s3_storage_options, "default_block_size": 32768}
    assert len(data) > 32768 + 512
    reader = ShardReader(url, storage_options=options)
    keys: list[str] = []
    with pytest.raises(ShardStreamError) as info:
        for sample in reader:
            keys.append(sample.key)
    assert info.value.url == url and info.value.n_samples == len(keys) > 0
    assert type(info.value.__cause__) is type(make_error())  # what s3fs raised, unchanged
    assert len(body_reads) > 1 and not reader.complete
    assert [e for e in reader.errors if e.stage in ("tar", "not-a-tar")] == []


# ----------------------------------------------------------------------------- every field on its own

_LONG = "9" * 5000  # more digits than int() reads, and far more than a message may quote

# (case id, members of the bad sample "bad" besides its PNG, stage, text the message holds).
# Every kind of value a .cls text or a .json file can hold, in each field.
_BAD_FIELDS: list[tuple[str, list[tuple[str, bytes]], str, str]] = [
    # .cls: one integer as text, nothing else
    ("cls-beyond-int64", [("bad.cls", b"9223372036854775808")], "label", "64-bit"),
    ("cls-huge", [("bad.cls", b"1" * 30)], "label", "1" * 30 + " does not fit"),
    ("cls-very-long", [("bad.cls", _LONG.encode())], "label", "64-bit"),
    ("cls-below-int64", [("bad.cls", b"-9223372036854775809")], "label", "64-bit"),
    ("cls-float", [("bad.cls", b"1.5")], "label", "'1.5'"),
    ("cls-integral-float", [("bad.cls", b"3.0")], "label", "'3.0'"),
    ("cls-exponent", [("bad.cls", b"1e400")], "label", "'1e400'"),
    ("cls-inf", [("bad.cls", b"inf")], "label", "'inf'"),
    ("cls-nan", [("bad.cls", b"NaN")], "label", "'NaN'"),
    ("cls-bool", [("bad.cls", b"true")], "label", "'true'"),
    ("cls-list", [("bad.cls", b"[1]")], "label", "'[1]'"),
    ("cls-dict", [("bad.cls", b'{"label": 1}')], "label", "'{\"label\": 1}'"),
    ("cls-null", [("bad.cls", b"null")], "label", "'null'"),
    ("cls-underscore", [("bad.cls", b"1_000")], "label", "'1_000'"),
    ("cls-arabic-digit", [("bad.cls", "٣".encode())], "label", "'٣'"),
    ("cls-two-numbers", [("bad.cls", b"1 2")], "label", "'1 2'"),
    ("cls-empty", [("bad.cls", b"")], "label", "empty"),
    ("cls-blank", [("bad.cls", b" \n")], "label", "empty"),
    ("cls-not-utf8", [("bad.cls", b"\xff\xfe3")], "label", "not UTF-8"),
    ("cls-utf16", [("bad.cls", "3".encode("utf-16"))], "label", "not UTF-8"),
    # json "label": an integer, or null (= no label)
    (
        "json-label-beyond-int64",
        [("bad.json", b'{"label": 18446744073709551616}')],
        "label",
        "64-bit",
    ),
    (
        "json-label-below-int64",
        [("bad.json", b'{"label": -18446744073709551616}')],
        "label",
        "64-bit",
    ),
    ("json-label-float", [("bad.json", b'{"label": 1.5}')], "label", "float 1.5"),
    ("json-label-integral-float", [("bad.json", b'{"label": 3.0}')], "label", "float 3.0"),
    ("json-label-1e400", [("bad.json", b'{"label": 1e400}')], "label", "float inf"),
    ("json-label-nan", [("bad.json", b'{"label": NaN}')], "label", "float nan"),
    ("json-label-infinity", [("bad.json", b'{"label": -Infinity}')], "label", "float -inf"),
    ("json-label-bool", [("bad.json", b'{"label": true}')], "label", "bool True"),
    ("json-label-string", [("bad.json", b'{"label": "3"}')], "label", "str '3'"),
    ("json-label-list", [("bad.json", b'{"label": [3]}')], "label", "list [3]"),
    ("json-label-dict", [("bad.json", b'{"label": {"id": 3}}')], "label", "dict {'id': 3}"),
    ("json-label-null", [("bad.json", b'{"label": null}')], "label", "no label"),
    (
        "json-label-long-string",
        [("bad.json", json.dumps({"label": _LONG}).encode())],
        "label",
        "str '999",
    ),
    (
        "json-label-long-list",
        [("bad.json", json.dumps({"label": [1] * 10**5}).encode())],
        "label",
        "list [1, 1,",
    ),
    (
        "json-label-too-many-digits",
        [("bad.json", b'{"label": ' + _LONG.encode() + b"}")],
        "decode",
        "4300",
    ),
    # .cls and json disagree
    ("cls-and-json-differ", [("bad.cls", b"1"), ("bad.json", b'{"label": 2}')], "label", "says 2"),
    # the json document itself
    ("json-empty", [("bad.cls", b"1"), ("bad.json", b"")], "decode", "empty"),
    ("json-blank", [("bad.cls", b"1"), ("bad.json", b"  \n")], "decode", "empty"),
    (
        "json-not-utf8",
        [("bad.cls", b"1"), ("bad.json", b'{"label": "\xff"}')],
        "decode",
        "not valid JSON",
    ),
    (
        "json-truncated",
        [("bad.cls", b"1"), ("bad.json", b'{"label": 1')],
        "decode",
        "not valid JSON",
    ),
    ("json-deep", [("bad.cls", b"1"), ("bad.json", b"[" * 100_000)], "decode", "too deeply"),
    (
        "json-deep-object",
        [("bad.cls", b"1"), ("bad.json", b'{"a":' * 100_000)],
        "decode",
        "too deeply",
    ),
    ("json-list", [("bad.cls", b"1"), ("bad.json", b"[1, 2]")], "decode", "got list"),
    ("json-number", [("bad.cls", b"1"), ("bad.json", b"3")], "decode", "got int"),
    ("json-string", [("bad.cls", b"1"), ("bad.json", b'"x"')], "decode", "got str"),
    ("json-null", [("bad.cls", b"1"), ("bad.json", b"null")], "decode", "got NoneType"),
    # json "boxes": a list of [x0, y0, x1, y1] lists of finite numbers
    ("boxes-number", [("bad.json", b'{"label": 1, "boxes": 5}')], "boxes", "got 5"),
    ("boxes-string", [("bad.json", b'{"label": 1, "boxes": "0,0,4,4"}')], "boxes", "'0,0,4,4'"),
    ("boxes-dict", [("bad.json", b'{"label": 1, "boxes": {"x0": 0}}')], "boxes", "{'x0': 0}"),
    ("boxes-bool", [("bad.json", b'{"label": 1, "boxes": true}')], "boxes", "got True"),
    ("boxes-flat", [("bad.json", b'{"label": 1, "boxes": [0, 0, 4, 4]}')], "boxes", "got 0"),
    ("boxes-three", [("bad.json", b'{"label": 1, "boxes": [[0, 0, 4]]}')], "boxes", "[0, 0, 4]"),
    (
        "boxes-five",
        [("bad.json", b'{"label": 1, "boxes": [[0, 0, 4, 4, 4]]}')],
        "boxes",
        "[0, 0, 4, 4, 4]",
    ),
    (
        "boxes-nested",
        [("bad.json", b'{"label": 1, "boxes": [[[0, 0, 4, 4]]]}')],
        "boxes",
        "[[0, 0, 4, 4]]",
    ),
    (
        "boxes-string-coordinate",
        [("bad.json", b'{"label": 1, "boxes": [[0, "0", 4, 4]]}')],
        "boxes",
        "'0'",
    ),
    (
        "boxes-bool-coordinate",
        [("bad.json", b'{"label": 1, "boxes": [[0, true, 4, 4]]}')],
        "boxes",
        "True",
    ),
    (
        "boxes-null-coordinate",
        [("bad.json", b'{"label": 1, "boxes": [[0, null, 4, 4]]}')],
        "boxes",
        "None",
    ),
    ("boxes-nan", [("bad.json", b'{"label": 1, "boxes": [[0, 0, NaN, 4]]}')], "boxes", "nan"),
    (
        "boxes-infinity",
        [("bad.json", b'{"label": 1, "boxes": [[0, 0, Infinity, 4]]}')],
        "boxes",
        "inf",
    ),
    ("boxes-1e400", [("bad.json", b'{"label": 1, "boxes": [[0, 0, 1e400, 4]]}')], "boxes", "inf"),
    (
        "boxes-int-beyond-float",
        [("bad.json", b'{"label": 1, "boxes": [[0, 0, 1' + b"0" * 400 + b", 4]]}")],
        "boxes",
        "not a finite float",
    ),
    (
        "boxes-long",
        [("bad.json", json.dumps({"label": 1, "boxes": [[0, 0, 4, 4]] * 10**4 + [[0]]}).encode())],
        "boxes",
        "box 10000",
    ),
]


@pytest.mark.parametrize(
    ("members", "stage", "needle"),
    [pytest.param(members, stage, needle, id=case) for case, members, stage, needle in _BAD_FIELDS],
)
def test_each_bad_field_costs_one_error_row_for_its_sample_only(
    tmp_path: Path, members: list[tuple[str, bytes]], stage: str, needle: str
) -> None:
    shard = tmp_path / "fields.tar"
    write_tar(
        shard,
        [
            *good_members("a", 1),
            ("bad.png", encode(colour_image(2))),
            *members,
            *good_members("b", 3),
        ],
    )
    reader = ShardReader(str(shard))
    assert [(s.key, s.label) for s in reader] == [("a", 1), ("b", 3)]
    assert reader.complete
    assert errors_of(reader) == [("bad", stage)]
    message = reader.errors[0].message
    assert needle in message
    assert len(message) < 400  # the value is quoted shortened, never whole


@pytest.mark.parametrize(
    ("members", "label", "boxes"),
    [
        pytest.param([("ok.cls", b"\xef\xbb\xbf3\r\n")], 3, [], id="cls-with-bom"),
        pytest.param([("ok.cls", b"+3")], 3, [], id="cls-plus-sign"),
        pytest.param([("ok.cls", b"0003")], 3, [], id="cls-leading-zeros"),
        pytest.param([("ok.cls", b"9223372036854775807")], 2**63 - 1, [], id="cls-int64-max"),
        pytest.param([("ok.json", b'\xef\xbb\xbf{"label": 3}')], 3, [], id="json-with-bom"),
        pytest.param([("ok.json", '{"label": 3}'.encode("utf-16"))], 3, [], id="json-utf16"),
        pytest.param(
            [("ok.json", b'{"label": 9223372036854775807}')], 2**63 - 1, [], id="json-int64-max"
        ),
        pytest.param(
            [("ok.cls", b"3"), ("ok.json", b'{"label": null, "boxes": null}')], 3, [], id="nulls"
        ),
        pytest.param(
            [("ok.json", b'{"label": 3, "boxes": [], "name": [1, {"x": NaN}]}')],
            3,
            [],
            id="other-keys-ignored",
        ),
        pytest.param(
            [("ok.json", b'{"label": 3, "boxes": [[0, 0.5, 1e3, 4]]}')],
            3,
            [(0.0, 0.5, 1000.0, 4.0)],
            id="box-partly-outside",
        ),
    ],
)
def test_odd_but_valid_fields_are_read(
    tmp_path: Path, members: list[tuple[str, bytes]], label: int, boxes: list[Any]
) -> None:
    shard = tmp_path / "ok.tar"
    write_tar(shard, [("ok.png", encode(colour_image(2))), *members])
    reader = ShardReader(str(shard))
    assert [(s.key, s.label, s.boxes) for s in reader] == [("ok", label, boxes)]
    assert reader.errors == []


def test_a_key_that_is_not_utf8_costs_its_sample_and_its_error_row_is_text(
    tmp_path: Path,
) -> None:
    # tarfile reads the member name b"k\xff.png" as "k\udcff.png"; no Parquet or JSON
    # writer takes that lone surrogate, so the sample is refused and its error row
    # shows the byte as the text "\xff".
    bad = b"k\xff".decode("utf-8", "surrogateescape")
    shard = tmp_path / "key.tar"
    write_tar(
        shard,
        [
            *good_members("a", 1),
            (f"{bad}.png", encode(colour_image(2))),
            (f"{bad}.cls", b"2"),
            (f"{bad}.pkl", b"never read"),  # its "unsafe" error row names it too
            *good_members("b", 3),
        ],
    )
    reader = ShardReader(str(shard))
    assert keys_of(list(reader)) == ["a", "b"]
    assert errors_of(reader) == [("k\\xff", "unsafe-member"), ("k\\xff", "key")]
    assert "not UTF-8" in reader.errors[1].message
    for error in reader.errors:
        error.message.encode("utf-8")  # raises on a lone surrogate


def test_images_outside_the_listed_formats_cost_their_samples_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_data_images import encoded, forbid_other_plugins

    called = forbid_other_plugins(monkeypatch)
    shard = tmp_path / "formats.tar"
    foreign = {"eps": "EPS", "pdf": "PDF", "bmp": "BMP", "tiff": "TIFF", "gif": "GIF"}
    members = [*good_members("a", 1)]
    for key, fmt in foreign.items():
        # Named like an accepted image: Pillow would pick the plugin from the bytes.
        members += [(f"{key}.jpg", encoded(fmt)), (f"{key}.cls", b"1")]
    members += [("png_as_jpg.jpg", encode(colour_image(5))), ("png_as_jpg.cls", b"5")]
    members += good_members("b", 3)
    write_tar(shard, members)
    reader = ShardReader(str(shard))
    assert keys_of(list(reader)) == ["a", "png_as_jpg", "b"]
    assert reader.complete and called == []
    assert errors_of(reader) == [(key, "decode") for key in foreign]
    for error in reader.errors:
        fmt = foreign[str(error.key)]
        assert f"member '{error.key}.jpg': the bytes are {fmt}, not one of" in error.message


def test_messages_quote_member_names_shortened(tmp_path: Path) -> None:
    long_name = "n" * 5000  # a PAX header holds a name of any length
    members = [(f"many.x{i}", b"") for i in range(2000)]  # no image among 2000 members
    members += [(f"{long_name}.pkl", b"never read"), (f"{long_name}.png", b"x" * 100)]
    shard = tmp_path / "names.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    reader = ShardReader(str(shard), max_member_bytes=10, require_label=False)
    assert list(reader) == []
    assert sorted(stage for _, stage in errors_of(reader)) == [
        "decode",
        "too-large",
        "unsafe-member",
    ]
    assert all(len(e.message) < 400 for e in reader.errors), [len(e.message) for e in reader.errors]
