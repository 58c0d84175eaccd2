"""Opti-CAM's compiled forward: one batch shape per job, and compiled only where it pays.

``torch.compile`` specialises its graphs on the shape of the batch, and every new shape
compiles again (tens of seconds for the demo classifier on a 2-core CPU), so a job whose
last batch is shorter, or whose images stop early (only the active images are forwarded),
would compile several times. :class:`CompiledForward` keeps one shape: the largest batch
the explainer has seen. A shorter batch holding at least :data:`PAD_FROM` of it is padded
with copies of its last image (detached: no gradient reaches a real image through them,
and their outputs are dropped); a smaller one runs eagerly, which is cheaper than
forwarding the padded batch (``benchmarks/opticam_compile.py`` measures both).

``compile="auto"`` (the default of :class:`opticam.config.OptiCAMOptions`) runs eagerly
until the explainer has spent :data:`COMPILE_AFTER_PASSES` image passes, then compiles:
a shard too short to earn back the compilation never pays it, a long one pays it once
(the pipeline builds one explainer per shard; torch keeps the compiled code per process,
so a later shard of the same process finds it compiled). The switch depends only on the
passes counted, never on time, so the same job computes the same batches compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["COMPILE_AFTER_PASSES", "PAD_FROM", "CompileMode", "CompiledForward"]

CompileMode = bool | Literal["auto"]

#: ``compile="auto"`` compiles once an explainer has spent this many image passes: 8
#: batches of 32 images at the paper's 101 passes, the break-even measured on the demo
#: classifier on a 2-core CPU with a cold inductor cache (compile cost C = 45-62 s against
#: a saving e - c = 5.8-8.5 s per batch: 7.3 and 7.8 batches; 13.5 in a noisier run).
#: With a warm cache (C = 3-4 s) compiling pays within the first batch: ``compile=true``.
#: ``benchmarks/opticam_compile.py`` measures it.
COMPILE_AFTER_PASSES = 8 * 32 * 101
#: A batch shorter than the compiled one is padded to it when it holds at least this
#: fraction of it, and runs eagerly otherwise: a compiled pass of the whole batch costs
#: 0.53-0.66 of an eager one on the same CPU (demo classifier, 1 and 2 threads).
PAD_FROM = 0.6
#: Devices ``compile="auto"`` compiles on (torch.compile's support elsewhere is partial).
AUTO_DEVICES = ("cpu", "cuda")


class CompiledForward:
    """The model's forward through ``torch.compile``, at one batch size.

    Args:
        model: the classifier (frozen by the caller for each call).
        mode: ``True`` (compile from the first call), ``False`` (never) or ``"auto"``
            (after :data:`COMPILE_AFTER_PASSES` image passes).
        memory_format: the masked images' memory format; padded batches are made in it,
            so that they match the compiled graph's strides.

    Attributes:
        size: the batch size the compiled graphs are for: the largest batch seen.
        passes: image passes counted so far (:meth:`count`).
        failed: compilation failed once; eager from then on.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: CompileMode,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.model = model
        self.mode = mode
        self.memory_format = memory_format
        self.size = 0
        self.passes = 0
        self.failed = False
        self._compiled: Callable[[Tensor], Tensor] | None = None

    def use(self, images: Tensor) -> bool:
        """Whether the call with these images runs compiled (and notes their batch size)."""
        self.size = max(self.size, int(images.shape[0]))
        if self.failed or self.mode is False:
            return False
        if self.mode == "auto":
            return images.device.type in AUTO_DEVICES and self.passes >= COMPILE_AFTER_PASSES
        return True

    def count(self, passes: int) -> None:
        """Add the image passes of one call (what ``compile="auto"`` waits for)."""
        self.passes += passes

    def forget_size(self) -> None:
        """Compile for the next call's batch size (after it ran out of memory padded)."""
        self.size = 0

    def compiled(self) -> Callable[[Tensor], Tensor]:
        """``torch.compile(model)``, made once (compilation happens on its first call).

        Static shapes (``dynamic=False``): the padding keeps one shape, and the dynamic
        graph is no help here (it specialises on the batch size for the convolutions all
        the same, and compiles slower; ``benchmarks/opticam_compile.py``).
        """
        if self._compiled is None:
            self._compiled = torch.compile(self.model, dynamic=False)
        return self._compiled

    def __call__(self, masked: Tensor) -> Tensor:
        """The model's output for ``masked`` (n images): compiled at :attr:`size`, or eager."""
        n = int(masked.shape[0])
        if n >= self.size:
            self.size = n
            return self.compiled()(masked)
        if n < PAD_FROM * self.size:
            return self.model(masked)
        pad = masked[-1:].detach().expand(self.size - n, *masked.shape[1:])
        padded = torch.cat([masked, pad]).contiguous(memory_format=self.memory_format)
        return self.compiled()(padded)[:n]
