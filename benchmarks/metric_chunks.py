"""Insertion/deletion cost by chunk size: perturbed images per forward pass.

``opticam.metrics.insertion_deletion`` cuts the ``B * (steps + 1)`` perturbed images of a
curve into chunks of ``batch_size``; ``"auto"`` (the default) picks
``DEFAULT_CPU_BATCH_SIZE`` on the CPU and ``DEFAULT_BATCH_SIZE`` elsewhere. This script
runs the same curves at several chunk sizes, one process per row so that each row's peak
memory is its own, and prints milliseconds per perturbed image, peak RSS (CPU) or max
allocated memory (CUDA) and the speed ratio to chunk 128.

    .venv/bin/python benchmarks/metric_chunks.py [--device cpu] [--models demo,resnet50]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CHUNKS = [8, 16, 32, 64, 128]
# model -> (input size, images, steps): enough states for steady timing, a few seconds.
SETTINGS = {
    "demo": (128, 8, 112),
    "efficientnet_b0": (224, 2, 56),
    "resnet50": (224, 2, 28),
}


def _one(model: str, chunk: int, device: str) -> dict[str, float]:
    import torch

    from opticam.allocator import tune_allocator
    from opticam.metrics import insertion_deletion

    tune_allocator()  # the allocator settings a run has (applied by its first explanation)

    torch.manual_seed(0)
    size, n, steps = SETTINGS[model]
    if model == "demo":
        import opticam

        net = opticam.load_model(opticam.ModelSpec(source="demo"), device).model
    else:
        import torchvision

        from opticam.models import IMAGENET_MEAN, IMAGENET_STD
        from opticam.wrappers import Normalized

        base = torchvision.models.get_model(model, weights=None)
        net = Normalized(base, IMAGENET_MEAN, IMAGENET_STD).to(device).eval()
    x = torch.rand(n, 3, size, size, device=device)
    maps = torch.rand(n, 1, size, size, device=device)
    y = torch.zeros(n, dtype=torch.long, device=device)
    insertion_deletion(net, x[:1], maps[:1], y[:1], steps=4, batch_size=chunk)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    insertion_deletion(net, x, maps, y, steps=steps, batch_size=chunk)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - start
    return {"ms_per_state": seconds / (n * 2 * (steps + 1)) * 1000, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=",".join(SETTINGS))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], int(args.one[1]), args.device)))
        return
    from opticam.metrics import DEFAULT_BATCH_SIZE, DEFAULT_CPU_BATCH_SIZE

    auto = DEFAULT_CPU_BATCH_SIZE if args.device == "cpu" else DEFAULT_BATCH_SIZE
    print(f"{'model':<16}{'chunk':>6}{'ms/image':>10}{'peak MB':>9}{'x chunk 128':>13}")
    for model in args.models.split(","):
        rows = {}
        for chunk in CHUNKS:
            out = subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--one", model, str(chunk)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rows[chunk] = json.loads(out.strip().splitlines()[-1])
        base = rows[128]["ms_per_state"]
        for chunk, row in rows.items():
            mark = " (auto)" if chunk == auto else ""
            print(
                f"{model:<16}{chunk:>6}{row['ms_per_state']:>10.2f}{row['peak_mb']:>9.0f}"
                f"{base / row['ms_per_state']:>13.2f}{mark}"
            )


if __name__ == "__main__":
    main()
