"""Does an image's Opti-CAM map depend on the images explained in the same batch?

Explains the same images as one batch and in chunks of ``--batch`` (the paper's 100
iterations, no early stop: ``tolerance=0``) and prints, per model, how far each image's
map moved (largest absolute difference, Pearson r), how far its objective moved at the
start ``u = 0`` and over the iterations, and the same comparison with a control in which
every forward pass of the model runs image by image (so that nothing but Opti-CAM's own
arithmetic is batched).

    .venv/bin/python benchmarks/opticam_batch.py [--models resnet18,demo] [--images 18]
        [--batch 6] [--size 64] [--iterations 100] [--threads 1] [--no-control]

resnet18 has random weights (seed 0, 1000 classes), demo the bundled weights; images are
uniform noise (seed 1), explained for their predicted class.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor, nn


def _model(name: str) -> tuple[nn.Module, nn.Module, str, int]:
    """(classifier taking [0,1] images, target layer, its name, input size or 0)."""
    if name == "demo":
        from opticam.config import ModelSpec
        from opticam.models import load_model

        loaded = load_model(ModelSpec(source="demo"), "cpu")
        size = loaded.input_size[0]
        return loaded.model, loaded.target_layer, loaded.target_layer_name, size
    import torchvision

    from opticam.layers import resolve_target_layer

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(num_classes=1000).eval()
    layer = resolve_target_layer(net, None)
    return net, layer.module, layer.name, 0


def _explain(
    model: nn.Module,
    layer: nn.Module,
    images: Tensor,
    chunk: int,
    iterations: int,
    per_image: bool,
) -> tuple[Tensor, Tensor]:
    """Maps (N,1,H,W) and per-iteration objectives (iterations + 1, N) in chunks of ``chunk``."""
    import opticam.methods.opticam as om
    from opticam.methods import get_explainer

    trace: list[Tensor] = []
    original_objective = om.OptiCAM._objective
    original_capture = om.capture_features

    def objective(self: Any, out: Tensor, targets: Tensor, clean: Tensor) -> Tensor:
        value = original_objective(self, out, targets, clean)
        trace.append(value.detach().clone())
        return value

    def capture(net: nn.Module, target: nn.Module, x: Tensor, **kw: Any) -> tuple[Tensor, Tensor]:
        parts = [original_capture(net, target, x[i : i + 1], **kw) for i in range(x.shape[0])]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    explainer = get_explainer(
        "opticam", model, target_layer=layer, iterations=iterations, tolerance=0.0, compile=False
    )
    if per_image:
        # The control: the clean forward and every masked forward one image at a time.

        def loop(x: Tensor) -> Tensor:
            return torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])

        # The loop stands in for the compiled forward, from the first call on.
        forward = explainer._forward  # type: ignore[attr-defined]
        forward.mode, forward._compiled = True, loop
    om.OptiCAM._objective = objective  # type: ignore[method-assign]
    if per_image:
        om.capture_features = capture
    try:
        maps, traces = [], []
        for i in range(0, images.shape[0], chunk):
            trace.clear()
            maps.append(explainer(images[i : i + chunk]).maps)
            traces.append(torch.stack(trace))
    finally:
        om.OptiCAM._objective = original_objective  # type: ignore[method-assign]
        om.capture_features = original_capture
    return torch.cat(maps), torch.cat(traces, dim=1)


def _compare(name: str, a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> None:
    (maps_a, obj_a), (maps_b, obj_b) = a, b
    n = maps_a.shape[0]
    diff = (maps_a - maps_b).flatten(1).abs().amax(dim=1)
    r = torch.stack(
        [
            torch.corrcoef(torch.stack([maps_a[i].flatten(), maps_b[i].flatten()]))[0, 1]
            for i in range(n)
        ]
    )
    rel = (obj_a - obj_b).abs() / obj_b.abs().clamp(min=1e-12)
    print(
        f"  {name}: max |map diff| {diff.max():.2e} (median {diff.median():.1e}, "
        f"{int((diff > 1e-3).sum())}/{n} images over 1e-3), min r {r.min():.6f}; "
        f"objective rel. diff at u=0: max {rel[0].max():.1e}, over the iterations: "
        f"max {rel.max():.1e}; bitwise equal maps: {torch.equal(maps_a, maps_b)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet18,demo")
    parser.add_argument("--images", type=int, default=18)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-control", action="store_true", help="skip the image-by-image control")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        model, layer, layer_name, size = _model(name)
        size = size or args.size
        images = torch.rand(args.images, 3, size, size, generator=torch.Generator().manual_seed(1))
        print(
            f"{name} ({layer_name}, {size} px): {args.images} images as one batch vs chunks of "
            f"{args.batch}, {args.iterations} iterations"
        )
        for per_image in (False,) if args.no_control else (False, True):
            whole = _explain(model, layer, images, args.images, args.iterations, per_image)
            chunks = _explain(model, layer, images, args.batch, args.iterations, per_image)
            label = "forward image by image (control)" if per_image else "batched forward"
            _compare(label, whole, chunks)


if __name__ == "__main__":
    main()
