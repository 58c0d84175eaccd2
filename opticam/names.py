"""The one registry of names: methods, metrics, error stages, map formats, method options.

Everything that is named in more than one place (a config value, a Parquet column, a
report header, a CLI choice) is named here once, and every other module reads it from
here. This module imports nothing heavy (no torch, no pyarrow, no Prefect), so that a
config can be validated anywhere, e.g. in the process that renders a Prefect UI form.

- :data:`METHODS`: method name -> where its class lives (``"module:Class"``, imported
  on first use by :func:`opticam.methods.get_explainer`) and whether it reads a target
  layer. Adding a method is one entry here plus its class.
- :data:`METRICS`: per-image Parquet column -> summary name, table header, title,
  direction, unit and scale. The pipeline writes the columns, the aggregator averages
  them, the report shows them: all from this table.
- :data:`STAGES`: every value of the errors table's ``stage`` column, with its meaning.
- :data:`MAP_FORMATS`: how a map is stored (the ``map_format`` config field, CLI flag
  and Parquet column).
- :data:`INTERPOLATIONS`, :data:`RESIZE_MODES`, :data:`CROP_ROUNDINGS`: how images are
  resized and cropped to the model input (:class:`opticam.data.Preprocess`).
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass

from opticam.errors import short_repr

__all__ = [
    "CROP_ROUNDINGS",
    "ERROR_STAGES",
    "INTERPOLATIONS",
    "KNOWN_METHODS",
    "LOCALIZATION_COLUMNS",
    "MAP_FORMATS",
    "METHODS",
    "METRICS",
    "METRICS_BY_COLUMN",
    "METRICS_BY_NAME",
    "LR_DECAYS",
    "NORMALIZATIONS",
    "OBJECTIVES",
    "OPTICAM_PRESETS",
    "OPTICAM_SCHEDULE",
    "PRIOR_ROLES",
    "DEFAULT_PRIOR_PER_CLASS",
    "RESIZE_MODES",
    "SCORES",
    "STARTS",
    "STAGES",
    "STAGE_BOXES",
    "STAGE_DECODE",
    "STAGE_EXPLAIN",
    "STAGE_INCOMPLETE",
    "STAGE_KEY",
    "STAGE_LABEL",
    "STAGE_NONFINITE",
    "STAGE_NOT_TAR",
    "STAGE_OPEN",
    "STAGE_PREPROCESS",
    "STAGE_SHARD",
    "STAGE_TAR",
    "STAGE_TOO_LARGE",
    "STAGE_UNSAFE",
    "MethodInfo",
    "Metric",
    "resolve_opticam_preset",
]


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodInfo:
    """One saliency method.

    Attributes:
        name: the name in configs, on the CLI and in the Parquet ``method`` column.
        title: how people write it (report legends).
        class_path: ``"module:Class"`` import path of its :class:`opticam.methods.Explainer`
            subclass.
        uses_layer: whether it reads a target layer (Fake-CAM does not).
        batch_dependent: whether its map of an image depends on the other images of its
            batch by more than float rounding. Opti-CAM's does: its 100 steps amplify
            the rounding of the model's batched kernels (which differ with the batch
            size) into visibly different maps (``benchmarks/opticam_batch.py``), so the
            batch size is part of such a job's run id.
    """

    name: str
    title: str
    class_path: str
    uses_layer: bool = True
    batch_dependent: bool = False


_BASELINES = "opticam.methods.baselines"

#: Method name -> :class:`MethodInfo`, in display order (Opti-CAM first, controls last).
METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("opticam", "Opti-CAM", "opticam.methods.opticam:OptiCAM", batch_dependent=True),
        MethodInfo("gradcam", "Grad-CAM", f"{_BASELINES}:GradCAMMethod"),
        MethodInfo("gradcampp", "Grad-CAM++", f"{_BASELINES}:GradCAMPlusPlusMethod"),
        MethodInfo("xgradcam", "XGrad-CAM", f"{_BASELINES}:XGradCAMMethod"),
        MethodInfo("scorecam", "Score-CAM", f"{_BASELINES}:ScoreCAMMethod"),
        MethodInfo("ablationcam", "Ablation-CAM", f"{_BASELINES}:AblationCAMMethod"),
        MethodInfo("layercam", "Layer-CAM", f"{_BASELINES}:LayerCAMMethod"),
        MethodInfo("hirescam", "HiRes-CAM", f"{_BASELINES}:HiResCAMMethod"),
        MethodInfo("fakecam", "Fake-CAM", f"{_BASELINES}:FakeCAM", uses_layer=False),
    )
}

#: The method names, in display order.
KNOWN_METHODS: tuple[str, ...] = tuple(METHODS)

#: ``n`` in ``M = n(up(S))`` (METHOD.md section 1).
NORMALIZATIONS: tuple[str, ...] = ("range", "max", "sigmoid")
#: Opti-CAM objectives: maximize the masked score, or minimize its gap to the clean one.
OBJECTIVES: tuple[str, ...] = ("mask", "diff")
#: Opti-CAM class scores ``g_c``: the logit or the softmax probability.
SCORES: tuple[str, ...] = ("logit", "probability")
#: Opti-CAM learning-rate schedules over the ``iterations`` steps: constant (paper),
#: cosine decay to 0, linear decay to 0.
LR_DECAYS: tuple[str, ...] = ("none", "cosine", "linear")
#: Opti-CAM starting points: u = 0 (paper: the mean feature map), Grad-CAM's weights, or
#: the class prior (the weights earlier images of the class ended at).
STARTS: tuple[str, ...] = ("uniform", "gradcam", "prior")
#: What a row of a job with the class prior was: an image of the calibration sample
#: (explained at the paper's setting, its weights feed the prior), an Opti-CAM row started
#: from its class's prior, or one whose class the prior had not seen (the fallback start).
#: Null in jobs without a prior.
PRIOR_ROLES: tuple[str, ...] = ("calibration", "prior", "fallback")
#: Calibration images per class when ``prior_per_class`` is not given.
DEFAULT_PRIOR_PER_CLASS = 5

#: The Opti-CAM options a preset may set, at the paper's values (their defaults).
OPTICAM_SCHEDULE: dict[str, object] = {
    "iterations": 100,
    "lr": 0.1,
    "lr_decay": "none",
    "start": "uniform",
    "patience": 0,
    "plateau_rtol": 0.0,
    "plateau_atol": 0.0,
}
#: Named Opti-CAM schedules: ``paper`` is the paper's setting; ``fast`` is the best
#: schedule ``benchmarks/opticam_schedule.py`` found at a third of the paper's passes
#: (33 instead of 101 per image). On 200 held-out demo images it matches the paper's AD
#: but loses 3.3 points of AG: it does NOT reach the 1-point target (README, "Fewer passes").
#: ``prior`` starts every image from its class's prior (a calibration sample explained at
#: the paper's setting first; docs/prior.md) and runs the schedule measured best from there.
OPTICAM_PRESETS: dict[str, dict[str, object]] = {
    "paper": {},
    "fast": {"iterations": 32, "lr": 0.5},
    "prior": {"start": "prior", "iterations": 32, "lr": 0.5},
}


def resolve_opticam_preset(preset: str, given: dict[str, object]) -> dict[str, object]:
    """The full schedule (every key of :data:`OPTICAM_SCHEDULE`) of ``preset`` and ``given``.

    ``given`` holds only the schedule options the caller set explicitly. Each option
    takes, in order: its given value, the preset's value, the paper's default. A given
    value the preset also sets must equal the preset's: an explicit value is never
    silently replaced, also when it happens to be the paper's default
    (``preset="fast", iterations=100`` is refused, not run with 32 iterations).

    Raises:
        ValueError: unknown preset or schedule option, or a given value that conflicts
            with the preset.
    """
    if preset not in OPTICAM_PRESETS:
        raise ValueError(f"unknown preset {_short(preset)} (known: {', '.join(OPTICAM_PRESETS)})")
    unknown = sorted(set(given) - set(OPTICAM_SCHEDULE))
    if unknown:
        raise ValueError(
            f"unknown schedule option(s) {', '.join(_short(k) for k in unknown)} "
            f"(known: {', '.join(OPTICAM_SCHEDULE)})"
        )
    fixed = OPTICAM_PRESETS[preset]
    for key, value in given.items():
        if key in fixed and value != fixed[key]:
            raise ValueError(
                f"preset {short_repr(preset)} sets {key}={short_repr(fixed[key])}, which conflicts with the "
                f"{key}={_short(value)} given; leave {key} out or use preset 'paper'"
            )
    return {**OPTICAM_SCHEDULE, **fixed, **given}


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _short(value: object) -> str:
    """``repr(value)`` cut to a length fit for a one-line error message."""
    return _REPR.repr(value)


# --------------------------------------------------------------------------- map formats

#: How maps are stored: the low-resolution map rebuilt by up + n, or an 8-bit PNG.
MAP_FORMATS: tuple[str, ...] = ("lowres", "full_png")


# --------------------------------------------------------------------------- preprocessing

#: Resampling filters of the resize to the model input (PIL's, by torchvision's names).
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")
#: Resizes: ``shorter`` keeps the aspect ratio (shorter side to ``resize_size``, as
#: torchvision's presets and timm's default crop mode do), ``squash`` resizes to exactly
#: ``resize_size`` x ``resize_size`` (timm's ``crop_mode="squash"``, Hugging Face's
#: ``size={"height", "width"}``); both then centre-crop the input size.
RESIZE_MODES: tuple[str, ...] = ("shorter", "squash")
#: Where a centre crop with an odd margin starts: ``round`` half to even (torchvision,
#: timm) or ``floor`` (Hugging Face image processors).
CROP_ROUNDINGS: tuple[str, ...] = ("round", "floor")


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """One per-image metric and the dataset summary made of it.

    Attributes:
        column: per-image Parquet column, a fraction (``drop``) or seconds.
        name: summary name, the mean over images in the paper's units (``average_drop``);
            also the ``summary.parquet`` column.
        short: table header (``AD``).
        title: full name for legends and tooltips.
        direction: ``"lower"`` or ``"higher"`` is better.
        unit: unit of the summary, ``"%"`` or ``"s"``.
        scale: summary = scale * mean(column) (100 for fractions shown in percent).
        group: ``faithfulness``, ``insertion_deletion``, ``localization`` or ``time``.
    """

    column: str
    name: str
    short: str
    title: str
    direction: str
    unit: str = "%"
    scale: float = 100.0
    group: str = "faithfulness"

    @property
    def arrow(self) -> str:
        """``↓`` when lower is better, ``↑`` when higher is better."""
        return "↓" if self.direction == "lower" else "↑"


_LOC = "localization"
_INS = "insertion_deletion"

#: Every summary metric, in display order: faithfulness, insertion/deletion,
#: localization, time (METHOD.md sections 2-4).
METRICS: tuple[Metric, ...] = (
    Metric("drop", "average_drop", "AD", "Average Drop", "lower"),
    Metric("gain", "average_gain", "AG", "Average Gain", "higher"),
    Metric("increase", "average_increase", "AI", "Average Increase", "higher"),
    Metric("insertion_auc", "insertion", "Ins", "Insertion AUC", "higher", group=_INS),
    Metric("deletion_auc", "deletion", "Del", "Deletion AUC", "lower", group=_INS),
    Metric("pointing_game", "pointing_game", "SP", "Pointing game", "higher", group=_LOC),
    Metric(
        "energy_in_box", "energy_in_box", "EP", "Energy-based pointing game", "higher", group=_LOC
    ),
    Metric("f1", "f1", "F1", "F1 of energy inside the boxes", "higher", group=_LOC),
    Metric("loc_error", "loc_error", "LE", "Localization error (1 - max IoU)", "lower", group=_LOC),
    Metric("box_acc", "box_acc", "BoxAcc", "Box accuracy", "higher", group=_LOC),
    Metric("seconds", "seconds_per_image", "s/img", "Seconds per image", "lower", "s", 1.0, "time"),
)
METRICS_BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
METRICS_BY_COLUMN: dict[str, Metric] = {m.column: m for m in METRICS}
#: Per-image localization columns, as :func:`opticam.metrics.localization` returns them.
LOCALIZATION_COLUMNS: tuple[str, ...] = tuple(m.column for m in METRICS if m.group == _LOC)


# --------------------------------------------------------------------------- error stages

# Values of the errors table's ``stage`` column: one name per kind of failure, so the
# table can be grouped by it.
STAGE_OPEN = "open"
STAGE_TAR = "tar"
STAGE_DECODE = "decode"
STAGE_LABEL = "label"
STAGE_BOXES = "boxes"
STAGE_KEY = "key"
STAGE_UNSAFE = "unsafe-member"
STAGE_PREPROCESS = "preprocess"
STAGE_EXPLAIN = "explain"
STAGE_INCOMPLETE = "incomplete"
STAGE_SHARD = "shard"
STAGE_NONFINITE = "non-finite"
STAGE_NOT_TAR = "not-a-tar"
STAGE_TOO_LARGE = "too-large"

#: Stage -> what failed. Sample-level stages have a key; shard-level ones a null key.
STAGES: dict[str, str] = {
    STAGE_OPEN: "the shard URL could not be opened at all",
    STAGE_TAR: "the tar stream is truncated or unreadable",
    STAGE_DECODE: "an image or JSON member could not be decoded, an image is in another "
    "format than JPEG, PNG or WebP, or a sample has no image",
    STAGE_LABEL: "the label is missing (target 'label'), negative, malformed, or out of range",
    STAGE_BOXES: "the boxes are malformed (sample skipped), or one box is empty or lies "
    "outside the image (that box dropped)",
    STAGE_KEY: "a key occurs twice in one shard, or its member names are not UTF-8 text",
    STAGE_UNSAFE: "a pickle-like member, skipped and never loaded",
    STAGE_PREPROCESS: "resize or crop failed, or the image's aspect ratio is beyond the "
    "limit (opticam.data.preprocess.MAX_ASPECT_RATIO)",
    STAGE_EXPLAIN: "a method raised on a batch (the other methods went on)",
    STAGE_INCOMPLETE: "the shard was not read to its end; its rows hold what was read",
    STAGE_SHARD: "the shard failed for good after its retries",
    STAGE_NONFINITE: "the model's logits, or a method's map or scores, were NaN or inf for "
    "this image: no row, so no mean includes it",
    STAGE_NOT_TAR: "the shard is empty (0 bytes) or does not start with a tar header: "
    "nothing could be read from it",
    STAGE_TOO_LARGE: "a member has more bytes, or an image more pixels, than the reader "
    "accepts; skipped without decoding",
}
ERROR_STAGES: tuple[str, ...] = tuple(STAGES)
