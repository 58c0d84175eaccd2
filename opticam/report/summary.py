"""Dataset-level summary of a run: one row per (model, method), with bootstrap intervals.

Every summary metric is the mean over images of a per-image Parquet column, in the
paper's units (percent for the fractions, seconds for time). For each metric ``m`` of
the one table :data:`opticam.names.METRICS` (names, headers, directions, units)::

    summary[m.name] = m.scale * mean(rows[m.column])

e.g. ``average_drop = 100 * mean(drop)`` (AD) and ``seconds_per_image = mean(seconds)``.

Null (or NaN) values are left out of a metric's mean, so localization means are over
the images that have boxes and insertion/deletion over the images where they were
computed. Each mean carries a 95% percentile bootstrap interval
(:class:`opticam.metrics.MetricAggregator`), deterministic for a given seed.

The summary is a list of plain dicts (what :class:`~opticam.report.ReportResult` holds
and ``summary.parquet`` stores), with the keys of :data:`SUMMARY_SCHEMA`; a metric with no
value in a group is ``None``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opticam.errors import short_repr
from opticam.metrics import MetricAggregator, to_paper_units
from opticam.names import METRICS, METRICS_BY_NAME, Metric

__all__ = [
    "CONFIDENCE",
    "SUMMARY_SCHEMA",
    "SOURCE_COLUMNS",
    "better",
    "float_column",
    "format_table",
    "format_value",
    "markdown_text",
    "metric_header",
    "summarize",
    "summary_columns",
    "summary_markdown",
    "summary_table",
]

#: Coverage of the bootstrap intervals.
CONFIDENCE = 0.95


#: Per-image columns the summary reads (besides model and method).
SOURCE_COLUMNS: tuple[str, ...] = (*(m.column for m in METRICS), "constant_map")

_COUNT_FIELDS = ("images", "images_with_boxes", "constant_maps")


def _summary_fields() -> list[pa.Field]:
    fields = [
        pa.field("run_id", pa.string()),
        pa.field("model", pa.string()),
        pa.field("method", pa.string()),
        *(pa.field(name, pa.int64()) for name in _COUNT_FIELDS),
    ]
    for m in METRICS:
        fields += [
            pa.field(m.name, pa.float64()),
            pa.field(f"{m.name}_ci_low", pa.float64()),
            pa.field(f"{m.name}_ci_high", pa.float64()),
        ]
    return fields


#: Columns of ``summary.parquet`` (and keys of every summary dict).
#: ``images``: rows of the group; ``images_with_boxes``: rows with localization values;
#: ``constant_maps``: rows whose map was constant (normalized to all ones).
SUMMARY_SCHEMA = pa.schema(_summary_fields())


def float_column(table: pa.Table, name: str) -> np.ndarray:
    """A column as float64 numpy with NaN for nulls (booleans become 0.0 / 1.0)."""
    column = pc.cast(table.column(name), pa.float64())
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)


def _nan_to_none(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def summarize(
    rows: pa.Table,
    *,
    run_id: str | None = None,
    method_order: Sequence[str] = (),
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Summarise per-image rows into one dict per (model, method).

    Args:
        rows: per-image rows with ``model``, ``method`` and the per-image metric columns
            (``drop``, ``gain``, ``increase``, ``insertion_auc``, ``deletion_auc``, the
            localization columns, ``seconds``, ``constant_map``); any subset of runs.
        run_id: stored in every summary row (``None`` when unknown).
        method_order: preferred method order (e.g. the run config's); methods not listed
            follow in alphabetical order. Models are sorted.
        n_boot: bootstrap resamples per interval.
        seed: seed of every bootstrap (the same seed for each metric and group, so a
            summary is reproducible and one metric's interval never depends on another).

    Returns:
        Dicts with the keys of :data:`SUMMARY_SCHEMA`: the mean of each metric (see the
        module doc) and its ``_ci_low`` / ``_ci_high``; ``None`` where a group has no value.
    """
    if rows.num_rows == 0:
        return []
    models = np.asarray(rows.column("model").to_pylist(), dtype=object)
    methods = np.asarray(rows.column("method").to_pylist(), dtype=object)
    rank = {name: i for i, name in enumerate(method_order)}
    groups = sorted(
        {(str(a), str(b)) for a, b in zip(models, methods, strict=True)},
        key=lambda g: (g[0], rank.get(g[1], len(rank)), g[1]),
    )
    per_image = {m.column: float_column(rows, m.column) for m in METRICS}
    constant = float_column(rows, "constant_map")

    summary = []
    for model, method in groups:
        mask = (models == model) & (methods == method)
        aggregator = MetricAggregator()
        aggregator.update(to_paper_units({k: v[mask] for k, v in per_image.items()}))
        stats = aggregator.summary(confidence=CONFIDENCE, n_boot=n_boot, seed=seed)
        row: dict[str, Any] = {
            "run_id": run_id,
            "model": model,
            "method": method,
            "images": int(mask.sum()),
            "images_with_boxes": int(stats["pointing_game"]["n"]),
            "constant_maps": int(np.nansum(constant[mask])),
        }
        for m in METRICS:
            s = stats[m.name]
            row[m.name] = _nan_to_none(s["mean"])
            row[f"{m.name}_ci_low"] = _nan_to_none(s["ci_low"])
            row[f"{m.name}_ci_high"] = _nan_to_none(s["ci_high"])
        summary.append(row)
    return summary


def summary_table(summary: Sequence[Mapping[str, Any]]) -> pa.Table:
    """The summary dicts as a table with :data:`SUMMARY_SCHEMA` (empty but typed if none)."""
    return pa.Table.from_pylist([dict(r) for r in summary], schema=SUMMARY_SCHEMA)


# --------------------------------------------------------------------------- formatting

# What opens an inline construct in CommonMark or GitHub-flavoured Markdown: backslash
# escapes, code spans, emphasis, strikethrough, links and images, autolinks and raw HTML,
# entity references, table cells, and GitHub's $math$. Each is backslash-escaped, which
# CommonMark defines for every ASCII punctuation character.
_MARKDOWN_INLINE = re.compile(r"[\\`*_~\[\]<&|$]")
# A line break would end a table row, or start a new block.
_LINE_BREAK = re.compile(r"\s*[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]\s*")
# What opens a block when it begins a line: heading, quote, list item, setext underline,
# thematic break (``*`` and ``_`` are already escaped), and an ordered list's ``1.``.
_BLOCK_MARKER = re.compile(r"^[#>+=-]")
_ORDERED_MARKER = re.compile(r"^(\d{1,9})([.)])(?=\s|$)")


def markdown_text(text: str) -> str:
    r"""``text`` escaped for Markdown, so that it renders as the characters it holds.

    Every table cell, and every piece of text from the data (keys, shard URLs, model and
    method names, error messages) that goes into Markdown passes through here: ``|`` would
    split a table cell; ``*``, ``_``, backticks, ``[...](...)``, ``<b>``, ``&lt;``,
    ``~~`` and ``$...$`` would become emphasis, code, a link, HTML, an entity,
    strikethrough or math. Those characters are backslash-escaped (CommonMark and GitHub
    render ``\*`` as ``*``); a ``#``, ``>``, ``+``, ``-``, ``=`` or ``1.`` that would open
    a block at the start of a line is escaped too, so the result is safe wherever inline
    text goes: a table cell, a paragraph, a heading, after ``> ``.

    Line breaks cannot be kept (one would end the table row): each, with the spaces around
    it, becomes one space, and the ends are stripped, which is how Markdown and HTML show
    them anyway.

    Args:
        text: any string.

    Returns:
        The Markdown source, one line.
    """
    flat = _LINE_BREAK.sub(" ", text).strip()
    escaped = _MARKDOWN_INLINE.sub(lambda match: "\\" + match.group(), flat)
    escaped = _ORDERED_MARKER.sub(r"\1\\\2", escaped)
    return _BLOCK_MARKER.sub(r"\\\g<0>", escaped)


def summary_columns(summary: Sequence[Mapping[str, Any]]) -> list[Metric]:
    """The metrics that have a value in at least one summary row, in display order."""
    return [m for m in METRICS if any(r.get(m.name) is not None for r in summary)]


def _metric(metric: str | Metric) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if metric not in METRICS_BY_NAME:
        raise KeyError(f"unknown metric {short_repr(metric)} (known: {', '.join(METRICS_BY_NAME)})")
    return METRICS_BY_NAME[metric]


def better(metric: str | Metric) -> str:
    """How to read a metric: ``"lower is better"`` or ``"higher is better"``."""
    return f"{_metric(metric).direction} is better"


def metric_header(metric: str | Metric) -> str:
    """Table header of a metric with its direction, e.g. ``AD ↓``."""
    info = _metric(metric)
    return f"{info.short} {info.arrow}"


def format_value(metric: str | Metric, value: float | None) -> str:
    """A metric value for tables: percent with one decimal, seconds with 3 digits."""
    info = _metric(metric)
    if value is None:
        return "–"
    return f"{value:.3g}" if info.unit == "s" else f"{value:.1f}"


def _cell(info: Metric, row: Mapping[str, Any], with_ci: bool) -> str:
    mean = row.get(info.name)
    text = format_value(info, mean)
    if with_ci and mean is not None:
        low, high = row.get(f"{info.name}_ci_low"), row.get(f"{info.name}_ci_high")
        text += f" [{format_value(info, low)}, {format_value(info, high)}]"
    return text


def _text_rows(
    summary: Sequence[Mapping[str, Any]], with_ci: bool
) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by the Markdown and terminal tables."""
    show_model = len({r.get("model") for r in summary}) > 1
    metrics = summary_columns(summary)
    header = [*(["model"] if show_model else []), "method", "images"]
    header += [metric_header(m) for m in metrics]
    body = []
    for r in summary:
        cells = [*([str(r.get("model"))] if show_model else []), str(r.get("method"))]
        cells.append(str(r.get("images", "")))
        cells += [_cell(m, r, with_ci) for m in metrics]
        body.append(cells)
    return header, body


def summary_markdown(summary: Sequence[Mapping[str, Any]], *, with_ci: bool = True) -> str:
    """The summary as a GitHub-flavoured Markdown table (a line per (model, method)).

    Columns: ``model`` (only when there are several), ``method``, ``images`` and every
    metric with a value, headed ``AD ↓``, ``AG ↑``, ...; cells read ``mean [ci_low,
    ci_high]`` (``with_ci=False`` drops the interval). An empty summary gives a table
    with a single "no results" line. Every cell goes through :func:`markdown_text`, so
    a model or method name shows as written and never splits or styles the table.
    """
    header, body = _text_rows(summary, with_ci)
    if not body:
        body = [["(no results yet)", *([""] * (len(header) - 1))]]
    right = [i for i, h in enumerate(header) if h not in ("model", "method")]
    align = ["---:" if i in right else "---" for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    cells = [[markdown_text(c) for c in row] for row in [header, *body]]
    return "\n".join([line(cells[0]), line(align), *(line(c) for c in cells[1:])]) + "\n"


def format_table(summary: Sequence[Mapping[str, Any]], *, with_ci: bool = True) -> str:
    """The summary as an aligned plain-text table for a terminal.

    Same columns and cells as :func:`summary_markdown`; text columns left-aligned,
    numbers right-aligned, a rule under the header.
    """
    header, body = _text_rows(summary, with_ci)
    if not body:
        return "(no results yet)\n"
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    text_columns = {i for i, h in enumerate(header) if h in ("model", "method")}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in text_columns else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(c) for c in body)]) + "\n"
