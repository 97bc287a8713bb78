"""Profile training steps of the engine (DeepSpeed, data loader, schedule) with torch.profiler, and
write a profile's report (`write_profile_report`, which the fine-tuning benchmark uses too).

Runs `warmup` steps, then windows of steps until the step time is steady (`bench.train.time_steps`,
whose median is the report's wall time per step), then profiles `steps` steps and writes the top
operators by device time and by host time as text: where a step's time goes, and how much of it is
the engine's own overhead (host time with the GPU idle, `device_idle`) rather than kernels. On a GPU
it then runs `steps` more steps under torch.cuda's sync debug mode and reports where the host waited
for the device (`host_syncs`): after such a wait the device idles until the host has queued work again.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib
import inspect
import re
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from m2dist.bench.train import time_steps
from m2dist.config import Config
from m2dist.engine.trainer import Trainer


def profile_training(config: Config, warmup: int, steps: int, output: Path, rows: int = 30) -> str:
    # A profile measures speed: without data.train, the embedded corpus will do for any config.
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, allow_embedded_corpus=True))
    trainer = Trainer(config)
    try:
        for _ in range(warmup):
            trainer.train_step()
        # Then windows until the step time is steady (compilation and autotuning can outlast a
        # fixed warm-up: at L=128 with CUDA graphs, 10 steps were not enough), and their median.
        step_ms = 1000 * time_steps(trainer.train_step, steps, window=max(1, min(5, steps)))
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(steps):
                trainer.train_step()
            sync()
        # Apart from the profile: the sync check's warnings cost host time of their own.
        syncs = host_syncs(trainer.train_step, steps) if trainer.device.type == "cuda" else None
    finally:
        trainer.close()
    tokens = trainer.layout.global_batch_size * trainer.seq_len
    header = (
        f"{config.name}: L={trainer.seq_len}, {tokens} tokens per step, {trainer.env.world_size} rank(s), "
        f"ZeRO-{config.train.zero_stage}, {config.train.precision}, kernels {config.model.kernels.fftconv}/"
        f"{config.model.kernels.blockdiag}\n"
        f"wall time per step {step_ms:.1f} ms ({tokens / step_ms * 1000:,.0f} tokens/s)"
    )
    return write_profile_report(prof, steps, trainer.device.type == "cuda", header, output, rows, syncs)


# The text of the warning that torch.cuda's sync debug mode gives at a synchronizing CUDA call.
SYNC_WARNING = "called a synchronizing CUDA operation"


@dataclasses.dataclass(frozen=True)
class HostSync:
    """A place in the step where the host waited for the device: the innermost Python frames of
    the synchronizing call, and how often the probed steps made it."""

    frames: tuple[str, ...]  # "file:line in function", outermost first
    count: int


def _frame(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename)
    # An installed package's file from the package's folder on (deepspeed/runtime/engine.py), any
    # other file as its folder and name (engine/trainer.py, tests/test_bench.py).
    parts = path.parts
    for i, part in enumerate(parts):
        if part in ("site-packages", "dist-packages"):
            path = Path(*parts[i + 1 :])
            break
    else:
        path = Path(*parts[-2:])
    return f"{path}:{frame.lineno} in {frame.name}"


def host_syncs(step: Callable[[], None], steps: int, frames: int = 6) -> list[HostSync]:
    """The host syncs in `steps` calls of `step`, grouped by the `frames` innermost Python frames of
    the call, most frequent first: those of torch.cuda's sync debug mode (a warning at a synchronizing
    CUDA call: `.item()`, a blocking copy, `nonzero`, a stream sync...) and the explicit waits that
    mode does not report, `torch.cuda.synchronize()` (DeepSpeed's `get_accelerator().synchronize()`)
    and `torch.cuda.Event.synchronize()`, counted where they are called. A sync inside the training
    step leaves the device idle while the host catches up (the profile's gaps); there should be none."""
    sites: collections.Counter[tuple[str, ...]] = collections.Counter()
    show = warnings.showwarning

    def record_site(*skip: str) -> None:
        # Without the frames of this module and of the files named in `skip` (the warnings machinery).
        skip = (*skip, Path(__file__).name)
        stack = [f for f in traceback.extract_stack() if Path(f.filename).name not in skip]
        sites[tuple(_frame(f) for f in stack[-frames:])] += 1

    def record(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING not in str(message):
            show(message, category, filename, lineno, file, line)
            return
        record_site("warnings.py")

    def counted(wait):
        @functools.wraps(wait)
        def counted_wait(*args, **kwargs):
            record_site()
            return wait(*args, **kwargs)

        return counted_wait

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(), contextlib.ExitStack() as waits:
        for owner in (torch.cuda, torch.cuda.Event):
            waits.enter_context(_replaced(owner, "synchronize", counted(owner.synchronize)))
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return [HostSync(site, count) for site, count in sites.most_common()]


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    """`owner.name` set to `value` inside the block, restored after."""
    original = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def format_host_syncs(syncs: list[HostSync], steps: int) -> str:
    """The host syncs per step with the frames of each place (innermost last)."""
    total = sum(s.count for s in syncs)
    head = f"Host syncs in the step (torch.cuda's sync debug mode and explicit waits, over {steps} steps)"
    lines = [f"{head}: {total / steps:g} a step" + (", none" if not syncs else ", at:")]
    for sync in syncs:
        lines.append(f"  {sync.count / steps:g} a step:")
        lines.extend(f"      {frame}" for frame in sync.frames)
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class IdleGap:
    """A stretch with no kernel or copy running on the device, between two device events."""

    start_us: float
    end_us: float
    before: str  # the device event that ran last before it
    after: str  # the device event that ended it
    host: tuple[tuple[str, float], ...]  # outermost host operators overlapping it, (name, overlap us), most first

    @property
    def us(self) -> float:
        return self.end_us - self.start_us


@dataclasses.dataclass(frozen=True)
class DeviceIdle:
    """The device's busy and idle time between its first and last event of a profile."""

    window_us: float
    busy_us: float
    min_gap_us: float
    long_gaps: int  # gaps of at least min_gap_us
    long_gap_us: float  # their total
    gaps: tuple[IdleGap, ...]  # the longest of them, longest first

    @property
    def idle_us(self) -> float:
        return self.window_us - self.busy_us


def _is_device_work(event) -> bool:
    """A kernel, copy or memset on the device; not a user annotation's range drawn on the device's
    timeline (a compiled region's `CompiledFunction`, which spans the kernels it launched)."""
    return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def device_idle(events, top: int = 5, min_gap_us: float = 20.0) -> DeviceIdle | None:
    """Where the device waits: the union of the device events' time ranges (`prof.events()`: CUDA
    kernels, copies, memsets) against the span from the first to the last, and the `top` longest
    gaps of at least `min_gap_us` with the outermost host operators running during each. None
    without device events."""
    device = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if _is_device_work(e) and e.time_range.end > e.time_range.start
    )
    if not device:
        return None
    busy, gaps = 0.0, []
    run_start, run_end, last = device[0]  # the current run of overlapping events; `last` ends it
    for start, end, name in device[1:]:
        if start > run_end:
            busy += run_end - run_start
            if start - run_end >= min_gap_us:
                gaps.append((run_end, start, last, name))
            run_start = start
        if end >= run_end:
            run_end, last = end, name
    busy += run_end - run_start
    gaps.sort(key=lambda g: g[1] - g[0], reverse=True)
    host = [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    chosen = []
    for start, end, before, after in gaps[:top]:
        overlaps = {}
        for e in host:
            overlap = min(end, e.time_range.end) - max(start, e.time_range.start)
            if overlap > 0:
                overlaps[e.name] = overlaps.get(e.name, 0.0) + overlap
        ranked = tuple(sorted(overlaps.items(), key=lambda kv: -kv[1])[:3])
        chosen.append(IdleGap(start, end, before, after, ranked))
    long_gap_us = sum(end - start for start, end, _, _ in gaps)
    return DeviceIdle(run_end - device[0][0], busy, min_gap_us, len(gaps), long_gap_us, tuple(chosen))


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def format_device_idle(idle: DeviceIdle, steps: int) -> str:
    """The idle summary per step and the longest gaps with what the host was doing."""
    lines = [
        f"Device idle between its first and last event: {idle.idle_us / steps / 1000:.2f} ms a step of "
        f"{idle.window_us / steps / 1000:.2f} ({idle.idle_us / idle.window_us:.1%}), of which "
        f"{idle.long_gap_us / steps / 1000:.2f} ms in {idle.long_gaps / steps:,.0f} gaps of {idle.min_gap_us:.0f} us or more a step, "
        "the rest between kernels; the longest gaps:"
    ]
    for gap in idle.gaps:
        host = "; ".join(f"{_short(name)} {us:.0f} us" for name, us in gap.host) or "no host operator"
        lines.append(f"  {gap.us:8.0f} us after {_short(gap.before)} until {_short(gap.after)}; host: {host}")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class ShapedOperator:
    """An aten operator called outside compiled code with one set of input shapes, per step."""

    name: str
    shapes: str
    calls: float
    device_us: float  # the kernels it launched, its children's included


def aten_by_input_shape(averages, steps: int, top: int = 10) -> list[ShapedOperator]:
    """The `top` aten operators by the device time of the kernels they launch, one row per set of
    input shapes (`prof.key_averages(group_by_input_shape=True)` of a profile recorded with
    `record_shapes=True`): which tensors an eager copy or cast moves, where the flat table only
    names its kernel. Operators inside CUDA graphs or compiled code launch nothing from the host and
    do not appear."""
    rows = [
        ShapedOperator(e.key, str(e.input_shapes), e.count / steps, e.device_time_total / steps)
        for e in averages
        if e.device_type == DeviceType.CPU and e.key.startswith("aten::") and e.device_time_total > 0
    ]
    return sorted(rows, key=lambda r: -r.device_us)[:top]


def format_aten_by_input_shape(rows: list[ShapedOperator]) -> str:
    lines = ["aten operators by input shapes (device time of the kernels they launch, per step):"]
    lines += [f"  {r.device_us:9.1f} us  {r.calls:6.1f} calls  {r.name} {_short(r.shapes, 100)}" for r in rows]
    return "\n".join(lines) + "\n"


# The project's Triton kernels by the kind reported, from the modules that define them. Each kernel's
# name is the project's only one of that name (a module's forward is `_toeplitz_fwd_kernel`, not
# `_fwd_kernel`), so that a profile's lines under a kind tell the kernels apart.
TRITON_KERNEL_KINDS = (
    ("M2 convolution kernels (Triton: Toeplitz, FFT, cuFFT path's, short convolution, fused mixer)", (
        "kernels.fftconv.triton_toeplitz", "kernels.fftconv.triton_fftconv", "kernels.fftconv.triton_cufft",
        "kernels.mixer.triton_short_conv", "kernels.mixer.triton_mixer",
    )),
    ("block-diagonal GLU kernels (Triton: activation, matmuls, bias and residual)", ("kernels.blockdiag.triton_blockdiag",)),
    ("layout transposes (Triton)", ("kernels.mixer.triton_layout",)),
)  # fmt: skip

# Other device events by name, the first match wins; what matches none is "other".
KERNEL_KINDS = (
    ("fused AdamW", r"FusedAdam|fused_adam"),
    ("other multi-tensor kernels (norms, scaling)", r"multi_tensor_apply"),
    ("fp32 GEMMs (the filter MLPs)", r"gemm_f32f32|sgemm|f32f32_f32f32"),
    ("attention", r"fmha|flash|attention|cudnn"),
    ("cuFFT transforms (the long convolution's from L=512 on)", r"vector_fft|regular_fft|^void fft"),
    ("GEMMs (cuBLAS)", r"nvjet|cutlass|xmma_gemm|gemm"),
    ("Inductor's fused kernels (compiled code)", r"^triton_"),
    ("LayerNorm, forward and backward", r"layer_norm|LayerNorm|GammaBeta"),
    ("reductions (bias gradients, sums)", r"reduce_kernel"),
    ("embedding gradients", r"embedding"),
    ("random numbers and dropout", r"distribution|dropout"),
    ("concatenation", r"CatArray"),
    ("strided elementwise (aten's non-vectorized kernel: layout copies, broadcasts)", r"native::elementwise_kernel"),
    ("other elementwise (casts, adds)", r"elementwise_kernel"),
    ("gathers and index kernels", r"gather|index"),
    ("copies and memsets", r"^Memcpy|^Memset"),
)


@functools.cache
def project_triton_kernels() -> dict[str, str]:
    """{kernel name: kind} for the project's Triton kernels (`TRITON_KERNEL_KINDS`; a name that two
    kinds define goes to the first)."""
    kinds: dict[str, str] = {}
    for kind, modules in TRITON_KERNEL_KINDS:
        for module_name in modules:
            for value in vars(importlib.import_module(module_name)).values():
                # A Triton kernel wraps its Python function (`fn`), as do autotuners around it, and
                # the interpreter's functions (TRITON_INTERPRET=1)
                function = value
                while not inspect.isfunction(function) and hasattr(function, "fn"):
                    function = function.fn
                if function is not value and inspect.isfunction(function):
                    kinds.setdefault(function.__name__, kind)
    return kinds


def kernel_kind(name: str) -> str:
    """The kind of a device event (kernel, copy or memset) by its name."""
    kind = project_triton_kernels().get(name)
    if kind is not None:
        return kind
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


@dataclasses.dataclass(frozen=True)
class KernelTime:
    name: str
    device_us: float  # per step
    launches: float  # per step


@dataclasses.dataclass(frozen=True)
class KernelKind:
    kind: str
    device_us: float  # per step
    launches: float  # per step
    # the kind's kernels that took the most time, most first (up to `kernels_by_kind`'s `top`)
    kernels: tuple[KernelTime, ...] = ()


def kernels_by_kind(device_events, steps: int, top: int = 4) -> list[KernelKind]:
    """The device time and launches per step of each kind of kernel (`kernel_kind`), most time
    first, each with its `top` kernels by time, from a profile's averages of its device events
    (`key`, `self_device_time_total`, `count`)."""
    by_kind: dict[str, list[KernelTime]] = {}
    for event in device_events:
        kernel = KernelTime(event.key, event.self_device_time_total / steps, event.count / steps)
        by_kind.setdefault(kernel_kind(event.key), []).append(kernel)
    rows = []
    for kind, kernels in by_kind.items():
        kernels.sort(key=lambda k: -k.device_us)
        total_us, launches = sum(k.device_us for k in kernels), sum(k.launches for k in kernels)
        rows.append(KernelKind(kind, total_us, launches, tuple(kernels[:top])))
    return sorted(rows, key=lambda r: -r.device_us)


def format_kernels_by_kind(rows: list[KernelKind]) -> str:
    """Each kind's line and, where it has more than one kernel, its top kernels under it."""
    lines = ["Device time per step by kind of kernel (ms, launches; a kind's top kernels under it):"]
    for r in rows:
        lines.append(f"  {r.device_us / 1000:8.2f} ms {r.launches:8,.0f}  {r.kind}")
        if len(r.kernels) > 1:
            lines += [f"      {k.device_us / 1000:8.2f} ms {k.launches:6,.0f}  {_short(k.name, 90)}" for k in r.kernels]
    total_us, launches = sum(r.device_us for r in rows), sum(r.launches for r in rows)
    lines.append(f"  {total_us / 1000:8.2f} ms {launches:8,.0f}  all")
    return "\n".join(lines) + "\n"


def write_profile_report(
    prof, steps: int, cuda: bool, header: str, output: Path, rows: int = 30, syncs: list[HostSync] | None = None
) -> str:
    """Write `header`, the device time per step (the sum of the kernels over `steps` profiled steps),
    where the device waited (`device_idle`, on a GPU), the host syncs in the step (`host_syncs`, where
    `syncs` gives them), that time by kind of kernel
    (`kernels_by_kind`, on a GPU), the eager aten operators by input shapes
    (`aten_by_input_shape`, on a GPU; shapes where `prof` recorded them) and the profile's top
    operators by device time and by host time to `output`; returns the header line."""
    averages = prof.key_averages()
    device_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    # Only the device's own events (kernels, copies): an operator's "self device time" repeats the
    # time of the kernels it launched.
    device_events = []
    if cuda:
        device_events = [e for e in averages if _is_device_work(e)]
        device_us = sum(e.self_device_time_total for e in device_events) / steps
        launches = f", {sum(e.count for e in device_events) / steps:,.0f} kernels and copies"
    else:
        device_us = sum(e.self_cpu_time_total for e in averages) / steps
        launches = ""
    header = f"{header}; device time per step (sum of kernels) {device_us / 1000:.1f} ms{launches}\n"
    idle = device_idle(prof.events()) if cuda else None
    shaped = aten_by_input_shape(prof.key_averages(group_by_input_shape=True), steps) if cuda else []
    report = (
        header
        + ("" if idle is None else "\n" + format_device_idle(idle, steps))
        + ("" if syncs is None else "\n" + format_host_syncs(syncs, steps))
        + ("" if not device_events else "\n" + format_kernels_by_kind(kernels_by_kind(device_events, steps)))
        + ("" if not shaped else "\n" + format_aten_by_input_shape(shaped))
        + "\nTop operators by self device time:\n"
        + averages.table(sort_by=device_key, row_limit=rows)
        + "\nTop operators by total host time:\n"
        + averages.table(sort_by="cpu_time_total", row_limit=rows)
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    return header
