"""The M2 pretraining recipe's optimizer and schedule (M2_SPEC 3).

Decoupled AdamW with three parameter groups: the forward filter MLPs with their shared Sin
frequency (filter_lr, filter_weight_decay), the filters' positional features z (pos_emb_lr, no
weight decay), and everything else (lr, weight_decay). Linear warmup, then linear decay.
"""

import torch
import torch.nn as nn

from m2dist.config import OptimizerConfig
from m2dist.models.m2 import m2_special_parameters


def build_param_groups(model: nn.Module, config: OptimizerConfig) -> list[dict]:
    """AdamW parameter groups; each group carries its name for logging."""
    filter_params, pos_params = m2_special_parameters(model)
    special = {id(p) for p in filter_params} | {id(p) for p in pos_params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    groups = [{"name": "global", "params": rest, "lr": config.lr, "weight_decay": config.weight_decay}]
    if filter_params:
        groups.append(
            {"name": "filter", "params": filter_params, "lr": config.filter_lr, "weight_decay": config.filter_weight_decay}
        )
    if pos_params:
        groups.append({"name": "pos_emb", "params": pos_params, "lr": config.pos_emb_lr, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    # torch's AdamW is decoupled: weight decay multiplies lr * wd, as Composer's DecoupledAdamW
    # does up to the lr scaling, which the schedule applies to every group alike.
    # Fused (one kernel for all tensors) where the parameters will live on a GPU.
    return torch.optim.AdamW(
        build_param_groups(model, config), betas=config.betas, eps=config.eps, fused=torch.cuda.is_available()
    )


def warmup_linear_decay(step: int, total_steps: int, warmup_fraction: float = 0.06, final_fraction: float = 0.02) -> float:
    """Multiplier of each group's peak lr at `step`: 0 -> 1 over the warmup, then 1 -> final_fraction."""
    warmup = max(1, round(total_steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 1.0 - (1.0 - final_fraction) * progress
