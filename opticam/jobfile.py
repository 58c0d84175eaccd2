"""Jobs in files, as YAML or JSON.

``opticam run --config job.yaml`` reads one, ``opticam config --example`` writes a
commented one.

A job file holds the fields of :class:`opticam.config.RunConfig` as YAML or JSON (JSON is
YAML too). Storage options are not read from files on purpose: credentials belong in the
environment (or ``--storage-option`` for a one-off), never in a file that gets shared.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from opticam.config import OptiCAMOptions, RunConfig
from opticam.errors import UserError, short_repr

__all__ = ["SECRET_FIELDS", "example_yaml", "read_job_file"]

#: RunConfig fields that never come from a file (they may hold credentials).
SECRET_FIELDS = tuple(n for n, f in RunConfig.model_fields.items() if f.exclude)
_EXAMPLE_DATA = "s3://my-bucket/imagenet-val/shard-{000000..000049}.tar"


def read_job_file(path: str) -> dict[str, Any]:
    """The job in a YAML or JSON file, as a dict of :class:`RunConfig` fields.

    Raises:
        UserError: the file is missing or unreadable, is not a mapping, or holds storage
            options.
    """
    import fsspec
    import yaml

    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"job file {short_repr(path)} not found") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read job file {short_repr(path)}: {err}") from err
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        first = " ".join(str(err).split())
        raise UserError(f"job file {short_repr(path)} is not valid YAML/JSON: {first}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"job file {short_repr(path)} must hold a mapping of RunConfig fields, got {type(data).__name__}"
        )
    secret = sorted(set(data) & set(SECRET_FIELDS))
    if secret:
        raise UserError(
            f"job file {short_repr(path)} sets {', '.join(secret)}: credentials are not read from job "
            "files; use the environment (AWS_*), an instance role, or --storage-option"
        )
    return data


def _value(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float) and "e" in repr(value) and "." not in repr(value):
        # YAML 1.1 (PyYAML) reads "1e-10" as a string; "1.0e-10" is a float.
        mantissa, exponent = repr(value).split("e")
        return f"{mantissa}.0e{exponent}"
    return json.dumps(value)


def _fields(model: type[BaseModel], indent: str, skip: tuple[str, ...] = ()) -> list[str]:
    lines: list[str] = []
    for name, field in model.model_fields.items():
        if name in skip or field.exclude:
            continue
        if field.description:
            lines.append(f"{indent}# {field.description}")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{indent}{name}:")
            lines += _fields(annotation, indent + "  ")
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"{indent}{name}: {_value(default)}")
    return lines


def example_yaml() -> str:
    """A commented job file with every field at its default (``data`` as an example).

    It validates as it is; ``opticam run --config`` on it explains the example data with
    Opti-CAM (the paper's settings), Grad-CAM and Fake-CAM.
    """
    lines = [
        "# An opticam job: `opticam run --config job.yaml`; flags given next to --config",
        "# override what this file says. Credentials are never read from here: use the",
        "# environment (AWS_ACCESS_KEY_ID, ...), an instance role, or --storage-option.",
        "",
        f"# {RunConfig.model_fields['data'].description}",
        f"data: {_value(_EXAMPLE_DATA)}",
    ]
    body = _fields(RunConfig, "", skip=("data", "methods", "metrics"))
    insert_at = next(i for i, line in enumerate(body) if line.startswith("target:")) - 1
    methods = [
        f"# {RunConfig.model_fields['methods'].description}",
        "methods:",
        "  - name: opticam",
        "    # Opti-CAM's options, here at the paper's settings",
        "    options:",
        *_fields(OptiCAMOptions, "      "),
        "  - gradcam",
        "  - fakecam",
    ]
    metrics = [f"# {RunConfig.model_fields['metrics'].description}", "metrics:"]
    metrics += _fields(RunConfig.model_fields["metrics"].annotation, "  ")  # type: ignore[arg-type]
    lines += body[:insert_at] + methods + body[insert_at:] + metrics
    return "\n".join(lines) + "\n"
