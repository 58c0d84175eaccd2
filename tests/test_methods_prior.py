"""The class prior: built from explanations, reduced from parts, started from, stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import TinyNet, make_config
from torch import Tensor

from opticam.methods import OptiCAM, get_explainer
from opticam.methods.prior import PRIOR_FLOOR, ClassPrior, PriorError

torch.set_num_threads(1)

CHANNELS = 8  # TinyNet's feature maps
CLASSES = 5


def _images(seed: int, batch: int = 6) -> Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _prior(fallback: str = "mean") -> ClassPrior:
    return ClassPrior.empty(CLASSES, CHANNELS, model="tiny", layer="features", fallback=fallback)  # type: ignore[arg-type]


def _weights(seed: int, batch: int) -> Tensor:
    return torch.softmax(
        torch.randn(batch, CHANNELS, generator=torch.Generator().manual_seed(seed)), 1
    )


def test_opticam_returns_its_final_weights_and_they_give_its_map() -> None:
    model = TinyNet()
    explanation = OptiCAM(model, model.features, iterations=5)(_images(0), torch.arange(6) % 5)
    weights = explanation.channel_weights
    assert weights is not None and weights.shape == (6, CHANNELS)
    torch.testing.assert_close(weights.sum(1), torch.ones(6))
    # The map is the weights' combination of the (ReLU'd) features: u = log(weights).
    again = OptiCAM(model, model.features, iterations=0).explain_from(
        _images(0), torch.arange(6) % 5, torch.log(weights)
    )
    torch.testing.assert_close(again.saliency, explanation.saliency, rtol=1e-5, atol=1e-6)
    # An explanation updates a prior as its weights do.
    by_explanation, by_weights = _prior(), _prior()
    by_explanation.update(explanation, torch.arange(6) % 5)
    by_weights.update(weights, torch.arange(6) % 5)
    np.testing.assert_array_equal(by_explanation.sums, by_weights.sums)
    with pytest.raises(PriorError, match="no channel weights"):
        by_weights.update(get_explainer("fakecam", model)(_images(0)), torch.arange(6) % 5)


def test_the_prior_start_equals_an_explicit_u0_start() -> None:
    model = TinyNet()
    prior = _prior()
    prior.update(_weights(1, 10), torch.tensor([0, 1, 2, 3, 4] * 2))
    images, targets = _images(2), torch.tensor([0, 1, 2, 3, 4, 0])
    from_prior = OptiCAM(model, model.features, iterations=6, start="prior", prior=prior)(
        images, targets
    )
    # u0 = log(mean weights of the class + floor / K), centred: written out with NumPy here.
    means = prior.sums / prior.counts[:, None]
    u0 = np.log(means[targets.numpy()] + PRIOR_FLOOR / CHANNELS)
    u0 = torch.tensor(u0 - u0.mean(axis=1, keepdims=True), dtype=torch.float32)
    explicit = OptiCAM(model, model.features, iterations=6).explain_from(images, targets, u0)
    torch.testing.assert_close(from_prior.maps, explicit.maps)
    torch.testing.assert_close(from_prior.diagnostics["passes"], explicit.diagnostics["passes"])
    # And the prior's start is not the uniform one.
    uniform = OptiCAM(model, model.features, iterations=6)(images, targets)
    assert not torch.allclose(uniform.maps, from_prior.maps)


def test_a_prior_built_from_parts_equals_the_prior_of_all_images() -> None:
    weights, targets = (
        _weights(3, 40),
        torch.randint(0, CLASSES, (40,), generator=torch.Generator().manual_seed(3)),
    )
    whole = _prior()
    whole.update(weights, targets)
    parts = [_prior() for _ in range(3)]
    for part, rows in zip(parts, (slice(0, 7), slice(7, 25), slice(25, 40)), strict=True):
        part.update(weights[rows], targets[rows])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    np.testing.assert_array_equal(merged.counts, whole.counts)
    np.testing.assert_allclose(merged.sums, whole.sums, rtol=0, atol=1e-12)
    # The class weights are means of weights: each row sums to 1.
    seen = whole.counts > 0
    np.testing.assert_allclose(whole.class_weights()[seen].sum(1), 1.0)


@pytest.mark.parametrize("fallback", ["mean", "uniform"])
def test_unseen_classes_start_from_the_fallback(fallback: str) -> None:
    prior = _prior(fallback)
    prior.update(_weights(4, 4), torch.tensor([0, 0, 1, 2]))
    assert prior.seen(torch.tensor([0, 3])).tolist() == [True, False]
    u0 = prior.start(torch.tensor([3, 4, 0]))
    if fallback == "uniform":
        torch.testing.assert_close(u0[:2], torch.zeros(2, CHANNELS))
    else:
        # The mean of the seen classes' priors, each class once (class 0 has two images).
        means = prior.sums[:3] / prior.counts[:3, None]
        expected = np.log(means.mean(0) + PRIOR_FLOOR / CHANNELS)
        expected = torch.tensor(expected - expected.mean(), dtype=torch.float32)
        torch.testing.assert_close(u0[0], expected)
        torch.testing.assert_close(u0[1], expected)
    assert not torch.allclose(u0[2], u0[0])  # a seen class has its own start


def test_an_empty_prior_starts_everything_uniform() -> None:
    torch.testing.assert_close(_prior().start(torch.tensor([0, 4])), torch.zeros(2, CHANNELS))


def test_the_prior_round_trips_through_parquet_bytes_for_bytes() -> None:
    prior = _prior("uniform")
    prior.update(_weights(5, 12), torch.arange(12) % 4)
    data = prior.to_parquet_bytes()
    back = ClassPrior.from_parquet_bytes(data)
    assert (back.model, back.layer, back.fallback) == ("tiny", "features", "uniform")
    np.testing.assert_array_equal(back.sums, prior.sums)
    np.testing.assert_array_equal(back.counts, prior.counts)
    # The same values give the same bytes: a rerun rewrites an identical file.
    assert back.to_parquet_bytes() == data


def test_a_damaged_prior_file_is_a_clear_error() -> None:
    data = _prior().to_parquet_bytes()
    for bad in (b"", data[: len(data) // 2], b"PAR1" + b"x" * 40):
        with pytest.raises(PriorError, match="prior.parquet is not a readable class prior"):
            ClassPrior.from_parquet_bytes(bad, source="prior.parquet")


def test_a_prior_of_another_layer_model_or_width_names_both() -> None:
    prior = _prior()
    with pytest.raises(PriorError, match="8 channels, the layer has 16"):
        prior.check_fits(channels=16, layer="features")
    with pytest.raises(PriorError, match="layer 'features', this is 'layer4'"):
        prior.check_fits(channels=8, layer="layer4")
    with pytest.raises(PriorError, match="model 'tiny', this is 'demo'"):
        prior.check_fits(channels=8, model="demo", layer="features")
    prior.check_fits(channels=8, model="tiny", layer="features")
    # Used on a layer of another width, the explainer refuses before any step.
    wide = ClassPrior.empty(CLASSES, 16, model="tiny", layer="features")
    model = TinyNet()
    explainer = OptiCAM(model, model.features, iterations=3, start="prior", prior=wide)
    with pytest.raises(PriorError, match="16 channels, the layer has 8"):
        explainer(_images(6), torch.zeros(6, dtype=torch.long))


def test_start_prior_and_a_prior_go_together() -> None:
    model = TinyNet()
    with pytest.raises(ValueError, match="start='prior' needs a class prior"):
        OptiCAM(model, model.features, start="prior")
    with pytest.raises(ValueError, match="start is 'uniform', not 'prior'"):
        OptiCAM(model, model.features, prior=_prior())


def test_bad_updates_are_refused_with_their_shapes() -> None:
    prior = _prior()
    with pytest.raises(PriorError, match="do not fit a prior of 8 channels"):
        prior.update(torch.ones(2, 4) / 4, [0, 1])
    with pytest.raises(PriorError, match="a target outside 0..4"):
        prior.update(_weights(7, 2), [0, 5])
    assert prior.counts.sum() == 0  # nothing half-added


@pytest.mark.usefixtures("tiny_factory")
def test_a_run_with_the_prior_start_passes_the_checks_with_its_calibration_explainers(
    tmp_path,
) -> None:
    from opticam import pipeline

    config = make_config(
        str(tmp_path / "a.tar"),
        tmp_path / "runs",
        methods=[{"name": "opticam", "options": {"preset": "prior", "prior_per_class": 3}}],
    )
    pipeline.check_methods(config, "cpu")  # the prior itself is built by the run
    (spec,) = pipeline.prior.calibration_methods(config)
    assert spec.options == {}  # the paper's setting
    settings = pipeline.prior.prior_settings(config)
    assert settings is not None and (settings.per_class, settings.fallback) == (3, "uniform")
