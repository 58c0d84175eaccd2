"""Peak host memory (RSS) of one explain+score unit on the CPU, per batch size.

Usage: .venv/bin/python benchmarks/memory_per_image.py MODEL BATCH [ITERATIONS] [STEPS]
  (one process per measurement, so ru_maxrss is that batch size's peak)
Prints one JSON line: model, batch, baseline RSS after loading, peak RSS, in MiB.
"""

import json
import resource
import sys

import psutil
import torch

from opticam.config import RunConfig
from opticam.data.types import Batch
from opticam.pipeline import choose_targets, explainers, get_loaded_model, method_rows


def main() -> None:
    model, batch = sys.argv[1], int(sys.argv[2])
    iterations = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    config = RunConfig(
        data="x.tar",
        model={"source": f"torchvision:{model}"},
        methods=[{"name": "opticam", "options": {"iterations": iterations}}, "gradcam", "fakecam"],
        metrics={"steps": steps},
        device="cpu",
    )
    torch.manual_seed(0)
    loaded = get_loaded_model(config, "cpu")
    bound = explainers(config, loaded)
    side = loaded.input_size[0] if isinstance(loaded.input_size, tuple) else loaded.input_size
    base = psutil.Process().memory_info().rss
    images = torch.rand(batch, 3, side, side)
    data = Batch(
        shard="x.tar",
        keys=[f"k{i}" for i in range(batch)],
        images=images,
        labels=torch.arange(batch) % loaded.num_classes,
        boxes=[torch.tensor([[10.0, 10.0, 100.0, 100.0]]) for _ in range(batch)],
    )
    errors: list = []
    chosen = choose_targets(data, "x.tar", loaded.model, loaded.num_classes, "label", "cpu", errors)
    rows = []
    for name, explainer in bound.items():
        rows += method_rows(config, loaded, name, explainer, chosen, "x.tar", errors)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    mib = 1024 * 1024
    print(
        json.dumps(
            {
                "model": model,
                "batch": batch,
                "input": side,
                "rows": len(rows),
                "errors": len(errors),
                "baseline_mib": round(base / mib),
                "peak_mib": round(peak / mib),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
