"""Tests for opticam.data.urls: brace expansion, shard expansion, pipe refusal, S3 options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import pytest

from opticam.data import NoShardsError, expand_braces, expand_shards, urls
from opticam.data.urls import MAX_BRACE_EXPANSION, storage_options_for
from opticam.errors import UserError


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """Three empty files shard-000000.tar .. shard-000002.tar (expansion never reads them)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for index in range(3):
        (folder / f"shard-{index:06d}.tar").touch()
    return folder


# ----------------------------------------------------------------------------- braces


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


def test_expand_braces_follows_bash_where_it_differs_from_the_old_parser() -> None:
    # Letter ranges across cases skip the punctuation between 'Z' and 'a' (bash, braceexpand).
    assert expand_braces("{Y..b}") == ["Y", "Z", "a", "b"]
    # A step of 0 means 1, as in bash, instead of an error.
    assert expand_braces("s{0..2..0}") == ["s0", "s1", "s2"]
    # A backslash escapes a brace.
    assert expand_braces(r"x\{0..1\}") == ["x{0..1}"]


def test_expand_braces_unbalanced_names_the_pattern() -> None:
    for pattern in ("shard-{0..3.tar", "shard-0..3}.tar"):
        with pytest.raises(ValueError, match="unbalanced braces") as info:
            expand_braces(pattern)
        assert repr(pattern) in str(info.value)


def test_expand_braces_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    # At a small cap: exactly the cap passes; one more fails, from a range or a product.
    with monkeypatch.context() as patch:
        patch.setattr(urls, "MAX_BRACE_EXPANSION", 10)
        assert len(expand_braces("{0..9}")) == 10
        assert len(expand_braces("{0..4}{a,b}")) == 10
        with pytest.raises(ValueError, match="names 11 items"):
            expand_braces("{0..10}")
        with pytest.raises(ValueError, match="'{0..4}{a,b,c}' expands to more than 10 names"):
            expand_braces("{0..4}{a,b,c}")
    # One huge range is refused from its bounds, before braceexpand builds it.
    with pytest.raises(ValueError, match=r"\{0\.\.99999999\} names 100000000 items") as info:
        expand_braces("shard-{0..99999999}.tar")
    assert "'shard-{0..99999999}.tar'" in str(info.value)
    assert f"at most {MAX_BRACE_EXPANSION}" in str(info.value)


# ----------------------------------------------------------------------------- shards


def test_expand_shards_local_brace_glob_list(shard_dir: Path) -> None:
    names = [str(shard_dir / f"shard-{i:06d}.tar") for i in range(3)]
    assert expand_shards(str(shard_dir / "shard-{000000..000002}.tar")) == names
    assert expand_shards(str(shard_dir / "shard-{000002,000000}.tar")) == [names[2], names[0]]
    assert expand_shards(str(shard_dir / "*.tar")) == names
    assert expand_shards(f"file://{shard_dir}/shard-00000[01].tar") == names[:2]
    # Lists mix forms; duplicates are removed, first occurrence kept.
    mixed = [names[1], str(shard_dir / "shard-*.tar"), f"file://{names[0]}"]
    assert expand_shards(mixed) == [names[1], names[0], names[2]]
    # Without the existence check, names that do not exist pass through.
    absent = str(shard_dir / "shard-{000003..000004}.tar")
    assert expand_shards(absent, must_exist=False) == [
        str(shard_dir / "shard-000003.tar"),
        str(shard_dir / "shard-000004.tar"),
    ]


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
    assert isinstance(NoShardsError("x"), UserError)  # one line on the command line
    with pytest.raises(NoShardsError):
        expand_shards([])
    with pytest.raises(ValueError, match="non-empty string"):
        expand_shards(["  "])
    # Listing a folder instead of one request per name gives the same answer.
    many = str(shard_dir / "shard-{000000..000099}.tar")
    with pytest.raises(NoShardsError, match="97 of 100"):
        expand_shards(many)


def test_pipe_urls_refused_by_default(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    command = f"pipe:touch {sentinel}; cat x.tar"
    with pytest.raises(ValueError, match="allow_pipe"):
        expand_shards(command)
    with pytest.raises(ValueError, match="'pipe:"):
        expand_shards(["/some/x.tar", command], must_exist=False)
    assert not sentinel.exists()
    assert expand_shards([command], allow_pipe=True) == [command]
    assert not sentinel.exists()  # expanding never runs the command


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
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert storage_options_for("s3://b/x.tar")["client_kwargs"] == {
        "endpoint_url": "http://s3-only:9000"
    }


@pytest.mark.e2e
def test_expand_shards_on_s3_with_brace_glob_and_env_endpoint(
    s3_bucket: str,
    s3_storage_options: dict[str, Any],
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Empty objects: expansion looks at names only.
    expected = [f"{s3_bucket}/data/part-{i:04d}.tar" for i in range(3)]
    s3 = fsspec.filesystem("s3", **s3_storage_options)
    for url in expected:
        s3.pipe(url, b"")
    assert (
        expand_shards(f"{s3_bucket}/data/part-{{0000..0002}}.tar", s3_storage_options) == expected
    )
    assert expand_shards(f"{s3_bucket}/data/*.tar", s3_storage_options) == expected
    assert expand_shards(
        [expected[2], f"{s3_bucket}/data/part-000[01].tar"], s3_storage_options
    ) == [expected[2], expected[0], expected[1]]
    with pytest.raises(NoShardsError, match="other-"):
        expand_shards(f"{s3_bucket}/data/other-*.tar", s3_storage_options)
    with pytest.raises(NoShardsError, match="part-0003"):
        expand_shards(f"{s3_bucket}/data/part-{{0000..0003}}.tar", s3_storage_options)

    # Only the environment names the endpoint: AWS_ENDPOINT_URL must be honoured.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert expand_shards(f"{s3_bucket}/data/*.tar") == expected


def test_pattern_problems_are_user_errors() -> None:
    from opticam.data import ShardPatternError, expand_shards
    from opticam.errors import UserError

    for bad in ("shard-{0..3.tar", "pipe:curl http://x/a.tar", "   "):
        with pytest.raises(ShardPatternError) as caught:
            expand_shards(bad)
        assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)


# ----------------------------------------------------------------------------- identity


def test_one_local_file_spelled_many_ways_is_one_shard(
    shard_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opticam.data.urls import expand_shard_list

    monkeypatch.chdir(shard_dir.parent)
    rel = f"{shard_dir.name}/shard-000000.tar"
    (shard_dir / "sub").mkdir()
    spellings = [
        rel,
        f"./{shard_dir.name}/./shard-000000.tar",
        f"{shard_dir.name}//shard-000000.tar",
        f"{shard_dir.name}/sub/../shard-000000.tar",
        f"/{shard_dir}/shard-000000.tar",  # a doubled leading slash
        f"file://{shard_dir}/sub/..//shard-000000.tar",
        str(shard_dir / "shard-{000000..000001}.tar"),  # overlaps the file above
    ]
    listed = expand_shard_list(spellings)
    assert listed.urls == [str(shard_dir / "shard-000000.tar"), str(shard_dir / "shard-000001.tar")]
    assert listed.duplicates == 6
    assert expand_shards(spellings) == listed.urls


def test_a_symlink_before_dotdot_is_resolved_not_folded(tmp_path: Path) -> None:
    # a/link -> z/inner, so the filesystem reads a/link/../x.tar as z/x.tar; folding the
    # text instead would give a/x.tar, another file.
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "x.tar").write_bytes(b"")
    (tmp_path / "a" / "x.tar").write_bytes(b"")
    (tmp_path / "a" / "link").symlink_to(tmp_path / "z" / "inner", target_is_directory=True)
    (tmp_path / "z" / "inner").mkdir()
    # a/link/.. is z (the link's target's parent), not a: text folding would be wrong.
    got = expand_shards([str(tmp_path / "a/link/../x.tar"), str(tmp_path / "z/x.tar")])
    assert got == [str(tmp_path / "z/x.tar")]
    assert expand_shards(str(tmp_path / "a/x.tar")) == [str(tmp_path / "a/x.tar")]


@pytest.mark.e2e
def test_on_s3_a_doubled_slash_or_dot_segment_is_another_key(
    s3_bucket: str, s3_storage_options: dict[str, Any]
) -> None:
    # Found with moto (and S3 does the same): keys are stored as given, so 'd//a.tar',
    # 'd/./a.tar' and 'd/x/../a.tar' are four objects with 'd/a.tar', each read back as
    # its own bytes; a trailing slash and the s3a:// protocol name the same key.
    from opticam.data.urls import expand_shard_list, shard_identity

    s3 = fsspec.filesystem("s3", **s3_storage_options)
    keys = ["d/a.tar", "d//a.tar", "d/./a.tar", "d/x/../a.tar"]
    for key in keys:
        s3.pipe(f"{s3_bucket}/{key}", key.encode())
    assert [s3.cat_file(f"{s3_bucket}/{key}") for key in keys] == [k.encode() for k in keys]
    urls = [f"{s3_bucket}/{key}" for key in keys]
    listed = expand_shard_list([*urls, f"{s3_bucket}/d/a.tar/"], s3_storage_options)
    assert listed.urls == urls and listed.duplicates == 1
    bucket = s3_bucket.removeprefix("s3://")
    assert shard_identity(f"s3a://{bucket}/d/a.tar", s3_storage_options) == shard_identity(
        urls[0], s3_storage_options
    )
    # Only 'd/a.tar' stored: the other spellings name keys that do not exist.
    s3.rm([f"{s3_bucket}/{key}" for key in keys[1:]])
    with pytest.raises(NoShardsError, match="matched no files"):
        expand_shards(f"{s3_bucket}/d//a.tar", s3_storage_options)
