"""Opti-CAM (opticam.methods.opticam): formulas, batch invariants, safety, options."""

from __future__ import annotations

import gc
import math
import threading
import time

import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import TinyNet
from torch import Tensor, nn

from opticam.methods import OptiCAM, get_explainer, normalize_maps, upsample_normalize
from opticam.methods.opticam import capture_features

torch.set_num_threads(1)


def _images(seed: int, batch: int = 4, size: int = 32) -> Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _opticam(model: nn.Module, **options: object) -> OptiCAM:
    options.setdefault("iterations", 8)
    return OptiCAM(model, model.features, **options)  # type: ignore[arg-type]


class FixedFeatures(nn.Module):
    """Target layer whose output is a fixed tensor A (1,K,h,w), whatever the input."""

    def __init__(self, features: Tensor) -> None:
        super().__init__()
        self.register_buffer("value", features)

    def forward(self, x: Tensor) -> Tensor:
        return self.value.expand(x.shape[0], -1, -1, -1)


class AnalyticNet(nn.Module):
    """Logit 0 = sum_j a_j x_j over a 1x3 image's first channel; logit 1 = its negative.

    The target layer has K=3 one-hot channels: A_k is ``scale_k`` at pixel k and 0
    elsewhere, on the same 1x3 grid as the image (so up() is the identity). Hence
    ``S = (w_0, 0.9 w_1, 0.8 w_2)`` with ``w = softmax(u)``, M = range-normalized S,
    and ``F = sum_j a_j M_j`` for an all-ones image.
    """

    def __init__(self) -> None:
        super().__init__()
        a = torch.zeros(1, 3, 1, 3)
        for k, scale in enumerate((1.0, 0.9, 0.8)):
            a[0, k, 0, k] = scale
        self.features = FixedFeatures(a)
        self.register_buffer("a", torch.tensor([2.0, 1.0, -3.0]))

    def forward(self, x: Tensor) -> Tensor:
        self.features(x)  # the CAM layer runs, but the head reads the image directly
        logit = (x[:, 0, 0, :] * self.a).sum(dim=1)
        return torch.stack([logit, -logit], dim=1)


def test_analytic_start_and_optimum() -> None:
    """At u=0: S = (1/3, 0.3, 0.8/3) -> M = (1, 0.5, 0) -> F = 2.5 exactly.

    Over maps with min 0 and max 1, F = 2 M_0 + M_1 - 3 M_2 <= 3, approached as w_1 -> w_0
    from below: Opti-CAM must climb from 2.5 towards 3 without exceeding it.
    """
    model = AnalyticNet()
    x = torch.ones(1, 3, 1, 3)
    start = OptiCAM(model, model.features, iterations=0)(x, torch.tensor([0]))
    assert start.diagnostics["initial_objective"].item() == pytest.approx(2.5, abs=1e-5)
    assert torch.allclose(start.maps.flatten(), torch.tensor([1.0, 0.5, 0.0]), atol=1e-5)
    assert start.diagnostics["iterations"].item() == 0

    result = OptiCAM(model, model.features, iterations=100)(x, torch.tensor([0]))
    final = result.diagnostics["final_objective"].item()
    assert 2.95 < final <= 3.0 + 1e-5
    m = result.maps.flatten()
    assert m[0].item() == pytest.approx(1.0) and m[2].item() == pytest.approx(0.0)
    # The reported objective is the returned map's score.
    assert final == pytest.approx(float((m * model.a).sum()), abs=1e-5)


def test_analytic_diff_objective_reaches_zero_gap() -> None:
    """diff: the clean logit is 0 (M = 1 gives 2 + 1 - 3); the best map keeps that gap 0."""
    model = AnalyticNet()
    x = torch.ones(1, 3, 1, 3)
    result = OptiCAM(model, model.features, iterations=100, objective="diff")(x, [0])
    assert result.diagnostics["initial_objective"].item() == pytest.approx(-2.5, abs=1e-5)
    assert result.diagnostics["final_objective"].item() > -0.1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_equals_image_by_image(seed: int) -> None:
    model = TinyNet(seed)
    x = _images(seed)
    targets = torch.tensor([0, 1, 2, 3])
    explainer = _opticam(model)
    batch = explainer(x, targets)
    for i in range(x.shape[0]):
        single = explainer(x[i : i + 1], targets[i : i + 1])
        assert torch.allclose(batch.maps[i], single.maps[0], atol=1e-4)
        # Not the raw saliency: range normalization ignores S's offset and scale, so Adam
        # may drift along those flat directions (e.g. u of a dead channel) differently.
        low_b, _ = normalize_maps(batch.saliency[i : i + 1])  # type: ignore[index]
        low_s, _ = normalize_maps(single.saliency)  # type: ignore[arg-type]
        assert torch.allclose(low_b, low_s, atol=1e-4)
        for key in ("initial_objective", "final_objective"):
            assert torch.allclose(batch.diagnostics[key][i], single.diagnostics[key][0], atol=1e-4)
        assert batch.diagnostics["iterations"][i] == single.diagnostics["iterations"][0]


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), perm_seed=st.integers(0, 1000))
def test_permuting_batch_permutes_maps(seed: int, perm_seed: int) -> None:
    model = TinyNet(seed % 3)
    x = _images(seed)
    targets = torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(seed))
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(perm_seed))
    explainer = _opticam(model, iterations=4)
    a = explainer(x, targets)
    b = explainer(x[perm], targets[perm])
    assert torch.allclose(a.maps[perm], b.maps, atol=1e-4)
    # Maps are in [0,1] and finite.
    assert torch.isfinite(a.maps).all()
    assert a.maps.min() >= 0 and a.maps.max() <= 1
    # The returned map is never worse than the uniform start.
    assert (a.diagnostics["final_objective"] >= a.diagnostics["initial_objective"]).all()


def test_final_objective_matches_returned_map() -> None:
    model = TinyNet(3)
    x = _images(3)
    targets = torch.tensor([4, 3, 2, 1])
    result = _opticam(model, iterations=12)(x, targets)
    with torch.no_grad():
        scores = model(x * result.maps).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(scores, result.diagnostics["final_objective"], atol=1e-4)
    assert (result.diagnostics["final_objective"] >= result.diagnostics["initial_objective"]).all()
    # maps == n(up(saliency)): the stored low-resolution map rebuilds the map.
    rebuilt, _ = upsample_normalize(result.saliency, (32, 32))  # type: ignore[arg-type]
    assert torch.allclose(rebuilt, result.maps)


def test_zero_features_give_flagged_all_ones_map() -> None:
    model = TinyNet(0)
    with torch.no_grad():
        model.features[2].weight.zero_()
        model.features[2].bias.zero_()
    result = _opticam(model)(_images(0), torch.tensor([0, 1, 2, 3]))
    assert result.diagnostics["constant_map"].all()
    assert torch.equal(result.maps, torch.ones_like(result.maps))
    # Nothing to optimize: the objective cannot change, so each image stops after one step.
    assert result.diagnostics["iterations"].tolist() == [1, 1, 1, 1]


def test_early_stopping_is_per_image() -> None:
    """A black image has zero features (no biases): it stops at once, the others run on."""
    model = TinyNet(1)
    with torch.no_grad():
        for conv in (model.features[0], model.features[2]):
            conv.bias.zero_()
    x = _images(1)
    x[1] = 0.0
    result = _opticam(model, iterations=6)(x, torch.tensor([0, 1, 2, 3]))
    assert result.diagnostics["iterations"].tolist() == [6, 1, 6, 6]
    assert result.diagnostics["constant_map"].tolist() == [False, True, False, False]

    # A huge tolerance stops every image after its first step.
    loose = _opticam(model, iterations=6, tolerance=1e9)(x, torch.tensor([0, 1, 2, 3]))
    assert loose.diagnostics["iterations"].tolist() == [1, 1, 1, 1]


def test_frozen_flags_restored_and_no_weight_grads() -> None:
    model = TinyNet(0)
    model.features[0].weight.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    _opticam(model)(_images(0), torch.tensor([0, 1, 2, 3]))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_hooks_removed_and_flags_restored_when_forward_raises() -> None:
    class Exploding(TinyNet):
        calls = 0

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            if self.calls == 3:  # inside the optimization loop
                raise RuntimeError("boom")
            return super().forward(x)

    model = Exploding(0)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        _opticam(model)(_images(0), torch.tensor([0, 1, 2, 3]))
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
        assert not module._forward_pre_hooks
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize(
    "options",
    [
        {"objective": "diff"},
        {"score": "probability"},
        {"normalization": "max"},
        {"normalization": "sigmoid"},
        {"objective": "diff", "score": "probability", "lr": 0.05},
    ],
)
def test_options_run(options: dict[str, object]) -> None:
    model = TinyNet(2)
    x, targets = _images(2), torch.tensor([0, 1, 2, 3])
    result = _opticam(model, iterations=4, **options)(x, targets)
    assert result.maps.shape == (4, 1, 32, 32)
    assert torch.isfinite(result.maps).all()
    assert result.maps.min() >= 0 and result.maps.max() <= 1
    diagnostics = result.diagnostics
    # Every image took its 4 steps, and they improved on the uniform start: an optimizer
    # that silently skipped its steps would leave final == initial.
    assert diagnostics["iterations"].tolist() == [4, 4, 4, 4]
    assert (diagnostics["final_objective"] > diagnostics["initial_objective"]).all()
    # Each option changes the maps compared with the defaults.
    default = _opticam(model, iterations=4)(x, targets)
    assert not torch.allclose(result.maps, default.maps, atol=1e-4)


def test_predicted_class_when_targets_omitted() -> None:
    model = TinyNet(0)
    x = _images(0)
    predicted = model(x).argmax(1)
    a = _opticam(model, iterations=3)(x)
    b = _opticam(model, iterations=3)(x, predicted)
    assert torch.allclose(a.maps, b.maps)


def test_bad_options_and_inputs() -> None:
    model = TinyNet(0)
    with pytest.raises(ValueError, match="unknown objective 'max'"):
        _opticam(model, objective="max")
    with pytest.raises(ValueError, match="unknown normalization"):
        _opticam(model, normalization="minmax")
    with pytest.raises(ValueError, match="unknown amp_dtype"):
        _opticam(model, amp_dtype="int8")
    with pytest.raises(ValueError, match="out of range"):
        _opticam(model)(_images(0), torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="targets must be 4 class indices"):
        _opticam(model)(_images(0), torch.tensor([0, 1]))


def test_amp_on_cpu_warns_and_runs_float32() -> None:
    model = TinyNet(0)
    x = _images(0)
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        amp = _opticam(model, iterations=3, amp_dtype="bf16")(x, [0, 1, 2, 3])
    plain = _opticam(model, iterations=3)(x, [0, 1, 2, 3])
    assert torch.allclose(amp.maps, plain.maps)


def test_capture_features_copies_and_reshapes() -> None:
    model = TinyNet(0)
    x = _images(0, batch=2)
    feats, logits = capture_features(model, model.features, x)
    assert feats.shape == (2, 8, 16, 16) and logits.shape == (2, 5)
    assert not model.features._forward_hooks
    with pytest.raises(ValueError, match="did not run"):
        capture_features(model, nn.ReLU(), x)


def test_vit_token_grid() -> None:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    ).eval()
    # torchvision initializes the head to zeros: all logits 0, all gradients 0.
    nn.init.normal_(vit.heads.head.weight)
    x = _images(5, batch=2)
    for method in ("opticam", "gradcam", "scorecam", "ablationcam"):
        options = {"iterations": 3} if method == "opticam" else {}
        result = get_explainer(method, vit, **options)(x, torch.tensor([1, 7]))
        assert result.saliency is not None and result.saliency.shape == (2, 1, 4, 4)
        assert result.maps.shape == (2, 1, 32, 32)
        assert torch.isfinite(result.maps).all()
        assert result.maps.min() >= 0 and result.maps.max() <= 1
        # Gradients reach the patch tokens (ReLU may still zero a whole Grad-CAM map).
        assert not result.diagnostics["constant_map"].all(), method
    # Features may be negative there: Opti-CAM reads them without ReLU.
    explainer = get_explainer("opticam", vit)
    assert isinstance(explainer, OptiCAM) and not explainer.relu_features
    assert all(not m._forward_hooks for m in vit.modules())


def test_memory_flat_over_repeated_calls() -> None:
    model = TinyNet(0)
    x = _images(0, batch=8)
    targets = torch.arange(8) % 5
    explainers = [_opticam(model, iterations=3), get_explainer("gradcam", model)]

    def run(n: int) -> None:
        for _ in range(n):
            for explainer in explainers:
                explainer(x, targets)

    run(10)
    gc.collect()
    before = psutil.Process().memory_info().rss
    run(100)
    gc.collect()
    growth = psutil.Process().memory_info().rss - before
    assert growth < 50 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB over 100 calls"


def test_concurrent_calls_on_one_model() -> None:
    """The feature hook ignores other threads' forward passes through the shared layer."""

    class Sleepy(TinyNet):
        def forward(self, x: Tensor) -> Tensor:
            feats = self.features(x)
            time.sleep(0.002)  # releases the GIL: other threads run through `features`
            return self.fc(torch.flatten(self.pool(feats), 1))

    model = Sleepy(4)
    model.requires_grad_(False)
    explainer = _opticam(model, iterations=5)
    inputs = [(_images(s), torch.tensor([s % 5, 1, 2, 3])) for s in range(4)]
    expected = [explainer(x, t).maps for x, t in inputs]
    got: dict[int, list[Tensor]] = {i: [] for i in range(len(inputs))}

    def work(i: int) -> None:
        for _ in range(10):
            got[i].append(explainer(*inputs[i]).maps)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, maps in enumerate(expected):
        assert len(got[i]) == 10
        assert all(torch.allclose(m, maps, atol=1e-5) for m in got[i])


# --------------------------------------------------------------------------- schedules


_SCHEDULE_DEFAULTS = {
    "preset": "paper",
    "lr_decay": "none",
    "start": "uniform",
    "patience": 0,
    "plateau_rtol": 0.0,
    "plateau_atol": 0.0,
    "channels_last": False,
    "compile": "auto",
}


def test_paper_setting_is_the_default_and_options_off_change_nothing() -> None:
    model = TinyNet(5)
    x, targets = _images(5), torch.tensor([0, 1, 2, 3])
    plain = OptiCAM(model, model.features)
    assert (plain.iterations, plain.lr, plain.tolerance) == (100, 0.1, 1e-10)
    assert all(getattr(plain, k) == v for k, v in _SCHEDULE_DEFAULTS.items())
    default = _opticam(model, iterations=6)(x, targets)
    # Every new option at its "off" value, or a plateau rule that cannot fire within the
    # run, is the same computation: exactly the same maps and diagnostics.
    for options in (
        _SCHEDULE_DEFAULTS,
        {"patience": 50, "plateau_rtol": 0.5},
        {"preset": "paper", "lr_decay": "none", "start": "uniform"},
        # A call this short is far below compile="auto"'s threshold: eager, as False.
        {"compile": False},
    ):
        same = _opticam(model, iterations=6, **options)(x, targets)
        assert torch.equal(same.maps, default.maps), options
        for key, value in default.diagnostics.items():
            assert torch.equal(same.diagnostics[key], value), (options, key)
    # 6 steps and the forward that scores the last u.
    assert default.diagnostics["passes"].tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_lr_decay_changes_the_steps_but_not_their_number(decay: str) -> None:
    model = TinyNet(2)
    x, targets = _images(2), torch.tensor([0, 1, 2, 3])
    plain = _opticam(model, iterations=10)(x, targets)
    decayed = _opticam(model, iterations=10, lr_decay=decay)(x, targets)
    assert not torch.allclose(decayed.maps, plain.maps, atol=1e-4)
    assert decayed.diagnostics["passes"].tolist() == [11, 11, 11, 11]
    # The first step uses the full learning rate: a 1-step run is the same.
    one = _opticam(model, iterations=1, lr_decay=decay)(x, targets)
    assert torch.equal(one.maps, _opticam(model, iterations=1)(x, targets).maps)


def test_lr_decay_factors() -> None:
    from opticam.methods.schedule import Schedule

    def rates(kind: str) -> list[float]:
        schedule = Schedule(iterations=4, lr=2.0, tolerance=0.0, lr_decay=kind)
        return [schedule.lr_at(t) / 2.0 for t in range(4)]

    assert rates("cosine") == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    assert rates("linear") == [1.0, 0.75, 0.5, 0.25]
    assert rates("none") == [1.0] * 4


class _RecordingAdam(torch.optim.Adam):
    """Adam that keeps a copy of its parameter at the start of every step.

    Opti-CAM pins stopped rows after each step, so the copy taken at the start of step
    ``t`` is the ``u`` that step ``t``'s forward pass used (for the rows still active).
    """

    seen: list[Tensor] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        _RecordingAdam.seen.append(self.param_groups[0]["params"][0].detach().clone())
        return super().step(closure)


def test_plateau_stop_freezes_each_row_at_its_own_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = TinyNet(2)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    targets = torch.tensor([0, 1, 2, 3])
    monkeypatch.setattr(torch.optim, "Adam", _RecordingAdam)
    _RecordingAdam.seen = []
    result = _opticam(model, iterations=30, patience=3, plateau_rtol=0.01)(x, targets)
    stops = result.diagnostics["iterations"].tolist()
    # Rows stop at different steps (the rule is per image), and some run to the end.
    assert stops == [6, 30, 30, 5]
    assert result.diagnostics["passes"].tolist() == [s + 1 for s in stops]
    seen = torch.stack(_RecordingAdam.seen)  # (steps, B, K)
    assert seen.shape[0] == 30
    final = seen[-1]
    for row, stop in enumerate(stops):
        # u moved up to the step the row stopped at, and never after.
        assert not torch.equal(seen[stop - 1, row], seen[0, row])
        for later in range(stop, seen.shape[0]):
            assert torch.equal(seen[later, row], seen[stop, row]), (row, later)
        if stop < 30:
            assert torch.equal(final[row], seen[stop, row])
    # A stopped row's map is what a plain run of that many steps gives for it alone.
    for row in (0, 3):
        single = _opticam(model, iterations=stops[row])(x[row : row + 1], targets[row : row + 1])
        assert torch.allclose(result.maps[row], single.maps[0], atol=1e-4)


def test_plateau_thresholds() -> None:
    model = TinyNet(2)
    x, targets = _images(2), torch.tensor([0, 1, 2, 3])
    # A huge absolute threshold: only the first value counts, so every row stops once
    # `patience` iterations have passed without a counted improvement.
    stopped = _opticam(model, iterations=20, patience=2, plateau_atol=1e9)(x, targets)
    assert stopped.diagnostics["iterations"].tolist() == [2, 2, 2, 2]
    assert stopped.diagnostics["passes"].tolist() == [3, 3, 3, 3]
    same = _opticam(model, iterations=2)(x, targets)
    assert torch.equal(stopped.maps, same.maps)


def test_gradcam_start_differs_from_uniform_and_costs_one_pass() -> None:
    model = TinyNet(3)
    x, targets = _images(3), torch.tensor([4, 3, 2, 1])
    uniform = _opticam(model, iterations=5)(x, targets)
    gradcam = _opticam(model, iterations=5, start="gradcam")(x, targets)
    assert gradcam.diagnostics["passes"].tolist() == [7, 7, 7, 7]
    assert uniform.diagnostics["passes"].tolist() == [6, 6, 6, 6]
    assert gradcam.diagnostics["iterations"].tolist() == [5, 5, 5, 5]
    assert not torch.allclose(
        gradcam.diagnostics["initial_objective"], uniform.diagnostics["initial_objective"]
    )
    assert not torch.allclose(gradcam.maps, uniform.maps, atol=1e-3)
    # The start itself is Grad-CAM's positive weights: with no steps, the map is the one
    # of softmax(u0) = relu(alpha) / sum + floor / K.
    start = _opticam(model, iterations=0, start="gradcam")(x, targets)
    feats, logits = capture_features(model, model.features, x)
    with torch.enable_grad():
        leaf = feats.clone().requires_grad_(True)
        head = model.fc(torch.flatten(model.pool(leaf), 1))
        (grads,) = torch.autograd.grad(head.gather(1, targets[:, None]).sum(), leaf)
    alpha = torch.relu(grads.mean(dim=(2, 3)))
    weights = alpha / alpha.sum(1, keepdim=True) + 0.1 / alpha.shape[1]
    expected, _ = upsample_normalize(
        torch.einsum("bk,bkhw->bhw", weights, feats).unsqueeze(1), (32, 32)
    )
    assert torch.allclose(start.maps, expected, atol=1e-5)
    assert start.diagnostics["passes"].tolist() == [2, 2, 2, 2]
    # Targets omitted: the predicted class, as with the uniform start.
    predicted = model(x).argmax(1)
    a = _opticam(model, iterations=2, start="gradcam")(x)
    b = _opticam(model, iterations=2, start="gradcam")(x, predicted)
    assert torch.equal(a.maps, b.maps)


def test_preset_fast_uses_at_most_a_third_of_the_passes() -> None:
    from opticam.names import OPTICAM_PRESETS

    model = TinyNet(4)
    x, targets = _images(4, batch=3), torch.tensor([0, 1, 2])
    paper = OptiCAM(model, model.features)(x, targets)
    fast_explainer = OptiCAM(model, model.features, preset="fast")
    fast = fast_explainer(x, targets)
    assert paper.diagnostics["passes"].tolist() == [101, 101, 101]
    assert fast.diagnostics["passes"].sum() * 3 <= paper.diagnostics["passes"].sum()
    # The preset is the named schedule, and the same as spelling it out.
    for key, value in OPTICAM_PRESETS["fast"].items():
        assert getattr(fast_explainer, key) == value
    spelled = OptiCAM(model, model.features, **OPTICAM_PRESETS["fast"])(x, targets)  # type: ignore[arg-type]
    assert torch.equal(spelled.maps, fast.maps)
    # Options left out take the preset's; given ones must agree with it.
    fast_iterations = OPTICAM_PRESETS["fast"]["iterations"]
    agreeing = OptiCAM(model, model.features, preset="fast", iterations=fast_iterations)
    assert agreeing.iterations == fast_iterations
    with pytest.raises(ValueError, match="preset 'fast' sets iterations"):
        OptiCAM(model, model.features, preset="fast", iterations=7)
    with pytest.raises(ValueError, match="unknown preset"):
        OptiCAM(model, model.features, preset="quick")


@pytest.mark.parametrize("given", [{"iterations": 100}, {"lr": 0.1}, {"iterations": 7}])
def test_an_explicit_option_is_never_replaced_by_the_preset(given: dict[str, object]) -> None:
    """The paper's values given explicitly are refused like any other conflicting value,
    in the library and in a job's method options (the job file and the CLI build these)."""
    from opticam.config import MethodSpec, OptiCAMOptions

    model = TinyNet(0)
    ((key, value),) = given.items()
    message = f"preset 'fast' sets {key}=.*conflicts with the {key}={value!r} given"
    with pytest.raises(ValueError, match=message):
        OptiCAM(model, model.features, preset="fast", **given)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        OptiCAMOptions(preset="fast", **given)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        MethodSpec(name="opticam", options={"preset": "fast", **given})
    # Without the preset an explicit value is used as given.
    assert getattr(OptiCAM(model, model.features, **given), key) == value  # type: ignore[arg-type]


def test_options_a_preset_does_not_set_are_used_as_given() -> None:
    model = TinyNet(0)
    explainer = OptiCAM(model, model.features, preset="fast", lr_decay="cosine", patience=0)
    assert (explainer.iterations, explainer.lr) == (32, 0.5)
    assert (explainer.lr_decay, explainer.patience) == ("cosine", 0)


def test_preset_in_the_config() -> None:
    from pydantic import ValidationError

    from opticam.config import MethodSpec, OptiCAMOptions

    assert OptiCAMOptions(preset="fast").preset == "fast"
    with pytest.raises(ValidationError, match="conflicts"):
        OptiCAMOptions(preset="fast", lr=0.05)
    with pytest.raises(ValueError, match="conflicts"):
        MethodSpec(name="opticam", options={"preset": "fast", "iterations": 7})
    for bad in ({"start": "random"}, {"lr_decay": "step"}, {"patience": -1}):
        with pytest.raises(ValidationError):
            OptiCAMOptions(**bad)  # type: ignore[arg-type]


def test_new_options_reject_bad_values() -> None:
    model = TinyNet(0)
    with pytest.raises(ValueError, match="unknown lr_decay"):
        _opticam(model, lr_decay="step")
    with pytest.raises(ValueError, match="unknown start"):
        _opticam(model, start="random")
    with pytest.raises(ValueError, match="patience"):
        _opticam(model, patience=-1)
    with pytest.raises(ValueError, match="plateau_rtol"):
        _opticam(model, plateau_rtol=-0.1)


# --------------------------------------------------------------------------- fast paths

#: channels_last vs the plain path: the largest map difference measured on TinyNet, seeds
#: 0-4, 10 iterations, CPU, torch 2.14, was 7.7e-7 (rounding of the reordered convolution
#: sums); the bound leaves a factor of 10.
CHANNELS_LAST_ATOL = 1e-5
#: torch.compile (inductor, CPU) vs eager on TinyNet, 4 iterations: measured 3.0e-7. The
#: first compiled call takes 10-70 s on a 2-core CPU with an empty inductor cache, a few
#: seconds with a warm one, hence a single small test with the real compiler; the others
#: stand a recording function in for torch.compile.
COMPILE_ATOL = 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_channels_last_gives_the_same_maps(seed: int) -> None:
    x, targets = _images(seed), torch.tensor([0, 1, 2, 3])
    plain = _opticam(TinyNet(seed), iterations=10)(x, targets)
    model = TinyNet(seed)
    fast = _opticam(model, iterations=10, channels_last=True)(x, targets)
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fast.maps, plain.maps, atol=CHANNELS_LAST_ATOL, rtol=0)
    assert torch.equal(fast.diagnostics["passes"], plain.diagnostics["passes"])


@pytest.mark.e2e
def test_compile_gives_the_same_maps_and_one_shape_per_job() -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    x, targets = _images(1), torch.tensor([0, 1, 2, 3])
    plain = _opticam(TinyNet(1), iterations=4, compile=False)(x, targets)
    torch._dynamo.reset()
    counters.clear()
    explainer = _opticam(TinyNet(1), iterations=4, compile=True)
    compiled = explainer(x, targets)
    assert explainer._forward._compiled is not None and not explainer._forward.failed
    assert torch.allclose(compiled.maps, plain.maps, atol=COMPILE_ATOL, rtol=0)
    assert torch.equal(compiled.diagnostics["passes"], plain.diagnostics["passes"])
    # One graph with gradients (the steps), one without (the pass that scores the last u).
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2
    # A shorter last batch is padded to the compiled shape: nothing compiles again, and
    # the real images' maps are the eager ones of those images alone.
    short = explainer(x[:3], targets[:3])
    assert counters["stats"]["unique_graphs"] == graphs
    alone = _opticam(TinyNet(1), iterations=4, compile=False)(x[:3], targets[:3])
    assert short.maps.shape == alone.maps.shape
    assert torch.allclose(short.maps, alone.maps, atol=COMPILE_ATOL, rtol=0)
    assert torch.equal(short.diagnostics["passes"], alone.diagnostics["passes"])


class _FakeCompile:
    """``torch.compile`` stand-in: the model itself, recording each batch it is given."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.options: list[dict[str, object]] = []

    def __call__(self, model: nn.Module, **options: object) -> object:
        self.options.append(options)

        def call(images: Tensor) -> Tensor:
            self.batches.append(int(images.shape[0]))
            return model(images)

        return call


def test_compile_pads_a_short_batch_and_keeps_its_outputs_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    model = TinyNet(3)
    x, targets = _images(3), torch.tensor([0, 1, 2, 3])
    explainer = _opticam(model, iterations=5, compile=True)
    explainer(x, targets)
    assert fake.options == [{"dynamic": False}]  # static: one shape, compiled once
    assert fake.batches == [4] * 6
    # 3 images of 4: padded with copies of the last one (their outputs dropped), so
    # the compiled function only ever sees 4 images.
    fake.batches.clear()
    short = explainer(x[:3], targets[:3])
    assert fake.batches == [4] * 6
    alone = _opticam(model, iterations=5, compile=False)(x[:3], targets[:3])
    assert short.maps.shape == alone.maps.shape
    assert torch.allclose(short.maps, alone.maps, atol=COMPILE_ATOL, rtol=0)
    for key, value in alone.diagnostics.items():
        assert torch.allclose(short.diagnostics[key].float(), value.float(), atol=1e-5), key
    # 2 of 4 (under PAD_FROM): eager is cheaper than the padded batch.
    fake.batches.clear()
    pair = explainer(x[:2], targets[:2])
    assert fake.batches == []
    expected = _opticam(model, iterations=5, compile=False)(x[:2], targets[:2])
    assert torch.equal(pair.maps, expected.maps)


def test_compile_keeps_one_shape_while_images_stop_early(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    model = TinyNet(1)
    x, targets = _images(1), torch.tensor([0, 1, 2, 3])
    # The stop rule ends the images at 11, 12, 17 and 20 steps: 3, 2, then 1 active.
    options = {"iterations": 20, "tolerance": 1e-3}
    compiled = _opticam(model, compile=True, **options)(x, targets)
    eager = _opticam(model, compile=False, **options)(x, targets)
    assert eager.diagnostics["iterations"].tolist() == [20, 11, 12, 17]
    # 3 active images are padded to 4; 2 or 1 run eagerly (under PAD_FROM of 4).
    assert set(fake.batches) == {4} and len(fake.batches) == 13
    assert torch.equal(compiled.diagnostics["iterations"], eager.diagnostics["iterations"])
    assert torch.allclose(compiled.maps, eager.maps, atol=COMPILE_ATOL, rtol=0)


def test_compiled_forward_pads_only_what_pays() -> None:
    from opticam.methods.compiled import PAD_FROM, CompiledForward

    seen: list[tuple[int, bool]] = []

    def compiled(images: Tensor) -> Tensor:
        seen.append((int(images.shape[0]), images.is_contiguous()))
        return images.flatten(1).sum(dim=1, keepdim=True)

    forward = CompiledForward(lambda images: -images.flatten(1).sum(1, keepdim=True), True)  # type: ignore[arg-type]
    forward._compiled = compiled
    batch = torch.rand(10, 3, 4, 4, requires_grad=True)
    assert forward.use(batch) and forward.size == 10
    kept = math.ceil(PAD_FROM * 10)  # the shortest batch still padded
    out = forward(batch[:kept])
    assert seen == [(10, True)] and out.shape == (kept, 1)
    # The padding rows' outputs are dropped: each real image gets its own gradient only.
    out.sum().backward()
    assert batch.grad is not None
    assert torch.equal(batch.grad[:kept], torch.ones_like(batch.grad[:kept]))
    assert not bool(batch.grad[kept:].any())
    assert torch.equal(forward(batch[: kept - 1]), -batch[: kept - 1].flatten(1).sum(1, True))
    assert seen == [(10, True)]  # the shorter one ran eagerly


def test_compile_auto_waits_until_the_explainer_has_spent_enough_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import opticam.methods.compiled as compiled

    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    # Two calls of 4 images at 3 steps + 1 pass: the third call compiles.
    monkeypatch.setattr(compiled, "COMPILE_AFTER_PASSES", 2 * 4 * 4)
    model = TinyNet(4)
    x, targets = _images(4), torch.tensor([0, 1, 2, 3])
    auto = _opticam(model, iterations=3)
    assert auto.compile == "auto"
    never = _opticam(model, iterations=3, compile=False)
    for call in range(4):
        fake.batches.clear()
        got = auto(x, targets)
        assert fake.batches == ([] if call < 2 else [4] * 4), call
        assert torch.allclose(got.maps, never(x, targets).maps, atol=COMPILE_ATOL, rtol=0)
    assert auto._forward.passes == 4 * 4 * 4
    # Never on a device torch.compile only partly supports, nor with compile=False.
    assert never._forward.passes == 4 * 4 * 4 and not never._forward.use(x)
    monkeypatch.setattr(compiled, "AUTO_DEVICES", ("cuda",))
    assert not auto._forward.use(x)


def test_compile_out_of_memory_compiles_for_the_halves(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    model = TinyNet(2)
    x, targets = _images(2), torch.tensor([0, 1, 2, 3])
    explainer = _opticam(model, iterations=2, compile=True)

    def too_large(images: Tensor) -> Tensor:
        if images.shape[0] == 4:
            raise torch.OutOfMemoryError("4 images do not fit")
        fake.batches.append(int(images.shape[0]))
        return model(images)

    explainer._forward._compiled = too_large
    # Not a compilation failure: raised for the caller to split the batch, no warning.
    with pytest.raises(torch.OutOfMemoryError):
        explainer(x, targets)
    assert not explainer._forward.failed
    # The halves compile for 2 images instead of being padded back to 4 (or run eagerly).
    explainer(x[:2], targets[:2])
    assert fake.batches == [2] * 3


def test_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(model: nn.Module, **options: object) -> object:
        def call(images: Tensor) -> Tensor:
            raise RuntimeError("no compiler here")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    model = TinyNet(1)
    x, targets = _images(1), torch.tensor([0, 1, 2, 3])
    explainer = _opticam(model, iterations=4, compile=True)
    with pytest.warns(UserWarning, match="torch.compile failed.*no compiler here"):
        result = explainer(x, targets)
    plain = _opticam(model, iterations=4)(x, targets)
    assert torch.equal(result.maps, plain.maps)
    # Eager from then on, without another warning.
    again = explainer(x, targets)
    assert torch.equal(again.maps, plain.maps)


class _OneImageAtATime(nn.Module):
    """``TinyNet`` run image by image, so that no part of the network's arithmetic can
    depend on the other images of a batch; ``features`` is its target layer."""

    def __init__(self, net: TinyNet) -> None:
        super().__init__()
        self.net = net
        self.features = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        feats = self.features(torch.cat([self.net.features(x[i : i + 1]) for i in range(len(x))]))
        pooled = [torch.flatten(self.net.pool(feats[i : i + 1]), 1) for i in range(len(x))]
        return torch.cat([self.net.fc(p) for p in pooled])


@pytest.mark.parametrize(
    "options",
    [
        {"tolerance": 0.0},
        {"patience": 3, "plateau_rtol": 1e-2},
        {"start": "gradcam", "objective": "diff", "score": "probability"},
    ],
)
def test_each_image_is_its_own_optimization(options: dict[str, object]) -> None:
    """Batched or one by one, the same bits, when the network's arithmetic is per image:
    the loss, Adam, the stop rules and the best-iterate pick couple no images, so a
    batch changes a map only through the model's batched kernels (README: batch size)."""
    model = _OneImageAtATime(TinyNet(6))
    x, targets = _images(6, batch=5), torch.tensor([0, 1, 2, 3, 4])
    explainer = OptiCAM(model, model.features, iterations=25, **options)  # type: ignore[arg-type]
    batched = explainer(x, targets)
    alone = [explainer(x[i : i + 1], targets[i : i + 1]) for i in range(5)]
    assert torch.equal(batched.maps, torch.cat([a.maps for a in alone]))
    for key, value in batched.diagnostics.items():
        assert torch.equal(value, torch.cat([a.diagnostics[key] for a in alone])), key
    if "patience" in options:
        # The per-image stop fired, at different steps: rows left the batch on the way.
        assert len(set(batched.diagnostics["iterations"].tolist())) > 1
