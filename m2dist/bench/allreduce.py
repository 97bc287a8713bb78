"""All-reduce bandwidth of the process group the engine uses: NCCL on GPUs, gloo on CPUs.

Run under a launcher, one process per device (tools/bench_allreduce.py). For each size, fp32 tensors
are summed `warmup` times untimed, then `repeats` times, each after a barrier; a repeat's time is the
slowest rank's, and the reported time is the median over repeats. Bandwidths follow nccl-tests
(doc/PERFORMANCE.md): algbw = bytes / time; busbw = algbw x 2(n-1)/n, the share of data every link
carries in a ring all-reduce, comparable with the hardware's link bandwidth whatever n is.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from m2dist.engine.distributed import init_distributed

_SIZE = re.compile(r"^(\d+)([KMG]?)i?B?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


@dataclass(frozen=True)
class AllReduceResult:
    size_bytes: int
    time_s: float
    world_size: int

    @property
    def algbw(self) -> float:
        """Bytes per second: the tensor's size over the time of one all-reduce."""
        return self.size_bytes / self.time_s

    @property
    def busbw(self) -> float:
        return bus_bandwidth(self.algbw, self.world_size)


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests' all-reduce bus bandwidth: algbw x 2(n-1)/n (0 for one rank, which sends nothing)."""
    if world_size < 1:
        raise ValueError(f"world_size: expected an integer >= 1, got {world_size}")
    return algbw * 2 * (world_size - 1) / world_size


def parse_size(text: str) -> int:
    """Bytes from '4096', '64K', '1M', '1GiB' (binary units)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"size: expected a number of bytes such as 4096, 64K, 1M or 1G, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def size_range(min_bytes: int, max_bytes: int, factor: int = 2) -> list[int]:
    """min_bytes, min_bytes x factor, ... up to max_bytes, as nccl-tests' -b/-e/-f."""
    if not 4 <= min_bytes <= max_bytes or min_bytes % 4 or factor < 2:
        raise ValueError(
            "sizes: expected 4 <= min <= max bytes, min a multiple of 4 (fp32) and factor >= 2, "
            f"got min={min_bytes} max={max_bytes} factor={factor}"
        )
    sizes = [min_bytes]
    while sizes[-1] * factor <= max_bytes:
        sizes.append(sizes[-1] * factor)
    return sizes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_all_reduce(size_bytes: int, device: torch.device, repeats: int, warmup: int) -> float:
    """Median over `repeats` of the slowest rank's time of one all-reduce of `size_bytes` of fp32."""
    # Zeros stay zeros however often they are summed (ones would overflow over many repeats).
    tensor = torch.zeros(size_bytes // 4, dtype=torch.float32, device=device)
    for _ in range(warmup):
        dist.all_reduce(tensor)
    _synchronize(device)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist())


def benchmark_all_reduce(sizes: list[int], repeats: int = 20, warmup: int = 5) -> list[AllReduceResult]:
    """Collective: every rank of a launcher (torchrun, deepspeed, srun) calls it. Joins the process
    group, times each size, prints the table from rank 0, leaves the group; returns the results."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"expected repeats >= 1 and warmup >= 0, got repeats={repeats} warmup={warmup}")
    # NVLink SHARP (multicast) stays off, as in the training runs.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = init_distributed(device)
    results = [AllReduceResult(size, time_all_reduce(size, device, repeats, warmup), env.world_size) for size in sizes]
    if env.is_main:
        print(describe_group(), flush=True)
        print(format_table(results), flush=True)
    dist.destroy_process_group()
    return results


def format_size(size_bytes: int) -> str:
    for unit in ("G", "M", "K"):
        if size_bytes >= _UNITS[unit] and size_bytes % _UNITS[unit] == 0:
            return f"{size_bytes // _UNITS[unit]} {unit}iB"
    return f"{size_bytes} B"


def format_table(results: list[AllReduceResult]) -> str:
    """Markdown table; GB/s are 1e9 bytes per second, as nccl-tests prints."""
    lines = ["| size | time (us) | algbw (GB/s) | busbw (GB/s) |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {format_size(r.size_bytes)} | {1e6 * r.time_s:,.1f} | {r.algbw / 1e9:.3f} | {r.busbw / 1e9:.3f} |")
    return "\n".join(lines)


def describe_group() -> str:
    """One line: ranks, backend and device of the current process group."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"all-reduce of fp32 over {dist.get_world_size()} ranks, backend {dist.get_backend()}, {device}"
