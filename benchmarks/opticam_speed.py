"""Opti-CAM speed: one batched optimisation vs an image-by-image loop, fp32 vs bf16 autocast.

Prints a table (seconds per image, images per second) and the ratios measured in the
same run, plus how far the fast paths' maps are from the plain reference.

    python benchmarks/opticam_speed.py                      # CPU-sized defaults
    python benchmarks/opticam_speed.py --device cuda --arch resnet50 --size 224 \
        --images 64 --batch 64 --iterations 100 --amp

Random weights and random images: speed does not depend on what the weights are, and
nothing here needs the network.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from opticam.methods import get_explainer
from opticam.models import IMAGENET_MEAN, IMAGENET_STD, Normalized, default_target_layer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--amp", action="store_true", help="also time bf16 autocast (CUDA)")
    parser.add_argument("--baselines", default="gradcam,scorecam")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    net = torchvision.models.get_model(args.arch, weights=None, num_classes=1000)
    model = Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval().to(device)
    layer_name = default_target_layer(model)
    images = torch.rand(args.images, 3, args.size, args.size, device=device)
    targets = torch.randint(0, 1000, (args.images,), device=device)

    rows: list[tuple[str, float]] = []
    explain = get_explainer(
        "opticam", model, target_layer=layer_name, iterations=args.iterations, tolerance=0.0
    )

    def batched() -> torch.Tensor:
        maps = [
            explain(images[i : i + args.batch], targets[i : i + args.batch]).maps
            for i in range(0, args.images, args.batch)
        ]
        return torch.cat(maps)

    def looped() -> torch.Tensor:
        return torch.cat(
            [explain(images[i : i + 1], targets[i : i + 1]).maps for i in range(args.images)]
        )

    explain(images[:1], targets[:1])  # warm-up (cuDNN autotune, allocator)
    t_batch, maps_batch = _timed(batched, device)
    t_loop, maps_loop = _timed(looped, device)
    rows.append((f"opticam fp32, batch {args.batch}", t_batch))
    rows.append(("opticam fp32, one image at a time", t_loop))
    gap = (maps_loop - maps_batch).abs()
    diffs = {"loop vs batch, mean": gap.mean().item(), "loop vs batch, max": gap.max().item()}

    if args.amp and device.type == "cuda":
        explain_bf16 = get_explainer(
            "opticam",
            model,
            target_layer=layer_name,
            iterations=args.iterations,
            tolerance=0.0,
            amp_dtype="bf16",
        )

        def batched_bf16() -> torch.Tensor:
            maps = [
                explain_bf16(images[i : i + args.batch], targets[i : i + args.batch]).maps
                for i in range(0, args.images, args.batch)
            ]
            return torch.cat(maps)

        explain_bf16(images[:1], targets[:1])
        t_bf16, maps_bf16 = _timed(batched_bf16, device)
        rows.append((f"opticam bf16 autocast, batch {args.batch}", t_bf16))
        diffs["bf16 vs fp32 (batch)"] = (maps_bf16 - maps_batch).abs().mean().item()

    for name in [m for m in args.baselines.split(",") if m]:
        baseline = get_explainer(name, model, target_layer=layer_name)
        baseline(images[:1], targets[:1])

        def run_baseline(baseline=baseline) -> torch.Tensor:
            return torch.cat(
                [
                    baseline(images[i : i + args.batch], targets[i : i + args.batch]).maps
                    for i in range(0, args.images, args.batch)
                ]
            )

        t, _ = _timed(run_baseline, device)
        rows.append((f"{name}, batch {args.batch}", t))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {name}; torch {torch.__version__}; model {args.arch} at {args.size}px; "
        f"{args.images} images; Opti-CAM {args.iterations} iterations"
    )
    print(f"{'path':<40} {'s / image':>10} {'images / s':>11}")
    for label, seconds in rows:
        per = seconds / args.images
        print(f"{label:<40} {per:>10.4f} {1 / per:>11.1f}")
    print(f"ratio loop / batch: {t_loop / t_batch:.1f}x")
    if args.amp and device.type == "cuda":
        print(f"ratio fp32 / bf16 (batch): {t_batch / t_bf16:.2f}x")
    for label, value in diffs.items():
        print(f"map difference {label}: {value:.2e}")


if __name__ == "__main__":
    main()
