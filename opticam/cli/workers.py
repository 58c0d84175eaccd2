"""``opticam worker``: the Prefect process workers of one machine, one per GPU.

Each worker is ``prefect worker start --pool POOL --type process --limit 1`` with its own
environment:

- ``CUDA_VISIBLE_DEVICES`` set to one GPU (the flow-run processes a process worker starts
  inherit its environment, so each shard run sees exactly one card, as ``cuda:0``), or to
  nothing for CPU slots (``--slots N``), so that a CPU worker never touches a GPU;
- ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` (30 s unless already set): flow runs send
  heartbeats, which the automation of ``opticam deploy`` needs to find runs whose
  machine died;
- ``--limit 1``: a worker runs one shard at a time, since one shard fills its GPU.

The command runs until Ctrl-C or SIGTERM, then stops every worker and the flow-run
processes they started (those run in their own sessions, so a signal to the terminal's
process group does not reach them); a worker that exits on its own is reported and the
command ends when none is left. Nothing here imports Prefect or torch in this process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import psutil

from opticam.errors import ConfigError

__all__ = ["HEARTBEAT_SECONDS", "WorkerSpec", "plan_workers", "run_workers", "visible_gpus"]

#: Heartbeat period set for flow runs unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set.
HEARTBEAT_SECONDS = 30
# Seconds between checks that the workers still run.
_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    """One Prefect worker to start: its name, command line and environment changes."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this machine shows to CUDA, as ``CUDA_VISIBLE_DEVICES`` entries.

    ``CUDA_VISIBLE_DEVICES`` when set (an empty value means none); otherwise the cards
    ``nvidia-smi -L`` lists (no torch import: it would take seconds and a CUDA context).
    """
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def plan_workers(
    pool: str,
    *,
    slots: int | None = None,
    name: str | None = None,
    gpus: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[WorkerSpec]:
    """The workers ``opticam worker`` starts (see the module doc).

    Args:
        pool: the work pool (a ``process`` pool).
        slots: start this many CPU workers instead of one per GPU.
        name: prefix of the worker names (default: the host name).
        gpus: the GPUs to use (default: :func:`visible_gpus`).
        environ: the environment to read (default: this process's).

    Raises:
        ConfigError: no GPU and no ``slots``, or ``slots`` below 1.
    """
    environ = os.environ if environ is None else environ
    prefix = name or socket.gethostname()
    base = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
    base += ["--type", "process", "--limit", "1"]
    heartbeat = {}
    if not environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY"):
        heartbeat = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}
    if slots is not None:
        if slots < 1:
            raise ConfigError(f"--slots must be at least 1, got {slots}")
        return [
            WorkerSpec(
                f"{prefix}-cpu{i}",
                [*base, "--name", f"{prefix}-cpu{i}"],
                {"CUDA_VISIBLE_DEVICES": "", **heartbeat},
            )
            for i in range(slots)
        ]
    cards = list(visible_gpus(environ) if gpus is None else gpus)
    if not cards:
        raise ConfigError(
            "no GPU is visible (CUDA_VISIBLE_DEVICES / nvidia-smi); "
            "start CPU workers with --slots N"
        )
    return [
        WorkerSpec(
            f"{prefix}-gpu{card}",
            [*base, "--name", f"{prefix}-gpu{card}"],
            {"CUDA_VISIBLE_DEVICES": card, **heartbeat},
        )
        for card in cards
    ]


def _stop_all(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    from opticam.cli.lifeline import stop_processes

    tree: list[psutil.Process] = []
    for process in processes:
        try:
            parent = psutil.Process(process.pid)
            # The flow-run processes first in the list do not matter: all get SIGTERM
            # before any is waited for.
            tree += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    stop_processes(tree)


def run_workers(specs: Sequence[WorkerSpec]) -> int:
    """Start the workers and wait (see the module doc).

    Returns:
        0 after Ctrl-C/SIGTERM stopped them, 1 when they all exited on their own.
    """
    from opticam.cli.lifeline import Terminated, supervised

    processes: list[subprocess.Popen[bytes]] = []
    with supervised("opticam worker"):
        try:
            for spec in specs:
                env = {**os.environ, **spec.env}
                processes.append(subprocess.Popen(spec.argv, env=env))
                where = spec.env.get("CUDA_VISIBLE_DEVICES") or "CPU"
                print(f"started worker {spec.name} (pid {processes[-1].pid}, {where})", flush=True)
            running = dict(zip(processes, specs, strict=True))
            while running:
                time.sleep(_CHECK_SECONDS)
                for process, spec in list(running.items()):
                    code = process.poll()
                    if code is not None:
                        del running[process]
                        print(f"worker {spec.name} exited with status {code}", flush=True)
            return 1
        except (KeyboardInterrupt, Terminated):
            print(f"stopping {len(processes)} workers", flush=True)
            _stop_all(processes)
            return 0
