"""Executor ``deployments`` end to end, with real processes on loopback.

A Prefect server (own home folder, fast settings), ``opticam deploy``, two machines'
worth of ``opticam worker --slots 2`` (four Prefect process workers under a pool limit
of 2), S3 on moto's server, and ``opticam run --executor deployments``. One machine is
lost in the middle of a shard (its workers and flow-run process get SIGKILL); the
heartbeat automation marks the run Crashed, the parent submits it again and the other
machine finishes it. Then a rerun submits nothing, and a job with a corrupt shard ends
Failed with exit status 1.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from cluster import Cluster, running_cluster, wait_for

from opticam import store

pytestmark = pytest.mark.e2e

# Distinct fake credentials: the parent's (given on its command line) and the workers'
# (their environment). Moto accepts any.
PARENT_KEY, PARENT_SECRET = "AKIAPARENTKEY0000001", "parent-secret-5be1c0d2"
WORKER_KEY, WORKER_SECRET = "AKIAWORKERKEY0000002", "worker-secret-9a7f3e61"
SHARDS, PER_SHARD = 6, 6
POOL = "cpu"
# The secret part of the webhook URL: it must never be printed.
HOOK_TOKEN = "T0KEN-5ecret-7d41"


def _job(data: str, output: str, endpoint: str, *extra: str) -> list[str]:
    return [
        "run", "--data", data, "--output", output, "--model", "demo",
        "--methods", "opticam,gradcam", "--iterations", "10", "--steps", "8",
        "--device", "cpu", "--executor", "deployments", "--pool", POOL,
        "--max-in-flight", "4", "--storage-option", f"key={PARENT_KEY}",
        "--storage-option", f"secret={PARENT_SECRET}", "--s3-endpoint", endpoint, *extra,
    ]  # fmt: skip


def _time(text: str | None) -> float:
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


def _most_running_at_once(runs: list[dict[str, Any]]) -> int:
    """The most shard runs that were Running at the same moment (start to end times)."""
    edges: list[tuple[float, int]] = []
    for run in runs:
        if run["start_time"]:
            end = _time(run["end_time"]) if run["end_time"] else float("inf")
            edges += [(_time(run["start_time"]), 1), (end, -1)]
    most = now = 0
    for _, step in sorted(edges):  # an end sorts before a start at the same instant
        now += step
        most = max(most, now)
    return most


def _machine_of(flow_run_pid: int) -> psutil.Process:
    """The ``opticam worker`` process whose Prefect worker started this flow-run process."""
    worker = psutil.Process(flow_run_pid).parent()
    assert worker is not None and "worker" in worker.cmdline(), worker
    machine = worker.parent()
    assert machine is not None and "opticam" in " ".join(machine.cmdline()), machine
    return machine


def _machine_pid(run: dict[str, Any]) -> int | None:
    """The pid of the ``opticam worker`` that runs this flow run (None: not known yet)."""
    text = str(run.get("infrastructure_pid") or "")
    try:
        return _machine_of(int(text.rsplit(":", 1)[-1])).pid if text else None
    except (ValueError, AssertionError, psutil.Error):
        return None


def _lose_machine(machine: psutil.Process, flow_run_pid: int) -> None:
    """SIGKILL a machine's flow-run process first, then its workers, then the command."""
    tree = machine.children(recursive=True)
    tree.sort(key=lambda p: p.pid != flow_run_pid)
    for process in [*tree, machine]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs([*tree, machine], timeout=10)


@pytest.fixture
def cluster(tmp_path: Path, s3_endpoint: str) -> Iterator[Cluster]:
    env = {
        "AWS_ACCESS_KEY_ID": WORKER_KEY,
        "AWS_SECRET_ACCESS_KEY": WORKER_SECRET,
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        # Two flow runs share this machine's two cores.
        "OMP_NUM_THREADS": "1",
    }
    with running_cluster(tmp_path / "cluster", env) as running:
        yield running


def test_a_job_survives_a_lost_machine_on_a_real_work_pool(
    cluster: Cluster, s3_bucket: str, s3_endpoint: str, s3_storage_options: dict[str, Any]
) -> None:
    import s3fs

    from opticam.demo.generate import make_shards

    fs = s3fs.S3FileSystem(**s3_storage_options)
    urls = make_shards(f"{s3_bucket}/data", SHARDS, PER_SHARD, 77, s3_storage_options)

    deployed = cluster.opticam("deploy", "--pool", POOL, "--limit", "2", "--crash-after", "60")
    assert deployed.returncode == 0, deployed.stderr
    assert "deployed explain-shard/cpu on 'cpu'" in deployed.stdout
    assert "deployed explain-dataset/cpu on 'cpu-control'" in deployed.stdout
    assert "created automation" in deployed.stdout
    again = cluster.opticam("deploy", "--pool", POOL, "--limit", "2", "--crash-after", "60")
    assert "work pool 'cpu' exists" in again.stdout and "updated automation" in again.stdout

    for name in ("machine-a", "machine-b"):
        argv = [sys.executable, "-m", "opticam", "worker", "--pool", POOL, "--slots", "2"]
        cluster.start(name, [*argv, "--name", name])

    job = _job(
        f"{s3_bucket}/data/demo-{{000000..00000{SHARDS - 1}}}.tar", f"{s3_bucket}/runs", s3_endpoint
    )
    parent = cluster.start("run", [sys.executable, "-m", "opticam", *job])
    by_name = {u.rsplit("/", 1)[-1]: u for u in urls}

    # -- lose a machine in the middle of a shard -----------------------------------------
    def computing() -> dict[str, Any] | None:
        assert parent.poll() is None, cluster.log("run")
        fs.invalidate_cache()
        try:
            leases = fs.glob(f"{s3_bucket}/runs/*/leases/*.json")
        except FileNotFoundError:  # s3fs, while the parent has not written run.json yet
            return None
        held = {p.rsplit("/", 1)[-1].split(".")[0] for p in leases}
        runs = cluster.flow_runs("explain-shard")
        computing = [
            run
            for run in runs
            if run["state_type"] == "RUNNING"
            and run["name"] in by_name
            and store.shard_name(by_name[run["name"]]) in held
        ]
        if not computing or time.monotonic() > choosy_until:
            return dict(computing[0]) if computing else None
        # Preferably a machine with no run still starting: a run lost before its first
        # heartbeat stays Pending until the parent's --start-timeout (600 s) cancels it
        # (test_a_run_lost_before_it_starts_is_cancelled_and_submitted_again), longer
        # than this test waits.
        starting = [r for r in runs if r["state_type"] in ("PENDING", "RUNNING")]
        starting = [r for r in starting if r not in computing]
        busy = {_machine_pid(r) for r in starting}
        for run in computing:
            if _machine_pid(run) not in busy and None not in busy:
                return dict(run)
        return None

    choosy_until = time.monotonic() + 120

    victim = wait_for("a shard run holding its lease", computing, timeout=240, every=0.5)
    pid = int(str(victim["infrastructure_pid"]).rsplit(":", 1)[-1])
    machine = _machine_of(pid)
    lost = "machine-a" if "machine-a" in " ".join(machine.cmdline()) else "machine-b"
    kept = "machine-b" if lost == "machine-a" else "machine-a"
    _lose_machine(machine, pid)

    assert parent.wait(timeout=420) == 0, cluster.log("run")[-4000:]
    # The parent filled its in-flight bound (4); the pool let 2 of them run at once.
    assert "shard runs on pool cpu: at most 4 in flight" in cluster.log("run")

    # The lost runs (the machine may have held both running slots) were marked Crashed
    # by the automation, then submitted again and completed: each shard exactly once.
    states = [s["type"] for s in cluster.states(victim["id"])]
    assert states[-1] == "CRASHED" and "RUNNING" in states, states
    shard_runs = cluster.flow_runs("explain-shard")
    crashed = [r for r in shard_runs if r["state_type"] == "CRASHED"]
    completed = [r for r in shard_runs if r["state_type"] == "COMPLETED"]
    assert victim["id"] in {r["id"] for r in crashed} and len(crashed) <= 2
    assert len(shard_runs) == len(crashed) + len(completed)
    assert sorted(r["name"].split(" ")[0] for r in completed) == sorted(by_name)
    assert {f"{r['name']} #2" for r in crashed} <= {r["name"] for r in completed}
    assert _most_running_at_once(shard_runs) <= 2

    # Every shard exactly once, computed by the workers of both machines.
    (run_json,) = fs.glob(f"{s3_bucket}/runs/*/run.json")
    run = "s3://" + run_json.rsplit("/", 1)[0]
    statuses = [store.read_status(run, u, s3_storage_options) for u in urls]
    assert all(s is not None for s in statuses)
    workers = {s.worker for s in statuses if s is not None}
    assert store.read_status(run, by_name[victim["name"]], s3_storage_options).worker.startswith(
        kept
    )  # type: ignore[union-attr]
    ran_on = {w.rsplit("-", 1)[0] for w in workers} | {lost}
    assert ran_on == {"machine-a", "machine-b"}
    assert len(fs.glob(f"{run}/rows/*.parquet")) == SHARDS
    rows = store.read_rows(
        run, columns=["shard", "key", "method"], storage_options=s3_storage_options
    )
    keys = list(zip(*(rows.column(c).to_pylist() for c in ("shard", "key", "method")), strict=True))
    assert len(keys) == len(set(keys)) == SHARDS * PER_SHARD * 2
    assert fs.exists(f"{run}/report/index.html")

    # The parent: Completed, with its artifacts; no credential stored anywhere.
    (dataset_run,) = cluster.flow_runs("explain-dataset")
    assert dataset_run["state_type"] == "COMPLETED"
    keys_found = {a["key"] for a in cluster.artifacts(dataset_run["id"])}
    assert {
        "opticam-summary",
        "opticam-summary-table",
        "opticam-report",
        "opticam-progress",
    } <= keys_found
    # Every completed shard run logged its line to the API (images, rows, device, speed),
    # and the parent its plan and summary, although the CLI's console showed neither.
    for shard_run in completed:
        lines = [m["message"] for m in _logs(cluster, flow_run_id=[shard_run["id"]])]
        assert any(
            re.search(rf": {PER_SHARD} images, {PER_SHARD * 2} rows, 0 error rows .*images/s", m)
            for m in lines
        ), (shard_run["name"], lines)
    parent_lines = [m["message"] for m in _logs(cluster, flow_run_id=[dataset_run["id"]])]
    assert any(f"{SHARDS} shards planned" in m for m in parent_lines), parent_lines
    assert any(f"{SHARDS} shards processed" in m for m in parent_lines), parent_lines
    assert "INFO" not in cluster.log("run")
    stored = json.dumps([r["parameters"] for r in cluster.flow_runs()])
    for secret in (PARENT_KEY, PARENT_SECRET, WORKER_KEY, WORKER_SECRET):
        assert secret not in stored

    # -- a rerun submits nothing ---------------------------------------------------------
    rerun = cluster.opticam(*job)
    assert rerun.returncode == 0, rerun.stderr
    assert f"0 shards processed, {SHARDS} skipped" in rerun.stdout
    assert len(cluster.flow_runs("explain-shard")) == len(shard_runs)

    # -- a job with the class prior: its calibration runs first, then the rest ----------
    _a_prior_job_calibrates_before_the_rest(cluster, fs, s3_bucket, s3_endpoint, s3_storage_options)

    # -- a corrupt shard fails after its attempts -----------------------------------------
    fs.pipe(f"{s3_bucket}/bad/demo-000001.tar", b"this is not a tar archive" * 40)
    fs.copy(urls[0], f"{s3_bucket}/bad/demo-000000.tar")
    bad_job = _job(f"{s3_bucket}/bad/demo-{{000000..000001}}.tar", f"{s3_bucket}/runs", s3_endpoint)
    failed = cluster.opticam(*bad_job, "--shard-attempts", "2")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "failed shard" in failed.stderr and "demo-000001.tar" in failed.stderr
    (bad_json,) = set(fs.glob(f"{s3_bucket}/runs/*/run.json")) - {run_json}
    bad_run = "s3://" + bad_json.rsplit("/", 1)[0]
    errors = store.read_errors(bad_run, s3_storage_options).to_pylist()
    assert any(
        e["stage"] == "shard" and "2 runs crashed, failed or did not start" in e["message"]
        for e in errors
    )
    assert fs.exists(f"{bad_run}/report/index.html")
    bad_runs = [r for r in cluster.flow_runs("explain-shard") if "demo-000001.tar" in r["name"]]
    bad_runs = [r for r in bad_runs if r["parameters"]["shard_url"].startswith(f"{s3_bucket}/bad")]
    assert sorted(r["state_type"] for r in bad_runs) == ["FAILED", "FAILED"]
    parents = cluster.flow_runs("explain-dataset")
    assert sorted(r["state_type"] for r in parents) == ["COMPLETED"] * 3 + ["FAILED"]
    assert _most_running_at_once(cluster.flow_runs("explain-shard")) <= 2


def _a_prior_job_calibrates_before_the_rest(
    cluster: Cluster, fs: Any, bucket: str, endpoint: str, options: dict[str, Any]
) -> None:
    """A job with the class prior on the pool: the calibration runs end before any other
    shard run starts, and every Opti-CAM row after them records the prior file's hash."""
    data = f"{bucket}/data/demo-{{000000..00000{SHARDS - 1}}}.tar"
    flags = ("--start", "prior", "--lr", "0.5", "--prior-per-class", "1")
    done = cluster.opticam(*_job(data, f"{bucket}/prior-runs", endpoint, *flags))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "class prior " in done.stderr  # the parent's line: images and classes
    runs = [
        r
        for r in cluster.flow_runs("explain-shard")
        if r["parameters"]["config"]["output"].endswith("prior-runs")
    ]
    calibration = [r for r in runs if r["parameters"].get("stage") == "calibration"]
    rest = [r for r in runs if r["parameters"].get("stage", "explain") == "explain"]
    assert calibration and all(r["state_type"] == "COMPLETED" for r in runs)
    assert len({r["parameters"]["shard_url"] for r in rest}) == SHARDS
    assert max(_time(r["end_time"]) for r in calibration) <= min(
        _time(r["start_time"]) for r in rest
    )
    # Class counts travel in the calibration runs' parameters; weights never do.
    for r in runs:
        assert set(r["parameters"]) <= {"config", "shard_url", "max_images", "stage", "counts"}

    (run_json,) = fs.glob(f"{bucket}/prior-runs/*/run.json")
    run = "s3://" + run_json.rsplit("/", 1)[0]
    sha256 = hashlib.sha256(fs.cat(f"{run}/prior/features.block6.parquet")).hexdigest()
    rows = store.read_rows(
        run, columns=["key", "method", "prior_role", "prior_sha256"], storage_options=options
    ).to_pylist()
    opticam = [r for r in rows if r["method"] == "opticam"]
    sampled = [r for r in opticam if r["prior_role"] == "calibration"]
    started = [r for r in opticam if r["prior_role"] != "calibration"]
    assert len(rows) == 2 * len(opticam) == 2 * SHARDS * PER_SHARD
    assert 1 <= len(sampled) <= 10 and started  # one image per class of the demo's 10
    assert {r["prior_sha256"] for r in started} == {sha256}
    assert {r["prior_role"] for r in started} <= {"prior", "fallback"}
    assert {s["prior_sha256"] for s in store.read_statuses(run, options)} == {sha256}


# --------------------------------------------------------------------------- logs, notify


class _Hook(BaseHTTPRequestHandler):
    """Records the bodies POSTed to it (the webhook a notification goes to)."""

    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server spelling
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append((self.path, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    received: list[tuple[str, bytes]] = []
    handler = type("Hook", (_Hook,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/{HOOK_TOKEN}", received
    finally:
        server.shutdown()
        thread.join(timeout=10)


def _logs(cluster: Cluster, **ids: list[str]) -> list[dict[str, Any]]:
    """INFO and higher logs of these flow runs or task runs, oldest first."""
    body = {
        "logs": {**{k: {"any_": v} for k, v in ids.items()}, "level": {"ge_": 20}},
        "sort": "TIMESTAMP_ASC",
        "limit": 200,
    }
    return list(cluster.post("/logs/filter", body))


def _posts(received: list[tuple[str, bytes]], state: str) -> list[dict[str, Any]]:
    bodies = [json.loads(body) for _, body in received]
    return [b for b in bodies if b.get("state") == state]


def test_a_cli_run_logs_to_the_ui_and_a_webhook_hears_how_jobs_end(
    tmp_path: Path, webhook: tuple[str, list[tuple[str, bytes]]]
) -> None:
    from opticam.demo.generate import make_shards

    url, received = webhook
    with running_cluster(tmp_path / "cluster", {}) as cluster:
        deployed = cluster.opticam("deploy", "--pool", POOL, "--notify", url)
        assert deployed.returncode == 0, deployed.stderr
        assert "saved webhook block 'opticam-notify' (host 127.0.0.1)" in deployed.stdout
        assert "created automation 'opticam: post to a webhook" in deployed.stdout
        assert HOOK_TOKEN not in deployed.stdout + deployed.stderr
        again = cluster.opticam("deploy", "--pool", POOL, "--notify", url)
        assert "updated automation 'opticam: post to a webhook" in again.stdout
        bad = cluster.opticam("deploy", "--pool", POOL, "--notify", "ftp://example.org/x")
        assert bad.returncode == 2 and "http:// or https://" in bad.stderr

        # A job on this machine (executor local), its console as quiet as ever.
        shards = make_shards(str(tmp_path / "data"), 2, 3, seed=5)
        job = ["run", "--data", str(tmp_path / "data" / "demo-*.tar"), "--device", "cpu"]
        job += ["--methods", "gradcam", "--no-insertion-deletion", "--output"]
        done = cluster.opticam(*job, str(tmp_path / "runs"))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "INFO" not in done.stderr
        (parent,) = cluster.flow_runs("explain-dataset")
        assert parent["state_type"] == "COMPLETED"

        # Its logs reached the API: the plan and the summary of the flow run, and one
        # line per shard task run with images, error rows, device, seconds and speed.
        def parent_logs() -> list[str]:
            messages = [m["message"] for m in _logs(cluster, flow_run_id=[parent["id"]])]
            return messages if any("shards processed" in m for m in messages) else []

        messages = wait_for("the parent's summary log", parent_logs, timeout=60)
        assert any("2 shards planned, 0 already done, 2 to process" in m for m in messages)
        assert any("2 shards processed, 0 skipped, 0 failed; 6 images" in m for m in messages)
        tasks = cluster.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [parent["id"]]}}})
        shard_tasks = {t["name"]: t["id"] for t in tasks if t["name"].startswith("shard ")}
        assert sorted(shard_tasks) == sorted(f"shard {Path(s).name}" for s in shards)
        for name, task_id in shard_tasks.items():
            lines = [m["message"] for m in _logs(cluster, task_run_id=[task_id])]
            assert any(
                re.search(
                    r": 3 images, 3 rows, 0 error rows in [\d.]+ s on cpu \([\d.]+ images/s\)", m
                )
                for m in lines
            ), (name, lines)

        # A job that fails (one shard is not a tar archive) ends Failed and is heard too.
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "demo-000000.tar").write_bytes(b"not a tar archive" * 50)
        failed = cluster.opticam(
            *job[:2], str(tmp_path / "bad" / "demo-*.tar"), *job[3:], str(tmp_path / "runs")
        )
        assert failed.returncode == 1, failed.stderr[-3000:]

        def heard() -> bool:
            return bool(_posts(received, "Completed")) and bool(_posts(received, "Failed"))

        wait_for("the webhook posts", heard, timeout=120)
    (completed,) = _posts(received, "Completed")
    assert completed["flow_run"] == parent["name"] and completed["flow_run_id"] == parent["id"]
    assert completed["text"].startswith(f"opticam: {parent['name']} Completed")
    (failure,) = _posts(received, "Failed")
    assert "1 of 1 shards failed" in failure["message"] and "Failed" in failure["text"]
    assert {path for path, _ in received} == {f"/hooks/{HOOK_TOKEN}"}


# --------------------------------------------------------------------------- lost early


def _freeze_and_kill(machine: psutil.Process) -> None:
    """Lose a machine at once: SIGSTOP its command and workers (so that none starts or
    reports anything more), then SIGKILL them and every process they started."""
    for process in [machine, *machine.children()]:
        process.send_signal(signal.SIGSTOP)
    tree = [*machine.children(recursive=True), machine]
    for process in tree:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(tree, timeout=10)


def test_a_run_lost_before_it_starts_is_cancelled_and_submitted_again(tmp_path: Path) -> None:
    from opticam.demo.generate import make_shards

    make_shards(str(tmp_path / "data"), 2, 3, seed=21)
    with running_cluster(tmp_path / "cluster", {"OMP_NUM_THREADS": "1"}) as cluster:
        deployed = cluster.opticam("deploy", "--pool", POOL)
        assert deployed.returncode == 0, deployed.stderr
        worker = [sys.executable, "-m", "opticam", "worker", "--pool", POOL, "--slots", "1"]
        doomed = cluster.start("doomed", [*worker, "--name", "doomed"])
        job = ["run", "--data", str(tmp_path / "data" / "demo-*.tar"), "--device", "cpu"]
        job += ["--methods", "gradcam", "--no-insertion-deletion", "--executor", "deployments"]
        job += ["--pool", POOL, "--start-timeout", "40", "--output", str(tmp_path / "runs")]
        parent = cluster.start("run", [sys.executable, "-m", "opticam", *job])

        # The only worker picks a run up (Pending) and its machine dies at once, while the
        # run's flow-run process is starting: no heartbeat, no Running, nothing more.
        def picked_up() -> dict[str, Any] | None:
            assert parent.poll() is None, cluster.log("run")
            pending = [
                r for r in cluster.flow_runs("explain-shard") if r["state_type"] == "PENDING"
            ]
            return pending[0] if pending else None

        victim = wait_for("a shard run picked up", picked_up, timeout=180, every=0.2)
        _freeze_and_kill(psutil.Process(doomed.pid))
        cluster.start("healthy", [*worker, "--name", "healthy"])

        assert parent.wait(timeout=420) == 0, cluster.log("run")[-4000:]
        states = cluster.states(victim["id"])
        assert [s["type"] for s in states if s["type"] == "RUNNING"] == []
        assert states[-1]["type"] == "CANCELLED", states
        assert "not Running after" in states[-1]["message"], states[-1]
        shard_runs = {r["name"]: r for r in cluster.flow_runs("explain-shard")}
        assert shard_runs[f"{victim['name']} #2"]["state_type"] == "COMPLETED"
        # Each shard was computed once, by the healthy machine.
        (run,) = (tmp_path / "runs").iterdir()
        statuses = [store.read_status(str(run), str(p)) for p in (tmp_path / "data").iterdir()]
        assert all(s is not None and s.worker.startswith("healthy") for s in statuses)
        (parent_run,) = cluster.flow_runs("explain-dataset")
        assert parent_run["state_type"] == "COMPLETED"


# --------------------------------------------------------------------------- server restarts


@pytest.mark.parametrize("executor", ["local", "deployments"])
@pytest.mark.parametrize("database", ["kept", "lost"])
def test_a_run_goes_on_when_the_server_restarts(
    tmp_path: Path, executor: str, database: str
) -> None:
    from opticam.demo.generate import make_shards

    make_shards(str(tmp_path / "data"), 3, 4, seed=31)
    runs = tmp_path / "runs"
    with running_cluster(tmp_path / "cluster", {"OMP_NUM_THREADS": "1"}) as cluster:
        job = ["run", "--data", str(tmp_path / "data" / "demo-*.tar"), "--device", "cpu"]
        job += ["--methods", "opticam", "--iterations", "100", "--steps", "8"]
        job += ["--output", str(runs)]
        if executor == "deployments":
            assert cluster.opticam("deploy", "--pool", POOL).returncode == 0
            argv = [sys.executable, "-m", "opticam", "worker", "--pool", POOL, "--slots", "1"]
            cluster.start("machine", argv)
            job += ["--executor", "deployments", "--pool", POOL]
        parent = cluster.start("run", [sys.executable, "-m", "opticam", *job])

        def first_shard() -> list[Path]:
            assert parent.poll() is None, cluster.log("run")
            return list(runs.glob("*/rows/*.parquet"))

        wait_for("the first shard's rows", first_shard, timeout=300, every=0.2)
        # In the middle of the run: the server stops, and comes back on the same
        # database or on an empty one (a container without a volume).
        cluster.restart_server(forget=database == "lost")
        code = parent.wait(timeout=420)
        out = cluster.log("run")
        assert "Traceback" not in out, out[-4000:]
        (run,) = runs.iterdir()
        done = list((run / "rows").glob("*.parquet"))
        assert (run / "report" / "index.html").exists()
        assert out.count("no longer knows this run") == (database == "lost"), out[-4000:]
        if database == "kept" or executor == "local":
            # The run went on: every shard, the report, exit status 0.
            assert code == 0, out[-4000:]
            assert "3 shards processed, 0 skipped, 0 failed; 12 images" in out
            assert len(done) == 3
            return
        # Deployments: the server lost the shard deployment with its database, so what
        # was not done is listed, with the summary of what was.
        assert code == 1, out[-4000:]
        assert f"{len(done)} shards processed" in out
        assert f"{3 - len(done)} shards not run: the Prefect server forgot this run" in out
        # Nothing is lost: deployed again, a rerun computes only the rest.
        assert cluster.opticam("deploy", "--pool", POOL).returncode == 0
        rerun = cluster.opticam(*job)
        assert rerun.returncode == 0, rerun.stderr[-4000:]
        assert f"{3 - len(done)} shards processed, {len(done)} skipped, 0 failed" in rerun.stdout


def test_a_webhook_hears_of_a_job_that_does_not_start(
    tmp_path: Path, webhook: tuple[str, list[tuple[str, bytes]]]
) -> None:
    url, received = webhook
    with running_cluster(tmp_path / "cluster", {}) as cluster:
        deploy = ["deploy", "--pool", POOL, "--notify", url, "--start-timeout", "30"]
        deployed = cluster.opticam(*deploy)
        assert deployed.returncode == 0, deployed.stderr
        name = "opticam: post to a webhook when explain-dataset does not start"
        assert f"created automation {name!r} (30 s)" in deployed.stdout
        argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", f"{POOL}-control"]
        control = cluster.start("control", [*argv, "--limit", "1"])
        body = {"deployments": {"name": {"any_": [POOL]}}}
        body["flows"] = {"name": {"any_": ["explain-dataset"]}}
        (deployment,) = cluster.post("/deployments/filter", body)
        config = {"data": str(tmp_path / "d-*.tar"), "executor": "deployments", "pool": POOL}
        parent = cluster.post(
            f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"config": config}}
        )

        # The control worker picks the parent up and its machine dies at once.
        def pending() -> bool:
            run = cluster.get(f"/flow_runs/{parent['id']}")
            assert run["state_type"] in ("SCHEDULED", "PENDING"), run["state_type"]
            return bool(run["state_type"] == "PENDING")

        wait_for("the parent picked up", pending, timeout=120, every=0.2)
        _freeze_and_kill(psutil.Process(control.pid))

        def heard() -> list[dict[str, Any]]:
            return _posts(received, "Pending")

        (post,) = wait_for("the webhook post", heard, timeout=120)
    assert post["flow_run_id"] == parent["id"]
    assert "has not started within 30 s (still Pending)" in post["text"], post
    assert post["message"] == "not started within 30 s"
    assert {path for path, _ in received} == {f"/hooks/{HOOK_TOKEN}"}
