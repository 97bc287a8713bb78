"""The DeepSpeed JSON, generated from the typed config (never written by hand)."""

import importlib.metadata
from dataclasses import dataclass
from typing import Any

from m2dist.config import Config, TrainConfig
from m2dist.errors import ConfigError

# The first DeepSpeed release that reads the `torch_autocast` section; older ones ignore it, and a
# bf16 run would silently train in fp32.
MIN_DEEPSPEED_FOR_BF16 = "0.17.2"


def check_deepspeed_precision(precision: str, deepspeed_version: str | None = None) -> None:
    """Refuse bf16 with a DeepSpeed that would ignore the `torch_autocast` section (before 0.17.2)."""
    if precision != "bf16":
        return
    from packaging.version import Version  # a dependency of deepspeed

    version = deepspeed_version or importlib.metadata.version("deepspeed")
    if Version(version).release < Version(MIN_DEEPSPEED_FOR_BF16).release:
        needed = MIN_DEEPSPEED_FOR_BF16
        raise ConfigError(
            f"train.precision=bf16 needs deepspeed >= {needed} (its `torch_autocast` config section), "
            f"installed: {version}, with which the run would silently train in fp32. Upgrade deepspeed "
            f"(pip install 'deepspeed>={needed}') or set train.precision=fp32"
        )


def uses_tf32(train: TrainConfig) -> bool:
    """Whether the run's fp32 matmuls take TF32 (`train.tf32`; "auto": with bf16 precision)."""
    return train.precision == "bf16" if train.tf32 == "auto" else train.tf32


@dataclass(frozen=True)
class BatchLayout:
    global_batch_size: int
    micro_batch_size: int
    grad_accumulation: int
    world_size: int


def batch_layout(config: Config, world_size: int) -> BatchLayout:
    """Micro-batch and gradient accumulation from the global batch and the world size."""
    train = config.train
    global_batch = train.global_batch_size
    if global_batch % world_size:
        raise ConfigError(
            f"train.global_batch_size: expected a multiple of the world size {world_size}, got {global_batch}"
        )
    per_rank = global_batch // world_size
    micro = train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size: expected a divisor of global_batch_size / world size = "
            f"{global_batch} / {world_size} = {per_rank}, got {micro}"
        )
    return BatchLayout(global_batch, micro, per_rank // micro, world_size)


def build_deepspeed_config(config: Config, layout: BatchLayout) -> dict[str, Any]:
    """ZeRO stage, batch sizes, clipping and offload.

    Mixed precision is bf16 autocast with fp32 weights, gradients and gradient communication, as
    upstream's Composer amp_bf16: DeepSpeed's `torch_autocast` section, with no module marked
    for bf16 communication. (Not the `bf16` section, which would cast the filters and FFTs to
    bf16 too; and not an autocast around the engine's forward, which DeepSpeed switches off
    inside unless this section enables it.)"""
    train = config.train
    check_deepspeed_precision(train.precision)
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        # Overlapping the gradient reduction with the backward takes a hook per parameter tensor
        # (M2-BERT-80M has 574); on one rank there is nothing to overlap, and the hooks cost
        # about 80 ms of host time per step.
        overlap = layout.world_size > 1
        zero.update(overlap_comm=overlap, contiguous_gradients=overlap, reduce_bucket_size=int(5e7))
    if train.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    precision: dict[str, Any] = {}
    if train.precision == "bf16":
        precision["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return {
        **precision,
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accumulation,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        # The optimizer is torch's AdamW with the M2 parameter groups, handed to DeepSpeed.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device when the forward starts and when the
        # step ends, so the host could never run ahead of the GPU: at L=128 with CUDA graphs the
        # device sat idle 2-2.7 ms at each step's start while the host entered the compiled forward.
        # The trainer measures tokens/s itself, at its log intervals.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
