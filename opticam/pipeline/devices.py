"""Which devices a ``RunConfig.device`` value stands for on this machine."""

from __future__ import annotations

import torch

from opticam.errors import ConfigError, short_repr

__all__ = ["local_devices", "resolve_device"]


def local_devices() -> list[str]:
    """Every local CUDA device (``cuda:0``, ``cuda:1``...), or ``["cpu"]`` without one."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def resolve_device(spec: str) -> list[str]:
    """The devices a ``RunConfig.device`` value stands for, one entry per worker slot.

    ``auto`` -> every local GPU, else the CPU; ``cuda`` -> every local GPU; ``cpu``,
    ``cuda:N`` and ``mps`` -> themselves (the CPU counts as one device).

    Raises:
        ConfigError: a CUDA device that this machine does not have.
    """
    if spec == "auto":
        return local_devices()
    if spec.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if spec == "cuda":
            if count == 0:
                raise ConfigError("device 'cuda' asked for, but no CUDA device is available")
            return [f"cuda:{i}" for i in range(count)]
        index = int(spec.split(":", 1)[1])
        if index >= count:
            raise ConfigError(
                f"device {short_repr(spec)} asked for, but this machine has {count} CUDA device(s)"
            )
    return [spec]
