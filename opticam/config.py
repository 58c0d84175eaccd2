"""One description of a job: what to explain, with which model and methods, scored how.

:class:`RunConfig` is shared by the CLI, the Prefect flows (it is their parameter, so the
Prefect UI renders a form for it) and the deployments. It is plain pydantic: importing
this module never imports Prefect or torch.

The run id (:attr:`RunConfig.run_id`) is derived from the *job description* alone:

    run_id = slug(data, model) + "-" + sha256(canonical_json(job))[:12]

where ``job`` holds the data spec, the model spec, the methods with their options, the
target class rule, the metric parameters, the map format and ``max_images``. Where the
output goes, the device, the batch size, the executor and the storage options are left
out: they change how a job runs, not what it computes. So rerunning the same command
resumes the same run folder, and changing a parameter that changes the results starts a
fresh one.

Storage options may hold credentials. They are excluded from every dump of the config
(``model_dump``, ``model_dump_json``, :meth:`RunConfig.public_dict`), from ``repr`` and
from the run id, so they never reach ``run.json``, logs, artifacts, or the parameters a
Prefect server stores for a flow run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from opticam.models import ModelSpec
from opticam.names import KNOWN_METHODS

__all__ = [
    "DEFAULT_OUTPUT",
    "MethodSpec",
    "MetricsOptions",
    "ModelSpec",
    "RunConfig",
    "normalize_url",
]

DEFAULT_OUTPUT = "./opticam-runs"


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
_SLUG_RE = re.compile(r"[^a-z0-9]+")


def normalize_url(url: str) -> str:
    """A URL in the one spelling used for hashing: local paths absolute, ``file://`` dropped.

    ``./shards/a.tar``, ``shards/a.tar`` (from the same folder) and
    ``file:///abs/shards/a.tar`` all become ``/abs/shards/a.tar``; other URLs
    (``s3://...``) are returned unchanged except for surrounding whitespace.
    """
    url = url.strip()
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url or url.startswith("pipe:"):
        return url
    return os.path.abspath(os.path.expanduser(url))


class MethodSpec(BaseModel):
    """One saliency method and its options.

    Attributes:
        name: a method name from ``opticam.methods.KNOWN_METHODS`` (``opticam``,
            ``gradcam``, ``gradcampp``, ``xgradcam``, ``scorecam``, ``ablationcam``,
            ``layercam``, ``hirescam``, ``fakecam``).
        options: keyword options for ``opticam.methods.get_explainer`` (e.g.
            ``{"iterations": 50}`` for Opti-CAM). JSON values only.

    A plain string is accepted wherever a ``MethodSpec`` is expected:
    ``"gradcam"`` means ``MethodSpec(name="gradcam")``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _accept_plain_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        name = value.strip().lower()
        if name not in KNOWN_METHODS:
            raise ValueError(f"unknown method {value!r} (known: {', '.join(KNOWN_METHODS)})")
        return name

    @field_validator("options")
    @classmethod
    def _check_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"method options must be JSON values (numbers, strings, lists, dicts): {err}"
            ) from err
        return value

    @property
    def label(self) -> str:
        """The name used in the Parquet ``method`` column (the method name)."""
        return self.name


class MetricsOptions(BaseModel):
    """Which metrics to compute, and their parameters (METHOD.md sections 2-4).

    Average Drop / Gain / Increase terms are always computed: they are the paper's
    headline metrics.

    Attributes:
        insertion_deletion: compute insertion and deletion AUCs (class: the predicted one,
            the paper's protocol).
        steps: insertion/deletion steps; each step inserts/deletes ``ceil(H*W/steps)``
            pixels (the paper: 224 steps of 224 pixels at 224x224).
        blur_sigma: Gaussian blur of the insertion start image; None = metric default.
        blur_kernel: its kernel size (odd); None = metric default.
        deletion_baseline: value deleted pixels are set to (0 = black).
        save_curves: keep the per-image insertion/deletion curves in the Parquet rows.
        localization: compute localization metrics for samples that have boxes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    insertion_deletion: bool = True
    steps: int = Field(default=224, ge=1)
    blur_sigma: float | None = Field(default=None, gt=0)
    blur_kernel: int | None = Field(default=None, ge=1)
    deletion_baseline: float = 0.0
    save_curves: bool = True
    localization: bool = True

    @field_validator("blur_kernel")
    @classmethod
    def _odd_kernel(cls, value: int | None) -> int | None:
        if value is not None and value % 2 == 0:
            raise ValueError(f"blur_kernel must be odd, got {value}")
        return value


class RunConfig(BaseModel):
    """A dataset-scale explanation job.

    Attributes:
        data: shard URL or pattern (``s3://b/shard-{000000..000099}.tar``, a glob, a
            local path), or a list of them.
        output: where run folders go; the run lives at ``<output>/<run_id>/``.
        model: the classifier (:class:`opticam.models.ModelSpec`).
        methods: saliency methods, as :class:`MethodSpec` or plain names.
        target: class explained per image: ``"label"`` (ground truth, the paper's tables;
            samples without a label are recorded as errors) or ``"predicted"``.
        batch_size: images per batch.
        device: ``"auto"`` (every local GPU, else the CPU), ``"cpu"``, ``"cuda"`` (every
            local GPU), ``"cuda:N"`` or ``"mps"``.
        metrics: metric switches and parameters.
        maps: how maps are stored: ``"lowres"`` (the method's low-resolution map, rebuilt by
            bilinear upsampling + normalization; methods without one fall back to
            ``"full_png"``) or ``"full_png"`` (8-bit PNG at input resolution).
        max_images: stop after this many images in total (spread over the shards), or None.
        executor: ``"local"`` (this machine's devices). ``"deployments"`` (one child flow
            run per shard on a work pool) is reserved and not available yet.
        storage_options: fsspec options for both data and output (endpoint, credentials).
        data_storage_options, output_storage_options: per-side options merged over
            ``storage_options``.

    The three storage option fields are secret: excluded from dumps, repr, run id and the
    JSON schema (so no Prefect UI form asks for them); pass them from code or the CLI, or
    let s3fs find credentials in the environment.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str | list[str]
    output: str = DEFAULT_OUTPUT
    model: ModelSpec = Field(default_factory=ModelSpec)
    methods: list[MethodSpec] = Field(
        default_factory=lambda: [MethodSpec(name=n) for n in ("opticam", "gradcam", "fakecam")]
    )
    target: Literal["label", "predicted"] = "label"
    batch_size: int = Field(default=32, ge=1)
    device: str = "auto"
    metrics: MetricsOptions = Field(default_factory=MetricsOptions)
    maps: Literal["lowres", "full_png"] = "lowres"
    max_images: int | None = Field(default=None, ge=1)
    executor: Literal["local", "deployments"] = "local"
    # Secret: excluded from dumps and repr, and left out of the JSON schema so that the
    # Prefect UI never offers a form field whose value it would store in its database.
    storage_options: SkipJsonSchema[dict[str, Any]] = Field(
        default_factory=dict, exclude=True, repr=False
    )
    data_storage_options: SkipJsonSchema[dict[str, Any]] = Field(
        default_factory=dict, exclude=True, repr=False
    )
    output_storage_options: SkipJsonSchema[dict[str, Any]] = Field(
        default_factory=dict, exclude=True, repr=False
    )

    @field_validator("data")
    @classmethod
    def _check_data(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items or any(not isinstance(v, str) or not v.strip() for v in items):
            raise ValueError(
                f"data must be a non-empty shard URL/pattern or a list of them, got {value!r}"
            )
        return value

    @field_validator("output")
    @classmethod
    def _check_output(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("output must be a non-empty folder URL")
        return value.rstrip("/") or "/"

    @field_validator("methods", mode="before")
    @classmethod
    def _plain_method_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return value

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, value: list[MethodSpec]) -> list[MethodSpec]:
        if not value:
            raise ValueError(f"at least one method is needed (known: {', '.join(KNOWN_METHODS)})")
        names = [m.name for m in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            # One row per (image, method): the method name is the row's identity.
            raise ValueError(f"each method may appear once; repeated: {', '.join(duplicates)}")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        device = value.strip().lower()
        if not _DEVICE_RE.match(device):
            raise ValueError(f"unknown device {value!r} (accepted: auto, cpu, cuda, cuda:N, mps)")
        return device

    @model_validator(mode="after")
    def _check_executor(self) -> RunConfig:
        if self.executor == "deployments":
            raise ValueError(
                "executor 'deployments' (one child flow run per shard on a work pool) is "
                "reserved and not available yet; use executor='local'"
            )
        return self

    # -- derived values ------------------------------------------------------------------

    def data_urls(self) -> list[str]:
        """The data spec as a list (a single pattern becomes a one-item list)."""
        return [self.data] if isinstance(self.data, str) else list(self.data)

    def data_options(self) -> dict[str, Any]:
        """fsspec options for reading shards: ``storage_options`` + ``data_storage_options``."""
        return {**self.storage_options, **self.data_storage_options}

    def output_options(self) -> dict[str, Any]:
        """fsspec options for the output: ``storage_options`` + ``output_storage_options``."""
        return {**self.storage_options, **self.output_storage_options}

    def job_description(self) -> dict[str, Any]:
        """What the run computes: the fields hashed into :attr:`run_id` (JSON values).

        Lists of shards are sorted (a set of shards is the same data in any order) and
        local paths made absolute (see :func:`normalize_url`).
        """
        data = [normalize_url(u) for u in self.data_urls()]
        return {
            "data": data[0] if isinstance(self.data, str) else sorted(data),
            "model": self.model.model_dump(mode="json"),
            # Sorted: the same methods in another order compute the same rows.
            "methods": sorted(
                ({"name": m.name, "options": m.options} for m in self.methods),
                key=lambda m: m["name"],
            ),
            "target": self.target,
            "metrics": self.metrics.model_dump(mode="json"),
            "maps": self.maps,
            "max_images": self.max_images,
        }

    @property
    def run_id(self) -> str:
        """``<slug>-<sha256[:12]>`` of :meth:`job_description` (see the module doc)."""
        canonical = json.dumps(
            self.job_description(), sort_keys=True, separators=(",", ":"), allow_nan=False
        )
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]
        return f"{self._slug()}-{digest}"

    def _slug(self) -> str:
        # The folder (or bucket prefix) holding the shards usually names the dataset.
        first = normalize_url(self.data_urls()[0]).rstrip("/")
        parts = [p for p in re.split(r"[/\\]", first) if p and not p.endswith(":")]
        dataset = parts[-2] if len(parts) >= 2 else (parts[-1] if parts else "data")
        source = self.model.source
        model = source.split(":")[1] if source.startswith("torchvision:") else source.split(":")[-1]
        slug = _SLUG_RE.sub("-", f"{dataset}-{model}".lower()).strip("-")
        return slug[:40].strip("-") or "run"

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON values without storage options (what ``run.json`` stores)."""
        return self.model_dump(mode="json")
