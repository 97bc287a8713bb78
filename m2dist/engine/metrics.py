"""Throughput, model FLOPs and MFU, data wait, memory, ETA: one object, printed by rank 0 and
appended to `<output_dir>/metrics.jsonl`, one JSON object per log step (and one per evaluation,
which `read_metrics` merges into its step's record).

Model FLOPs per token count the matmuls of the config (2 FLOPs per multiply-add), forward x 3 for
a training step (backward = 2 x forward):
- M2 layer: in_linear 6d^2 + out_linear 2d^2 + block-diagonal GLU MLP 6 d I / nblocks; the FFT
  convolutions are O(L log L) per channel and not counted.
- BERT layer: Q, K, V, output 8d^2 + MLP 4 d I + attention scores and values 4 L d.
- MLM head on the masked share p of tokens: p (2d^2 + 2dV).
"""

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m2dist.config import ModelConfig

# Rank 0's log steps and evaluations, one JSON object a line, appended across resumes.
METRICS_FILE = "metrics.jsonl"
# The scalars of an evaluation, appended as their own line after the train record of the step.
EVAL_PREFIX = "eval/"

# Dense bf16 / fp32 (non-tensor-core) peaks from the vendors' datasheets, by device-name substring.
PEAK_FLOPS = {
    "H200": (989.4e12, 66.9e12),
    "H100 PCIe": (756.0e12, 51.0e12),
    "H100": (989.4e12, 66.9e12),
    "A100": (312.0e12, 19.5e12),
    "L40S": (362.0e12, 91.6e12),
    "A10G": (70.0e12, 31.2e12),
    "L4": (121.0e12, 30.3e12),
}


def forward_flops_per_token(config: ModelConfig, seq_len: int, mlm_probability: float) -> float:
    d, inner = config.hidden_size, config.intermediate_size
    if config.architecture == "m2":
        layer = 8 * d * d + 6 * d * inner / config.mlp_nblocks
    else:
        layer = 8 * d * d + 4 * d * inner + 4 * seq_len * d
    head = mlm_probability * (2 * d * d + 2 * d * config.vocab_size)
    return config.num_layers * layer + head


def training_flops_per_token(config: ModelConfig, seq_len: int, mlm_probability: float) -> float:
    return 3 * forward_flops_per_token(config, seq_len, mlm_probability)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The datasheet peak of this GPU at the training precision, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAK_FLOPS.items():
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@dataclass
class ThroughputMeter:
    """Accumulates step and data-wait times between log lines. The ETA comes from the steps after
    the first log window, which holds the one-off costs (compilation, CUDA-graph capture, autotuning,
    the loader's start); until that window ends, from all steps so far."""

    tokens_per_step: int
    world_size: int
    flops_per_token: float
    peak: float | None
    device: torch.device
    # The clock is looked up at each call (tests replace it).
    _window_start: float = field(default_factory=lambda: time.perf_counter())
    _window_steps: int = 0
    _window_data_wait: float = 0.0
    _train_start: float = field(default_factory=lambda: time.perf_counter())
    _train_steps: int = 0
    # (time, steps) at the end of the first window: where the ETA's steady rate starts.
    _steady_from: tuple[float, int] | None = None

    def record_step(self, data_wait_seconds: float) -> None:
        self._window_steps += 1
        self._train_steps += 1
        self._window_data_wait += data_wait_seconds

    def summary(self, steps_left: int) -> dict[str, float]:
        """Metrics over the steps since the last summary; resets the window."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        tokens_per_s = self._window_steps * self.tokens_per_step / elapsed
        per_device = tokens_per_s / self.world_size
        metrics = {
            "throughput/tokens_per_s": tokens_per_s,
            "throughput/tokens_per_s_per_device": per_device,
            "throughput/tflops_per_device": per_device * self.flops_per_token / 1e12,
            "throughput/data_wait_pct": 100.0 * self._window_data_wait / elapsed,
            "memory/peak_gib": peak_memory_gib(self.device),
            "time/eta_s": self._seconds_per_step(now) * steps_left,
        }
        if self.peak is not None:
            metrics["throughput/mfu"] = per_device * self.flops_per_token / self.peak
        self._window_start, self._window_steps, self._window_data_wait = now, 0, 0.0
        if self._steady_from is None:
            self._steady_from = (now, self._train_steps)
        return metrics

    def _seconds_per_step(self, now: float) -> float:
        if self._steady_from is not None and self._train_steps > self._steady_from[1]:
            start, steps = self._steady_from
            return (now - start) / (self._train_steps - steps)
        return (now - self._train_start) / max(self._train_steps, 1)


def console_line(step: int, total: int, scalars: dict[str, float]) -> str:
    mfu = scalars.get("throughput/mfu")
    return (
        f"step {step:>6}/{total}  loss {scalars['train/loss']:.4f}  lr {scalars['train/lr']:.2e}  "
        f"grad_norm {scalars['train/grad_norm']:.3f}  tokens/s {scalars['throughput/tokens_per_s']:,.0f} "
        f"({scalars['throughput/tokens_per_s_per_device']:,.0f}/device)  "
        f"TFLOP/s {scalars['throughput/tflops_per_device']:.1f}  MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}  "
        f"data wait {scalars['throughput/data_wait_pct']:.1f}%  mem {scalars['memory/peak_gib']:.2f} GiB  "
        f"ETA {format_duration(scalars['time/eta_s'])}"
    )


def append_metrics(path: Path, step: int, scalars: dict[str, float], **fields: Any) -> None:
    """Append `{"step": step, **fields, **scalars}` as one line to `path` (rank 0 only)."""
    with open(path, "a") as out:
        out.write(json.dumps({"step": step, **fields, **scalars}) + "\n")


def is_eval_record(record: dict[str, Any]) -> bool:
    """True for the line an evaluation appends (step and `eval/*` scalars only)."""
    keys = set(record) - {"step"}
    return bool(keys) and all(key.startswith(EVAL_PREFIX) for key in keys)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl by step, oldest first, an evaluation's scalars merged into the
    train record of its step. Steps logged again after a resume from an older checkpoint (a run
    killed between checkpoints) keep their newest record: a train record replaces the step's record,
    its old evaluation included."""
    records: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            step = int(record["step"])
            if is_eval_record(record) and step in records:
                records[step] = {**records[step], **record}
            else:
                records[step] = record
    return [records[step] for step in sorted(records)]
