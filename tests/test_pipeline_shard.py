"""opticam.pipeline.shard: process_shard on tiny shards with a tiny model: rows, errors, limits,
failures."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tiny

from opticam import pipeline, store
from opticam.data import ShardWriter
from opticam.demo import generate_sample, make_shards

# ``factory:tiny:build`` resolves to the suite's TinyNet (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("tiny_factory")


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
    assert store.list_done_rows(run) == [store.shard_name(shards[0])]
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
        r["map_format"] == "lowres" and r["map_shape"] == [8, 8]
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
    assert store.list_done_rows(run) == []
    assert store.read_errors(run).column("stage").to_pylist() == ["open"]


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


def test_compile_auto_switches_on_within_a_shard_and_pads_its_last_batch(
    shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compile=auto (the default) counts each shard's passes: 5 images in batches of 3
    and 2, on after the first batch (3 images x 4 passes); the last batch is padded to 3."""
    import torch

    import opticam.methods.compiled as compiled

    batches: list[int] = []

    def fake_compile(model: torch.nn.Module, **options: object) -> object:
        def call(images: torch.Tensor) -> torch.Tensor:
            batches.append(int(images.shape[0]))
            return model(images)

        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(compiled, "COMPILE_AFTER_PASSES", 3 * 4)
    methods = [{"name": "opticam", "options": {"iterations": 3}}]
    auto = make_config(shards, tmp_path / "auto", batch_size=3, methods=methods)
    methods = [{"name": "opticam", "options": {"iterations": 3, "compile": False}}]
    eager = make_config(shards, tmp_path / "eager", batch_size=3, methods=methods)
    for shard in shards:
        batches.clear()
        result = pipeline.process_shard(auto, shard, "cpu")
        # The second batch (2 images) only, padded to 3, at 3 steps and the last pass;
        # the second shard's explainer counts again from 0.
        assert batches == [3] * 4, shard
        plain = pipeline.process_shard(eager, shard, "cpu")
        got = {r["key"]: r for r in pq.read_table(result.rows_url).to_pylist()}
        expected = {r["key"]: r for r in pq.read_table(plain.rows_url).to_pylist()}
        assert set(got) == set(expected) and len(got) == 5
        for key, row in expected.items():
            assert got[key]["iterations"] == row["iterations"] == 3
            assert abs(got[key]["p_masked"] - row["p_masked"]) < 1e-4
