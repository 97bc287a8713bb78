"""DeepSpeed's ZeRO 1-2 optimizer step without host syncs: a non-finite gradient norm is caught and
its step skipped on the device.

With fp32 weights under bf16 autocast, DeepSpeed's step reads the global gradient norm on the host
once to decide whether to skip the step and once per parameter group before clipping (4 times for
M2's three groups), and each read waits for the whole backward and the steps of the groups before
it (`grad_norm.py` avoids the other read, in DeepSpeed's masking of a non-finite norm). While the
host waits the GPU has nothing queued, and what the host does next (the optimizer's bookkeeping, the
next micro-batch, its launches) runs with the GPU idle: on one H200 that idle time is most of the
gap between M2-BERT-80M's engine step and its kernels at L=128.

Here the norm stays on the device: a non-finite norm becomes +inf (DeepSpeed's helpers mask it to
-1), the clipping factor is computed with tensor ops, and the torch AdamW (fused, as
`m2dist.optim.build_optimizer` makes it) gets the flag as `found_inf`, with which its kernel
leaves the weights, the moments and the step count as they are, as GradScaler uses it. The step
is skipped as DeepSpeed would skip it; what differs is that DeepSpeed no longer knows it was
skipped, so the learning-rate schedule advances on it. The trainer sees the +inf norm and counts
the step as non-finite (`guards.NonFiniteCounter`).

It applies where DeepSpeed's step reads the norm only for those checks: no loss scaling (bf16 or
fp32), no CPU offload, and a fused torch Adam/AdamW inside; elsewhere DeepSpeed's step runs as is.
"""

from __future__ import annotations

import functools

import torch

# Marks a norm whose validity is handled on the device, for DeepSpeed's module-level check.
_CHECKED_ON_DEVICE = "_m2dist_checked_on_device"


def _is_fused_adam(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        group.get("fused") for group in optimizer.param_groups
    )


def _scaled_global_norm(zero_optimizer, original, *args, **kwargs):
    norm = original(*args, **kwargs)
    if not _is_fused_adam(zero_optimizer.optimizer):
        # A fused optimizer's state loaded from a non-fused run's checkpoint: DeepSpeed's checks.
        zero_optimizer.optimizer.found_inf = None
        return norm
    invalid = ~torch.isfinite(norm) | (norm < 0)
    norm = torch.where(invalid, torch.full_like(norm, float("inf")), norm)
    zero_optimizer.optimizer.found_inf = invalid.to(torch.float32).reshape(())
    setattr(norm, _CHECKED_ON_DEVICE, True)
    return norm


def _unscale_and_clip_grads(zero_optimizer, original, grad_groups_flat, total_norm):
    """DeepSpeed's clipping with the factor as a device tensor (no host read of the norm)."""
    if not getattr(total_norm, _CHECKED_ON_DEVICE, False):
        return original(grad_groups_flat, total_norm)
    if zero_optimizer.clip_grad == 0.0:
        return None
    # The norm is +inf on a step found_inf skips; the gradients' scale then does not matter.
    clip = ((total_norm / zero_optimizer.loss_scale) + 1e-6) / zero_optimizer.clip_grad
    inverse = 1.0 / torch.clamp(clip, min=1.0)
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(inverse)
    return None


def _skip_checked(original_check):
    @functools.wraps(original_check)
    def is_invalid_grad_norm(norm):
        if getattr(norm, _CHECKED_ON_DEVICE, False):
            return False  # found_inf skips the step on the device
        return original_check(norm)

    is_invalid_grad_norm._m2dist_wrapped = True
    return is_invalid_grad_norm


def install_device_overflow_check(optimizer) -> bool:
    """Give a DeepSpeed ZeRO 1-2 optimizer (`engine.optimizer`) the sync-free step; False, changing
    nothing, where it does not apply (see the module's docstring)."""
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not hasattr(stage_1_and_2, "is_invalid_grad_norm"):
        return False
    if not all(hasattr(optimizer, name) for name in ("scaled_global_norm", "unscale_and_clip_grads", "loss_scale")):
        return False
    if optimizer.cpu_offload or getattr(optimizer, "torch_autocast_gradscaler", None) is not None:
        return False
    if getattr(optimizer, "dynamic_loss_scale", False) or optimizer.loss_scale != 1.0:
        return False
    if not _is_fused_adam(optimizer.optimizer):
        return False
    if not getattr(stage_1_and_2.is_invalid_grad_norm, "_m2dist_wrapped", False):
        stage_1_and_2.is_invalid_grad_norm = _skip_checked(stage_1_and_2.is_invalid_grad_norm)
    optimizer.scaled_global_norm = functools.partial(_scaled_global_norm, optimizer, optimizer.scaled_global_norm)
    optimizer.unscale_and_clip_grads = functools.partial(
        _unscale_and_clip_grads, optimizer, optimizer.unscale_and_clip_grads
    )
    return True
