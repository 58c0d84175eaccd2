"""``opticam worker``: one Prefect worker per GPU with its own CUDA_VISIBLE_DEVICES, or
CPU slots; heartbeats on; all of them stopped on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from opticam.cli.workers import HEARTBEAT_SECONDS, plan_workers, visible_gpus
from opticam.errors import ConfigError


def test_one_worker_per_visible_gpu_each_seeing_one_card() -> None:
    specs = plan_workers("gpu", name="box", environ={"CUDA_VISIBLE_DEVICES": "2,5"})
    assert [s.name for s in specs] == ["box-gpu2", "box-gpu5"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["2", "5"]
    for spec in specs:
        assert spec.argv[1:4] == ["-m", "prefect", "worker"]
        assert spec.argv[spec.argv.index("--limit") + 1] == "1"
        assert spec.argv[spec.argv.index("--pool") + 1] == "gpu"
        assert spec.argv[spec.argv.index("--name") + 1] == spec.name
        assert spec.env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_SECONDS)


def test_cpu_slots_hide_the_gpus_and_a_set_heartbeat_is_kept() -> None:
    environ = {"CUDA_VISIBLE_DEVICES": "0", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "45"}
    specs = plan_workers("cpu", slots=3, name="lab", environ=environ)
    assert [s.name for s in specs] == ["lab-cpu0", "lab-cpu1", "lab-cpu2"]
    assert all(s.env == {"CUDA_VISIBLE_DEVICES": ""} for s in specs)


def test_no_gpu_and_no_slots_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no GPU is visible.*--slots N"):
        plan_workers("gpu", environ={"CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(ConfigError, match="at least 1, got 0"):
        plan_workers("gpu", slots=0, environ={})


def test_visible_gpus_reads_the_variable_first() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 1, 3 "}) == ["1", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


@pytest.mark.e2e
def test_ctrl_c_stops_every_worker(tmp_path: object) -> None:
    # No server listens on this port: the workers keep trying to connect until stopped.
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "opticam", "worker", "--pool", "p", "--slots", "2"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    me = psutil.Process(process.pid)
    deadline = time.monotonic() + 60
    workers: list[psutil.Process] = []
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = [p for p in me.children() if "worker" in " ".join(p.cmdline())]
    assert len(workers) == 2, "the two Prefect workers did not start"
    time.sleep(3)  # let them import Prefect and install their own signal handlers
    process.send_signal(signal.SIGINT)
    try:
        assert process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"still running after Ctrl-C: {alive}"
    finally:
        for worker in workers:  # never leave a worker behind (it holds our pipe)
            if worker.is_running():
                worker.kill()
    output = process.stdout.read() if process.stdout else ""
    assert "started worker" in output and "stopping 2 workers" in output
