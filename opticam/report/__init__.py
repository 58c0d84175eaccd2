"""Reports of a run: summary with confidence intervals, figures, gallery, HTML and Markdown.

- :func:`build_report`: read ``<run>/shards/*.parquet``, summarise, draw and write
  ``<run>/report/`` (``index.html``, ``summary.md``, ``summary.parquet``,
  ``figures/*.png``); works on partial and empty runs, on any fsspec URL.
- :func:`summarize`: per-image rows -> one dict per (model, method), metrics in percent
  with 95% bootstrap intervals.
- :func:`summary_markdown`, :func:`format_table`: the summary as a Markdown table or an
  aligned terminal table (what ``opticam report`` prints).

Submodules: :mod:`~opticam.report.summary` (numbers), :mod:`~opticam.report.figures`
(matplotlib, Agg), :mod:`~opticam.report.gallery` (maps over their images),
:mod:`~opticam.report.page` (the HTML page), :mod:`~opticam.report.build` (I/O).
"""

from opticam.report.build import ReportResult, build_report
from opticam.report.summary import (
    SUMMARY_METRICS,
    SUMMARY_SCHEMA,
    MetricInfo,
    format_table,
    summarize,
    summary_markdown,
    summary_table,
)

__all__ = [
    "SUMMARY_METRICS",
    "SUMMARY_SCHEMA",
    "MetricInfo",
    "ReportResult",
    "build_report",
    "format_table",
    "summarize",
    "summary_markdown",
    "summary_table",
]
