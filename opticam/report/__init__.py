"""Reports of a run: summary with confidence intervals, figures, gallery, HTML and Markdown.

- :func:`build_report`: read ``<run>/rows/*.parquet``, summarise, draw and write
  ``<run>/report/`` (``index.html``, ``summary.md``, ``summary.parquet``,
  ``figures/*.png``); works on partial and empty runs, on any fsspec URL.
- :func:`summarize`: per-image rows -> one dict per (model, method), metrics in percent
  with 95% bootstrap intervals.
- :func:`summary_markdown`, :func:`format_table`: the summary as a Markdown table or an
  aligned terminal table (what ``opticam report`` prints).
- :func:`markdown_text`: any text (a key, a URL, a name) escaped so that Markdown shows
  it as written; for everything from a run that goes into Markdown (Prefect artifacts).

Submodules: :mod:`~opticam.report.summary` (numbers), :mod:`~opticam.report.figures`
(matplotlib, Agg), :mod:`~opticam.report.colors` (the colour map of saliency maps, also
used by the CLI's overlays), :mod:`~opticam.report.gallery` (maps over their images),
:mod:`~opticam.report.page` (the HTML page, from ``templates/``),
:mod:`~opticam.report.build` (I/O).

The names below are imported on first use, so that ``from opticam.report.colors import
overlay`` does not import the store, pyarrow or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opticam.lazy import lazy_attributes

if TYPE_CHECKING:
    from opticam.report.build import ReportResult, build_report
    from opticam.report.summary import (
        SUMMARY_SCHEMA,
        format_table,
        markdown_text,
        summarize,
        summary_markdown,
        summary_table,
    )

__all__ = [
    "SUMMARY_SCHEMA",
    "ReportResult",
    "build_report",
    "format_table",
    "markdown_text",
    "summarize",
    "summary_markdown",
    "summary_table",
]

_LAZY = {
    "ReportResult": "opticam.report.build",
    "build_report": "opticam.report.build",
    **dict.fromkeys(
        (
            "SUMMARY_SCHEMA",
            "format_table",
            "markdown_text",
            "summarize",
            "summary_markdown",
            "summary_table",
        ),
        "opticam.report.summary",
    ),
}


__getattr__ = lazy_attributes(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
