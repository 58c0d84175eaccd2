"""The files that run opticam remotely: deployments/, docker/ and .dockerignore.

Nothing here needs Docker, a Prefect server or the network. Each file is read and checked
with the loaders and validators Prefect itself uses (flow entrypoints, the server's
parameter and job-template validation, cron schedules), and against the repository: every
file the image copies exists and is in the build context, and the copied files are
enough to build the wheel.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
TEMPLATES = ROOT / "deployments" / "templates"
TEMPLATE_NAMES = ["process", "docker", "kubernetes"]
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# (flow name, deployment name) -> work pool; `opticam deploy --pool gpu` creates the same
# names: shards on the GPU pool, the parent on its control pool.
EXPECTED_DEPLOYMENTS = {
    ("explain-shard", "gpu"): "gpu",
    ("explain-dataset", "gpu"): "gpu-control",
    ("explain-dataset", "nightly"): "gpu-control",
}
WORKER_IMAGE = "opticam-worker"
HEARTBEAT = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


# --------------------------------------------------------------------------- helpers


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _deployments() -> list[dict[str, Any]]:
    deployments: list[dict[str, Any]] = _load_yaml(PREFECT_YAML)["deployments"]
    return deployments


def _load_flow(entrypoint: str) -> Any:
    from prefect.flows import load_flow_from_entrypoint

    # No placeholder: an entrypoint that does not import must fail here, not on a worker.
    return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)


def _openapi_schema(flow: Any) -> dict[str, Any]:
    from prefect.utilities.callables import parameter_schema

    schema: dict[str, Any] = parameter_schema(flow).model_dump_for_openapi()
    return schema


def _template(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((TEMPLATES / f"{name}.json").read_text(encoding="utf-8"))
    return doc


def _placeholders(value: Any) -> set[str]:
    from prefect.utilities.templating import find_placeholders

    return {p.name for p in find_placeholders(value)}


def _image_tag(image: str) -> str | None:
    """The tag of an image reference (``None`` without one); a digest counts as a tag."""
    if "@sha256:" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def _is_pinned(image: str) -> bool:
    tag = _image_tag(image)
    return tag is not None and tag != "latest" and "$" not in image


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def _exec_form(args: str) -> list[str]:
    """The words of a Dockerfile command, JSON (exec) form or shell form."""
    if args.startswith("["):
        words: list[str] = json.loads(args)
        return words
    return shlex.split(args)


def _copy_sources(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(source, destination) of every COPY/ADD from the build context."""
    pairs: list[tuple[str, str]] = []
    for keyword, args in instructions:
        if keyword not in ("COPY", "ADD"):
            continue
        words = _exec_form(args)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue  # from another stage or image, not from the repository
        paths = [w for w in words if not w.startswith("--")]
        pairs.extend((source, paths[-1]) for source in paths[:-1])
    return pairs


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _excluded(relpath: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``relpath`` out of the build context.

    The subset of Docker's rules that this repository's file uses: the last matching
    pattern wins, ``!`` re-includes, a matched folder takes its contents with it, and
    ``**/name`` matches ``name`` at any depth.
    """
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = (pattern[1:] if negate else pattern).strip("/")
        if body.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(part, body[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, body) for prefix in prefixes)
        if hit:
            excluded = not negate
    return excluded


def _walk(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (dotted key path, scalar value) in a parsed YAML/JSON document."""
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _walk(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _walk(v, f"{path}[{i}]")]
    return [(path, value)]


# --------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_names_the_deployments_opticam_deploy_creates() -> None:
    from prefect import Flow

    found: dict[tuple[str, str], str] = {}
    for deployment in _deployments():
        flow = _load_flow(deployment["entrypoint"])
        assert isinstance(flow, Flow), deployment["entrypoint"]
        found[(flow.name, deployment["name"])] = deployment["work_pool"]["name"]
    assert found == EXPECTED_DEPLOYMENTS


def test_prefect_yaml_entrypoints_are_module_paths() -> None:
    # The installed package is the code: no file path relative to a checkout.
    for deployment in _deployments():
        module, _, function = deployment["entrypoint"].partition(":")
        assert function.isidentifier(), deployment["entrypoint"]
        assert not module.endswith(".py") and "/" not in module, deployment["entrypoint"]


def test_prefect_yaml_has_no_build_push_or_pull_steps() -> None:
    doc = _load_yaml(PREFECT_YAML)
    assert not doc.get("build") and not doc.get("push")
    # Explicitly empty: a missing `pull` makes `prefect deploy` add a step that changes
    # into the directory it ran in, which a worker host does not have.
    assert doc["pull"] == []
    for deployment in _deployments():
        for key in ("build", "push", "pull"):
            assert not deployment.get(key), (deployment["name"], key)


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"source": "timm:resnet18", "interpolation": "bicubic", "resize_mode": "squash"},
        {"source": "hf:org/name", "input_size": 64, "mean": [0.5, 0.5, 0.5], "relu_features": True},
    ],
    ids=["defaults", "timm", "hf"],
)
def test_shard_run_parameters_pass_the_server_schema(model: dict[str, Any]) -> None:
    """What the parent submits per shard (every config field, unset ones included)."""
    from prefect.utilities.schema_tools.validation import validate

    from opticam.config import RunConfig
    from opticam_flows.cluster import child_config
    from opticam_flows.explain import explain_dataset, explain_shard

    config = RunConfig(
        data="s3://bucket/ds/shard-000000.tar",
        output="s3://bucket/runs",
        executor="deployments",
        pool="gpu",
        model=model,
        methods=["opticam", {"name": "gradcam"}],
    )
    parameters = {"config": child_config(config), "shard_url": "s3://bucket/ds/shard-000000.tar"}
    validate(parameters, _openapi_schema(explain_shard), raise_on_error=True)
    validate(
        {"config": parameters["config"]}, _openapi_schema(explain_dataset), raise_on_error=True
    )


def test_deployment_parameters_pass_the_flow_and_the_server() -> None:
    from prefect.utilities.schema_tools.validation import validate

    from opticam.config import RunConfig

    shard_pools = {d["work_pool"]["name"] for d in _deployments() if "shard" in d["entrypoint"]}
    checked = 0
    for deployment in _deployments():
        parameters = deployment.get("parameters")
        if not parameters:
            continue
        flow = _load_flow(deployment["entrypoint"])
        # What the flow does with them (pydantic, RunConfig's own validators) ...
        flow.validate_parameters(parameters)
        # ... and what the server checks first: the flow's JSON schema, required fields
        # included, as when a scheduled run is created.
        validate(parameters, _openapi_schema(flow), raise_on_error=True)
        config = RunConfig.model_validate(parameters["config"])
        assert config.executor == "deployments"
        assert config.pool in shard_pools, "the parent must submit to the shard deployment's pool"
        checked += 1
    assert checked >= 1


def test_schedules_are_valid_crons() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    crons = []
    for deployment in _deployments():
        for schedule in deployment.get("schedules") or []:
            crons.append(
                CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone", "UTC"))
            )
    assert crons, "the nightly example has a cron schedule"


def test_nightly_data_pattern_is_a_growing_s3_brace_pattern() -> None:
    from opticam.data.urls import expand_braces

    (nightly,) = [d for d in _deployments() if d.get("schedules")]
    data = nightly["parameters"]["config"]["data"]
    assert data.startswith("s3://")
    names = expand_braces(data)
    assert len(names) > 1, "a brace pattern"
    # Every name a brace expands to must exist, so a growing dataset needs a glob in it.
    assert all("*" in name for name in names)


# --------------------------------------------------------------------------- job templates


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_job_template_is_valid_for_the_server(name: str) -> None:
    from prefect.server.schemas.actions import validate_base_job_template

    template = _template(name)
    assert set(template) == {"job_configuration", "variables"}
    validate_base_job_template(template)  # what the server runs when a pool is created
    # Stricter than the server: every placeholder, of any kind, is a variable.
    used = _placeholders(template["job_configuration"])
    assert used <= set(template["variables"]["properties"]), used - set(
        template["variables"]["properties"]
    )


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_job_template_defaults_fit_their_schema(name: str) -> None:
    import jsonschema

    variables = _template(name)["variables"]
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_job_templates_turn_heartbeats_on(name: str) -> None:
    env = _template(name)["variables"]["properties"]["env"]
    assert env["default"][HEARTBEAT] == "30"
    assert "{{ env }}" in json.dumps(_template(name)["job_configuration"])


def test_kubernetes_template_requests_a_gpu() -> None:
    template = _template("kubernetes")
    variables = template["variables"]["properties"]
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert _placeholders(gpus) == {"gpu_count"} and variables["gpu_count"]["default"] >= 1
    assert _placeholders(pod["nodeSelector"]) == {"node_selector"}
    assert _placeholders(pod["tolerations"]) == {"tolerations"}
    assert variables["image"]["default"].split(":")[0] == WORKER_IMAGE
    # Credentials from a Secret by reference; nothing secret in the template itself.
    (source,) = container["envFrom"]
    assert _placeholders(source["secretRef"]["name"]) == {"storage_secret_name"}


def test_docker_template_requests_a_gpu() -> None:
    variables = _template("docker")["variables"]["properties"]
    (request,) = variables["container_create_kwargs"]["default"]["device_requests"]
    assert request["driver"] == "nvidia"
    assert ["gpu"] in request["capabilities"]
    assert request.get("count", 0) >= 1 or request.get("device_ids")
    assert variables["image"]["default"].split(":")[0] == WORKER_IMAGE
    # A locally built :latest image must not be pulled from a registry.
    assert variables["image_pull_policy"]["default"] == "IfNotPresent"


# --------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = _load_yaml(COMPOSE)
    return doc


def _build_context(build: Any) -> tuple[Path, Path]:
    if isinstance(build, str):
        context, dockerfile = build, "Dockerfile"
    else:
        context, dockerfile = build.get("context", "."), build.get("dockerfile", "Dockerfile")
    base = (COMPOSE.parent / context).resolve()
    return base, base / dockerfile


def test_compose_builds_exist_and_images_are_pinned() -> None:
    services = _compose()["services"]
    built = set()
    for name, service in services.items():
        assert service.get("image"), f"{name}: no image"
        if "build" in service:
            context, dockerfile = _build_context(service["build"])
            assert (context / "pyproject.toml").is_file(), f"{name}: context is not the repo root"
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            built.add(service["image"].split(":")[0])
        else:
            assert _is_pinned(service["image"]), f"{name}: {service['image']} is not pinned"
    assert built == {WORKER_IMAGE}


def test_compose_worker_gets_gpus_and_waits_for_the_server() -> None:
    services = _compose()["services"]
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "server" in worker["depends_on"]
    assert worker["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    command = " ".join(worker.get("command", []))
    assert command.startswith("opticam worker --pool")
    assert worker["environment"]["PREFECT_API_URL"].endswith(":4200/api")


def test_compose_deploys_and_serves_the_control_pool() -> None:
    services = _compose()["services"]
    deploy = " ".join(services["deploy"]["command"])
    assert deploy.startswith("opticam deploy --pool ")
    pool = deploy.split("--pool ", 1)[1].split()[0]
    control = services["control-worker"]["command"]
    assert control[:3] == ["prefect", "worker", "start"]
    assert control[control.index("--pool") + 1] == f"{pool}-control"
    assert "deploy" not in services["control-worker"]  # no GPU for the parent


def test_compose_server_uses_postgres_and_the_image_prefect_version() -> None:
    services = _compose()["services"]
    server = services["server"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    (arg,) = [a for k, a in _dockerfile_instructions(_dockerfile()) if k == "ARG"]
    version = arg.split("=", 1)[1]
    tag = _image_tag(server["image"])
    assert tag is not None and tag.startswith(f"{version}-"), (server["image"], version)


def test_compose_publishes_ports_on_loopback_only() -> None:
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def test_dockerfile_base_image_is_pinned() -> None:
    bases = [args.split()[0] for k, args in _dockerfile_instructions(_dockerfile()) if k == "FROM"]
    assert bases
    for image in bases:
        assert _is_pinned(image), image


def test_dockerfile_runs_as_a_user_that_is_not_root() -> None:
    users = [args for k, args in _dockerfile_instructions(_dockerfile()) if k == "USER"]
    assert users, "no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_starts_opticam_worker() -> None:
    instructions = _dockerfile_instructions(_dockerfile())
    words = [w for k, a in instructions if k in ("ENTRYPOINT", "CMD") for w in _exec_form(a)]
    # Follow a script the image copies in and starts.
    copied = {dest: source for source, dest in _copy_sources(instructions)}
    text = " ".join(words)
    for word in words:
        if word in copied:
            text += "\n" + (ROOT / copied[word]).read_text(encoding="utf-8")
    assert re.search(r"\bopticam worker --pool\b", text), text
    assert "OPTICAM_POOL" in text


def test_dockerfile_copies_only_what_exists_and_the_context_keeps() -> None:
    patterns = _dockerignore_patterns()
    sources = [s for s, _ in _copy_sources(_dockerfile_instructions(_dockerfile()))]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not _excluded(source, patterns), f"COPY {source}: excluded by .dockerignore"


def test_dockerfile_copies_what_the_build_reads() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    sources = {s.strip("/") for s, _ in _copy_sources(_dockerfile_instructions(_dockerfile()))}
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= sources
    folders = pyproject["tool"]["setuptools"]["package-dir"]
    for package in pyproject["tool"]["setuptools"]["packages"]:
        top = package.split(".")[0]
        assert folders.get(top, top) in sources, package


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = _dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".git/config",
        "opticam-runs/x/run.json",
        ".env",
        "opticam.egg-info/PKG-INFO",
        "tests/conftest.py",
        "opticam/__pycache__/cli.cpython-311.pyc",
    ):
        assert _excluded(path, patterns), path
    assert not _excluded("opticam/demo/demo_classifier.pt", patterns)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built offline from exactly what the image copies."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    patterns = _dockerignore_patterns()
    context = tmp_path / "context"
    for source, _ in _copy_sources(_dockerfile_instructions(_dockerfile())):
        origin = ROOT / source
        files = (
            [origin] if origin.is_file() else sorted(p for p in origin.rglob("*") if p.is_file())
        )
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if _excluded(rel, patterns):
                continue
            target = context / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    out = tmp_path / "wheel"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "-w",
            str(out),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (built,) = out.glob("opticam-*.whl")
    return built


@pytest.mark.e2e
def test_copied_files_are_enough_to_build_the_wheel(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    # setuptools only warns about a missing readme; the description would be empty.
    (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = archive.read(metadata_name).decode()
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[0]
    assert readme in metadata, "README.md is the package's long description"
    # The flows/ folder installs as opticam_flows, and nothing else sits at the top level.
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"opticam", "opticam_flows"}, tops
    for needed in (
        "opticam_flows/explain.py",
        "opticam/cli/main.py",
        "opticam/demo/demo_classifier.pt",
        "opticam/report/templates/index.html.j2",
    ):
        assert needed in names, needed


def test_the_package_list_names_every_package_folder() -> None:
    # An explicit list (flows/ installs under another name) must not miss a subpackage.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = pyproject["tool"]["setuptools"]
    folders = {name: ROOT / path for name, path in setuptools["package-dir"].items()}
    found = {
        init.parent.relative_to(ROOT).as_posix().replace("/", ".")
        for init in (ROOT / "opticam").rglob("__init__.py")
    }
    found |= {name for name, folder in folders.items() if (folder / "__init__.py").is_file()}
    assert set(setuptools["packages"]) == found
    assert folders == {"opticam_flows": ROOT / "flows"}


_INSTALLED_CHECK = """
import importlib.util, pathlib, sys, yaml
from prefect.flows import load_flow_from_entrypoint
target = pathlib.Path(sys.argv[1]).resolve()
assert importlib.util.find_spec("flows") is None, importlib.util.find_spec("flows")
import opticam, opticam_flows.explain
for module in (opticam, opticam_flows.explain):
    assert target in pathlib.Path(module.__file__).resolve().parents, module.__file__
entrypoints = {d["entrypoint"] for d in yaml.safe_load(open(sys.argv[2]))["deployments"]}
from opticam_flows.explain import explain_dataset, explain_shard
entrypoints |= {f"{f.fn.__module__}:{f.fn.__name__}" for f in (explain_dataset, explain_shard)}
for entrypoint in sorted(entrypoints):
    print(entrypoint, load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False).name)
"""


@pytest.mark.e2e
def test_the_installed_package_has_no_top_level_flows_and_runs(wheel: Path, tmp_path: Path) -> None:
    """``pip install`` of the wheel: only opticam and opticam_flows, and both work."""
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
        + ["--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    tops = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert tops - {"bin"} == {"opticam", "opticam_flows"}, tops
    # The installed copy comes first on the path (dependencies from this environment);
    # the working directory is not the repository, whose flows/ folder would import.
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    check = subprocess.run(
        [sys.executable, "-c", _INSTALLED_CHECK, str(target), str(PREFECT_YAML)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert "opticam_flows.explain:explain_shard explain-shard" in check.stdout
    assert "opticam_flows.explain:explain_dataset explain-dataset" in check.stdout

    from opticam.demo import make_shards

    (shard,) = make_shards(str(tmp_path / "data"), 1, 2, seed=3)
    run = subprocess.run(
        [sys.executable, "-m", "opticam", "run", "--data", shard, "--output", "runs"]
        + ["--device", "cpu", "--methods", "gradcam", "--no-insertion-deletion"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 shards processed" in run.stdout, run.stdout
    (run_folder,) = (work / "runs").iterdir()
    assert (run_folder / "report" / "index.html").is_file()


@pytest.mark.e2e
def test_entrypoint_runs_the_workers_or_the_given_command(tmp_path: Path) -> None:
    """The image's entrypoint script, with a stand-in `opticam` that prints its arguments."""
    instructions = _dockerfile_instructions(_dockerfile())
    (entry,) = [_exec_form(a) for k, a in instructions if k == "ENTRYPOINT"]
    copied = {dest: source for source, dest in _copy_sources(instructions)}
    script = ROOT / copied[entry[0]]
    assert script.stat().st_mode & stat.S_IXUSR, "the script is executable in git too"
    fake = tmp_path / "opticam"
    fake.write_text('#!/bin/sh\necho "opticam $*"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}

    def run(*args: str, **extra: str) -> str:
        done = subprocess.run(
            ["sh", str(script), *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout.strip()

    assert run() == "opticam worker --pool gpu"
    assert run(OPTICAM_POOL="a100") == "opticam worker --pool a100"
    assert run("echo", "prefect", "flow-run", "execute") == "prefect flow-run execute"


# --------------------------------------------------------------------------- secrets

SECRET_FILES = [
    PREFECT_YAML,
    COMPOSE,
    DOCKERFILE,
    DOCKERIGNORE,
    ROOT / "docker" / "entrypoint.sh",
    *(TEMPLATES / f"{n}.json" for n in TEMPLATE_NAMES),
]
SECRET_NAME = re.compile(r"password|secret|token|access_key|api_key|private_key", re.I)
INTERPOLATION = re.compile(r"^\$\{[A-Z0-9_]+(:-(?P<default>[^}]*))?\}$")


@pytest.mark.parametrize("path", SECRET_FILES, ids=lambda p: p.name)
def test_no_credentials_in_the_files(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id"
    assert "PRIVATE KEY-----" not in text
    # Credentials inside a URL (scheme://user:password@host) only from a variable.
    for match in re.finditer(r"://[^/\s:@]+:([^@\s]+)@", text):
        assert match.group(1).startswith("${"), match.group(0)
    if path.suffix in (".yaml", ".json"):
        doc = _load_yaml(path) if path.suffix == ".yaml" else json.loads(text)
        for key, value in _walk(doc):
            name = key.rsplit(".", 1)[-1]
            if name.endswith("]") or not isinstance(value, str) or not value:
                continue  # list items are values, not names (JSON schema `secret_fields`)
            if not SECRET_NAME.search(name):
                continue
            # Only compose may name a secret, and only as ${VAR:-default}, with an
            # obvious development default for passwords.
            assert path == COMPOSE, f"{key} in {path.name}"
            found = INTERPOLATION.match(value)
            assert found, f"{key}: {value!r} is not a ${{VAR:-default}}"
            if re.search(r"password|secret", name, re.I):
                assert "dev" in (found.group("default") or "dev"), f"{key}: {value!r}"
