"""Samples -> model batches: preprocess, collate and prefetch in a background thread.

:func:`iter_batches` runs the source iterator (decoding included, when it is a
:class:`~opticam.data.reader.ShardReader`) and the preprocessing in a thread and keeps
a bounded queue of finished :class:`Batch` records, so that loading overlaps with the
model's compute and never runs more than ``prefetch`` batches ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from opticam.data.reader import ShardReader, parse_label
from opticam.data.types import Batch, Box, ErrorRecord, Sample
from opticam.names import STAGE_LABEL, STAGE_PREPROCESS

__all__ = ["PreprocessFn", "iter_batches"]


class PreprocessFn(Protocol):
    """``(image, boxes) -> (tensor (3, H, W) float32 in [0, 1], boxes (n, 4) float32)``."""

    def __call__(
        self, image: Image.Image, boxes: Sequence[Box]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image as a tensor and its boxes in the tensor's pixels."""


class _Done:
    """Put in the queue by the loader thread after its last batch."""


@dataclass
class _Failure:
    """An exception of the loader thread, raised again in the consumer."""

    error: BaseException


def _collate(
    shard: str, items: list[tuple[str, torch.Tensor, int | None, torch.Tensor]], pin: bool
) -> Batch:
    images = torch.stack([image for _, image, _, _ in items])
    if pin:
        images = images.pin_memory()
    labels = torch.tensor(
        [-1 if label is None else label for _, _, label, _ in items], dtype=torch.int64
    )
    return Batch(
        shard=shard,
        keys=[key for key, _, _, _ in items],
        images=images,
        labels=labels,
        boxes=[boxes.to(torch.float32).reshape(-1, 4) for _, _, _, boxes in items],
    )


class _Loader:
    """The background thread of :func:`iter_batches`: read, preprocess, collate, queue.

    The thread runs :meth:`produce`; the consumer reads :attr:`slots` and sets
    :attr:`stop` when it is done.
    """

    def __init__(
        self,
        source: ShardReader | Iterable[Sample],
        preprocess: PreprocessFn | Callable[..., tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
        prefetch: int,
        errors: list[ErrorRecord] | None,
        pin: bool,
    ) -> None:
        self.source = source
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.errors = errors
        self.pin = pin
        self.slots: queue.Queue[Batch | _Done | _Failure] = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()

    def sink(self) -> list[ErrorRecord] | None:
        """Where a sample's error record goes, or None to raise it to the consumer."""
        if self.errors is not None:
            return self.errors
        # Looked up per error: ShardReader replaces its list when an iteration starts.
        found = getattr(self.source, "errors", None)
        return found if isinstance(found, list) else None

    def put(self, item: Batch | _Done | _Failure) -> bool:
        """Queue ``item``, waiting for room; False when the consumer stopped first."""
        while not self.stop.is_set():
            try:
                self.slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _prepared(
        self, sample: Sample
    ) -> tuple[str, torch.Tensor, int | None, torch.Tensor] | None:
        """The sample ready to collate, or None when it became an error record."""
        stage = STAGE_LABEL
        try:
            # The label goes into an int64 tensor with the whole batch: one that does
            # not fit must cost this sample, not the batch.
            if sample.label is not None:
                parse_label(sample.label, "label")
            stage = STAGE_PREPROCESS
            image, boxes = self.preprocess(sample.image, sample.boxes)
        except Exception as exc:
            target = self.sink()
            if target is None:
                raise
            target.append(
                ErrorRecord(
                    shard=sample.shard,
                    key=sample.key,
                    stage=stage,
                    message=f"{type(exc).__name__}: {exc}",
                )
            )
            return None
        return (sample.key, image, sample.label, torch.as_tensor(boxes))

    def _queue_batches(self, iterator: Iterable[Sample]) -> bool:
        """Queue every batch of ``iterator``; False as soon as the consumer stopped."""
        items: list[tuple[str, torch.Tensor, int | None, torch.Tensor]] = []
        shard = ""
        for sample in iterator:
            if self.stop.is_set():
                return False
            if items and sample.shard != shard:
                if not self.put(_collate(shard, items, self.pin)):
                    return False
                items = []
            shard = sample.shard
            item = self._prepared(sample)
            if item is None:
                continue
            items.append(item)
            if len(items) == self.batch_size:
                if not self.put(_collate(shard, items, self.pin)):
                    return False
                items = []
        return not items or self.put(_collate(shard, items, self.pin))

    def produce(self) -> None:
        """The thread's body: every batch, then :class:`_Done` (or the :class:`_Failure`)."""
        iterator = iter(self.source)
        try:
            if self._queue_batches(iterator):
                self.put(_Done())
        except BaseException as exc:
            self.put(_Failure(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()


def iter_batches(
    source: ShardReader | Iterable[Sample],
    preprocess: PreprocessFn | Callable[..., tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    *,
    prefetch: int = 2,
    errors: list[ErrorRecord] | None = None,
    pin_memory: bool = False,
) -> Generator[Batch, None, None]:
    """Preprocess and batch samples in a background thread, overlapping with compute.

    A thread iterates ``source`` (decoding happens there too when it is a
    :class:`ShardReader`), applies ``preprocess`` and puts finished batches into a
    queue of at most ``prefetch`` batches, so reading is never more than
    ``prefetch`` batches ahead of the consumer.

    - A batch never mixes shards: a change of ``sample.shard`` closes the batch.
    - A sample whose label is not an integer that fits int64 becomes an
      ``ErrorRecord`` with stage ``"label"``, one whose preprocessing raises one
      with stage ``"preprocess"``; either is appended to ``errors`` if given, else
      to ``source.errors`` when the source has such a list (a
      :class:`ShardReader`); with neither, the exception is raised to the consumer.
    - Any other exception in the thread is raised to the consumer.
    - When the consumer stops early (``break``, exception, ``close()``), the
      thread stops at its next sample and the source's iterator is closed.

    Args:
        source: a :class:`ShardReader` or any iterable of :class:`Sample`.
        preprocess: ``(image, boxes) -> (image (3, H, W) float32, boxes (n, 4))``,
            e.g. :class:`opticam.data.Preprocess`.
        batch_size: maximum samples per batch (>= 1); the last batch of a shard
            may be smaller.
        prefetch: batches prepared ahead (>= 1).
        errors: where preprocessing errors go (see above).
        pin_memory: pin batch images in page-locked memory (faster, asynchronous
            copies to a GPU); ignored without CUDA.

    Yields:
        :class:`Batch` with ``images`` ``(B, 3, H, W)``, ``labels`` ``(B,)`` (-1
        where unknown) and ``B`` box tensors ``(n_i, 4)``.

    Raises:
        ValueError: ``batch_size`` or ``prefetch`` below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    loader = _Loader(
        source, preprocess, batch_size, prefetch, errors, pin_memory and torch.cuda.is_available()
    )
    thread = threading.Thread(target=loader.produce, name="opticam-batches", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = loader.slots.get(timeout=0.1)
            except queue.Empty:
                if not thread.is_alive() and loader.slots.empty():
                    raise RuntimeError("batch loading thread ended without a result") from None
                continue
            if isinstance(item, _Done):
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        loader.stop.set()
        # Bounded wait: a thread blocked in a slow network read must not hang the
        # consumer; it is a daemon and exits at its next check of `stop`.
        thread.join(timeout=10.0)
