"""Tests for opticam.data.shards: shard expansion, safe reading, error records, batching."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from opticam.data import (
    Batch,
    ErrorRecord,
    NoShardsError,
    Preprocess,
    Sample,
    ShardReader,
    ShardReadError,
    ShardWriter,
    expand_braces,
    expand_shards,
    iter_batches,
    parse_boxes,
    storage_options_for,
)
from opticam.data.shards import split_member_name

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


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """Three shards of 4 samples (keys s<shard>_<i>) written by ShardWriter."""
    folder = tmp_path / "shards"
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
    return folder


# ----------------------------------------------------------------------------- expansion


def test_expand_braces_ranges_lists_and_literals() -> None:
    assert expand_braces("shard-{000000..000002}.tar") == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert expand_braces("s{8..11}") == ["s8", "s9", "s10", "s11"]
    assert expand_braces("s{08..10}") == ["s08", "s09", "s10"]
    assert expand_braces("s{3..1}") == ["s3", "s2", "s1"]
    assert expand_braces("s{0..6..3}") == ["s0", "s3", "s6"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert expand_braces("x{a,b{1,2}}y") == ["xay", "xb1y", "xb2y"]
    assert expand_braces("{a..c}") == ["a", "b", "c"]
    assert expand_braces("plain{}and{abc}") == ["plain{}and{abc}"]
    assert expand_braces("no-braces.tar") == ["no-braces.tar"]
    with pytest.raises(ValueError, match="at most"):
        expand_braces("{0..99999999}")


def test_expand_shards_local_brace_glob_list(shard_dir: Path) -> None:
    names = [str(shard_dir / f"shard-{i:06d}.tar") for i in range(3)]
    assert expand_shards(str(shard_dir / "shard-{000000..000002}.tar")) == names
    assert expand_shards(str(shard_dir / "shard-{000002,000000}.tar")) == [names[2], names[0]]
    assert expand_shards(str(shard_dir / "*.tar")) == names
    assert expand_shards(f"file://{shard_dir}/shard-00000[01].tar") == names[:2]
    # Lists mix forms; duplicates are removed, first occurrence kept.
    mixed = [names[1], str(shard_dir / "shard-*.tar"), f"file://{names[0]}"]
    assert expand_shards(mixed) == [names[1], names[0], names[2]]


def test_expand_shards_no_match_names_the_pattern(shard_dir: Path) -> None:
    glob = str(shard_dir / "nothing-*.tar")
    with pytest.raises(NoShardsError, match="nothing-"):
        expand_shards(glob)
    # One element of a list matching nothing fails the whole list, before any work.
    with pytest.raises(NoShardsError, match="nothing-"):
        expand_shards([str(shard_dir / "shard-000000.tar"), glob])
    # A range that names shards which do not exist fails and says which.
    with pytest.raises(NoShardsError, match="shard-000003.tar"):
        expand_shards(str(shard_dir / "shard-{000000..000003}.tar"))
    with pytest.raises(NoShardsError, match="missing"):
        expand_shards(str(shard_dir / "missing" / "x.tar"))
    assert isinstance(NoShardsError("x"), ValueError)
    with pytest.raises(NoShardsError):
        expand_shards([])
    # Listing a folder instead of one request per name gives the same answer.
    many = str(shard_dir / "shard-{000000..000099}.tar")
    with pytest.raises(NoShardsError, match="97 of 100"):
        expand_shards(many)


def test_pipe_urls_refused_by_default(tmp_path: Path, shard_dir: Path) -> None:
    sentinel = tmp_path / "ran"
    command = f"pipe:touch {sentinel}; cat {shard_dir / 'shard-000000.tar'}"
    with pytest.raises(ValueError, match="pipe:"):
        expand_shards(command)
    with pytest.raises(ValueError, match="allow_pipe"):
        ShardReader(command)
    assert not sentinel.exists()
    assert expand_shards([command], allow_pipe=True) == [command]
    reader = ShardReader(command, allow_pipe=True)
    assert len(list(reader)) == 4 and reader.complete
    assert sentinel.exists()
    failing = ShardReader(f"pipe:cat {shard_dir / 'shard-000000.tar'}; exit 3", allow_pipe=True)
    assert len(list(failing)) == 4
    assert not failing.complete
    assert failing.errors[-1].stage == "tar" and "status 3" in failing.errors[-1].message


def test_storage_options_for_s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    options = storage_options_for("s3://b/x.tar", {"client_kwargs": {"region_name": "r"}})
    assert options["client_kwargs"] == {"region_name": "r", "endpoint_url": "http://minio:9000"}
    assert options["use_listings_cache"] is False
    explicit = {"client_kwargs": {"endpoint_url": "http://other"}, "use_listings_cache": True}
    assert storage_options_for("s3://b/x.tar", explicit) == explicit
    assert storage_options_for("s3://b", {"endpoint_url": "http://e"}) == {
        "endpoint_url": "http://e",
        "use_listings_cache": False,
    }
    assert storage_options_for("/local/x.tar", {"a": 1}) == {"a": 1}


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


def test_read_from_s3_with_brace_glob_and_env_endpoint(
    s3_bucket: str,
    s3_storage_options: dict[str, Any],
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with ShardWriter(f"{s3_bucket}/data/part-%04d.tar", 3, s3_storage_options) as writer:
        for index in range(7):
            writer.write({"__key__": f"k{index}", "png": encode(colour_image(index)), "cls": index})
    expected = [f"{s3_bucket}/data/part-{i:04d}.tar" for i in range(3)]
    assert writer.urls == expected
    assert (
        expand_shards(f"{s3_bucket}/data/part-{{0000..0002}}.tar", s3_storage_options) == expected
    )
    assert expand_shards(f"{s3_bucket}/data/*.tar", s3_storage_options) == expected
    assert expand_shards(
        [expected[2], f"{s3_bucket}/data/part-000[01].tar"], s3_storage_options
    ) == [
        expected[2],
        expected[0],
        expected[1],
    ]
    with pytest.raises(NoShardsError, match="other-"):
        expand_shards(f"{s3_bucket}/data/other-*.tar", s3_storage_options)
    with pytest.raises(NoShardsError, match="part-0003"):
        expand_shards(f"{s3_bucket}/data/part-{{0000..0003}}.tar", s3_storage_options)

    # Only the environment names the endpoint: AWS_ENDPOINT_URL must be honoured.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert expand_shards(f"{s3_bucket}/data/*.tar") == expected
    samples: list[Sample] = []
    for url in expected:
        reader = ShardReader(url)
        samples.extend(reader)
        assert reader.complete and reader.errors == []
    assert keys_of(samples) == [f"k{i}" for i in range(7)]
    assert [s.label for s in samples] == list(range(7))
    assert np.array_equal(np.asarray(samples[5].image), np.asarray(colour_image(5)))

    missing = ShardReader(f"{s3_bucket}/data/part-0009.tar")
    assert list(missing) == []
    assert errors_of(missing) == [(None, "open")] and not missing.complete


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


def test_pickle_members_are_never_loaded(tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    payload = pickle.dumps(_CreatesFile(str(target)))
    # The payload is live: unpickling it elsewhere does create a file.
    probe = tmp_path / "probe.txt"
    pickle.loads(pickle.dumps(_CreatesFile(str(probe)))).close()
    assert probe.exists()

    shard = tmp_path / "evil.tar"
    write_tar(
        shard,
        [
            *good_members("a", 1),
            ("a.pyd", payload),
            ("b.pkl", payload),
            *good_members("b", 2),
            ("c.pth", payload),
            ("c.npy", payload),
        ],
    )
    reader = ShardReader(str(shard))
    samples = list(reader)
    assert not target.exists()
    assert keys_of(samples) == ["a", "b"]
    assert reader.complete
    assert errors_of(reader) == [("a", "unsafe-member")]  # once per shard
    assert "a.pyd" in reader.errors[0].message


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
    assert parse_boxes(None) == []
    assert parse_boxes([[0, 1, 2, 3]]) == [(0.0, 1.0, 2.0, 3.0)]
    for bad in ([0, 1, 2, 3], [[0, 1, 2]], [[0, 1, "2", 3]], [[0, 0, float("nan"), 1]], "x"):
        with pytest.raises(ValueError, match="box"):
            parse_boxes(bad)


# ----------------------------------------------------------------------------- batching


def test_iter_batches_shapes_labels_and_shards(shard_dir: Path, tmp_path: Path) -> None:
    preprocess = Preprocess(12)
    urls = expand_shards(str(shard_dir / "*.tar"))
    readers = [ShardReader(u) for u in urls]
    # Chain of 3 shards of 4 with batch_size 3: batches of 3, 1 per shard.
    chained = (sample for reader in readers for sample in reader)
    batches = list(iter_batches(chained, preprocess, 3, errors=[]))
    assert [len(b) for b in batches] == [3, 1, 3, 1, 3, 1]
    for batch in batches:
        assert isinstance(batch, Batch)
        assert batch.images.shape == (len(batch), 3, 12, 12)
        assert batch.images.dtype == torch.float32
        assert batch.images.min() >= 0.0 and batch.images.max() <= 1.0
        assert batch.labels.dtype == torch.int64 and batch.labels.shape == (len(batch),)
        assert len(batch.boxes) == len(batch)
        assert all(b.shape[1] == 4 and b.dtype == torch.float32 for b in batch.boxes)
        assert {k.split("_")[0] for k in batch.keys} == {f"s{urls.index(batch.shard)}"}
    keys = [k for b in batches for k in b.keys]
    assert keys == [f"s{i // 4}_{i % 4}" for i in range(12)]
    labels = torch.cat([b.labels for b in batches])
    assert labels.tolist() == [i % 5 for i in range(12)]

    # Unknown labels become -1.
    write_tar(
        tmp_path / "mixed.tar",
        [*good_members("l", 1), ("u.png", encode(colour_image(2)))],
    )
    reader = ShardReader(str(tmp_path / "mixed.tar"), require_label=False)
    (batch,) = list(iter_batches(reader, preprocess, 8))
    assert batch.keys == ["l", "u"] and batch.labels.tolist() == [1, -1]
    assert [b.shape for b in batch.boxes] == [(0, 4), (0, 4)]


def test_iter_batches_records_preprocess_errors(shard_dir: Path) -> None:
    good = Preprocess(8)

    def flaky(image: Image.Image, boxes: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if np.asarray(image)[0, 0, 0] == 7:  # sample index 1
            raise ValueError("cannot preprocess this one")
        return good(image, boxes)

    reader = ShardReader(str(shard_dir / "shard-000000.tar"))
    batches = list(iter_batches(reader, flaky, 2))
    assert [b.keys for b in batches] == [["s0_0", "s0_2"], ["s0_3"]]
    assert reader.errors == [
        ErrorRecord(
            shard=reader.url,
            key="s0_1",
            stage="preprocess",
            message="ValueError: cannot preprocess this one",
        )
    ]
    assert reader.complete

    # Without anywhere to record it, the error reaches the consumer.
    samples = list(ShardReader(str(shard_dir / "shard-000000.tar")))
    with pytest.raises(ValueError, match="cannot preprocess"):
        list(iter_batches(samples, flaky, 2))


def test_iter_batches_early_stop_does_not_hang(shard_dir: Path) -> None:
    closed = threading.Event()
    produced = []

    def endless() -> Any:
        try:
            index = 0
            while True:
                produced.append(index)
                yield Sample(
                    key=f"k{index}", shard="s", image=colour_image(index), label=1, boxes=[]
                )
                index += 1
        finally:
            closed.set()

    started = time.monotonic()
    batches = iter_batches(endless(), Preprocess(8), 2, prefetch=1)
    first = next(batches)
    assert first.keys == ["k0", "k1"]
    batches.close()
    assert closed.wait(5.0), "the source iterator was not closed"
    assert time.monotonic() - started < 5.0
    # Bounded read-ahead: at most a few batches were prepared beyond the consumer.
    assert len(produced) <= 2 * 4
    assert not any(t.name == "opticam-batches" and t.is_alive() for t in threading.enumerate())

    # Breaking out of a for loop over a real reader also stops it.
    reader = ShardReader(str(shard_dir / "shard-000000.tar"))
    for _ in iter_batches(reader, Preprocess(8), 1):
        break
    time.sleep(0.05)
    assert not reader.complete
    assert not any(t.name == "opticam-batches" and t.is_alive() for t in threading.enumerate())


def test_iter_batches_propagates_source_errors() -> None:
    def broken() -> Any:
        yield Sample(key="a", shard="s", image=colour_image(0), label=0)
        raise RuntimeError("source exploded")

    with pytest.raises(RuntimeError, match="source exploded"):
        list(iter_batches(broken(), Preprocess(8), 4))
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_batches([], Preprocess(8), 0))
