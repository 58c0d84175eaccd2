"""opticam.pipeline.targets, seen through process_shard: predicted targets and non-finite logits."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiny
import torch
from torch import nn

from opticam import pipeline, store
from opticam.data import ShardWriter
from opticam.demo import generate_sample, make_shards

# ``factory:tiny:build`` resolves to the suite's TinyNet (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("tiny_factory")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return make_shards(str(tmp_path_factory.mktemp("demo")), 2, 5, seed=3)


make_config = tiny.make_config


def test_target_predicted_keeps_unlabelled_samples(tmp_path: Path) -> None:
    url = str(tmp_path / "nolabels-000000.tar")
    with ShardWriter(str(tmp_path / "nolabels-%06d.tar"), per_shard=100) as writer:
        for i in range(3):
            writer.write({"__key__": f"k{i}", "png": _png(i)})
    config = make_config(url, tmp_path / "out", target="predicted", methods=["gradcam"])
    pipeline.process_shard(config, url, "cpu")
    rows = store.read_rows(pipeline.run_url_of(config)).to_pylist()
    assert len(rows) == 3
    assert all(r["label"] is None and r["target"] == r["predicted"] for r in rows)


def _png(index: int) -> bytes:
    image, _, _, _ = generate_sample(index, 9)
    buf = io.BytesIO()
    image.resize((40, 30)).save(buf, format="PNG")
    return buf.getvalue()


class _NaNForBrightImages(nn.Module):
    """The suite's factory model, but its logits are NaN for images brighter than a bar."""

    bar = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny.build()
        self.default_target_layer = "net.features"
        self.input_size = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        bright = x.mean(dim=(1, 2, 3)) > self.bar
        return torch.where(bright[:, None], torch.full_like(out, float("nan")), out)


def test_non_finite_logits_become_error_rows_and_no_mean_sees_them(
    shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opticam.data import Preprocess, ShardReader
    from opticam.report import summarize

    samples = list(ShardReader(shards[0]))
    prep = Preprocess((64, 64), 64)
    means = {s.key: float(prep(s.image, [])[0].mean()) for s in samples}
    _NaNForBrightImages.bar = sorted(means.values())[2]  # the 2 brightest of 5 go NaN
    nan_keys = {k for k, v in means.items() if v > _NaNForBrightImages.bar}
    assert len(nan_keys) == 2
    monkeypatch.setattr(
        sys.modules[tiny.FACTORY_MODULE], "build_nan", _NaNForBrightImages, raising=False
    )
    config = make_config(
        shards[0],
        tmp_path,
        model={"source": "factory:tiny:build_nan"},
        methods=["gradcam", "fakecam"],
    )
    result = pipeline.process_shard(config, shards[0], "cpu")
    errors = pq.read_table(result.errors_url).to_pylist()
    logits = {e["key"] for e in errors if e["stage"] == "non-finite" and "logits" in e["message"]}
    assert logits == nan_keys
    rows = store.read_rows(pipeline.run_url_of(config))
    assert not set(rows.column("key").to_pylist()) & nan_keys
    assert result.n_images >= 1
    for name in ("p_clean", "p_masked", "drop", "gain", "insertion_auc"):
        values = rows.column(name).to_numpy(zero_copy_only=False)
        assert np.isfinite(values.astype(float)).all(), name
    # A method whose insertion images the model also scores NaN loses those rows only.
    scored = {(e["key"], e["message"].split(":")[0]) for e in errors if e["key"] not in nan_keys}
    assert rows.num_rows == 3 * 2 - len(scored)
    for row in summarize(rows, n_boot=10):
        assert all(v is None or np.isfinite(v) for v in row.values() if isinstance(v, float))
