"""Build a run's report: read its rows, summarise, draw, write ``<run>/report/``.

:func:`build_report` reads whatever the run holds now (the finished shards only: a
shard's rows file exists once it is complete), so it works on a partial run and gives an
empty but valid report before the first shard finishes. Everything is written through
fsspec (:func:`opticam.store.atomic_write_bytes`), so the run may live on S3, and
``index.html`` is written last: when it exists the rest of the report is there too.

A figure that cannot be drawn (:func:`opticam.report.figures.draw_figure`) is left out
with a note in its place on the page and in ``summary.md``; failing to read the run or to
write the report still raises.
"""

from __future__ import annotations

import collections
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from opticam import store
from opticam.errors import short_repr
from opticam.names import METRICS_BY_COLUMN, PRIOR_ROLES
from opticam.report.figures import (
    bar_chart,
    curves_chart,
    distributions_chart,
    draw_figure,
    series_colors,
    series_label,
)
from opticam.report.gallery import GALLERY_COLUMNS, Gallery, build_gallery
from opticam.report.page import Figure, PageContent, render_index
from opticam.report.summary import (
    CONFIDENCE,
    METRICS,
    SOURCE_COLUMNS,
    better,
    float_column,
    markdown_text,
    summarize,
    summary_markdown,
    summary_table,
)
from opticam.store.layout import ROWS_FOLDER, list_rows_files

__all__ = ["ReportResult", "build_report"]

#: Row columns read for the summary, figures and gallery (never the maps or curves: those
#: are read per group or per image, so memory stays bounded by one method's curves).
_ROW_COLUMNS = sorted(
    {
        "run_id",
        *SOURCE_COLUMNS,
        *GALLERY_COLUMNS,
        "input_height",
        "input_width",
        "prior_role",
        "prior_sha256",
    }
)
_MAX_ERROR_ROWS = 20

#: The bar charts: metric group (:attr:`opticam.names.Metric.group`, also the file name),
#: title and caption.
_BAR_CHARTS = (
    (
        "faithfulness",
        "Average Drop, Gain and Increase",
        "Mean over images with 95% bootstrap intervals. AD (lower is better) and AG (higher is "
        "better) belong together: a map that changes nothing (Fake-CAM) has a small AD and an "
        "AG near zero. AI counts images whose score increased.",
    ),
    (
        "insertion_deletion",
        "Insertion and deletion",
        "Area under the class-probability curve (predicted class) as pixels are inserted "
        "into a blurred image (higher is better) or deleted (lower is better).",
    ),
    (
        "localization",
        "Localization",
        "Over images with ground-truth boxes: pointing game (SP), energy inside the boxes "
        "(EP), F1, localization error (LE, lower is better) and box accuracy.",
    ),
)


@dataclass
class ReportResult:
    """What :func:`build_report` produced.

    Attributes:
        summary: one dict per (model, method) (keys of
            :data:`opticam.report.SUMMARY_SCHEMA`).
        summary_markdown: Markdown for a terminal or a Prefect artifact: notes (partial
            run, ...), how to read the table, and the table; ``summary.md`` is this under a
            title.
        index_url: URL of ``index.html``.
        files: URLs of every file written, ``index.html`` last.
    """

    summary: list[dict[str, Any]]
    summary_markdown: str
    index_url: str
    files: list[str]


def _methods_of(run_json: Mapping[str, Any] | None) -> list[str]:
    """Method names in the order of the run config (plain names or MethodSpec dicts)."""
    config = (run_json or {}).get("config") or {}
    names = []
    for spec in config.get("methods") or []:
        name = spec.get("name") if isinstance(spec, Mapping) else spec
        if isinstance(name, str):
            names.append(name)
    return names


def _resize_size(
    run_json: Mapping[str, Any] | None, statuses: Sequence[Mapping[str, Any]]
) -> tuple[int | None, bool]:
    """The model's resize size (shorter side before the centre crop), and whether it is known.

    In order: recorded by the pipeline in a shard status (``resize_size``), set in
    the config's model spec, or implied by the model source: the demo model resizes to its
    input size (128) and a factory model to its input size (``None`` here: the
    :class:`~opticam.data.Preprocess` default). A torchvision model's default comes from
    its weights, which the report does not load: ``(None, False)``.
    """
    for status in statuses:
        value = status.get("resize_size")
        if isinstance(value, int):
            return value, True
    model = ((run_json or {}).get("config") or {}).get("model") or {}
    if not isinstance(model, Mapping):
        return None, False
    if isinstance(model.get("resize_size"), int):
        return int(model["resize_size"]), True
    source = str(model.get("source", ""))
    if source == "demo":
        from opticam.demo import DEMO_INPUT_SIZE

        return DEMO_INPUT_SIZE, True
    return None, source.startswith("factory:")


#: Preprocessing settings a shard status records next to ``resize_size``, with what they
#: were before they were recorded (statuses written by older versions lack them).
_PREPROCESS_DEFAULTS: dict[str, str] = {
    "interpolation": "bilinear",
    "resize_mode": "shorter",
    "crop_rounding": "round",
}


def _preprocess_options(
    run_json: Mapping[str, Any] | None, statuses: Sequence[Mapping[str, Any]]
) -> dict[str, str]:
    """How the run resized and cropped its inputs, besides the sizes.

    Per setting (:data:`_PREPROCESS_DEFAULTS`), in order: recorded by the pipeline in a
    shard status, set in the config's model spec (``interpolation``, ``resize_mode``),
    or the value from before the setting existed.
    """
    model = ((run_json or {}).get("config") or {}).get("model") or {}
    options: dict[str, str] = {}
    for name, default in _PREPROCESS_DEFAULTS.items():
        values = [s.get(name) for s in statuses] + [
            model.get(name) if isinstance(model, Mapping) else None
        ]
        options[name] = next((str(v) for v in values if isinstance(v, str)), default)
    return options


def _mean_curve(column: pa.ChunkedArray) -> np.ndarray | None:
    """Mean of list<float> curves (nulls skipped); curves of other lengths are resampled.

    Runs hold one ``steps`` value, so all curves normally have one length; should they not,
    each is linearly interpolated onto the longest curve's grid over [0, 1] first.
    """
    curves = pc.drop_null(column)
    if len(curves) == 0:
        return None
    lengths = np.asarray(pc.list_value_length(curves).to_numpy(zero_copy_only=False))
    flat = np.asarray(pc.list_flatten(curves).to_numpy(zero_copy_only=False), dtype=np.float64)
    if lengths.min() == lengths.max() and lengths[0] > 0:
        return np.asarray(np.nanmean(flat.reshape(-1, int(lengths[0])), axis=0))
    grid = np.linspace(0.0, 1.0, int(lengths.max()))
    stacked = []
    for start, length in zip(np.cumsum(lengths) - lengths, lengths, strict=True):
        if length > 0:
            curve = flat[start : start + length]
            stacked.append(np.interp(grid, np.linspace(0.0, 1.0, length), curve))
    return np.asarray(np.nanmean(np.vstack(stacked), axis=0)) if stacked else None


def _figures(
    run: str,
    rows: pa.Table,
    summary: Sequence[Mapping[str, Any]],
    storage_options: Mapping[str, Any] | None,
) -> list[Figure]:
    several_models = len({r["model"] for r in summary}) > 1
    labels = [series_label(r, several_models) for r in summary]
    colors = series_colors(len(summary))
    figures: list[Figure] = []

    def add(name: str, title: str, caption: str, draw: Callable[[], bytes | None]) -> None:
        # Called with the data already read: only drawing may fail without raising.
        png, failure = draw_figure(name.removesuffix(".png"), draw)
        if png is not None or failure is not None:  # nothing to draw: left out of the page
            figures.append(Figure(name, title, caption, png, failure))

    # One bar chart per group of opticam.names.METRICS, named after the group.
    for metric_group, title, caption in _BAR_CHARTS:
        metrics = [m for m in METRICS if m.group == metric_group]
        add(
            f"{metric_group}.png",
            title,
            caption,
            partial(bar_chart, summary, metrics, labels, colors, title),
        )

    curves = []
    for row in summary:
        group = (pc.field("model") == row["model"]) & (pc.field("method") == row["method"])
        table = store.read_rows(
            run, ["insertion_curve", "deletion_curve"], storage_options, filter=group
        )
        curves.append(
            (
                _mean_curve(table.column("insertion_curve")),
                _mean_curve(table.column("deletion_curve")),
            )
        )
    add(
        "curves.png",
        "Mean insertion and deletion curves",
        "Class probability averaged over images at each step; the areas under these "
        "curves are the insertion and deletion scores.",
        partial(curves_chart, curves, labels, colors),
    )

    models = np.asarray(rows.column("model").to_pylist(), dtype=object)
    methods = np.asarray(rows.column("method").to_pylist(), dtype=object)
    masks = [(models == r["model"]) & (methods == r["method"]) for r in summary]
    panels = []
    for column in ("drop", "gain", "insertion_auc", "deletion_auc"):
        metric = METRICS_BY_COLUMN[column]
        # One image's value is one term of the average: "Drop", not "Average Drop".
        title = f"{metric.title.removeprefix('Average ')} per image ({better(metric)})"
        values = metric.scale * float_column(rows, column)
        panels.append((title, [values[mask] for mask in masks]))
    add(
        "distributions.png",
        "Per-image distributions",
        "Share of each method's images per 5-point bin. A mean hides whether a method "
        "is a little good everywhere or very good on some images only.",
        partial(distributions_chart, panels, labels, colors),
    )
    return figures


def _counts(
    rows: pa.Table,
    errors: pa.Table,
    run_json: Mapping[str, Any] | None,
    done: Sequence[str],
    statuses: Sequence[Mapping[str, Any]],
) -> tuple[list[tuple[str, str]], list[str]]:
    """Rows of the counts table and the notes about a partial or empty run."""
    images = len(
        set(zip(rows.column("shard").to_pylist(), rows.column("key").to_pylist(), strict=True))
    )
    planned = (run_json or {}).get("shards")
    n_planned = len(planned) if isinstance(planned, list) else None
    failed = [s for s in statuses if not s.get("done")]
    truncated = [s for s in statuses if s.get("done") and s.get("complete") is False]
    counts = [
        ("images", str(images)),
        ("rows (image × method)", str(rows.num_rows)),
        ("shards finished", f"{len(done)} of {n_planned}" if n_planned else str(len(done))),
    ]
    if failed:
        counts.append(("shards failed (no rows yet)", str(len(failed))))
    if truncated:
        counts.append(("shards read only in part (truncated)", str(len(truncated))))
    counts.append(("error rows", str(errors.num_rows)))
    counts += _prior_counts(rows)
    for name in ("created", "updated"):
        if run_json and run_json.get(name):
            counts.append((f"run {name}", str(run_json[name])))

    notes = []
    if run_json is None:
        notes.append("This folder has no run.json: the configuration is unknown.")
    if rows.num_rows == 0:
        notes.append("No results yet: no shard of this run has finished.")
    elif n_planned and len(done) < n_planned:
        notes.append(
            f"Partial run: {len(done)} of {n_planned} shards have finished; every number "
            "here covers the finished shards only."
        )
    return counts, notes


# The class prior's rows of the counts table, by prior_role (names.PRIOR_ROLES).
_PRIOR_LABELS = {
    "calibration": "class prior: calibration images (the paper's setting)",
    "prior": "class prior: images started from their class's prior",
    "fallback": "class prior: images started from the fallback",
}
_PRIOR_FILE_LABEL = "class prior file (SHA-256)"


def _prior_counts(rows: pa.Table) -> list[tuple[str, str]]:
    """The class prior's rows of the counts table: how each Opti-CAM image started.

    Empty for a run without a prior (every ``prior_role`` null).
    """
    opticam = rows.filter(pc.equal(rows.column("method"), "opticam"))
    roles = collections.Counter(opticam.column("prior_role").to_pylist())
    if not any(roles[role] for role in PRIOR_ROLES):
        return []
    hashes = sorted({h for h in opticam.column("prior_sha256").to_pylist() if h})
    return [(_PRIOR_LABELS[role], str(roles[role])) for role in PRIOR_ROLES] + [
        (_PRIOR_FILE_LABEL, ", ".join(h[:16] for h in hashes) or "none")
    ]


def _prior_note(counts: Sequence[tuple[str, str]]) -> list[str]:
    """The class prior's counts as one line of ``summary.md`` (none without a prior)."""
    values = dict(counts)
    if _PRIOR_FILE_LABEL not in values:
        return []
    calibration, prior, fallback = (values[_PRIOR_LABELS[role]] for role in PRIOR_ROLES)
    return [
        f"Class prior: {calibration} calibration images (explained at the paper's setting), "
        f"{prior} started from their class's prior, {fallback} from the fallback (prior "
        f"file {values[_PRIOR_FILE_LABEL]})."
    ]


def _markdown(
    summary: Sequence[Mapping[str, Any]], notes: Sequence[str], n_boot: int, seed: int
) -> str:
    """Notes, how to read the table, and the table: the body of ``summary.md``.

    Text from the run (model name, notes that quote keys or errors) goes through
    :func:`~opticam.report.summary.markdown_text`, the table cells too.
    """
    models = sorted({str(r["model"]) for r in summary})
    lines = [f"Model: {markdown_text(models[0])}", ""] if len(models) == 1 else []
    for note in notes:  # a blank line between notes, or Markdown joins them into one
        lines += [f"> {markdown_text(note)}", ""]
    lines += [
        f"Mean per image [{round(100 * CONFIDENCE)}% percentile bootstrap interval, "
        f"{n_boot} resamples, seed {seed}]. Percent, except s/img (seconds). "
        "↓ lower is better, ↑ higher is better.",
        "",
        summary_markdown(summary),
    ]
    return "\n".join(lines)


def _with_bootstrap(table: pa.Table, n_boot: int, seed: int) -> pa.Table:
    """Record how the intervals were computed in the Parquet key-value metadata."""
    meta = {
        **(table.schema.metadata or {}),
        b"opticam.bootstrap": json.dumps(
            {"confidence": CONFIDENCE, "n_boot": n_boot, "seed": seed}
        ).encode(),
    }
    return table.replace_schema_metadata(meta)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _remove_stale_figures(
    folder: str, keep: set[str], storage_options: Mapping[str, Any] | None
) -> None:
    """Delete figures of an earlier build that this build did not draw (e.g. a gallery)."""
    fs, path = fsspec.core.url_to_fs(folder, **dict(storage_options or {}))
    try:
        fs.invalidate_cache(path)
        existing = fs.ls(path, detail=False)
    except FileNotFoundError:
        return
    for entry in existing:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".png") and name not in keep:
            fs.rm(entry)


def _rows_folder(paths: Sequence[str]) -> str:
    """The folder of the run's rows files as the page names it, relative to the run.

    ``rows`` unless every rows file lies in a legacy folder (a run written before schema
    version 3).
    """
    folders = {path.rsplit("/", 2)[-2] for path in paths}
    return ROWS_FOLDER if ROWS_FOLDER in folders or not folders else min(folders)


def _check_report_options(gallery_size: int, n_boot: int) -> None:
    """Refuse a gallery size below 0 and fewer than 1 bootstrap resample (integers only)."""
    if isinstance(gallery_size, bool) or not isinstance(gallery_size, int) or gallery_size < 0:
        raise ValueError(f"gallery_size must be an integer >= 0, got {short_repr(gallery_size)}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {short_repr(n_boot)}")


def _gallery(
    run_url: str,
    rows: pa.Table,
    summary: list[dict[str, Any]],
    run_json: Mapping[str, Any] | None,
    statuses: Sequence[Mapping[str, Any]],
    gallery_size: int,
    storage_options: Mapping[str, Any] | None,
    data_storage_options: Mapping[str, Any] | None,
) -> Gallery:
    """The gallery of the first model's methods, read back as the run preprocessed them."""
    models = {r["model"] for r in summary}
    gallery_methods = [r["method"] for r in summary if r["model"] == min(models, default=None)]
    resize_size, resize_known = _resize_size(run_json, statuses)
    return build_gallery(
        run_url,
        rows,
        gallery_methods,
        size=gallery_size,
        storage_options=storage_options,
        data_storage_options=data_storage_options,
        resize_size=resize_size,
        resize_known=resize_known,
        preprocess_options=_preprocess_options(run_json, statuses),
    )


def _outputs(
    figures: list[Figure],
    gallery: Gallery,
    summary: list[dict[str, Any]],
    markdown_file: str,
    content: PageContent,
    n_boot: int,
    seed: int,
) -> list[tuple[str, bytes]]:
    """The report's files as (name under ``report/``, bytes): figures, summary, page."""
    outputs: list[tuple[str, bytes]] = [
        (f"figures/{f.name}", f.png) for f in figures if f.png is not None
    ]
    if gallery.png is not None:
        outputs.append(("figures/gallery.png", gallery.png))
    outputs += [
        ("summary.parquet", _parquet_bytes(_with_bootstrap(summary_table(summary), n_boot, seed))),
        ("summary.md", markdown_file.encode("utf-8")),
        ("index.html", render_index(content).encode("utf-8")),
    ]
    return outputs


def _write_outputs(
    folder: str, outputs: list[tuple[str, bytes]], storage_options: Mapping[str, Any] | None
) -> list[str]:
    """Write the report's files (each atomically) into ``folder``; their URLs, in order.

    Figures of an earlier build that this one did not draw are deleted first.
    """
    _remove_stale_figures(
        f"{folder}/figures",
        {name.rsplit("/", 1)[-1] for name, _ in outputs if name.startswith("figures/")},
        storage_options,
    )
    files = []
    for name, data in outputs:
        url = f"{folder}/{name}"
        store.atomic_write_bytes(url, data, storage_options)
        files.append(url)
    return files


def build_report(  # size: the report's steps in order, each a call, sharing a dozen values
    run_url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    data_storage_options: Mapping[str, Any] | None = None,
    gallery_size: int = 4,
    n_boot: int = 1000,
    seed: int = 0,
) -> ReportResult:
    """Aggregate a run and write its report to ``<run_url>/report/``.

    Writes ``index.html`` (self-contained: figures embedded as data URIs, inline CSS, no
    script), ``summary.md``, ``summary.parquet`` (schema
    :data:`opticam.report.SUMMARY_SCHEMA`) and ``figures/*.png``. See
    :mod:`opticam.report.summary` for the summary metrics (means in percent with 95%
    bootstrap intervals) and :mod:`opticam.report.gallery` for the gallery.

    Args:
        run_url: the run folder (``<output>/<run_id>``), any fsspec URL.
        storage_options: fsspec options of the run folder (endpoint, credentials).
        data_storage_options: fsspec options for reading the data shards back for the
            gallery; defaults to ``storage_options``.
        gallery_size: images in the gallery (0: no gallery, no data read).
        n_boot: bootstrap resamples per interval (>= 1).
        seed: bootstrap seed; the same run, ``n_boot`` and ``seed`` give the same summary.

    A figure whose drawing raises is replaced by a note on the page and in
    ``summary.md`` (``figure 'gallery' could not be drawn: <type>: <message>``) and logged
    at WARNING, with its traceback, on the ``opticam.report`` logger; the rest of the
    report is still written.

    Returns:
        The :class:`ReportResult`.

    Raises:
        ValueError: ``gallery_size`` < 0 or ``n_boot`` < 1.
        OSError: and anything else raised while reading the run or writing the report.
    """
    _check_report_options(gallery_size, n_boot)
    run_url = run_url.rstrip("/")
    if data_storage_options is None:
        data_storage_options = storage_options

    run_json = store.read_run_json(run_url, storage_options)
    unreadable: dict[str, str] = {}
    rows = store.read_rows(run_url, _ROW_COLUMNS, storage_options, unreadable=unreadable)
    errors = store.read_errors(run_url, storage_options, unreadable=unreadable)
    _, rows_files = list_rows_files(run_url, storage_options)
    done = list(rows_files)  # what store.list_done_rows lists, with the files' paths
    statuses = store.read_statuses(run_url, storage_options)
    run_id = (run_json or {}).get("run_id")
    if run_id is None and rows.num_rows:
        run_id = rows.column("run_id")[0].as_py()

    summary = summarize(
        rows, run_id=run_id, method_order=_methods_of(run_json), n_boot=n_boot, seed=seed
    )
    figures = _figures(run_url, rows, summary, storage_options) if summary else []
    gallery = _gallery(
        run_url,
        rows,
        summary,
        run_json,
        statuses,
        gallery_size,
        storage_options,
        data_storage_options,
    )
    counts, notes = _counts(rows, errors, run_json, done, statuses)
    notes += [
        f"Left out: {url} could not be read ({why}). Rerun the job to compute its shard "
        "again (the damaged file is moved to damaged/)."
        for url, why in sorted(unreadable.items())
    ]
    stage_counts = errors.group_by("stage").aggregate([("stage", "count")]).to_pylist()
    content = PageContent(
        run_id=run_id,
        run_url=run_url,
        run_json=run_json,
        summary=summary,
        counts=counts,
        notes=notes,
        figures=figures,
        gallery=gallery if gallery_size > 0 and rows.num_rows else None,
        errors_by_stage={r["stage"]: int(r["stage_count"]) for r in stage_counts},
        error_rows=errors.slice(0, _MAX_ERROR_ROWS).to_pylist(),
        n_boot=n_boot,
        seed=seed,
        rows_folder=_rows_folder([path for path, _ in rows_files.values()]),
    )
    failures = [f.failure for f in figures if f.failure is not None]
    if gallery.failure is not None:
        failures.append(gallery.failure)
    markdown = _markdown(summary, [*_prior_note(counts), *notes, *failures], n_boot, seed)
    markdown_file = f"# Opti-CAM summary — {markdown_text(run_id or 'run')}\n\n{markdown}"

    folder = store.report_url(run_url)
    outputs = _outputs(figures, gallery, summary, markdown_file, content, n_boot, seed)
    files = _write_outputs(folder, outputs, storage_options)
    return ReportResult(
        summary=summary, summary_markdown=markdown, index_url=f"{folder}/index.html", files=files
    )
