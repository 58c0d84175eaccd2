"""The allocator settings: big CPU buffers freed by one pass are reused by the next one
instead of being mapped and zeroed by the kernel again (counted in minor page faults,
never timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from opticam.allocator import tune_allocator

# Allocate and free a 48 MB tensor 20 times (above glibc's largest default mmap threshold,
# like an activation of a 224 px batch) and count the minor page faults of the loop.
_PROBE = """
import json, resource, sys
import torch
import opticam.methods
from opticam import allocator
from opticam.allocator import tune_allocator
on_import = "applied" in allocator._state  # importing the methods tunes nothing
opticam.methods.FakeCAM(torch.nn.Identity())  # the first explainer tunes, as in a run
x = torch.ones(12 << 20)  # warm-up: the heap grows once
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.ones(12 << 20)
    del x
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"faults": after - before, "applied": tune_allocator(), "on_import": on_import}))
"""

# 20 buffers of 48 MB touched afresh would be 20 x 12,288 pages of 4 KB.
_PAGES_PER_BUFFER = (48 << 20) // 4096


def _probe(**env: str) -> dict[str, int | bool]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OPTICAM_"))}
    clean.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
        check=True, timeout=120,
    )  # fmt: skip
    result: dict[str, int | bool] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_buffers_are_reused_instead_of_faulted_in_again() -> None:
    tuned = _probe()
    default = _probe(OPTICAM_MALLOC_TUNING="0")
    assert tuned["applied"] is True and default["applied"] is False
    assert tuned["on_import"] is False
    # glibc's defaults: every buffer is a new mapping, every page faulted in again.
    assert int(default["faults"]) > 10 * _PAGES_PER_BUFFER
    # Tuned: the freed buffer stays in the heap and is reused (measured: one buffer's
    # pages in all, against twenty).
    assert int(tuned["faults"]) <= 2 * _PAGES_PER_BUFFER


def test_a_users_own_choice_is_left_alone() -> None:
    # Run in a fresh interpreter state: the module keeps its decision per process.
    from opticam import allocator

    saved = dict(allocator._state)
    try:
        for env in ({"OPTICAM_MALLOC_TUNING": "0"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}):  # fmt: skip
            allocator._state.clear()
            assert tune_allocator(env) is False
    finally:
        allocator._state.clear()
        allocator._state.update(saved)
