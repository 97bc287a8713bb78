"""Throughput of the data path (MDS shards -> masked MLM batches), what tools/bench_data.py runs.

Goal of the data issue: each loader worker delivers at least 10x the tokens/s that one GPU consumes
training M2-BERT-80M, so that a rank's workers never hold its GPU back.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from m2dist.config import config_from_dict
from m2dist.data.corpus import EMBEDDED_CORPUS
from m2dist.data.loader import build_mlm_dataloader, close_mlm_dataloader
from m2dist.data.manifest import MANIFEST_NAME
from m2dist.data.prepare import prepare_mds

# Tokens/s of one H200 training M2-BERT-80M through m2dist's engine (the default step, 32,768
# tokens a step; docs/performance.md's engine table: 2026-12-06 at L=128, 2026-12-05 at 8192), by
# sequence length. The nearest length below is used: lengths in between get the shorter length's
# (higher) rate.
GPU_TOKENS_PER_S_80M = {128: 582_265, 8192: 202_911}
GOAL_RATIO = 10.0


@dataclass
class BenchResult:
    seq_len: int
    micro_batch_size: int
    num_workers: int
    batches: int
    seconds: float
    # Token positions delivered per second (B * L per batch), all workers together.
    tokens_per_s: float
    # The same per worker process (per process when num_workers is 0).
    tokens_per_s_per_worker: float
    # tokens_per_s_per_worker / one GPU's consumption: the goal is >= 10.
    ratio_to_gpu: float

    def to_dict(self) -> dict:
        return asdict(self)


def gpu_tokens_per_s(seq_len: int) -> int:
    lengths = [length for length in sorted(GPU_TOKENS_PER_S_80M) if length <= seq_len] or [min(GPU_TOKENS_PER_S_80M)]
    return GPU_TOKENS_PER_S_80M[lengths[-1]]


def bench_shards(seq_len: int, work_dir: Path, min_samples: int = 2000) -> Path:
    """`concat` shards of the embedded corpus at `seq_len` (repeated until there are about
    `min_samples` windows, so that an epoch outlasts the measurement), reused if already made."""
    corpus_tokens = 1_200_000
    copies = max(1, math.ceil(min_samples * seq_len / corpus_tokens))
    out = work_dir / f"embedded-concat-L{seq_len}-x{copies}"
    if not (out / "train" / MANIFEST_NAME).is_file():
        workers = min(8, os.cpu_count() or 1)
        prepare_mds([EMBEDDED_CORPUS] * copies, out, None, seq_len, "concat", input_format="lines",
                    val_fraction=0.0, num_workers=workers, overwrite=True, progress=False)  # fmt: skip
    return out / "train"


def bench_data_path(
    seq_len: int,
    work_dir: str | Path,
    tokens_per_batch: int = 32768,
    num_workers: int = 1,
    num_batches: int = 50,
    mlm_probability: float = 0.30,
) -> BenchResult:
    """Time `num_batches` batches of B = tokens_per_batch // seq_len sequences from the training
    loader (shuffle and masking on) over `bench_shards`, after 2 batches per worker of warm-up."""
    micro_batch_size = max(1, tokens_per_batch // seq_len)
    warmup_batches = max(3, 2 * num_workers)
    # One epoch holds the whole run (with a margin): each new epoch starts new worker processes,
    # which a run of millions of samples an epoch pays once, not every few seconds.
    needed = (warmup_batches + num_batches) * micro_batch_size * max(num_workers, 1)
    shards = bench_shards(seq_len, Path(work_dir), min_samples=max(2000, needed * 5 // 4))
    config = config_from_dict(
        {
            "model": {"l_max": seq_len},
            "train": {"seq_len": seq_len, "mlm_probability": mlm_probability},
            "data": {"train": str(shards), "num_workers": num_workers, "cache_dir": str(work_dir)},
        },
        source="bench_data_path",
    )
    loader = build_mlm_dataloader(config, micro_batch_size)
    seen, tokens = 0, 0
    started = time.perf_counter()
    while seen < warmup_batches + num_batches:
        for batch in loader:
            seen += 1
            if seen == warmup_batches:
                started = time.perf_counter()
            elif seen > warmup_batches:
                tokens += batch["input_ids"].numel()
            if seen == warmup_batches + num_batches:
                break
    seconds = time.perf_counter() - started
    close_mlm_dataloader(loader)
    tokens_per_s = tokens / seconds
    per_worker = tokens_per_s / max(num_workers, 1)
    return BenchResult(
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        num_workers=num_workers,
        batches=num_batches,
        seconds=seconds,
        tokens_per_s=tokens_per_s,
        tokens_per_s_per_worker=per_worker,
        ratio_to_gpu=per_worker / gpu_tokens_per_s(seq_len),
    )
