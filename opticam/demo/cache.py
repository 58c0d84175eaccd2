"""The bundled demo's data, generated once into a cache folder and reused by later runs.

``opticam run`` without ``--data`` explains :data:`DEMO_SHARDS` x :data:`DEMO_PER_SHARD`
synthetic images (seed :data:`DEMO_SEED`, held out from the classifier's training seeds
1000 and 1001) with :data:`DEMO_METHODS` and :data:`DEMO_STEPS` insertion/deletion steps.
The data lives in ``$OPTICAM_CACHE/demo-v1`` (default ``~/.cache/opticam``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = [
    "DEMO_METHODS",
    "DEMO_PER_SHARD",
    "DEMO_SEED",
    "DEMO_SHARDS",
    "DEMO_STEPS",
    "DEMO_VERSION",
    "demo_cache_dir",
    "ensure_demo_data",
]

DEMO_METHODS = "opticam,gradcam,gradcampp,scorecam,fakecam"
DEMO_SHARDS = 4
DEMO_PER_SHARD = 50
DEMO_SEED = 0
DEMO_STEPS = 32
DEMO_VERSION = "demo-v1"
_COMPLETE_MARKER = ".complete"


def demo_cache_dir() -> Path:
    """``$OPTICAM_CACHE/demo-v1`` (default cache ``~/.cache/opticam``)."""
    root = os.environ.get("OPTICAM_CACHE") or os.path.join(Path.home(), ".cache", "opticam")
    return Path(root).expanduser() / DEMO_VERSION


def ensure_demo_data(
    folder: Path | None = None,
    shards: int = DEMO_SHARDS,
    per_shard: int = DEMO_PER_SHARD,
    seed: int = DEMO_SEED,
) -> str:
    """Generate the demo shards once (atomically: a temp folder renamed when complete).

    Returns:
        A glob pattern matching the shards.
    """
    from opticam.demo.generate import make_shards

    folder = folder or demo_cache_dir()
    if not (folder / _COMPLETE_MARKER).exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        make_shards(str(tmp), shards, per_shard, seed)
        (tmp / _COMPLETE_MARKER).write_text(
            json.dumps({"shards": shards, "per_shard": per_shard, "seed": seed})
        )
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process finished first; its copy is identical (deterministic data).
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder / "demo-*.tar")
