"""opticam.pipeline.plan: the shard plan, the model cache, the methods' check, what is left."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny

from opticam import pipeline
from opticam.data import NoShardsError
from opticam.demo import make_shards
from opticam.errors import ConfigError, UserError

# ``factory:tiny:build`` resolves to the suite's TinyNet (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("tiny_factory")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return make_shards(str(tmp_path_factory.mktemp("demo")), 2, 5, seed=3)


make_config = tiny.make_config


def test_plan_spreads_max_images_over_shards(shards: list[str], tmp_path: Path) -> None:
    plan = pipeline.plan_shards(make_config(shards, tmp_path, max_images=3))
    assert [p["max_images"] for p in plan] == [2, 1]
    assert [p["url"] for p in plan] == shards
    only_one = pipeline.plan_shards(make_config(shards, tmp_path, max_images=1))
    assert [p["url"] for p in only_one] == shards[:1]
    assert all(p["max_images"] is None for p in pipeline.plan_shards(make_config(shards, tmp_path)))
    with pytest.raises(NoShardsError):
        pipeline.plan_shards(make_config(str(tmp_path / "none-*.tar"), tmp_path))


def test_models_are_cached_per_spec_and_device(tmp_path: Path) -> None:
    config = make_config("x.tar", tmp_path)
    first = pipeline.get_loaded_model(config, "cpu")
    assert pipeline.get_loaded_model(config.model_copy(update={"batch_size": 1}), "cpu") is first
    other = make_config(
        "x.tar",
        tmp_path,
        model={"source": "factory:tiny:build", "target_layer": "features.0"},
    )
    assert pipeline.get_loaded_model(other, "cpu") is not first


def test_bad_method_options_fail_in_the_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown option.*'lr0' for method 'opticam'"):
        make_config("x.tar", tmp_path, methods=[{"name": "opticam", "options": {"lr0": 1}}])
    with pytest.raises(ValueError, match="unknown objective 'max'"):
        make_config(
            "x.tar", tmp_path, methods=[{"name": "opticam", "options": {"objective": "max"}}]
        )


def test_check_methods_turns_a_bad_model_spec_into_a_config_error(tmp_path: Path) -> None:
    config = make_config(
        "x.tar", tmp_path, model={"source": "factory:tiny:build", "target_layer": "nope"}
    )
    with pytest.raises(ConfigError, match="nope"):
        pipeline.check_methods(config, "cpu")
    missing = make_config(
        "x.tar",
        tmp_path,
        model={"source": "factory:tiny:build", "checkpoint": str(tmp_path / "absent.pt")},
    )
    with pytest.raises(UserError, match="absent.pt"):
        pipeline.check_methods(missing, "cpu")


def test_pending_shards_skips_done_ones(shards: list[str], tmp_path: Path) -> None:
    config = make_config(shards, tmp_path, methods=["fakecam"])
    plan = pipeline.plan_shards(config)
    pipeline.process_shard(config, shards[1], "cpu")
    assert [p["url"] for p in pipeline.pending_shards(config, plan)] == [shards[0]]
    assert pipeline.done_status(config, shards[1]).skipped
