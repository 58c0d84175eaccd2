"""One description of a job: what to explain, with which model and methods, scored how.

:class:`RunConfig` is shared by the CLI, the Prefect flows (it is their parameter, so the
Prefect UI renders a form for it) and the deployments. It is plain pydantic: importing
this module never imports Prefect or torch.

The run id (:attr:`RunConfig.run_id`) is derived from the *job description* alone:

    run_id = slug(data, model) + "-" + sha256(canonical_json(job))[:12]

where ``job`` holds the data spec, the model spec, the methods with their options, the
target class rule, the metric parameters, the map format and ``max_images``, and, for a
job with Opti-CAM, a batch size other than 32: Opti-CAM's optimization amplifies the float
rounding of the model's batched kernels, which differs with the batch size, into maps
that differ (``benchmarks/opticam_batch.py``). Where the output goes, the device, the
batch size of other jobs, the executor and the storage options are left out: they change
how a job runs, not what it computes (up to float rounding). So rerunning the same command
resumes the same run folder, and changing a parameter that changes the results starts a
fresh one.

Every field carries a description: the command line (:mod:`opticam.cli`) builds its flags,
defaults, choices and help from these models, ``opticam config --example`` prints them as
a commented YAML file, and the Prefect UI shows them on the flow's form.

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

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from opticam.errors import short_repr, shorten
from opticam.names import (
    DEFAULT_PRIOR_PER_CLASS,
    INTERPOLATIONS,
    KNOWN_METHODS,
    LR_DECAYS,
    METHODS,
    NORMALIZATIONS,
    OBJECTIVES,
    OPTICAM_PRESETS,
    OPTICAM_SCHEDULE,
    RESIZE_MODES,
    SCORES,
    STARTS,
    resolve_opticam_preset,
)
from opticam.redact import redact_url

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_OUTPUT",
    "DEFAULT_START_TIMEOUT",
    "CAMOptions",
    "MethodSpec",
    "MetricsOptions",
    "ModelSpec",
    "OptiCAMOptions",
    "RunConfig",
    "method_options_model",
    "normalize_url",
]

DEFAULT_OUTPUT = "./opticam-runs"
#: Most pixels a decoded image may have (above a 100-megapixel photo); larger images are
#: refused from their header, before decoding (a 180 KB PNG can decode to gigabytes).
DEFAULT_MAX_PIXELS = 120_000_000
#: Images per batch unless the job says otherwise (``RunConfig.batch_size``).
DEFAULT_BATCH_SIZE = 32
#: Seconds a shard run that a worker picked up may take to turn Running (executor
#: deployments). A process worker on a 2-core machine takes 5.3 s from Pending to
#: Running (median of 6, max 5.4 s; benchmarks/start_times.py), up to 13 s while other
#: jobs load the machine; a container pool that pulls a multi-gigabyte image onto a cold
#: node can take minutes, hence 10 minutes.
DEFAULT_START_TIMEOUT = 600.0


_POOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
_SLUG_RE = re.compile(r"[^a-z0-9]+")
_SOURCE_RE = re.compile(
    r"^(demo"
    r"|torchvision:[A-Za-z0-9_]+(:[A-Za-z0-9_.]+)?"
    r"|factory:[A-Za-z0-9_.]+:[A-Za-z0-9_]+"
    # timm:NAME, timm:NAME.TAG or timm:NAME:TAG (one tag at most)
    r"|timm:[A-Za-z0-9_]+([.:][A-Za-z0-9_-]+)?"
    # hf:ORG/NAME (a Hub model id) or hf:FOLDER (a local save_pretrained folder)
    r"|hf:\S+)$"
)
#: ModelSpec fields added after run ids existed: left out of the run id while unset, so
#: that jobs from before them keep their run id.
_LATER_MODEL_FIELDS = ("interpolation", "resize_mode")


def normalize_url(url: str) -> str:
    """A URL in the one spelling used for hashing.

    Local paths are made absolute, ``file://`` is dropped and credentials are redacted:
    ``./shards/a.tar``, ``shards/a.tar`` (from the same folder) and
    ``file:///abs/shards/a.tar`` all become ``/abs/shards/a.tar``; other URLs
    (``s3://...``) are returned without surrounding whitespace and without credentials
    (:func:`opticam.redact.redact_url`), so a run id never depends on a password.
    """
    url = url.strip()
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url or url.startswith("pipe:"):
        return redact_url(url)
    return os.path.abspath(os.path.expanduser(url))


def check_pool_name(value: str) -> str:
    """``value`` if it is a usable work pool name, else ValueError naming it."""
    if not _POOL_RE.match(value):
        raise ValueError(
            f"pool must be a work pool name (letters, digits, '-', '_', '.'), got {short_repr(value)}"
        )
    return value


def _one_of(value: str, known: tuple[str, ...], what: str) -> str:
    if value not in known:
        raise ValueError(f"unknown {what} {short_repr(value)} (known: {', '.join(known)})")
    return value


# --------------------------------------------------------------------------- the model


class ModelSpec(BaseModel):
    """What classifier to explain, and how (see :func:`opticam.models.load_model`).

    Sources: ``"demo"`` (the bundled demo classifier), ``"torchvision:NAME[:WEIGHTS]"``
    (e.g. ``"torchvision:resnet50:IMAGENET1K_V2"``), ``"factory:package.module:function"``
    (``function()`` returns an ``nn.Module``), ``"timm:NAME[:TAG]"`` (a timm model, e.g.
    ``"timm:resnet50:a1_in1k"`` or ``"timm:resnet50.a1_in1k"``; needs ``opticam[timm]``)
    or ``"hf:ORG/NAME"`` / ``"hf:FOLDER"`` (a Hugging Face transformers image classifier
    from the Hub or a ``save_pretrained`` folder; needs ``opticam[hf]``). timm and hf
    models bring their own preprocessing (mean, std, sizes, interpolation, resize mode);
    the fields here override it. Each field's description says the rest.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        default="demo",
        description="the classifier: demo | torchvision:NAME[:WEIGHTS] | factory:pkg.mod:fn "
        "| timm:NAME[:TAG] | hf:ORG/NAME | hf:FOLDER",
    )
    checkpoint: str | None = Field(
        default=None, description="state_dict to load, at any fsspec URL (local, s3://, ...)"
    )
    trust_checkpoint: bool = Field(
        default=False,
        description="read the checkpoint with full unpickling, which runs code from the "
        "file: only for files you trust (default: tensors and plain containers only)",
    )
    target_layer: str | None = Field(
        default=None, description="dotted module name of the CAM target layer (default per family)"
    )
    input_size: int | None = Field(
        default=None,
        description="side of the square model input (default per family: 224, demo 128)",
    )
    resize_size: int | None = Field(
        default=None,
        description="shorter side before the centre crop, or the squashed side (default "
        "per family: 256, demo 128, timm input/crop_pct)",
    )
    interpolation: str | None = Field(
        default=None,
        description="resampling filter of the resize (default per family: bilinear; timm "
        "and hf: the model's own)",
        # None is in the enum: Prefect's server checks flow parameters against this schema.
        json_schema_extra={"enum": [*INTERPOLATIONS, None]},
    )
    resize_mode: str | None = Field(
        default=None,
        description="shorter: keep the aspect ratio; squash: resize to resize_size square "
        "(default per family: shorter; timm and hf: the model's own)",
        json_schema_extra={"enum": [*RESIZE_MODES, None]},
    )
    num_classes: int | None = Field(
        default=None, description="number of logits (default: from the weights or a forward pass)"
    )
    mean: tuple[float, float, float] | None = Field(
        default=None,
        description="RGB input mean for [0,1] images, applied inside the model (default: "
        "the source's: ImageNet's for torchvision, timm's or the image processor's, a "
        "factory's input_mean; none for the demo)",
    )
    std: tuple[float, float, float] | None = Field(
        default=None,
        description="RGB input standard deviation (default: the source's, as for mean; 1 "
        "where a mean applies and no std is known)",
    )
    relu_features: bool | None = Field(
        default=None,
        description="ReLU the target layer's features (CNNs, as in the paper; not for "
        "transformers); default per family",
    )

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if not _SOURCE_RE.match(value):
            raise ValueError(
                f"unknown model source {short_repr(value)} (accepted: 'demo', "
                "'torchvision:NAME[:WEIGHTS]' e.g. 'torchvision:resnet50:IMAGENET1K_V2', "
                "'factory:package.module:function', 'timm:NAME[:TAG]' e.g. "
                "'timm:resnet50:a1_in1k', 'hf:ORG/NAME' e.g. 'hf:google/vit-base-patch16-224' "
                "or 'hf:<local folder>')"
            )
        return value

    @field_validator("interpolation", "resize_mode")
    @classmethod
    def _check_preprocess_choice(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        known = INTERPOLATIONS if info.field_name == "interpolation" else RESIZE_MODES
        return _one_of(value, known, str(info.field_name).replace("_", " "))

    def job_dict(self) -> dict[str, Any]:
        """The spec as JSON values for the run id.

        Fields added later are included only when set, and files are named by what they
        are, not how they were typed: a local checkpoint path and an ``hf:`` folder that
        exists here are made absolute (:func:`normalize_url`), so ``./ckpt.pt`` and
        ``/abs/ckpt.pt`` are one model (a Hub id stays as written).
        """
        data = self.model_dump(mode="json")
        for name in _LATER_MODEL_FIELDS:
            if data.get(name) is None:
                data.pop(name, None)
        if data.get("checkpoint"):
            data["checkpoint"] = normalize_url(data["checkpoint"])
        source = str(data["source"])
        if source.startswith("hf:") and os.path.isdir(os.path.expanduser(source[len("hf:") :])):
            data["source"] = "hf:" + normalize_url(source[len("hf:") :]).rstrip("/")
        return data

    @field_validator("input_size", "resize_size", "num_classes")
    @classmethod
    def _check_positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"must be a positive integer, got {value}")
        return value

    @field_validator("std")
    @classmethod
    def _check_std(
        cls, value: tuple[float, float, float] | None
    ) -> tuple[float, float, float] | None:
        if value is not None and min(value) <= 0:
            raise ValueError(f"std must be positive, got {value}")
        return value


# --------------------------------------------------------------------------- methods


class _LayerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    relu_features: bool | None = Field(
        default=None, description="override the model's relu_features for this method"
    )
    normalization: str = Field(
        default="range",
        description=f"n in M = n(up(S)): {', '.join(NORMALIZATIONS)}",
        json_schema_extra={"enum": list(NORMALIZATIONS)},
    )

    @field_validator("normalization")
    @classmethod
    def _check_normalization(cls, value: str) -> str:
        return _one_of(value, NORMALIZATIONS, "normalization")


class OptiCAMOptions(_LayerOptions):
    """Options of Opti-CAM (:class:`opticam.methods.OptiCAM`); the defaults are the paper's."""

    iterations: int = Field(default=100, ge=0, description="Adam steps per image (paper: 100)")
    lr: float = Field(default=0.1, gt=0, description="Adam learning rate (paper: 0.1)")
    objective: str = Field(
        default="mask",
        description="mask: maximize g_c(f(x*M)); diff: minimize |g_c(f(x)) - g_c(f(x*M))|",
        json_schema_extra={"enum": list(OBJECTIVES)},
    )
    score: str = Field(
        default="logit",
        description="g_c: the class logit or its softmax probability",
        json_schema_extra={"enum": list(SCORES)},
    )
    tolerance: float = Field(
        default=1e-10,
        ge=0,
        description="an image stops once its objective changes by less than this",
    )
    amp_dtype: Literal["bf16", "fp16"] | None = Field(
        default=None, description="run the model under CUDA autocast in this dtype"
    )
    preset: str = Field(
        default="paper",
        description="named schedule: paper (the options as given), fast (lr 0.5, 32 "
        "iterations: a third of the passes, AG about 3 points lower on the demo) or prior "
        "(start prior, then lr 0.5 for 32 iterations; manual 'Fewer passes: the class "
        "prior'); a schedule option not given takes the preset's value, one given "
        "must agree with it (also when it is the paper's value)",
        json_schema_extra={"enum": list(OPTICAM_PRESETS)},
    )
    lr_decay: str = Field(
        default="none",
        description="learning rate over the iterations: none (constant, paper), cosine or "
        "linear decay to 0",
        json_schema_extra={"enum": list(LR_DECAYS)},
    )
    start: str = Field(
        default="uniform",
        description="start of u: uniform (u = 0, paper), gradcam (Grad-CAM's positive "
        "channel weights; one more backward pass) or prior (the weights earlier images of "
        "the class ended at; opticam run calibrates it first)",
        json_schema_extra={"enum": list(STARTS)},
    )
    prior_per_class: int = Field(
        default=DEFAULT_PRIOR_PER_CLASS,
        ge=1,
        le=10_000,
        description="start prior: calibration images per class, the first of each class in "
        "plan order, explained at the paper's setting before the rest of the job",
    )
    prior_fallback: Literal["uniform", "mean"] = Field(
        default="uniform",
        description="start prior: the start of a class without calibration images: uniform "
        "(u = 0, measured better) or mean (the mean of the classes' priors)",
    )
    patience: int = Field(
        default=0,
        ge=0,
        description="stop an image once its best objective has not improved by more than "
        "max(plateau_atol, plateau_rtol*|best|) for this many iterations; 0: never",
    )
    plateau_rtol: float = Field(
        default=0.0, ge=0, description="relative improvement that resets the patience count"
    )
    plateau_atol: float = Field(
        default=0.0, ge=0, description="absolute improvement that resets the patience count"
    )
    channels_last: bool = Field(
        default=False,
        description="run the model and masked images in channels_last memory format (the "
        "model's weights are converted in place); same maps up to rounding",
    )
    compile: bool | Literal["auto"] = Field(
        default="auto",
        description="torch.compile the model's forward in the iterations: auto (once a "
        "shard has run as many passes as 8 batches of 32 images at 101 passes, the "
        "break-even of the demo classifier on a 2-core CPU), true (from the first batch) "
        "or false; one batch shape per shard (a shorter batch is padded), eager with a "
        "warning when it cannot compile; same maps up to rounding",
    )

    @field_validator("amp_dtype", mode="before")
    @classmethod
    def _check_amp_dtype(cls, value: object) -> object:
        names = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}
        if value is None or value in ("bf16", "fp16"):
            return value
        if isinstance(value, str) and value.lower() in names:
            return names[value.lower()]
        raise ValueError(f"unknown amp_dtype {short_repr(value)} (known: None, bf16, fp16)")

    @field_validator("objective", "score", "preset", "lr_decay", "start")
    @classmethod
    def _check_choice(cls, value: str, info: ValidationInfo) -> str:
        choices = {
            "objective": OBJECTIVES,
            "score": SCORES,
            "preset": tuple(OPTICAM_PRESETS),
            "lr_decay": LR_DECAYS,
            "start": STARTS,
        }
        name = str(info.field_name)
        return _one_of(value, choices[name], name)

    @model_validator(mode="after")
    def _check_preset_agrees(self) -> OptiCAMOptions:
        # Only the options given: one set to the paper's value is as explicit as any.
        given = {k: getattr(self, k) for k in OPTICAM_SCHEDULE if k in self.model_fields_set}
        resolve_opticam_preset(self.preset, given)
        return self


class CAMOptions(_LayerOptions):
    """Options of the pytorch-grad-cam baselines (:class:`opticam.methods.GradCAMBaseline`)."""

    batch_size: int = Field(
        default=32, ge=1, description="images per forward pass inside Score-CAM and Ablation-CAM"
    )


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def method_options_model(name: str) -> type[BaseModel]:
    """The pydantic model that validates the options of method ``name``."""
    if name == "opticam":
        return OptiCAMOptions
    return CAMOptions if METHODS[name].uses_layer else _NoOptions


class MethodSpec(BaseModel):
    """One saliency method and its options.

    Attributes:
        name: a method name from :data:`opticam.names.KNOWN_METHODS`.
        options: keyword options for :func:`opticam.methods.get_explainer`, checked
            against :func:`method_options_model` (e.g. ``{"iterations": 50}`` for
            Opti-CAM). Only the options given are stored (and hashed into the run id).

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
        return _one_of(value.strip().lower(), KNOWN_METHODS, "method")

    @field_validator("options")
    @classmethod
    def _check_options(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is None:  # the name itself was invalid; that error is reported
            return value
        model = method_options_model(name)
        unknown = sorted(set(value) - set(model.model_fields))
        if unknown:
            raise ValueError(
                f"unknown option(s) {shorten(', '.join(map(short_repr, unknown)))} for method {short_repr(name)} "
                f"(accepted: {', '.join(model.model_fields) or 'none'})"
            )
        try:
            checked = model(**value)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {str(e['msg']).removeprefix('Value error, ')}"
                for e in err.errors()
            )
            raise ValueError(f"bad option for method {short_repr(name)}: {problems}") from None
        # The given keys with their checked values ("1e-10" from a YAML file is a float).
        return {key: getattr(checked, key) for key in value}

    def explicit_options(self) -> dict[str, Any]:
        """The options that differ from the method's defaults (what the run id hashes).

        Also left out: the values :data:`_HASHED_AS_DEFAULT` lists (Opti-CAM's ``compile``
        false and auto, which hashed as the default before auto was the default).
        """
        defaults = method_options_model(self.name)()
        return {
            k: v
            for k, v in self.options.items()
            if getattr(defaults, k) != v and v not in _HASHED_AS_DEFAULT.get((self.name, k), ())
        }


#: Option values that the run id hashes as the default, by (method, option). ``compile``
#: changes how Opti-CAM computes (rounding only), and ``false`` was its default until
#: ``auto`` became it: jobs that gave neither, or false, keep their run id, and so do
#: jobs that gave ``true`` (hashed then and now).
_HASHED_AS_DEFAULT: dict[tuple[str, str], tuple[object, ...]] = {
    ("opticam", "compile"): (False, "auto"),
}


# --------------------------------------------------------------------------- metrics


class MetricsOptions(BaseModel):
    """Which metrics to compute, and their parameters (METHOD.md sections 2-4).

    Average Drop / Gain / Increase terms are always computed: they are the paper's
    headline metrics.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    insertion_deletion: bool = Field(
        default=True, description="compute insertion and deletion AUCs (predicted class)"
    )
    steps: int = Field(
        default=224,
        ge=1,
        description="insertion/deletion steps, each ceil(H*W/steps) pixels (paper: 224)",
    )
    blur_sigma: float | None = Field(
        default=None, gt=0, description="Gaussian blur sigma of the insertion start image"
    )
    blur_kernel: int | None = Field(
        default=None, ge=1, description="its kernel size (odd; default from the metric)"
    )
    deletion_baseline: float = Field(default=0.0, description="value deleted pixels are set to")
    save_curves: bool = Field(
        default=True, description="keep per-image insertion/deletion curves in the Parquet rows"
    )
    localization: bool = Field(
        default=True, description="compute localization metrics for samples with boxes"
    )

    @field_validator("blur_kernel")
    @classmethod
    def _odd_kernel(cls, value: int | None) -> int | None:
        if value is not None and value % 2 == 0:
            raise ValueError(f"blur_kernel must be odd, got {value}")
        return value


# --------------------------------------------------------------------------- the job


def _default_methods() -> list[MethodSpec]:
    return [MethodSpec(name=n) for n in ("opticam", "gradcam", "fakecam")]


class RunConfig(BaseModel):  # size: 19 job fields, each with its description and validator
    """A dataset-scale explanation job (see the module doc and each field's description).

    The three storage option fields are secret: excluded from dumps, repr, run id and the
    JSON schema (so no Prefect UI form asks for them); pass them from code or the CLI, or
    let s3fs find credentials in the environment. ``maps`` is accepted as the version 1
    spelling of ``map_format``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str | list[str] = Field(
        description="shard URL or pattern (s3://b/shard-{000000..000099}.tar, a glob, a "
        "local path), or a list of them"
    )
    output: str = Field(
        default=DEFAULT_OUTPUT, description="folder URL of run folders (<output>/<run_id>/)"
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="the classifier")
    methods: list[MethodSpec] = Field(
        default_factory=_default_methods,
        description=f"saliency methods: names (comma-separated on the command line) or "
        f"{{name, options}} ({', '.join(KNOWN_METHODS)})",
    )
    target: Literal["label", "predicted"] = Field(
        default="label",
        description="class explained: the ground-truth label (paper) or the predicted class",
    )
    batch_size: int | Literal["auto"] = Field(
        default=DEFAULT_BATCH_SIZE,
        description="images per batch, or auto: on a GPU the largest batch that fits, "
        "measured once per model, input size and methods; on the CPU 8 "
        "(opticam.pipeline.autobatch). On a GPU a batch that runs out of memory is split "
        "in halves and the smaller size kept. Part of the run id when the job runs "
        "Opti-CAM (its maps depend on the images batched together), unless 32",
    )
    device: str = Field(
        default="auto",
        description="auto (every local GPU, else the CPU) | cpu | cuda | cuda:N | mps",
    )
    metrics: MetricsOptions = Field(
        default_factory=MetricsOptions, description="metric switches and parameters"
    )
    map_format: Literal["lowres", "full_png"] = Field(
        default="lowres",
        validation_alias=AliasChoices("map_format", "maps"),
        description="how maps are stored: lowres (the method's low-resolution map, rebuilt "
        "by up + n) or full_png (8-bit PNG at input resolution)",
    )
    max_images: int | None = Field(
        default=None, ge=1, description="stop after this many images in all, spread over shards"
    )
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        ge=1,
        description="most pixels (width x height) a decoded image may have; larger images "
        "become error rows without being decoded",
    )
    executor: Literal["local", "deployments"] = Field(
        default="local",
        description="local: shards run on this machine's devices; deployments: one "
        "explain-shard flow run per shard on the work pool named by pool",
    )
    pool: str | None = Field(
        default=None,
        description="work pool of the explain-shard/<pool> deployment (opticam deploy "
        "--pool); needed by executor deployments",
    )
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="most shard runs submitted and not finished at once (executor "
        "deployments); default twice the pool's concurrency limit, or 32 without one",
    )
    shard_attempts: int = Field(
        default=3,
        ge=1,
        le=20,
        description="flow runs per shard, the first included, before a shard whose runs "
        "crash, fail or never start counts as failed (executor deployments)",
    )
    start_timeout: float = Field(
        default=DEFAULT_START_TIMEOUT,
        gt=0,
        le=86_400,
        description="seconds a shard run picked up by a worker (Pending) may take to start "
        "running; a run still not Running then is cancelled and submitted again, which "
        "uses one of shard_attempts (executor deployments)",
    )
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

    @field_serializer("data")
    def _public_data(self, value: str | list[str]) -> str | list[str]:
        # Every dump (run.json, Prefect's stored parameters) leaves credentials out; the
        # object itself keeps the real URLs, which only the reader uses.
        return redact_url(value) if isinstance(value, str) else [redact_url(v) for v in value]

    @field_serializer("output")
    def _public_output(self, value: str) -> str:
        return redact_url(value)

    @field_validator("data")
    @classmethod
    def _check_data(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items or any(not isinstance(v, str) or not v.strip() for v in items):
            raise ValueError(
                f"data must be a non-empty shard URL/pattern or a list of them, got {short_repr(value)}"
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

    @field_validator("batch_size")
    @classmethod
    def _check_batch_size(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"Input should be greater than or equal to 1, or 'auto', got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        device = value.strip().lower()
        if not _DEVICE_RE.match(device):
            raise ValueError(
                f"unknown device {short_repr(value)} (accepted: auto, cpu, cuda, cuda:N, mps)"
            )
        return device

    @field_validator("pool")
    @classmethod
    def _check_pool(cls, value: str | None) -> str | None:
        return None if value is None else check_pool_name(value)

    @model_validator(mode="after")
    def _check_executor(self) -> RunConfig:
        if self.executor == "deployments" and self.pool is None:
            raise ValueError(
                "executor 'deployments' needs pool: the work pool whose explain-shard "
                "deployment runs the shards (create both with: opticam deploy --pool NAME)"
            )
        return self

    # -- derived values ------------------------------------------------------------------

    def data_urls(self) -> list[str]:
        """The data spec as a list (a single pattern becomes a one-item list)."""
        return [self.data] if isinstance(self.data, str) else list(self.data)

    def data_options(self) -> dict[str, Any]:
        """The fsspec options for reading shards: storage + data storage options."""
        return {**self.storage_options, **self.data_storage_options}

    def output_options(self) -> dict[str, Any]:
        """The fsspec options for the output: storage + output storage options."""
        return {**self.storage_options, **self.output_storage_options}

    def job_description(self) -> dict[str, Any]:
        """What the run computes: the fields hashed into :attr:`run_id` (JSON values).

        Lists of shards are sorted (a set of shards is the same data in any order),
        local paths made absolute (see :func:`normalize_url`), and method options equal
        to their defaults left out (``iterations: 100`` computes what no option does).
        """
        data = [normalize_url(u) for u in self.data_urls()]
        return {
            "data": data[0] if isinstance(self.data, str) else sorted(data),
            "model": self.model.job_dict(),
            # Sorted: the same methods in another order compute the same rows.
            "methods": sorted(
                ({"name": m.name, "options": m.explicit_options()} for m in self.methods),
                key=lambda m: m["name"],
            ),
            "target": self.target,
            "metrics": self.metrics.model_dump(mode="json"),
            "map_format": self.map_format,
            "max_images": self.max_images,
            # Only when changed: jobs from before the setting keep their run id.
            **({"max_pixels": self.max_pixels} if self.max_pixels != DEFAULT_MAX_PIXELS else {}),
            # A method whose maps depend on their batch (Opti-CAM) makes the batch size
            # part of what the job computes; left out at the default, so that such jobs
            # from before keep their run id.
            **({"batch_size": self.batch_size} if self._batch_size_in_identity() else {}),
        }

    def _batch_size_in_identity(self) -> bool:
        """Whether :attr:`batch_size` changes the results (see :meth:`job_description`)."""
        dependent = any(METHODS[m.name].batch_dependent for m in self.methods)
        return dependent and self.batch_size != DEFAULT_BATCH_SIZE

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
        if source.startswith(("torchvision:", "timm:")):
            model = source.split(":")[1]
        elif source.startswith("hf:"):
            model = source[len("hf:") :].rstrip("/\\").rsplit("/", 1)[-1]
        else:
            model = source.split(":")[-1]
        slug = _SLUG_RE.sub("-", f"{dataset}-{model}".lower()).strip("-")
        return slug[:40].strip("-") or "run"

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON values without storage options (what ``run.json`` stores)."""
        return self.model_dump(mode="json")
