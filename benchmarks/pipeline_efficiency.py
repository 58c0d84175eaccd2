"""Pipeline efficiency: a whole run's images per second against the bare explainer's.

On the same demo shards, in one run of this script:

- ``bare explainer``: Opti-CAM alone on images already decoded and preprocessed in
  memory, in batches of ``--batch``;
- ``pipeline (process_shard)``: every shard through :func:`opticam.pipeline.process_shard`
  (read the tar, decode, preprocess, explain, AD/AG/AI, encode maps, write Parquet), one
  after another, as the local executor runs them; Opti-CAM only, no insertion/deletion or
  localization;
- ``opticam run``: the same job from the command line, in a new process: Prefect's
  temporary server, planning, the shards, the report.

The efficiency is a row's images per second over the bare explainer's. A second table
puts the cost of insertion and deletion (the paper's 224 steps, both curves, batched as
the pipeline runs them) next to Opti-CAM's per image.

    .venv/bin/python benchmarks/pipeline_efficiency.py [--shards 4] [--per-shard 16] \\
        [--iterations 100] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=224, help="insertion/deletion steps")
    args = parser.parse_args()

    from opticam.config import RunConfig
    from opticam.data import Preprocess, ShardReader
    from opticam.demo.generate import make_shards
    from opticam.methods import get_explainer
    from opticam.pipeline import clear_model_cache, get_loaded_model, process_shard

    with tempfile.TemporaryDirectory() as tmp:
        urls = make_shards(f"{tmp}/data", args.shards, args.per_shard, seed=4242)
        options = {"iterations": args.iterations}
        job = {
            "data": urls,
            "model": {"source": "demo"},
            "methods": [{"name": "opticam", "options": options}],
            "metrics": {"insertion_deletion": False, "localization": False},
            "batch_size": args.batch,
            "device": args.device,
        }
        config = RunConfig(output=f"{tmp}/runs-library", **job)  # type: ignore[arg-type]
        loaded = get_loaded_model(config, args.device)
        n = args.shards * args.per_shard

        # The bare explainer: decoding and preprocessing are outside the clock.
        pre = Preprocess(loaded.input_size, loaded.resize_size)
        images, labels = [], []
        for url in urls:
            for sample in ShardReader(url):
                images.append(pre(sample.image)[0])
                labels.append(sample.label)
        x = torch.stack(images).to(args.device)
        y = torch.tensor(labels, device=args.device)
        explainer = get_explainer("opticam", loaded, **options)
        explainer(x[:2], y[:2])  # warm-up
        start = time.perf_counter()
        maps = [
            explainer(x[i : i + args.batch], y[i : i + args.batch]).maps
            for i in range(0, n, args.batch)
        ]
        bare = time.perf_counter() - start

        # Insertion and deletion at 224 steps on the same maps, as the pipeline calls them.
        from opticam.metrics import insertion_deletion

        with torch.no_grad():
            predicted = torch.cat(
                [loaded.model(x[i : i + args.batch]).argmax(1) for i in range(0, n, args.batch)]
            )
        # The default chunk ("auto": 16 perturbed images per pass on the CPU) and 128.
        curves: dict[str, float] = {}
        for chunk in ("auto", 128):
            start = time.perf_counter()
            for i, m in zip(range(0, n, args.batch), maps, strict=True):
                insertion_deletion(
                    loaded.model,
                    x[i : i + args.batch],
                    m,
                    predicted[i : i + args.batch],
                    steps=args.steps,
                    batch_size=chunk,  # type: ignore[arg-type]
                )
            curves[str(chunk)] = time.perf_counter() - start

        # The library pipeline, shard after shard (the model is cached, as in a run).
        start = time.perf_counter()
        for url in urls:
            process_shard(config, url, args.device)
        pipeline = time.perf_counter() - start
        clear_model_cache()

        # The command line, whole.
        data = f"{tmp}/data/demo-{{000000..{args.shards - 1:06d}}}.tar"
        argv = [sys.executable, "-m", "opticam", "run", "--data", data, "--model", "demo",
                "--methods", "opticam", "--iterations", str(args.iterations),
                "--no-insertion-deletion", "--no-localization", "--batch-size", str(args.batch),
                "--device", args.device, "--output", f"{tmp}/runs-cli"]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        cli = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        assert len(list(Path(f"{tmp}/runs-cli").glob("*/rows/*.parquet"))) == args.shards

    print(f"{n} demo images ({args.shards} shards), Opti-CAM {args.iterations} iterations, "
          f"batch {args.batch}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print(f"{'row':<28}{'seconds':>9}{'img/s':>8}{'efficiency':>12}")
    rows = [("bare explainer", bare), ("pipeline (process_shard)", pipeline), ("opticam run", cli)]
    for label, seconds in rows:
        print(f"{label:<28}{seconds:>9.1f}{n / seconds:>8.2f}{bare / seconds:>12.2f}")
    print(f"\n{'per image':<28}{'seconds':>9}{'x Opti-CAM':>12}")
    print(f"{'Opti-CAM':<28}{bare / n:>9.3f}{1.0:>12.2f}")
    for chunk, seconds in curves.items():
        label = f"ins.+del. ({args.steps}), chunk {chunk}"
        print(f"{label:<28}{seconds / n:>9.3f}{seconds / bare:>12.2f}")
    summary = {label: {"seconds": s, "efficiency": bare / s} for label, s in rows}
    ratios = {f"insertion_deletion_ratio_chunk_{c}": s / bare for c, s in curves.items()}
    print(json.dumps({**summary, **ratios}))


if __name__ == "__main__":
    main()
