"""DeepSpeed's ZeRO 1-2 flattening of tensor lists as one multi-tensor copy instead of `torch.cat`.

Each optimizer step the ZeRO 1-2 optimizer flattens every parameter group's gradients into its
partition (`flatten`, which is `torch.cat` of the flattened tensors). For M2-BERT-80M's 574
parameter tensors, many of them small, torch's concatenation kernel moves the 80M fp32 gradients
at about 0.6 TB/s: 1.0 ms of the engine's 56.6 ms step at L=128 on one H200 (the CUDA-graph profile
in `tools/profiles`). `torch._foreach_copy_` into views of one new buffer copies the same bytes with
the optimizers' multi-tensor kernel: on one H100 the engine's M2-BERT-80M step at L=128 took 62.4
against 63.1 ms (two pairs of runs). The result is the same tensor, bit for bit
(`tests/test_zero_flatten.py`; the same training: `tests/test_zero_reduction.py`); lists it does
not handle (mixed dtypes or devices, tensors that autograd tracks, an empty list) go to
DeepSpeed's own function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def flatten_by_foreach_copy(tensors: Sequence[torch.Tensor], fallback: Callable) -> torch.Tensor:
    """`torch.cat([t.reshape(-1) for t in tensors])` as one multi-tensor copy; `fallback(tensors)`
    for a list that needs cat's own rules."""
    tensors = list(tensors)
    if (
        not tensors
        or any(t.dtype != tensors[0].dtype or t.device != tensors[0].device for t in tensors)
        or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    ):
        return fallback(tensors)
    numels = [t.numel() for t in tensors]
    flat = torch.empty(sum(numels), dtype=tensors[0].dtype, device=tensors[0].device)
    pairs = [(view.view(t.shape), t) for view, t in zip(flat.split(numels), tensors) if t.numel()]
    if pairs:
        torch._foreach_copy_([view for view, _ in pairs], [t for _, t in pairs])
    return flat


def install_foreach_flatten(optimizer) -> bool:
    """Give a DeepSpeed ZeRO 1-2 optimizer (`engine.optimizer`) the multi-tensor flatten; False,
    changing nothing, for any other optimizer, and for ZenFlow's, whose flatten transposes
    matrices first."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not callable(getattr(optimizer, "flatten", None)):
        return False
    if getattr(optimizer, "zenflow", False):
        return False
    fallback = optimizer.flatten
    optimizer.flatten = lambda tensors: flatten_by_foreach_copy(tensors, fallback)
    return True
