"""The report's ``index.html``: one self-contained page.

Everything the page shows is inside the file: figures as ``data:image/png;base64`` URIs,
CSS inline, no script, no web font, no external request. It opens offline from a local
folder, an S3 console download or an e-mail attachment alike. Every text that comes from
the run (keys, URLs, error messages, config values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opticam.report.gallery import Gallery
from opticam.report.summary import (
    CONFIDENCE,
    MetricInfo,
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

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1d2329; background: #fff; line-height: 1.45; }
main { max-width: 1200px; margin: 0 auto; padding: 1.5rem 2rem 3rem; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #d0d7de;
     padding-bottom: .25rem; }
.meta { color: #57606a; margin: 0; }
.note { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px;
        padding: .5rem .8rem; margin: .6rem 0; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .55rem; vertical-align: top; }
th { background: #f6f8fa; text-align: left; }
td.num, th.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.best { font-weight: 700; }
.ci { color: #57606a; font-size: .8em; display: block; }
figure { margin: 1rem 0 1.6rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: .9rem; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .8rem; }
.counts td:first-child { color: #57606a; }
.msg { max-width: 60ch; overflow-wrap: anywhere; }
"""


@dataclass
class Figure:
    """One figure of the page.

    Attributes:
        name: file name under ``report/figures/`` (e.g. ``faithfulness.png``).
        title: heading shown above it.
        caption: what it shows and how to read it.
        png: the PNG bytes (embedded in the page).
    """

    name: str
    title: str
    caption: str
    png: bytes


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


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _best(summary: Sequence[Mapping[str, Any]], metric: MetricInfo) -> set[int]:
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


def _summary_table(summary: Sequence[Mapping[str, Any]]) -> str:
    metrics = summary_columns(summary)
    show_model = len({r.get("model") for r in summary}) > 1
    head = [*(["<th>model</th>"] if show_model else []), "<th>method</th>"]
    head.append('<th class="num">images</th>')
    for m in metrics:
        head.append(
            f'<th class="num" title="{_e(m.title)}: {m.direction} is better">'
            f"{_e(metric_header(m))}</th>"
        )
    best = {m.name: _best(summary, m) for m in metrics}
    body = []
    for i, row in enumerate(summary):
        cells = [*([f"<td>{_e(row.get('model'))}</td>"] if show_model else [])]
        cells.append(f"<td>{_e(row.get('method'))}</td>")
        cells.append(f'<td class="num">{_e(row.get("images"))}</td>')
        for m in metrics:
            mean = row.get(m.name)
            css = "num best" if i in best[m.name] else "num"
            text = _e(format_value(m, mean))
            if mean is not None:
                low = format_value(m, row.get(f"{m.name}_ci_low"))
                high = format_value(m, row.get(f"{m.name}_ci_high"))
                text += f'<span class="ci">[{_e(low)}, {_e(high)}]</span>'
            cells.append(f'<td class="{css}">{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<table id="summary">\n<thead><tr>'
        + "".join(head)
        + "</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + ("\n" if body else "")
        + "</tbody>\n</table>"
    )


def _legend(summary: Sequence[Mapping[str, Any]]) -> str:
    items = [
        f"<li><b>{_e(metric_header(m))}</b> {_e(m.title)} "
        f"({'lower' if m.direction == 'lower' else 'higher'} is better"
        f"{', seconds' if m.unit == 's' else ', percent'})</li>"
        for m in summary_columns(summary)
    ]
    return "<ul>" + "".join(items) + "</ul>" if items else ""


def _gallery(gallery: Gallery | None) -> str:
    if gallery is None:
        return ""
    parts = ['<section id="gallery">', "<h2>Gallery</h2>"]
    parts += [f'<p class="note">{_e(n)}</p>' for n in gallery.notes]
    if gallery.png is None:
        parts.append("<p>No images to show.</p>")
    else:
        keys = ", ".join(item.key for item in gallery.items)
        parts.append(
            f'<figure><img src="{data_uri(gallery.png)}" alt="saliency maps of {_e(keys)}">'
            "<figcaption>Each row is one image: the input as the model saw it (ground-truth "
            "boxes in green when the sample has them), then every method's map over it "
            "(jet colour map, red = salient), with the image's drop and gain. Images: "
            f"{_e(keys)} (model {_e(gallery.model)}).</figcaption></figure>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _errors(content: PageContent) -> str:
    total = sum(content.errors_by_stage.values())
    parts = ['<section id="errors">', "<h2>Errors</h2>"]
    if not total:
        parts.append("<p>No error rows.</p>")
    else:
        parts.append(
            '<table><thead><tr><th>stage</th><th class="num">rows</th></tr></thead><tbody>'
        )
        for stage, count in sorted(content.errors_by_stage.items(), key=lambda kv: (-kv[1], kv[0])):
            parts.append(f'<tr><td>{_e(stage)}</td><td class="num">{count}</td></tr>')
        parts.append("</tbody></table>")
        parts.append(
            f"<p>First {len(content.error_rows)} of {total} error rows "
            "(all of them are in <code>errors/*.parquet</code>):</p>"
        )
        parts.append(
            "<table><thead><tr><th>shard</th><th>key</th><th>stage</th><th>message</th>"
            "</tr></thead><tbody>"
        )
        for row in content.error_rows:
            shard = str(row.get("shard", "")).rsplit("/", 1)[-1]
            parts.append(
                f"<tr><td>{_e(shard)}</td><td>{_e(row.get('key') or '')}</td>"
                f'<td>{_e(row.get("stage"))}</td><td class="msg">{_e(row.get("message"))}</td></tr>'
            )
        parts.append("</tbody></table>")
    parts.append("</section>")
    return "\n".join(parts)


def _config(run_json: Mapping[str, Any] | None) -> str:
    parts = ['<section id="config">', "<h2>Run configuration</h2>"]
    if run_json is None:
        parts.append("<p>This run folder has no <code>run.json</code>.</p>")
    else:
        public = redact(dict(run_json))
        shards = public.pop("shards", None)
        versions = public.pop("versions", None)
        if isinstance(shards, list):
            public["shards"] = f"{len(shards)} shard(s), listed in run.json"
        parts.append(f"<pre>{_e(json.dumps(public, indent=2, sort_keys=True))}</pre>")
        if isinstance(versions, Mapping) and versions:
            rows = "".join(
                f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in sorted(versions.items())
            )
            parts.append(
                "<table><thead><tr><th>package</th><th>version</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>"
            )
    parts.append("</section>")
    return "\n".join(parts)


def render_index(content: PageContent) -> str:
    """The complete ``index.html`` of a report (see the module doc)."""
    config = (content.run_json or {}).get("config") or {}
    model = (config.get("model") or {}).get("source") if isinstance(config, Mapping) else None
    title = f"Opti-CAM report — {content.run_id or 'run'}"
    summary = content.summary
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">Run folder: <code>{_e(redact(content.run_url))}</code>'
        + (f" · model <code>{_e(model)}</code>" if model else "")
        + "</p>",
    ]
    parts += [f'<p class="note">{_e(n)}</p>' for n in content.notes]
    parts.append('<table class="counts"><tbody>')
    parts += [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in content.counts]
    parts.append("</tbody></table>")

    parts += ['<section id="summary-section">', "<h2>Summary</h2>"]
    parts.append(
        f"<p>Mean per image, with a {round(100 * CONFIDENCE)}% percentile bootstrap interval "
        f"({content.n_boot} resamples, seed {content.seed}) under each mean. Best mean per "
        "column in bold. ↓: lower is better, ↑: higher is better.</p>"
    )
    parts.append(_summary_table(summary))
    if not summary:
        parts.append("<p>No results yet: no shard of this run has finished.</p>")
    parts.append(_legend(summary))
    parts.append(
        '<p>Also as <a href="summary.md">summary.md</a> (Markdown) and '
        '<a href="summary.parquet">summary.parquet</a>; per-image rows in '
        "<code>shards/*.parquet</code>.</p>"
    )
    parts.append("</section>")

    if content.figures:
        parts += ['<section id="figures">', "<h2>Figures</h2>"]
        for fig in content.figures:
            parts.append(
                f'<figure id="fig-{_e(fig.name.rsplit(".", 1)[0])}"><h3>{_e(fig.title)}</h3>'
                f'<img src="{data_uri(fig.png)}" alt="{_e(fig.title)}">'
                f"<figcaption>{_e(fig.caption)}</figcaption></figure>"
            )
        parts.append("</section>")
    parts.append(_gallery(content.gallery))
    parts.append(_errors(content))
    parts.append(_config(content.run_json))
    parts += ["</main></body>", "</html>", ""]
    return "\n".join(p for p in parts if p)
