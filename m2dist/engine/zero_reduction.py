"""DeepSpeed's ZeRO 1-2 gradient reduction, left out where it is the identity: one data-parallel rank.

With one rank the all-reduce of a gradient bucket returns the bucket and the average divides by 1,
yet DeepSpeed (its non-contiguous path, which one rank uses: `deepspeed_config`) still flattens
every bucket into one tensor, all-reduces it and copies each gradient back out of it: for
M2-BERT-80M's 574 parameter tensors a concatenation, 574 views and 574 copies per optimizer step,
each a host-side launch in a step that is bound by host work at L=128. Skipping it leaves every
gradient bit for bit as it was (`tests/test_zero_reduction.py`).

Only the bucket all-reduce is skipped; DeepSpeed's bookkeeping around it (which parameters were
reduced, the partition's gradient views, the norm and the step) runs as before. Buckets whose
communication dtype differs from the gradients' (DeepSpeed would round them through it) and
sequence-parallel groups keep DeepSpeed's path.
"""

from __future__ import annotations

import functools


def _reduce_unless_identity(original, rank, grads, communication_data_type, *args, **kwargs):
    if all(g.dtype == communication_data_type for g in grads):
        return None
    return original(rank, grads, communication_data_type, *args, **kwargs)


def skip_single_rank_reduction(optimizer) -> bool:
    """Give a DeepSpeed ZeRO 1-2 optimizer (`engine.optimizer`) with one data-parallel rank a
    gradient reduction that does nothing; False, changing nothing, for any other optimizer or more
    ranks."""
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not hasattr(optimizer, "buffered_reduce_fallback"):
        return False
    if dist.get_world_size(group=optimizer.dp_process_group) != 1 or getattr(optimizer, "sequence_parallel_size", 1) != 1:
        return False
    original = optimizer.buffered_reduce_fallback
    optimizer.buffered_reduce_fallback = functools.partial(_reduce_unless_identity, original)
    return True
