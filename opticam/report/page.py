"""The report's ``index.html``: one self-contained page, rendered from a Jinja2 template.

Everything the page shows is inside the file: figures as ``data:image/png;base64`` URIs,
CSS inline, no script, no web font, no external request. It opens offline from a local
folder, an S3 console download or an e-mail attachment alike.

The markup lives in ``templates/index.html.j2`` (and its CSS in ``style.css.j2``); this
module turns a :class:`PageContent` into the plain values the template shows. The
template environment escapes every value (``autoescape=True``), so text that comes from
the run (keys, URLs, method names, error messages, config values) is always shown as
text, never interpreted as HTML.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2

from opticam.names import Metric
from opticam.report.colors import COLORMAP
from opticam.report.gallery import Gallery
from opticam.report.summary import (
    CONFIDENCE,
    better,
    format_value,
    metric_header,
    summary_columns,
)

__all__ = ["Figure", "PageContent", "data_uri", "redact", "render_index"]

# Config keys whose values never reach the page, whatever run.json holds (it should hold
# no secret: RunConfig leaves storage options out; this is the second line of defence).
_SECRET_NAME = re.compile(
    r"(secret|password|passwd|token|credential|storage_options|client_kwargs|"
    r"^key$|_key$|^auth)",
    re.IGNORECASE,
)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@", re.I)

# autoescape=True, not select_autoescape: every template here is HTML (or CSS included
# into it), and a template name must never be able to switch escaping off.
# StrictUndefined: a misspelt variable is an error, not an empty cell.
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("opticam.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_UNIT_WORDS = {"%": "percent", "s": "seconds"}


@dataclass
class Figure:
    """One figure of the page.

    Attributes:
        name: file name under ``report/figures/`` (e.g. ``faithfulness.png``).
        title: heading shown above it.
        caption: what it shows and how to read it.
        png: the PNG bytes (embedded in the page), or None when drawing failed.
        failure: why it could not be drawn (shown in its place), when ``png`` is None.

    Raises:
        ValueError: neither or both of ``png`` and ``failure`` are given.
    """

    name: str
    title: str
    caption: str
    png: bytes | None
    failure: str | None = None

    def __post_init__(self) -> None:
        """Refuse a figure with neither or both of ``png`` and ``failure``."""
        if (self.png is None) == (self.failure is None):
            raise ValueError(
                f"figure {self.name!r} needs either PNG bytes or a failure note, "
                f"got png={'None' if self.png is None else 'bytes'}, failure={self.failure!r}"
            )


@dataclass
class PageContent:
    """Everything :func:`render_index` puts on the page.

    Attributes:
        run_id: the run id (None when unknown).
        run_url: where the run lives.
        run_json: the run's ``run.json`` (None when absent); secrets are redacted here.
        summary: summary rows (see :mod:`opticam.report.summary`).
        counts: label -> value for the counts table (images, rows, errors, shards, ...).
        notes: warnings shown at the top (partial run, no results yet, ...).
        figures: the metric figures, in page order.
        gallery: the gallery (may be empty).
        errors_by_stage: stage -> number of error rows.
        error_rows: a few error rows (``shard``, ``key``, ``stage``, ``message``).
        n_boot: bootstrap resamples of the intervals.
        seed: bootstrap seed.
        rows_folder: the run's folder of rows files, relative to the run (``rows``, or
            ``shards`` in a run written before schema version 3).
    """

    run_id: str | None
    run_url: str
    run_json: Mapping[str, Any] | None
    summary: Sequence[Mapping[str, Any]]
    counts: Sequence[tuple[str, str]]
    notes: Sequence[str] = ()
    figures: Sequence[Figure] = ()
    gallery: Gallery | None = None
    errors_by_stage: Mapping[str, int] = field(default_factory=dict)
    error_rows: Sequence[Mapping[str, Any]] = ()
    n_boot: int = 1000
    seed: int = 0
    rows_folder: str = "rows"


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding PNG bytes in the page."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def redact(value: Any) -> Any:
    """A copy of JSON-like ``value`` with secret-looking entries and URL passwords removed.

    Dict entries whose key names a secret (``secret``, ``password``, ``token``, ``key``,
    ``*_key``, ``storage_options``, ``client_kwargs``, ...) become ``"<redacted>"``;
    ``scheme://user:password@host`` in strings loses its password.
    """
    if isinstance(value, Mapping):
        return {
            k: "<redacted>" if _SECRET_NAME.search(str(k)) else redact(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<scheme>\g<user>:<redacted>@", value)
    return value


def _best(summary: Sequence[Mapping[str, Any]], metric: Metric) -> set[int]:
    """Indices of the rows to show in bold: the best mean of ``metric`` within each model.

    Means are compared as displayed (rounded), so rows that read the same tie; a column
    where every row of a model ties has no best, and neither has a model with one method.
    """
    shown: dict[Any, list[tuple[float, int]]] = {}
    for i, row in enumerate(summary):
        value = row.get(metric.name)
        if value is not None:
            rounded = float(format_value(metric, value))
            score = -rounded if metric.direction == "lower" else rounded
            shown.setdefault(row.get("model"), []).append((score, i))
    best = set()
    for scores in shown.values():
        top = max(score for score, _ in scores)
        winners = [i for score, i in scores if score == top]
        if len(winners) < len(scores):
            best.update(winners)
    return best


def _summary_context(summary: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Header, rows and legend of the summary table, as the template shows them."""
    metrics = summary_columns(summary)
    best = {m.name: _best(summary, m) for m in metrics}
    columns = [
        {
            "header": metric_header(m),
            "title": m.title,
            "better": better(m),
            "unit": _UNIT_WORDS.get(m.unit, m.unit),
        }
        for m in metrics
    ]
    rows = []
    for i, row in enumerate(summary):
        cells = []
        for m in metrics:
            mean = row.get(m.name)
            ci = None
            if mean is not None:
                ci = (
                    format_value(m, row.get(f"{m.name}_ci_low")),
                    format_value(m, row.get(f"{m.name}_ci_high")),
                )
            cells.append({"mean": format_value(m, mean), "ci": ci, "best": i in best[m.name]})
        rows.append(
            {
                "model": row.get("model"),
                "method": row.get("method"),
                "images": row.get("images"),
                "cells": cells,
            }
        )
    return {
        "show_model": len({r.get("model") for r in summary}) > 1,
        "columns": columns,
        "rows": rows,
    }


def _gallery_context(gallery: Gallery | None) -> dict[str, Any] | None:
    if gallery is None:
        return None
    return {
        "notes": list(gallery.notes),
        "src": None if gallery.png is None else data_uri(gallery.png),
        "failure": gallery.failure,
        "empty": not gallery.items,
        "image_keys": ", ".join(item.key for item in gallery.items),
        "model": gallery.model,
        "colormap": COLORMAP,
    }


def _errors_context(content: PageContent) -> dict[str, Any]:
    stages = sorted(content.errors_by_stage.items(), key=lambda kv: (-kv[1], kv[0]))
    rows = [
        {
            # The file name says which shard; the full URL is in errors/*.parquet.
            "shard": str(row.get("shard", "")).rsplit("/", 1)[-1],
            "key": row.get("key") or "",
            "stage": row.get("stage"),
            "message": row.get("message"),
        }
        for row in content.error_rows
    ]
    return {"total": sum(content.errors_by_stage.values()), "stages": stages, "rows": rows}


def _config_context(run_json: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if run_json is None:
        return None
    public = redact(dict(run_json))
    shards = public.pop("shards", None)
    versions = public.pop("versions", None)
    if isinstance(shards, list):
        public["shards"] = f"{len(shards)} shard(s), listed in run.json"
    return {
        "json": json.dumps(public, indent=2, sort_keys=True),
        "versions": sorted(versions.items()) if isinstance(versions, Mapping) else [],
    }


def _loaded_model_context(run_json: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The target layer and input normalization that the run's model applied.

    They come from run.json's ``loaded_model``; None for runs written before it was
    recorded.
    """
    described = (run_json or {}).get("loaded_model")
    if not isinstance(described, Mapping):
        return None

    def values(key: str) -> str:
        numbers = described.get(key)
        if not isinstance(numbers, list):
            return "?"
        return (
            "(" + ", ".join(f"{v:g}" if isinstance(v, float | int) else "?" for v in numbers) + ")"
        )

    if described.get("mean") is None:
        normalization = "none applied by opticam (the model's own)"
    else:
        normalization = f"mean {values('mean')}, std {values('std')}"
    return {"target_layer": str(described.get("target_layer")), "normalization": normalization}


def render_index(content: PageContent) -> str:
    """The complete ``index.html`` of a report (see the module doc)."""
    config = (content.run_json or {}).get("config") or {}
    model = (config.get("model") or {}).get("source") if isinstance(config, Mapping) else None
    return _TEMPLATES.get_template("index.html.j2").render(
        title=f"Opti-CAM report — {content.run_id or 'run'}",
        run_url=redact(content.run_url),
        model=model,
        loaded_model=_loaded_model_context(content.run_json),
        notes=list(content.notes),
        counts=list(content.counts),
        confidence_percent=round(100 * CONFIDENCE),
        n_boot=content.n_boot,
        seed=content.seed,
        rows_folder=content.rows_folder,
        **_summary_context(content.summary),
        figures=[
            {
                "id": fig.name.rsplit(".", 1)[0],
                "title": fig.title,
                "caption": fig.caption,
                "src": None if fig.png is None else data_uri(fig.png),
                "failure": fig.failure,
            }
            for fig in content.figures
        ],
        gallery=_gallery_context(content.gallery),
        errors=_errors_context(content),
        config=_config_context(content.run_json),
    )
