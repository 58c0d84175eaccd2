"""Shard patterns -> shard URLs, on any fsspec filesystem, checked before any work starts.

:func:`expand_shards` accepts paths and URLs (local, ``file://``, ``s3://`` or any
fsspec protocol), brace patterns (``shard-{000000..000099}.tar``, expanded by the
`braceexpand <https://pypi.org/project/braceexpand/>`_ package that webdataset uses
too), globs and lists mixing them, and fails with :class:`NoShardsError` when
something named does not exist. ``pipe:`` URLs run shell commands when read, so they
are refused unless the caller allows them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from braceexpand import braceexpand
from fsspec.core import split_protocol, url_to_fs

from opticam.errors import NoShardsError, ShardPatternError, short_repr

__all__ = [
    "MAX_BRACE_EXPANSION",
    "NoShardsError",
    "ShardList",
    "ShardPatternError",
    "expand_braces",
    "expand_shard_list",
    "expand_shards",
    "shard_identity",
    "refuse_pipe",
    "storage_options_for",
]

MAX_BRACE_EXPANSION = 1_000_000
"""Most names one brace pattern may expand to (a typo like ``{0..99999999}`` fails fast)."""

_GLOB_CHARS = re.compile(r"[*?\[]")
# braceexpand's own grammar for a numeric range (its `int_range_re`), found anywhere.
_INT_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?\}")
# Above this many names in one folder, one listing is cheaper than one request per name.
_LIST_INSTEAD_OF_EXISTS = 64


# --------------------------------------------------------------------------- storage options


def storage_options_for(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The fsspec options for ``url``: the caller's options plus defaults for its protocol.

    For ``s3://`` (and ``s3a://``) URLs:

    - the endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` is passed as
      ``client_kwargs["endpoint_url"]`` unless the caller set an endpoint (s3fs does
      not read these variables itself in every version);
    - ``use_listings_cache`` defaults to ``False``: s3fs caches folder listings per
      process, so shards written by another process would otherwise stay invisible.

    Credentials are never added: s3fs finds them through the standard AWS chain
    (environment, config files, instance roles) unless the caller passes ``key`` /
    ``secret`` / ``profile``.

    Args:
        url: the URL the options are for.
        storage_options: the caller's options (not modified).

    Returns:
        A new dict of options.
    """
    options = dict(storage_options or {})
    protocol, _ = split_protocol(url)
    if protocol in ("s3", "s3a"):
        client_kwargs = dict(options.get("client_kwargs") or {})
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
            client_kwargs["endpoint_url"] = endpoint
            options["client_kwargs"] = client_kwargs
        options.setdefault("use_listings_cache", False)
    return options


# --------------------------------------------------------------------------- brace expansion


def _check_range_sizes(pattern: str) -> None:
    """Refuse a numeric range longer than :data:`MAX_BRACE_EXPANSION` before expanding.

    Why this is not left to ``islice`` alone: ``braceexpand()`` builds an
    ``itertools.product`` when it is called, and ``product`` turns every factor into a
    tuple first: measured, ``braceexpand("shard-{0..4999999}.tar")`` took 0.7 s and
    +346 MB of memory before ``islice`` could take the first name, and ten times that
    for one more digit. One range is the usual typo (an extra digit), so each is
    measured here from its bounds; ``islice`` still caps the product of ranges.
    """
    for match in _INT_RANGE.finditer(pattern):
        first, last, step = int(match[1]), int(match[2]), int(match[3] or 0) or 1
        count = abs(last - first) // step + 1
        if count > MAX_BRACE_EXPANSION:
            raise ShardPatternError(
                f"shard pattern {short_repr(pattern)}: brace range {match[0]} names {count} items "
                f"(at most {MAX_BRACE_EXPANSION} accepted)"
            )


def expand_braces(pattern: str) -> list[str]:
    r"""Expand shell-style braces: ``{000..099}`` (zero padding kept), ``{a..e}``, ``{x,y}``.

    Uses the ``braceexpand`` package (the one webdataset uses), so patterns mean the
    same here as in webdataset and bash: ranges take an optional step
    (``{0..10..2}``); a leading zero on either end pads every number to the wider
    end's width; braces nest and multiply (``{a,b}-{0..1}`` -> ``a-0, a-1, b-0,
    b-1``); braces that are neither a range nor contain a comma (``{}``, ``{abc}``)
    are kept literally; a backslash escapes a brace or comma (``\{``).

    A pattern naming more than :data:`MAX_BRACE_EXPANSION` names fails: a single
    range from its bounds, before anything is built; a product of ranges after at
    most ``MAX_BRACE_EXPANSION + 1`` names. One case is not bounded: a product nested
    inside a comma list (``{{0..999}{0..999}{0..999},x}``), which braceexpand builds
    in full first.

    Args:
        pattern: text with zero or more brace expressions.

    Returns:
        The expansions, in order (duplicates kept).

    Raises:
        ValueError: unbalanced braces, or more than :data:`MAX_BRACE_EXPANSION` names;
            the message names the pattern.
    """
    _check_range_sizes(pattern)
    try:
        names = list(islice(braceexpand(pattern), MAX_BRACE_EXPANSION + 1))
    except ValueError:  # braceexpand.UnbalancedBracesError, its only error (not in its stub)
        raise ShardPatternError(
            f"shard pattern {short_repr(pattern)} has unbalanced braces; every '{{' needs a "
            "matching '}' (write \\{ or \\} for a literal brace)"
        ) from None
    if len(names) > MAX_BRACE_EXPANSION:
        raise ShardPatternError(
            f"shard pattern {short_repr(pattern)} expands to more than {MAX_BRACE_EXPANSION} names "
            f"(at most {MAX_BRACE_EXPANSION} accepted)"
        )
    return names


# --------------------------------------------------------------------------- shard expansion


def refuse_pipe(url: str) -> None:
    """Raise the error for a ``pipe:`` URL that the caller did not allow.

    Args:
        url: the refused URL (named in the message).

    Raises:
        ValueError: always.
    """
    raise ShardPatternError(
        f"refusing shard URL {short_repr(url)}: 'pipe:' URLs run shell commands; pass "
        "allow_pipe=True only for shard lists you wrote yourself"
    )


def _protocols(fs: Any) -> tuple[str, ...]:
    return tuple(fs.protocol) if isinstance(fs.protocol, tuple | list) else (fs.protocol,)


def _is_local(fs: Any) -> bool:
    return bool({"file", "local"} & set(_protocols(fs)))


def _local_url(path: str) -> str:
    """A local path as it is planned: absolute, with ``//``, ``.`` and ``..`` folded away.

    Folding ``..`` by text is only right when no symlink sits before it
    (``link/../x`` is the link target's sibling); then the resolved path is used.
    """
    folded = os.path.normpath(path)
    if folded.startswith("//"):  # POSIX keeps a leading '//'; Linux treats it as '/'
        folded = "/" + folded.lstrip("/")
    if ".." in path.split("/") and os.path.realpath(folded) != os.path.realpath(path):
        return os.path.realpath(path)
    return folded


def _display_url(fs: Any, path: str) -> str:
    """The URL planned for a path: a folded absolute path locally, a protocol URL otherwise.

    Only local paths are rewritten: on an object store ``a//b``, ``a/./b`` and ``a/b``
    are three different keys (S3 stores the key's text as given), so they stay apart.
    """
    if _is_local(fs):
        return _local_url(str(path))
    return str(fs.unstrip_protocol(path))


def shard_identity(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """What a shard URL names, whatever its spelling: the object that would be read.

    - a local path or ``file://`` URL: the path the filesystem resolves (symlinks,
      ``//``, ``.`` and ``..`` resolved: :func:`os.path.realpath`);
    - an object store or other fsspec protocol: the protocol family plus the path the
      filesystem would request (``s3://b/k`` and ``s3a://b/k``, or ``s3://b/k/``, are
      one object; ``s3://b/a//k`` is another key than ``s3://b/a/k``, as S3 keeps a key's
      text as given);
    - ``pipe:`` commands and chained ``a::b`` URLs: the text.
    """
    if url.startswith("pipe:") or "::" in url:
        return url
    fs, path = url_to_fs(url, **storage_options_for(url, storage_options))
    if _is_local(fs):
        return "file://" + os.path.realpath(path)
    return f"{_protocols(fs)[0]}://{fs._strip_protocol(path)}"


def _existing_files(fs: Any, paths: list[str]) -> set[str]:
    """The subset of ``paths`` that exist as files, listing each folder once when cheaper."""
    listable = not {"http", "https"} & set(_protocols(fs))
    by_parent: dict[str, list[str]] = {}
    for path in paths:
        by_parent.setdefault(fs._parent(path), []).append(path)
    found: set[str] = set()
    for parent, group in by_parent.items():
        if listable and len(group) > _LIST_INSTEAD_OF_EXISTS:
            try:
                entries = fs.ls(parent, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                continue
            files = {
                fs._strip_protocol(e["name"]).rstrip("/")
                for e in entries
                if e.get("type") == "file"
            }
            found.update(path for path in group if path.rstrip("/") in files)
        else:
            found.update(path for path in group if fs.isfile(path))
    return found


def _resolve_names(
    names: list[str], storage_options: Mapping[str, Any] | None
) -> list[tuple[str, Any, str, bool]]:
    """Each name with its filesystem, its path there and whether it is a glob."""
    # One filesystem per protocol: building one per name would cost 100k
    # instantiations for a 100k-shard range.
    filesystems: dict[str | None, Any] = {}
    resolved: list[tuple[str, Any, str, bool]] = []  # (name, fs, path, is_glob)
    for name in names:
        protocol, _ = split_protocol(name)
        if "::" in name:
            fs, path = url_to_fs(name, **storage_options_for(name, storage_options))
        else:
            if protocol not in filesystems:
                fs, _ = url_to_fs(name, **storage_options_for(name, storage_options))
                fs.invalidate_cache()
                filesystems[protocol] = fs
            fs = filesystems[protocol]
            path = fs._strip_protocol(name)
        resolved.append((name, fs, path, bool(_GLOB_CHARS.search(path))))
    return resolved


def _existing_by_fs(resolved: list[tuple[str, Any, str, bool]]) -> dict[int, set[str]]:
    """The paths that exist as files, by ``id`` of their filesystem (globs left out)."""
    by_fs: dict[int, tuple[Any, list[str]]] = {}
    for _, fs, path, is_glob in resolved:
        if not is_glob:
            by_fs.setdefault(id(fs), (fs, []))[1].append(path)
    return {key: _existing_files(fs, paths) for key, (fs, paths) in by_fs.items()}


def _expand_one(
    pattern: str, storage_options: Mapping[str, Any] | None, must_exist: bool
) -> list[str]:
    """The shard URLs of one pattern: braces expanded, globs matched, existence checked."""
    names = expand_braces(pattern)
    resolved = _resolve_names(names, storage_options)
    existing = _existing_by_fs(resolved) if must_exist else {}
    urls: list[str] = []
    missing: list[str] = []
    for name, fs, path, is_glob in resolved:
        if is_glob:
            matches = fs.glob(path, detail=True)
            files = sorted(p for p, info in matches.items() if info.get("type") == "file")
            urls.extend(_display_url(fs, p) for p in files)
        elif must_exist and path not in existing[id(fs)]:
            missing.append(name)
        else:
            urls.append(name if "::" in name else _display_url(fs, path))
    if not urls:
        raise NoShardsError(f"shard pattern {short_repr(pattern)} matched no files")
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise NoShardsError(
            f"shard pattern {short_repr(pattern)}: {len(missing)} of {len(names)} named shards "
            f"do not exist: {shown}{more}"
        )
    return urls


@dataclass
class ShardList:
    """The shards a data spec names, in order, each object once.

    Attributes:
        urls: shard URLs in the order given (first spelling of each object kept).
        duplicates: entries dropped because they named a shard already listed (the
            same file spelled another way, overlapping ranges or globs).
        duplicate_examples: a few of the dropped spellings, for messages.
    """

    urls: list[str]
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)


def expand_shard_list(
    spec: str | Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    allow_pipe: bool = False,
    must_exist: bool = True,
) -> ShardList:
    """:func:`expand_shards`, also saying how many entries named a shard already listed.

    Shards are told apart by :func:`shard_identity` (the object read), never by their
    text: ``/d/a.tar``, ``/d//a.tar``, ``./d/./a.tar`` and ``file:///d/x/../a.tar`` are
    one shard.

    Args and raises: as :func:`expand_shards`.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise NoShardsError("no shard patterns given (empty list)")
    urls: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ShardPatternError(
                f"shard pattern must be a non-empty string, got {short_repr(pattern)}"
            )
        if pattern.startswith("pipe:"):
            if not allow_pipe:
                refuse_pipe(pattern)
            urls.append(pattern)
            continue
        urls.extend(_expand_one(pattern, storage_options, must_exist))
    seen: set[str] = set()
    result = ShardList(urls=[])
    for url in urls:
        identity = shard_identity(url, storage_options)
        if identity in seen:
            result.duplicates += 1
            if len(result.duplicate_examples) < 3:
                result.duplicate_examples.append(url)
            continue
        seen.add(identity)
        result.urls.append(url)
    return result


def expand_shards(
    spec: str | Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    allow_pipe: bool = False,
    must_exist: bool = True,
) -> list[str]:
    """Expand a shard specification into the list of shard URLs, checking they exist.

    Accepted forms, alone or mixed in a list:

    - a path or URL: ``/data/shard-000000.tar``, ``file:///data/x.tar``,
      ``s3://bucket/train/shard-000000.tar``, ``gcs://...``, ``memory://...``
      (anything fsspec knows);
    - a brace pattern: ``s3://b/shard-{000000..000099}.tar`` (zero padding kept),
      ``shard-{a,b}.tar``; every name it produces must exist (see
      :func:`expand_braces`);
    - a glob: ``s3://b/train/*.tar`` (matches are sorted).

    Args:
        spec: one pattern or a sequence of patterns.
        storage_options: fsspec options (endpoint, credentials, ...), completed
            per protocol by :func:`storage_options_for`.
        allow_pipe: pass ``pipe:`` URLs through (they run shell commands when read).
        must_exist: check that brace-expanded and literal names exist (one listing
            per folder); ``False`` skips the check (globs are always listed).

    Returns:
        Shard URLs in the order given, each object once (first occurrence kept; see
        :func:`shard_identity` for when two spellings name one object). Local shards
        are absolute paths with ``//``, ``.`` and ``..`` folded; others keep their
        protocol (``s3://...``) and their text.

    Raises:
        NoShardsError: a pattern, or any element of the list, matched nothing, or
            named shards that do not exist (the message names the pattern).
        ValueError: a ``pipe:`` URL without ``allow_pipe``, an empty pattern,
            unbalanced braces, or a brace expression naming more than
            :data:`MAX_BRACE_EXPANSION` names.
    """
    return expand_shard_list(
        spec, storage_options, allow_pipe=allow_pipe, must_exist=must_exist
    ).urls
