"""opticam.pipeline.prior: a job with the class prior, run stage by stage on tiny shards.

The walk (calibration), the prior file, and the shards after it, without Prefect: the
flows call the same functions (tests/test_flows.py and tests/test_cluster.py run them
through both executors).
"""

from __future__ import annotations

import collections
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiny

from opticam import pipeline, store
from opticam.data import ShardWriter
from opticam.demo import generate_sample
from opticam.methods.prior import ClassPrior, PriorError
from opticam.pipeline import prior as run_prior

pytestmark = pytest.mark.usefixtures("tiny_factory")

LAYER = "features"


def _write_shard(folder: Path, n: int, labels: list[int], first: int) -> str:
    """Shard ``s<n>`` of demo images whose labels are ``labels`` (keys ``k<first + i>``)."""
    with ShardWriter(str(folder / f"s{n}-%06d.tar"), per_shard=1000) as writer:
        for i, label in enumerate(labels):
            image, _, _, _ = generate_sample(first + i, 5)
            buf = io.BytesIO()
            image.save(buf, format="JPEG")
            writer.write({"__key__": f"k{first + i:03d}", "jpg": buf.getvalue(), "cls": label})
    return str(folder / f"s{n}-000000.tar")


def _shards(folder: Path, labels: list[list[int]]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    first = 0
    urls = []
    for n, shard_labels in enumerate(labels):
        urls.append(_write_shard(folder, n, shard_labels, first))
        first += len(shard_labels)
    return urls


def _config(
    shards: list[str], output: Path, per_class: int = 2, *, gradcam: bool = True, **options: Any
) -> Any:
    # The prior preset's start and lr, with 4 steps instead of 32 to keep the test fast.
    opticam = {"start": "prior", "lr": 0.5, "iterations": 4, "prior_per_class": per_class}
    opticam.update(options)
    methods: list[Any] = [{"name": "opticam", "options": opticam}]
    return tiny.make_config(shards, output, methods=methods + ["gradcam"] * gradcam)


def _calibrate(config: Any, crash_at: str | None = None) -> tuple[ClassPrior, str]:
    """The walk, each shard's calibration run here; raises at shard ``crash_at``."""
    plan = pipeline.plan_shards(config)
    loaded = pipeline.get_loaded_model(config, "cpu")

    def calibrate(item: dict[str, Any], counts: list[int]) -> None:
        if item["name"] == crash_at:
            raise RuntimeError("the machine died")
        pipeline.calibrate_shard(config, item["url"], counts, "cpu", max_images=item["max_images"])

    return run_prior.walk_calibration(config, plan, loaded, calibrate)


def _run(config: Any) -> tuple[ClassPrior, str, list[dict[str, Any]]]:
    """The whole job: the walk, then every shard; returns the prior and the run's rows."""
    found, sha256 = _calibrate(config)
    for item in pipeline.plan_shards(config):
        pipeline.process_shard(config, item["url"], "cpu", max_images=item["max_images"])
    rows = store.read_rows(pipeline.run_url_of(config)).to_pylist()
    return found, sha256, rows


def _prior_bytes(config: Any) -> bytes:
    return Path(store.prior_url(pipeline.run_url_of(config), LAYER)).read_bytes()


def test_a_prior_job_calibrates_the_first_images_of_each_class_then_starts_the_rest_from_it(
    tmp_path: Path,
) -> None:
    shards = _shards(tmp_path / "data", [[0, 0, 0, 1, 1], [0, 1, 1, 2, 2]])
    config = _config(shards, tmp_path / "runs")
    prior, sha256, rows = _run(config)

    # The first 2 images of each class in plan order: k000, k001 (0), k003, k004 (1) in the
    # first shard; in the second, class 2's two images; the rest starts from the prior.
    calibration = {r["key"] for r in rows if r["prior_role"] == "calibration"}
    assert calibration == {"k000", "k001", "k003", "k004", "k008", "k009"}
    assert list(prior.counts[:3]) == [2, 2, 2] and prior.counts[3:].sum() == 0
    assert prior.sample == {store.shard_name(shards[0]): 4, store.shard_name(shards[1]): 2}
    by_role = collections.Counter((r["method"], r["prior_role"]) for r in rows)
    assert by_role == {
        ("opticam", "calibration"): 6,
        ("gradcam", "calibration"): 6,
        ("opticam", "prior"): 4,
        ("gradcam", None): 4,
    }
    # One row per image and method: the calibration images were not computed again.
    assert len({(r["key"], r["method"]) for r in rows}) == len(rows) == 20
    for r in rows:
        started = r["method"] == "opticam" and r["prior_role"] == "prior"
        assert r["prior_sha256"] == (sha256 if started else None)
        has_weights = r["method"] == "opticam" and r["prior_role"] == "calibration"
        assert (r["channel_weights"] is not None) == has_weights
        if r["method"] == "opticam":
            # The sample runs the paper's setting (100 steps); the rest 4 steps.
            assert (r["iterations"] > 4) == (r["prior_role"] == "calibration")
    run = pipeline.run_url_of(config)
    statuses = {s["name"]: s for s in store.read_statuses(run)}
    assert [statuses[store.shard_name(u)]["n_calibration"] for u in shards] == [4, 2]
    assert {s["prior_sha256"] for s in statuses.values()} == {sha256}


def test_the_prior_from_per_shard_sums_equals_the_prior_of_all_calibration_rows(
    tmp_path: Path,
) -> None:
    shards = _shards(tmp_path / "data", [[0, 1, 0, 2], [2, 3, 3, 1]])
    config = _config(shards, tmp_path / "runs", 1, gradcam=False)
    prior, _, rows = _run(config)
    loaded = pipeline.get_loaded_model(config, "cpu")
    from_rows = run_prior.prior_of_rows(
        rows,
        num_classes=loaded.num_classes,
        channels=prior.channels,
        model=loaded.name,
        layer=LAYER,
        fallback="uniform",
    )
    assert from_rows.counts.sum() == 4
    assert np.array_equal(from_rows.counts, prior.counts)
    # Sums of the same float32 weights added in another grouping: float64 rounding apart.
    np.testing.assert_allclose(from_rows.sums, prior.sums, rtol=1e-12, atol=0)
    assert ClassPrior.from_parquet_bytes(_prior_bytes(config)).counts.tolist() == (
        prior.counts.tolist()
    )


def test_a_crash_in_the_middle_of_calibration_then_a_rerun_gives_the_same_prior_bytes(
    tmp_path: Path,
) -> None:
    shards = _shards(tmp_path / "data", [[0, 1], [1, 2], [3, 0]])
    clean = _config(shards, tmp_path / "clean", 1, gradcam=False)
    _run(clean)

    config = _config(shards, tmp_path / "crashed", 1, gradcam=False)
    with pytest.raises(RuntimeError, match="the machine died"):
        _calibrate(config, crash_at=store.shard_name(shards[1]))
    run = pipeline.run_url_of(config)
    assert not Path(store.prior_url(run, LAYER)).exists()
    written = sorted(p.name for p in Path(run, store.layout.CALIBRATION_FOLDER).iterdir())
    assert written == [f"{store.shard_name(shards[0])}.parquet"]
    _, _, rows = _run(config)

    assert _prior_bytes(config) == _prior_bytes(clean)
    assert len({(r["key"], r["method"]) for r in rows}) == len(rows) == 6


def test_classes_met_after_the_walk_stopped_start_from_the_fallback(tmp_path: Path) -> None:
    # The second shard adds nothing to the sample (classes 0 and 1 are full), so the walk
    # stops there; class 3 comes in the third shard only.
    shards = _shards(tmp_path / "data", [[0, 0, 1, 1], [1, 0, 0, 1], [3, 3, 0]])
    config = _config(shards, tmp_path / "runs")
    prior, _, rows = _run(config)

    assert set(prior.sample) == {store.shard_name(u) for u in shards[:2]}
    roles = {(r["key"], r["prior_role"]) for r in rows if r["method"] == "opticam"}
    assert ("k008", "fallback") in roles and ("k009", "fallback") in roles
    assert ("k010", "prior") in roles  # class 0 has its prior
    assert sum(1 for _, role in roles if role == "fallback") == 2


def test_changing_the_images_per_class_or_the_layer_changes_the_run_id(tmp_path: Path) -> None:
    shards = [str(tmp_path / "a.tar")]
    base = _config(shards, tmp_path)
    assert _config(shards, tmp_path, per_class=3).run_id != base.run_id
    other_layer = base.model_copy(
        update={"model": base.model.model_copy(update={"target_layer": "features.2"})}
    )
    assert other_layer.run_id != base.run_id
    assert _config(shards, tmp_path, prior_fallback="mean").run_id != base.run_id


@pytest.mark.parametrize("damage", ["garbage", "another model", "another width"])
def test_a_damaged_or_mismatched_prior_file_stops_the_run_before_any_compute(
    tmp_path: Path, damage: str
) -> None:
    shards = _shards(tmp_path / "data", [[0, 1]])
    config = _config(shards, tmp_path / "runs")
    run = pipeline.run_url_of(config)
    path = Path(store.prior_url(run, LAYER))
    path.parent.mkdir(parents=True)
    if damage == "garbage":
        path.write_bytes(b"PAR1 not a prior")
    else:
        channels = 8 if damage == "another model" else 5
        model = "demo" if damage == "another model" else tiny.FACTORY
        path.write_bytes(
            ClassPrior.empty(10, channels, model=model, layer=LAYER).to_parquet_bytes()
        )
    expected = {
        "garbage": "is not a readable class prior",
        "another model": "built for model 'demo'",
        "another width": "built for 5 channels, the layer has 8",
    }[damage]
    with pytest.raises(PriorError, match=expected) as caught:
        pipeline.preflight(config)
    assert (
        "\n" not in str(caught.value) and "delete it" in str(caught.value) or (damage == "garbage")
    )
    assert not Path(run, "rows").exists() and not Path(run, "calibration").exists()


def test_a_shard_whose_calibration_rows_are_gone_is_refused(tmp_path: Path) -> None:
    shards = _shards(tmp_path / "data", [[0, 1, 0]])
    config = _config(shards, tmp_path / "runs")
    _calibrate(config)
    run = pipeline.run_url_of(config)
    Path(store.calibration_url(run, shards[0])).unlink()
    with pytest.raises(PriorError, match="calibration rows of shard .* are gone"):
        pipeline.process_shard(config, shards[0], "cpu")
    assert not Path(store.rows_url(run, shards[0])).exists()


def test_calibration_files_hold_the_rows_and_the_counts_so_far(tmp_path: Path) -> None:
    shards = _shards(tmp_path / "data", [[0, 1, 0, 0], [1, 1, 2]])
    config = _config(shards, tmp_path / "runs")
    _calibrate(config)
    run = pipeline.run_url_of(config)
    first = run_prior.read_calibration(run, shards[0])
    second = run_prior.read_calibration(run, shards[1])
    assert first is not None and second is not None
    assert first.counts[:3].tolist() == [2, 1, 0] and second.counts[:3].tolist() == [2, 2, 1]
    assert first.keys == {"k000", "k001", "k002"} and second.keys == {"k004", "k006"}
    table = pq.read_table(store.calibration_url(run, shards[1]))
    assert set(table.column("prior_role").to_pylist()) == {"calibration"}


def test_the_report_says_how_many_images_were_calibration_prior_and_fallback(
    tmp_path: Path,
) -> None:
    from opticam.report import build_report

    shards = _shards(tmp_path / "data", [[0, 0, 1, 1], [1, 0, 0, 1], [3, 3, 0]])
    config = _config(shards, tmp_path / "runs", gradcam=False)
    _, sha256, _ = _run(config)
    report = build_report(pipeline.run_url_of(config), gallery_size=0, n_boot=10)
    assert (
        "Class prior: 4 calibration images (explained at the paper's setting), 5 started from "
        f"their class's prior, 2 from the fallback (prior file {sha256[:16]})."
    ) in report.summary_markdown
    page = Path(report.index_url).read_text()
    assert "class prior: images started from the fallback" in page
