"""Profile training steps of the engine (DeepSpeed, data loader, schedule) with torch.profiler, and
write a profile's report (`write_profile_report`, which the fine-tuning benchmark uses too).

Runs `warmup` steps, then profiles `steps` steps and writes the top operators by device time and
by host time as text: where a step's time goes, and how much of it is the engine's own overhead
(host time with the GPU idle) rather than kernels.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from m2dist.config import Config
from m2dist.engine.trainer import Trainer


def profile_training(config: Config, warmup: int, steps: int, output: Path, rows: int = 30) -> str:
    # A profile measures speed: without data.train, the embedded corpus will do for any config.
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, allow_embedded_corpus=True))
    trainer = Trainer(config)
    try:
        for _ in range(warmup):
            trainer.train_step()
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync()
        step_ms = 1000 * (time.perf_counter() - start) / steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                trainer.train_step()
            sync()
    finally:
        trainer.close()
    tokens = trainer.layout.global_batch_size * trainer.seq_len
    header = (
        f"{config.name}: L={trainer.seq_len}, {tokens} tokens per step, {trainer.env.world_size} rank(s), "
        f"ZeRO-{config.train.zero_stage}, {config.train.precision}, kernels {config.model.kernels.fftconv}/"
        f"{config.model.kernels.blockdiag}\n"
        f"wall time per step {step_ms:.1f} ms ({tokens / step_ms * 1000:,.0f} tokens/s)"
    )
    return write_profile_report(prof, steps, trainer.device.type == "cuda", header, output, rows)


def write_profile_report(prof, steps: int, cuda: bool, header: str, output: Path, rows: int = 30) -> str:
    """Write `header`, the device time per step (the sum of the kernels over `steps` profiled steps)
    and the profile's top operators by device time and by host time to `output`; returns the first
    two."""
    averages = prof.key_averages()
    device_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    # Only the device's own events (kernels, copies): an operator's "self device time" repeats the
    # time of the kernels it launched.
    if cuda:
        device_events = [e for e in averages if e.device_type == DeviceType.CUDA]
        device_us = sum(e.self_device_time_total for e in device_events) / steps
        launches = f", {sum(e.count for e in device_events) / steps:,.0f} kernels and copies"
    else:
        device_us = sum(e.self_cpu_time_total for e in averages) / steps
        launches = ""
    header = f"{header}; device time per step (sum of kernels) {device_us / 1000:.1f} ms{launches}\n"
    report = (
        header
        + "\nTop operators by self device time:\n"
        + averages.table(sort_by=device_key, row_limit=rows)
        + "\nTop operators by total host time:\n"
        + averages.table(sort_by="cpu_time_total", row_limit=rows)
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    return header
