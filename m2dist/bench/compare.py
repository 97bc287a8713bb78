"""Pretraining runs side by side: validation MLM loss against GPU-seconds and against tokens seen
in one figure, and a markdown table of each run's final figures.

A run is a folder written by m2dist/train.py (its `metrics.jsonl` and `config.json`) or an MLflow
run of the training (its metric histories and params). The records carry no clock, so the time
axis is derived from them:
- tokens seen at a record: `train/tokens_seen` (= step x global batch x sequence length), else the
  step times `train.global_batch_size x train.seq_len` of config.json;
- GPU-seconds: each log record's window (the steps since the previous record) lasted
  `(tokens seen - previous tokens seen) / throughput/tokens_per_s` seconds of wall time; summed
  over the records and multiplied by the world size, that is the device time of the training loop
  (evaluations and checkpoints included, start-up and the gaps between the jobs of a resumed run
  not). A CPU rank counts as one device.

The first run is the baseline: for every run the table gives the GPU-seconds at its first
evaluation whose loss is at or below the baseline's final validation loss, as a ratio to the
baseline's own GPU-seconds to that loss, or "not reached".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from m2dist.config import ModelConfig, config_section_from_dict
from m2dist.engine.metrics import EVAL_PREFIX, METRICS_FILE, read_metrics
from m2dist.errors import ConfigError, DataError

EVAL_LOSS = f"{EVAL_PREFIX}mlm_loss"
EVAL_ACCURACY = f"{EVAL_PREFIX}mlm_accuracy"
# The metric histories an MLflow run is read from.
MLFLOW_METRICS = ("train/loss", "train/tokens_seen", "throughput/tokens_per_s", EVAL_LOSS, EVAL_ACCURACY)
NOT_REACHED = "not reached"


@dataclass(frozen=True)
class EvalPoint:
    step: int
    tokens_seen: float
    gpu_seconds: float
    loss: float
    accuracy: float | None


@dataclass(frozen=True)
class RunSummary:
    """One run's curves and final figures, as the figure and the table show them."""

    name: str
    source: str
    architecture: str | None
    num_parameters: int | None
    steps: int
    tokens_seen: float
    gpu_seconds: float
    # Wall seconds of the training loop: GPU-seconds / world size.
    wall_seconds: float
    final_train_loss: float | None
    evals: tuple[EvalPoint, ...]

    @property
    def final_eval(self) -> EvalPoint:
        return self.evals[-1]

    @property
    def best_eval_loss(self) -> float:
        return min(point.loss for point in self.evals)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens_seen / self.wall_seconds if self.wall_seconds > 0 else None

    def gpu_seconds_to_loss(self, target: float) -> float | None:
        """GPU-seconds at the first evaluation with loss <= target, or None if none reached it."""
        return next((point.gpu_seconds for point in self.evals if point.loss <= target), None)


def count_model_parameters(model: Mapping[str, Any]) -> int | None:
    """Trainable parameters of the `model` section of a config.json, counted on the meta device (no
    memory, no weights); None when the section no longer makes a valid model config."""
    import torch

    from m2dist.models import build_masked_lm
    from m2dist.models.model import count_parameters

    try:
        config = config_section_from_dict(ModelConfig, dict(model), "model")
    except (ConfigError, TypeError):
        return None
    with torch.device("meta"):
        return count_parameters(build_masked_lm(config))


def summarize_records(
    records: Sequence[Mapping[str, Any]],
    source: str,
    name: str,
    world_size: int | None = None,
    tokens_per_step: int | None = None,
    architecture: str | None = None,
    num_parameters: int | None = None,
) -> RunSummary:
    """Curves and final figures from metrics records by step (as `read_metrics` returns them), the
    time axis derived as the module docstring says. `world_size` is used where a record has none;
    `tokens_per_step` where a record has no `train/tokens_seen`. Raises DataError naming `source`
    when no record carries an evaluation."""
    if not records:
        raise DataError(f"{source}: no metrics records; expected one JSON object per log step from m2dist/train.py")
    evals: list[EvalPoint] = []
    # Tokens seen at the previous record that closed a throughput window.
    window_start = tokens_seen = gpu_seconds = wall_seconds = 0.0
    final_train_loss = None
    for record in records:
        step = int(record["step"])
        if "train/tokens_seen" in record:
            tokens = float(record["train/tokens_seen"])
        elif tokens_per_step:
            tokens = float(step * tokens_per_step)
        else:
            raise DataError(
                f"{source}: step {step} has no train/tokens_seen and the run's config gives no tokens per step "
                "(train.global_batch_size x train.seq_len)"
            )
        speed = record.get("throughput/tokens_per_s")
        if speed:
            window = max(tokens - window_start, 0.0) / speed
            wall_seconds += window
            gpu_seconds += window * int(record.get("world_size", world_size or 1))
            window_start = tokens
        tokens_seen = max(tokens_seen, tokens)
        if "train/loss" in record:
            final_train_loss = float(record["train/loss"])
        if EVAL_LOSS in record:
            accuracy = record.get(EVAL_ACCURACY)
            accuracy = None if accuracy is None else float(accuracy)
            evals.append(EvalPoint(step, tokens, gpu_seconds, float(record[EVAL_LOSS]), accuracy))
    if not evals:
        raise DataError(
            f"{source}: no evaluation record ({EVAL_LOSS}); expected a run trained with a validation split "
            "(it evaluates every train.eval_every steps and at the end)"
        )
    return RunSummary(
        name=name, source=source, architecture=architecture, num_parameters=num_parameters,
        steps=int(records[-1]["step"]), tokens_seen=tokens_seen, gpu_seconds=gpu_seconds,
        wall_seconds=wall_seconds, final_train_loss=final_train_loss, evals=tuple(evals),
    )  # fmt: skip


def read_run_folder(run_dir: str | Path) -> RunSummary:
    """A run folder of m2dist/train.py: its metrics.jsonl, named and described by its config.json
    (the folder's name and no architecture without one). FileNotFoundError without metrics.jsonl."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        what = "folder" if run_dir.is_dir() else "no such folder"
        raise FileNotFoundError(
            f"{metrics}: not found ({what}); expected the run folder (train.output_dir) of m2dist/train.py, "
            f"which holds {METRICS_FILE}"
        )
    config_file = run_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    model = config.get("model", {})
    train = config.get("train", {})
    batch, seq_len = train.get("global_batch_size"), train.get("seq_len")
    return summarize_records(
        read_metrics(metrics), str(metrics), name=config.get("name") or run_dir.resolve().name,
        tokens_per_step=batch * seq_len if batch and seq_len else None, architecture=model.get("architecture"),
        num_parameters=count_model_parameters(model) if model else None,
    )  # fmt: skip


def read_mlflow_run(tracking_uri: str, run_id: str) -> RunSummary:
    """A training run in an MLflow store: its metric histories (the newest value of a step logged
    twice) and params (`name`, `model.architecture`, `model.num_parameters`, `runtime.world_size`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    params = run.data.params
    by_step: dict[int, dict[str, Any]] = {}
    for key in MLFLOW_METRICS:
        for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            by_step.setdefault(metric.step, {"step": metric.step})[key] = metric.value
    # The steps between log steps carry only their train/loss: no tokens seen, no throughput window.
    records = [by_step[step] for step in sorted(by_step) if set(by_step[step]) - {"step", "train/loss"}]
    parameters = params.get("model.num_parameters")
    return summarize_records(
        records, f"MLflow run {run_id} at {tracking_uri}", name=params.get("name") or run.info.run_name or run_id,
        world_size=int(params.get("runtime.world_size", 1)), architecture=params.get("model.architecture"),
        num_parameters=int(parameters) if parameters else None,
    )  # fmt: skip


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def comparison_table(runs: Sequence[RunSummary]) -> str:
    """The markdown table of the runs' final figures; the first run is the baseline."""
    if not runs:
        raise ValueError("comparison_table: expected at least one run, got none")
    baseline = runs[0]
    target = baseline.final_eval.loss
    baseline_seconds = baseline.gpu_seconds_to_loss(target)
    header = (
        "| run | architecture | parameters | steps | tokens seen | GPU-s | train loss | val loss | val acc "
        f"| best val loss | tokens/s | GPU-time to val loss {target:.4f} (vs {baseline.name}) |"
    )
    lines = [header, "|" + "---|" * header.count(" |")]
    for run in runs:
        seconds = run.gpu_seconds_to_loss(target)
        if seconds is None:
            reach = NOT_REACHED
        elif baseline_seconds:
            reach = f"{seconds / baseline_seconds:.2f}x ({_number(seconds, 1)} s)"
        else:
            reach = f"{_number(seconds, 1)} s"
        final = run.final_eval
        cells = [
            run.name, run.architecture or "-", _number(run.num_parameters), str(run.steps), _number(run.tokens_seen),
            _number(run.gpu_seconds, 1), _number(run.final_train_loss, 4), _number(final.loss, 4),
            _number(final.accuracy, 4), _number(run.best_eval_loss, 4), _number(run.tokens_per_s), reach,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(runs: Sequence[RunSummary], path: str | Path) -> Path:
    """Write a PNG of validation MLM loss against GPU-seconds (left) and tokens seen (right), one
    line per run (matplotlib's Agg renderer, no display needed); returns its path."""
    if not runs:
        raise ValueError("plot_comparison: expected at least one run, got none")
    # Figure without pyplot, as plot_loss_curve: no global backend switch and no GUI.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), dpi=110, layout="tight")
    by_time, by_tokens = figure.subplots(1, 2, sharey=True)
    style = {"marker": "o", "markersize": 3, "linewidth": 1.2}
    for run in runs:
        losses = [point.loss for point in run.evals]
        by_time.plot([point.gpu_seconds for point in run.evals], losses, label=run.name, **style)
        by_tokens.plot([point.tokens_seen for point in run.evals], losses, **style)
    by_time.set_xlabel("GPU-seconds")
    by_time.set_ylabel("validation MLM loss")
    by_time.set_title("validation loss vs GPU time")
    by_tokens.set_xlabel("tokens seen")
    by_tokens.set_title("validation loss vs tokens")
    for axes in (by_time, by_tokens):
        axes.grid(alpha=0.3)
    by_time.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def compare_runs(
    run_dirs: Sequence[str | Path], out: str | Path, mlflow_uri: str | None = None, run_ids: Sequence[str] = ()
) -> tuple[list[RunSummary], str]:
    """tools/compare_runs.py: read the run folders, then the MLflow runs `run_ids` of `mlflow_uri`
    (the first of all is the baseline), draw the figure to `out` and return the runs and the table."""
    if run_ids and not mlflow_uri:
        raise ValueError(f"compare_runs: run ids {list(run_ids)} need an MLflow tracking URI, got none")
    if not run_dirs and not run_ids:
        raise ValueError("compare_runs: expected at least one run folder or MLflow run id, got none")
    runs = [read_run_folder(run_dir) for run_dir in run_dirs]
    runs += [read_mlflow_run(mlflow_uri, run_id) for run_id in run_ids]  # type: ignore[arg-type]
    # Runs of one config (a sweep of overrides) share a name: the folder or run id tells them apart.
    tags = [Path(run_dir).resolve().name for run_dir in run_dirs] + [run_id[:8] for run_id in run_ids]
    names = [run.name for run in runs]
    runs = [
        replace(run, name=f"{run.name} ({tag})") if names.count(run.name) > 1 else run for run, tag in zip(runs, tags)
    ]
    plot_comparison(runs, out)
    return runs, comparison_table(runs)
