"""Opti-CAM speed side by side: the authors' loop against the library and its fast paths.

Every row explains the same images with the same model and the same iteration count, in
a process of its own (so that peak memory is the row's own), and the table reports
images per second, peak memory (resident set on the CPU, max allocated on CUDA), AD,
AG and AI (so that a speed-up that costs quality shows), the smallest per-image Pearson
r of its maps against ``reference``, and the speed ratio to ``reference``.

Rows:

- ``reference``: the loop as the paper's authors wrote it: fp32, the model's parameters
  left trainable (each backward pass also computes weight gradients), the features and
  clean logits computed with autograd, ``backward(retain_graph=True)``, batches of 5, a
  fixed iteration count; it returns the best ``u`` seen, as the library does (the last
  ``u`` is scored by one more forward pass), so that both compute the same maps;
- ``opticam``: the library with the same start and iterations (no early stop), batch
  ``--batch``;
- one row per fast-path option that exists on this device (``channels_last``,
  ``compile``, ``bf16`` on CUDA, per-image early stopping with the paper's tolerance, the
  ``fast`` schedule preset), then ``best`` combining those that helped.

Both sides run under the same allocator settings (:mod:`opticam.allocator`, applied in
every row's process); ``opticam (glibc defaults)`` is the library without them.

    .venv/bin/python benchmarks/opticam_speed.py                     # demo model, CPU
    .venv/bin/python benchmarks/opticam_speed.py --arch resnet50 --images 10 --iterations 5
    .venv/bin/python benchmarks/opticam_speed.py --device cuda --arch resnet50 \\
        --images 128 --batch 64 --iterations 100

``--arch demo`` uses the bundled classifier on held-out demo images (labels give
meaningful AD/AG); torchvision architectures use random weights and random images at
224 px, which time the same work (their AD/AG only compare rows with each other).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# Options of each row (None: the reference loop). Rows whose options the installed
# library does not know are skipped with a note.
ROWS: dict[str, dict[str, Any] | None] = {
    "reference": None,
    "opticam": {},
    "opticam (glibc defaults)": {},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "bf16": {"amp_dtype": "bf16"},
    "early stop (paper tolerance)": {"tolerance": 1e-10},
    "fast preset": {"preset": "fast"},
}


def _inputs(arch: str, images: int, device: torch.device) -> tuple[Any, Any, Any, Any]:
    """(model, images, targets, target layer module), the same in every row's process."""
    from opticam.layers import default_target_layer, find_layer
    from opticam.models import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, load_model
    from opticam.wrappers import Normalized

    torch.manual_seed(0)
    if arch == "demo":
        from opticam.data import Preprocess
        from opticam.demo.generate import generate_sample

        loaded = load_model(ModelSpec(source="demo"), str(device))
        pre = Preprocess(loaded.input_size, loaded.resize_size)
        samples = [generate_sample(i, 4242) for i in range(images)]
        x = torch.stack([pre(s[0])[0] for s in samples]).to(device)
        y = torch.tensor([s[1] for s in samples], device=device)
        return loaded.model, x, y, loaded.target_layer
    import torchvision

    net = torchvision.models.get_model(arch, weights=None, num_classes=1000)
    model = Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval().to(device)
    x = torch.rand(images, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (images,), device=device)
    return model, x, y, find_layer(model, default_target_layer(model))[0]


def reference_maps(
    model: torch.nn.Module, layer: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
    iterations: int, lr: float = 0.1, batch: int = 5,
) -> torch.Tensor:  # fmt: skip
    """Opti-CAM as the authors' loop runs it (see the module doc); maps (B,1,H,W)."""
    import torch.nn.functional as F

    for p in model.parameters():
        p.requires_grad_(True)
    out = []
    captured: list[torch.Tensor] = []
    # Keeps the clean pass's output only (not the masked passes').
    handle = layer.register_forward_hook(lambda m, a, o: None if captured else captured.append(o))
    for i in range(0, len(images), batch):
        x, y = images[i : i + batch], targets[i : i + batch]
        captured.clear()
        model(x)  # clean logits and features, with autograd
        feats = F.relu(captured[0])
        u = torch.zeros(feats.shape[:2], device=x.device, requires_grad=True)
        optimizer = torch.optim.Adam([u], lr=lr)

        def mask_of(weights: torch.Tensor, feats: torch.Tensor = feats) -> torch.Tensor:
            saliency = (torch.softmax(weights, 1)[:, :, None, None] * feats).sum(1, keepdim=True)
            size = images.shape[-2:]
            up = F.interpolate(saliency, size, mode="bilinear", align_corners=False)
            lo = up.amin((2, 3), keepdim=True)
            hi = up.amax((2, 3), keepdim=True)
            return (up - lo) / (hi - lo).clamp_min(1e-12)

        # Like the library, keep the best u seen (the last one is scored by one more pass).
        best = torch.full((len(x),), -torch.inf, device=x.device)
        best_u = u.detach().clone()
        for step in range(iterations + 1):
            scores = model(x * mask_of(u)).gather(1, y[:, None]).squeeze(1)
            better = scores.detach() > best
            best = torch.where(better, scores.detach(), best)
            best_u[better] = u.detach()[better]
            if step == iterations:
                break
            optimizer.zero_grad()
            (-scores.sum()).backward(retain_graph=True)
            optimizer.step()
        with torch.no_grad():
            out.append(mask_of(best_u).detach())
        model.zero_grad(set_to_none=True)
    handle.remove()
    for p in model.parameters():
        p.requires_grad_(False)
    return torch.cat(out)


def _run_row(args: argparse.Namespace) -> None:
    """One row in this process: writes maps, seconds, memory and AD/AG/AI to --out."""
    from opticam.allocator import tune_allocator
    from opticam.methods import get_explainer
    from opticam.metrics.faithfulness import faithfulness_terms

    # Every row, the reference loop included, under the allocator settings a run has
    # (an explainer applies them on its first call; the reference loop has none).
    tune_allocator()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model, images, targets, layer = _inputs(args.arch, args.images, device)
    options = None if args.row == "reference" else json.loads(args.options)
    # Warm-up on one whole batch: compile and cuDNN specialise on the batch shape.
    warm = slice(0, min(args.batch, len(images)))

    if options is None:

        def run() -> torch.Tensor:
            return reference_maps(model, layer, images, targets, args.iterations)

        reference_maps(model, layer, images[:5], targets[:5], 1)
    else:
        # Eager unless the row compiles (compile=auto could switch on in a long row).
        options = {"tolerance": 0.0, "compile": False, **options}
        if "preset" not in options:  # a preset brings its own iteration count
            options["iterations"] = args.iterations
        explainer = get_explainer("opticam", model, target_layer=layer, **options)

        def run() -> torch.Tensor:
            chunks = range(0, len(images), args.batch)
            return torch.cat(
                [
                    explainer(images[i : i + args.batch], targets[i : i + args.batch]).maps
                    for i in chunks
                ]
            )

        explainer(images[warm], targets[warm])  # warm-up: compile, cuDNN autotune
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    maps = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    memory = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    terms = faithfulness_terms(model, images, maps.float(), targets, batch_size=args.batch)
    torch.save(
        {
            "maps": maps.float().cpu(),
            "seconds": seconds,
            "memory_mb": memory,
            "AD": 100 * terms["drop"].mean().item(),
            "AG": 100 * terms["gain"].mean().item(),
            "AI": 100 * terms["increase"].float().mean().item(),
        },
        args.out,
    )


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson r of two map batches."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def _pearson_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(_pearson(a, b).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="demo", help="demo, or a torchvision name")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        _run_row(args)
        return

    from opticam.methods import OptiCAM

    known = set(OptiCAM.options)
    results: dict[str, dict[str, Any]] = {}
    notes: list[str] = []

    def measure(row: str, options: dict[str, Any] | None, tmp: str) -> None:
        env = dict(os.environ)
        if row == "opticam (glibc defaults)":
            env["OPTICAM_MALLOC_TUNING"] = "0"
        out = str(Path(tmp) / "row.pt")
        argv = [sys.executable, __file__, "--row", row, "--out", out, "--device", args.device,
                "--arch", args.arch, "--images", str(args.images), "--batch", str(args.batch),
                "--iterations", str(args.iterations), "--threads", str(args.threads),
                "--options", json.dumps(options or {})]  # fmt: skip
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            notes.append(f"{row}: failed: {done.stderr.strip().splitlines()[-1:]}")
        else:
            results[row] = torch.load(out)

    with tempfile.TemporaryDirectory() as tmp:
        for row in [r for r in args.rows.split(",") if r]:
            options = ROWS[row]
            missing = sorted(set(options or {}) - known)
            if missing:
                notes.append(f"{row}: skipped, the library has no option {', '.join(missing)}")
                continue
            if row == "bf16" and args.device == "cpu":
                notes.append("bf16: skipped, autocast is for CUDA (the library warns on CPU)")
                continue
            measure(row, options, tmp)
        # The fast paths that paid (3 % faster than plain, maps r >= 0.99), together.
        plain = results.get("opticam")
        ref = results.get("reference")
        best: dict[str, Any] = {}
        for row in ("channels_last", "compile", "bf16"):
            res = results.get(row)
            if plain is None or ref is None or res is None:
                continue
            if (
                res["seconds"] < 0.97 * plain["seconds"]
                and _pearson_min(res["maps"], ref["maps"]) >= 0.99
            ):
                best.update(ROWS[row] or {})
        if best:
            measure("best (" + ", ".join(sorted(best)) + ")", best, tmp)

    device = torch.device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({args.threads} threads)"
    )
    print(f"{name}; torch {torch.__version__}; {args.arch}; {args.images} images; "
          f"{args.iterations} iterations; batch {args.batch} (reference: 5)\n")  # fmt: skip
    ref = results.get("reference")
    header = (
        f"{'row':<30}{'img/s':>8}{'peak MB':>9}{'AD':>7}{'AG':>7}{'AI':>7}"
        f"{'med r':>8}{'min r':>8}{'r<.99':>6}{'x ref':>7}"
    )
    print(header)
    for row, res in results.items():
        rate = args.images / res["seconds"]
        r = (
            _pearson(res["maps"], ref["maps"])
            if ref is not None
            else torch.full((1,), float("nan"))
        )
        ratio = ref["seconds"] / res["seconds"] if ref is not None else float("nan")
        print(f"{row:<30}{rate:>8.2f}{res['memory_mb']:>9.0f}{res['AD']:>7.1f}{res['AG']:>7.1f}"
              f"{res['AI']:>7.1f}{float(r.median()):>8.4f}{float(r.min()):>8.4f}"
              f"{int((r < 0.99).sum()):>6}{ratio:>7.2f}")  # fmt: skip
    for note in notes:
        print(f"note: {note}")
    print(
        json.dumps(
            {row: {"img_per_s": args.images / res["seconds"]} for row, res in results.items()}
        )
    )


if __name__ == "__main__":
    main()
