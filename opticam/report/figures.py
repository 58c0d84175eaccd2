r"""Report figures, drawn with matplotlib's Agg renderer and returned as PNG bytes.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through
``pyplot``: no global figure registry, no interactive backend chosen behind the
caller's back, and nothing to close (a figure is freed with its last reference).
PNG metadata carries no software version, so a figure's bytes depend only on its data
and the matplotlib release.

One *series* is one (model, method) summary row; its colour is fixed by its position
in the summary, so a method has the same colour in every figure of a report.

Every string the report puts into a figure (titles, axis labels, tick labels, legend
entries, annotations) is drawn with :data:`LITERAL`: as the characters it holds, never
parsed as mathtext (``$...$``) nor handed to LaTeX, whatever a matplotlibrc says
(``text.usetex``). Sample keys, method and model names come from the data, and one key
such as ``a$\frac{$b`` would otherwise stop matplotlib from drawing the figure. Numbers
on the axes are left to matplotlib's formatters.

:func:`draw_figure` draws one figure so that its failure costs that figure only: the
report shows a note in its place and the traceback goes to the ``opticam.report`` logger.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple, TypedDict

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from opticam.names import Metric
from opticam.report.summary import better, metric_header

__all__ = [
    "LITERAL",
    "Drawing",
    "TextProperties",
    "bar_chart",
    "curves_chart",
    "distributions_chart",
    "draw_figure",
    "png_bytes",
    "series_colors",
    "series_legend",
    "series_label",
]

logger = logging.getLogger("opticam.report")

_DPI = 100


class TextProperties(TypedDict):
    """The matplotlib :class:`~matplotlib.text.Text` properties in :data:`LITERAL`."""

    parse_math: bool
    usetex: bool


#: Text properties that make matplotlib draw a string as it is: no mathtext, no LaTeX.
#: Pass them to every call that draws a string (``ax.set_title(title, **LITERAL)``).
LITERAL: Final[TextProperties] = {"parse_math": False, "usetex": False}


class Drawing(NamedTuple):
    """What :func:`draw_figure` gives back: the PNG, or why there is none.

    Attributes:
        png: the figure's PNG bytes; None when it failed or had nothing to draw.
        failure: ``"figure '<name>' could not be drawn: <ExceptionType>: <message>"``
            when drawing raised, else None.
    """

    png: bytes | None
    failure: str | None


def draw_figure(name: str, draw: Callable[[], bytes | None]) -> Drawing:
    """Call ``draw`` and turn an exception into a note, so one figure never sinks a report.

    Only drawing is guarded: call ``draw`` with data already read, so that a run that
    cannot be read still raises. The failure is logged at WARNING with its traceback on
    the ``opticam.report`` logger.

    Args:
        name: the figure's name in the note and the log (e.g. ``"gallery"``).
        draw: draws the figure; returns PNG bytes, or None when there is nothing to draw.

    Returns:
        ``Drawing(png, None)``, or ``Drawing(None, failure)`` when ``draw`` raised.
    """
    try:
        return Drawing(draw(), None)
    except Exception as error:  # any failure costs this figure, never the report
        logger.warning("figure %r could not be drawn; the report shows a note", name, exc_info=True)
        return Drawing(None, f"figure {name!r} could not be drawn: {type(error).__name__}: {error}")


def png_bytes(figure: Figure) -> bytes:
    """Render ``figure`` to PNG bytes (tight bounding box, no software metadata)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def series_label(row: Mapping[str, Any], several_models: bool) -> str:
    """Legend label of a summary row: ``method``, or ``model · method`` across models."""
    return f"{row['model']} · {row['method']}" if several_models else str(row["method"])


def series_legend(ax: Axes) -> None:
    """The legend of the series, right of ``ax``; its labels (model, method names) literal."""
    legend = ax.legend(
        loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small"
    )
    # Legend entries are made from the artists' labels, so the properties are set here.
    for text in legend.get_texts():
        text.update(dict(LITERAL))


def series_colors(count: int) -> list[tuple[float, float, float, float]]:
    """``count`` distinct colours (tab10, tab20 beyond ten series)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def bar_chart(
    summary: Sequence[Mapping[str, Any]],
    metrics: Sequence[Metric],
    labels: Sequence[str],
    colors: Sequence[Any],
    title: str,
) -> bytes | None:
    """Grouped bars: one group per metric, one bar per series, 95% CI as error bars.

    Args:
        summary: summary rows (dicts with ``<metric>``, ``<metric>_ci_low/high``).
        metrics: metrics to draw (those without any value are left out).
        labels: legend label per summary row.
        colors: colour per summary row.
        title: figure title.

    Returns:
        PNG bytes, or None when none of ``metrics`` has a value.
    """
    metrics = [m for m in metrics if any(r.get(m.name) is not None for r in summary)]
    if not metrics or not summary:
        return None
    figure = Figure(figsize=(max(4.0, 1.2 + 0.45 * len(summary) * len(metrics)), 3.6))
    ax = figure.add_subplot()
    positions = np.arange(len(metrics), dtype=np.float64)
    width = 0.8 / len(summary)
    for i, row in enumerate(summary):
        means = np.array([np.nan if row.get(m.name) is None else row[m.name] for m in metrics])
        low = np.array([row.get(f"{m.name}_ci_low") for m in metrics], dtype=np.float64)
        high = np.array([row.get(f"{m.name}_ci_high") for m in metrics], dtype=np.float64)
        # Missing values are NaN: no bar, no error bar. A percentile interval need not
        # contain the mean exactly (skewed resamples); matplotlib refuses negative errors.
        errors = np.clip(np.vstack([means - low, high - means]), 0.0, None)
        ax.bar(
            positions + (i - (len(summary) - 1) / 2) * width,
            np.nan_to_num(means, nan=0.0),
            width,
            yerr=np.nan_to_num(errors, nan=0.0),
            capsize=2,
            color=colors[i],
            label=labels[i],
            error_kw={"elinewidth": 1},
        )
    ax.set_xticks(positions, [metric_header(m) for m in metrics], **LITERAL)
    units = {m.unit for m in metrics}
    ax.set_ylabel("percent" if units == {"%"} else ", ".join(sorted(units)), **LITERAL)
    if units == {"%"}:
        ax.set_ylim(0, 100)
    ax.set_title(title, **LITERAL)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    series_legend(ax)
    return png_bytes(figure)


def curves_chart(
    curves: Sequence[tuple[np.ndarray | None, np.ndarray | None]],
    labels: Sequence[str],
    colors: Sequence[Any],
) -> bytes | None:
    """Mean insertion and deletion curves per series, side by side.

    Args:
        curves: per series, ``(insertion, deletion)`` mean curves (1-D, ``steps + 1``
            probabilities each) or None where the series has none.
        labels: legend label per series.
        colors: colour per series.

    Returns:
        PNG bytes, or None when no series has a curve.
    """
    if not any(c is not None for pair in curves for c in pair):
        return None
    figure = Figure(figsize=(9.0, 3.4), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    titles = [f"{mode.capitalize()} ({better(mode)})" for mode in ("insertion", "deletion")]
    for side, (ax, title) in enumerate(zip(axes, titles, strict=True)):
        for pair, label, color in zip(curves, labels, colors, strict=True):
            curve = pair[side]
            if curve is None:
                continue
            ax.plot(np.linspace(0.0, 1.0, curve.size), curve, color=color, label=label)
        ax.set_title(title, **LITERAL)
        ax.set_xlabel("fraction of pixels " + ("inserted" if side == 0 else "deleted"), **LITERAL)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean class probability", **LITERAL)
    series_legend(axes[1])
    return png_bytes(figure)


def distributions_chart(
    panels: Sequence[tuple[str, Sequence[np.ndarray]]],
    labels: Sequence[str],
    colors: Sequence[Any],
) -> bytes | None:
    """Per-image distributions: one panel per quantity, a step histogram per series.

    Histograms count the fraction of a series' images per bin (bins of 5 points on
    [0, 100] percent), so series of different sizes compare directly.

    Args:
        panels: ``(title, values per series)``, values in percent (NaNs ignored).
        labels: legend label per series.
        colors: colour per series.

    Returns:
        PNG bytes, or None when there is no value at all.
    """
    panels = [p for p in panels if any(np.isfinite(v).any() for v in p[1])]
    if not panels:
        return None
    columns = min(2, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure = Figure(figsize=(4.4 * columns + 1.6, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    bins = np.linspace(0.0, 100.0, 21)
    for ax, (title, series) in zip(axes, panels, strict=False):
        for values, label, color in zip(series, labels, colors, strict=True):
            finite = values[np.isfinite(values)]
            if finite.size == 0:
                continue
            weights = np.full(finite.size, 1.0 / finite.size)
            ax.hist(
                np.clip(finite, 0.0, 100.0),
                bins=bins,
                weights=weights,
                histtype="step",
                linewidth=1.5,
                color=color,
                label=label,
            )
        ax.set_title(title, **LITERAL)
        ax.set_xlabel("percent", **LITERAL)
        ax.set_ylabel("fraction of images", **LITERAL)
        ax.set_xlim(0, 100)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    series_legend(axes[columns - 1])
    return png_bytes(figure)
