"""Fine-tuning throughput at GLUE's batch sizes, M2 beside BERT in one run, and the whole-GLUE time.

Each row is `python tools/eval_glue.py`'s training step (`m2dist.glue.step.FinetuneStep`: the
classifier's forward, backward and fused AdamW under bf16 autocast, the schedule stepped on the
host) on random sequences padded to L, with the config's GLUE optimizer settings and a freshly
initialised model (speed does not depend on the weights). Steps run back to back as in an epoch,
without waiting for each one. Reported per row:

- the steady-state seconds per step (after a warm-up until two blocks of steps agree within 3%,
  the median of blocks timed in turn with the run's other models, `benchmark_finetune_steps`),
  and the seconds per epoch of the labeled-text task (Rotten Tomatoes' 11,573 training snippets);
- the first-epoch overhead: the time of the first `FIRST_STEPS` steps (kernel compilation,
  autotuning, the CUDA graph's capture) beyond as many steady-state steps.

`glue_wall_time` estimates a whole GLUE run (every task's epochs and seeds, dev evaluation not
included) from the per-batch-size step times, on one GPU and on several.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from m2dist.bench.profile import write_profile_report
from m2dist.config import load_config
from m2dist.glue.config import GLUE_CONFIG_DIR, GlueConfig, load_glue_config
from m2dist.glue.finetune import build_optimizer, build_schedule, compile_if_asked
from m2dist.glue.step import FinetuneStep
from m2dist.models import SequenceClassifier

# Training examples per task (GLUE's train splits; "text" is Rotten Tomatoes' training split).
TRAIN_EXAMPLES = {
    "mnli": 392_702, "qqp": 363_846, "qnli": 104_743, "sst2": 67_349, "cola": 8_551,
    "stsb": 5_749, "mrpc": 3_668, "rte": 2_490, "text": 11_573,
}  # fmt: skip
FIRST_STEPS = 20
BLOCK_STEPS = 20
PROFILE_STEPS = 10


@dataclass
class FinetuneResult:
    model: str
    batch_size: int
    cuda_graph: bool
    step_ms: float
    first_overhead_s: float
    peak_memory_gib: float
    compiled: bool = False

    def epoch_seconds(self, examples: int) -> float:
        return math.ceil(examples / self.batch_size) * self.step_ms / 1000


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finetune_runner(
    config_name: str, glue: GlueConfig, batch_size: int, cuda_graph: bool, device: torch.device, seq_len: int,
    overrides: tuple[str, ...],
) -> tuple[Callable[[int], float], FinetuneStep, int]:  # fmt: skip
    """(run, step, seq_len): `run(n)` trains n fine-tuning steps of `config_name` at `batch_size`
    on random sequences, as an epoch runs them, and returns their seconds."""
    model_config = load_config(config_name, list(overrides)).model
    seq_len = seq_len or model_config.l_max
    torch.manual_seed(0)
    model = SequenceClassifier(model_config, num_labels=2).to(device).train()
    compile_if_asked(model, glue)
    settings = dataclasses.replace(glue.tasks.text, batch_size=batch_size)
    optimizer = build_optimizer(model, glue, settings, device)
    examples = batch_size * 64
    schedule = build_schedule(optimizer, 10**6, glue.warmup_fraction)
    lengths = torch.randint(seq_len // 8, seq_len + 1, (examples,), device=device)
    split = {
        "input_ids": torch.randint(1000, model_config.vocab_size, (examples, seq_len), device=device, dtype=torch.int32),
        "token_type_ids": torch.zeros(examples, seq_len, device=device, dtype=torch.int8),
        "attention_mask": torch.arange(seq_len, device=device)[None] < lengths[:, None],
        "labels": torch.randint(0, 2, (examples,), device=device),
    }
    step = FinetuneStep(model, optimizer, split, batch_size, bf16=device.type == "cuda", cuda_graph=cuda_graph)
    order = torch.randperm(examples, device=device)
    position = 0

    def run(n: int) -> float:
        nonlocal position
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(n):
            if position + batch_size > examples:
                position = 0
            step(order[position : position + batch_size])
            schedule.step()
            position += batch_size
        _synchronize(device)
        return time.perf_counter() - started

    return run, step, seq_len


@dataclass(frozen=True)
class FinetuneCase:
    """One row to time: a pretraining config with its overrides (key=value) and its GLUE protocol;
    with `profile_to`, the step's profile report goes there."""

    config_name: str
    glue: GlueConfig
    overrides: tuple[str, ...] = ()
    profile_to: Path | None = None

    @property
    def label(self) -> str:
        return self.config_name + "".join(f", {o}" for o in self.overrides)


# Timed blocks per case, taken in turn with the other cases of the run.
ROUNDS = 5


def _settle(run: Callable[[int], float], block_steps: int) -> None:
    """Blocks of steps until two in a row agree within 3% (at most 10 more)."""
    previous = run(block_steps) / block_steps
    for _ in range(10):
        current = run(block_steps) / block_steps
        if abs(current - previous) <= 0.03 * previous:
            return
        previous = current


def benchmark_finetune_steps(
    cases: list[FinetuneCase],
    batch_size: int,
    cuda_graph: bool,
    device: torch.device,
    seq_len: int = 128,
    first_steps: int = FIRST_STEPS,
    block_steps: int = BLOCK_STEPS,
    rounds: int = ROUNDS,
) -> list[FinetuneResult]:
    """The fine-tuning step of each case at `batch_size`, timed as an epoch runs it, side by side.

    Each case is built and warmed up in turn (its first `first_steps` steps: compilation,
    autotuning, the graph's capture; then blocks of `block_steps` until two agree within 3%). Then
    the cases run blocks of 2 x `block_steps` steps in turn, `rounds` rounds, and a row's step time
    is the median of its blocks. Every case is timed in the same stretch of the run, so no row
    depends on its position in it: timed one after the other, on one H100, whichever model came
    second ran 3-5% slower at batch 16 and 32 than when it came first (the cause not measured;
    most likely the GPU's clocks under minutes of load). A case's peak memory is what it
    allocated beyond the cases built before it. With a case's `profile_to`, `PROFILE_STEPS` more
    of its steps run under torch.profiler after the timing, and the report (top operators by
    device and host time) goes there."""
    warmed = []
    for case in cases:
        base = 0
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        run, step, length = _finetune_runner(case.config_name, case.glue, batch_size, cuda_graph, device, seq_len, case.overrides)
        first = run(first_steps)
        _settle(run, block_steps)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else 0.0
        warmed.append((run, step, length, first, peak))
    blocks: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):
        for (run, *_), times in zip(warmed, blocks):
            times.append(run(2 * block_steps) / (2 * block_steps))
    results = []
    for case, (run, step, length, first, peak), times in zip(cases, warmed, blocks):
        step_s = statistics.median(times)
        if case.profile_to is not None:
            _profile(run, step, case, batch_size, length, step_s, device)
        results.append(
            FinetuneResult(case.label, batch_size, step.graph is not None, 1000 * step_s, first - first_steps * step_s, peak, case.glue.compile)
        )
    return results


def _profile(run, step: FinetuneStep, case: FinetuneCase, batch_size: int, seq_len: int, step_s: float, device) -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        run(PROFILE_STEPS)
    mode = "CUDA graph" if step.graph is not None else "eager"
    header = (
        f"fine-tuning step of {case.label}: batch {batch_size}, L={seq_len}, {mode}"
        f"{', compiled' if case.glue.compile else ''}; {1000 * step_s:.2f} ms a step unprofiled"
    )
    write_profile_report(prof, PROFILE_STEPS, device.type == "cuda", header, case.profile_to, rows=60)


def _concurrent_job(args: tuple, barrier, results) -> None:
    """One of `concurrent_step_ms`'s processes: warm up, wait for the others, time the steps."""
    config_name, glue, batch_size, cuda_graph, device, seq_len, overrides, warmup, steps = args
    try:
        run, _, _ = _finetune_runner(config_name, glue, batch_size, cuda_graph, torch.device(device), seq_len, overrides)
        run(warmup)
        barrier.wait()
        results.put(("ok", run(steps)))
    except BaseException as err:  # reported by the parent; the others must not wait for this one
        barrier.abort()
        results.put(("error", f"{type(err).__name__}: {err}"))


def concurrent_step_ms(
    config_name: str,
    glue: GlueConfig,
    batch_size: int,
    cuda_graph: bool,
    device: torch.device,
    jobs: int,
    seq_len: int = 128,
    warmup: int = FIRST_STEPS + BLOCK_STEPS,
    steps: int = 4 * BLOCK_STEPS,
    overrides: tuple[str, ...] = (),
    timeout_s: float = 900.0,
) -> float:
    """Milliseconds per step of the whole device when `jobs` processes fine-tune on it at once, as
    `tools/eval_glue.py --jobs-per-device` runs them: each process builds and warms up its own step
    (`warmup` steps), all start `steps` timed steps together, and the slowest one's time is divided
    by the steps of all. Below the step time of one job alone, several jobs raise the throughput."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(jobs), ctx.Queue()
    args = (config_name, glue, batch_size, cuda_graph, str(device), seq_len, tuple(overrides), warmup, steps)
    procs = [ctx.Process(target=_concurrent_job, args=(args, barrier, results)) for _ in range(jobs)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=timeout_s) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    errors = [message for status, message in outcomes if status == "error"]
    if errors:
        raise RuntimeError(f"a concurrent fine-tuning job of {config_name} at batch {batch_size} failed: {errors[0]}")
    return 1000 * max(seconds for _, seconds in outcomes) / (jobs * steps)


GLUE_CONFIG_FOR = {"bert-base": "default"}


def glue_config_for(config_name: str) -> GlueConfig:
    """The GLUE protocol file of a pretraining config: configs/glue/<name>.yaml, else the default."""
    name = GLUE_CONFIG_FOR.get(config_name, config_name)
    return load_glue_config(name if (GLUE_CONFIG_DIR / f"{name}.yaml").exists() else "default")


def glue_wall_time(glue: GlueConfig, step_ms: dict[int, float], overhead_s: dict[int, float], devices: int) -> float:
    """Seconds of a whole GLUE run's training (every task's epochs x seeds; no evaluation) on
    `devices` GPUs running one job each: jobs placed longest first on the first free GPU, the
    MNLI-initialised tasks once every MNLI job is done. `step_ms`, `overhead_s`: per batch size."""
    first, after_mnli = [], []
    for task, examples in TRAIN_EXAMPLES.items():
        if task == "text":
            continue
        settings = getattr(glue.tasks, task)
        batch = settings.batch_size
        seconds = settings.epochs * math.ceil(examples / batch) * step_ms[batch] / 1000 + overhead_s[batch]
        jobs = after_mnli if settings.init_from_mnli else first
        jobs.extend((seconds, task) for _ in settings.seeds)
    free = [0.0] * devices
    mnli_done = 0.0
    for seconds, task in sorted(first, reverse=True):
        start = heapq.heappop(free)
        heapq.heappush(free, start + seconds)
        if task == "mnli":
            mnli_done = max(mnli_done, start + seconds)
    for seconds, _ in sorted(after_mnli, reverse=True):
        start = max(heapq.heappop(free), mnli_done)
        heapq.heappush(free, start + seconds)
    return max(free)


HEADER = (
    "| model | batch | step | ms/step | s/epoch (text, 11,573) | first-epoch overhead s | peak GiB |\n"
    "|---|---|---|---|---|---|---|"
)


def format_row(r: FinetuneResult) -> str:
    mode = ("CUDA graph" if r.cuda_graph else "eager") + (", compiled" if r.compiled else "")
    return (
        f"| {r.model} | {r.batch_size} | {mode} | {r.step_ms:.2f} | {r.epoch_seconds(TRAIN_EXAMPLES['text']):.1f} | "
        f"{r.first_overhead_s:.1f} | {r.peak_memory_gib:.1f} |"
    )


MODE_LABELS = {"graph": "CUDA graph", "compiled": "CUDA graph, compiled", "eager": "eager"}


def format_concurrent(spec: str, mode: str, batch: int, jobs: int, shared_ms: float, alone_ms: float) -> str:
    """A row of the several-jobs table: the GPU's ms per step with `jobs` at once, its throughput
    against one job alone (`alone_ms` a step)."""
    return f"| {spec} | {MODE_LABELS[mode]} | {batch} | {jobs} | {shared_ms:.2f} | {alone_ms / shared_ms:.2f}x |"
