"""Per-shard leases: two runs (or workers) of one job split the shards between them.

Without a lease, both would compute every shard.

A lease is a small JSON object in the run folder, ``leases/<shard name>.<generation>.json``,
holding its owner and an expiry time. The only atomic operation it needs is *create if
absent* (a local hard link of a complete temporary file; a conditional ``PUT`` with
``If-None-Match: *`` on S3), so:

- taking a free shard creates generation 0; of two takers exactly one succeeds;
- a lease whose expiry has passed (its owner died) is taken over by creating the next
  generation, and again exactly one taker succeeds;
- the owner renews by creating the next generation itself (:func:`renew`) and releases
  by deleting its generations (:func:`release`).

The current lease of a shard is its highest generation. Leases only save work: a shard's
truth is its rows file, written atomically, so if a lease is lost (an owner that stalled
past its expiry) the worst outcome is one shard computed twice, never a wrong result.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from opticam.store.layout import failing_for_good, filesystem, invalidate, join, shard_name

__all__ = [
    "DEFAULT_TTL",
    "Lease",
    "acquire",
    "current_lease",
    "hold",
    "new_owner",
    "owner_gone",
    "release",
    "renew",
]

#: Seconds a lease lives without renewal; the holder renews it every third of that.
DEFAULT_TTL = 600.0


@dataclass(frozen=True)
class Lease:
    """One generation of a shard's lease.

    Attributes:
        shard: :func:`opticam.store.shard_name` of the shard.
        owner: who holds it (:func:`new_owner`: host, process and a random part).
        generation: 0 for the first taker, +1 for each renewal or takeover.
        expires: Unix time after which anyone may take it over.
        url: the lease object's URL.
    """

    shard: str
    owner: str
    generation: int
    expires: float
    url: str

    def expired(self, now: float | None = None) -> bool:
        """Whether the lease may be taken over."""
        return (time.time() if now is None else now) >= self.expires


def new_owner() -> str:
    """A name for this process as a lease owner: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_gone(owner: str) -> bool:
    """Whether ``owner`` (from :func:`new_owner`) was a process on this host that has ended.

    Its lease is then free at once instead of at its expiry: an interrupted or killed
    ``opticam run`` does not hold its shard for 10 minutes against the next run. Owners on
    other hosts cannot be checked and stay until their lease expires; a PID reused by a
    new process only makes us wait for the expiry.
    """
    host, _, rest = owner.partition(":")
    pid_text = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _folder(run: str) -> str:
    return join(run, "leases")


def _lease_url(run: str, name: str, generation: int) -> str:
    return join(_folder(run), f"{name}.{generation}.json")


def _create_exclusive(url: str, data: bytes, storage_options: Mapping[str, Any] | None) -> bool:
    """Create ``url`` with ``data`` unless it exists; True when this call created it.

    Raises:
        opticam.errors.StorageFailedError: the storage refused the write for good.
    """
    with failing_for_good(url):
        return _create(url, data, storage_options)


def _create(url: str, data: bytes, storage_options: Mapping[str, Any] | None) -> bool:
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lease.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            # link() fails if the name exists: an exclusive create of a complete file.
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as err:
        # s3fs reports a failed If-None-Match precondition (HTTP 412) as a plain OSError.
        if "PreconditionFailed" in str(err) or "412" in str(err):
            return False
        raise
    invalidate(fs, path.rsplit("/", 1)[0])
    return True


def current_lease(
    run: str, shard_url: str, storage_options: Mapping[str, Any] | None = None
) -> Lease | None:
    """The shard's lease of the highest generation, or None when it has none."""
    name = shard_name(shard_url)
    fs, folder = filesystem(_folder(run), storage_options)
    invalidate(fs, folder)
    try:
        entries = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return None
    generations = []
    for entry in entries:
        base = entry.rsplit("/", 1)[-1]
        stem, _, number = base.removesuffix(".json").rpartition(".")
        if stem == name and number.isdigit():
            generations.append(int(number))
    for generation in sorted(generations, reverse=True):
        url = _lease_url(run, name, generation)
        try:
            with fs.open(filesystem(url, storage_options)[1], "rb") as f:
                data = json.loads(f.read())
        except FileNotFoundError:  # released between the listing and the read
            continue
        return Lease(name, str(data["owner"]), generation, float(data["expires"]), url)
    return None


def _take(
    run: str,
    name: str,
    owner: str,
    generation: int,
    ttl: float,
    storage_options: Mapping[str, Any] | None,
) -> Lease | None:
    url = _lease_url(run, name, generation)
    expires = time.time() + ttl
    payload = {"owner": owner, "expires": expires, "shard": name, "generation": generation}
    if not _create_exclusive(url, json.dumps(payload).encode(), storage_options):
        return None
    return Lease(name, owner, generation, expires, url)


def acquire(
    run: str,
    shard_url: str,
    owner: str,
    *,
    ttl: float = DEFAULT_TTL,
    storage_options: Mapping[str, Any] | None = None,
) -> Lease | None:
    """Take the shard's lease: free, expired, or already ours.

    None when someone else holds a live one (or won the race for it).

    Args:
        run: run folder URL.
        shard_url: the input shard's URL.
        owner: this worker's name (:func:`new_owner`).
        ttl: seconds until the lease expires unless renewed.
        storage_options: fsspec options of the output.
    """
    current = current_lease(run, shard_url, storage_options)
    live = current is not None and not current.expired() and not owner_gone(current.owner)
    if current is not None and live and current.owner != owner:
        return None
    generation = 0 if current is None else current.generation + 1
    return _take(run, shard_name(shard_url), owner, generation, ttl, storage_options)


def renew(
    lease: Lease, *, ttl: float = DEFAULT_TTL, storage_options: Mapping[str, Any] | None = None
) -> Lease | None:
    """The next generation of our own lease, or None if someone took it over meanwhile."""
    run = lease.url.rsplit("/leases/", 1)[0]
    return _take(run, lease.shard, lease.owner, lease.generation + 1, ttl, storage_options)


def release(lease: Lease, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete our lease and the generations before it.

    Best effort: an expired lease is free anyway.

    Older generations stay while a lease lives on purpose: each one's file is what makes
    a stalled former owner's :func:`renew` (which creates the generation after its own)
    fail instead of reviving a lease that was taken over.
    """
    fs, _ = filesystem(lease.url, storage_options)
    run = lease.url.rsplit("/leases/", 1)[0]
    for generation in range(lease.generation, -1, -1):
        with contextlib.suppress(FileNotFoundError):
            fs.rm(filesystem(_lease_url(run, lease.shard, generation), storage_options)[1])


class _Keeper:
    """Renews a lease every third of its lifetime in a daemon thread until stopped."""

    def __init__(self, lease: Lease, ttl: float, storage_options: Mapping[str, Any] | None) -> None:
        import threading

        self.lease: Lease | None = lease
        self.ttl = ttl
        self.storage_options = storage_options
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opticam-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import logging

        while not self._stop.wait(self.ttl / 3):
            current = self.lease
            if current is None:
                return
            try:
                renewed = renew(current, ttl=self.ttl, storage_options=self.storage_options)
            except Exception as err:  # storage hiccup: the next round tries again
                logging.getLogger("opticam.store").warning("lease renewal failed: %s", err)
                continue
            if renewed is None:
                # Taken over (we stalled past the expiry): finish anyway; the rows file is
                # written atomically, so a duplicate is harmless.
                self.lost = True
                logging.getLogger("opticam.store").warning(
                    "lease of shard %s was taken over by another worker", current.shard
                )
                return
            self.lease = renewed

    def stop(self) -> Lease | None:
        self._stop.set()
        self._thread.join()
        return None if self.lost else self.lease


@contextlib.contextmanager
def hold(
    run: str,
    shard_url: str,
    owner: str,
    *,
    ttl: float = DEFAULT_TTL,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[Lease | None]:
    """Hold the shard's lease for the ``with`` block.

    Yields None when another worker holds it; otherwise renews it in the background and
    releases it at the end.
    """
    lease = acquire(run, shard_url, owner, ttl=ttl, storage_options=storage_options)
    if lease is None:
        yield None
        return
    keeper = _Keeper(lease, ttl, storage_options)
    try:
        yield lease
    finally:
        last = keeper.stop()
        if last is not None:
            with contextlib.suppress(Exception):
                release(last, storage_options)
