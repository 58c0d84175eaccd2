"""The map codec: how one saliency map is stored in a row, and how it is rebuilt.

A row stores its map in ``map_bytes``, the shape ``[h, w]`` of what those bytes hold in
``map_shape``, and how they hold it in ``map_format`` (before schema version 3:
``saliency`` and ``saliency_shape``; before version 2: ``saliency_kind``). Two formats
(:data:`opticam.names.MAP_FORMATS`):

- ``"lowres"``: the method's low-resolution map ``s`` (h, w) as float16 little-endian
  row-major bytes; the full map is ``n(up(s))`` with ``up`` bilinear upsampling
  (align_corners=False) to ``input_height x input_width`` and ``n`` the row's
  ``normalization``, the same function the methods use
  (:func:`opticam.methods.upsample_normalize`). For the scale-invariant normalizations
  (``range``, ``max``) ``s`` is stored divided by ``max |s|``, which keeps float16 precise
  and changes nothing after ``n``.
- ``"full_png"``: the full map as an 8-bit grayscale PNG (value = round(255 * m)), for
  methods without a low-resolution map (Fake-CAM) or when the config asks for full maps.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from opticam.errors import short_repr
from opticam.names import MAP_FORMATS
from opticam.store.tables import previous_names

__all__ = [
    "MAP_COLUMNS",
    "decode_map",
    "encode_full_png",
    "encode_lowres",
    "encode_map",
    "load_maps",
]

#: The row columns a map is rebuilt from (plus its identity: shard, key, method).
MAP_COLUMNS = [
    "shard",
    "key",
    "method",
    "map_bytes",
    "map_shape",
    "map_format",
    "input_height",
    "input_width",
    "normalization",
]


def encode_lowres(saliency: np.ndarray, normalization: str) -> bytes | None:
    """Low-resolution map (h, w) -> float16 little-endian row-major bytes, or None.

    For ``range`` and ``max`` normalization the map is divided by ``max |s|`` first (the
    normalized full map is unchanged). None means float16 cannot hold the map faithfully
    (non-finite values, or values beyond float16 range under another normalization): the
    caller stores a full PNG instead.
    """
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"low-resolution saliency must be (h, w), got shape {s.shape}")
    if not np.isfinite(s).all():
        return None
    if normalization in ("range", "max"):
        peak = float(np.abs(s).max()) if s.size else 0.0
        if peak > 0:
            s = s / peak
    elif np.abs(s).max(initial=0.0) > 6.0e4:
        return None
    return np.ascontiguousarray(s.astype("<f2")).tobytes()


def encode_full_png(saliency_map: np.ndarray) -> bytes:
    """Full-resolution map (H, W) in [0, 1] -> 8-bit grayscale PNG bytes (round(255 m))."""
    from PIL import Image

    m = np.asarray(saliency_map, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"full map must be (H, W), got shape {m.shape}")
    q = np.clip(np.rint(np.nan_to_num(m, nan=0.0) * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(q, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode_map(
    saliency: np.ndarray | None,
    full_map: np.ndarray,
    normalization: str | None,
    map_format: str,
) -> tuple[bytes, list[int], str]:
    """``(bytes, [h, w], format)`` of one map, in the compact form where it can be.

    Args:
        saliency: the method's low-resolution map (h, w), or None (Fake-CAM).
        full_map: the full map (H, W) in [0, 1].
        normalization: the method's ``n``; None when it has none.
        map_format: what the config asks for (``lowres`` falls back to ``full_png`` when
            there is no low-resolution map or float16 cannot hold it).
    """
    if map_format not in MAP_FORMATS:
        raise ValueError(
            f"unknown map_format {short_repr(map_format)} (known: {', '.join(MAP_FORMATS)})"
        )
    if saliency is not None and map_format == "lowres" and normalization is not None:
        data = encode_lowres(saliency, normalization)
        if data is not None:
            return data, [int(saliency.shape[0]), int(saliency.shape[1])], "lowres"
    return (
        encode_full_png(full_map),
        [int(full_map.shape[0]), int(full_map.shape[1])],
        "full_png",
    )


def _upsample_normalize(
    saliency: np.ndarray, size: tuple[int, int], normalization: str
) -> np.ndarray:
    import torch

    s = torch.from_numpy(np.asarray(saliency, dtype=np.float32))[None, None]
    try:
        # The one definition of M = n(up(S)), shared with the methods themselves.
        from opticam.methods import upsample_normalize
    except ImportError:  # reading results must not need the methods' dependencies
        pass
    else:
        maps, _ = upsample_normalize(s, size, normalization)
        return np.asarray(maps[0, 0].detach().cpu().numpy(), dtype=np.float32)
    if normalization != "range":
        raise ValueError(
            f"rebuilding a map with normalization {short_repr(normalization)} needs opticam.methods"
        )
    up = torch.nn.functional.interpolate(s, size=size, mode="bilinear", align_corners=False)
    lo, hi = up.amin(), up.amax()
    out = torch.ones_like(up) if hi <= lo else (up - lo) / (hi - lo)
    return np.asarray(out[0, 0].numpy(), dtype=np.float32)


def decode_map(row: Mapping[str, Any]) -> np.ndarray:
    """Rebuild the full-resolution map (H, W) float32 in [0, 1] of one row.

    ``row`` needs ``map_bytes``, ``map_shape``, ``map_format``, ``input_height``,
    ``input_width`` and ``normalization``; a row read straight from a file of an older
    schema version may hold the map columns under their previous names
    (:data:`opticam.store.RENAMED_COLUMNS`).
    """
    fmt = _value(row, "map_format")
    h, w = (int(v) for v in _value(row, "map_shape"))
    data = _value(row, "map_bytes")
    size = (int(row["input_height"]), int(row["input_width"]))
    if fmt == "lowres":
        s = np.frombuffer(data, dtype="<f2").reshape(h, w).astype(np.float32)
        return _upsample_normalize(s, size, str(row["normalization"]))
    if fmt == "full_png":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            q = np.asarray(img.convert("L"), dtype=np.float32)
        if q.shape != (h, w):
            raise ValueError(f"PNG map is {q.shape}, row says {(h, w)}")
        return q / 255.0
    raise ValueError(f"unknown map_format {short_repr(fmt)} (known: {', '.join(MAP_FORMATS)})")


def _value(row: Mapping[str, Any], column: str) -> Any:
    """``row[column]``, or the value under one of the column's previous names.

    For a row that holds more than one of the names, the first that is not null.
    """
    values = [row[name] for name in (column, *previous_names(column)) if name in row]
    if not values:
        raise KeyError(column)
    return next((v for v in values if v is not None), values[0])


def _map_columns(table: pa.Table) -> list[str]:
    """:data:`MAP_COLUMNS` as ``table`` names them (current or previous names)."""
    names = set(table.column_names)
    return [next((n for n in (c, *previous_names(c)) if n in names), c) for c in MAP_COLUMNS]


def load_maps(
    run: str,
    which: pa.Table | Iterable[Mapping[str, Any]] | Iterable[tuple[str, str, str]],
    storage_options: Mapping[str, Any] | None = None,
) -> dict[tuple[str, str, str], np.ndarray]:
    """Full-resolution maps of some rows, keyed by ``(shard, key, method)``.

    Args:
        run: run folder URL.
        which: rows that carry the map columns (a table from
            :func:`opticam.store.read_rows` or one file's table, or dicts; under the
            current or previous names), or ``(shard URL, key, method)`` tuples to look
            up in the run.
        storage_options: fsspec options of the output.

    Returns:
        ``{(shard, key, method): map}``, each map (H, W) float32 in [0, 1].

    Raises:
        KeyError: a requested ``(shard, key, method)`` is not in the run.
    """
    from opticam.store.tables import read_rows

    rows: list[Mapping[str, Any]]
    if isinstance(which, pa.Table):
        rows = which.select(_map_columns(which)).to_pylist()
    else:
        items = list(which)
        if items and all(isinstance(i, tuple) and len(i) == 3 for i in items):
            import pyarrow.compute as pc

            wanted = {(str(s), str(k), str(m)) for s, k, m in items}  # type: ignore[misc]
            shards = sorted({s for s, _, _ in wanted})
            keys = sorted({k for _, k, _ in wanted})
            expr = pc.field("shard").isin(shards) & pc.field("key").isin(keys)
            table = read_rows(run, MAP_COLUMNS, storage_options, filter=expr)
            rows = [r for r in table.to_pylist() if (r["shard"], r["key"], r["method"]) in wanted]
            found = {(r["shard"], r["key"], r["method"]) for r in rows}
            missing = wanted - found
            if missing:
                raise KeyError(f"not in run {short_repr(run)}: {sorted(missing)[:5]}")
        else:
            rows = items  # type: ignore[assignment]
    return {(str(r["shard"]), str(r["key"]), str(r["method"])): decode_map(r) for r in rows}
