"""Check that the manual kept everything the long README of the past said.

Issue 18 moved most of the README into ``docs/``. This script reads the README as it was
at a commit (``git show REV:README.md``), cuts it into units (a paragraph, one bullet
with its continuation lines, one table row, a whole fenced code block, a heading) and
looks for each unit, after normalising, in the README and the pages under ``docs/`` of
the work tree. Normalising: a Markdown link or image keeps only its text (targets moved
from ``#anchor`` to ``page.md#anchor``), a heading loses its ``#`` marks (pages start one
level up), a bullet or numbered item loses its marker, emphasis marks (``*``) go, and every run of whitespace is one
space (text may be reflowed).

Units reworded on purpose are listed in ``REWORDED`` with the reason; they are printed,
not counted as lost. Exit status 1 when any other unit is missing.

Usage: ``python .ci/docs_content.py [REV]`` (default ``8bbd298``, the last commit with
the long README), from the repository root.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DEFAULT_REV = "8bbd298"

#: The start of an old unit (normalised) that was reworded on purpose -> why.
REWORDED: dict[str, str] = {
    "```bash make demo # creates .venv, installs, runs `opticam run` on the bundled demo": (
        "README quick start: `make test`'s comment now says it also builds the docs"
    ),
    "| `--map-format lowres\\|full_png` | map storage (see the schema below;": (
        "docs/cli.md: the schema is on another page now, linked instead of 'below'"
    ),
    "Measured with `.venv/bin/python benchmarks/cluster_overhead.py`": (
        "moved from the cluster page to docs/benchmarks.md: 'the benchmarks below' became 'above'"
    ),
    # Issue 18's code moves, after the cut: the architecture table follows the modules.
    "| user errors (one line, exit 2) vs bugs (traceback)": (
        "docs/architecture.md: every user error class now lives in opticam/errors.py"
    ),
    "| classifiers: `ModelSpec` → `LoadedModel`, target layers": (
        "docs/architecture.md: target layers moved to opticam/layers.py"
    ),
    "| timm and Hugging Face models: loading, their preprocessing, default layers": (
        "docs/architecture.md: the zoo's default layers moved to opticam/layers.py"
    ),
    "| Opti-CAM; the pytorch-grad-cam baselines and Fake-CAM; name → explainer": (
        "docs/architecture.md: Opti-CAM's schedule moved to opticam/methods/schedule.py"
    ),
    "| run folder layout and atomic writes; Parquet schemas and `ShardStatus`; `run.json`": (
        "docs/architecture.md: store/checks.py (damaged rows files, issue 17) added"
    ),
    "(percent; s/img is the explain time alone, metrics excluded; the report also gives": (
        "docs/benchmarks.md: the paper-ordering test runs on 50 images now (make check)"
    ),
    "Error files have `run_id, shard, key, stage, message`; both files carry": (
        "docs/output-schema.md: store.read_shard_status was renamed store.read_statuses"
    ),
    "Imports point downwards only. `opticam/` is a plain library that never imports Prefect": (
        "docs/architecture.md: the command line moved apart from the library (opticam/cli/)"
    ),
    "``` opticam.cli (flags made from RunConfig)": (
        "docs/architecture.md: the drawing names what opticam/cli/ holds now"
    ),
    "| the lifeline: SIGTERM/SIGINT stop cleanly, nothing outlives a SIGKILL": (
        "docs/architecture.md: one row for opticam/cli/ (lifeline, workers, progress, commands)"
    ),
    "| progress display (rich) | `opticam/progress.py` |": (
        "docs/architecture.md: one row for opticam/cli/ (lifeline, workers, progress, commands)"
    ),
    "| starting the Prefect workers of one machine (`opticam worker`)": (
        "docs/architecture.md: one row for opticam/cli/ (lifeline, workers, progress, commands)"
    ),
    # Schema version 3: the rows files moved from <run>/shards/ to <run>/rows/.
    "``` <output>/<run_id>/run.json config (no secrets), versions, shard list,": (
        "docs/output-schema.md: the rows files are in rows/ now (shards/ before version 3)"
    ),
    "```python import pandas as pd # or DuckDB, Polars, Spark... rows = pd.read_parquet(": (
        "docs/output-schema.md: pandas reads the rows files from rows/ now"
    ),
    'Parquet schema (`SCHEMA_VERSION = "2"`)': (
        "docs/output-schema.md: the schema is version 3 now"
    ),
    "Exactly-once shard output. A shard is done when its rows file (`shards/<name>.parquet`)": (
        "docs/reliability.md: the rows files are in rows/ now"
    ),
    # Schema version 3: saliency and saliency_shape became map_bytes and map_shape.
    "| `saliency` | binary | the stored map (see below) |": (
        "docs/output-schema.md: the column is map_bytes now (saliency before version 3)"
    ),
    "| `saliency_shape` | list\\<int32\\> | `[h, w]` of the stored map |": (
        "docs/output-schema.md: the column is map_shape now (saliency_shape before version 3)"
    ),
    "| `map_format` | string | `lowres` or `full_png` (called `saliency_kind` in version 1": (
        "docs/output-schema.md: says what map_format tells of map_bytes; the reader of"
        " version 1 runs is in the table of schema versions"
    ),
    "Maps: `lowres` stores the low-resolution saliency as float16,": (
        "docs/output-schema.md: names the column the map is stored in (map_bytes)"
    ),
    "Opti-CAM on the CPU spent about a third of its time in the kernel: every pass freed": (
        "docs/benchmarks.md: the allocator is tuned by the first explainer, not on import"
    ),
}

_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_ITEM = re.compile(r"^\s*(?:[-*]|\d+\.)\s+")


def normalise(text: str) -> str:
    """The text with link targets, heading marks, item markers and extra spaces gone."""
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^#+\s+", "", line)
        line = _ITEM.sub("", line)
        lines.append(line)
    text = _LINK.sub(r"\1", "\n".join(lines)).replace("*", "")
    return " ".join(text.split())


def units(markdown: str) -> list[str]:
    """Cut Markdown into paragraphs, bullets, table rows, code blocks and headings."""
    found: list[str] = []
    current: list[str] = []

    def close() -> None:
        if current:
            found.append("\n".join(current))
            current.clear()

    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            close()
            block = [line]
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            block.append(lines[i] if i < len(lines) else "")
            found.append("\n".join(block))
        elif not stripped:
            close()
        elif stripped.startswith("#"):
            close()
            found.append(stripped)
        elif stripped.startswith("|"):
            close()
            if not re.fullmatch(r"\|[\s:|-]*\|", stripped):
                found.append(stripped)
        elif _ITEM.match(line) and not line.startswith("    "):
            close()
            current.append(line)
        else:
            current.append(line)
        i += 1
    close()
    return [u for u in (normalise(u) for u in found) if u]


def reason(unit: str) -> str | None:
    """Why ``unit`` was reworded on purpose, or None."""
    return next((why for start, why in REWORDED.items() if unit.startswith(start)), None)


def main(argv: list[str]) -> int:
    """Compare the old README's units with the new README and ``docs/``."""
    rev = argv[1] if len(argv) > 1 else DEFAULT_REV
    old = subprocess.run(
        ["git", "show", f"{rev}:README.md"], capture_output=True, text=True, check=True
    ).stdout
    pages = [Path("README.md"), *sorted(Path("docs").rglob("*.md"))]
    haystack = "\n".join(normalise(p.read_text(encoding="utf-8")) for p in pages)
    old_units = units(old)
    lost = [u for u in old_units if u not in haystack]
    missing = [u for u in lost if reason(u) is None]
    reworded = [u for u in lost if reason(u) is not None]
    print(f"{len(old_units)} units of README.md at {rev}; searched {len(pages)} files")
    print(f"found verbatim (normalised): {len(old_units) - len(missing) - len(reworded)}")
    print(f"reworded on purpose: {len(reworded)}")
    for unit in reworded:
        print(f"  - {unit[:100]}... ({reason(unit)})")
    print(f"missing: {len(missing)}")
    for unit in missing:
        print(f"  ! {unit[:160]}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
