"""opticam.store.maps: the map codec's round trips and its scaling rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from store_rows import lowres_row, status_for

from opticam import store


def test_lowres_round_trip_matches_upsample_normalize(tmp_path: Path) -> None:
    from opticam.methods import upsample_normalize

    run = str(tmp_path / "run")
    rng = np.random.default_rng(1)
    saliency = rng.normal(size=(7, 7)) * 1e4  # large values: scaled before float16
    expected, _ = upsample_normalize(torch.from_numpy(saliency)[None, None], (50, 50), "range")
    shard = "/data/x.tar"
    rows = [lowres_row(shard, "k", "opticam", saliency, 50)]
    status = status_for(shard)
    store.write_rows(run, store.rows_to_table(rows), status)

    by_tuple = store.load_maps(run, [(shard, "k", "opticam")])
    by_rows = store.load_maps(run, store.read_rows(run))
    for maps in (by_tuple, by_rows):
        got = maps[(shard, "k", "opticam")]
        assert got.shape == (50, 50) and got.dtype == np.float32
        assert got.min() >= 0.0 and got.max() <= 1.0
        np.testing.assert_allclose(got, expected[0, 0].numpy(), atol=2e-3)
    with pytest.raises(KeyError, match="not in run"):
        store.load_maps(run, [(shard, "k", "gradcam")])


def test_full_png_round_trip_is_within_one_quantization_step() -> None:
    rng = np.random.default_rng(2)
    full = rng.random((33, 21)).astype(np.float32)
    full[0, 0], full[1, 1] = 0.0, 1.0
    row = {
        "map_bytes": store.encode_full_png(full),
        "map_shape": [33, 21],
        "map_format": "full_png",
        "input_height": 33,
        "input_width": 21,
        "normalization": "none",
    }
    got = store.decode_map(row)
    assert got.shape == (33, 21) and got.dtype == np.float32
    assert np.abs(got - full).max() <= 0.5 / 255 + 1e-6
    assert got[0, 0] == 0.0 and got[1, 1] == 1.0


def test_encode_lowres_scaling_rules() -> None:
    s = np.array([[0.0, 2.0], [-4.0, 1.0]])
    scaled = np.frombuffer(store.encode_lowres(s, "range") or b"", dtype="<f2")
    np.testing.assert_allclose(scaled, [0.0, 0.5, -1.0, 0.25])
    raw = np.frombuffer(store.encode_lowres(s, "sigmoid") or b"", dtype="<f2")
    np.testing.assert_allclose(raw, s.ravel())  # sigmoid is not scale invariant: kept
    assert store.encode_lowres(s * 1e6, "sigmoid") is None  # beyond float16
    assert store.encode_lowres(np.array([[np.nan, 1.0]]), "range") is None
    constant = np.frombuffer(store.encode_lowres(np.zeros((2, 2)), "range") or b"", "<f2")
    assert (constant == 0).all()
    with pytest.raises(ValueError, match="unknown map_format"):
        store.decode_map(
            {
                "map_format": "jpeg",
                "map_shape": [1, 1],
                "input_height": 1,
                "input_width": 1,
                "map_bytes": b"",
            }
        )
