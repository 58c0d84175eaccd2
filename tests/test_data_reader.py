"""Tests for opticam.data.reader: safe tar reading, grouping, error records, completeness.

The tar-building helpers here are also used by tests/test_data_batches.py.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path
from typing import IO, Any

import fsspec
import numpy as np
import pytest
from PIL import Image

from opticam.data import (
    UNSAFE_EXTENSIONS,
    Sample,
    ShardReader,
    ShardReadError,
    ShardWriter,
    expand_shards,
    parse_boxes,
)
from opticam.data import reader as reader_module
from opticam.data.reader import split_member_name

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
        ("badbox.json", json.dumps({"label": 1, "boxes": [[5, 5, 1, 1]]}).encode()),
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
    assert "x0 <= x1" in messages["badbox"]
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
    (tmp_path / "zero.tar").write_bytes(b"")
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 3000)
    for name in ("zero.tar", "junk.tar"):
        reader = ShardReader(str(tmp_path / name))
        assert list(reader) == []
        assert errors_of(reader) == [(None, "tar")] and not reader.complete
    missing = ShardReader(str(tmp_path / "absent.tar"))
    assert list(missing) == []
    assert errors_of(missing) == [(None, "open")] and not missing.complete
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
    assert errors_of(reader) == [("big", "decode")]
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
