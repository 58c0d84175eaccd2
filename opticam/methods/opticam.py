"""Opti-CAM (Zhang et al., CVIU 2024): saliency maps optimized per image.

With images ``x`` (B,3,H,W) in [0,1], target-layer features ``A`` (B,K,h,w) and one
weight vector ``u`` (K,) per image::

    S(x; u) = sum_k softmax(u)_k A_k                  (B,1,h,w)
    M(x; u) = n(up(S(x; u)))                          (B,1,H,W) in [0,1]
    F(x; u) = g_c(f(x * M(x; u)))                     (B,)

and ``u* = argmax_u F``, found with Adam from ``u = 0`` (the mean feature map). The
network is frozen; only ``u`` is optimized. The loss is the sum of the B objectives, and
Adam is element-wise, so the batch is exactly B independent optimizations.

Cost per call: one forward pass under ``torch.no_grad`` gives both the features ``A`` (a
forward hook on the target layer, removed right after) and the clean logits; then each
iteration is one forward and one backward pass of the masked batch, with no graph kept
for the weights, and a last forward pass scores the final ``u``.

Passes (diagnostic ``passes``, per image): every forward of the image's masked copy
counts one (with its backward, when there is one), so the paper's 100 iterations cost
101 passes. ``start="gradcam"`` keeps the graph of the clean forward and adds one
backward pass for Grad-CAM's gradients, counted as one more pass. The clean forward is
not counted: every start needs it.

Beyond the paper (all off by default): a learning-rate decay (``lr_decay``), a stop per
image once its best objective has stopped improving (``patience``, ``plateau_rtol``,
``plateau_atol``), a start from Grad-CAM's channel weights (``start``), named schedules
(``preset``, see :data:`opticam.names.OPTICAM_PRESETS`), and two ways to run the same
computation faster (``channels_last``; ``compile``, on by default once an explainer has
run enough batches to earn the compilation back: :mod:`opticam.methods.compiled`).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opticam.config import OptiCAMOptions
from opticam.errors import short_repr
from opticam.methods.common import (
    Explainer,
    Explanation,
    check_inputs,
    check_target_range,
    frozen,
    upsample_normalize,
)
from opticam.methods.compiled import CompiledForward
from opticam.methods.prior import ClassPrior
from opticam.methods.schedule import Schedule
from opticam.names import OBJECTIVES, OPTICAM_SCHEDULE, SCORES, resolve_opticam_preset

__all__ = ["OBJECTIVES", "SCORES", "OptiCAM", "capture_features"]

_AMP_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
# Grad-CAM start: softmax(u0) is the positive part of Grad-CAM's channel weights plus this
# fraction of the uniform weight 1/K, so channels with no positive gradient start small
# but not so small that Adam cannot bring them back.
_GRADCAM_FLOOR = 0.1


def capture_features(
    model: nn.Module,
    layer: nn.Module,
    images: Tensor,
    *,
    reshape_transform: Callable[[Tensor], Tensor] | None = None,
    autocast: AbstractContextManager[object] | None = None,
) -> tuple[Tensor, Tensor]:
    """One no-grad forward pass: ``(features (B,K,h,w) float32, logits (B,C) float32)``.

    The layer's output is captured by a forward hook that exists only during this pass.
    When the layer runs several times in one forward (a shared module), the last call's
    output is kept. ``reshape_transform`` maps token outputs (B,N,C) to (B,C,h,w).

    Raises:
        ValueError: the layer did not run, or its output is not a (B,K,h,w) tensor.
    """
    captured: list[Tensor] = []
    owner = threading.get_ident()

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if threading.get_ident() != owner:
            return  # another thread's forward through a shared model
        # A copy: later in-place ops of the model (e.g. ResNet's `out += identity`)
        # must not change the captured features.
        captured[:] = [_layer_tensor(layer, output).detach().clone()]

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad(), autocast or nullcontext():
            logits = model(images)
    finally:
        handle.remove()
    feats = _feature_map(_captured(layer, captured), reshape_transform)
    return feats.float(), logits.float()


def _layer_tensor(layer: nn.Module, output: object) -> Tensor:
    """The target layer's output, which must be a tensor."""
    if not isinstance(output, Tensor):
        raise ValueError(
            f"target layer {type(layer).__name__} returns {type(output).__name__}, "
            "not a tensor; choose another layer"
        )
    return output


def _captured(layer: nn.Module, captured: list[Tensor]) -> Tensor:
    """What the forward hook recorded; ValueError when the layer never ran."""
    if not captured:
        raise ValueError(
            f"target layer {type(layer).__name__} did not run in the model's forward pass"
        )
    return captured[0]


def _feature_map(feats: Tensor, reshape_transform: Callable[[Tensor], Tensor] | None) -> Tensor:
    """The layer's output as (B,K,h,w) features (tokens reshaped by ``reshape_transform``)."""
    if reshape_transform is not None:
        feats = reshape_transform(feats)
    if feats.dim() != 4:
        raise ValueError(
            f"target layer features must be (B,K,h,w), got {tuple(feats.shape)}; "
            "token outputs need a reshape_transform"
        )
    return feats


class OptiCAM(Explainer):  # size: Opti-CAM's options (58-line docstring), loop and its steps
    """Opti-CAM saliency maps; see the module docstring for the formulas.

    Args:
        model: classifier taking (B,3,H,W) images in [0,1].
        target_layer: module whose output gives the features ``A``.
        reshape_transform: maps the layer's output to (B,K,h,w) (ViT tokens), or None.
        relu_features: ReLU the features (CNNs in the paper; not for transformers).
        settings: the options below as one :class:`opticam.config.OptiCAMOptions`; or
            give them as keywords (validated by that model either way).
        prior: the class prior of ``start="prior"`` (required then, refused otherwise).
        **given: the options below, as keywords.

    Keyword Args:
        iterations (int): at most this many Adam steps (paper and default: 100).
        lr (float): Adam learning rate (paper and default: 0.1).
        objective (str): ``mask`` maximizes ``g_c(f(x*M))``; ``diff`` minimizes
            ``|g_c(f(x)) - g_c(f(x*M))|``, i.e. maximizes its negative.
        score (str): ``g_c`` is the ``logit`` (default) or the softmax ``probability`` of c.
        normalization (str): ``n`` in ``M = n(up(S))``: ``range``, ``max`` or ``sigmoid``.
        tolerance (float): an image stops (its ``u`` frozen) once its objective changes by less
            than this between consecutive iterations; 1e-10 is the paper's rule.
        amp_dtype (str | None): ``bf16`` or ``fp16`` runs the model under CUDA autocast; ignored, with a
            warning, on other devices.
        preset (str): a named schedule (:data:`opticam.names.OPTICAM_PRESETS`): ``paper``
            (default, the options as given) or ``fast``. A schedule option (``iterations``,
            ``lr``, ``lr_decay``, ``start``, ``patience``, ``plateau_rtol``,
            ``plateau_atol``) left out (None) takes the preset's value, else the paper's
            (:data:`opticam.names.OPTICAM_SCHEDULE`); one given explicitly is used as
            given, and must equal the preset's value where the preset sets one (also
            when it is the paper's value), otherwise ValueError.
        lr_decay (str): learning rate at step ``t`` of ``T = iterations``: ``none`` (constant,
            paper, default), ``cosine`` (``lr * (1 + cos(pi t / T)) / 2``) or ``linear``
            (``lr * (1 - t / T)``).
        start (str): ``uniform`` (``u = 0``, paper, default), ``gradcam`` or ``prior``.
            ``gradcam``: ``softmax(u)`` starts at the positive part of Grad-CAM's channel
            weights (gradient of the class logit averaged over the map), normalized, plus
            a small uniform floor; an image whose weights are all <= 0 starts uniform.
            Costs one backward pass. ``prior``: the weights earlier images of the target
            class ended at (``prior=``, a :class:`opticam.methods.prior.ClassPrior`,
            :meth:`~opticam.methods.prior.ClassPrior.start`); costs nothing.
        patience (int): when > 0, an image stops once its best objective has not improved by
            more than ``max(plateau_atol, plateau_rtol * |best|)`` for this many
            consecutive iterations. 0 (default) turns the rule off.
        plateau_rtol (float): relative part of the plateau rule's threshold (default 0).
        plateau_atol (float): absolute part of the plateau rule's threshold (default 0).
        channels_last (bool): convert the model's weights to channels_last memory format (in
            place, once, at construction; values are unchanged) and feed it
            channels_last masked images. Same maps up to rounding.
        compile (bool | str): run the iterations' forward through
            ``torch.compile(model)``: ``auto`` (default) once this explainer has spent
            :data:`opticam.methods.compiled.COMPILE_AFTER_PASSES` image passes (on the
            CPU or CUDA; the break-even measured on the demo classifier), ``True`` from
            the first call, ``False`` never. One batch shape per explainer: a shorter
            batch is padded to the largest one seen, or run eagerly when it is much
            shorter (:mod:`opticam.methods.compiled`). When compilation is unavailable
            or fails, a warning is given and the call is redone eagerly. Same maps up to
            rounding; the first compiled call pays the compilation.

    The explanation is the map of the best ``u`` seen (never worse than the start).
    Diagnostics, each (B,): ``iterations`` (Adam steps applied to the image),
    ``passes`` (forward(+backward) passes spent on the image, see the module docstring),
    ``initial_objective`` (at the start ``u``), ``final_objective`` (at the returned
    ``u``; for ``diff`` both are ``-|g_c(f(x)) - g_c(f(x*M))|``), ``constant_map``.

    Calls from several threads on one model are safe when its parameters are already
    frozen (a LoadedModel's are): the feature hook only records its own thread's pass.
    """

    #: The options, declared once: the fields of :class:`opticam.config.OptiCAMOptions`
    #: (``relu_features`` is a layer option, resolved with the layer).
    options: ClassVar[tuple[str, ...]] = tuple(
        name for name in OptiCAMOptions.model_fields if name != "relu_features"
    )
    #: Keyword arguments that are objects rather than options (never in a job file).
    objects: ClassVar[tuple[str, ...]] = ("prior",)

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module,
        *,
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        relu_features: bool = True,
        settings: OptiCAMOptions | None = None,
        prior: ClassPrior | None = None,
        **given: Any,
    ) -> None:
        super().__init__(model)
        if settings is not None and given:
            raise TypeError("pass Opti-CAM's options as settings= or as keywords, not both")
        if settings is None:
            # Validated in one place, the pydantic model (also for the CLI and job files).
            settings = OptiCAMOptions(**_amp_names(given))
        # The options the caller gave, over the preset's, over the paper's.
        schedule = resolve_opticam_preset(
            settings.preset,
            {k: getattr(settings, k) for k in OPTICAM_SCHEDULE if k in settings.model_fields_set},
        )
        iterations = cast(int, schedule["iterations"])
        lr = cast(float, schedule["lr"])
        lr_decay = cast(str, schedule["lr_decay"])
        start = cast(str, schedule["start"])
        patience = cast(int, schedule["patience"])
        plateau_rtol = cast(float, schedule["plateau_rtol"])
        plateau_atol = cast(float, schedule["plateau_atol"])
        objective, score = settings.objective, settings.score
        normalization, tolerance = settings.normalization, settings.tolerance
        amp_dtype, preset = settings.amp_dtype, settings.preset
        channels_last, compile = settings.channels_last, settings.compile
        self.target_layer = target_layer
        self.reshape_transform = reshape_transform
        self.relu_features = relu_features
        self.iterations = iterations
        self.lr = float(lr)
        self.objective = objective
        self.score = score
        self.normalization = normalization
        self.tolerance = float(tolerance)
        self.amp_dtype = _parse_amp_dtype(amp_dtype)
        self.preset = preset
        self.lr_decay = lr_decay
        self.start = start
        if (start == "prior") != (prior is not None):
            raise ValueError(
                "start='prior' needs a class prior (prior=ClassPrior; 'opticam run' "
                "calibrates one first)"
                if prior is None
                else f"a class prior was given but start is {start!r}, not 'prior'"
            )
        self.prior = prior
        self.patience = patience
        self.plateau_rtol = float(plateau_rtol)
        self.plateau_atol = float(plateau_atol)
        self.channels_last = bool(channels_last)
        self.compile = compile
        self.schedule = Schedule(
            iterations=self.iterations,
            lr=self.lr,
            tolerance=self.tolerance,
            lr_decay=self.lr_decay,
            patience=self.patience,
            plateau_rtol=self.plateau_rtol,
            plateau_atol=self.plateau_atol,
        )
        if self.channels_last:
            # In place (nn.Module.to returns the module): values are unchanged, only the
            # weights' memory layout, so other users of the model see the same outputs.
            model.to(memory_format=torch.channels_last)
        self._forward = CompiledForward(
            model,
            compile,
            torch.channels_last if self.channels_last else torch.contiguous_format,
        )

    def explain(self, images: Tensor, targets: Tensor | None) -> Explanation:
        """Optimize one ``u`` per image; see the class docstring."""
        return self._explain(images, targets, None)

    def explain_from(self, images: Tensor, targets: Tensor | None, u0: Tensor) -> Explanation:
        """Like calling the explainer, but every image starts at the given ``u0`` (B, K).

        The ``start`` option is not used; ``u0`` is the logits of the starting weights
        (``softmax(u0)``), one row per image.
        """
        checked = check_inputs(images, targets)
        return self._explain(images.detach(), checked, u0.to(images.device, torch.float32))

    def _explain(
        self, images: Tensor, targets: Tensor | None, given_u0: Tensor | None
    ) -> Explanation:
        autocast = self._autocast(images.device)
        # The feature hook removes itself (try/finally in capture_features); no global
        # hook sweep here, so concurrent calls on one model from other threads are safe.
        with frozen(self.model):
            u0: Tensor | None = given_u0
            if u0 is None and self.start == "gradcam":
                feats, logits, targets, u0 = self._gradcam_start(images, targets, autocast)
            else:
                feats, logits = capture_features(
                    self.model,
                    self.target_layer,
                    images,
                    reshape_transform=self.reshape_transform,
                    autocast=autocast,
                )
            if self.relu_features:
                feats = F.relu(feats)
            if targets is None:
                targets = logits.argmax(dim=1)
            check_target_range(targets, logits.shape[1])
            if u0 is None and self.prior is not None:
                self.prior.check_fits(channels=feats.shape[1], layer=None)
                u0 = self.prior.start(targets)
            if u0 is not None and u0.shape != feats.shape[:2]:
                raise ValueError(
                    f"u0 must be (images, channels) = {tuple(feats.shape[:2])}, got {tuple(u0.shape)}"
                )
            clean = self._class_score(logits, targets)
            best_u, diagnostics = self._optimize_once(images, feats, targets, clean, autocast, u0)
            if self.start == "gradcam" and given_u0 is None:
                diagnostics["passes"] += 1  # Grad-CAM's backward pass
            self._forward.count(int(diagnostics["passes"].sum()))
            with torch.no_grad():
                saliency = self._saliency(best_u, feats)
                maps, constant = upsample_normalize(saliency, images.shape[-2:], self.normalization)
        diagnostics["constant_map"] = constant
        return Explanation(
            maps=maps,
            saliency=saliency,
            diagnostics=diagnostics,
            channel_weights=torch.softmax(best_u.detach().float(), dim=1),
        )

    def _optimize_once(
        self,
        images: Tensor,
        feats: Tensor,
        targets: Tensor,
        clean: Tensor,
        autocast: AbstractContextManager[object],
        u0: Tensor | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`_optimize` through the compiled forward when it is on, else eagerly.

        A compilation failure is warned about and the call redone eagerly (and eager from
        then on); running out of memory is the caller's to handle (it splits the batch).
        """
        compiled = self._forward.use(images)
        forward = self._forward if compiled else self.model
        try:
            return self._optimize(images, feats, targets, clean, autocast, u0, forward)
        except torch.OutOfMemoryError:
            if compiled:  # the caller splits the batch: compile for the halves
                self._forward.forget_size()
            raise
        except Exception as err:  # compilation errors come in many types
            if not compiled:
                raise
            self._forward.failed = True
            warnings.warn(
                f"torch.compile failed ({type(err).__name__}: {err}); "
                "Opti-CAM runs the model eagerly from now on",
                stacklevel=4,
            )
            return self._optimize(images, feats, targets, clean, autocast, u0, self.model)

    def _optimize(
        self,
        images: Tensor,
        feats: Tensor,
        targets: Tensor,
        clean: Tensor,
        autocast: AbstractContextManager[object],
        u0: Tensor | None,
        forward: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        batch, channels = feats.shape[:2]
        device = images.device
        if u0 is None:
            # u = 0: softmax is uniform and S is the mean feature map (the paper's start).
            u = torch.zeros(batch, channels, device=device, requires_grad=True)
        else:
            u = u0.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([u], lr=self.lr)
        scaler = (
            torch.amp.GradScaler("cuda")
            if self.amp_dtype == torch.float16 and device.type == "cuda"
            else None
        )
        best_u = u.detach().clone()
        best = torch.full((batch,), -torch.inf, device=device)
        initial = torch.zeros(batch, device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        steps = torch.zeros(batch, dtype=torch.long, device=device)
        passes = torch.zeros(batch, dtype=torch.long, device=device)
        stop = self.schedule.stop_rule(batch, device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format

        for step in range(self.iterations + 1):
            # The last pass only scores the final u; it needs no graph.
            last = step == self.iterations
            # Only images still optimizing are forwarded: stopped ones are final.
            rows = active.nonzero().squeeze(1)
            # While every image is active (the usual case) slicing avoids gather copies.
            sel: Tensor | slice = slice(None) if rows.numel() == batch else rows
            with torch.set_grad_enabled(not last):
                saliency = self._saliency(u[sel], feats[sel])
                masks, _ = upsample_normalize(saliency, images.shape[-2:], self.normalization)
                masked = (images[sel] * masks).contiguous(memory_format=memory_format)
                with autocast:
                    out = forward(masked)
                objective = self._objective(out.float(), targets[sel], clean[sel])
            passes[rows] += 1

            value = objective.detach()
            if step == 0:
                initial[rows] = value
            improved = value > best[rows]
            best_rows = rows[improved]
            best[best_rows] = value[improved]
            best_u[best_rows] = u.detach()[best_rows]
            done = stop.update(step, value, rows)
            if done is not None:
                active[rows[done]] = False
            if last or not bool(active.any()):
                break

            optimizer.zero_grad(set_to_none=True)
            # Maximize: minimize the negative sum; stopped images get no gradient.
            loss = -(objective * active[rows].to(objective.dtype)).sum()
            before = u.detach().clone()
            self._adam_step(optimizer, scaler, loss, step)
            with torch.no_grad():
                # Adam's momentum would still move a row with zero gradient: pin the
                # stopped rows to the u they stopped at.
                u.copy_(torch.where(active.unsqueeze(1), u, before))
            steps += active.long()

        diagnostics = {
            "iterations": steps,
            "passes": passes,
            "initial_objective": initial,
            "final_objective": best,
        }
        return best_u, diagnostics

    def _adam_step(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        loss: Tensor,
        step: int,
    ) -> None:
        """One Adam step on ``loss`` at the schedule's learning rate for ``step``.

        With a ``scaler`` (fp16 autocast on CUDA) the loss is scaled before the backward
        pass and the step skipped when the gradients overflowed.
        """
        if self.lr_decay != "none":
            for group in optimizer.param_groups:
                group["lr"] = self.schedule.lr_at(step)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    def _gradcam_start(
        self,
        images: Tensor,
        targets: Tensor | None,
        autocast: AbstractContextManager[object],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The clean forward with a graph from the target layer on, and Grad-CAM's start.

        Returns ``(features, logits, targets, u0)``: features (B,K,h,w) and logits (B,C)
        as :func:`capture_features` gives them, the targets (predicted where None), and
        ``u0`` (B,K) with ``softmax(u0)`` proportional to ``relu(alpha) / sum relu(alpha)
        + floor / K``, ``alpha`` the class logit's gradient averaged over the map (0 for
        an image whose ``alpha`` has no positive entry: the uniform start).
        """
        captured: list[Tensor] = []
        owner = threading.get_ident()
        layer = self.target_layer

        def hook(_module: nn.Module, _inputs: object, output: object) -> Tensor | None:
            if threading.get_ident() != owner:
                return None
            # A leaf of our own (the weights are frozen, so the output has no graph);
            # the model goes on with a copy, which its in-place ops may change.
            leaf = _layer_tensor(layer, output).detach().requires_grad_(True)
            captured[:] = [leaf]
            return leaf.clone()

        handle = layer.register_forward_hook(hook)
        try:
            with torch.enable_grad(), autocast:
                logits = self.model(images)
        finally:
            handle.remove()
        leaf = _captured(layer, captured)
        logits = logits.float()
        if targets is None:
            targets = logits.detach().argmax(dim=1)
        check_target_range(targets, logits.shape[1])
        (grads,) = torch.autograd.grad(
            logits.gather(1, targets.unsqueeze(1)).sum(), leaf, allow_unused=True
        )
        feats = leaf.detach()
        if grads is None:
            grads = torch.zeros_like(feats)
        feats = _feature_map(feats, self.reshape_transform)
        grads = _feature_map(grads, self.reshape_transform)
        alpha = torch.relu(grads.float().mean(dim=(2, 3)))
        total = alpha.sum(dim=1, keepdim=True)
        channels = alpha.shape[1]
        weights = alpha / total.clamp(min=torch.finfo(alpha.dtype).tiny)
        u0 = torch.log(weights + _GRADCAM_FLOOR / channels)
        u0 = u0 - u0.mean(dim=1, keepdim=True)
        u0 = torch.where(total > 0, u0, torch.zeros_like(u0))
        return feats.float(), logits.detach(), targets, u0.detach()

    @staticmethod
    def _saliency(u: Tensor, feats: Tensor) -> Tensor:
        """S = sum_k softmax(u)_k A_k: u (B,K), feats (B,K,h,w) -> (B,1,h,w)."""
        weights = torch.softmax(u, dim=1)
        return torch.einsum("bk,bkhw->bhw", weights, feats).unsqueeze(1)

    def _class_score(self, logits: Tensor, targets: Tensor) -> Tensor:
        """g_c: logits (B,C) -> (B,) logit or probability of each image's class."""
        if self.score == "probability":
            logits = torch.softmax(logits, dim=1)
        return logits.gather(1, targets.unsqueeze(1)).squeeze(1)

    def _objective(self, masked_logits: Tensor, targets: Tensor, clean: Tensor) -> Tensor:
        """The quantity maximized, (B,): g_c(f(x*M)) or -|g_c(f(x)) - g_c(f(x*M))|."""
        masked = self._class_score(masked_logits, targets)
        if self.objective == "diff":
            return -(clean - masked).abs()
        return masked

    def _autocast(self, device: torch.device) -> AbstractContextManager[object]:
        if self.amp_dtype is None:
            return nullcontext()
        if device.type != "cuda":
            warnings.warn(
                f"amp_dtype={self.amp_dtype} needs a CUDA device; images are on "
                f"{device.type}, running in float32",
                stacklevel=4,
            )
            return nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)


def _amp_names(given: dict[str, Any]) -> dict[str, Any]:
    """``given`` with an ``amp_dtype`` torch dtype or long name as the option's short name."""
    value = given.get("amp_dtype")
    if isinstance(value, torch.dtype):
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: None}
        if value not in names:
            raise ValueError(f"unknown amp_dtype {short_repr(value)} (known: None, bf16, fp16)")
        return {**given, "amp_dtype": names[value]}
    return given


def _parse_amp_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype) and value == torch.float32:
        return None
    if isinstance(value, torch.dtype) and value in (torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str) and value.lower() in _AMP_DTYPES:
        return _AMP_DTYPES[value.lower()]
    raise ValueError(f"unknown amp_dtype {short_repr(value)} (known: None, bf16, fp16)")
