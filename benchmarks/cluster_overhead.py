"""What one shard costs as a deployment run, beyond its compute.

Starts a Prefect server on loopback (its own home folder), ``opticam deploy``, and
``opticam worker --slots W``, then runs one job with ``executor: deployments`` over
local demo shards, reads every shard run's times back from the API and prints, per
shard run:

- submitted -> running: the run is created, a worker picks it up and starts a flow-run
  process, which imports Prefect, torch and opticam before the run turns Running;
- running -> finished, and inside it the shard's own compute time (``seconds`` in its
  rows file: model load, read, explain, score, write);
- the overhead: submitted -> finished minus compute, what a shard pays for being a
  separate flow run.

The same shards then run with the local executor in one process, for comparison.

    .venv/bin/python benchmarks/cluster_overhead.py [--shards 8] [--per-shard 8] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cluster import running_cluster  # noqa: E402  (the loopback harness of the tests)

from opticam import store  # noqa: E402
from opticam.demo.generate import make_shards  # noqa: E402


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default="opticam")
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        urls = make_shards(str(root / "data"), args.shards, args.per_shard, seed=99)
        data = str(root / "data" / f"demo-{{000000..{args.shards - 1:06d}}}.tar")
        job = ["--data", data, "--model", "demo", "--methods", args.methods,
               "--iterations", str(args.iterations), "--no-insertion-deletion",
               "--no-localization", "--device", "cpu"]  # fmt: skip
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.workers))}
        with running_cluster(root / "cluster", env) as cluster:
            deployed = cluster.opticam("deploy", "--pool", "bench")
            assert deployed.returncode == 0, deployed.stderr
            argv = [sys.executable, "-m", "opticam", "worker", "--pool", "bench"]
            cluster.start("workers", [*argv, "--slots", str(args.workers), "--name", "bench"])
            time.sleep(5)  # let the workers register before the clock starts
            start = time.monotonic()
            out = str(root / "runs-pool")
            result = cluster.opticam(
                "run", *job, "--output", out, "--executor", "deployments", "--pool", "bench",
                "--max-in-flight", str(args.workers),
            )  # fmt: skip
            pool_wall = time.monotonic() - start
            assert result.returncode == 0, result.stderr[-3000:]
            runs = cluster.flow_runs("explain-shard")

        (run_json,) = Path(out).glob("*/run.json")
        run = str(run_json.parent)
        compute = {
            Path(u).name: store.read_status(run, u).seconds  # type: ignore[union-attr]
            for u in urls
        }
        rows = []
        for flow_run in runs:
            created = _time(flow_run["created"])
            started = _time(flow_run["start_time"])
            ended = _time(flow_run["end_time"])
            seconds = compute[flow_run["name"]]
            rows.append((started - created, ended - started, seconds, ended - created - seconds))

        start = time.monotonic()
        local = subprocess.run(
            [sys.executable, "-m", "opticam", "run", *job, "--output", str(root / "runs-local")],
            capture_output=True, text=True, env={**os.environ, **env},
        )  # fmt: skip
        local_wall = time.monotonic() - start
        assert local.returncode == 0, local.stderr[-3000:]

    columns = ["submitted -> running", "running -> finished", "compute", "overhead"]
    print(f"{args.shards} shards x {args.per_shard} images, {args.workers} CPU workers, "
          f"methods {args.methods} ({args.iterations} iterations)\n")  # fmt: skip
    print(f"{'per shard run (s)':<24}" + "".join(f"{c:>22}" for c in columns))
    for label, q in (("median", 0.5), ("p90", 0.9)):
        cells = [_q([r[i] for r in rows], q) for i in range(4)]
        print(f"{label:<24}" + "".join(f"{c:>22.1f}" for c in cells))
    overhead = statistics.median(r[3] for r in rows)
    per_image = statistics.median(r[2] for r in rows) / args.per_shard
    print(f"\nwall: deployments {pool_wall:.1f} s, local executor {local_wall:.1f} s "
          f"(ratio {pool_wall / local_wall:.2f})")  # fmt: skip
    print(f"compute per image here: {per_image:.3f} s; a shard keeps the overhead under 5% "
          f"of its compute from {overhead / (0.05 * per_image):.0f} images at this speed")  # fmt: skip
    print(json.dumps({"overhead_s": overhead, "compute_per_image_s": per_image}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
