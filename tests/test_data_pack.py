"""Tests for opticam.data.pack: ImageFolder and CSV sources -> shards -> the same samples."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from PIL import Image

from opticam.data import Sample, ShardReader, expand_shards, make_key, pack


def image_bytes(seed: int, fmt: str, size: tuple[int, int] = (20, 14)) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def tar_members(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, bytes]:
    """Raw member bytes of a shard, read independently of ShardReader."""
    with fsspec.open(url, "rb", **(storage_options or {})) as handle:
        data = handle.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {
            info.name: archive.extractfile(info).read()  # type: ignore[union-attr]
            for info in archive
            if info.isfile()
        }


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, str, bytes]]]:
    """root/<class>/... with PNG and JPEG files; returns root and relpath -> (label, ext, bytes)."""
    root = tmp_path / "images"
    files = {
        "cat/a.png": (0, "png", image_bytes(1, "PNG")),
        "cat/b.jpg": (0, "jpg", image_bytes(2, "JPEG")),
        "cat/sub dir/c.v2.PNG": (0, "png", image_bytes(3, "PNG")),
        "dog/a.png": (1, "png", image_bytes(4, "PNG")),
        "dog/d.jpeg": (1, "jpeg", image_bytes(5, "JPEG")),
        "emu/e.webp": (2, "webp", image_bytes(6, "WEBP", (9, 9))),
    }
    for relpath, (_, _, data) in files.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "cat" / ".DS_Store").write_bytes(b"junk")
    (root / "README.txt").write_text("not a class")
    return root, files


def check_round_trip(
    urls: list[str],
    files: dict[str, tuple[int, str, bytes]],
    storage_options: dict[str, Any] | None = None,
) -> None:
    samples: list[Sample] = []
    for url in urls:
        reader = ShardReader(url, storage_options=storage_options)
        samples.extend(reader)
        assert reader.complete and reader.errors == []
    assert len(samples) == len(files)
    by_key = {sample.key: sample for sample in samples}
    assert len(by_key) == len(samples)  # keys unique
    members: dict[str, bytes] = {}
    for url in urls:
        members.update(tar_members(url, storage_options))
    for relpath, (label, extension, data) in files.items():
        key = make_key(relpath)
        sample = by_key[key]
        assert "." not in key
        assert sample.label == label
        assert members[f"{key}.{extension}"] == data  # original bytes, untouched
        assert np.array_equal(np.asarray(sample.image), decoded(data))  # same pixels
        meta = json.loads(members[f"{key}.json"])
        assert meta["path"] == relpath and meta["label"] == label


def test_pack_image_folder_round_trip(
    tmp_path: Path, image_folder: tuple[Path, dict[str, tuple[int, str, bytes]]]
) -> None:
    root, files = image_folder
    urls = pack(str(root), str(tmp_path / "out"), per_shard=4)
    assert urls == [str(tmp_path / "out" / f"shard-{i:06d}.tar") for i in range(2)]
    assert expand_shards(str(tmp_path / "out" / "*.tar")) == urls
    check_round_trip(urls, files)
    first = next(iter(ShardReader(urls[0])))
    meta = json.loads(tar_members(urls[0])[f"{first.key}.json"])
    assert meta["class_name"] == "cat"
    # Sorted classes -> label ids, like torchvision's ImageFolder.
    labels = {
        json.loads(v)["class_name"]: json.loads(v)["label"]
        for u in urls
        for k, v in tar_members(u).items()
        if k.endswith(".json")
    }
    assert labels == {"cat": 0, "dog": 1, "emu": 2}


def test_pack_csv_with_boxes_and_unlabelled_rows(tmp_path: Path) -> None:
    folder = tmp_path / "csvsrc"
    (folder / "imgs").mkdir(parents=True)
    png, jpg = image_bytes(7, "PNG", (30, 20)), image_bytes(8, "JPEG")
    (folder / "imgs" / "one.png").write_bytes(png)
    (folder / "imgs" / "two.jpg").write_bytes(jpg)
    absolute = tmp_path / "elsewhere.png"
    absolute.write_bytes(image_bytes(9, "PNG"))
    (folder / "list.csv").write_text(
        "path,label,boxes\n"
        'imgs/one.png,3,"[[1, 2, 10, 12], [0, 0, 30, 20]]"\n'
        "imgs/two.jpg,5,\n"
        f"{absolute},,\n"
    )
    urls = pack(str(folder / "list.csv"), str(tmp_path / "out" / "part-%03d.tar"), per_shard=10)
    assert urls == [str(tmp_path / "out" / "part-000.tar")]
    reader = ShardReader(urls[0], require_label=False)
    samples = list(reader)
    assert reader.errors == []
    assert [(s.key, s.label, s.boxes) for s in samples] == [
        ("imgs_one", 3, [(1.0, 2.0, 10.0, 12.0), (0.0, 0.0, 30.0, 20.0)]),
        ("imgs_two", 5, []),
        (make_key(str(absolute).lstrip("/")), None, []),
    ]
    assert np.array_equal(np.asarray(samples[0].image), decoded(png))
    assert tar_members(urls[0])["imgs_two.jpg"] == jpg

    # Headerless CSV, positional columns.
    (folder / "plain.csv").write_text("imgs/one.png,1\nimgs/two.jpg,2\n")
    urls = pack(str(folder / "plain.csv"), str(tmp_path / "plain"), per_shard=1, prefix="p")
    assert [Path(u).name for u in urls] == ["p-000000.tar", "p-000001.tar"]
    check_round_trip(urls, {"imgs/one.png": (1, "png", png), "imgs/two.jpg": (2, "jpg", jpg)})


@pytest.mark.e2e
def test_pack_to_and_from_s3(
    image_folder: tuple[Path, dict[str, tuple[int, str, bytes]]],
    s3_bucket: str,
    s3_storage_options: dict[str, Any],
) -> None:
    root, files = image_folder
    urls = pack(str(root), f"{s3_bucket}/packed", per_shard=5, storage_options=s3_storage_options)
    assert urls == [f"{s3_bucket}/packed/shard-{i:06d}.tar" for i in range(2)]
    assert (
        expand_shards(f"{s3_bucket}/packed/shard-{{000000..000001}}.tar", s3_storage_options)
        == urls
    )
    check_round_trip(urls, files, s3_storage_options)

    # A CSV on S3 with images next to it, packed back to S3.
    fs = fsspec.filesystem("s3", **s3_storage_options)
    png = image_bytes(11, "PNG")
    fs.pipe(f"{s3_bucket[5:]}/csv/img/x.png", png)
    fs.pipe(f"{s3_bucket[5:]}/csv/list.csv", b"img/x.png,4\n")
    out = pack(
        f"{s3_bucket}/csv/list.csv",
        f"{s3_bucket}/fromcsv/s-%02d.tar",
        per_shard=2,
        storage_options=s3_storage_options,
        source_storage_options=s3_storage_options,
    )
    check_round_trip(out, {"img/x.png": (4, "png", png)}, s3_storage_options)


def test_keys_are_safe_and_unique(tmp_path: Path) -> None:
    assert make_key("a/b.c/img.01.jpg") == "a_b_c_img_01"
    assert make_key("n01/x y (1).JPEG") == "n01_x_y__1_"
    root = tmp_path / "root"
    (root / "k" / "a").mkdir(parents=True)
    png = image_bytes(1, "PNG")
    (root / "k" / "a" / "b.png").write_bytes(png)  # key k_a_b
    (root / "k" / "a_b.png").write_bytes(png)  # also k_a_b -> k_a_b_1
    urls = pack(str(root), str(tmp_path / "out"), per_shard=10)
    keys = [s.key for s in ShardReader(urls[0])]
    assert sorted(keys) == ["k_a_b", "k_a_b_1"]


def test_shuffle_is_deterministic(
    tmp_path: Path, image_folder: tuple[Path, dict[str, tuple[int, str, bytes]]]
) -> None:
    root, _ = image_folder
    orders = []
    for run in range(2):
        urls = pack(str(root), str(tmp_path / f"out{run}"), per_shard=100, shuffle_seed=3)
        orders.append([s.key for s in ShardReader(urls[0])])
    assert orders[0] == orders[1]
    assert orders[0] != sorted(orders[0])


def test_pack_errors_are_clear(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        pack(str(empty), out, 2)
    (empty / "cls").mkdir()
    with pytest.raises(ValueError, match="'cls'.*no images"):
        pack(str(empty), out, 2)
    with pytest.raises(FileNotFoundError, match="absent"):
        pack(str(tmp_path / "absent"), out, 2)

    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "x.png").write_bytes(image_bytes(1, "PNG"))
    with pytest.raises(ValueError, match="directly in it"):
        pack(str(loose), out, 2)

    odd = tmp_path / "odd"
    (odd / "c").mkdir(parents=True)
    (odd / "c" / "ok.png").write_bytes(image_bytes(1, "PNG"))
    (odd / "c" / "scan.tiff").write_bytes(b"II*\x00")
    with pytest.raises(ValueError, match=r"scan\.tiff.*accepted: \.jpg"):
        pack(str(odd), out, 2)
    assert len(pack(str(odd), out, 2, skip_unsupported=True)) == 1

    (odd / "c" / "fake.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="fake.png.*not a readable image"):
        pack(str(odd), str(tmp_path / "out2"), 2, skip_unsupported=True)
    # A failed pack leaves no half-written shard behind.
    assert list((tmp_path / "out2").glob("*.tar")) == []
    (odd / "c" / "fake.png").unlink()
    # PostScript named .jpg: the reader would refuse it, so pack does, naming it.
    (odd / "c" / "script.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 6\n")
    with pytest.raises(ValueError, match="script.jpg.*its bytes are EPS, not one of JPEG"):
        pack(str(odd), str(tmp_path / "out3"), 2, skip_unsupported=True)

    source = tmp_path / "csv"
    source.mkdir()
    (source / "a.png").write_bytes(image_bytes(1, "PNG"))
    bad_rows = {
        "a.png,one\n": r"line 1 .*label must be an integer",
        "a.png,-1\n": r"line 1 .*label -1 is negative; labels are class indices 0\.\.N-1",
        "a.png,1\nb.gif,2\n": r"line 2 .*unsupported image file 'b.gif'",
        'a.png,1,"[[3, 3, 1, 1]]"\n': r"line 1 .*bad boxes",
        "a.png\n": r"line 1 .*expected columns",
        "a.png,1\nmissing.png,1\n": r"missing.png.*line 2",
        "\n\n": r"has no rows",
    }
    for number, (text, message) in enumerate(bad_rows.items()):
        csv_path = source / f"bad{number}.csv"
        csv_path.write_text(text)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            pack(str(csv_path), str(tmp_path / f"bad{number}"), 2)
    with pytest.raises(ValueError, match="per_shard"):
        pack(str(source / "bad0.csv"), out, 0)
