"""The results table: per task the score of every seed, their mean and time per epoch; the GLUE
score (unweighted mean of the 8 task means); as Markdown and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m2dist.glue.finetune import JobResult
from m2dist.glue.metrics import SCORE_NAMES
from m2dist.glue.tasks import GLUE_TASKS


@dataclass
class TaskResult:
    task: str
    # What the score is ("acc", "MCC", ...).
    metric: str
    # seed -> score (a fraction); seeds whose job failed are absent.
    scores: dict[int, float]
    # Mean over the seeds that finished (None when none did).
    mean: float | None
    # Mean seconds per training epoch over the task's finished jobs.
    epoch_seconds: float | None
    # seed -> the last epoch's metrics per dev split.
    metrics: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    # The checkpoint the jobs started from (the MNLI-finetuned one for RTE/MRPC/STS-B).
    init_checkpoint: str = ""
    # seed -> error text of failed jobs.
    failed: dict[int, str] = field(default_factory=dict)


@dataclass
class GlueReport:
    checkpoint: str
    tasks: dict[str, TaskResult]
    # Unweighted mean of the 8 GLUE task means; None unless all 8 finished.
    glue: float | None
    output_dir: str = ""
    mlflow_uri: str = ""
    mlflow_parent_run_id: str | None = None
    # Full per-job results (history per epoch).
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def failed(self) -> dict[str, str]:
        return {f"{t}-s{s}": e for t, r in self.tasks.items() for s, e in r.failed.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_report(
    checkpoint: str, task_seeds: dict[str, list[int]], outcomes: dict[str, JobResult | str]
) -> GlueReport:
    tasks: dict[str, TaskResult] = {}
    jobs: dict[str, dict[str, Any]] = {}
    for task, seeds in task_seeds.items():
        result = TaskResult(task, SCORE_NAMES.get(task, "acc"), {}, None, None)
        epoch_seconds = []
        for seed in seeds:
            outcome = outcomes.get(f"{task}-s{seed}", "not run")
            if isinstance(outcome, str):
                result.failed[seed] = outcome
                continue
            result.scores[seed] = outcome.score
            result.metrics[seed] = outcome.metrics
            result.init_checkpoint = outcome.init_checkpoint
            epoch_seconds += [h["epoch_seconds"] for h in outcome.history]
            jobs[outcome.job_id] = asdict(outcome)
        if result.scores:
            result.mean = float(np.mean(list(result.scores.values())))
        if epoch_seconds:
            result.epoch_seconds = float(np.mean(epoch_seconds))
        tasks[task] = result
    means = [tasks[t].mean for t in GLUE_TASKS if t in tasks]
    glue = float(np.mean(means)) if len(means) == len(GLUE_TASKS) and None not in means else None
    return GlueReport(checkpoint, tasks, glue, jobs=jobs)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_markdown(report: GlueReport) -> str:
    """The table: task | metric | score per seed | mean | s/epoch, then the GLUE score."""
    lines = [
        f"Checkpoint: `{report.checkpoint}`",
        "",
        "| task | metric | per seed | mean | s/epoch |",
        "|---|---|---|---:|---:|",
    ]
    for result in report.tasks.values():
        seeds = [f"{seed}: {_pct(score)}" for seed, score in result.scores.items()]
        seeds += [f"{seed}: failed" for seed in result.failed]
        seconds = "-" if result.epoch_seconds is None else f"{result.epoch_seconds:.1f}"
        lines.append(f"| {result.task} | {result.metric} | {', '.join(seeds)} | {_pct(result.mean)} | {seconds} |")
    glue_tasks = [t for t in GLUE_TASKS if t in report.tasks]
    if glue_tasks:
        if report.glue is not None:
            lines.append(f"| **GLUE** | mean of 8 | | **{_pct(report.glue)}** | |")
        else:
            lines.append(f"| GLUE | needs all 8 tasks ({len(glue_tasks)} run) | | - | |")
    if report.failed:
        lines += ["", "Failed jobs: " + ", ".join(sorted(report.failed))]
    return "\n".join(lines) + "\n"


def write_report(report: GlueReport, output_dir: str | Path) -> tuple[Path, Path]:
    """results.md and results.json in `output_dir`."""
    output_dir = Path(output_dir)
    markdown = output_dir / "results.md"
    markdown.write_text(format_markdown(report))
    data = output_dir / "results.json"
    data.write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    return markdown, data
