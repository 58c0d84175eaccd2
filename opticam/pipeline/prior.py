"""The class prior in a run: the calibration walk, the prior file, and what a shard reads of it.

A job whose Opti-CAM method starts from the class prior (``start: prior``, or ``preset:
prior``; :class:`opticam.methods.prior.ClassPrior`) runs in two stages, in both executors:

1. **Calibration.** The planned shards are walked in plan order. In each, every image
   whose class (the job's ``target``: its label or its predicted class) has fewer than
   ``prior_per_class`` calibration images so far joins the sample, and is explained by
   every method of the job, Opti-CAM at the paper's setting (100 steps of lr 0.1 from the
   uniform start). Its rows go to ``calibration/<name>.parquet`` with ``prior_role`` set
   to ``calibration`` and, for Opti-CAM, the final channel weights; the file's metadata
   holds the class counts of the sample so far. The walk stops after the shard at which
   every class of the model has its images; after a shard that added no image to the
   sample (every class it holds is full: the dataset has shown all its classes, or a
   class never comes, say one the model never predicts); or at the last shard. A class
   first met after the walk stopped takes the fallback.

   *Why the first images of each class rather than the first shards:* every class gets
   the same number of images whatever order the dataset is in (the first shards of a
   dataset sorted by class hold a few classes only), and the sample depends on the data,
   the plan order and the options alone: not on the executor, the devices or the batch
   size. The price: the walk is sequential, one shard after the other, and it reads a
   shard whose classes are all full already only to learn that.
2. **The prior.** One :class:`~opticam.methods.prior.ClassPrior` per calibration file (the
   sums of its Opti-CAM rows' weights), merged in plan order and written once, atomically,
   to ``prior/<layer>.parquet``. The same calibration files give the same bytes.
3. **The rest.** Every shard is computed as usual (:func:`opticam.pipeline.process_shard`),
   except that the rows of its calibration images are taken from its calibration file
   (never computed again) and Opti-CAM starts every other image from its class's prior,
   or from the fallback when the sample has no image of its class. Each Opti-CAM row says
   which (``prior_role``: ``prior`` or ``fallback``) and holds the prior file's SHA-256, as
   does the shard's status.

A rerun reuses what exists: the prior file when it is there (refused with a one-line
:class:`~opticam.methods.prior.PriorError` when it cannot be read or does not fit the
model), else the calibration files written so far, whose last one says where the walk
stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from opticam import store
from opticam.config import MethodSpec, OptiCAMOptions, RunConfig
from opticam.data import ErrorRecord
from opticam.errors import short_repr
from opticam.methods.prior import ClassPrior, PriorError, PriorFallback
from opticam.names import OPTICAM_SCHEDULE, resolve_opticam_preset
from opticam.redact import redact_url
from opticam.store.layout import filesystem

__all__ = [
    "CALIBRATION_KEY",
    "PRIOR_METHOD",
    "PriorSettings",
    "ShardPrior",
    "calibration_methods",
    "layer_channels",
    "prior_of_rows",
    "prior_settings",
    "read_calibration",
    "read_checked_prior",
    "read_prior",
    "shard_prior",
    "walk_calibration",
]

#: The method whose start the prior is: Opti-CAM.
PRIOR_METHOD = "opticam"
#: Key of the calibration metadata (JSON) of a calibration file.
CALIBRATION_KEY = b"opticam.calibration"
# The Opti-CAM options that only say how to start or run the optimization: a calibration
# image drops them all and so runs at the paper's setting.
_SCHEDULE_OPTIONS = frozenset(OPTICAM_SCHEDULE) | {"preset", "prior_per_class", "prior_fallback"}


@dataclass(frozen=True)
class PriorSettings:
    """The prior options of a job (from its Opti-CAM method's options).

    Attributes:
        per_class: calibration images per class (``prior_per_class``).
        fallback: start of a class without calibration images (``prior_fallback``).
    """

    per_class: int
    fallback: PriorFallback


def prior_settings(config: RunConfig) -> PriorSettings | None:
    """The job's prior settings, or None when its Opti-CAM method does not start from one."""
    for method in config.methods:
        if method.name != PRIOR_METHOD:
            continue
        options = OptiCAMOptions(**method.options)
        given = {k: getattr(options, k) for k in OPTICAM_SCHEDULE if k in options.model_fields_set}
        if resolve_opticam_preset(options.preset, given)["start"] == "prior":
            return PriorSettings(options.prior_per_class, options.prior_fallback)
    return None


def calibration_methods(config: RunConfig) -> list[MethodSpec]:
    """The job's methods as the calibration images run them: Opti-CAM at the paper's setting.

    Its other options (objective, score, normalization, tolerance, precision) stay.
    """
    return [
        MethodSpec(
            name=m.name,
            options={k: v for k, v in m.options.items() if k not in _SCHEDULE_OPTIONS},
        )
        if m.name == PRIOR_METHOD
        else m
        for m in config.methods
    ]


def layer_channels(loaded: Any) -> int:
    """Channels ``K`` of the loaded model's target layer (one forward of a blank image)."""
    import torch

    from opticam.methods.opticam import capture_features

    height, width = loaded.input_size
    device = next((p.device for p in loaded.model.parameters()), torch.device("cpu"))
    blank = torch.zeros((1, 3, height, width), device=device)
    features, _ = capture_features(
        loaded.model,
        loaded.target_layer,
        blank,
        reshape_transform=getattr(loaded, "reshape_transform", None),
    )
    return int(features.shape[1])


def prior_of_rows(
    rows: pa.Table | Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    channels: int,
    model: str,
    layer: str,
    fallback: PriorFallback,
) -> ClassPrior:
    """The prior of the calibration rows among ``rows`` (Opti-CAM rows with weights), in order."""
    prior = ClassPrior.empty(num_classes, channels, model=model, layer=layer, fallback=fallback)
    listed = rows.to_pylist() if isinstance(rows, pa.Table) else list(rows)
    picked = [
        r
        for r in listed
        if r["method"] == PRIOR_METHOD
        and r.get("prior_role") == "calibration"
        and r.get("channel_weights") is not None
    ]
    if picked:
        weights = np.array([r["channel_weights"] for r in picked], dtype=np.float32)
        prior.update(weights, [int(r["target"]) for r in picked])
    return prior


# --------------------------------------------------------------------------- files


@dataclass
class Calibration:
    """One shard's calibration file, read back.

    Attributes:
        rows: its rows (:data:`opticam.store.SCHEMA`).
        counts: calibration images per class of the sample up to this shard, included.
        keys: the keys of the shard's calibration images.
        errors: error records of the sample's images (a method that failed on one).
        read: False when the shard held no tar (nothing of it could join the sample).
    """

    rows: pa.Table
    counts: np.ndarray
    keys: set[str] = field(default_factory=set)
    errors: list[ErrorRecord] = field(default_factory=list)
    read: bool = True


def calibration_bytes(
    rows: list[dict[str, Any]],
    counts: np.ndarray,
    shard: str,
    errors: Sequence[ErrorRecord],
    *,
    read: bool = True,
) -> bytes:
    """A calibration file: the rows, the class counts of the sample so far, its errors."""
    meta = {
        "shard": redact_url(shard),
        "counts": [int(c) for c in counts],
        "errors": [[e.key, e.stage, e.message] for e in errors],
        "read": read,
    }
    table = store.rows_to_table(rows)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), CALIBRATION_KEY: json.dumps(meta).encode()}
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue()


def _read_bytes(url: str, storage_options: Mapping[str, Any] | None) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        return bytes(fs.cat_file(path))
    except FileNotFoundError:
        return None


def read_calibration(
    run: str, shard_url: str, storage_options: Mapping[str, Any] | None = None
) -> Calibration | None:
    """The shard's calibration file, or None when there is none or it cannot be read."""
    data = _read_bytes(store.calibration_url(run, shard_url), storage_options)
    if data is None:
        return None
    try:
        table = pq.read_table(io.BytesIO(data))
        meta = json.loads((table.schema.metadata or {})[CALIBRATION_KEY])
        counts = np.asarray(meta["counts"], dtype=np.int64)
        errors = [ErrorRecord(str(meta["shard"]), k, st, m) for k, st, m in meta["errors"]]
        table = table.cast(store.SCHEMA)
    except Exception:  # damaged in storage: the walk computes the shard again
        return None
    keys = {str(k) for k in table.column("key").to_pylist()} | {
        str(e.key) for e in errors if e.key is not None
    }
    read = bool(meta.get("read", True))
    return Calibration(rows=table, counts=counts, keys=keys, errors=errors, read=read)


def read_prior(
    run: str, layer: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[ClassPrior, str] | None:
    """``(prior, sha256 of its file)`` of the run's prior file, or None when there is none.

    Raises:
        PriorError: the file exists but is not a readable prior.
    """
    url = store.prior_url(run, layer)
    data = _read_bytes(url, storage_options)
    if data is None:
        return None
    prior = ClassPrior.from_parquet_bytes(data, source=f"the class prior {redact_url(url)}")
    return prior, hashlib.sha256(data).hexdigest()


def read_checked_prior(
    config: RunConfig, loaded: Any, channels: int
) -> tuple[ClassPrior, str] | None:
    """The run's prior file, read and checked against the model (None when it has none).

    Raises:
        PriorError: the file cannot be read, or was built for another model, layer, class
            count or channel count (``channels``: the layer's, :func:`layer_channels`).
    """
    run = store.run_url(config.output, config.run_id)
    layer = loaded.target_layer_name
    found = read_prior(run, layer, config.output_options())
    if found is not None:
        check_prior(found[0], loaded, channels, store.prior_url(run, layer))
    return found


def check_prior(prior: ClassPrior, loaded: Any, channels: int, url: str) -> None:
    """Refuse a prior file built for another model, layer, class or channel count.

    Raises:
        PriorError: one line naming the file, what it was built for, and what this is.
    """
    try:
        prior.check_fits(channels=channels, model=loaded.name, layer=loaded.target_layer_name)
        if prior.num_classes != loaded.num_classes:
            raise PriorError(
                f"the class prior was built for {prior.num_classes} classes, the model has "
                f"{loaded.num_classes}"
            )
    except PriorError as err:
        raise PriorError(
            f"{redact_url(url)}: {err}; delete it (and calibration/) to calibrate again"
        ) from None


# --------------------------------------------------------------------------- the walk

#: Runs the calibration of one planned shard (a plan dict) given the class counts so far;
#: it must leave the shard's calibration file written.
Calibrate = Callable[[dict[str, Any], list[int]], None]


def walk_calibration(
    config: RunConfig,
    plan: Sequence[dict[str, Any]],
    loaded: Any,
    calibrate: Calibrate,
) -> tuple[ClassPrior, str]:
    """Stage 1 and 2 of a prior job: the calibration walk and the prior file (module doc).

    Reuses the prior file when the run has one, and every calibration file written so
    far. ``calibrate`` computes a shard that has none (a task, or a flow run on a pool).

    Returns:
        ``(prior, sha256 of the prior file)``.

    Raises:
        PriorError: the prior file cannot be read or does not fit the model.
        RuntimeError: ``calibrate`` returned without writing the shard's file.
    """
    settings = prior_settings(config)
    assert settings is not None, "walk_calibration needs a job with a class prior"
    run = store.run_url(config.output, config.run_id)
    options = config.output_options()
    layer = loaded.target_layer_name
    channels = layer_channels(loaded)
    found = read_checked_prior(config, loaded, channels)
    if found is not None:
        return found
    counts = np.zeros(loaded.num_classes, dtype=np.int64)
    prior = ClassPrior.empty(
        loaded.num_classes,
        channels,
        model=loaded.name,
        layer=layer,
        fallback=settings.fallback,
    )
    sample: dict[str, int] = {}
    calibration: Calibration | None = None
    for item in plan:
        if bool((counts >= settings.per_class).all()) or _stalled(sample, calibration):
            break
        calibration = read_calibration(run, item["url"], options)
        if calibration is None:
            calibrate(item, [int(c) for c in counts])
            calibration = read_calibration(run, item["url"], options)
            if calibration is None:
                raise RuntimeError(
                    f"the calibration of shard {short_repr(redact_url(item['url']))} wrote no "
                    "readable file"
                )
        counts = calibration.counts
        prior = prior.merge(
            prior_of_rows(
                calibration.rows,
                num_classes=loaded.num_classes,
                channels=channels,
                model=loaded.name,
                layer=layer,
                fallback=settings.fallback,
            )
        )
        sample[item["name"]] = len(calibration.keys)
    prior.sample = sample
    data = prior.to_parquet_bytes()
    store.atomic_write_bytes(store.prior_url(run, layer), data, options)
    return prior, hashlib.sha256(data).hexdigest()


def _stalled(sample: dict[str, int], last: Calibration | None) -> bool:
    """Whether the walk stops: the shard just walked was read and added no image."""
    return last is not None and last.read and not last.keys and sum(sample.values()) > 0


# --------------------------------------------------------------------------- a shard


@dataclass
class ShardPrior:
    """What one shard of a prior job takes from the calibration (stage 3 of the module doc).

    Attributes:
        prior: the run's prior.
        sha256: its file's SHA-256.
        calibration: the shard's calibration file, None when the walk did not reach it
            (or its sample had no image of the shard).
    """

    prior: ClassPrior
    sha256: str
    calibration: Calibration | None

    @property
    def calibration_keys(self) -> set[str]:
        """Keys of the shard's images that are in the calibration sample."""
        return set() if self.calibration is None else self.calibration.keys

    def calibration_rows(self) -> list[dict[str, Any]]:
        """The rows of the shard's calibration images, as written by the walk."""
        return [] if self.calibration is None else self.calibration.rows.to_pylist()


def shard_prior(config: RunConfig, loaded: Any, shard_url: str) -> ShardPrior | None:
    """The prior and calibration rows a shard of ``config`` uses; None for a job without one.

    Raises:
        PriorError: the prior file is missing (the walk has not run), cannot be read, or
            was built for another model or layer; or the shard's calibration file,
            which the prior counts, is gone.
    """
    if prior_settings(config) is None:
        return None
    run = store.run_url(config.output, config.run_id)
    options = config.output_options()
    layer = loaded.target_layer_name
    found = read_prior(run, layer, options)
    if found is None:
        raise PriorError(
            f"no class prior at {redact_url(store.prior_url(run, layer))}: the calibration "
            "stage of the run writes it before any shard is computed"
        )
    prior, sha256 = found
    calibration = read_calibration(run, shard_url, options)
    expected = prior.sample.get(store.shard_name(shard_url), 0)
    if calibration is None and expected:
        raise PriorError(
            f"the calibration rows of shard {short_repr(redact_url(shard_url))} are gone "
            f"({expected} images of the prior's sample); delete "
            f"{redact_url(store.prior_url(run, layer))} to calibrate again"
        )
    return ShardPrior(prior=prior, sha256=sha256, calibration=calibration)
