"""A real Prefect cluster on loopback for end-to-end tests: a server in its own home
folder with fast settings, ``opticam`` commands run as processes, and plain HTTP reads
of the server's API (the test process never imports Prefect's client, whose settings
are process-wide)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """Call ``check`` until it returns something true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Cluster:
    """A Prefect server plus the processes a test starts against it."""

    def __init__(self, home: Path, extra_env: dict[str, str]) -> None:
        self.home = home
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            # Fast settings: heartbeats every 30 s (the shortest allowed), proactive
            # triggers evaluated every second, no late-runs service, workers polling
            # every second.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S",
            "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        }
        self.env.pop("PREFECT_PROFILES_PATH", None)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # -- processes ---------------------------------------------------------------------

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a process in its own session, its output in ``logs/<name>.log``."""
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            argv,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.home,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        return process

    def opticam(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run one ``opticam`` command to its end (from outside the repository folder)."""
        return subprocess.run(
            [sys.executable, "-m", "opticam", *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_server(self, name: str = "server") -> None:
        argv = [sys.executable, "-m", "prefect", "server", "start"]
        server = self.start(name, [*argv, "--host", "127.0.0.1", "--port", str(self.port)])
        self.server = server

        def up() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"the Prefect server exited:\n{self.log('server')[-3000:]}")
            return self._healthy()

        wait_for("the Prefect server", up, timeout=120)

    def restart_server(self, forget: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL of what is left) and start it again on
        the same port: on the same database, or on an empty one with ``forget``."""
        tree = [psutil.Process(self.server.pid)]
        _terminate([*tree, *tree[0].children(recursive=True)], grace=20)
        self.processes.remove(self.server)
        if forget:
            for path in self.home.glob("prefect.db*"):
                path.unlink()
        self.start_server(name=f"server-{len(list(self.logs.glob('server*.log'))) + 1}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api}/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM every process tree started, SIGKILL what is left 10 s later."""
        tree: list[psutil.Process] = []
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(process.pid)
                tree += [parent, *parent.children(recursive=True)]
        _terminate(tree, grace=10)

    # -- the API -----------------------------------------------------------------------

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.api}{path}",
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.api}{path}", timeout=30) as response:
            return json.loads(response.read() or b"null")

    def flow_runs(self, flow_name: str | None = None) -> list[dict[str, Any]]:
        """Every flow run (of one flow), oldest first."""
        body: dict[str, Any] = {"sort": "EXPECTED_START_TIME_ASC", "limit": 200}
        if flow_name is not None:
            body["flows"] = {"name": {"any_": [flow_name]}}
        runs: list[dict[str, Any]] = []
        while True:
            page = self.post("/flow_runs/filter", {**body, "offset": len(runs)})
            runs += page
            if len(page) < 200:
                return runs

    def states(self, flow_run_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/flow_run_states/?flow_run_id={flow_run_id}"))

    def artifacts(self, flow_run_id: str) -> list[dict[str, Any]]:
        return list(
            self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
        )


@contextlib.contextmanager
def running_cluster(home: Path, extra_env: dict[str, str]) -> Iterator[Cluster]:
    cluster = Cluster(home, extra_env)
    try:
        cluster.start_server()
        yield cluster
    finally:
        cluster.stop()


def _terminate(tree: list[psutil.Process], grace: float) -> None:
    """SIGTERM every process of ``tree``, SIGKILL what is left ``grace`` seconds later."""
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
