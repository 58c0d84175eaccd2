"""Load: many demo images through the local pipeline, and planning over many shard names.

Part 1 runs ``process_shard`` over ``--shards`` x ``--per-shard`` demo images in this
process (the demo classifier, cheap methods, no insertion/deletion: the pipeline's own
costs are what is measured) and prints, per shard, the wall time and the resident
memory; the growth after the first shard shows whether anything accumulates.

Part 2 plans a run over ``--names`` shard names (empty files in one folder, as a brace
pattern and as a glob) and prints how long planning took.

    python benchmarks/pipeline_load.py                       # 10 x 500 = 5,000 images
    python benchmarks/pipeline_load.py --shards 4 --per-shard 100 --names 2000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import psutil

from opticam import pipeline
from opticam.config import RunConfig
from opticam.demo import make_shards


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def load(shards: int, per_shard: int, methods: str, folder: Path) -> None:
    urls = make_shards(str(folder / "data"), shards, per_shard, seed=77)
    config = RunConfig(
        data=urls,
        output=str(folder / "runs"),
        methods=methods,
        metrics={"insertion_deletion": False},
        device="cpu",
        batch_size=64,
    )
    print(f"{'shard':>5}  {'images':>6}  {'seconds':>7}  {'img/s':>6}  {'RSS MB':>7}")
    first = None
    start = time.perf_counter()
    for i, url in enumerate(urls):
        t = time.perf_counter()
        status = pipeline.process_shard(config, url, "cpu")
        seconds = time.perf_counter() - t
        rss = _rss_mb()
        first = rss if first is None else first
        print(
            f"{i:>5}  {status.n_images:>6}  {seconds:>7.1f}  "
            f"{status.n_images / seconds:>6.0f}  {rss:>7.0f}"
        )
    total = time.perf_counter() - start
    print(
        f"{shards * per_shard} images in {total:.0f} s; resident memory after the first "
        f"shard {first:.0f} MB, after the last {_rss_mb():.0f} MB: growth "
        f"{_rss_mb() - (first or 0):+.0f} MB"
    )


def planning(names: int, folder: Path) -> None:
    data = folder / "many"
    data.mkdir()
    for i in range(names):
        (data / f"shard-{i:06d}.tar").touch()
    for label, spec in (
        ("brace pattern", f"{data}/shard-{{000000..{names - 1:06d}}}.tar"),
        ("glob", f"{data}/shard-*.tar"),
    ):
        config = RunConfig(data=spec, output=str(folder / "runs"))
        t = time.perf_counter()
        plan = pipeline.plan_shards(config)
        print(f"planning {len(plan)} shards from a {label}: {time.perf_counter() - t:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--methods", default="gradcam,fakecam")
    parser.add_argument("--names", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        load(args.shards, args.per_shard, args.methods, Path(tmp))
        planning(args.names, Path(tmp))


if __name__ == "__main__":
    main()
