"""The report's gallery: a few images with every method's saliency map over them.

Which images: per (shard, key) the rows of one model; images explained by every method
are preferred. They are ordered by shard URL, then by the SHA-256 of the key, and the
first ``size`` are taken. The order is a pure function of the rows (no random state),
and taking shards in order means the gallery reads as few data shards as possible,
usually one.

The maps come from the run's Parquet rows (:func:`opticam.store.load_maps`: low-res
maps are upsampled bilinearly and range-normalized, full PNG maps decoded). The input
images are read again from the data shards named in the rows and preprocessed exactly
as the model saw them (:class:`opticam.data.Preprocess` with the run's input and resize
sizes). Reading the data back may fail (shards moved, no credentials for the data
bucket, ...): the gallery then shows the maps alone and :attr:`Gallery.notes` say why.

Maps are drawn with :func:`opticam.report.colors.overlay` (half map colours, half image)
or, without an input image, :func:`~opticam.report.colors.colorize`: the same colour map
and blend as the CLI's ``opticam explain`` overlays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from opticam import store
from opticam.names import STAGE_NOT_TAR, STAGE_OPEN, STAGE_TAR
from opticam.report.colors import colorize, overlay
from opticam.report.figures import LITERAL, draw_figure, png_bytes

__all__ = ["Gallery", "GalleryItem", "build_gallery", "choose_gallery_images"]

#: Row columns the gallery needs (besides the map columns that load_maps reads).
GALLERY_COLUMNS = (
    "model",
    "shard",
    "key",
    "method",
    "label",
    "predicted",
    "target",
    "drop",
    "gain",
)


@dataclass
class GalleryItem:
    """One image of the gallery.

    Attributes:
        shard: data shard URL.
        key: sample key.
        label: ground-truth class, or None.
        predicted: predicted class.
        target: class explained.
        image: ``(H, W, 3)`` float32 in [0, 1] as the model saw it, or None.
        boxes: ``(n, 4)`` boxes ``x0, y0, x1, y1`` in input pixels.
        maps: method -> ``(H, W)`` float32 map in [0, 1].
        scores: method -> ``(drop, gain)`` fractions.
    """

    shard: str
    key: str
    label: int | None
    predicted: int
    target: int
    image: np.ndarray | None = None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float32))
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class Gallery:
    """The gallery of a report.

    Attributes:
        model: model of the rows shown.
        methods: methods in column order.
        items: the images shown.
        notes: what the reader should know (e.g. why input images are missing).
        png: the gallery figure, or None when there is nothing to show or drawing failed.
        failure: why the figure could not be drawn (see
            :func:`opticam.report.figures.draw_figure`), or None.
    """

    model: str | None
    methods: list[str]
    items: list[GalleryItem]
    notes: list[str]
    png: bytes | None
    failure: str | None = None


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def choose_gallery_images(
    rows: pa.Table, model: str, methods: Sequence[str], size: int
) -> list[tuple[str, str]]:
    """``(shard, key)`` of the gallery images (see the module doc for the rule).

    Args:
        rows: rows with at least ``model``, ``shard``, ``key``, ``method``.
        model: the model whose rows are used.
        methods: the methods shown; images with a row for each are preferred.
        size: how many images (at most).
    """
    if size <= 0 or rows.num_rows == 0:
        return []
    of_model = rows.filter(pc.equal(rows.column("model"), model))
    grouped = of_model.group_by(["shard", "key"]).aggregate([("method", "distinct")])
    present = {
        (shard, key): set(found)
        for shard, key, found in zip(
            grouped.column("shard").to_pylist(),
            grouped.column("key").to_pylist(),
            grouped.column("method_distinct").to_pylist(),
            strict=True,
        )
    }
    wanted = set(methods)
    complete = [k for k, found in present.items() if wanted <= found]
    candidates = complete or list(present)
    candidates.sort(key=lambda sk: (sk[0], _key_digest(sk[1])))
    return candidates[:size]


def _read_inputs(
    items: list[GalleryItem],
    storage_options: Mapping[str, Any] | None,
    input_size: tuple[int, int],
    resize_size: int | None,
    preprocess_options: Mapping[str, str] | None = None,
) -> list[str]:
    """Fill ``image`` and ``boxes`` of ``items`` from their data shards; return notes.

    ``preprocess_options`` are :class:`~opticam.data.Preprocess`'s ``interpolation``,
    ``resize_mode`` and ``crop_rounding`` (its defaults where missing).
    """
    try:
        from opticam.data import Preprocess, ShardReader
    except ImportError as error:  # data layer unavailable: maps alone
        return [f"input images not shown: opticam.data cannot be imported ({error})"]
    preprocess = Preprocess(input_size, resize_size, **dict(preprocess_options or {}))
    notes = []
    by_shard: dict[str, dict[str, GalleryItem]] = {}
    for item in items:
        by_shard.setdefault(item.shard, {})[item.key] = item
    for shard, wanted in by_shard.items():
        reader = ShardReader(shard, storage_options=storage_options, require_label=False)
        pending = dict(wanted)
        samples = iter(reader)
        try:
            for sample in samples:
                if sample.key not in pending:
                    continue
                item = pending.pop(sample.key)
                tensor, boxes = preprocess(sample.image, sample.boxes)
                item.image = tensor.permute(1, 2, 0).numpy().astype(np.float32)
                item.boxes = boxes.numpy().reshape(-1, 4)
                if not pending:
                    break
        except Exception as error:  # any failure costs the pictures, never the report
            notes.append(
                f"input images of shard {shard} not shown: {type(error).__name__}: {error}"
            )
            continue
        finally:
            # Stop reading the shard (and close its file) once the wanted keys were seen.
            close = getattr(samples, "close", None)
            if close is not None:
                close()
        if pending:
            opened = [
                e.message
                for e in reader.errors
                if e.stage in (STAGE_OPEN, STAGE_NOT_TAR, STAGE_TAR)
            ]
            why = opened[0] if opened else "keys not found in the shard"
            notes.append(
                f"input image(s) {', '.join(sorted(pending))} of shard {shard} not shown: {why}"
            )
    return notes


def _draw(gallery: Gallery) -> bytes | None:
    """The gallery figure: a row per image, an input column then a column per method."""
    if not gallery.items:
        return None
    with_input = any(item.image is not None for item in gallery.items)
    columns = len(gallery.methods) + int(with_input)
    figure = Figure(figsize=(1.9 * columns, 2.15 * len(gallery.items)))
    axes = np.asarray(figure.subplots(len(gallery.items), columns, squeeze=False))
    for r, item in enumerate(gallery.items):
        cells = list(axes[r])
        if with_input:
            _draw_input(cells.pop(0), item, first_row=r == 0)
        for ax, method in zip(cells, gallery.methods, strict=True):
            _draw_map(ax, item, method, first_row=r == 0)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    figure.subplots_adjust(wspace=0.05, hspace=0.35)
    return png_bytes(figure)


def _draw_input(ax: Axes, item: GalleryItem, *, first_row: bool) -> None:
    """The input cell of a row: the image with its boxes, its key, label and prediction."""
    if item.image is not None:
        ax.imshow(item.image, interpolation="nearest")
        for x0, y0, x1, y1 in item.boxes:
            ax.add_patch(
                Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="lime", lw=1.5)
            )
    else:
        ax.text(
            0.5,
            0.5,
            "input\nnot available",
            ha="center",
            va="center",
            fontsize=8,
            **LITERAL,
        )
    label = "?" if item.label is None else str(item.label)
    short_key = item.key if len(item.key) <= 22 else "…" + item.key[-21:]
    ax.set_xlabel(f"{short_key}\nlabel {label} · pred {item.predicted}", fontsize=7, **LITERAL)
    if first_row:
        ax.set_title("input", fontsize=9, **LITERAL)


def _draw_map(ax: Axes, item: GalleryItem, method: str, *, first_row: bool) -> None:
    """One method's cell of a row: its map over the input (or alone), with its scores."""
    saliency = item.maps.get(method)
    if saliency is None:
        ax.text(0.5, 0.5, "no map", ha="center", va="center", fontsize=8, **LITERAL)
    elif item.image is not None:
        ax.imshow(np.asarray(overlay(item.image, saliency)))
    else:
        ax.imshow(colorize(saliency))
    if method in item.scores:
        drop, gain = item.scores[method]
        ax.set_xlabel(f"drop {100 * drop:.0f}% · gain {100 * gain:.0f}%", fontsize=7, **LITERAL)
    if first_row:
        ax.set_title(method, fontsize=9, **LITERAL)


def build_gallery(
    run: str,
    rows: pa.Table,
    methods: Sequence[str],
    *,
    size: int,
    storage_options: Mapping[str, Any] | None = None,
    data_storage_options: Mapping[str, Any] | None = None,
    resize_size: int | None = None,
    resize_known: bool = True,
    preprocess_options: Mapping[str, str] | None = None,
) -> Gallery:
    """Choose the gallery images, load their maps and inputs, draw the figure.

    Args:
        run: run folder URL (maps are read from its rows).
        rows: the run's rows with :data:`GALLERY_COLUMNS` and ``input_height/width``.
        methods: methods in column order.
        size: number of images (0 disables the gallery).
        storage_options: fsspec options of the run folder.
        data_storage_options: fsspec options of the data shards.
        resize_size: shorter side before the centre crop (None: the input size).
        resize_known: False when ``resize_size`` is a guess (the gallery then says so).
        preprocess_options: the run's ``interpolation``, ``resize_mode`` and
            ``crop_rounding`` (recorded in its shard statuses); None: the defaults.

    Returns:
        The :class:`Gallery`; its ``png`` is None when there is nothing to show, or when
        drawing raised (``failure`` then says why: a bad figure never stops the report).
    """
    models = sorted(set(rows.column("model").to_pylist())) if rows.num_rows else []
    if not models or size <= 0:
        return Gallery(None, list(methods), [], [], None)
    model = models[0]
    notes = [] if len(models) == 1 else [f"gallery shows model {model} only"]
    chosen = choose_gallery_images(rows, model, methods, size)
    wanted = set(chosen)
    found: dict[tuple[str, str], GalleryItem] = {}
    triples = []
    input_size = (0, 0)
    # Narrow the rows down in Arrow first: a run may hold millions of them.
    keys = pa.array(sorted({key for _, key in chosen}), pa.string())
    candidates = rows.filter(
        pc.and_(pc.equal(rows.column("model"), model), pc.is_in(rows.column("key"), value_set=keys))
    )
    for r in candidates.select([*GALLERY_COLUMNS, "input_height", "input_width"]).to_pylist():
        sk = (r["shard"], r["key"])
        if sk not in wanted or r["method"] not in methods:
            continue
        item = found.get(sk)
        if item is None:
            item = found[sk] = GalleryItem(
                r["shard"], r["key"], r["label"], int(r["predicted"]), int(r["target"])
            )
        item.scores[r["method"]] = (float(r["drop"]), float(r["gain"]))
        triples.append((r["shard"], r["key"], r["method"]))
        input_size = (int(r["input_height"]), int(r["input_width"]))
    items = [found[sk] for sk in chosen if sk in found]
    try:
        maps = store.load_maps(run, triples, storage_options=storage_options)
    except Exception as error:  # unreadable maps cost the gallery, never the report
        notes.append(
            f"gallery not shown: maps could not be loaded ({type(error).__name__}: {error})"
        )
        return Gallery(model, list(methods), [], notes, None)
    for (shard, key, method), saliency in maps.items():
        found[(shard, key)].maps[method] = saliency
    if not resize_known:
        notes.append(
            "the run does not record the model's resize size: inputs are shown resized to "
            "the input size, which matches the model's view only when it used no crop margin"
        )
    notes += _read_inputs(items, data_storage_options, input_size, resize_size, preprocess_options)
    gallery = Gallery(model, list(methods), items, notes, None)
    gallery.png, gallery.failure = draw_figure("gallery", partial(_draw, gallery))
    return gallery
