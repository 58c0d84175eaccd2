"""What a person watching ``opticam run`` sees: a live bar on a terminal, lines otherwise.

:class:`RunProgress` listens to the flow's progress events (``plan``, ``shard_start``,
``images``, ``shard_done``, ``shard_skipped``, ``shard_failed``, ``report``; see
:func:`opticam_flows.explain.progress_listener`). On a terminal it draws a rich progress bar that
moves within a shard too (images read so far against the expected shard size); on
anything else (a log file, CI) it writes one plain line per finished shard.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

from opticam.pipeline.plan import duplicates_note

__all__ = ["RunProgress"]


class RunProgress:
    """Progress display for one run; call it as ``progress(event, data)``.

    Args:
        stream: where to write (default stderr, so stdout keeps the summary table).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None
        self.pending = 0
        self.done = 0
        self.images = 0
        self._in_flight: dict[str, int] = {}
        self._limits: list[int | None] = []
        self._sizes: list[int] = []

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        """Show one progress event (``planned``, ``shard_done``, ...) of the run."""
        with self._lock:
            handler = getattr(self, f"_on_{event}", None)
            if handler is not None:
                handler(data)

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text.rstrip("\n"), markup=False, highlight=False)
        else:
            self.stream.write(text)
            self.stream.flush()

    def _on_plan(self, d: dict[str, Any]) -> None:
        self.pending = int(d["pending"])
        self._limits = list(d.get("max_images") or [])
        self._write(
            f"run {d['run_id']}: {d['total']} shards, {d['skipped']} already done, "
            f"{d['pending']} to process on {', '.join(d['devices'])}"
            f"{duplicates_note(int(d.get('duplicates') or 0))}\n"
            + "".join(
                f"shard {name}: rows file damaged ({why}); moved to {moved}, computing it again\n"
                for name, (why, moved) in (d.get("damaged") or {}).items()
            )
            + f"output: {d['run_url']}\n"
        )
        if self.tty and self.pending:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                TextColumn("shards"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[images]} images, {task.fields[rate]} img/s"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
            )
            self._task = self._bar.add_task("run", total=self.pending, images=0, rate="0.0")
            self._bar.start()

    def _expected_shard_size(self) -> float:
        # Shard sizes are unknown until read: the mean of the finished shards, else the
        # per-shard image limit, so the bar moves within the first shard too.
        if self._sizes:
            return sum(self._sizes) / len(self._sizes)
        known = [v for v in self._limits if v]
        return float(known[0]) if known else 0.0

    def _refresh(self) -> None:
        if self._bar is None:
            return
        expected = self._expected_shard_size()
        partial = (
            sum(min(n / expected, 0.99) for n in self._in_flight.values()) if expected else 0.0
        )
        elapsed = self._bar.tasks[0].elapsed or 0.0
        rate = self.images / elapsed if elapsed > 0 else 0.0
        self._bar.update(
            self._task, completed=self.done + partial, images=self.images, rate=f"{rate:.1f}"
        )

    def _on_images(self, d: dict[str, Any]) -> None:
        self.images += int(d["n"])
        self._in_flight[d["shard"]] = self._in_flight.get(d["shard"], 0) + int(d["n"])
        self._refresh()

    def _on_shard_done(self, d: dict[str, Any]) -> None:
        self.done += 1
        self._in_flight.pop(d["shard"], None)
        self._sizes.append(int(d["n_samples"]))
        state = "" if d["complete"] else " (incomplete shard)"
        if self._bar is None:
            self._write(
                f"[{self.done}/{self.pending}] {d['name']}: {d['n_images']} images, "
                f"{d['n_errors']} errors, {d['seconds']:.1f}s{state}\n"
            )
        elif state:
            self._write(f"{d['name']}:{state}\n")
        self._refresh()

    def _on_shard_skipped(self, d: dict[str, Any]) -> None:
        self.done += 1
        self._in_flight.pop(d["shard"], None)
        why = f"another run holds it ({d['held_by']})" if d["held_by"] else "another run did it"
        self._write(f"{d['name']}: {why}, skipped\n")
        self._refresh()

    def _on_shard_failed(self, d: dict[str, Any]) -> None:
        self.done += 1
        self._in_flight.pop(d["shard"], None)
        self._write(f"shard {d['shard']} failed: {d['message']}\n")
        self._refresh()

    def _on_calibration_done(self, d: dict[str, Any]) -> None:
        self._write(
            f"calibration {d['name']}: {d['joined']} images joined the class prior's sample\n"
        )

    def _on_prior(self, d: dict[str, Any]) -> None:
        self._write(
            f"class prior {d['sha256'][:12]}: {d['images']} calibration images of "
            f"{d['classes']} classes; the other images start from it\n"
        )

    def _on_report(self, d: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live bar (idempotent); later output goes to the stream as plain text."""
        if self._bar is not None:
            self._refresh()
            self._bar.stop()
            self._bar = None
