"""The lifeline: nothing ``opticam run`` started outlives it (SIGKILL, SIGTERM), SIGTERM and
SIGINT end it at once with one line and 128 + signal, and the watchdog touches only what
the supervised process started. Every test uses real processes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest

from opticam.cli.lifeline import Terminated, supervised
from opticam.demo import make_shards

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
ENV.pop("PREFECT_API_URL", None)


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes that still run (psutil compares creation times: no reused PID)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


def survivors(processes: list[psutil.Process], within: float = 10.0) -> list[psutil.Process]:
    """The processes still running once ``within`` seconds have passed (or none is left)."""
    deadline = time.monotonic() + within
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(processes)


@pytest.fixture
def spawned() -> Iterator[list[psutil.Process]]:
    """Processes a test records; whatever still runs at the end is killed (a failing test
    must not leave a 200 MB server behind)."""
    processes: list[psutil.Process] = []
    yield processes
    for process in alive(processes):
        process.kill()


def start_run(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """``python -m opticam run`` on two 20-image demo shards, with its own ephemeral Prefect."""
    urls = make_shards(str(tmp_path / "data"), 2, 20, seed=3)
    stderr = tmp_path / "stderr.txt"
    argv = ["run", "--data", *urls, "--output", str(tmp_path / "out"), "--device", "cpu"]
    argv += ["--methods", "opticam", "--iterations", "100", "--steps", "4"]
    env = {
        **ENV,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "OPTICAM_CACHE": str(tmp_path / "cache"),
    }
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "opticam", *argv],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    return process, stderr


def wait_until(condition: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 90
    while not condition():
        assert process.poll() is None, f"opticam run ended (status {process.returncode})"
        assert time.monotonic() < deadline, f"no {what} after 90 s"
        time.sleep(0.1)


def descendants(process: subprocess.Popen[Any]) -> list[psutil.Process]:
    return psutil.Process(process.pid).children(recursive=True)


def has_server(process: subprocess.Popen[bytes]) -> bool:
    names = []
    for child in descendants(process):
        with contextlib.suppress(psutil.Error):  # ended meanwhile
            names.append(" ".join(child.cmdline()))
    return any("uvicorn" in name for name in names)


def test_sigkill_leaves_no_descendant_running(
    tmp_path: Path, spawned: list[psutil.Process]
) -> None:
    run, _ = start_run(tmp_path)
    try:
        wait_until(lambda: has_server(run), run, "Prefect server")
        spawned.extend(descendants(run))
    finally:
        run.kill()
        run.wait()
    assert survivors(spawned) == []


def test_sigterm_stops_at_once_with_one_line_and_143(
    tmp_path: Path, spawned: list[psutil.Process]
) -> None:
    run, stderr = start_run(tmp_path)
    try:
        # The plan's "output:" line comes just before the first shard starts.
        wait_until(lambda: b"output: " in stderr.read_bytes(), run, "plan")
        # The first shard is being computed: it needs ~30 s here, far more than the 0.5 s
        # plus lifeline.UNWIND that an interrupted run may take to end.
        time.sleep(0.5)
        assert has_server(run)
        spawned.extend(descendants(run))
        # Without a terminal, progress is one "[i/n] shard: ..." line per finished shard.
        finished = len(re.findall(rb"^\[\d+/\d+\] ", stderr.read_bytes(), re.MULTILINE))
        run.send_signal(signal.SIGTERM)
        status = run.wait(timeout=60)
    finally:
        run.kill()
        run.wait()
    lines = stderr.read_text().splitlines()
    assert (status, lines[-1]) == (143, "opticam run: interrupted by SIGTERM")
    assert survivors(spawned) == []
    # The shard in progress was abandoned, not finished: only shards finished before the
    # signal have rows, each a complete Parquet file, and no temporary file is left.
    (run_folder,) = (tmp_path / "out").iterdir()
    shards = sorted((run_folder / "rows").glob("*"))
    assert all(not p.name.startswith(".") and p.suffix == ".parquet" for p in shards)
    assert len(shards) == finished
    for path in shards:
        pq.read_table(path)


# A supervised parent, without Prefect, and two children: one with an environment of its
# own, printed once the watchdog has recorded it (a few records later), one started just
# before it is printed, which the watchdog finds by the token in its environment.
KILLED_PARENT = """
import subprocess, time
from opticam.cli.lifeline import POLL_INTERVAL, supervised
with supervised("parent"):
    recorded = subprocess.Popen(["sleep", "60"], env={})
    time.sleep(3 * POLL_INTERVAL)
    tagged = subprocess.Popen(["sleep", "60"])
    print(recorded.pid, tagged.pid, flush=True)
    time.sleep(60)
"""


def test_watchdog_stops_the_descendants_of_a_killed_process_and_nothing_else(
    spawned: list[psutil.Process],
) -> None:
    outsider = subprocess.Popen(["sleep", "60"])  # not the parent's descendant
    spawned.append(psutil.Process(outsider.pid))
    parent = subprocess.Popen(
        [sys.executable, "-c", KILLED_PARENT], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        children = [psutil.Process(int(pid)) for pid in parent.stdout.readline().split()]
        spawned.extend(children)
        parent.kill()
        parent.wait()
        assert survivors(children, within=5.0) == []
        assert outsider.poll() is None
    finally:
        parent.kill()
        parent.wait()
        outsider.kill()
        outsider.wait()


# A supervised parent whose main thread, once interrupted, waits for a worker thread, as
# Prefect's task runner, unwinding, waits for the thread of the shard in progress.
STUCK_PARENT = """
import subprocess, threading, time
from opticam.cli.lifeline import supervised
with supervised("stuck"):
    child = subprocess.Popen(["sleep", "60"])
    worker = threading.Thread(target=time.sleep, args=(60,))
    worker.start()
    try:
        print(child.pid, flush=True)
        threading.Event().wait()
    finally:
        worker.join()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_process_does_not_wait_for_its_threads(
    signum: int, spawned: list[psutil.Process]
) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", STUCK_PARENT],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        spawned.append(child)
        parent.send_signal(signum)
        _, err = parent.communicate(timeout=30)
    finally:
        parent.kill()
        parent.wait()
    name = signal.Signals(signum).name
    assert (parent.returncode, err.splitlines()[-1]) == (
        128 + signum,
        f"stuck: interrupted by {name}",
    )
    assert alive([child]) == []  # stopped before the parent exited


def test_sigterm_raises_terminated_and_the_handlers_are_restored() -> None:
    handler = signal.getsignal(signal.SIGTERM)
    wakeup_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd)
    with pytest.raises(Terminated) as raised, supervised("test"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler
    assert raised.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is handler
    assert signal.set_wakeup_fd(wakeup_fd) == wakeup_fd
