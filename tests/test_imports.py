"""Import promises, checked in fresh interpreters through ``sys.modules``.

- ``import opticam, opticam.config`` (what the CLI, a Prefect UI process and a config
  check need) loads neither torch nor Prefect; nor do the torch-free names of
  ``opticam`` (``ModelSpec``, ``RunConfig``, ``KNOWN_METHODS``).
- No module under ``opticam/`` loads Prefect: the library is usable without it, and
  only ``flows/`` orchestrates.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import opticam

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "prefect", "torchvision", "pyarrow")


def loaded_after(code: str) -> set[str]:
    """The top-level packages in ``sys.modules`` after running ``code`` in a new Python."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.e2e
@pytest.mark.parametrize(
    "code",
    [
        "import opticam, opticam.config",
        "import opticam.names, opticam.errors",
        "import opticam; opticam.ModelSpec(); opticam.KNOWN_METHODS; opticam.RunConfig",
        "from opticam.config import RunConfig; RunConfig(data='x.tar').run_id",
    ],
)
def test_config_and_names_load_neither_torch_nor_prefect(code: str) -> None:
    loaded = loaded_after(code)
    assert not loaded & {"torch", "prefect"}, sorted(loaded & set(HEAVY))


def test_lazy_names_resolve_to_the_real_objects() -> None:
    from opticam.config import ModelSpec
    from opticam.methods import get_explainer
    from opticam.names import KNOWN_METHODS

    assert opticam.KNOWN_METHODS is KNOWN_METHODS
    assert opticam.get_explainer is get_explainer
    assert opticam.ModelSpec is ModelSpec
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        opticam.nope  # noqa: B018


def _library_modules() -> list[str]:
    names = ["opticam"]
    for info in pkgutil.walk_packages([str(REPO / "opticam")], prefix="opticam."):
        if info.name != "opticam.__main__":
            names.append(info.name)
    return sorted(names)


@pytest.mark.e2e
def test_no_library_module_loads_prefect() -> None:
    modules = _library_modules()
    # Every subpackage and the modules that sit closest to the flows must be covered.
    assert {"opticam.cli", "opticam.pipeline.shard", "opticam.store.tables"} <= set(modules)
    loaded = loaded_after("\n".join(f"import {m}" for m in modules))
    assert "torch" in loaded  # the probe really imported the library
    assert "prefect" not in loaded


@pytest.mark.e2e
def test_the_flows_do_load_prefect() -> None:
    # The control for the test above: the probe sees Prefect when it is imported.
    assert "prefect" in loaded_after("import opticam_flows.explain")


def _imported_modules(path: Path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_the_command_line() -> None:
    # opticam.cli (the parser, the commands, the lifeline, the workers, the progress
    # display) sits on top of the library; nothing below it may reach up into it.
    library = [
        p
        for p in sorted((REPO / "opticam").rglob("*.py"))
        if "cli" not in p.relative_to(REPO / "opticam").parts[:1] and p.name != "__main__.py"
    ]
    assert len(library) > 40, library
    reaching_up = {
        str(p.relative_to(REPO)): sorted(
            m for m in _imported_modules(p) if m.startswith("opticam.cli")
        )
        for p in library
    }
    assert {p: m for p, m in reaching_up.items() if m} == {}
