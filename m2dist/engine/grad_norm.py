"""The ZeRO 1-2 optimizer's global gradient norm in a few multi-tensor kernels.

DeepSpeed's `get_grad_norm_direct` takes the norm of each parameter's gradient on its own: a cast
to fp64 and a norm per tensor, two kernel launches for each of M2-BERT-80M's 575 parameters, about
13.5 ms of host time in every step of an otherwise host-bound step at L=128 (one H200). Here one
`_foreach_norm` over the partition's gradients gives the same per-tensor norms (see
`foreach_grad_norm` for their precision), summed in fp64 as DeepSpeed does.

The replacement keeps everything around the norms as DeepSpeed has it: the collectives over the
data-parallel and model-parallel groups, the -1 sentinel of a non-finite norm. It applies only
where DeepSpeed's loop would count every gradient (no pipeline-replicated or model-parallel
parameters, the L2 norm); elsewhere the original runs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def foreach_grad_norm(gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of the squared L2 norms of `gradients` (a float32 scalar, summed in fp64).

    On CUDA each tensor's norm accumulates in fp32 through block-wise partial sums (relative error
    ~1e-7). The CPU kernel sums a tensor's squares one after another, which in fp32 drifts by
    2e-4 over a 4M-element embedding gradient, so there it accumulates in fp64 as DeepSpeed does."""
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    accumulate = torch.float32 if grads[0].is_cuda else torch.float64
    with torch.no_grad():
        norms = torch._foreach_norm(grads, 2, dtype=accumulate)
        return torch.stack(norms).double().square().sum().float()


def _counts_every_gradient(optimizer, params: Sequence[torch.nn.Parameter], norm_type: float) -> bool:
    from deepspeed.runtime.constants import PIPE_REPLICATED

    if norm_type != 2.0 or optimizer.model_parallel_rank != 0:
        return False
    return not any(getattr(p, PIPE_REPLICATED, False) and p.ds_pipe_replicated for p in params)


def _grad_norm_direct(optimizer, original, gradients, params, norm_type=2):
    """`DeepSpeedZeroOptimizer.get_grad_norm_direct` with the per-tensor loop as one foreach norm."""
    from deepspeed import comm as dist

    if not _counts_every_gradient(optimizer, params, float(norm_type)):
        return original(gradients, params, norm_type)
    total_norm = foreach_grad_norm(gradients).to(optimizer.device)
    dist.all_reduce(total_norm, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
    optimizer._model_parallel_all_reduce(tensor=total_norm, op=dist.ReduceOp.SUM)
    total_norm = total_norm.sqrt()
    # DeepSpeed's -1 sentinel for a non-finite norm, as its `mask_nan_or_inf_with_val_inplace` sets
    # it, without the host-to-device copy of the -1 that makes that helper wait for the GPU.
    return total_norm.masked_fill_(~torch.isfinite(total_norm), -1.0)


def install_foreach_grad_norm(optimizer) -> bool:
    """Give a DeepSpeed ZeRO 1-2 optimizer (`engine.optimizer`) the foreach gradient norm; False,
    changing nothing, for any other optimizer (ZeRO-0's, ZeRO-3's, or a DeepSpeed version whose
    ZeRO optimizer lacks the method)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not hasattr(optimizer, "get_grad_norm_direct"):
        return False
    original = optimizer.get_grad_norm_direct
    optimizer.get_grad_norm_direct = functools.partial(_grad_norm_direct, optimizer, original)
    return True
