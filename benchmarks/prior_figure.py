"""The manual's quality/passes figure, drawn from saved logs of opticam_schedule.py.

    python benchmarks/opticam_schedule.py --seed 4242 --prior-per-class 3,5 2> s4242.log
    python benchmarks/prior_figure.py docs/images/prior_passes.png s4242.log s4343.log

Each input is one run's log: the script prints a line per schedule it ran, ``ran NAME:
passes P [(scored S)], AD x, AG y...``; those lines are read back, so the figure shows
exactly the numbers the benchmark measured. One panel per input: Average Gain against the
passes spent on each scored image (``S`` for a prior row: the calibration images' own
passes are not in it, see the page's projection), the paper's setting cut at fewer steps
as one line, and the prior's rows at lr 0.5 as one line per calibration size.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_LINE = re.compile(
    r"ran (?P<name>[^:]+): passes (?P<passes>[\d.]+)(?: \(scored (?P<scored>[\d.]+)\))?, "
    r"AD (?P<ad>[\d.]+), AG (?P<ag>[\d.]+)"
)
_PRIOR = re.compile(r"prior (?P<n>\d+)/class, (?P<steps>\d+) it, lr 0\.5$")


def measured(text: str) -> list[tuple[str, float, float]]:
    """``(name, passes per scored image, AG)`` of every schedule the log says it ran."""
    rows = []
    for match in _LINE.finditer(text):
        passes = float(match["scored"] or match["passes"])
        rows.append((match["name"].strip(), passes, float(match["ag"])))
    if not rows:
        raise SystemExit("no 'ran NAME: passes P, AD x, AG y' line found")
    return rows


def draw(ax: object, rows: list[tuple[str, float, float]], title: str) -> None:
    """One panel: the paper's curve and the prior's curves (lr 0.5)."""
    paper = sorted((p, ag) for name, p, ag in rows if name.startswith("paper"))
    ax.plot(*zip(*paper, strict=True), "o-", color="0.4", label="paper's setting, fewer steps")  # type: ignore[attr-defined]
    sizes: dict[int, list[tuple[float, float]]] = {}
    for name, passes, ag in rows:
        found = _PRIOR.match(name)
        if found:
            sizes.setdefault(int(found["n"]), []).append((passes, ag))
    for n, points in sorted(sizes.items()):
        ax.plot(*zip(*sorted(points), strict=True), "s-", label=f"class prior, {n}/class, lr 0.5")  # type: ignore[attr-defined]
    ax.axvline(101 / 3, color="0.7", linestyle="--", linewidth=1)  # type: ignore[attr-defined]
    ax.set_xlabel("passes per scored image")  # type: ignore[attr-defined]
    ax.set_ylabel("Average Gain (%)")  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=9)  # type: ignore[attr-defined]
    ax.legend(fontsize=7, loc="lower right")  # type: ignore[attr-defined]


def main(argv: list[str]) -> int:
    """Draw ``argv[0]`` from the saved logs ``argv[1:]`` (``NAME=LOG`` sets a title)."""
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    inputs = [a.split("=", 1) if "=" in a else [Path(a).stem, a] for a in argv[1:]]
    figure, axes = plt.subplots(1, len(inputs), figsize=(5.2 * len(inputs), 4.0), squeeze=False)
    for ax, (title, path) in zip(axes[0], inputs, strict=True):
        draw(ax, measured(Path(path).read_text()), title)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
