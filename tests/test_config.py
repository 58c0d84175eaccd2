"""RunConfig: validation, the deterministic run id, and secrets kept out of every dump."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from opticam.config import MethodSpec, MetricsOptions, ModelSpec, RunConfig, normalize_url

SECRET = "SUPER-SECRET-VALUE-42"


def make(**changes: Any) -> RunConfig:
    fields: dict[str, Any] = {
        "data": "s3://bucket/imagenet-val/shard-{000000..000009}.tar",
        "methods": ["opticam", "gradcam"],
    }
    fields.update(changes)
    return RunConfig(**fields)


def test_run_id_is_slug_plus_hash_of_the_job_description() -> None:
    config = make()
    canonical = json.dumps(config.job_description(), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    assert config.run_id == f"imagenet-val-demo-{digest}"
    assert re.fullmatch(r"[a-z0-9-]+-[0-9a-f]{12}", config.run_id)


def test_run_id_is_stable_across_instances_and_json_round_trips() -> None:
    config = make(model=ModelSpec(source="torchvision:resnet50:IMAGENET1K_V2"))
    again = RunConfig.model_validate_json(config.model_dump_json())
    assert (
        again.run_id
        == config.run_id
        == make(model={"source": "torchvision:resnet50:IMAGENET1K_V2"}).run_id
    )
    assert config.run_id.startswith("imagenet-val-resnet50-")


@pytest.mark.parametrize(
    "changes",
    [
        {"data": "s3://bucket/imagenet-val/shard-{000000..000008}.tar"},
        {"model": {"source": "torchvision:resnet50:IMAGENET1K_V2"}},
        {"model": {"source": "demo", "target_layer": "features.3"}},
        {"methods": ["opticam"]},
        {"methods": ["opticam", "gradcampp"]},
        {"methods": [{"name": "opticam", "options": {"iterations": 50}}, "gradcam"]},
        {"target": "predicted"},
        {"metrics": {"steps": 32}},
        {"metrics": {"insertion_deletion": False}},
        {"maps": "full_png"},  # the version 1 spelling of map_format
        {"map_format": "full_png"},
        {"max_images": 100},
    ],
)
def test_run_id_changes_with_what_the_job_computes(changes: dict[str, Any]) -> None:
    assert make(**changes).run_id != make().run_id


@pytest.mark.parametrize(
    "changes",
    [
        {"output": "s3://elsewhere/runs"},
        {"device": "cpu"},
        {"device": "cuda:1"},
        {"batch_size": 32},
        {"storage_options": {"key": "AKIA", "secret": SECRET}},
        {"data_storage_options": {"anon": True}},
        {"output_storage_options": {"client_kwargs": {"endpoint_url": "http://minio:9000"}}},
        {"methods": ["gradcam", "opticam"]},  # same methods, other order
    ],
)
def test_run_id_ignores_how_the_job_runs(changes: dict[str, Any]) -> None:
    assert make(**changes).run_id == make().run_id


@pytest.mark.parametrize(
    ("compile_option", "run_id"),
    [
        # The run ids these jobs had before compile=auto became the default.
        ({}, "imagenet-val-demo-45d77f48d3c7"),
        ({"compile": False}, "imagenet-val-demo-45d77f48d3c7"),
        ({"compile": "auto"}, "imagenet-val-demo-45d77f48d3c7"),
        ({"compile": True}, "imagenet-val-demo-2e1124258988"),
    ],
)
def test_compile_keeps_the_run_ids_of_jobs_from_before(
    compile_option: dict[str, Any], run_id: str
) -> None:
    """compile changes how Opti-CAM computes (rounding only): auto, the new default, hashes
    as false did, and true as it did."""
    methods = [{"name": "opticam", "options": compile_option}, "gradcam"]
    assert make(methods=methods).run_id == run_id


@pytest.mark.parametrize("batch_size", [7, 1, "auto"])
def test_batch_size_is_part_of_the_run_id_of_a_job_with_opticam(batch_size: int | str) -> None:
    """Opti-CAM's maps depend on the images batched together (benchmarks/opticam_batch.py):
    a run resumed with another batch size must not mix them into one folder."""
    assert make(batch_size=batch_size).run_id != make().run_id
    assert make(batch_size=batch_size).job_description()["batch_size"] == batch_size
    # Baselines' maps move by float rounding only: their jobs keep one run id.
    baselines = {"methods": ["gradcam", "scorecam", "fakecam"]}
    assert make(batch_size=batch_size, **baselines).run_id == make(**baselines).run_id
    # The default stays out: jobs from before keep their run id.
    assert "batch_size" not in make().job_description()


def test_local_paths_hash_the_same_relative_or_absolute(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    relative = RunConfig(data="shards/a-*.tar")
    absolute = RunConfig(data=f"{tmp_path}/shards/a-*.tar")
    file_url = RunConfig(data=f"file://{tmp_path}/shards/a-*.tar")
    assert relative.run_id == absolute.run_id == file_url.run_id
    assert normalize_url("s3://b/x.tar") == "s3://b/x.tar"


def test_a_list_of_shards_is_a_set() -> None:
    a = RunConfig(data=["s3://b/d/1.tar", "s3://b/d/0.tar"])
    b = RunConfig(data=["s3://b/d/0.tar", "s3://b/d/1.tar"])
    assert a.run_id == b.run_id
    assert a.run_id != RunConfig(data=["s3://b/d/0.tar"]).run_id


def test_methods_accept_plain_names_and_comma_strings() -> None:
    config = make(methods="opticam, GradCAM,fakecam")
    assert [m.name for m in config.methods] == ["opticam", "gradcam", "fakecam"]
    assert config.methods[0] == MethodSpec(name="opticam")
    assert MethodSpec.model_validate("scorecam").name == "scorecam"


def test_unknown_method_error_lists_the_known_ones() -> None:
    with pytest.raises(ValidationError) as info:
        make(methods=["gradcam+"])
    message = str(info.value)
    assert "unknown method 'gradcam+'" in message
    assert "opticam" in message and "fakecam" in message


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"methods": ["gradcam", "gradcam"]}, "repeated: gradcam"),
        ({"methods": []}, "at least one method"),
        ({"device": "gpu"}, "unknown device 'gpu'"),
        ({"target": "truth"}, "label"),
        ({"batch_size": 0}, "greater than or equal to 1"),
        ({"max_images": 0}, "greater than or equal to 1"),
        ({"data": []}, "non-empty"),
        ({"data": "  "}, "non-empty"),
        ({"metrics": {"blur_kernel": 4}}, "odd"),
        ({"executor": "kubernetes"}, "local"),
        ({"colour": "red"}, "Extra inputs"),
        ({"methods": [{"name": "opticam", "options": {"f": 1}}]}, "unknown option(s) 'f'"),
        ({"methods": [{"name": "opticam", "options": {"lr": object()}}]}, "lr: Input should be"),
        ({"methods": [{"name": "opticam", "options": {"iterations": -1}}]}, "iterations"),
        ({"methods": [{"name": "opticam", "options": {"score": "odds"}}]}, "unknown score"),
        ({"methods": [{"name": "gradcam", "options": {"iterations": 3}}]}, "'iterations'"),
        ({"methods": [{"name": "fakecam", "options": {"batch_size": 3}}]}, "accepted: none"),
    ],
)
def test_bad_values_are_rejected_with_a_useful_message(
    changes: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        make(**changes)


def test_deployments_executor_needs_a_pool_and_keeps_the_run_id() -> None:
    with pytest.raises(ValidationError, match="executor 'deployments' needs pool"):
        make(executor="deployments")
    with pytest.raises(ValidationError, match="pool must be a work pool name"):
        make(executor="deployments", pool="gpu pool; rm -rf /")
    cluster = make(executor="deployments", pool="gpu", max_in_flight=8, shard_attempts=2)
    # Where and how shards run is not what they compute: same run folder.
    assert cluster.run_id == make().run_id
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        make(executor="deployments", pool="gpu", max_in_flight=0)


def test_devices_are_normalized() -> None:
    assert make(device="CUDA:0").device == "cuda:0"
    assert make(device="auto").device == "auto"


def test_storage_options_never_leave_the_object() -> None:
    config = make(
        storage_options={"key": "AKIA", "secret": SECRET},
        data_storage_options={"token": SECRET},
        output_storage_options={"client_kwargs": {"aws_secret_access_key": SECRET}},
    )
    assert SECRET not in json.dumps(config.public_dict())
    assert SECRET not in config.model_dump_json()
    assert SECRET not in str(config.model_dump())
    assert SECRET not in repr(config)
    assert SECRET not in json.dumps(config.job_description())
    assert SECRET not in config.run_id
    # ... but they are there for the code that needs them.
    assert config.data_options() == {"key": "AKIA", "secret": SECRET, "token": SECRET}
    assert config.output_options()["client_kwargs"]["aws_secret_access_key"] == SECRET
    assert config.output_options()["secret"] == SECRET


def test_fastapi_encoder_used_by_prefect_for_parameters_drops_secrets() -> None:
    from fastapi.encoders import jsonable_encoder

    config = make(storage_options={"secret": SECRET})
    assert SECRET not in json.dumps(jsonable_encoder({"config": config}))


def test_metrics_defaults_follow_the_paper() -> None:
    metrics = MetricsOptions()
    assert metrics.steps == 224 and metrics.insertion_deletion and metrics.localization
    assert make().target == "label"
    assert make().output == "./opticam-runs"
    assert [m.name for m in RunConfig(data="x.tar").methods] == ["opticam", "gradcam", "fakecam"]


def test_config_is_a_valid_flow_parameter_schema() -> None:
    schema = RunConfig.model_json_schema()
    assert "data" in schema["properties"]
    assert schema["required"] == ["data"]
    assert not any("storage_options" in name for name in schema["properties"])


def _signature_defaults(cls: type) -> dict[str, Any]:
    import inspect

    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_option_models_match_the_methods_they_configure() -> None:
    """The config's option defaults are the methods' own (the CLI shows the former)."""
    from opticam.config import CAMOptions, OptiCAMOptions
    from opticam.methods import GradCAMBaseline, OptiCAM
    from opticam.names import OPTICAM_SCHEDULE

    # Opti-CAM's options are declared once, by the pydantic model the explainer takes.
    assert set(OptiCAM.options) | {"relu_features"} == set(OptiCAMOptions.model_fields)
    for name, value in OPTICAM_SCHEDULE.items():
        assert OptiCAMOptions.model_fields[name].default == value, name
    signature = _signature_defaults(GradCAMBaseline)
    assert set(CAMOptions.model_fields) == set(GradCAMBaseline.options) | {"relu_features"}
    for name in GradCAMBaseline.options:
        assert CAMOptions.model_fields[name].default == signature[name], name


def test_options_equal_to_their_defaults_do_not_change_the_run_id() -> None:
    plain = make(methods=["opticam", "gradcam"])
    spelled = make(
        methods=[
            {"name": "opticam", "options": {"iterations": 100, "lr": 0.1, "objective": "mask"}},
            {"name": "gradcam", "options": {"batch_size": 32}},
        ]
    )
    assert spelled.run_id == plain.run_id
    assert (
        make(methods=[{"name": "opticam", "options": {"lr": 0.2}}]).run_id
        != make(methods=["opticam"]).run_id
    )


def test_options_are_stored_with_their_checked_types() -> None:
    # A YAML file gives "1e-10" as a string; the option is a float from then on.
    spec = MethodSpec(name="opticam", options={"tolerance": "1e-10", "iterations": 5})
    assert spec.options == {"tolerance": 1e-10, "iterations": 5}
    assert isinstance(spec.options["tolerance"], float)


def test_the_version_1_field_name_maps_is_still_accepted() -> None:
    assert make(maps="full_png").map_format == "full_png"
    assert make(maps="full_png").run_id == make(map_format="full_png").run_id


def test_max_pixels_changes_the_run_id_only_when_changed() -> None:
    from opticam.config import DEFAULT_MAX_PIXELS

    assert make(max_pixels=DEFAULT_MAX_PIXELS).run_id == make().run_id
    assert make(max_pixels=1000).run_id != make().run_id


def test_a_checkpoint_or_hf_folder_spelled_two_ways_is_one_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vit").mkdir()
    (tmp_path / "ckpt.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    spellings = [
        {"source": "hf:vit", "checkpoint": "ckpt.pt"},
        {"source": "hf:./vit/", "checkpoint": "./ckpt.pt"},
        {"source": f"hf:{tmp_path}/vit", "checkpoint": f"{tmp_path}/ckpt.pt"},
        {"source": f"hf:{tmp_path}//vit", "checkpoint": f"file://{tmp_path}/x/../ckpt.pt"},
    ]
    ids = {make(model=model).run_id for model in spellings}
    assert len(ids) == 1
    # A Hub id is a name, not a path: it stays as written; other files are other models.
    assert make(model={"source": "hf:google/vit-base"}).run_id not in ids
    assert make(model={"source": "hf:vit", "checkpoint": "other.pt"}).run_id not in ids
    hub = make(model={"source": "hf:google/vit-base"}).model.job_dict()["source"]
    assert hub == "hf:google/vit-base"
