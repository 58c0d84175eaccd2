"""opticam.pipeline.devices: ``RunConfig.device`` on machines with and without GPUs."""

from __future__ import annotations

import re

import pytest
import torch

from opticam import pipeline
from opticam.errors import ConfigError


@pytest.mark.parametrize(
    ("count", "spec", "expected"),
    [
        (0, "auto", ["cpu"]),
        (2, "auto", ["cuda:0", "cuda:1"]),
        (2, "cuda", ["cuda:0", "cuda:1"]),
        (2, "cuda:1", ["cuda:1"]),
        (0, "cpu", ["cpu"]),
        (2, "cpu", ["cpu"]),
        (2, "mps", ["mps"]),
    ],
)
def test_resolve_device_on_machines_with_and_without_gpus(
    monkeypatch: pytest.MonkeyPatch, count: int, spec: str, expected: list[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert pipeline.resolve_device(spec) == expected


@pytest.mark.parametrize(
    ("count", "spec", "message"),
    [
        (0, "cuda", "device 'cuda' asked for, but no CUDA device is available"),
        (0, "cuda:0", "device 'cuda:0' asked for, but this machine has 0 CUDA device"),
        (2, "cuda:2", "device 'cuda:2' asked for, but this machine has 2 CUDA device"),
    ],
)
def test_resolve_device_names_a_missing_gpu(
    monkeypatch: pytest.MonkeyPatch, count: int, spec: str, message: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline.resolve_device(spec)
