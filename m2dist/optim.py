"""The M2 pretraining recipe's optimizer and schedule (M2_SPEC 3).

Decoupled AdamW with three parameter groups: the forward filter MLPs with their shared Sin
frequency (filter_lr, filter_weight_decay), the filters' positional features z (pos_emb_lr, no
weight decay), and everything else (lr, weight_decay). Linear warmup from 0, then linear decay.

"Decoupled" as Composer's DecoupledAdamW, which upstream trained with: every step multiplies each
weight by (1 - wd x lr_t / lr_peak), the decay following the schedule but not scaled by the lr.
torch's AdamW multiplies by (1 - lr_t x weight_decay), so each group gets weight_decay = wd / lr_peak:
the same update, with torch's fused kernel.
"""

import torch
import torch.nn as nn

from m2dist.config import OptimizerConfig
from m2dist.models.m2 import m2_special_parameters


def _group(name: str, params: list[nn.Parameter], lr: float, decoupled_weight_decay: float) -> dict:
    return {
        "name": name,
        "params": params,
        "lr": lr,
        "decoupled_weight_decay": decoupled_weight_decay,
        "weight_decay": decoupled_weight_decay / lr,
    }


def build_param_groups(model: nn.Module, config: OptimizerConfig) -> list[dict]:
    """AdamW parameter groups; each carries its name and its decoupled (per-step) weight decay."""
    filter_params, pos_params = m2_special_parameters(model)
    special = {id(p) for p in filter_params} | {id(p) for p in pos_params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    groups = [_group("global", rest, config.lr, config.weight_decay)]
    if filter_params:
        groups.append(_group("filter", filter_params, config.filter_lr, config.filter_weight_decay))
    if pos_params:
        groups.append(_group("pos_emb", pos_params, config.pos_emb_lr, 0.0))
    return groups


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    # Fused (one kernel for all tensors; on the CPU too): its `found_inf` lets the engine skip a step
    # with a non-finite gradient norm without reading the norm on the host (`engine/device_overflow.py`).
    return torch.optim.AdamW(build_param_groups(model, config), betas=config.betas, eps=config.eps, fused=True)


def warmup_linear_decay(step: int, total_steps: int, warmup_fraction: float = 0.06, final_fraction: float = 0.02) -> float:
    """Multiplier of each group's peak lr at `step` (0-based): step / warmup over the warmup, so 0 at
    the first step as Composer's LinearWithWarmupScheduler, then 1 -> final_fraction."""
    warmup = max(1, round(total_steps * warmup_fraction))
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 1.0 - (1.0 - final_fraction) * progress
