"""process_shard on tiny shards with a tiny model: rows, errors, limits, failures."""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiny
import torch
from torch import nn

from opticam import pipeline, store
from opticam.data import NoShardsError, ShardWriter
from opticam.demo import generate_sample, make_shards
from opticam.errors import ConfigError, UserError


@pytest.fixture(autouse=True)
def tiny_factory(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``factory:tiny:build`` resolves to the suite's TinyNet."""
    tiny.register(monkeypatch)
    yield
    pipeline.clear_model_cache()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return make_shards(str(tmp_path_factory.mktemp("demo")), 2, 5, seed=3)


make_config = tiny.make_config


def jpeg(index: int) -> tuple[bytes, int, tuple[int, int, int, int]]:
    image, label, box, _ = generate_sample(index, 5)
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue(), label, box


def test_process_shard_writes_rows_that_match_the_schema(shards: list[str], tmp_path: Path) -> None:
    config = make_config(shards, tmp_path)
    seen: list[int] = []
    result = pipeline.process_shard(config, shards[0], "cpu", on_progress=seen.append)

    assert (result.n_samples, result.n_images, result.n_rows, result.n_errors) == (5, 5, 15, 0)
    assert result.complete and not result.skipped and sum(seen) == 5
    run = pipeline.run_url_of(config)
    assert store.list_done_shards(run) == [store.shard_name(shards[0])]
    table = pq.read_table(result.rows_url)
    assert table.schema.equals(store.SCHEMA, check_metadata=False)
    rows = table.to_pylist()
    assert {r["method"] for r in rows} == {"opticam", "gradcam", "fakecam"}
    assert all(r["run_id"] == config.run_id and r["shard"] == shards[0] for r in rows)
    for r in rows:
        assert 0 <= r["p_clean"] <= 1 and 0 <= r["p_masked"] <= 1
        assert 0 <= r["drop"] <= 1 and 0 <= r["gain"] <= 1 and r["increase"] in (0.0, 1.0)
        assert r["target"] == r["label"]  # target="label"
        assert len(r["insertion_curve"]) == len(r["deletion_curve"]) == 5  # steps + 1
        assert 0 <= r["insertion_auc"] <= 1 and 0 <= r["deletion_auc"] <= 1
        assert r["pointing_game"] in (0.0, 1.0)  # demo samples carry boxes
        assert r["input_height"] == r["input_width"] == 64
        assert r["seconds"] >= 0
    by_method = {
        m: [r for r in rows if r["method"] == m] for m in ("opticam", "gradcam", "fakecam")
    }
    assert all(
        r["map_format"] == "lowres" and r["saliency_shape"] == [8, 8]
        for r in by_method["opticam"] + by_method["gradcam"]
    )
    assert all(r["iterations"] is not None and r["iterations"] <= 3 for r in by_method["opticam"])
    assert all(r["iterations"] is None for r in by_method["gradcam"])
    fake = by_method["fakecam"]
    assert all(r["map_format"] == "full_png" and r["target_layer"] is None for r in fake)

    maps = store.load_maps(run, table)
    fake_map = maps[(shards[0], fake[0]["key"], "fakecam")]
    assert fake_map[0, 0] == 0.0 and fake_map.min() == 0.0 and (fake_map[1:, 1:] == 1.0).all()
    assert pq.read_table(result.errors_url).num_rows == 0
    status = store.read_statuses(run)[0]
    assert status["complete"] is True
    # The report rebuilds the model inputs from the data shards with this resize size.
    assert status["resize_size"] == 64


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


def test_bad_samples_become_errors_and_good_rows_are_kept(tmp_path: Path) -> None:
    url = str(tmp_path / "mixed-000000.tar")
    good = [jpeg(i) for i in range(3)]
    with ShardWriter(str(tmp_path / "mixed-%06d.tar"), per_shard=100) as writer:
        writer.write({"__key__": "good0", "jpg": good[0][0], "cls": good[0][1]})
        writer.write({"__key__": "corrupt", "jpg": b"\xff\xd8 not a jpeg", "cls": 1})
        writer.write({"__key__": "nolabel", "jpg": good[1][0]})
        writer.write({"__key__": "good1", "jpg": good[2][0], "cls": good[2][1]})
        writer.write({"__key__": "alien", "jpg": good[2][0], "cls": tiny.N_CLASSES + 2})
    config = make_config(url, tmp_path / "out")
    result = pipeline.process_shard(config, url, "cpu")

    rows = store.read_rows(pipeline.run_url_of(config))
    assert sorted(set(rows.column("key").to_pylist())) == ["good0", "good1"]
    assert rows.num_rows == 6
    errors = {(e["key"], e["stage"]) for e in pq.read_table(result.errors_url).to_pylist()}
    assert ("corrupt", "decode") in errors and ("nolabel", "label") in errors
    assert ("alien", "label") in errors  # a class the model does not have
    assert result.complete and result.n_images == 2
    # Samples without boxes: localization columns stay null.
    assert set(rows.column("pointing_game").to_pylist()) == {None}


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


def test_truncated_shard_is_written_and_flagged_incomplete(
    shards: list[str], tmp_path: Path
) -> None:
    data = Path(shards[1]).read_bytes()
    url = str(tmp_path / "cut.tar")
    Path(url).write_bytes(data[: int(len(data) * 0.6)])
    config = make_config(url, tmp_path / "out", methods=["fakecam"])
    result = pipeline.process_shard(config, url, "cpu")
    assert not result.complete and 0 < result.n_images < 5
    errors = pq.read_table(result.errors_url).to_pylist()
    assert "incomplete" in {e["stage"] for e in errors}
    status = store.read_statuses(pipeline.run_url_of(config))[0]
    assert status["complete"] is False and status["done"] is True


def test_a_failing_method_costs_error_rows_and_the_others_go_on(
    shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny.break_method(monkeypatch)
    config = make_config(shards[0], tmp_path)
    result = pipeline.process_shard(config, shards[0], "cpu")
    rows = store.read_rows(pipeline.run_url_of(config))
    assert set(rows.column("method").to_pylist()) == {"opticam", "fakecam"}
    errors = pq.read_table(result.errors_url).to_pylist()
    assert len(errors) == 5 and all(e["stage"] == "explain" for e in errors)
    assert "gradcam exploded" in errors[0]["message"]


def test_max_images_limits_the_shard(shards: list[str], tmp_path: Path) -> None:
    config = make_config(shards[0], tmp_path, methods=["fakecam"])
    result = pipeline.process_shard(config, shards[0], "cpu", max_images=2)
    assert result.n_images == 2 and result.complete
    status = store.read_statuses(pipeline.run_url_of(config))[0]
    assert status["limit_reached"] is True and status["max_images"] == 2


def test_unopenable_shard_raises_a_retryable_error_and_is_not_done(tmp_path: Path) -> None:
    url = str(tmp_path / "gone.tar")
    config = make_config(url, tmp_path / "out", methods=["fakecam"])
    with pytest.raises(pipeline.ShardUnavailableError) as info:
        pipeline.process_shard(config, url, "cpu")
    assert isinstance(info.value, OSError)
    run = pipeline.run_url_of(config)
    assert store.list_done_shards(run) == []
    assert store.read_errors(run).column("stage").to_pylist() == ["open"]


def test_full_png_maps_when_asked(shards: list[str], tmp_path: Path) -> None:
    config = make_config(shards[0], tmp_path, methods=["gradcam"], map_format="full_png")
    pipeline.process_shard(config, shards[0], "cpu", max_images=2)
    rows = store.read_rows(pipeline.run_url_of(config)).to_pylist()
    assert {r["map_format"] for r in rows} == {"full_png"}
    assert rows[0]["saliency_shape"] == [64, 64]


def test_plan_spreads_max_images_over_shards(shards: list[str], tmp_path: Path) -> None:
    plan = pipeline.plan_shards(make_config(shards, tmp_path, max_images=3))
    assert [p["max_images"] for p in plan] == [2, 1]
    assert [p["url"] for p in plan] == shards
    only_one = pipeline.plan_shards(make_config(shards, tmp_path, max_images=1))
    assert [p["url"] for p in only_one] == shards[:1]
    assert all(p["max_images"] is None for p in pipeline.plan_shards(make_config(shards, tmp_path)))
    with pytest.raises(NoShardsError):
        pipeline.plan_shards(make_config(str(tmp_path / "none-*.tar"), tmp_path))


def test_models_are_cached_per_spec_and_device(tmp_path: Path) -> None:
    config = make_config("x.tar", tmp_path)
    first = pipeline.get_loaded_model(config, "cpu")
    assert pipeline.get_loaded_model(config.model_copy(update={"batch_size": 1}), "cpu") is first
    other = make_config(
        "x.tar",
        tmp_path,
        model={"source": "factory:tiny:build", "target_layer": "features.0"},
    )
    assert pipeline.get_loaded_model(other, "cpu") is not first


def test_bad_method_options_fail_in_the_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown option.*'lr0' for method 'opticam'"):
        make_config("x.tar", tmp_path, methods=[{"name": "opticam", "options": {"lr0": 1}}])
    with pytest.raises(ValueError, match="unknown objective 'max'"):
        make_config(
            "x.tar", tmp_path, methods=[{"name": "opticam", "options": {"objective": "max"}}]
        )


def test_check_methods_turns_a_bad_model_spec_into_a_config_error(tmp_path: Path) -> None:
    config = make_config(
        "x.tar", tmp_path, model={"source": "factory:tiny:build", "target_layer": "nope"}
    )
    with pytest.raises(ConfigError, match="nope"):
        pipeline.check_methods(config, "cpu")
    missing = make_config(
        "x.tar",
        tmp_path,
        model={"source": "factory:tiny:build", "checkpoint": str(tmp_path / "absent.pt")},
    )
    with pytest.raises(UserError, match="absent.pt"):
        pipeline.check_methods(missing, "cpu")


@pytest.mark.parametrize(
    ("count", "spec", "expected"),
    [
        (0, "auto", ["cpu"]),
        (2, "auto", ["cuda:0", "cuda:1"]),
        (2, "cuda", ["cuda:0", "cuda:1"]),
        (2, "cuda:1", ["cuda:1"]),
        (0, "cpu", ["cpu"]),
        (2, "cpu", ["cpu"]),
        (2, "mps", ["mps"]),
    ],
)
def test_resolve_device_on_machines_with_and_without_gpus(
    monkeypatch: pytest.MonkeyPatch, count: int, spec: str, expected: list[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert pipeline.resolve_device(spec) == expected


@pytest.mark.parametrize(
    ("count", "spec", "message"),
    [
        (0, "cuda", "device 'cuda' asked for, but no CUDA device is available"),
        (0, "cuda:0", "device 'cuda:0' asked for, but this machine has 0 CUDA device"),
        (2, "cuda:2", "device 'cuda:2' asked for, but this machine has 2 CUDA device"),
    ],
)
def test_resolve_device_names_a_missing_gpu(
    monkeypatch: pytest.MonkeyPatch, count: int, spec: str, message: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline.resolve_device(spec)


def test_pending_shards_skips_done_ones(shards: list[str], tmp_path: Path) -> None:
    config = make_config(shards, tmp_path, methods=["fakecam"])
    plan = pipeline.plan_shards(config)
    pipeline.process_shard(config, shards[1], "cpu")
    assert [p["url"] for p in pipeline.pending_shards(config, plan)] == [shards[0]]
    assert pipeline.done_status(config, shards[1]).skipped


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


def test_the_config_pixel_cap_reaches_the_reader(shards: list[str], tmp_path: Path) -> None:
    config = make_config(shards[0], tmp_path, methods=["fakecam"], max_pixels=128 * 127)
    result = pipeline.process_shard(config, shards[0], "cpu")
    errors = pq.read_table(result.errors_url).to_pylist()
    assert result.n_images == 0 and {e["stage"] for e in errors} == {"too-large"}
    assert "16384 pixels" in errors[0]["message"] or "128x128" in errors[0]["message"]


def test_one_bad_field_costs_one_error_row_and_the_shard_keeps_its_good_rows(
    tmp_path: Path,
) -> None:
    from test_data_reader import write_tar

    good = [jpeg(i) for i in range(3)]
    not_utf8 = b"k\xff".decode("utf-8", "surrogateescape")  # how tarfile reads that name
    members: list[tuple[str, bytes]] = []
    for i, (data, label, _) in enumerate(good):
        members += [(f"good{i}.jpg", data), (f"good{i}.cls", str(label).encode())]
    bad = {
        "huge_cls": [("huge_cls.cls", b"99999999999999999999")],
        "huge_json": [("huge_json.json", b'{"label": 18446744073709551616}')],
        "list_label": [("list_label.json", ('{"label": [' + "1," * 10**5 + "1]}").encode())],
        "float_label": [("float_label.json", b'{"label": 1.5}')],
        "deep_json": [("deep_json.cls", b"1"), ("deep_json.json", b"[" * 10**5)],
        "big_box": [("big_box.json", b'{"label": 1, "boxes": [[0, 0, 1' + b"0" * 400 + b", 4]]}")],
        "nan_box": [("nan_box.json", b'{"label": 1, "boxes": [[0, 0, NaN, 4]]}')],
        not_utf8: [(f"{not_utf8}.cls", b"1")],
    }
    for key, fields in bad.items():
        members += [(f"{key}.jpg", good[0][0]), *fields]
    url = str(tmp_path / "fields-000000.tar")
    write_tar(Path(url), members)
    config = make_config(url, tmp_path / "out")

    result = pipeline.process_shard(config, url, "cpu")
    assert result.complete and result.n_images == 3
    assert pipeline.process_shard(config, url, "cpu").skipped  # a rerun finds it done
    rows = store.read_rows(pipeline.run_url_of(config))
    assert sorted(set(rows.column("key").to_pylist())) == ["good0", "good1", "good2"]
    assert rows.num_rows == 9  # 3 images x 3 methods
    errors = pq.read_table(result.errors_url).to_pylist()
    stages = sorted((e["key"], e["stage"]) for e in errors)
    assert stages == sorted(
        [
            ("huge_cls", "label"),
            ("huge_json", "label"),
            ("list_label", "label"),
            ("float_label", "label"),
            ("deep_json", "decode"),
            ("big_box", "boxes"),
            ("nan_box", "boxes"),
            ("k\\xff", "key"),
        ]
    )
    message = {e["key"]: e["message"] for e in errors}
    assert ".cls 99999999999999999999 does not fit a 64-bit integer" in message["huge_cls"]
    assert "json 'label' 18446744073709551616 does not fit" in message["huge_json"]
    assert "json 'label' must be an integer class index, got list [1, 1," in message["list_label"]
    assert "got float 1.5" in message["float_label"]
    assert "box 0 has a coordinate that is not a finite float: [0, 0, 1000" in message["big_box"]
    assert "nan" in message["nan_box"]
    assert all(len(m) < 400 for m in message.values())


def test_images_the_data_layer_refuses_cost_one_error_row_each(tmp_path: Path) -> None:
    from test_data_images import encoded
    from test_data_preprocess import thin_png
    from test_data_reader import write_tar

    good = [jpeg(i) for i in range(2)]
    members: list[tuple[str, bytes]] = []
    for i, (data, label, _) in enumerate(good):
        members += [(f"good{i}.jpg", data), (f"good{i}.cls", str(label).encode())]
    refused = {
        "eps": (encoded("EPS"), "decode", "the bytes are EPS, not one of"),
        "pdf": (encoded("PDF"), "decode", "the bytes are PDF, not one of"),
        "bmp": (encoded("BMP"), "decode", "the bytes are BMP, not one of"),
        "thin": (thin_png(1, 20_000), "preprocess", "aspect ratio of 20,000.0:1, beyond"),
    }
    for key, (data, _, _) in refused.items():
        members += [(f"{key}.jpg", data), (f"{key}.cls", b"1")]
    url = str(tmp_path / "images-000000.tar")
    write_tar(Path(url), members)
    config = make_config(url, tmp_path / "out")
    result = pipeline.process_shard(config, url, "cpu")

    rows = store.read_rows(pipeline.run_url_of(config))
    assert sorted(set(rows.column("key").to_pylist())) == ["good0", "good1"]
    errors = pq.read_table(result.errors_url).to_pylist()
    assert sorted((e["key"], e["stage"]) for e in errors) == sorted(
        (key, stage) for key, (_, stage, _) in refused.items()
    )
    for error in errors:
        assert refused[error["key"]][2] in error["message"]
    assert result.complete and result.n_images == 2
