"""Tests for opticam.demo: the synthetic dataset, its shards and the bundled classifier."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from opticam.demo import (
    CLASS_NAMES,
    DEMO_INPUT_SIZE,
    DEMO_TARGET_LAYER,
    NUM_CLASSES,
    generate_sample,
    load_model,
    make_shards,
)
from opticam.demo.model import DEMO_WEIGHTS
from opticam.demo.train import HELDOUT_SEED, TRAIN_SEED, VAL_SEED, evaluate, load_images

HELDOUT_COUNT = 500


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model()


@pytest.fixture(scope="module")
def heldout() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # JPEG at quality 95, exactly as make_shards stores the images.
    return load_images(HELDOUT_SEED, HELDOUT_COUNT, jpeg_quality=95)


def test_heldout_seed_is_unused_in_training() -> None:
    assert HELDOUT_SEED not in (TRAIN_SEED, VAL_SEED)


def test_heldout_accuracy_and_confidence(
    model: torch.nn.Module, heldout: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> None:
    images, labels, masks = heldout
    assert len(images) >= 500
    assert set(labels.tolist()) == set(range(NUM_CLASSES))
    results = evaluate(model, images, labels, masks)
    assert results["accuracy"] >= 0.95, results
    # Confident but not saturated, like an ImageNet classifier.
    assert 0.5 <= results["median_prob"] <= 0.95, results
    # Fake-CAM (one black pixel) must barely move the probability ...
    assert results["fakecam_mean_abs_change"] < 0.01, results
    # ... while blackening the background around the object keeps the class score,
    # which is what lets Opti-CAM find a mask that keeps or raises it.
    assert results["objectmask_median_ratio"] >= 0.95, results


def test_generate_sample_is_deterministic_and_seed_dependent() -> None:
    a = generate_sample(3, 11)
    b = generate_sample(3, 11)
    c = generate_sample(3, 12)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert a[1:3] == b[1:3]
    assert np.array_equal(a[3], b[3])
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_generate_sample_rejects_negative_arguments() -> None:
    with pytest.raises(ValueError, match="index"):
        generate_sample(-1, 0)
    with pytest.raises(ValueError, match="seed"):
        generate_sample(0, -5)


def test_boxes_are_tight_around_the_mask_and_inside_the_image() -> None:
    for index in range(100):
        image, label, (x0, y0, x1, y1), mask = generate_sample(index, 77)
        assert image.size == (DEMO_INPUT_SIZE, DEMO_INPUT_SIZE)
        assert image.mode == "RGB"
        assert 0 <= label < NUM_CLASSES
        assert mask.shape == (DEMO_INPUT_SIZE, DEMO_INPUT_SIZE) and mask.dtype == bool
        assert 0 <= x0 < x1 <= DEMO_INPUT_SIZE and 0 <= y0 < y1 <= DEMO_INPUT_SIZE
        ys, xs = np.nonzero(mask)
        # Contained, and tight: the mask touches all four sides of the box.
        assert xs.min() == x0 and xs.max() == x1 - 1
        assert ys.min() == y0 and ys.max() == y1 - 1
        # Objects are large enough to be recognisable: the radius is 17-32 pixels
        # (an arrow seen side-on is narrower than it is long).
        assert max(x1 - x0, y1 - y0) >= 28 and min(x1 - x0, y1 - y0) >= 12


def _tar_bytes(urls: list[str]) -> list[bytes]:
    return [Path(u).read_bytes() for u in urls]


def test_make_shards_is_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    first = make_shards(str(tmp_path / "a"), shards=2, per_shard=3, seed=5)
    second = make_shards(str(tmp_path / "b"), shards=2, per_shard=3, seed=5)
    other = make_shards(str(tmp_path / "c"), shards=2, per_shard=3, seed=6)
    assert [Path(u).name for u in first] == ["demo-000000.tar", "demo-000001.tar"]
    assert _tar_bytes(first) == _tar_bytes(second)
    assert all(x != y for x, y in zip(_tar_bytes(first), _tar_bytes(other), strict=True))


@pytest.mark.e2e
def test_make_shards_writes_the_same_bytes_to_s3(
    tmp_path: Path, s3_bucket: str, s3_storage_options: dict[str, Any]
) -> None:
    import fsspec

    local = make_shards(str(tmp_path), shards=1, per_shard=2, seed=3)
    remote = make_shards(
        f"{s3_bucket}/demo/", shards=1, per_shard=2, seed=3, storage_options=s3_storage_options
    )
    assert remote == [f"{s3_bucket}/demo/demo-000000.tar"]
    with fsspec.open(remote[0], "rb", **s3_storage_options) as handle:
        assert handle.read() == Path(local[0]).read_bytes()


def test_shard_members_match_the_generator(tmp_path: Path) -> None:
    urls = make_shards(str(tmp_path), shards=2, per_shard=2, seed=9)
    index = 0
    for url in urls:
        with tarfile.open(url) as tar:
            names = tar.getnames()
            keys = sorted({name.split(".", 1)[0] for name in names})
            assert len(keys) == 2
            for key in keys:
                image, label, box, _ = generate_sample(index, 9)
                assert key == f"{9:06d}-{index:08d}"
                member = tar.extractfile(f"{key}.json")
                assert member is not None
                meta = json.loads(member.read())
                assert meta == {
                    "label": label,
                    "class_name": CLASS_NAMES[label],
                    "boxes": [list(box)],
                }
                cls = tar.extractfile(f"{key}.cls")
                assert cls is not None and int(cls.read()) == label
                jpg = tar.extractfile(f"{key}.jpg")
                assert jpg is not None
                decoded = np.asarray(Image.open(io.BytesIO(jpg.read())).convert("RGB"))
                # JPEG at quality 95: close to the generated pixels, not equal.
                error = np.abs(decoded.astype(int) - np.asarray(image).astype(int)).mean()
                assert error < 6.0
                index += 1


def test_make_shards_rejects_bad_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per_shard"):
        make_shards(str(tmp_path), shards=1, per_shard=0, seed=0)


def test_load_model_is_eval_small_and_gives_finite_logits(model: torch.nn.Module) -> None:
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert DEMO_WEIGHTS.stat().st_size < 10 * 1024 * 1024
    x = torch.rand(3, 3, DEMO_INPUT_SIZE, DEMO_INPUT_SIZE)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (3, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    # The bundled state_dict has every parameter and buffer (strict load succeeded)
    # and a temperature that was actually set.
    assert float(model.get_buffer("temperature")) != 1.0


def test_load_model_reports_a_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="opticam.demo.train"):
        load_model(tmp_path / "missing.pt")


def test_target_layer_gives_a_relu_feature_grid(model: torch.nn.Module) -> None:
    layer = model.get_submodule(DEMO_TARGET_LAYER)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            model(torch.rand(2, 3, DEMO_INPUT_SIZE, DEMO_INPUT_SIZE))
    finally:
        handle.remove()
    (features,) = captured
    assert features.ndim == 4
    b, c, h, w = features.shape
    assert b == 2 and c >= 16 and (h, w) in {(8, 8), (16, 16)}
    assert (features >= 0).all()
