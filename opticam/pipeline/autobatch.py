"""How many images go through explain + score at once, and what happens when they do not fit.

:attr:`RunConfig.batch_size <opticam.config.RunConfig.batch_size>` is an int or ``"auto"``:

- an int is used as given (the default, 32, keeps runs as they always were);
- ``"auto"`` on a GPU measures the memory of the real work (every method of the job and
  its metrics) on two small synthetic batches of the model's input size
  (:data:`PROBE_SIZES`), fits ``peak = fixed + per_image * n`` and takes the largest
  batch that fills :data:`SAFETY` of the free memory, at most :data:`MAX_AUTO_BATCH_SIZE`
  (:func:`probe_cuda`, :func:`estimate_batch_size`). This runs once per (model, input
  size, methods and metrics, device) in a process; later shards reuse the size.
- ``"auto"`` on the CPU is :data:`CPU_BATCH_SIZE`, a fixed size that keeps an ImageNet
  model at 224 px near 3 GiB (measured: see the constant). Nothing is probed there: a
  process short of host memory is usually killed by the system rather than given an
  error it could recover from.

Whatever the size, a batch whose explain + score step raises
:class:`torch.OutOfMemoryError` is not lost: the cached GPU memory is freed, the batch is
split in halves and the halves are run (:class:`BatchSizer`). The smaller size is kept for
the following batches and remembered for later shards of the same job in this process,
so the size that did not fit is not tried again. A part of a batch goes through the same
steps as a whole batch (targets, every method, metrics) and nothing is kept from an attempt
that failed, so every image gets the rows and error records a run with the smaller
``batch_size`` gives it: the same bits where the parts are that run's batches (a batch
size that is a power of two, halved). One image that does not fit is an error
(:class:`BatchOutOfMemoryError`), not an endless retry.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from opticam.config import RunConfig

__all__ = [
    "CPU_BATCH_SIZE",
    "MAX_AUTO_BATCH_SIZE",
    "PROBE_SIZES",
    "SAFETY",
    "SizeKey",
    "BatchOutOfMemoryError",
    "BatchSizer",
    "clear_batch_sizes",
    "estimate_batch_size",
    "initial_batch_size",
    "probe_cuda",
    "remember_batch_size",
    "remembered_batch_size",
    "size_key",
]

logger = logging.getLogger("opticam.pipeline")

#: ``batch_size="auto"`` on the CPU. Peak RSS of one explain + score step of ResNet-50 at
#: 224 px (methods opticam, gradcam, fakecam; random weights; 2 threads): 3.2 GiB at 8
#: images, 4.9 GiB at 16, 6.4 GiB at 32 (README, "Batch size": figures and the command
#: that measures them).
CPU_BATCH_SIZE = 8
#: Largest batch ``"auto"`` picks on a GPU (larger batches rarely run faster, and the
#: loader keeps a few batches of host memory ahead).
MAX_AUTO_BATCH_SIZE = 256
#: The two synthetic batch sizes whose peak GPU memory the ``"auto"`` probe measures.
PROBE_SIZES: tuple[int, int] = (2, 4)
#: Fraction of the free GPU memory an ``"auto"`` batch is sized to use at its peak.
SAFETY = 0.8

T = TypeVar("T")

#: What a remembered batch size is kept under (:func:`size_key`).
SizeKey = tuple[str, str, str, str, str]

_SIZES: dict[SizeKey, int] = {}
_SIZES_LOCK = threading.Lock()


class BatchOutOfMemoryError(RuntimeError):
    """A single image does not fit in the device's memory: halving cannot help."""


def size_key(config: RunConfig, input_size: Sequence[int], device: str) -> SizeKey:
    """What the memory of a batch depends on: model, input size, methods, metrics, device."""
    methods = sorted(m.model_dump_json() for m in config.methods)
    return (
        config.model.model_dump_json(),
        "x".join(str(int(v)) for v in input_size),
        json.dumps(methods),
        config.metrics.model_dump_json(),
        device,
    )


def remembered_batch_size(key: SizeKey) -> int | None:
    """The size measured or learnt for ``key`` in this process, or None."""
    with _SIZES_LOCK:
        return _SIZES.get(key)


def remember_batch_size(key: SizeKey, size: int) -> int:
    """Keep ``size`` for ``key`` (never raising a smaller one); returns the kept size."""
    with _SIZES_LOCK:
        old = _SIZES.get(key)
        kept = size if old is None else min(old, size)
        _SIZES[key] = kept
        return kept


def clear_batch_sizes() -> None:
    """Forget every measured or learnt batch size (tests; a card freed by someone else)."""
    with _SIZES_LOCK:
        _SIZES.clear()


def estimate_batch_size(
    sizes: Sequence[int],
    peaks: Sequence[float],
    available: float,
    *,
    safety: float = SAFETY,
    cap: int = MAX_AUTO_BATCH_SIZE,
) -> int:
    """The largest batch whose extrapolated peak memory fits ``safety * available``.

    Args:
        sizes: two batch sizes, the smaller first.
        peaks: the peak memory (bytes above what was allocated before) of each.
        available: memory the batch may use (bytes).
        safety: fraction of ``available`` to fill.
        cap: largest size returned.

    Returns:
        A size in ``[1, cap]``. The line through the two points gives a fixed part and a
        part per image; where the slope is not positive (noise, or memory that does not
        grow with the batch) the larger probe's peak per image is used instead, which
        counts the fixed part once per image and so errs on the small side.
    """
    (n0, n1), (p0, p1) = sizes, peaks
    budget = safety * available
    slope = (p1 - p0) / (n1 - n0) if n1 != n0 else 0.0
    if slope > 0:
        fixed = max(p1 - slope * n1, 0.0)
        size = (budget - fixed) / slope
    else:
        per_image = p1 / n1 if p1 > 0 else 0.0
        size = budget / per_image if per_image > 0 else float(cap)
    if not math.isfinite(size):
        return cap
    return max(1, min(cap, int(size)))


def _free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def probe_cuda(run: Callable[[int], Any], device: str) -> int:
    """Size a batch for ``device`` from the peak memory of ``run`` on small batches.

    Args:
        run: does the real work (explain + score, results thrown away) on ``n``
            synthetic images; called with each of :data:`PROBE_SIZES`.
        device: a CUDA device.

    Returns:
        :func:`estimate_batch_size` of the measured peaks and the free memory (the
        driver's free memory plus what PyTorch holds cached but unused). A probe that
        runs out of memory itself gives the last size that fitted (1 at least).
    """
    dev = torch.device(device)
    peaks: list[float] = []
    for n in PROBE_SIZES:
        _free_memory(device)
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        failed = False
        try:
            run(n)
            torch.cuda.synchronize(dev)
        except torch.OutOfMemoryError:
            failed = True
        if failed:
            _free_memory(device)
            size = max(1, PROBE_SIZES[0] if peaks else PROBE_SIZES[0] // 2)
            logger.warning("batch size probe ran out of memory at %d images on %s", n, device)
            return size
        peaks.append(float(torch.cuda.max_memory_allocated(dev) - before))
    _free_memory(device)
    free, _total = torch.cuda.mem_get_info(dev)
    unused = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    size = estimate_batch_size(PROBE_SIZES, peaks, float(free + unused))
    logger.info(
        "batch size auto on %s: %d (peaks %s MiB at %s images, %.0f MiB free)",
        device,
        size,
        [round(p / 2**20) for p in peaks],
        list(PROBE_SIZES),
        (free + unused) / 2**20,
    )
    return size


def initial_batch_size(
    config: RunConfig, key: SizeKey, device: str, probe: Callable[[int], Any]
) -> int:
    """The batch size a shard starts with.

    An int ``batch_size`` is used as given, unless a smaller size was learnt for ``key``
    (an earlier batch ran out of memory); ``"auto"`` takes the remembered size, else
    :func:`probe_cuda` on a CUDA device (then remembered) or :data:`CPU_BATCH_SIZE`.
    """
    known = remembered_batch_size(key)
    if config.batch_size != "auto":
        return config.batch_size if known is None else min(config.batch_size, known)
    if known is not None:
        return known
    if not device.startswith("cuda"):
        return CPU_BATCH_SIZE
    return remember_batch_size(key, probe_cuda(probe, device))


class BatchSizer:
    """Runs a batch in chunks of at most :attr:`size` images, halving on out-of-memory.

    Args:
        size: the largest chunk to try.
        key: where the learnt size is remembered (:func:`remember_batch_size`).
        device: where the work runs (its cached memory is freed after an error).
        what: how log lines and errors name the work (e.g. the shard).
    """

    def __init__(self, size: int, key: SizeKey, device: str, what: str = "") -> None:
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self.size = size
        self.key = key
        self.device = device
        self.what = what

    def run(self, count: int, work: Callable[[int, int], T]) -> list[T]:
        """``work(start, stop)`` over ``[0, count)`` in consecutive chunks, in order.

        A chunk that raises :class:`torch.OutOfMemoryError` is run again as two halves
        (the first the larger), and :attr:`size` becomes that half for every later chunk.

        Returns:
            The results of the chunks that succeeded, in order (they cover every index).

        Raises:
            BatchOutOfMemoryError: a chunk of one image ran out of memory.
        """
        results: list[T] = []
        start = 0
        while start < count:
            stop = min(start + self.size, count)
            try:
                result = work(start, stop)
            except torch.OutOfMemoryError as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if stop - start <= 1:
                    raise BatchOutOfMemoryError(
                        f"out of memory on {self.device} with a single image{self._where()}: "
                        f"{reason}. Free memory on the device or use a smaller input size or "
                        "fewer methods"
                    ) from exc
            else:
                results.append(result)
                start = stop
                continue
            # Outside the except block: the error's frames (and their tensors) are gone.
            _free_memory(self.device)
            tried = stop - start
            self.size = remember_batch_size(self.key, (tried + 1) // 2)
            logger.warning(
                "out of memory on %s with %d images%s; batch size %d from now on (%s)",
                self.device,
                tried,
                self._where(),
                self.size,
                reason,
            )
        return results

    def _where(self) -> str:
        return f" ({self.what})" if self.what else ""
