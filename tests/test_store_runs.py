"""opticam.store.runs: run.json keeps no secret, refuses another job and an older schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from store_rows import _write_version_1_run

from opticam import store
from opticam.config import RunConfig

SECRET = "SUPER-SECRET-VALUE-42"


def test_run_json_has_no_secrets_and_refuses_another_job(tmp_path: Path) -> None:
    config = RunConfig(
        data="s3://b/d/shard-{0..3}.tar",
        output=str(tmp_path),
        storage_options={"key": "AKIA", "secret": SECRET},
    )
    run = store.run_url(config.output, config.run_id)
    shards = [{"url": "s3://b/d/shard-0.tar", "name": "shard-0-x", "max_images": None}]
    first = store.write_run_json(run, config, shards)
    text = (Path(run) / "run.json").read_text()
    assert SECRET not in text and "AKIA" not in text
    saved = json.loads(text)
    assert saved["run_id"] == config.run_id
    assert saved["schema_version"] == store.SCHEMA_VERSION
    assert saved["job"] == config.job_description()
    assert saved["shards"] == shards
    assert "torch" in saved["versions"] and "pyarrow" in saved["versions"]

    assert "loaded_model" not in saved

    # What the loaded model applied is recorded next to the job, never in it.
    applied = {"source": "factory:m:f", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    store.write_run_json(run, config, shards, loaded_model=applied)
    saved = json.loads((Path(run) / "run.json").read_text())
    assert saved["loaded_model"] == applied
    assert saved["job"] == config.job_description() and saved["run_id"] == config.run_id

    # Same job on another device: allowed, creation time kept.
    again = config.model_copy(update={"device": "cuda:1"})
    second = store.write_run_json(run, again, shards)
    assert second["created"] == first["created"]
    assert json.loads((Path(run) / "run.json").read_text())["config"]["device"] == "cuda:1"
    # A write without it keeps what was recorded.
    assert json.loads((Path(run) / "run.json").read_text())["loaded_model"] == applied

    other = RunConfig(data="s3://b/d/shard-{0..2}.tar", output=str(tmp_path))
    with pytest.raises(store.RunCollisionError, match="different job"):
        store.write_run_json(run, other, shards)
    assert store.read_run_json(str(tmp_path / "nothing")) is None


def test_a_version_1_run_folder_is_never_resumed(tmp_path: Path) -> None:
    run = tmp_path / "old-run"
    _write_version_1_run(run, [])
    config = RunConfig(data="x.tar", output=str(tmp_path))
    with pytest.raises(store.RunCollisionError, match="schema version 1, this is version 4"):
        store.check_run_json(str(run), config)
    assert json.loads((run / "run.json").read_text())["schema_version"] == "1"  # untouched
