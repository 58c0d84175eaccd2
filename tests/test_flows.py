"""The Prefect flows end to end under ``prefect_test_harness``: local and S3 output,
artifacts, resume, partial reruns, failures and retries.

The harness (a temporary Prefect server and database) is slow to start, so one serves
the whole session. Runs are kept small: 2 demo shards x 6 images, Opti-CAM with 5
iterations + Grad-CAM + Fake-CAM, 8 insertion/deletion steps.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pyarrow.parquet as pq
import pytest

from opticam import pipeline, store
from opticam.config import RunConfig
from opticam.data import NoShardsError
from opticam.demo import make_shards

SECRET = "FLOW-SECRET-VALUE-7"
METHODS = [{"name": "opticam", "options": {"iterations": 5}}, "gradcam", "fakecam"]


@pytest.fixture(scope="session")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def flows(harness: None) -> Any:
    import opticam_flows.explain as module

    return module


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return make_shards(str(tmp_path_factory.mktemp("demo")), 2, 6, seed=11)


def make_config(shards: list[str], output: str, **changes: Any) -> RunConfig:
    fields: dict[str, Any] = {
        "data": f"{Path(shards[0]).parent}/demo-*.tar",
        "output": output,
        "model": {"source": "demo"},
        "methods": METHODS,
        "metrics": {"steps": 8},
        "device": "cpu",
        "batch_size": 6,
    }
    fields.update(changes)
    return RunConfig(**fields)


def run_flow(flows: Any, config: RunConfig) -> tuple[dict[str, Any], UUID]:
    """Run explain_dataset; return its result and the flow run id."""
    state = flows.explain_dataset(config, return_state=True)
    result = state.result(raise_on_failure=False)
    # Failed exactly when a shard failed.
    assert state.is_completed() == (result["shards_failed"] == 0), state
    return result, state.state_details.flow_run_id


def without_timing(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not k.startswith("seconds")} for row in summary]


def read_artifacts(flow_run_id: UUID) -> dict[str, Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in artifacts if a.key}


def check_parquet_files(run: str, options: dict[str, Any] | None = None) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{run}/rows", **(options or {}))
    files = fs.ls(path, detail=False)
    assert len(files) == 2
    for file in files:
        with fs.open(file, "rb") as f:
            schema = pq.read_schema(f)
        assert schema.equals(store.SCHEMA, check_metadata=False)
        assert json.loads(schema.metadata[store.STATUS_KEY.encode()])["complete"] is True


@pytest.fixture(scope="module")
def local_run(
    flows: Any, shards: list[str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    output = str(tmp_path_factory.mktemp("runs"))
    config = make_config(shards, output)
    events: list[tuple[str, dict[str, Any]]] = []
    with flows.progress_listener(lambda e, d: events.append((e, d))):
        result, flow_run_id = run_flow(flows, config)
    return {
        "config": config,
        "result": result,
        "id": flow_run_id,
        "events": events,
        "shards": shards,
    }


@pytest.mark.e2e
def test_demo_end_to_end_local(local_run: dict[str, Any]) -> None:
    config, result = local_run["config"], local_run["result"]
    run = pipeline.run_url_of(config)
    assert result["run_url"] == run and result["run_id"] == config.run_id
    assert (result["shards_total"], result["shards_processed"], result["shards_skipped"]) == (
        2,
        2,
        0,
    )
    assert result["shards_failed"] == 0 and result["images"] == 12 and result["rows"] == 36
    check_parquet_files(run)
    rows = store.read_rows(run, ["method", "key"])
    assert rows.num_rows == 36
    assert sorted(set(rows.column("method").to_pylist())) == ["fakecam", "gradcam", "opticam"]
    report = Path(run) / "report"
    for name in ("index.html", "summary.md", "summary.parquet"):
        assert (report / name).is_file(), name
    assert result["report_url"].endswith("/report/index.html")
    assert {r["method"] for r in result["summary"]} == {"opticam", "gradcam", "fakecam"}
    saved = json.loads((Path(run) / "run.json").read_text())
    assert [s["name"] for s in saved["shards"]] == [
        store.shard_name(u) for u in local_run["shards"]
    ]
    assert saved["job"] == config.job_description()
    # What the model applied (the demo model normalizes inside its own code).
    assert saved["loaded_model"]["target_layer"] == "features.block6"
    assert (saved["loaded_model"]["mean"], saved["loaded_model"]["std"]) == (None, None)
    events = [e for e, _ in local_run["events"]]
    assert events[0] == "plan" and events.count("shard_done") == 2
    assert events[-2:] == ["report", "summary"]
    assert local_run["events"][-1][1] == local_run["result"]
    assert sum(d["n"] for e, d in local_run["events"] if e == "images") == 12


@pytest.mark.e2e
def test_artifacts_are_published(local_run: dict[str, Any]) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    artifacts = read_artifacts(local_run["id"])
    summary, table, link = (
        artifacts["opticam-summary"],
        artifacts["opticam-summary-table"],
        artifacts["opticam-report"],
    )
    assert summary.type == "markdown" and local_run["config"].run_id in summary.data
    assert table.type == "table"
    table_rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["method"] for r in table_rows} == {"opticam", "gradcam", "fakecam"}
    assert link.type == "markdown"  # Prefect stores link artifacts as "[text](url)" markdown
    assert local_run["result"]["report_url"] in str(link.data)
    progress = artifacts["opticam-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0

    from prefect import get_client

    with get_client(sync_client=True) as client:
        by_key = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["opticam-summary"]))
        )
    assert any(a.flow_run_id == local_run["id"] for a in by_key)


@pytest.mark.e2e
def test_rerunning_the_same_job_processes_nothing(flows: Any, local_run: dict[str, Any]) -> None:
    config = local_run["config"]
    run = pipeline.run_url_of(config)
    files = sorted((Path(run) / "rows").iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]
    # Another execution setting, the same run id (Opti-CAM's batch size is not one).
    again, _ = run_flow(flows, config.model_copy(update={"shard_attempts": 5}))
    assert again["run_url"] == run
    assert (again["shards_processed"], again["shards_skipped"]) == (0, 2)
    assert again["summary"] == local_run["result"]["summary"]
    assert [f.stat().st_mtime_ns for f in files] == mtimes


@pytest.mark.e2e
def test_deleting_one_shard_reprocesses_only_that_one(
    flows: Any, local_run: dict[str, Any]
) -> None:
    config = local_run["config"]
    run = Path(pipeline.run_url_of(config))
    first, second = sorted((run / "rows").iterdir())
    kept = second.stat().st_mtime_ns
    first.unlink()
    events: list[tuple[str, dict[str, Any]]] = []
    with flows.progress_listener(lambda e, d: events.append((e, d))):
        result, _ = run_flow(flows, config)
    assert (result["shards_processed"], result["shards_skipped"]) == (1, 1)
    started = [d["shard"] for e, d in events if e == "shard_done"]
    assert [store.shard_name(s) + ".parquet" for s in started] == [first.name]
    assert first.exists() and second.stat().st_mtime_ns == kept
    # Same numbers again; only the measured time per image differs.
    assert without_timing(result["summary"]) == without_timing(local_run["result"]["summary"])


@pytest.mark.e2e
def test_a_changed_job_never_shares_the_run_folder(
    flows: Any, local_run: dict[str, Any], shards: list[str]
) -> None:
    config = local_run["config"]
    changed = make_config(shards, config.output, methods=["gradcam", "fakecam"], max_images=4)
    assert changed.run_id != config.run_id
    result, _ = run_flow(flows, changed)
    assert result["run_url"] != pipeline.run_url_of(config)
    assert result["shards_processed"] == 2 and result["images"] == 4
    folders = sorted(p.name for p in Path(config.output).iterdir())
    assert folders == sorted([config.run_id, changed.run_id])
    # The first run is untouched.
    assert store.read_rows(pipeline.run_url_of(config), ["key"]).num_rows == 36


@pytest.mark.e2e
def test_one_tar_named_many_ways_is_planned_computed_and_counted_once(
    flows: Any, shards: list[str], tmp_path: Path
) -> None:
    # 2 tars of 6 images, 5 spellings: doubled slashes, '.', '..', file:// and a glob.
    folder = Path(shards[0]).parent
    (folder / "sub").mkdir(exist_ok=True)
    first, second = (Path(s).name for s in shards)
    spellings = [
        f"{folder}//{first}",
        f"{folder}/./{second}",
        f"{folder}/sub/../{first}",
        f"file://{folder}/{second}",
        f"{folder}/demo-*.tar",
    ]
    config = make_config(shards, str(tmp_path), data=spellings, methods=["fakecam"])
    events: list[tuple[str, dict[str, Any]]] = []
    with flows.progress_listener(lambda e, d: events.append((e, d))):
        result, _ = run_flow(flows, config)
    assert (result["shards_total"], result["images"], result["rows"]) == (2, 12, 12)
    run = Path(pipeline.run_url_of(config))
    assert len(list((run / "rows").iterdir())) == 2
    assert store.read_rows(str(run), ["key"]).num_rows == 12
    assert sum(r["images"] for r in result["summary"]) == 12
    plan = next(d for e, d in events if e == "plan")
    assert (plan["total"], plan["duplicates"]) == (2, 4)
    from opticam.cli.progress import RunProgress

    shown = io.StringIO()
    RunProgress(shown)("plan", plan)
    assert "2 shards" in shown.getvalue()
    assert "4 more entries named a shard already listed" in shown.getvalue()


@pytest.mark.e2e
def test_a_damaged_rows_file_is_moved_aside_and_its_shard_computed_again(
    flows: Any, shards: list[str], tmp_path: Path
) -> None:
    config = make_config(shards, str(tmp_path), methods=["fakecam"])
    first, _ = run_flow(flows, config)
    run = Path(pipeline.run_url_of(config))
    damaged = run / "rows" / f"{store.shard_name(shards[0])}.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a copy that stopped early
    events: list[tuple[str, dict[str, Any]]] = []
    with flows.progress_listener(lambda e, d: events.append((e, d))):
        again, _ = run_flow(flows, config)
    assert (again["shards_processed"], again["shards_skipped"], again["shards_failed"]) == (1, 1, 0)
    assert again["summary"][0]["images"] == first["summary"][0]["images"] == 12
    plan = next(d for e, d in events if e == "plan")
    assert list(plan["damaged"]) == [store.shard_name(shards[0])]
    [moved] = (run / "damaged").iterdir()
    assert moved.stat().st_size == 100 and damaged.stat().st_size > 100


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh bucket, created without a LocationConstraint (moto rejects us-east-1's)."""
    import boto3

    name = f"flows-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.mark.e2e
def test_demo_end_to_end_with_s3_output(
    flows: Any, shards: list[str], bucket: str, s3_endpoint: str
) -> None:
    # moto accepts any credentials: a recognisable secret shows whether it leaks.
    options = {
        "key": "testing",
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    config = make_config(shards, f"{bucket}/runs", output_storage_options=options)
    result, flow_run_id = run_flow(flows, config)
    run = f"{bucket}/runs/{config.run_id}"
    assert result["run_url"] == run and result["shards_processed"] == 2
    check_parquet_files(run, options)
    assert store.read_rows(run, ["key"], options).num_rows == 36
    assert result["report_url"] == f"{run}/report/index.html"
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    assert fs.exists(f"{run}/report/index.html") and fs.exists(f"{run}/report/summary.md")
    assert SECRET not in fs.cat(f"{run}/run.json").decode()
    assert set(read_artifacts(flow_run_id)) >= {
        "opticam-summary",
        "opticam-summary-table",
        "opticam-report",
    }

    from prefect import get_client

    with get_client(sync_client=True) as client:
        stored = client.read_flow_run(flow_run_id).parameters
    assert SECRET not in json.dumps(stored)
    assert stored["config"]["output"] == f"{bucket}/runs"

    again, _ = run_flow(flows, config)
    assert (again["shards_processed"], again["shards_skipped"]) == (0, 2)


@pytest.mark.e2e
def test_no_shards_fails_before_any_work(flows: Any, tmp_path: Path) -> None:
    config = make_config(["/nowhere/x.tar"], str(tmp_path / "runs"), data=f"{tmp_path}/none-*.tar")
    with pytest.raises(NoShardsError):
        flows.explain_dataset(config)
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_failed_shard_is_recorded_and_retried_by_the_next_run(
    flows: Any, shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(shards, str(tmp_path), methods=["fakecam"])
    real = flows.process_shard
    attempts: list[str] = []

    def broken_for_first(cfg: RunConfig, url: str, *args: Any, **kwargs: Any) -> Any:
        attempts.append(url)
        if url == shards[0]:
            raise ValueError("bad data that no retry can fix")
        return real(cfg, url, *args, **kwargs)

    monkeypatch.setattr(flows, "process_shard", broken_for_first)
    result, _ = run_flow(flows, config)
    assert result["shards_failed"] == 1 and result["shards_processed"] == 1
    assert "bad data" in result["failed"][shards[0]]
    assert attempts.count(shards[0]) == 1  # not transient: no retry
    run = pipeline.run_url_of(config)
    assert store.list_done_rows(run) == [store.shard_name(shards[1])]
    errors = store.read_errors(run).to_pylist()
    assert {"shard": shards[0], "stage": "shard"}.items() <= next(
        e for e in errors if e["shard"] == shards[0]
    ).items()

    monkeypatch.setattr(flows, "process_shard", real)
    again, _ = run_flow(flows, config)
    assert (again["shards_processed"], again["shards_skipped"], again["shards_failed"]) == (1, 1, 0)


@pytest.mark.e2e
def test_shards_held_elsewhere_or_done_meanwhile_are_told_apart(
    flows: Any, shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(shards, str(tmp_path), methods=["fakecam"])

    def other_runs(cfg: RunConfig, url: str, *args: Any, **kwargs: Any) -> Any:
        status = pipeline.done_status(cfg, url)
        if url == shards[0]:
            status.held_by = "other-host:42:abcd"  # its lease is live elsewhere
        return status  # shards[1]: another run finished it after the plan

    monkeypatch.setattr(flows, "process_shard", other_runs)
    result, _ = run_flow(flows, config)
    assert result["held"] == {shards[0]: "other-host:42:abcd"}
    assert (result["shards_held"], result["shards_skipped"], result["shards_processed"]) == (
        1,
        1,
        0,
    )


@pytest.mark.e2e
def test_transient_errors_are_retried(
    flows: Any, shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(shards[:1], str(tmp_path), data=shards[0], methods=["fakecam"])
    real = flows.process_shard
    attempts: list[float] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError("endpoint went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(flows, "process_shard", flaky)
    monkeypatch.setattr(
        flows, "shard_task", flows.shard_task.with_options(retry_delay_seconds=[0, 0, 0])
    )
    result, _ = run_flow(flows, config)
    assert len(attempts) == 3 and result["shards_processed"] == 1


@pytest.mark.e2e
def test_explain_shard_flow_processes_or_skips(
    flows: Any, shards: list[str], tmp_path: Path
) -> None:
    config = make_config(shards, str(tmp_path), methods=["fakecam"])
    first = flows.explain_shard(config, shards[1], max_images=2)
    assert first["skipped"] is False and first["n_images"] == 2
    second = flows.explain_shard(config, shards[1])
    assert second["skipped"] is True
    assert store.list_done_rows(pipeline.run_url_of(config)) == [store.shard_name(shards[1])]


@pytest.mark.e2e
def test_a_prior_job_calibrates_first_then_explains_every_shard_from_the_prior(
    flows: Any, shards: list[str], tmp_path: Path
) -> None:
    methods = [{"name": "opticam", "options": {"start": "prior", "iterations": 5, "lr": 0.5,
                "prior_per_class": 1}}]  # fmt: skip
    config = make_config(shards, str(tmp_path), methods=methods, metrics={"steps": 2})
    events: list[tuple[str, dict[str, Any]]] = []
    with flows.progress_listener(lambda e, d: events.append((e, d))):
        result, _ = run_flow(flows, config)
    assert result["shards_processed"] == 2 and result["images"] == 12
    names = [e for e, _ in events]
    # The walk (a calibration per shard it reached, then the prior) before any shard.
    assert "calibration_done" in names and "prior" in names
    assert max(i for i, n in enumerate(names) if n == "calibration_done") < names.index("prior")
    assert names.index("prior") < names.index("shard_start")
    (prior,) = [d for e, d in events if e == "prior"]
    rows = store.read_rows(pipeline.run_url_of(config)).to_pylist()
    sampled = [r for r in rows if r["prior_role"] == "calibration"]
    assert len(sampled) == prior["images"] >= 1 and prior["classes"] == len(sampled)
    assert {r["prior_sha256"] for r in rows if r["prior_role"] != "calibration"} == {
        prior["sha256"]
    }
    # A rerun reads the same prior and computes nothing.
    again, _ = run_flow(flows, config)
    assert again["shards_skipped"] == 2


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionError("reset"), True),
        (TimeoutError("slow"), True),
        (OSError(5, "I/O error"), True),
        (pipeline.ShardUnavailableError("cannot open"), True),
        (FileNotFoundError("gone"), False),
        (PermissionError("denied"), False),
        (ValueError("bad data"), False),
        (RuntimeError("bug"), False),
    ],
)
def test_transient_error_classification(exc: BaseException, transient: bool) -> None:
    from opticam_flows.explain import is_transient_error

    assert is_transient_error(exc) is transient


def test_botocore_errors_are_transient() -> None:
    from botocore.exceptions import EndpointConnectionError

    from opticam_flows.explain import is_transient_error

    assert is_transient_error(EndpointConnectionError(endpoint_url="http://x"))


@pytest.mark.e2e
def test_shard_task_runs_have_printable_names(
    flows: Any, shards: list[str], tmp_path: Path
) -> None:
    import shutil

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    odd = tmp_path / "data" / "x\n\u200fy\u2028z-é.tar"
    odd.parent.mkdir()
    shutil.copy(shards[0], odd)
    config = make_config([str(odd)], str(tmp_path / "runs"), data=str(odd), methods=["fakecam"])
    state = flows.explain_shard(config, str(odd), max_images=1, return_state=True)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    assert [t.name for t in tasks] == ["shard x\\n\\u200fy\\u2028z-é.tar"]
    assert flows.shard_task_name("s3://b/d\u00e9j\u00e0 vu\r.tar") == "shard déjà vu\\r.tar"
