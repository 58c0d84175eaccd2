"""The unit of work: explain and score every image of one shard, write one Parquet file.

:func:`process_shard` is plain Python (no Prefect): the flows call it once per shard, and
so can a notebook, a test or another orchestrator. For one shard it

1. loads the model (cached per (model spec, device) in this process),
2. streams the shard (:class:`opticam.data.ShardReader`), preprocesses to the model's
   input size and batches with overlapped loading (:func:`opticam.data.iter_batches`),
3. per batch: picks the class explained (``target="label"``: the ground truth, samples
   without one become errors; ``"predicted"``: the argmax of the clean logits), computes the
   clean probabilities once, then per method: the explanation, the AD/AG/AI terms,
   insertion/deletion with the predicted class (the paper's protocol) and localization
   for samples with boxes,
4. writes ``errors/<shard>.parquet`` (always, possibly empty) and then
   ``shards/<shard>.parquet`` (last: its presence means "done"), both atomically.

Bad data never stops a shard: unreadable samples are error rows (from the data layer), a
method that raises on a batch costs error rows with stage ``"explain"`` for that batch's
images and the other methods go on. A truncated shard is written with what could be read
and flagged (``complete=False`` in the shard status, plus an ``"incomplete"`` error row).
A shard that cannot be opened at all raises :class:`ShardUnavailableError` (an
``OSError``, so an orchestrator may retry it) after writing its errors file, and gets no
rows file, so a rerun tries it again.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from opticam import store
from opticam.config import RunConfig
from opticam.data.types import STAGE_LABEL, STAGE_OPEN

__all__ = [
    "ShardResult",
    "ShardUnavailableError",
    "check_methods",
    "clear_model_cache",
    "done_result",
    "get_loaded_model",
    "local_devices",
    "pending_shards",
    "plan_shards",
    "preflight",
    "process_shard",
    "resolve_device",
    "run_url_of",
]

logger = logging.getLogger(__name__)

STAGE_EXPLAIN = "explain"  # a method raised on a batch
STAGE_INCOMPLETE = "incomplete"  # the shard was not read to its end

ProgressFn = Callable[[int], None]


class ShardUnavailableError(OSError):
    """A shard could not be opened at all (possibly transient: network, permissions)."""


@dataclass
class ShardResult:
    """Summary of one processed shard (small: safe to return from a Prefect task).

    Attributes:
        shard: shard URL.
        name: its file name in the run (:func:`opticam.store.shard_name`).
        rows_url: URL of the rows file.
        errors_url: URL of the errors file.
        complete: False when the tar was truncated or unreadable.
        n_samples: samples read (bad ones included).
        n_images: images that got at least one row.
        n_rows: rows written.
        n_errors: error rows written.
        seconds: wall time.
        device: where it ran.
        skipped: True when the shard was already done and nothing was computed.
    """

    shard: str
    name: str
    rows_url: str
    errors_url: str
    complete: bool = True
    n_samples: int = 0
    n_images: int = 0
    n_rows: int = 0
    n_errors: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields."""
        return asdict(self)


# --------------------------------------------------------------------------- devices


def local_devices() -> list[str]:
    """Every local CUDA device (``cuda:0``, ``cuda:1``...), or ``["cpu"]`` without one."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def resolve_device(spec: str) -> list[str]:
    """The devices a ``RunConfig.device`` value stands for, one entry per worker slot.

    ``auto`` -> every local GPU, else the CPU; ``cuda`` -> every local GPU; ``cpu``,
    ``cuda:N`` and ``mps`` -> themselves (the CPU counts as one device).

    Raises:
        ValueError: a CUDA device that this machine does not have.
    """
    if spec == "auto":
        return local_devices()
    if spec.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if spec == "cuda":
            if count == 0:
                raise ValueError("device 'cuda' asked for, but no CUDA device is available")
            return [f"cuda:{i}" for i in range(count)]
        index = int(spec.split(":", 1)[1])
        if index >= count:
            raise ValueError(
                f"device {spec!r} asked for, but this machine has {count} CUDA device(s)"
            )
    return [spec]


# --------------------------------------------------------------------------- models

_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def get_loaded_model(config: RunConfig, device: str) -> Any:
    """The config's model on ``device``, loaded once per process (thread-safe).

    Returns:
        :class:`opticam.models.LoadedModel`.
    """
    from opticam.models import load_model

    key = (config.model.model_dump_json(), device)
    with _MODELS_LOCK:
        loaded = _MODELS.get(key)
        if loaded is None:
            loaded = load_model(config.model, device, storage_options=config.data_options())
            _MODELS[key] = loaded
        return loaded


def clear_model_cache() -> None:
    """Forget every cached model (frees their memory once nothing else holds them)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def _explainers(config: RunConfig, loaded: Any) -> dict[str, Any]:
    from opticam.methods import get_explainer

    return {m.name: get_explainer(m.name, loaded, **m.options) for m in config.methods}


def check_methods(config: RunConfig, device: str | None = None) -> None:
    """Fail early on a bad model or method option, before any shard is read.

    Loads (and caches) the model on ``device`` and builds every explainer.

    Raises:
        ValueError: unknown option or bad value, unknown target layer, bad model spec.
    """
    device = device or resolve_device(config.device)[0]
    _explainers(config, get_loaded_model(config, device))


# --------------------------------------------------------------------------- planning


def run_url_of(config: RunConfig) -> str:
    """The run folder URL of a config: ``<output>/<run_id>``."""
    return store.run_url(config.output, config.run_id)


def plan_shards(config: RunConfig) -> list[dict[str, Any]]:
    """Expand the data spec and split ``max_images`` over the shards.

    With ``max_images = N`` over ``S`` shards, shard ``i`` (in expansion order) may read
    ``N // S + (1 if i < N % S else 0)`` images, so the run reads ``N`` images when every
    shard holds enough, spread over the dataset instead of the first shards only; shards
    with a zero share are left out of the plan.

    Returns:
        One dict per shard: ``url``, ``name`` (:func:`opticam.store.shard_name`),
        ``max_images`` (None without a limit).

    Raises:
        opticam.data.NoShardsError: the data spec matches no shard.
    """
    from opticam.data import expand_shards

    urls = expand_shards(config.data, storage_options=config.data_options())
    plan: list[dict[str, Any]] = []
    n, s = config.max_images, len(urls)
    for i, url in enumerate(urls):
        limit = None if n is None else n // s + (1 if i < n % s else 0)
        if limit == 0:
            continue
        plan.append({"url": url, "name": store.shard_name(url), "max_images": limit})
    return plan


def preflight(config: RunConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Every check that can fail on bad input, before any work or orchestration starts.

    Expands the data spec (:func:`plan_shards`), resolves the devices, loads the model and
    builds the explainers (:func:`check_methods`), and checks that the run folder holds
    no other job. Cheap to repeat: the model stays cached.

    Returns:
        ``(plan, devices)``.

    Raises:
        opticam.data.NoShardsError, ValueError, opticam.store.RunCollisionError,
        FileNotFoundError: what was wrong, in one message.
    """
    plan = plan_shards(config)
    devices = resolve_device(config.device)
    check_methods(config, devices[0])
    store.check_run_json(run_url_of(config), config, config.output_options())
    return plan, devices


# --------------------------------------------------------------------------- the shard


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


def _label_problem(label: int, num_classes: int) -> str | None:
    """Why a ground-truth label cannot be explained (None when it can)."""
    if label < 0:
        return "no label (target='label' needs one; target='predicted' does not)"
    if label >= num_classes:
        return f"label {label} outside the model's {num_classes} classes (0..{num_classes - 1})"
    return None


def _opt_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _encode_map(
    saliency: np.ndarray | None,
    full_map: np.ndarray,
    normalization: str | None,
    want_full: bool,
) -> tuple[bytes, list[int], str]:
    """(bytes, shape, kind) of one map, preferring the compact low-resolution form."""
    if saliency is not None and not want_full and normalization is not None:
        data = store.encode_lowres(saliency, normalization)
        if data is not None:
            return data, [int(saliency.shape[0]), int(saliency.shape[1])], "lowres"
    return (
        store.encode_full_png(full_map),
        [int(full_map.shape[0]), int(full_map.shape[1])],
        "full_png",
    )


@dataclass
class _BatchContext:
    keys: list[str]
    images: torch.Tensor  # (B,3,H,W) on the device
    labels: list[int | None]
    predicted: torch.Tensor  # (B,) long, on the device
    targets: torch.Tensor  # (B,) long, on the device
    p_clean: torch.Tensor  # (B,) float, on the device
    boxes: list[torch.Tensor]  # B tensors (n_i, 4) on the device
    has_boxes: bool


def _method_rows(
    config: RunConfig,
    loaded: Any,
    method: str,
    explainer: Any,
    batch: _BatchContext,
    shard: str,
) -> list[dict[str, Any]]:
    """Explain and score one batch with one method; one row per image."""
    from opticam.metrics import faithfulness_terms, insertion_deletion, localization

    images, targets = batch.images, batch.targets
    explanation = explainer(images, targets)
    maps = explanation.maps.detach()
    terms = faithfulness_terms(loaded.model, images, maps, targets, p_clean=batch.p_clean)
    metrics_cfg = config.metrics
    curves: dict[str, torch.Tensor] = {}
    if metrics_cfg.insertion_deletion:
        options: dict[str, Any] = {
            "steps": metrics_cfg.steps,
            "deletion_baseline": metrics_cfg.deletion_baseline,
        }
        if metrics_cfg.blur_sigma is not None:
            options["blur_sigma"] = metrics_cfg.blur_sigma
        if metrics_cfg.blur_kernel is not None:
            options["blur_kernel"] = metrics_cfg.blur_kernel
        curves = insertion_deletion(loaded.model, images, maps, batch.predicted, **options)
    loc: dict[str, torch.Tensor] = {}
    if metrics_cfg.localization and batch.has_boxes:
        loc = localization(maps, batch.boxes)

    # One transfer per quantity per batch, not per image.
    host = {k: v.detach().float().cpu().numpy() for k, v in terms.items()}
    host_curves = {k: v.detach().float().cpu().numpy() for k, v in curves.items()}
    host_loc = {k: v.detach().float().cpu().numpy() for k, v in loc.items()}
    maps_np = maps[:, 0].float().cpu().numpy()
    low = explanation.saliency
    low_np = low[:, 0].detach().float().cpu().numpy() if low is not None else None
    diag = explanation.diagnostics
    iterations = diag["iterations"].cpu().numpy() if "iterations" in diag else None
    constant = diag["constant_map"].cpu().numpy() if "constant_map" in diag else None
    normalization = getattr(explainer, "normalization", None)
    predicted = batch.predicted.cpu().numpy()
    target_np = targets.cpu().numpy()
    size = len(batch.keys)
    seconds = float(explanation.seconds) / max(size, 1)
    want_full = config.maps == "full_png"
    layer = None if method == "fakecam" else loaded.target_layer_name
    height, width = int(images.shape[-2]), int(images.shape[-1])

    rows = []
    for i, key in enumerate(batch.keys):
        blob, shape, kind = _encode_map(
            None if low_np is None else low_np[i], maps_np[i], normalization, want_full
        )
        row: dict[str, Any] = {
            "run_id": config.run_id,
            "shard": shard,
            "key": key,
            "method": method,
            "model": loaded.name,
            "target_layer": layer,
            "label": batch.labels[i],
            "predicted": int(predicted[i]),
            "target": int(target_np[i]),
            "p_clean": float(host["p_clean"][i]),
            "p_masked": float(host["p_masked"][i]),
            "drop": float(host["drop"][i]),
            "gain": float(host["gain"][i]),
            "increase": float(host["increase"][i]),
            "insertion_auc": float(host_curves["insertion_auc"][i]) if host_curves else None,
            "deletion_auc": float(host_curves["deletion_auc"][i]) if host_curves else None,
            "insertion_curve": (
                host_curves["insertion_curve"][i].tolist()
                if host_curves and metrics_cfg.save_curves
                else None
            ),
            "deletion_curve": (
                host_curves["deletion_curve"][i].tolist()
                if host_curves and metrics_cfg.save_curves
                else None
            ),
            "iterations": None if iterations is None else int(iterations[i]),
            "constant_map": bool(constant[i]) if constant is not None else False,
            "seconds": seconds,
            "saliency": blob,
            "saliency_shape": shape,
            "saliency_kind": kind,
            "input_height": height,
            "input_width": width,
            # Stored maps are already normalized for methods without a low-res form.
            "normalization": normalization if kind == "lowres" else (normalization or "none"),
        }
        for name in ("pointing_game", "energy_in_box", "f1", "loc_error", "box_acc"):
            row[name] = _opt_float(float(host_loc[name][i])) if name in host_loc else None
        rows.append(row)
    return rows


def process_shard(
    config: RunConfig,
    shard_url: str,
    device: str | None = None,
    *,
    max_images: int | None = None,
    on_progress: ProgressFn | None = None,
) -> ShardResult:
    """Explain and score one shard and write its rows and errors files (see module doc).

    Args:
        config: the job.
        shard_url: URL of one shard (as returned by :func:`plan_shards`).
        device: ``"cpu"``, ``"cuda:N"``...; None means the first of ``config.device``.
        max_images: read at most this many samples from this shard (the planner's share
            of ``config.max_images``), or None.
        on_progress: called with the number of images of each finished batch.

    Returns:
        A :class:`ShardResult`.

    Raises:
        ShardUnavailableError: the shard could not be opened (errors file written first).
        OSError: writing the output failed (worth retrying).
    """
    from opticam.data import ErrorRecord, Preprocess, ShardReader, iter_batches

    start = time.perf_counter()
    device = device or resolve_device(config.device)[0]
    run = run_url_of(config)
    name = store.shard_name(shard_url)
    out_options = config.output_options()
    loaded = get_loaded_model(config, device)
    explainers = _explainers(config, loaded)

    reader = ShardReader(
        shard_url,
        storage_options=config.data_options(),
        require_label=config.target == "label",
    )
    preprocess = Preprocess(loaded.input_size, loaded.resize_size)
    state = {"limit_reached": False}
    extra_errors: list[Any] = []
    rows: list[dict[str, Any]] = []
    images_with_rows: set[str] = set()
    model = loaded.model

    batches = iter_batches(
        _limited(reader, max_images, state),
        preprocess,
        config.batch_size,
        errors=extra_errors,
        pin_memory=device.startswith("cuda"),
    )
    try:
        for batch in batches:
            labels = [int(v) for v in batch.labels.tolist()]
            keep = list(range(len(batch.keys)))
            if config.target == "label":
                keep = []
                for i, v in enumerate(labels):
                    problem = _label_problem(v, loaded.num_classes)
                    if problem is None:
                        keep.append(i)
                    else:
                        extra_errors.append(
                            ErrorRecord(shard_url, batch.keys[i], STAGE_LABEL, problem)
                        )
                if not keep:
                    if on_progress is not None:
                        on_progress(len(batch.keys))
                    continue
            cpu_images = batch.images
            if len(keep) < len(batch.keys):
                cpu_images = cpu_images.index_select(0, torch.tensor(keep, dtype=torch.long))
            # Pinned batches (CUDA) copy asynchronously while the host builds the context.
            images = cpu_images.to(device, non_blocking=True)
            boxes = [batch.boxes[i].to(device) for i in keep]
            with torch.no_grad():
                probs = torch.softmax(model(images).float(), dim=1)
            predicted = probs.argmax(dim=1)
            if config.target == "label":
                targets = torch.tensor([labels[i] for i in keep], device=device)
            else:
                targets = predicted
            context = _BatchContext(
                keys=[batch.keys[i] for i in keep],
                images=images,
                labels=[labels[i] if labels[i] >= 0 else None for i in keep],
                predicted=predicted,
                targets=targets,
                p_clean=probs.gather(1, targets.view(-1, 1)).squeeze(1),
                boxes=boxes,
                has_boxes=any(b.numel() > 0 for b in boxes),
            )
            for method, explainer in explainers.items():
                try:
                    method_rows = _method_rows(
                        config, loaded, method, explainer, context, shard_url
                    )
                except Exception as exc:  # one method's failure must not stop the others
                    logger.warning("method %s failed on a batch of %s: %s", method, name, exc)
                    message = f"{method}: {type(exc).__name__}: {exc}"
                    extra_errors.extend(
                        ErrorRecord(shard_url, key, STAGE_EXPLAIN, message) for key in context.keys
                    )
                    continue
                rows.extend(method_rows)
                images_with_rows.update(context.keys)
            if on_progress is not None:
                on_progress(len(batch.keys))
    finally:
        # Stops the loading thread also when a batch raised.
        close = getattr(batches, "close", None)
        if close is not None:
            close()

    errors = list(reader.errors) + extra_errors
    opened = not any(e.stage == STAGE_OPEN for e in reader.errors)
    complete = reader.complete or state["limit_reached"]
    status = store.ShardStatus(
        shard=shard_url,
        name=name,
        complete=complete,
        n_samples=reader.n_samples,
        n_images=len(images_with_rows),
        n_rows=len(rows),
        max_images=max_images,
        limit_reached=state["limit_reached"],
        device=device,
        resize_size=loaded.resize_size,
    )
    if opened and not complete:
        errors.append(
            ErrorRecord(
                shard_url,
                None,
                STAGE_INCOMPLETE,
                f"shard not read to its end: rows hold the {reader.n_samples} samples read",
            )
        )
    status.n_errors = len(errors)
    status.seconds = time.perf_counter() - start
    status.finished = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    errors_file = store.write_errors(run, config.run_id, errors, status, out_options)
    rows_file = store.shard_url(run, shard_url)
    if not opened and reader.n_samples == 0:
        reason = next(e.message for e in reader.errors if e.stage == STAGE_OPEN)
        raise ShardUnavailableError(f"shard {shard_url!r} could not be opened: {reason}")
    table = store.rows_to_table(rows)
    store.write_shard(run, table, status, out_options)
    return ShardResult(
        shard=shard_url,
        name=name,
        rows_url=rows_file,
        errors_url=errors_file,
        complete=complete,
        n_samples=reader.n_samples,
        n_images=len(images_with_rows),
        n_rows=len(rows),
        n_errors=len(errors),
        seconds=status.seconds,
        device=device,
    )


def done_result(config: RunConfig, shard_url: str) -> ShardResult:
    """A :class:`ShardResult` for a shard that is already done (``skipped=True``)."""
    run = run_url_of(config)
    return ShardResult(
        shard=shard_url,
        name=store.shard_name(shard_url),
        rows_url=store.shard_url(run, shard_url),
        errors_url=store.errors_url(run, shard_url),
        skipped=True,
    )


def pending_shards(config: RunConfig, plan: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The planned shards whose rows file does not exist yet."""
    done = set(store.list_done_shards(run_url_of(config), config.output_options()))
    return [p for p in plan if p["name"] not in done]
