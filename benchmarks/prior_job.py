"""The whole job: ``opticam run`` with the class prior against the paper's setting.

Writes held-out demo shards (a seed the demo classifier never saw in training), then runs
the same ``opticam run`` twice on them, one after the other, in fresh run folders: the
paper's setting (the default), and ``--preset prior`` (calibration first, then the rest
from the prior). Opti-CAM only, insertion/deletion off: the figure is about Opti-CAM's
passes, which the other metrics would dilute. Prints one table: wall time, images/s,
passes per image (from the rows: ``iterations + 1`` per image, calibration included), and
AD / AG / AI with the report's 95% bootstrap intervals, then the ratios::

    python benchmarks/prior_job.py                       # 400 images, 8 shards, seed 4242
    python benchmarks/prior_job.py --images 200 --extra=--compile

Wall times depend on the machine and its load; passes and scores do not.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from opticam import store
from opticam.demo.generate import make_shards

METRICS = (("AD", "average_drop"), ("AG", "average_gain"), ("AI", "average_increase"))


def _run(name: str, data: str, output: Path, flags: list[str]) -> dict[str, Any]:
    """One ``opticam run`` in a subprocess; its wall time, passes and summary row."""
    argv = [sys.executable, "-m", "opticam", "run", "--data", data, "--output", str(output)]
    argv += ["--methods", "opticam", "--no-insertion-deletion", "--device", "cpu", *flags]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name}: opticam run failed:\n{done.stderr[-3000:]}")
    (run,) = [p for p in output.iterdir() if p.is_dir()]
    rows = store.read_rows(str(run), ["method", "iterations", "prior_role"])
    rows = rows.filter(pc.equal(rows.column("method"), "opticam"))
    iterations = rows.column("iterations").to_numpy()
    roles = rows.column("prior_role").to_pylist()
    (summary,) = pq.read_table(run / "report" / "summary.parquet").to_pylist()
    return {
        "name": name,
        "seconds": seconds,
        "images": rows.num_rows,
        "calibration": sum(r == "calibration" for r in roles),
        "passes": float((iterations + 1).mean()),
        "summary": summary,
    }


def _cell(summary: dict[str, Any], column: str) -> str:
    return (
        f"{summary[column]:.2f} [{summary[f'{column}_ci_low']:.2f}, "
        f"{summary[f'{column}_ci_high']:.2f}]"
    )


def main() -> None:
    """Run both jobs and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--prior-per-class", type=int, default=5)
    parser.add_argument("--extra", default="", help="more flags for both runs, e.g. --compile")
    args = parser.parse_args()
    extra = args.extra.split()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "held-out"
        per_shard = -(-args.images // args.shards)
        make_shards(str(folder), args.shards, per_shard, args.seed)
        data = str(folder / "demo-*.tar")
        jobs = [
            ("paper (100 it, lr 0.1)", []),
            (
                f"--preset prior ({args.prior_per_class}/class)",
                ["--preset", "prior", "--prior-per-class", str(args.prior_per_class)],
            ),
        ]
        results = [
            _run(name, data, Path(tmp) / f"out{i}", [*flags, *extra])
            for i, (name, flags) in enumerate(jobs)
        ]

    print(
        f"# {date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"default; {results[0]['images']} held-out demo images (seed {args.seed}), "
        f"{args.shards} shards; extra flags: {' '.join(extra) or 'none'}"
    )
    print("| job | s | images/s | calibration images | passes/image | AD | AG | AI |")
    print("| --- | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['name']} | {r['seconds']:.0f} | {r['images'] / r['seconds']:.2f} | "
            f"{r['calibration']} | {r['passes']:.1f} | "
            + " | ".join(_cell(r["summary"], column) for _, column in METRICS)
            + " |"
        )
    paper, prior = results
    speed = (prior["images"] / prior["seconds"]) / (paper["images"] / paper["seconds"])
    print(
        f"\nprior / paper: {speed:.2f}x the images per second, "
        f"{prior['passes'] / paper['passes']:.2f}x the passes; "
        + ", ".join(
            f"{label} {prior['summary'][column] - paper['summary'][column]:+.2f} points"
            for label, column in METRICS
        )
    )


if __name__ == "__main__":
    main()
