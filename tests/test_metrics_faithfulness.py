"""Tests of opticam.metrics.faithfulness on analytic models with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import Tensor, nn

from opticam.metrics import (
    average_drop,
    average_gain,
    average_increase,
    class_probabilities,
    curve_auc,
    faithfulness_terms,
    gaussian_blur,
    insertion_deletion,
    saliency_ranks,
)


def assert_values(actual: Tensor, expected: object, atol: float = 1e-9) -> None:
    """Compare with an absolute tolerance, in the dtype of ``actual``."""
    expected_tensor = torch.as_tensor(expected, dtype=actual.dtype, device=actual.device)
    torch.testing.assert_close(actual, expected_tensor, atol=atol, rtol=0)


def sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


class MeanPixelModel(nn.Module):
    """Two classes, logits ``(a * mean(x) + b, 0)``: ``p(class 0) = sigmoid(a * mean(x) + b)``."""

    def __init__(self, a: float, b: float = 0.0) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        m = x.double().mean((1, 2, 3))
        return torch.stack([self.a * m + self.b, torch.zeros_like(m)], dim=1)


class WeightedPixelModel(nn.Module):
    """Two classes, logits ``(sum_ij W_ij * mean_c x[c,i,j], 0)``."""

    weights: Tensor

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights.double())

    def forward(self, x: Tensor) -> Tensor:
        logit = (x.double().mean(1) * self.weights).sum((1, 2))
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def small_cnn(seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, classes),
    ).double()


# ---------------------------------------------------------------------------
# Average Drop / Gain / Increase
# ---------------------------------------------------------------------------


def test_terms_match_hand_computed_values() -> None:
    model = MeanPixelModel(a=2.0)
    images = torch.ones(2, 3, 2, 2)
    maps = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]], [[[1.0, 0.0], [0.0, 1.0]]]])
    targets = torch.tensor([0, 1])

    terms = faithfulness_terms(model, images, maps, targets)

    # Image 0: class 0, mean pixel 1 -> 0.5.  Image 1: class 1, mean pixel 1 -> 0.5.
    p = [sigmoid(2.0), sigmoid(-2.0)]
    o = [sigmoid(1.0), sigmoid(-1.0)]
    drop0 = (p[0] - o[0]) / p[0]
    gain1 = (o[1] - p[1]) / (1 - p[1])
    assert_values(terms["p_clean"], p)
    assert_values(terms["p_masked"], o)
    assert_values(terms["drop"], [drop0, 0.0])
    assert_values(terms["gain"], [0.0, gain1])
    assert_values(terms["increase"], [0.0, 1.0])
    for value in terms.values():
        assert value.dtype == torch.float64 and value.shape == (2,)

    assert average_drop(terms["p_clean"], terms["p_masked"]) == pytest.approx(50 * drop0, abs=1e-9)
    assert average_gain(terms["p_clean"], terms["p_masked"]) == pytest.approx(50 * gain1, abs=1e-9)
    assert average_increase(terms["p_clean"], terms["p_masked"]) == pytest.approx(50.0, abs=1e-9)
    # drop0 = (0.880797 - 0.731059) / 0.880797
    assert 50 * drop0 == pytest.approx(8.5002, abs=1e-4)


def test_averages_accept_lists_and_arrays() -> None:
    p, o = [0.5, 0.8, 0.2], [0.25, 0.9, 0.2]
    assert average_drop(p, o) == pytest.approx(100 / 3 * 0.5)  # type: ignore[arg-type]
    assert average_gain(p, o) == pytest.approx(100 / 3 * 0.5)  # type: ignore[arg-type]
    assert average_increase(p, o) == pytest.approx(100 / 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        average_drop([], [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ in length"):
        average_gain([0.1, 0.2], [0.1])  # type: ignore[arg-type]


def test_divisions_are_guarded_at_p_zero_and_one() -> None:
    # Logits (2e4 * (mean - 0.5), 0): on the all-ones image p(class 0) == 1.0 and
    # p(class 1) == 0.0 exactly (exp(-1e4) underflows); a map of 0.5 gives 0.5.
    model = MeanPixelModel(a=2e4, b=-1e4)
    images = torch.ones(4, 3, 2, 2)
    maps = torch.cat([torch.full((2, 1, 2, 2), 0.5), torch.ones(2, 1, 2, 2)])
    targets = torch.tensor([0, 1, 0, 1])
    terms = faithfulness_terms(model, images, maps, targets)

    assert_values(terms["p_clean"], [1.0, 0.0, 1.0, 0.0])
    assert_values(terms["p_masked"], [0.5, 0.5, 1.0, 0.0])
    assert_values(terms["drop"], [0.5, 0.0, 0.0, 0.0])  # p=0 -> 0
    assert_values(terms["gain"], [0.0, 0.5, 0.0, 0.0])  # p=1 -> 0
    assert_values(terms["increase"], [0.0, 1.0, 0.0, 0.0])
    for value in terms.values():
        assert torch.isfinite(value).all()
    assert average_drop([1.0, 0.0], [0.5, 0.5]) == pytest.approx(25.0)  # type: ignore[arg-type]
    assert average_gain([1.0, 0.0], [0.5, 0.5]) == pytest.approx(25.0)  # type: ignore[arg-type]


def test_fake_cam_gets_a_tiny_drop_and_no_gain() -> None:
    model = MeanPixelModel(a=2.0)
    images = torch.ones(1, 3, 8, 8)
    fake = torch.ones(1, 1, 8, 8)
    fake[..., 0, 0] = 0  # Fake-CAM: everything kept except the top-left pixel
    terms = faithfulness_terms(model, images, fake, torch.tensor([0]))
    p, o = sigmoid(2.0), sigmoid(2.0 * 63 / 64)
    assert terms["drop"].item() == pytest.approx((p - o) / p, abs=1e-9)
    assert terms["drop"].item() < 0.005
    assert terms["gain"].item() == 0.0 and terms["increase"].item() == 0.0


def test_p_clean_is_reused_and_batches_agree() -> None:
    model = MeanPixelModel(a=3.0, b=-1.0)
    torch.manual_seed(0)
    images, maps = torch.rand(7, 3, 4, 4), torch.rand(7, 1, 4, 4)
    targets = torch.randint(0, 2, (7,))
    full = faithfulness_terms(model, images, maps, targets)
    model.calls = 0
    reused = faithfulness_terms(model, images, maps, targets, p_clean=full["p_clean"], batch_size=3)
    assert model.calls == 3  # only the masked images, in chunks of 3
    for key in full:
        torch.testing.assert_close(reused[key], full[key])
    torch.testing.assert_close(
        class_probabilities(model, images, targets, batch_size=2), full["p_clean"]
    )


def test_model_runs_in_eval_without_grad_and_keeps_its_mode() -> None:
    base = MeanPixelModel(a=2.0)
    model = nn.Sequential(nn.Dropout(p=0.9), base)
    model.train()
    images = torch.ones(2, 3, 2, 2, requires_grad=True)
    probs = class_probabilities(model, images, torch.tensor([0, 0]))
    # Dropout off: exact value of the clean image; no graph built.
    assert_values(probs, [sigmoid(2.0)] * 2)
    assert not probs.requires_grad
    assert model.training and model[0].training and base.training

    class Broken(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("boom")

    broken = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        class_probabilities(broken, images, torch.tensor([0, 0]))
    assert broken.training


def test_bad_inputs_are_rejected_with_the_offending_value() -> None:
    model = MeanPixelModel(a=1.0)
    images = torch.ones(2, 3, 4, 4)
    targets = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\).*\(2, 1, 2, 2\)"):
        faithfulness_terms(model, images, torch.ones(2, 1, 2, 2), targets)
    with pytest.raises(ValueError, match=r"\[0, 1\], got values in \[0.0, 2.0\]"):
        faithfulness_terms(model, images, torch.eye(4).expand(2, 1, 4, 4) * 2, targets)
    # A rounding overshoot is clamped, not an error: the same as a map of exactly 1.
    nearly = faithfulness_terms(model, images, torch.full((2, 1, 4, 4), 1 + 1e-7), targets)
    exact = faithfulness_terms(model, images, torch.ones(2, 1, 4, 4), targets)
    torch.testing.assert_close(nearly, exact)
    with pytest.raises(ValueError, match="integer class"):
        faithfulness_terms(model, images, torch.ones(2, 1, 4, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(2,\) integer tensor"):
        class_probabilities(model, images, torch.tensor([0]))
    with pytest.raises(ValueError, match="batch_size"):
        class_probabilities(model, images, targets, batch_size=0)


# ---------------------------------------------------------------------------
# Insertion and deletion
# ---------------------------------------------------------------------------

W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
# Order of decreasing saliency: (0,1) w=2, (1,0) w=3, (1,1) w=4, (0,0) w=1.
MAP = torch.tensor([[[[0.1, 0.9], [0.5, 0.3]]]])


@pytest.mark.parametrize(
    ("steps", "logits"),
    [
        (4, [10, 8, 5, 1, 0]),  # one pixel per step
        (2, [10, 5, 0]),  # two pixels per step
        (3, [10, 5, 0, 0]),  # ceil(4/3) = 2 pixels per step; the last step is already empty
        (8, [10, 8, 5, 1, 0, 0, 0, 0, 0]),  # ceil(4/8) = 1: more steps than pixels
    ],
)
def test_deletion_curve_by_hand(steps: int, logits: list[float]) -> None:
    out = insertion_deletion(
        WeightedPixelModel(W),
        torch.ones(1, 3, 2, 2),
        MAP,
        torch.tensor([0]),
        steps=steps,
        modes=("deletion",),
    )
    expected = torch.tensor([[sigmoid(t) for t in logits]], dtype=torch.float64)
    assert out["deletion_curve"].shape == (1, steps + 1)
    assert_values(out["deletion_curve"], expected)
    c = expected[0]
    auc = (c.sum() - (c[0] + c[-1]) / 2) / steps
    assert_values(out["deletion_auc"], auc.view(1))


def test_insertion_curve_by_hand_with_blurred_start() -> None:
    # Left column 0, right column 1. With reflect padding, a 3-tap Gaussian (sigma 1)
    # leaves rows alone and mixes columns: left -> 2*w1, right -> w0.
    image = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64).expand(1, 3, 2, 2)
    e = math.exp(-0.5)
    w0, w1 = 1 / (1 + 2 * e), e / (1 + 2 * e)
    assert_values(gaussian_blur(image, 3, 1.0)[0, 0], [[2 * w1, w0], [2 * w1, w0]])
    out = insertion_deletion(
        WeightedPixelModel(W),
        image,
        MAP,
        torch.tensor([0]),
        steps=4,
        blur_kernel=3,
        blur_sigma=1.0,
    )
    # Restore (0,1)=1, (1,0)=0, (1,1)=1, (0,0)=0 one by one, starting from the blur.
    logits = [
        1 * 2 * w1 + 2 * w0 + 3 * 2 * w1 + 4 * w0,
        1 * 2 * w1 + 2 * 1 + 3 * 2 * w1 + 4 * w0,
        1 * 2 * w1 + 2 * 1 + 3 * 0 + 4 * w0,
        1 * 2 * w1 + 2 * 1 + 3 * 0 + 4 * 1,
        1 * 0 + 2 * 1 + 3 * 0 + 4 * 1,
    ]
    expected = torch.tensor([[sigmoid(t) for t in logits]], dtype=torch.float64)
    assert_values(out["insertion_curve"], expected)
    c = expected[0]
    assert_values(out["insertion_auc"], ((c.sum() - (c[0] + c[-1]) / 2) / 4).view(1))
    # Deletion of this image: remove 1, 0, 1, 0 -> logits 6, 4, 4, 0, 0.
    deletion = [[sigmoid(t) for t in (6, 4, 4, 0, 0)]]
    assert_values(out["deletion_curve"], deletion)


def test_blur_parameters_set_the_insertion_start() -> None:
    model = small_cnn(0)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    maps = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    classes = torch.tensor([0, 2])
    starts = []
    for kernel, sigma in [(11, 5.0), (5, 1.0), (1, 1.0)]:
        out = insertion_deletion(
            model, images, maps, classes, steps=6, blur_kernel=kernel, blur_sigma=sigma
        )
        blurred = gaussian_blur(images, kernel, sigma)
        torch.testing.assert_close(
            out["insertion_curve"][:, 0], class_probabilities(model, blurred, classes)
        )
        starts.append(out["insertion_curve"][:, 0])
    assert not torch.allclose(starts[0], starts[1])
    # Kernel 1 is no blur: insertion then starts, like deletion, from the clean image.
    torch.testing.assert_close(starts[2], out["deletion_curve"][:, 0])
    # Both curves end where they should: insertion at the image, deletion at black.
    clean = class_probabilities(model, images, classes)
    black = class_probabilities(model, torch.zeros_like(images), classes)
    torch.testing.assert_close(out["insertion_curve"][:, -1], clean)
    torch.testing.assert_close(out["deletion_curve"][:, -1], black)


def _reference_blur(images: Tensor, kernel: int, sigma: float) -> np.ndarray:
    """The documented blur, written out in float64 with SciPy instead of torchvision."""
    t = np.arange(kernel) - (kernel - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    g /= g.sum()
    # SciPy's "mirror" (dcb|abcd|cba) is torch's "reflect".
    planes = images.double().numpy()
    return ndimage.correlate(planes, np.outer(g, g)[None, None], mode="mirror")


def test_gaussian_blur_kernel_and_reflect_padding() -> None:
    torch.manual_seed(2)
    for dtype, atol in [(torch.float64, 1e-12), (torch.float32, 2e-6)]:
        images = torch.rand(2, 3, 16, 13, dtype=dtype)
        for kernel, sigma in [(11, 5.0), (5, 1.3), (3, 0.5), (1, 2.0)]:
            blurred = gaussian_blur(images, kernel, sigma)
            assert blurred.dtype == dtype and blurred.shape == images.shape
            expected = torch.from_numpy(_reference_blur(images, kernel, sigma)).to(dtype)
            torch.testing.assert_close(blurred, expected, atol=atol, rtol=0)
    with pytest.raises(ValueError, match="odd positive"):
        gaussian_blur(images, 4, 1.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        gaussian_blur(images, 3, 0.0)
    with pytest.raises(ValueError, match="at most 3"):
        gaussian_blur(torch.rand(1, 3, 2, 2), 11, 5.0)


def test_ranks_are_descending_with_raster_tie_break() -> None:
    maps = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]], [[[0.2, 0.2], [0.2, 0.2]]]])
    ranks = saliency_ranks(maps)
    assert ranks.tolist() == [[0, 1, 3, 2], [0, 1, 2, 3]]


def test_curve_auc_is_the_normalised_trapezoid() -> None:
    curves = torch.tensor([[1.0, 0.5, 0.0], [0.3, 0.3, 0.3], [0.0, 1.0, 0.0]])
    assert_values(curve_auc(curves), [0.5, 0.3, 0.5], atol=1e-7)
    with pytest.raises(ValueError, match="at least 2"):
        curve_auc(torch.ones(3, 1))


def reference_curves(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    steps: int,
    blur_kernel: int,
    blur_sigma: float,
    baseline: Tensor,
) -> dict[str, list[list[float]]]:
    """Plain loop: per image, per step, one state and one forward pass."""
    _, _, h, w = images.shape
    per_step = math.ceil(h * w / steps)
    curves: dict[str, list[list[float]]] = {"insertion": [], "deletion": []}
    for b in range(images.shape[0]):
        values = maps[b, 0].flatten().tolist()
        order = sorted(range(h * w), key=lambda i: (-values[i], i))
        image = images[b]
        blurred = gaussian_blur(images[b : b + 1], blur_kernel, blur_sigma)[0]
        full_baseline = torch.broadcast_to(baseline, images.shape)[b]
        for mode in ("insertion", "deletion"):
            start, finish = (blurred, image) if mode == "insertion" else (image, full_baseline)
            curve = []
            for k in range(steps + 1):
                state = start.clone()
                for flat in order[: min(k * per_step, h * w)]:
                    i, j = divmod(flat, w)
                    state[:, i, j] = finish[:, i, j]
                with torch.no_grad():
                    probs = torch.softmax(model(state.unsqueeze(0)).double(), dim=1)
                curve.append(probs[0, int(classes[b])].item())
            curves[mode].append(curve)
    return curves


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_curves_match_the_plain_loop(seed: int) -> None:
    model = small_cnn(seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, 4, 5, generator=generator, dtype=torch.float64)
    # Quantised maps have many ties, which exercises the tie-break.
    maps = torch.randint(0, 4, (3, 1, 4, 5), generator=generator).double() / 3
    classes = torch.randint(0, 3, (3,), generator=generator)
    zeros, per_channel = torch.zeros(()), torch.rand(3, 1, 1, generator=generator).double()
    # One step; 6 steps of ceil(20/6) = 4 pixels (the last one partial); more steps than
    # pixels. Chunks of 1, of sizes that split an image's states, and everything at once.
    configs = [(1, zeros, (1, None)), (6, per_channel, (1, 4, None)), (24, zeros, (7, None))]
    for steps, baseline, batch_sizes in configs:
        expected = reference_curves(model, images, maps, classes, steps, 3, 1.5, baseline)
        for batch_size in batch_sizes:
            out = insertion_deletion(
                model,
                images,
                maps,
                classes,
                steps=steps,
                blur_kernel=3,
                blur_sigma=1.5,
                deletion_baseline=baseline,
                batch_size=batch_size,
            )
            for mode in ("insertion", "deletion"):
                curve = out[f"{mode}_curve"]
                assert curve.shape == (3, steps + 1)
                assert_values(curve, expected[mode])
                torch.testing.assert_close(out[f"{mode}_auc"], curve_auc(curve))


def test_the_default_chunk_is_small_on_the_cpu_and_changes_no_curve() -> None:
    """``batch_size="auto"``: DEFAULT_CPU_BATCH_SIZE per forward pass on the CPU."""
    from opticam.metrics import DEFAULT_BATCH_SIZE, DEFAULT_CPU_BATCH_SIZE

    model = small_cnn(4)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(3, 3, 4, 5, generator=generator, dtype=torch.float64)
    maps = torch.rand(3, 1, 4, 5, generator=generator, dtype=torch.float64)
    classes = torch.tensor([0, 2, 1])
    kwargs = {"steps": 20, "blur_kernel": 3, "blur_sigma": 1.0}
    auto = insertion_deletion(model, images, maps, classes, **kwargs)  # type: ignore[arg-type]
    states = 3 * (20 + 1)
    assert DEFAULT_CPU_BATCH_SIZE < states < DEFAULT_BATCH_SIZE
    assert max(seen) == DEFAULT_CPU_BATCH_SIZE and sum(seen) == 2 * states
    seen.clear()
    whole = insertion_deletion(model, images, maps, classes, batch_size=None, **kwargs)  # type: ignore[arg-type]
    assert seen == [states, states]
    for key, value in whole.items():
        torch.testing.assert_close(auto[key], value)
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None"):
        insertion_deletion(model, images, maps, classes, batch_size="big", **kwargs)  # type: ignore[arg-type]


def test_permuting_the_batch_permutes_the_output() -> None:
    model = small_cnn(3)
    torch.manual_seed(3)
    images = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    maps = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    classes = torch.tensor([0, 1, 2, 1])
    perm = torch.tensor([2, 0, 3, 1])
    kwargs = {"steps": 9, "blur_kernel": 3, "blur_sigma": 1.0, "batch_size": 7}
    out = insertion_deletion(model, images, maps, classes, **kwargs)  # type: ignore[arg-type]
    permuted = insertion_deletion(model, images[perm], maps[perm], classes[perm], **kwargs)  # type: ignore[arg-type]
    for key, value in out.items():
        torch.testing.assert_close(permuted[key], value[perm])


def test_modes_defaults_and_errors() -> None:
    model = WeightedPixelModel(W).train()
    images = torch.ones(1, 3, 2, 2)
    out = insertion_deletion(model, images, MAP, torch.tensor([0]), steps=4, modes=("deletion",))
    assert set(out) == {"deletion_auc", "deletion_curve"}
    assert model.training
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        insertion_deletion(model, images, MAP, torch.tensor([0]), steps=0)
    with pytest.raises(ValueError, match="unknown modes"):
        insertion_deletion(model, images, MAP, torch.tensor([0]), modes=("insert",))
    with pytest.raises(ValueError, match="deletion_baseline"):
        insertion_deletion(
            model, images, MAP, torch.tensor([0]), steps=4, deletion_baseline=torch.zeros(2, 1, 1)
        )
    # The default protocol (224 steps, kernel 11, sigma 5) on a 16x16 image: 256 pixels
    # -> 2 per step, so the curve reaches the end at step 128 and stays there.
    model16 = small_cnn(4)
    torch.manual_seed(4)
    images16 = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    maps16 = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    out16 = insertion_deletion(model16, images16, maps16, torch.tensor([1]))
    curve = out16["deletion_curve"][0]
    assert curve.shape == (225,)
    assert torch.all(curve[128:] == curve[-1])
