"""``run.json``: the job a run folder holds, its config without secrets, versions, shards.

A run folder holds exactly one job. :func:`check_run_json` refuses to mix: a folder whose
run.json describes another job, or was written with another schema version, raises
:class:`RunCollisionError` before anything is written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from opticam.errors import RunCollisionError, short_repr
from opticam.redact import redact_url
from opticam.store.layout import atomic_write_bytes, filesystem, invalidate, run_json_url
from opticam.store.tables import SCHEMA_VERSION

if TYPE_CHECKING:
    from opticam.config import RunConfig

__all__ = [
    "RunCollisionError",
    "check_run_json",
    "package_versions",
    "read_run_json",
    "write_run_json",
]


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes the results (absent ones omitted)."""
    import platform

    versions = {"python": platform.python_version()}
    for name in (
        "opticam",
        "torch",
        "torchvision",
        "grad-cam",
        "numpy",
        "pillow",
        "pyarrow",
        "webdataset",
        "fsspec",
        "s3fs",
        "prefect",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_run_json(
    run: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The run's ``run.json`` as a dict, or None when the run folder has none."""
    fs, path = filesystem(run_json_url(run), storage_options)
    invalidate(fs, path.rsplit("/", 1)[0])
    try:
        with fs.open(path, "rb") as f:
            return dict(json.loads(f.read().decode("utf-8")))
    except FileNotFoundError:
        return None


def check_run_json(
    run: str, config: RunConfig, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The existing run.json of ``run`` (None if absent), after checking it is this job.

    Raises:
        RunCollisionError: the folder holds a run.json of a different job, or one written
            with another schema version (its files could not be mixed with new ones).
    """
    existing = read_run_json(run, storage_options)
    if existing is None:
        return None
    version = str(existing.get("schema_version"))
    if version != SCHEMA_VERSION:
        raise RunCollisionError(
            f"run folder {short_repr(run)} was written with schema version {version}, this is "
            f"version {SCHEMA_VERSION}; refusing to mix them (its results stay readable: "
            "'opticam report' works on it). Use another output folder."
        )
    if existing.get("job") != config.job_description():
        raise RunCollisionError(
            f"run folder {short_repr(run)} already holds a different job (run id collision or a "
            f"hand-edited run.json); refusing to mix results. Existing job: "
            f"{json.dumps(existing.get('job'), sort_keys=True)}"
        )
    return existing


def write_run_json(
    run: str,
    config: RunConfig,
    shards: Sequence[Mapping[str, Any]],
    storage_options: Mapping[str, Any] | None = None,
    *,
    loaded_model: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<run>/run.json``: job, config (no secrets), versions, shards, schema version.

    An existing run.json of the same job is updated (shard list, versions, config of the
    latest invocation); its ``created`` time is kept.

    Args:
        run: run folder URL.
        config: the job; only :meth:`RunConfig.public_dict` (no storage options) is stored.
        shards: one mapping per planned shard (``url``, ``name``, ``max_images``).
        storage_options: fsspec options of the output.
        loaded_model: what the loaded model applies
            (:meth:`opticam.models.LoadedModel.description`: the normalization, sizes and
            layer the spec left to the model), stored as ``loaded_model``. Not part of
            the job, so not of the run id; None keeps what an earlier write stored.

    Raises:
        RunCollisionError: the folder holds a run.json of a different job.
    """
    existing = check_run_json(run, config, storage_options)
    job = config.job_description()
    now = _now()
    payload = {
        "schema_version": SCHEMA_VERSION,
        "run_id": config.run_id,
        "job": job,
        "config": config.public_dict(),
        "shards": [
            {**s, "url": redact_url(str(s["url"]))} if "url" in s else dict(s) for s in shards
        ],
        "versions": package_versions(),
        "created": (existing or {}).get("created", now),
        "updated": now,
    }
    described = loaded_model if loaded_model is not None else (existing or {}).get("loaded_model")
    if described is not None:
        payload["loaded_model"] = dict(described)
    data = json.dumps(payload, indent=2, sort_keys=True).encode("utf-8")
    atomic_write_bytes(run_json_url(run), data, storage_options)
    return payload
