"""How long a shard run takes to start on a process worker: the basis of ``start_timeout``.

Starts a Prefect server on loopback (its own home folder), ``opticam deploy`` and
``opticam worker --slots W``, runs one small job with ``executor: deployments`` (at most
W runs in flight, so that no run waits for a free worker), then reads every shard run's
states back from the API and prints, per run:

- submitted -> Pending: the run is created and a worker picks it up (its poll);
- Pending -> Running: the worker starts a flow-run process, which imports Prefect, torch
  and opticam before the run turns Running. This is the span ``start_timeout`` bounds;
- submitted -> Running: both.

    .venv/bin/python benchmarks/start_times.py [--shards 6] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cluster import running_cluster  # noqa: E402  (the loopback harness of the tests)

from opticam.demo.generate import make_shards  # noqa: E402


def _time(text: str) -> float:
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_shards(str(root / "data"), args.shards, 2, seed=7)
        job = ["run", "--data", str(root / "data" / "demo-*.tar"), "--methods", "gradcam",
               "--no-insertion-deletion", "--device", "cpu", "--output", str(root / "runs"),
               "--executor", "deployments", "--pool", "bench",
               "--max-in-flight", str(args.workers)]  # fmt: skip
        with running_cluster(root / "cluster", {"OMP_NUM_THREADS": "1"}) as cluster:
            assert cluster.opticam("deploy", "--pool", "bench").returncode == 0
            argv = [sys.executable, "-m", "opticam", "worker", "--pool", "bench"]
            cluster.start("workers", [*argv, "--slots", str(args.workers), "--name", "bench"])
            time.sleep(5)  # let the workers register first
            result = cluster.opticam(*job)
            assert result.returncode == 0, result.stderr[-3000:]
            spans = []
            for flow_run in cluster.flow_runs("explain-shard"):
                states = cluster.states(flow_run["id"])
                first = {}
                for state in states:
                    first.setdefault(state["type"], _time(state["timestamp"]))
                created = _time(flow_run["created"])
                pending, running = first["PENDING"], first["RUNNING"]
                spans.append((pending - created, running - pending, running - created))

    print(f"{args.shards} shard runs, {args.workers} CPU workers\n")
    columns = ["submitted -> Pending", "Pending -> Running", "submitted -> Running"]
    print(f"{'seconds':<10}" + "".join(f"{c:>24}" for c in columns))
    for label, pick in (("median", statistics.median), ("max", max)):
        cells = [pick(s[i] for s in spans) for i in range(3)]
        print(f"{label:<10}" + "".join(f"{c:>24.1f}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
