"""The manual's quality/passes figure, drawn from saved outputs of opticam_schedule.py.

    python benchmarks/opticam_schedule.py --seed 4242 > /tmp/s4242.md
    python benchmarks/opticam_schedule.py --seed 4343 > /tmp/s4343.md
    python benchmarks/prior_figure.py docs/images/prior_passes.png /tmp/s4242.md /tmp/s4343.md

Each input is one run's printed Markdown: its first table (one row per schedule, with
``passes / image``, ``AD`` and ``AG`` columns) is read back by column name, so the figure
shows exactly the numbers the benchmark printed. One panel per input (its first line,
the benchmark's header, is the panel's title): AG against passes per image, the paper's
setting cut at fewer steps drawn as a line, every other schedule as a labelled point,
the class prior's rows in their own colour.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def schedule_rows(text: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table whose header has ``passes / image`` and ``AG``."""
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and "passes / image" in cells and "AG" in cells:
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                values = [c.strip() for c in row.strip("|").split("|")]
                rows.append(dict(zip(cells, values, strict=False)))
            return rows
    raise SystemExit("no table with 'passes / image' and 'AG' columns found")


def draw(axes: object, rows: list[dict[str, str]], title: str) -> None:
    """One panel: the paper's curve, the other schedules, the prior's rows."""
    name = next(k for k in rows[0] if k in ("schedule", "start"))
    curve = [r for r in rows if r[name].startswith("paper")]
    curve.sort(key=lambda r: float(r["passes / image"]))
    ax = axes  # matplotlib Axes
    ax.plot(  # type: ignore[attr-defined]
        [float(r["passes / image"]) for r in curve],
        [float(r["AG"]) for r in curve],
        "o-",
        color="0.4",
        label="paper's setting, cut at fewer steps",
    )
    for r in rows:
        if r in curve:
            continue
        prior = "prior" in r[name]
        ax.scatter(  # type: ignore[attr-defined]
            float(r["passes / image"]),
            float(r["AG"]),
            color="tab:red" if prior else "tab:blue",
            marker="s" if prior else "^",
            zorder=3,
        )
        ax.annotate(  # type: ignore[attr-defined]
            r[name], (float(r["passes / image"]), float(r["AG"])), fontsize=6,
            xytext=(3, 3), textcoords="offset points",
        )  # fmt: skip
    ax.axvline(101 / 3, color="0.7", linestyle="--", linewidth=1)  # type: ignore[attr-defined]
    ax.set_xlabel("passes per image (calibration included)")  # type: ignore[attr-defined]
    ax.set_ylabel("Average Gain (%)")  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=8)  # type: ignore[attr-defined]
    ax.legend(fontsize=7, loc="lower right")  # type: ignore[attr-defined]


def main(argv: list[str]) -> int:
    """Draw ``argv[0]`` from the saved outputs ``argv[1:]``."""
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, inputs = Path(argv[0]), [Path(a) for a in argv[1:]]
    figure, axes = plt.subplots(1, len(inputs), figsize=(5.5 * len(inputs), 4.2), squeeze=False)
    for ax, path in zip(axes[0], inputs, strict=True):
        text = path.read_text()
        draw(ax, schedule_rows(text), text.splitlines()[0].lstrip("# ")[:90])
    figure.tight_layout()
    figure.savefig(out, dpi=130)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
