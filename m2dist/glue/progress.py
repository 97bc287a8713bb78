"""A live display of the evaluation's jobs: done / running / left, and each running job's share done.

Uses rich on a terminal; elsewhere (logs, CI) it stays silent and the runner's log lines say the
same. Fed by the scheduler's events.
"""

from __future__ import annotations

import sys
from typing import Any


class JobProgress:
    def __init__(self, job_ids: list[str], epochs: dict[str, int], enabled: bool = True) -> None:
        self.total = len(job_ids)
        self.epochs = epochs
        self.done = 0
        self.failed = 0
        self.running: dict[str, Any] = {}
        self._progress = None
        if enabled and sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:
                return
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._overall = self._progress.add_task(self._summary(), total=self.total)

    def _summary(self) -> str:
        left = self.total - self.done - self.failed - len(self.running)
        failed = f", {self.failed} failed" if self.failed else ""
        return f"jobs: {self.done} done, {len(self.running)} running, {left} left{failed}"

    def __enter__(self) -> JobProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, kind: str, job_id: str, payload: dict[str, Any]) -> None:
        if kind == "start":
            self.running[job_id] = None
            if self._progress is not None:
                self.running[job_id] = self._progress.add_task(f"  {job_id} on {payload['device']}", total=1.0)
        elif kind == "progress" and self._progress is not None and self.running.get(job_id) is not None:
            self._progress.update(self.running[job_id], completed=payload["fraction"])
        elif kind == "epoch" and self._progress is not None and self.running.get(job_id) is not None:
            epochs = self.epochs.get(job_id, 1)
            self._progress.update(
                self.running[job_id],
                description=f"  {job_id} epoch {int(payload['epoch'])}/{epochs} score {100 * payload['score']:.1f}",
            )
        elif kind in ("done", "failed"):
            task = self.running.pop(job_id, None)
            if kind == "done":
                self.done += 1
            else:
                self.failed += 1
            if self._progress is not None and task is not None:
                self._progress.remove_task(task)
        if self._progress is not None:
            self._progress.update(self._overall, description=self._summary(), completed=self.done + self.failed)
