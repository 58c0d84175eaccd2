"""The unit of work: explain and score every image of one shard, write its two files.

:func:`process_shard` for one input shard

1. loads the model (cached per (model spec, device) in this process),
2. streams the shard (:class:`opticam.data.ShardReader`), preprocesses to the model's
   input size and batches with overlapped loading (:func:`opticam.data.iter_batches`),
3. per batch: picks the explained images and their classes
   (:func:`~opticam.pipeline.targets.choose_targets`), then per method explains and
   scores them (:func:`~opticam.pipeline.scoring.method_rows`); the batch size is the
   config's or measured (``"auto"``), and a batch that runs out of device memory is
   split in halves and run again (:mod:`~opticam.pipeline.autobatch`),
4. writes ``errors/<shard>.parquet`` (always, possibly empty) and then
   ``rows/<shard>.parquet`` (last: its presence means "done"), both atomically
   (:func:`write_outputs`).

Bad data never stops a shard: unreadable samples are error rows (from the data layer), a
method that raises on a batch costs error rows with stage ``"explain"`` for that batch's
images and the other methods go on. A tar that is truncated in storage (the same bytes every
time) is written with what could be read and flagged (``complete=False`` in its status,
plus an ``"incomplete"`` error row). Everything else that stops a shard leaves no rows
file, so the shard is not done and a rerun computes it: the storage failing while the
shard streams (read again from the start, :data:`READ_ATTEMPTS` times in all, then
raised), a shard that cannot be opened (:class:`ShardUnavailableError`, an ``OSError``
an orchestrator may retry), and a shard that holds no tar at all
(:class:`ShardNotATarError`). A shard whose lease another worker holds is skipped.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opticam import store
from opticam.config import RunConfig
from opticam.data import Batch, ErrorRecord, ShardStreamError
from opticam.errors import short_repr
from opticam.names import (
    STAGE_EXPLAIN,
    STAGE_INCOMPLETE,
    STAGE_NOT_TAR,
    STAGE_OPEN,
)
from opticam.pipeline import autobatch, prior
from opticam.pipeline.devices import resolve_device
from opticam.pipeline.plan import explainers, get_loaded_model, run_url_of
from opticam.pipeline.scoring import method_rows
from opticam.pipeline.targets import BatchTargets, choose_targets
from opticam.redact import redact_text, redact_url
from opticam.store import leases

# One lease owner per process: its threads (one per device) share the shards it holds.
_OWNER = leases.new_owner()

__all__ = [
    "READ_ATTEMPTS",
    "READ_RETRY_DELAYS",
    "ShardNotATarError",
    "ShardUnavailableError",
    "Stage",
    "calibrate_shard",
    "done_status",
    "process_shard",
    "write_outputs",
]

logger = logging.getLogger("opticam.pipeline")

ProgressFn = Callable[[int], None]


class ShardUnavailableError(OSError):
    """A shard could not be opened at all (possibly transient: network, permissions)."""


class ShardNotATarError(RuntimeError):
    """A shard is empty or not a tar archive: the same bytes every time, so no retry."""


#: Reads of one shard before a storage failure while streaming fails the shard.
READ_ATTEMPTS = 3
#: Seconds to wait before the second, third... read of a shard.
READ_RETRY_DELAYS: tuple[float, ...] = (2.0, 10.0)


def _limited(reader: Any, limit: int | None, state: dict[str, bool]) -> Iterator[Any]:
    """Samples of ``reader``, stopping after ``limit``; closes the reader's iterator."""
    iterator = iter(reader)
    try:
        for count, sample in enumerate(iterator, start=1):
            yield sample
            if limit is not None and count >= limit:
                state["limit_reached"] = True
                return
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


@dataclass
class Stage:
    """How a shard's batches are explained: by which explainers, which images, what rows say.

    The plain stage explains every image with the job's explainers. A job with a class
    prior (:mod:`opticam.pipeline.prior`) has two more: the calibration, which explains
    only the images that join the sample, and the rest, which leaves those out.

    Attributes:
        bound: method name -> explainer.
        pick: the images of a batch to explain (None: none of them).
        finish: sets the prior's columns of a batch's rows, given the batch explained.
        weights: keep the final channel weights of Opti-CAM rows (``channel_weights``).
    """

    bound: dict[str, Any]
    pick: Callable[[BatchTargets], BatchTargets | None] = lambda batch: batch
    finish: Callable[[list[dict[str, Any]], BatchTargets], None] = lambda rows, batch: None
    weights: bool = False


def _explain_batch(
    config: RunConfig,
    loaded: Any,
    stage: Stage,
    batch: BatchTargets,
    shard_url: str,
    errors: list[Any],
) -> list[dict[str, Any]]:
    """Rows of every method for one batch; a method that raises costs error rows only."""
    rows: list[dict[str, Any]] = []
    for method, explainer in stage.bound.items():
        try:
            rows.extend(
                method_rows(
                    config, loaded, method, explainer, batch, shard_url, errors, stage.weights
                )
            )
        except torch.OutOfMemoryError:
            raise  # the batch is too large, not the method broken: the caller splits it
        except Exception as exc:  # one method's failure must not stop the others
            message = redact_text(f"{method}: {type(exc).__name__}: {exc}")
            logger.warning("method %s failed on a batch of %s: %s", method, shard_url, message)
            errors.extend(ErrorRecord(shard_url, key, STAGE_EXPLAIN, message) for key in batch.keys)
    return rows


def _batch_part(batch: Batch, start: int, stop: int) -> Batch:
    """Images ``start:stop`` of ``batch`` (views: a pinned batch stays pinned)."""
    if start == 0 and stop == len(batch.keys):
        return batch
    return Batch(
        shard=batch.shard,
        keys=batch.keys[start:stop],
        images=batch.images[start:stop],
        labels=batch.labels[start:stop],
        boxes=batch.boxes[start:stop],
    )


def _batch_outputs(
    config: RunConfig,
    loaded: Any,
    stage: Stage,
    batch: Batch,
    shard_url: str,
    device: str,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Rows and error records of one batch: targets, then every method.

    Nothing is kept from a call that raises (an out-of-memory error is run again on
    halves of the batch), so the records are returned rather than appended to the shard's.
    """
    errors: list[Any] = []
    chosen = choose_targets(
        batch, shard_url, loaded.model, loaded.num_classes, config.target, device, errors
    )
    if chosen is not None:
        chosen = stage.pick(chosen)
    if chosen is None:
        return [], errors
    rows = _explain_batch(config, loaded, stage, chosen, shard_url, errors)
    stage.finish(rows, chosen)
    return rows, errors


def _synthetic_batch(loaded: Any, n: int) -> Batch:
    """``n`` random images of the model's input size, labelled and boxed (memory probe)."""
    height, width = loaded.input_size
    gen = torch.Generator().manual_seed(n)
    box = torch.tensor([[0.0, 0.0, width / 2, height / 2]])
    return Batch(
        shard="probe",
        keys=[f"probe-{i}" for i in range(n)],
        images=torch.rand((n, 3, height, width), generator=gen),
        labels=torch.arange(n, dtype=torch.int64) % max(loaded.num_classes, 1),
        boxes=[box.clone() for _ in range(n)],
    )


def write_outputs(
    config: RunConfig,
    status: store.ShardStatus,
    rows: list[dict[str, Any]],
    errors: list[Any],
    readable: bool,
) -> store.ShardStatus:
    """Write the errors file, then (if the shard held a tar) the rows file.

    Args:
        config: the job.
        status: the shard's status so far; its counts, time and URLs are completed here.
        rows: :data:`opticam.store.SCHEMA` rows.
        errors: error records of the shard.
        readable: False when the shard could not be opened or held no tar at all
            (:attr:`opticam.data.ShardReader.readable`): the shard then fails.

    Returns:
        The final status (the same object).

    Raises:
        ShardUnavailableError: the shard could not be opened (the errors file is written
            first, the rows file never).
        ShardNotATarError: the shard is empty or not a tar (errors file only).
        OSError: writing failed (worth retrying).
    """
    run = run_url_of(config)
    out_options = config.output_options()
    if readable and not status.complete:
        errors.append(
            ErrorRecord(
                status.shard,
                None,
                STAGE_INCOMPLETE,
                f"shard not read to its end: rows hold the {status.n_samples} samples read",
            )
        )
    status.n_rows = len(rows)
    status.n_errors = len(errors)
    status.finished = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    status.rows_url = store.rows_url(run, status.shard)
    data = b""
    if readable:
        # Built before either file is written, so that the errors file (written first)
        # records what the rows file holds: the planner checks a done shard against it.
        data = store.rows_file_bytes(store.rows_to_table(rows), status)
        status.rows_bytes = len(data)
        status.rows_sha256 = hashlib.sha256(data).hexdigest()
    status.errors_url = store.write_errors(run, config.run_id, errors, status, out_options)
    if not readable:
        opened = [e.message for e in errors if e.stage == STAGE_OPEN]
        if opened:
            reason = redact_text(opened[0])
            raise ShardUnavailableError(
                f"shard {short_repr(status.shard)} could not be opened: {reason}"
            )
        reason = next((e.message for e in errors if e.stage == STAGE_NOT_TAR), "no tar header")
        raise ShardNotATarError(
            f"shard {short_repr(status.shard)} holds no tar: {redact_text(reason)}"
        )
    store.write_rows(run, data, status, out_options)
    return status


def _batch_sizer(
    config: RunConfig, loaded: Any, bound: dict[str, Any], device: str, public_url: str
) -> autobatch.BatchSizer:
    """The batch sizer of a shard: the size learnt for this model and device, or probed."""
    key = autobatch.size_key(config, loaded.input_size, device)

    def probe(n: int) -> None:
        _batch_outputs(
            config,
            loaded,
            Stage(bound),
            _synthetic_batch(loaded, n),
            "probe",
            device,
        )

    return autobatch.BatchSizer(
        autobatch.initial_batch_size(config, key, device, probe), key, device, public_url
    )


@dataclass
class _Streamed:
    """What one read of a shard gave: rows, error records, and how the read went."""

    rows: list[dict[str, Any]]
    errors: list[Any]
    reader: Any
    limit_reached: bool
    images: set[str]


def _stream_shard(
    config: RunConfig,
    shard_url: str,
    device: str,
    loaded: Any,
    stage: Stage,
    *,
    max_images: int | None,
    on_progress: ProgressFn | None,
) -> _Streamed:
    """Read the shard once and explain its batches as ``stage`` says."""
    from opticam.data import ShardReader, iter_batches

    # The real URL is only for reading; rows, errors, names and logs get the public one.
    public_url = redact_url(shard_url)
    reader = ShardReader(
        shard_url,
        storage_options=config.data_options(),
        require_label=config.target == "label",
        max_pixels=config.max_pixels,
    )
    state = {"limit_reached": False}
    streamed = _Streamed([], [], reader, False, set())
    sizer = _batch_sizer(config, loaded, stage.bound, device, public_url)
    batches = iter_batches(
        _limited(reader, max_images, state),
        loaded.preprocess(),
        sizer.size,
        errors=streamed.errors,
        pin_memory=device.startswith("cuda"),
    )
    try:
        for batch in batches:

            def work(start: int, stop: int, batch: Batch = batch) -> tuple[list[Any], list[Any]]:
                part = _batch_part(batch, start, stop)
                return _batch_outputs(config, loaded, stage, part, public_url, device)

            # Chunks of at most sizer.size images, in order; halved on out-of-memory.
            for new_rows, new_errors in sizer.run(len(batch.keys), work):
                streamed.rows.extend(new_rows)
                streamed.errors.extend(new_errors)
                streamed.images.update(r["key"] for r in new_rows)
            if on_progress is not None:
                on_progress(len(batch.keys))
    finally:
        # Stops the loading thread also when a batch raised.
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    streamed.limit_reached = state["limit_reached"]
    return streamed


def _compute_shard(
    config: RunConfig,
    shard_url: str,
    device: str | None = None,
    *,
    max_images: int | None = None,
    on_progress: ProgressFn | None = None,
    worker: str = "",
) -> store.ShardStatus:
    """One read of the shard, explained, scored and written.

    The arguments, return value and exceptions are :func:`process_shard`'s, less the
    lease and the retries.
    """
    start = time.perf_counter()
    public_url = redact_url(shard_url)
    device = device or resolve_device(config.device)[0]
    loaded = get_loaded_model(config, device)
    shard_prior = prior.shard_prior(config, loaded, shard_url)
    stage = (
        Stage(explainers(config, loaded))
        if shard_prior is None
        else _rest(config, loaded, shard_prior)
    )
    streamed = _stream_shard(
        config, shard_url, device, loaded, stage, max_images=max_images, on_progress=on_progress
    )
    rows = streamed.rows
    if shard_prior is not None:
        # The calibration images' rows, as the walk wrote them, before the others.
        calibration = shard_prior.calibration_rows()
        rows = calibration + rows
        streamed.images.update(r["key"] for r in calibration)
    reader = streamed.reader
    status = store.ShardStatus(
        shard=public_url,
        name=store.shard_name(shard_url),
        complete=reader.complete or streamed.limit_reached,
        n_samples=reader.n_samples,
        n_images=len(streamed.images),
        max_images=max_images,
        limit_reached=streamed.limit_reached,
        device=device,
        **loaded.preprocess_settings(),
        worker=worker,
        prior_sha256="" if shard_prior is None else shard_prior.sha256,
        n_calibration=0 if shard_prior is None else len(shard_prior.calibration_keys),
    )
    status.seconds = time.perf_counter() - start
    errors = list(reader.errors) + streamed.errors
    if shard_prior is not None and shard_prior.calibration is not None:
        errors += shard_prior.calibration.errors
    return write_outputs(config, status, rows, errors, reader.readable)


def _rest(config: RunConfig, loaded: Any, shard_prior: prior.ShardPrior) -> Stage:
    """The stage of a prior job's shards after the calibration: from the prior, sample left out."""
    skip = shard_prior.calibration_keys

    def pick(batch: BatchTargets) -> BatchTargets | None:
        return _subset(batch, [i for i, key in enumerate(batch.keys) if key not in skip])

    def finish(rows: list[dict[str, Any]], batch: BatchTargets) -> None:
        started = [row for row in rows if row["method"] == prior.PRIOR_METHOD]
        seen = shard_prior.prior.seen(row["target"] for row in started)
        for row, has_prior in zip(started, seen, strict=True):
            row["prior_role"] = "prior" if has_prior else "fallback"
            row["prior_sha256"] = shard_prior.sha256

    return Stage(explainers(config, loaded, prior=shard_prior.prior), pick, finish)


def _subset(batch: BatchTargets, keep: list[int]) -> BatchTargets | None:
    """The images ``keep`` of ``batch`` (None when it is empty; the batch itself when all)."""
    if not keep:
        return None
    if len(keep) == len(batch.keys):
        return batch
    index = torch.tensor(keep, dtype=torch.long, device=batch.images.device)
    return BatchTargets(
        keys=[batch.keys[i] for i in keep],
        images=batch.images.index_select(0, index),
        labels=[batch.labels[i] for i in keep],
        predicted=batch.predicted.index_select(0, index),
        targets=batch.targets.index_select(0, index),
        p_clean=batch.p_clean.index_select(0, index),
        boxes=[batch.boxes[i] for i in keep],
    )


def calibrate_shard(
    config: RunConfig,
    shard_url: str,
    counts: Sequence[int],
    device: str | None = None,
    *,
    max_images: int | None = None,
    on_progress: ProgressFn | None = None,
) -> int:
    """Calibrate one shard of a prior job: explain the images that join the sample.

    In shard order, an image whose class has fewer than ``prior_per_class`` images in
    the sample (``counts`` before this shard, then this shard's own) joins it. Writes
    ``calibration/<name>.parquet`` (:mod:`opticam.pipeline.prior`) atomically.

    Returns:
        The number of images that joined the sample.

    Raises:
        ShardUnavailableError, ShardNotATarError: as :func:`process_shard` (nothing written).
        opticam.data.ShardStreamError: the storage failed while the shard streamed.
    """
    settings = prior.prior_settings(config)
    assert settings is not None, "calibrate_shard needs a job with a class prior"
    device = device or resolve_device(config.device)[0]
    loaded = get_loaded_model(config, device)
    sample = np.asarray(list(counts), dtype=np.int64).copy()
    if sample.shape != (loaded.num_classes,):
        raise ValueError(
            f"counts must hold one value per class ({loaded.num_classes}), got {sample.shape}"
        )
    joined: dict[str, bool] = {}  # decided once per key: a batch split on OOM asks again

    def pick(batch: BatchTargets) -> BatchTargets | None:
        keep = []
        for i, (key, cls) in enumerate(zip(batch.keys, batch.targets.tolist(), strict=True)):
            if key not in joined:
                joined[key] = bool(sample[cls] < settings.per_class)
                sample[cls] += joined[key]
            if joined[key]:
                keep.append(i)
        return _subset(batch, keep)

    def finish(rows: list[dict[str, Any]], batch: BatchTargets) -> None:
        for row in rows:
            row["prior_role"] = "calibration"

    bound = explainers(config, loaded, methods=prior.calibration_methods(config))
    stage = Stage(bound, pick, finish, weights=True)
    streamed = _stream_shard(
        config, shard_url, device, loaded, stage, max_images=max_images, on_progress=on_progress
    )
    url = store.calibration_url(run_url_of(config), shard_url)
    if not streamed.reader.readable:
        if any(e.stage == STAGE_OPEN for e in streamed.reader.errors):
            # Maybe a passing failure: the walk stops here, and a rerun reads it again.
            raise ShardUnavailableError(
                f"shard {short_repr(redact_url(shard_url))} could not be opened for the "
                "class prior's calibration"
            )
        # Not a tar: the same bytes every time. The walk goes on past it (its own run
        # fails it later, with its errors file).
        data = prior.calibration_bytes([], np.asarray(counts), shard_url, [], read=False)
        store.atomic_write_bytes(url, data, config.output_options())
        return 0
    sampled = {k for k, joined_it in joined.items() if joined_it}
    # Only the errors of the sample's own images: the rest of the shard reads them again.
    # Only the errors of the sample's own images (a method that failed on them): the rest
    # of the shard is read again after the calibration, and finds its errors then.
    errors = [e for e in streamed.errors if e.key in sampled]
    data = prior.calibration_bytes(streamed.rows, sample, shard_url, errors)
    store.atomic_write_bytes(url, data, config.output_options())
    return len(sampled)


def process_shard(
    config: RunConfig,
    shard_url: str,
    device: str | None = None,
    *,
    max_images: int | None = None,
    on_progress: ProgressFn | None = None,
    owner: str | None = None,
    worker: str = "",
    lease_ttl: float = leases.DEFAULT_TTL,
    read_attempts: int = READ_ATTEMPTS,
    retry_delays: Sequence[float] = READ_RETRY_DELAYS,
) -> store.ShardStatus:
    """Explain and score one shard and write its rows and errors files (see module doc).

    First the shard's lease is taken (:mod:`opticam.store.leases`): when another worker
    holds it, or the shard turns out to be done already, nothing is computed and the
    status says ``skipped`` (with ``held_by`` naming the other worker). A storage failure
    while the shard streams (:class:`opticam.data.ShardStreamError`) reads the shard
    again from its start, up to ``read_attempts`` times in all, waiting
    ``retry_delays`` between reads; if it persists the error is raised and no rows file
    is written, so the shard is not done and a rerun computes it.

    Args:
        config: the job.
        shard_url: URL of one input shard (as returned by
            :func:`~opticam.pipeline.plan_shards`).
        device: ``"cpu"``, ``"cuda:N"``...; None means the first of ``config.device``.
        max_images: read at most this many samples from this shard (the planner's share
            of ``config.max_images``), or None.
        on_progress: called with the number of images of each finished batch.
        owner: this worker's lease name; None means one per process.
        worker: the Prefect worker running this shard, kept in the status (provenance).
        lease_ttl: seconds the lease lives without renewal (renewed every third).
        read_attempts: reads of the shard before a streaming failure fails it.
        retry_delays: seconds before the 2nd, 3rd... read (the last value repeats).

    Returns:
        The shard's :class:`~opticam.store.ShardStatus`.

    Raises:
        ShardUnavailableError: the shard could not be opened (errors file written first).
        ShardNotATarError: the shard is empty or holds no tar (errors file written first).
        opticam.data.ShardStreamError: the storage kept failing while the shard streamed.
        OSError: writing the output failed (worth retrying).
    """
    run = run_url_of(config)
    options = config.output_options()
    with leases.hold(
        run, shard_url, owner or _OWNER, ttl=lease_ttl, storage_options=options
    ) as lease:
        if lease is None:
            holder = leases.current_lease(run, shard_url, options)
            status = done_status(config, shard_url)
            status.held_by = holder.owner if holder is not None else "another worker"
            return status
        if store.is_done(run, shard_url, options):
            return done_status(config, shard_url)  # another run finished it meanwhile
        for attempt in range(1, read_attempts + 1):
            try:
                return _compute_shard(
                    config,
                    shard_url,
                    device,
                    max_images=max_images,
                    on_progress=on_progress,
                    worker=worker,
                )
            except ShardStreamError as err:
                if attempt >= read_attempts:
                    raise
                _wait_to_read_again(shard_url, err, attempt, read_attempts, retry_delays)
    raise AssertionError("unreachable")  # pragma: no cover


def _wait_to_read_again(
    shard_url: str,
    err: ShardStreamError,
    attempt: int,
    read_attempts: int,
    retry_delays: Sequence[float],
) -> None:
    """Say that read ``attempt`` of the shard failed, then wait before the next one."""
    delay = retry_delays[min(attempt - 1, len(retry_delays) - 1)] if retry_delays else 0
    logger.warning(
        "shard %s: %s; reading it again in %.0f s (attempt %d of %d)",
        redact_url(shard_url),
        redact_text(err.reason),
        delay,
        attempt + 1,
        read_attempts,
    )
    time.sleep(delay)


def done_status(config: RunConfig, shard_url: str) -> store.ShardStatus:
    """The :class:`~opticam.store.ShardStatus` of a shard already done (``skipped=True``)."""
    run = run_url_of(config)
    return store.ShardStatus(
        shard=redact_url(shard_url),
        name=store.shard_name(shard_url),
        rows_url=store.rows_url(run, shard_url),
        errors_url=store.errors_url(run, shard_url),
        skipped=True,
    )
