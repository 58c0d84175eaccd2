"""A class prior for Opti-CAM: the channel weights earlier images of each class ended at.

Opti-CAM optimizes, per image, the channel weights ``softmax(u)`` of a layer's feature
maps. Images of one class tend to end at similar weights, so a run that has explained a
few images of a class can start the next ones there instead of at the uniform weights
(``u = 0``) and reach the same objective in fewer steps.

A :class:`ClassPrior` holds, for one model and one layer, the sum of the final weights
``softmax(u*)`` of the images explained for each class and their count; the prior of a
class is the mean (its weights sum to 1). Sums, not means, so that priors built apart
(one per shard, say) add up exactly to the prior of all their images: :meth:`merge`.

The start it gives an image of class ``c`` is ``u0 = log(p_c + floor / K)``, centred,
with ``p_c`` the class's prior weights, ``K`` the channel count and ``floor`` 0.1 (as
for the Grad-CAM start): channels the prior gives no weight start small, not at minus
infinity. A class with no image behind it takes the fallback: ``uniform`` (``u0 = 0``, the
paper's start; the default) or ``mean`` (the mean of the classes' priors, each class
counted once). Uniform is the default because it measured better: on the demo, with a
prior of half the classes (3 images each) and the fast schedule, the unseen classes'
images scored AG 47.75 / 48.70 from the uniform start and 47.47 / 45.72 from the mean on
two seeds (``benchmarks/opticam_schedule.py``, "fallback check" rows).

Written to Parquet (:meth:`to_parquet_bytes`) as one row per class: ``class``,
``count``, ``sum`` (the K summed weights), with the model, the layer, the channel count
and the fallback in the file's metadata; the bytes depend on the values only.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from opticam.errors import UserError, short_repr
from opticam.methods.common import Explanation

__all__ = ["PRIOR_FALLBACKS", "PRIOR_FLOOR", "ClassPrior", "PriorError", "PriorFallback"]

PriorFallback = Literal["mean", "uniform"]
#: What a class with no image behind it starts from.
PRIOR_FALLBACKS: tuple[str, ...] = get_args(PriorFallback)
#: The part of the uniform weight ``1/K`` added to the prior's weights before the log.
PRIOR_FLOOR = 0.1

_META_KEY = b"opticam.class_prior"
_FORMAT = 1


class PriorError(UserError):
    """A class prior that does not fit the explainer, or a prior file that cannot be read."""


@dataclass
class ClassPrior:
    """Per-class sums of Opti-CAM's final channel weights, for one model and one layer.

    Attributes:
        model: the model the weights come from (a model source, e.g. ``"demo"``).
        layer: the target layer's name.
        sums: (num_classes, K) float64, the summed final weights of each class's images.
        counts: (num_classes,) int64, the number of images behind each class.
        fallback: the start of a class with no image: ``mean`` or ``uniform``.
        sample: how many images of each calibration shard (by name) are behind the prior,
            when a run built it (:mod:`opticam.pipeline.prior`); empty otherwise.
    """

    model: str
    layer: str
    sums: np.ndarray
    counts: np.ndarray
    fallback: PriorFallback = "uniform"
    sample: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the shapes, values and fallback; store the arrays as float64 and int64."""
        self.sums = np.asarray(self.sums, dtype=np.float64)
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if self.sums.ndim != 2 or self.counts.shape != self.sums.shape[:1]:
            raise PriorError(
                f"class prior: sums must be (classes, channels) and counts (classes,), got "
                f"{self.sums.shape} and {self.counts.shape}"
            )
        if self.sums.shape[0] < 1 or self.sums.shape[1] < 1:
            raise PriorError(f"class prior: empty sums {self.sums.shape}")
        if (self.counts < 0).any() or not np.isfinite(self.sums).all() or (self.sums < 0).any():
            raise PriorError("class prior: counts and sums must be finite and >= 0")
        if self.fallback not in PRIOR_FALLBACKS:
            raise PriorError(
                f"class prior: fallback must be one of {', '.join(PRIOR_FALLBACKS)}, got "
                f"{short_repr(self.fallback)}"
            )

    @classmethod
    def empty(
        cls,
        num_classes: int,
        channels: int,
        *,
        model: str,
        layer: str,
        fallback: PriorFallback = "uniform",
    ) -> ClassPrior:
        """A prior with no image behind any class."""
        return cls(
            model=model,
            layer=layer,
            sums=np.zeros((num_classes, channels)),
            counts=np.zeros(num_classes, dtype=np.int64),
            fallback=fallback,
        )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return int(self.sums.shape[0])

    @property
    def channels(self) -> int:
        """Number of channels ``K`` of the layer."""
        return int(self.sums.shape[1])

    def update(
        self, weights: Explanation | Tensor | np.ndarray, targets: Tensor | Iterable[int]
    ) -> None:
        """Add the final weights of explained images to their classes.

        Args:
            weights: an Opti-CAM :class:`~opticam.methods.Explanation` (its
                ``channel_weights``), or (B, K) final channel weights ``softmax(u*)``.
            targets: (B,) the class each image was explained for.

        Raises:
            PriorError: a shape or class that does not fit this prior, or an explanation
                without channel weights (a method other than Opti-CAM).
        """
        if isinstance(weights, Explanation):
            if weights.channel_weights is None:
                raise PriorError("class prior: the explanation has no channel weights")
            weights = weights.channel_weights
        w = _numpy(weights).astype(np.float64)
        t = self._classes(targets)
        if w.ndim != 2 or w.shape[1] != self.channels or w.shape[0] != t.shape[0]:
            raise PriorError(
                f"class prior: weights {w.shape} and targets {t.shape} do not fit a prior of "
                f"{self.channels} channels"
            )
        # One image at a time, in order: the sums do not depend on how images are batched.
        for row, cls in zip(w, t, strict=True):
            self.sums[cls] += row
            self.counts[cls] += 1

    def merge(self, other: ClassPrior) -> ClassPrior:
        """The prior of both priors' images (same model, layer, classes and channels)."""
        if (other.model, other.layer, other.sums.shape) != (
            self.model,
            self.layer,
            self.sums.shape,
        ):
            raise PriorError(
                f"class priors of {short_repr(self.model)} {short_repr(self.layer)} "
                f"{self.sums.shape} and {short_repr(other.model)} {short_repr(other.layer)} "
                f"{other.sums.shape} cannot be merged"
            )
        return ClassPrior(
            model=self.model,
            layer=self.layer,
            sums=self.sums + other.sums,
            counts=self.counts + other.counts,
            fallback=self.fallback,
            sample={
                name: self.sample.get(name, 0) + other.sample.get(name, 0)
                for name in sorted({*self.sample, *other.sample})
            },
        )

    def class_weights(self) -> np.ndarray:
        """(num_classes, K) mean final weights per class; NaN rows for unseen classes."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums / self.counts[:, None].astype(np.float64)

    def fallback_weights(self) -> np.ndarray | None:
        """(K,) weights of an unseen class, or None for the uniform start."""
        seen = self.counts > 0
        if self.fallback == "uniform" or not seen.any():
            return None
        return np.asarray(self.class_weights()[seen].mean(axis=0))

    def seen(self, targets: Tensor | Iterable[int]) -> np.ndarray:
        """(B,) whether each target class has an image behind it (else: the fallback)."""
        return np.asarray(self.counts[self._classes(targets)] > 0)

    def start(self, targets: Tensor, floor: float = PRIOR_FLOOR) -> Tensor:
        """``u0`` (B, K) for images explained for ``targets``, on the targets' device.

        ``log(p + floor / K)`` centred per image, with ``p`` the class's mean weights,
        or the fallback's for a class without images (all zeros for ``uniform``).
        """
        classes = self._classes(targets)
        means = self.class_weights()
        fallback = self.fallback_weights()
        u0 = np.zeros((classes.size, self.channels))
        for i, cls in enumerate(classes):
            weights = means[cls] if self.counts[cls] > 0 else fallback
            if weights is not None:
                row = np.log(weights + floor / self.channels)
                u0[i] = row - row.mean()
        return torch.as_tensor(u0, dtype=torch.float32, device=targets.device)

    def _classes(self, targets: Tensor | Iterable[int]) -> np.ndarray:
        """``targets`` as a 1-D int64 array of this prior's classes.

        Raises:
            PriorError: a target outside ``0..num_classes - 1``.
        """
        raw = _numpy(targets) if isinstance(targets, Tensor) else np.asarray(list(targets))
        classes = raw.astype(np.int64).reshape(-1)
        if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise PriorError(
                f"class prior: a target outside 0..{self.num_classes - 1}: "
                f"{int(classes.min())}..{int(classes.max())}"
            )
        return classes

    def check_fits(self, *, channels: int, model: str | None = None, layer: str | None) -> None:
        """Refuse to start an explainer of another layer, model or channel count.

        Raises:
            PriorError: naming what the prior was built for and what it is used with.
        """
        mismatches = []
        if channels != self.channels:
            mismatches.append(f"{self.channels} channels, the layer has {channels}")
        if model is not None and model != self.model:
            mismatches.append(f"model {short_repr(self.model)}, this is {short_repr(model)}")
        if layer is not None and layer != self.layer:
            mismatches.append(f"layer {short_repr(self.layer)}, this is {short_repr(layer)}")
        if mismatches:
            raise PriorError("the class prior was built for " + "; ".join(mismatches))

    def to_parquet_bytes(self) -> bytes:
        """The prior as a Parquet file: one row per class (``class``, ``count``, ``sum``)."""
        meta = {
            "format": _FORMAT,
            "model": self.model,
            "layer": self.layer,
            "channels": self.channels,
            "fallback": self.fallback,
            # Only when set: priors built outside a run keep the bytes they had before.
            **({"sample": dict(sorted(self.sample.items()))} if self.sample else {}),
        }
        table = pa.table(
            {
                "class": pa.array(np.arange(self.num_classes), pa.int64()),
                "count": pa.array(self.counts, pa.int64()),
                "sum": pa.array(list(self.sums), pa.list_(pa.float64(), self.channels)),
            }
        ).replace_schema_metadata({_META_KEY: json.dumps(meta, sort_keys=True).encode()})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd", write_statistics=False)
        return buffer.getvalue()

    @classmethod
    def from_parquet_bytes(cls, data: bytes, *, source: str = "class prior") -> ClassPrior:
        """Read a prior written by :meth:`to_parquet_bytes`.

        Raises:
            PriorError: the bytes are not such a file (``source`` names it in the message).
        """
        try:
            table = pq.read_table(io.BytesIO(data))
            meta = json.loads((table.schema.metadata or {})[_META_KEY])
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {_FORMAT}")
            classes = table.column("class").to_numpy()
            if not np.array_equal(classes, np.arange(len(classes))):
                raise ValueError("the classes are not 0..C-1 in order")
            sums = np.array(table.column("sum").to_pylist(), dtype=np.float64)
            counts = table.column("count").to_numpy()
            if sums.ndim != 2 or sums.shape[1] != int(meta["channels"]):
                raise ValueError(f"sums of shape {sums.shape}, {meta['channels']} channels")
            return cls(
                model=str(meta["model"]),
                layer=str(meta["layer"]),
                sums=sums,
                counts=counts,
                fallback=meta["fallback"],
                sample={str(k): int(v) for k, v in meta.get("sample", {}).items()},
            )
        except PriorError:
            raise
        except Exception as err:  # pyarrow, json and KeyError all mean "not a prior"
            raise PriorError(f"{source} is not a readable class prior ({err})") from err


def _numpy(value: Tensor | np.ndarray | Iterable[int]) -> np.ndarray:
    """``value`` as a NumPy array on the CPU."""
    if isinstance(value, Tensor):
        return np.asarray(value.detach().cpu().numpy())
    return np.asarray(value)
