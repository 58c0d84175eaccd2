"""opticam.pipeline.scoring: maps -> metrics -> rows, seen through process_shard: the stored
maps and the non-finite ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiny
import torch

from opticam import pipeline, store
from opticam.demo import make_shards

# ``factory:tiny:build`` resolves to the suite's TinyNet (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("tiny_factory")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return make_shards(str(tmp_path_factory.mktemp("demo")), 2, 5, seed=3)


make_config = tiny.make_config


def test_stored_lowres_map_rebuilds_the_map_used_for_the_metrics(
    shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opticam import methods

    captured: dict[str, torch.Tensor] = {}
    real = methods.get_explainer

    def recording(name: str, loaded: Any, **options: Any) -> Any:
        explainer = real(name, loaded, **options)

        def call(images: torch.Tensor, targets: torch.Tensor) -> Any:
            out = explainer(images, targets)
            captured[name] = out.maps.detach().clone()
            return out

        call.normalization = getattr(explainer, "normalization", None)  # type: ignore[attr-defined]
        return call

    monkeypatch.setattr(methods, "get_explainer", recording)
    config = make_config(shards[0], tmp_path, methods=["gradcam"], batch_size=8)
    pipeline.process_shard(config, shards[0], "cpu")
    run = pipeline.run_url_of(config)
    table = store.read_rows(run)
    maps = store.load_maps(run, table)
    for i, key in enumerate(table.column("key").to_pylist()):
        got = maps[(shards[0], key, "gradcam")]
        np.testing.assert_allclose(got, captured["gradcam"][i, 0].numpy(), atol=3e-3)


def test_full_png_maps_when_asked(shards: list[str], tmp_path: Path) -> None:
    config = make_config(shards[0], tmp_path, methods=["gradcam"], map_format="full_png")
    pipeline.process_shard(config, shards[0], "cpu", max_images=2)
    rows = store.read_rows(pipeline.run_url_of(config)).to_pylist()
    assert {r["map_format"] for r in rows} == {"full_png"}
    assert rows[0]["map_shape"] == [64, 64]


def test_non_finite_maps_become_error_rows_for_their_images_only(
    shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opticam import methods

    real = methods.get_explainer

    def nan_for_first(name: str, loaded: Any, **options: Any) -> Any:
        explainer = real(name, loaded, **options)
        if name != "gradcam":
            return explainer

        def call(images: torch.Tensor, targets: torch.Tensor) -> Any:
            result = explainer(images, targets)
            result.maps[0] = float("nan")
            return result

        call.normalization = explainer.normalization  # type: ignore[attr-defined]
        return call

    monkeypatch.setattr(methods, "get_explainer", nan_for_first)
    config = make_config(shards[0], tmp_path, methods=["gradcam", "fakecam"], batch_size=5)
    result = pipeline.process_shard(config, shards[0], "cpu")
    errors = pq.read_table(result.errors_url).to_pylist()
    assert [(e["stage"], e["message"].split(":")[0]) for e in errors] == [("non-finite", "gradcam")]
    rows = store.read_rows(pipeline.run_url_of(config), ["key", "method"])
    methods_per_key = {}
    for r in rows.to_pylist():
        methods_per_key.setdefault(r["key"], set()).add(r["method"])
    assert methods_per_key[errors[0]["key"]] == {"fakecam"}
    assert sum(len(v) for v in methods_per_key.values()) == 5 * 2 - 1
