"""Opti-CAM's ``compile`` on long jobs: the compile cost, the saving per batch, the break-even.

Every row explains the same "shard" (``--batches`` full batches of ``--batch`` held-out
demo images, then a shorter last batch of ``--last``) at ``--iterations`` with the bundled
demo classifier (``--arch``: a torchvision architecture with random weights on random
224 px images), in a process of its own (torch keeps compiled code per process), and
times each batch:

- ``eager``: ``compile=False``;
- ``eager, channels_last (rounding control)``: the same computation with the sums in
  another order, so that its map differences show how far Opti-CAM's 100 Adam steps
  carry float rounding (compiled kernels reorder the sums too);
- ``compile (cold cache)``: ``compile=True`` with an empty inductor cache
  (``TORCHINDUCTOR_CACHE_DIR``): what a fresh machine or container pays;
- ``compile (warm cache)``: the same with the cache the cold row left, as a second
  process on the same machine finds it;
- ``compile, no padding (before)``: ``torch.compile(model)`` as ``compile=True`` ran it
  before one shape per job: the short last batch compiles again (cold cache);
- ``dynamic shapes``: ``torch.compile(model, dynamic=True)`` at every batch's own size,
  no padding (cold cache).

From the rows: ``e`` and ``c``, the median seconds of a full batch eager and compiled
(the batches after the first), ``C`` the compile cost (the first compiled batch less
``c``), the short batch's seconds, the graphs dynamo compiled (``unique_graphs``: one
with gradients for the steps, one without for the pass that scores the last ``u``, per
shape), and the largest map difference to ``eager``. Then the break-even ``C / (e - c)``
in batches, and a table of a shard of N batches: eager, compiled from the first batch,
and ``compile=auto`` (eager until :data:`opticam.methods.compiled.COMPILE_AFTER_PASSES`
image passes, then compiled), each from ``e``, ``c`` and ``C``.

    .venv/bin/python benchmarks/opticam_compile.py                 # batch 32, 100 iterations
    .venv/bin/python benchmarks/opticam_compile.py --threads 1 --rows eager,cold,warm
    .venv/bin/python benchmarks/opticam_compile.py --device cuda --arch resnet50 --rows eager,cold,warm

Wall times move with the machine's load; the rows run one after another, so compare
ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

#: Row name -> (its key on the command line, compile mode, inductor cache: fresh/reuse).
ROWS: dict[str, tuple[str, str, str]] = {
    "eager": ("eager", "off", "fresh"),
    "eager, channels_last (rounding control)": ("chlast", "chlast", "fresh"),
    "compile (cold cache)": ("cold", "pad", "fresh"),
    "compile (warm cache)": ("warm", "pad", "reuse"),
    "compile, no padding (before)": ("before", "before", "fresh"),
    "dynamic shapes": ("dynamic", "dynamic", "fresh"),
}


class _EveryShape:
    """The compiled forward as before one shape per job, or with dynamic shapes: every
    batch (and every count of still-active images) at its own size."""

    def __init__(self, model: torch.nn.Module, dynamic: bool | None) -> None:
        self.compiled = torch.compile(model, dynamic=dynamic)
        self.failed = False

    def use(self, images: torch.Tensor) -> bool:
        return True

    def count(self, passes: int) -> None:
        pass

    def forget_size(self) -> None:
        pass

    def __call__(self, masked: torch.Tensor) -> torch.Tensor:
        return self.compiled(masked)


def _inputs(arch: str, n: int, device: str) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """(model, target layer, n images, their targets) on ``device``.

    ``demo``: the bundled classifier on held-out demo images and their labels; else a
    torchvision architecture with random weights on random 224 px images (the same work).
    """
    from opticam.data import Preprocess
    from opticam.demo.generate import generate_sample
    from opticam.models import ModelSpec, load_model

    torch.manual_seed(0)
    if arch == "demo":
        loaded = load_model(ModelSpec(source="demo"), device)
        pre = Preprocess(loaded.input_size, loaded.resize_size)
        samples = [generate_sample(i, 4242) for i in range(n)]
        x = torch.stack([pre(s[0])[0] for s in samples]).to(device)
        y = torch.tensor([s[1] for s in samples], device=device)
        return loaded.model, loaded.target_layer, x, y
    import torchvision

    from opticam.layers import default_target_layer, find_layer
    from opticam.models import IMAGENET_MEAN, IMAGENET_STD
    from opticam.wrappers import Normalized

    net = torchvision.models.get_model(arch, weights=None, num_classes=1000)
    model = Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval().to(device)
    x = torch.rand(n, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (n,), device=device)
    return model, find_layer(model, default_target_layer(model))[0], x, y


def _run_row(args: argparse.Namespace) -> None:
    """One row in this process: the seconds of every batch, graphs and maps, to --out."""
    from torch._dynamo.utils import counters

    from opticam.methods import OptiCAM

    torch.set_num_threads(args.threads)
    sizes = [args.batch] * args.batches + ([args.last] if args.last else [])
    model, layer, x, y = _inputs(args.arch, sum(sizes), args.device)
    mode = args.mode
    explainer = OptiCAM(
        model,
        layer,
        iterations=args.iterations,
        tolerance=0.0,  # no early stop: every row does the same passes
        compile=mode not in ("off", "chlast"),
        channels_last=mode == "chlast",
    )
    if mode in ("before", "dynamic"):
        explainer._forward = _EveryShape(model, True if mode == "dynamic" else None)  # type: ignore[assignment]
    seconds, maps, start = [], [], 0
    for n in sizes:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
        maps.append(explainer(x[start : start + n], y[start : start + n]).maps.cpu())
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
        start += n
    torch.save(
        {
            "seconds": seconds,
            "graphs": int(counters["stats"]["unique_graphs"]),
            "maps": torch.cat(maps),
            "threads": torch.get_num_threads(),
        },
        args.out,
    )


def _spawn(args: argparse.Namespace, mode: str, cache: str, out: str) -> dict[str, Any]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    command = [sys.executable, __file__, "--row", mode, "--out", out]
    command += ["--batch", str(args.batch), "--batches", str(args.batches)]
    command += ["--last", str(args.last), "--iterations", str(args.iterations)]
    command += ["--threads", str(args.threads), "--device", args.device, "--arch", args.arch]
    subprocess.run(command, check=True, env=env)
    return dict(torch.load(out))


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson r of two (N,1,H,W) map stacks."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-30)


def _shard_table(args: argparse.Namespace, e: float, c: float, costs: dict[str, float]) -> None:
    """Seconds of a shard of N batches: eager, compiled from the first batch, auto."""
    from opticam.methods.compiled import COMPILE_AFTER_PASSES

    passes = args.batch * (args.iterations + 1)
    after = math.ceil(COMPILE_AFTER_PASSES / passes)  # eager batches before auto compiles
    print()
    print(
        f"compile=auto compiles after {after} eager batches of {args.batch} images at "
        f"{args.iterations} iterations (COMPILE_AFTER_PASSES = {COMPILE_AFTER_PASSES})."
    )
    for cache, cost in costs.items():
        even = cost / (e - c) if e > c else math.inf
        print(
            f"Break-even, {cache} cache: C / (e - c) = {cost:.1f} / ({e:.2f} - {c:.2f}) = {even:.1f} batches"
        )
    print()
    head = "| batches per shard | eager s |"
    for cache in costs:
        head += f" compile, {cache} s | auto, {cache} s | eager / compile, {cache} | eager / auto, {cache} |"
    print(head)
    print("|" + " ---: |" * (head.count("|") - 1))
    for n in (1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 256):
        eager = n * e
        line = f"| {n} | {eager:.0f} |"
        for cost in costs.values():
            compiled = cost + n * c
            auto = eager if n <= after else after * e + cost + (n - after) * c
            line += (
                f" {compiled:.0f} | {auto:.0f} | {eager / compiled:.2f}x | {eager / auto:.2f}x |"
            )
        print(line)


def _report(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> None:
    eager = rows.get("eager")
    sizes = (
        f"{args.batches} x {args.batch} + {args.last}"
        if args.last
        else f"{args.batches} x {args.batch}"
    )
    threads = next(iter(rows.values()))["threads"]
    model = "demo classifier (held-out demo images)" if args.arch == "demo" else args.arch
    print()
    print(
        f"Opti-CAM compile, {model}, {sizes} images x {args.iterations} "
        f"iterations, {args.device} ({platform.machine()}, {os.cpu_count()} cores, "
        f"{threads} threads), torch {torch.__version__}, {date.today()}"
    )
    print()
    print(
        "| row | first batch s | full batch s (median) | last batch s | graphs | "
        "max map diff | median / min r | r < 0.99 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    full = args.batches
    for name, row in rows.items():
        s = row["seconds"]
        steady = statistics.median(s[1:full]) if full > 1 else s[0]
        last = f"{s[-1]:.2f}" if args.last else "-"
        diff, r, low = "-", "-", "-"
        if eager is not None and row is not eager:
            diff = f"{float((row['maps'] - eager['maps']).abs().max()):.1e}"
            rs = _pearson(row["maps"], eager["maps"])
            r = f"{float(rs.median()):.4f} / {float(rs.min()):.4f}"
            low = f"{int((rs < 0.99).sum())} of {rs.numel()}"
        print(
            f"| {name} | {s[0]:.2f} | {steady:.2f} | {last} | {row['graphs']} | {diff} | "
            f"{r} | {low} |"
        )
    if eager is None or full < 2:
        return
    e = statistics.median(eager["seconds"][1:full])
    padded = {"cold": "compile (cold cache)", "warm": "compile (warm cache)"}
    padded = {cache: name for cache, name in padded.items() if name in rows}
    if not padded:
        return
    # One c for both rows (the same computation): the median of their batches after the first.
    c = statistics.median([t for name in padded.values() for t in rows[name]["seconds"][1:full]])
    costs = {cache: rows[name]["seconds"][0] - c for cache, name in padded.items()}
    print()
    print(f"e = {e:.2f} s (eager), c = {c:.2f} s (compiled): x{e / c:.2f} per full batch")
    for cache, cost in costs.items():
        print(f"C = {cost:.1f} s to compile ({cache} cache)")
    if args.last:
        last = [rows[name]["seconds"][-1] for name in padded.values()]
        print(
            f"last batch of {args.last}: eager {eager['seconds'][-1]:.2f} s, padded and "
            f"compiled {statistics.median(last):.2f} s; a padded batch costs c, so padding "
            f"pays from {c / e:.2f} of a full batch"
        )
    _shard_table(args, e, c, costs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="images per full batch")
    parser.add_argument("--batches", type=int, default=3, help="full batches in the shard")
    parser.add_argument("--last", type=int, default=24, help="images of the last batch (0: none)")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--arch", default="demo", help="demo, or a torchvision name (random weights)"
    )
    parser.add_argument(
        "--rows",
        default=",".join(key for key, _, _ in ROWS.values()),
        help="comma-separated: " + ", ".join(key for key, _, _ in ROWS.values()),
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row's process
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row is not None:
        args.mode = args.row
        _run_row(args)
        return
    wanted = set(args.rows.split(","))
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cold = str(Path(tmp) / "cache-shared")
        for name, (key, mode, cache) in ROWS.items():
            if key not in wanted:
                continue
            folder = cold if key in ("cold", "warm") else str(Path(tmp) / f"cache-{key}")
            if cache == "reuse" and "cold" not in wanted:
                print(f"  {name}: needs the cold row first, skipped", flush=True)
                continue
            began = time.perf_counter()
            rows[name] = _spawn(args, mode, folder, str(Path(tmp) / f"{key}.pt"))
            seconds = ", ".join(f"{s:.1f}" for s in rows[name]["seconds"])
            print(
                f"  ran {name} in {time.perf_counter() - began:.0f} s: batches {seconds} s, "
                f"{rows[name]['graphs']} graphs",
                flush=True,
            )
    _report(args, rows)
    print()
    print(json.dumps({name: row["seconds"] for name, row in rows.items()}))


if __name__ == "__main__":
    main()
