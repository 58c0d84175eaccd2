"""How fast a mistake is told: ``opticam`` help, version and refused input, against the
cost of importing torch and Prefect, side by side in one run.

Each row starts a fresh interpreter ``--repeat`` times and prints the median and minimum
wall time and the peak RSS of the child (``ru_maxrss``). The last column is the row's
median as a fraction of ``import torch`` alone, which is what every command paid before
the command line stopped importing torch to parse its flags.

    .venv/bin/python benchmarks/cli_startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

_WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "subprocess.run(sys.argv[1:], capture_output=True, check=False)\n"
    "wall = time.perf_counter() - start\n"
    "print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def measure(argv: list[str], repeat: int) -> tuple[float, float, float]:
    """(median s, min s, peak RSS MB) of ``argv`` run ``repeat`` times, each from a small
    wrapper process so that the peak memory is this command's own."""
    times = []
    peak = 0.0
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, check=True
        ).stdout.split()
        times.append(float(out[0]))
        peak = max(peak, int(out[1]) / 1024)
    return statistics.median(times), min(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        typo = os.path.join(folder, "typo.yaml")
        with open(typo, "w") as f:
            f.write("data: x.tar\nmethdos: [opticam]\n")
        py = [sys.executable]
        rows = [
            ("python -c pass", [*py, "-c", "pass"]),
            ("import torch", [*py, "-c", "import torch"]),
            ("import prefect", [*py, "-c", "import prefect"]),
            ("opticam --help", [*py, "-m", "opticam", "--help"]),
            ("opticam --version", [*py, "-m", "opticam", "--version"]),
            ("opticam run --help", [*py, "-m", "opticam", "run", "--help"]),
            ("opticam run --config typo.yaml", [*py, "-m", "opticam", "run", "--config", typo]),
            ("opticam run --methods nosuch", [*py, "-m", "opticam", "run", "--methods", "x"]),
        ]
        results = [(name, *measure(argv, args.repeat)) for name, argv in rows]
    torch_median = results[1][1]
    print(f"{'command':34} {'median s':>9} {'min s':>7} {'peak MB':>8} {'/ torch':>8}")
    for name, median, low, peak in results:
        print(f"{name:34} {median:9.3f} {low:7.3f} {peak:8.0f} {median / torch_median:8.2f}")


if __name__ == "__main__":
    main()
