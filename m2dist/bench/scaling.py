"""Weak scaling of pretraining over GPU counts, ZeRO stages and sequence lengths, and a resume
across GPU counts through DeepSpeed's universal checkpoint.

Every measurement is a fresh run of the real entry point on one node,

  deepspeed --num_gpus N m2dist/train.py --config CFG train.zero_stage=S train.seq_len=L
      train.micro_batch_size=MB train.global_batch_size=MB*N train.duration=STEPS train.log_every=K ...

read back from the `metrics.jsonl` that its rank 0 writes. Weak scaling: the micro-batch per GPU is
fixed and there is no gradient accumulation, so the global batch grows with N. tokens/s is the mean
over the log windows after the first (start-up and warm-up); scaling efficiency = tokens/s(N) /
(N x tokens/s(1)) at the same model, ZeRO stage and L. A run's folder is `<work_dir>/<run>/` and its
output `<work_dir>/<run>.log`; a scaling run's checkpoints are deleted once it is read.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from m2dist.config import load_config
from m2dist.engine.distributed import free_port
from m2dist.engine.metrics import METRICS_FILE, read_metrics

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
# No evaluation, checkpoint or tracking inside the measured steps; the final evaluation reads one batch.
# Benchmark runs measure speed: without data.train (given as a `key=value`), the embedded corpus will do.
QUIET_RUN = (
    "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=0", "tracking.enabled=false",
    "data.allow_embedded_corpus=true",
)  # fmt: skip
LOG_TAIL_LINES = 25


class RunFailed(RuntimeError):
    """A training run exited with an error, timed out or wrote no metrics; names the run and its log."""


def visible_devices() -> int:
    """Ranks this node can run: the CUDA devices visible to this process, else its CPU cores (gloo)."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def check_gpu_counts(counts: Sequence[int], option: str) -> None:
    visible = visible_devices()
    seen = f"{visible} CUDA devices visible" if torch.cuda.is_available() else f"no CUDA device, {visible} CPU cores"
    for count in counts:
        if not 1 <= count <= visible:
            raise ValueError(f"{option}: expected GPU counts in [1, {visible}] ({seen}), got {count}")


def default_launcher() -> str:
    """The `deepspeed` launcher of this Python environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "deepspeed"
    return str(beside) if beside.exists() else (shutil.which("deepspeed") or "deepspeed")


def child_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    child = dict(os.environ if env is None else env)
    # NVLink SHARP (multicast) stays off in every multi-GPU run unless the caller sets it.
    child.setdefault("NCCL_NVLS_ENABLE", "0")
    return child


def _log_tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])


def run_training(
    name: str, config: str, num_gpus: int, overrides: Sequence[str], output_dir: Path, log: Path, *,
    launcher: str | None = None, env: Mapping[str, str] | None = None, timeout: float = 3600.0,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run m2dist/train.py on `num_gpus` ranks with `output_dir`, its output in `log`; return the
    records of its metrics.jsonl. Raises RunFailed naming `name` and `log`."""
    command = [
        *shlex.split(launcher or default_launcher()), "--num_gpus", str(num_gpus), "--master_port", str(free_port()),
        str(TRAIN_SCRIPT), "--config", config, *overrides, f"train.output_dir={output_dir}",
    ]  # fmt: skip
    with open(log, "w") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=child_environment(env), start_new_session=True
        )
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RunFailed(f"run {name}: no result after {timeout:.0f} s; stopped. Its log: {log}") from None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if returncode != 0:
        raise RunFailed(f"run {name} failed (exit status {returncode}); its log: {log}, ending:\n{_log_tail(log)}")
    metrics = output_dir / METRICS_FILE
    if not metrics.exists():
        raise RunFailed(f"run {name} wrote no {metrics}; its log: {log}")
    return read_metrics(metrics)


def steady_tokens_per_s(records: list[dict[str, Any]]) -> float:
    """Mean tokens/s over the log windows after the first."""
    windows = [record["throughput/tokens_per_s"] for record in records[1:]]
    if not windows:
        raise ValueError(f"expected at least 2 log windows, got {len(records)}: raise the steps or lower log_every")
    return sum(windows) / len(windows)


def scaling_efficiency(tokens_per_s: float, num_gpus: int, one_gpu_tokens_per_s: float | None) -> float | None:
    if not one_gpu_tokens_per_s:
        return None
    return tokens_per_s / (num_gpus * one_gpu_tokens_per_s)


@dataclass(frozen=True)
class ScalingRun:
    """One point of the sweep as launched."""

    name: str
    config: str
    model: str
    seq_len: int
    zero_stage: int
    num_gpus: int
    micro_batch_size: int
    overrides: tuple[str, ...]


@dataclass
class ScalingPoint:
    """A run and what it measured."""

    run: ScalingRun
    tokens_per_s: float
    peak_memory_gib: float
    # tokens/s(N) / (N x tokens/s(1)) at the same model, stage and L; None without a 1-GPU run.
    efficiency: float | None
    log: str

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.run.num_gpus

    def to_dict(self) -> dict[str, Any]:
        measured = {k: v for k, v in asdict(self).items() if k != "run"}
        return {**asdict(self.run), **measured, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu}


def _micro_batch(tokens_per_gpu: int, seq_len: int) -> int:
    return max(1, tokens_per_gpu // seq_len)


def _sized_for(config: str, seq_len: int | None, overrides: Sequence[str]) -> tuple[str, int, list[str]]:
    """(model name, L, overrides) of `config` at `seq_len` (None: the config's own), with
    `model.l_max` raised to L when the config's is shorter (the long-context configs do the same)."""
    checked = load_config(config, list(overrides))
    seq_len = seq_len or checked.seq_len
    longer = [f"model.l_max={seq_len}"] if seq_len > checked.model.l_max else []
    return checked.name, seq_len, [*longer, f"train.seq_len={seq_len}"]


def plan_scaling_runs(
    configs: Sequence[str], gpu_counts: Sequence[int], zero_stages: Sequence[int], seq_lens: Sequence[int],
    tokens_per_gpu: int, steps: int, log_every: int, overrides: Sequence[str] = (),
) -> list[ScalingRun]:  # fmt: skip
    """Every (config, L, stage, GPU count), fewest GPUs first, each config checked before any run."""
    if steps < 2 * log_every or log_every < 1:
        raise ValueError(f"steps: expected >= 2 x log_every (a warm-up window and one more), got {steps} and {log_every}")
    if tokens_per_gpu < 1:
        raise ValueError(f"tokens_per_gpu: expected an integer >= 1, got {tokens_per_gpu}")
    check_gpu_counts(gpu_counts, "--gpus")
    runs = []
    for config in dict.fromkeys(configs):
        for seq_len in dict.fromkeys(seq_lens):
            model, seq_len, sized = _sized_for(config, seq_len, overrides)
            micro = _micro_batch(tokens_per_gpu, seq_len)
            for stage in dict.fromkeys(zero_stages):
                for num_gpus in sorted(set(gpu_counts)):
                    run_overrides = (
                        *QUIET_RUN, *overrides, *sized, f"train.zero_stage={stage}", f"train.micro_batch_size={micro}",
                        f"train.global_batch_size={micro * num_gpus}", f"train.duration={steps}",
                        "train.duration_unit=steps", f"train.log_every={log_every}",
                    )  # fmt: skip
                    load_config(config, list(run_overrides))
                    name = f"{model}_L{seq_len}_zero{stage}_gpus{num_gpus}"
                    runs.append(ScalingRun(name, config, model, seq_len, stage, num_gpus, micro, run_overrides))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"configs: expected configs of different names, got {list(configs)} (runs {names})")
    return runs


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="run", disable=not enabled, dynamic_ncols=True)


def _fresh_work_dir(work_dir: str | Path | None, names: Sequence[str]) -> Path:
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="m2dist-scaling-"))
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (root / name).exists():
            raise ValueError(f"work_dir: {root / name} exists already; give a new --work-dir")
    return root.resolve()


def run_scaling(
    configs: Sequence[str], gpu_counts: Sequence[int], zero_stages: Sequence[int], seq_lens: Sequence[int], *,
    tokens_per_gpu: int = 16384, steps: int = 60, log_every: int = 10, overrides: Sequence[str] = (),
    work_dir: str | Path | None = None, launcher: str | None = None, env: Mapping[str, str] | None = None,
    timeout: float = 3600.0, progress: bool = True,
) -> tuple[list[ScalingPoint], Path]:  # fmt: skip
    """Run the weak-scaling sweep; write `scaling.md` and `scaling.json` in the work folder (a new
    temporary one unless given) and print each row as it comes. Returns (points, work folder)."""
    runs = plan_scaling_runs(configs, gpu_counts, zero_stages, seq_lens, tokens_per_gpu, steps, log_every, overrides)
    root = _fresh_work_dir(work_dir, [run.name for run in runs])
    points: list[ScalingPoint] = []
    one_gpu: dict[tuple[str, int, int], float] = {}
    with _progress(len(runs), progress) as bar:
        bar.write(f"{len(runs)} runs; folders and logs in {root}")
        bar.write(TABLE_HEADER)
        for run in runs:
            bar.set_description(run.name)
            output_dir, log = root / run.name, root / f"{run.name}.log"
            records = run_training(
                run.name, run.config, run.num_gpus, run.overrides, output_dir, log,
                launcher=launcher, env=env, timeout=timeout,
            )  # fmt: skip
            shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
            tokens_per_s = steady_tokens_per_s(records)
            key = (run.model, run.seq_len, run.zero_stage)
            if run.num_gpus == 1:
                one_gpu[key] = tokens_per_s
            peak = max(record["memory/peak_gib"] for record in records)
            efficiency = scaling_efficiency(tokens_per_s, run.num_gpus, one_gpu.get(key))
            point = ScalingPoint(run, tokens_per_s, peak, efficiency, str(log))
            points.append(point)
            bar.write(format_row(point))
            bar.update()
            # After every run, so that a failed run leaves the table of those before it.
            write_report(root / "scaling", format_scaling_table(points), [p.to_dict() for p in points])
    return points, root


TABLE_HEADER = (
    "| model | L | ZeRO | GPUs | micro-batch | tokens/s | tokens/s per GPU | scaling efficiency | peak GiB |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def format_row(p: ScalingPoint) -> str:
    run = p.run
    efficiency = "n/a" if p.efficiency is None else f"{100 * p.efficiency:.1f}%"
    return (
        f"| {run.model} | {run.seq_len} | {run.zero_stage} | {run.num_gpus} | {run.micro_batch_size} | "
        f"{p.tokens_per_s:,.0f} | {p.tokens_per_s_per_gpu:,.0f} | {efficiency} | {p.peak_memory_gib:.1f} |"
    )


def format_scaling_table(points: Sequence[ScalingPoint]) -> str:
    return "\n".join([TABLE_HEADER, *(format_row(p) for p in points)])


def write_report(prefix: Path, markdown: str, records: Any) -> None:
    """`<prefix>.md` and `<prefix>.json`."""
    prefix.with_suffix(".md").write_text(markdown + "\n")
    prefix.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")


@dataclass
class ResumeCheck:
    from_gpus: int
    to_gpus: int
    resume_at: int
    # Steps after the resume, with the loss of the uninterrupted run and of the resumed one.
    steps: list[int]
    uninterrupted: list[float]
    resumed: list[float]
    logs: list[str]

    @property
    def relative_differences(self) -> list[float]:
        return [abs(r - u) / abs(u) for u, r in zip(self.uninterrupted, self.resumed)]

    @property
    def max_relative_difference(self) -> float:
        return max(self.relative_differences)

    @property
    def mean_relative_difference(self) -> float:
        return sum(self.relative_differences) / len(self.relative_differences)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "relative_differences": self.relative_differences,
            "max_relative_difference": self.max_relative_difference,
            "mean_relative_difference": self.mean_relative_difference,
        }


def _losses_on(records: list[dict[str, Any]], steps: Sequence[int], world_size: int, name: str, log: Path) -> list[float]:
    """The losses of `steps`, checking each was logged and trained on `world_size` ranks."""
    by_step = {record["step"]: record for record in records}
    for step in steps:
        record = by_step.get(step)
        if record is None or record["world_size"] != world_size:
            found = "no record" if record is None else f"world_size {record['world_size']}"
            raise RunFailed(f"run {name}: expected step {step} on {world_size} ranks, found {found}; its log: {log}")
    return [by_step[step]["train/loss"] for step in steps]


def run_resume_check(
    config: str, from_gpus: int, to_gpus: int, resume_at: int, *, steps: int, zero_stage: int | None = None,
    seq_len: int | None = None, tokens_per_gpu: int = 16384, overrides: Sequence[str] = (),
    work_dir: str | Path | None = None, launcher: str | None = None, env: Mapping[str, str] | None = None,
    timeout: float = 3600.0, progress: bool = True,
) -> tuple[ResumeCheck, Path]:  # fmt: skip
    """`from_gpus` ranks for `steps` steps uninterrupted; then `from_gpus` ranks stopping with a
    checkpoint after `resume_at` steps, and `to_gpus` ranks resuming from it (the engine converts it
    to a universal checkpoint). The global batch (micro-batch x the larger GPU count) is the same in
    all three: the smaller count accumulates gradients. Compares the losses of every step after the
    resume; writes `resume.md` and `resume.json` in the work folder."""
    if from_gpus == to_gpus or max(from_gpus, to_gpus) % min(from_gpus, to_gpus):
        raise ValueError(
            f"resume GPU counts: expected two different counts, one dividing the other, got {from_gpus} and {to_gpus}"
        )
    if not 1 <= resume_at < steps:
        raise ValueError(f"resume_at: expected a step in [1, steps={steps}), got {resume_at}")
    check_gpu_counts([from_gpus, to_gpus], "--resume-from-gpus/--resume-to-gpus")
    model, seq_len, sized = _sized_for(config, seq_len, overrides)
    micro = _micro_batch(tokens_per_gpu, seq_len)
    stage = [f"train.zero_stage={zero_stage}"] if zero_stage is not None else []
    common = [
        *QUIET_RUN, *overrides, *sized, *stage, f"train.micro_batch_size={micro}",
        f"train.global_batch_size={micro * max(from_gpus, to_gpus)}", f"train.duration={steps}",
        "train.duration_unit=steps", "train.log_every=1",
    ]  # fmt: skip
    load_config(config, common)
    root = _fresh_work_dir(work_dir, ["uninterrupted", "resumed"])
    resumed_dir = root / "resumed"
    plan = [
        (f"uninterrupted_gpus{from_gpus}", from_gpus, common, root / "uninterrupted"),
        (f"stopped_at_{resume_at}_gpus{from_gpus}", from_gpus, [*common, f"train.stop_after={resume_at}"], resumed_dir),
        (f"resumed_gpus{to_gpus}", to_gpus, common, resumed_dir),
    ]
    records, logs = [], []
    with _progress(len(plan), progress) as bar:
        bar.write(f"{model} L={seq_len}: resume check {from_gpus} -> {to_gpus} GPUs at step {resume_at}; logs in {root}")
        for name, num_gpus, run_overrides, output_dir in plan:
            bar.set_description(name)
            log = root / f"{name}.log"
            records.append(
                run_training(name, config, num_gpus, run_overrides, output_dir, log, launcher=launcher, env=env, timeout=timeout)
            )
            logs.append(str(log))
            bar.update()
    after = list(range(resume_at + 1, steps + 1))
    full, _, resumed = records
    check = ResumeCheck(
        from_gpus, to_gpus, resume_at, after,
        _losses_on(full, after, from_gpus, plan[0][0], Path(logs[0])),
        _losses_on(resumed, after, to_gpus, plan[2][0], Path(logs[2])), logs,
    )  # fmt: skip
    _losses_on(resumed, range(1, resume_at + 1), from_gpus, plan[1][0], Path(logs[1]))
    write_report(root / "resume", format_resume_report(check), check.to_dict())
    return check, root


def format_resume_report(check: ResumeCheck) -> str:
    lines = [
        f"| step | loss, {check.from_gpus} GPUs uninterrupted | loss, resumed on {check.to_gpus} GPUs | relative difference |",
        "|---|---|---|---|",
    ]
    for step, full, resumed, diff in zip(check.steps, check.uninterrupted, check.resumed, check.relative_differences):
        lines.append(f"| {step} | {full:.4f} | {resumed:.4f} | {diff:.2e} |")
    lines.append(
        f"\nSteps {check.steps[0]}-{check.steps[-1]} after the resume at step {check.resume_at}: relative loss "
        f"difference max {check.max_relative_difference:.2e}, mean {check.mean_relative_difference:.2e}."
    )
    return "\n".join(lines)
