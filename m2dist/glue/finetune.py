"""One fine-tuning job (task x seed) on one device: plain PyTorch, no DeepSpeed.

The classifier starts from a pretrained checkpoint (an m2dist release folder or an upstream M2
checkpoint, through `load_any`) or from the MNLI-finetuned release: every `bert.*` tensor is
copied, the pooler too when the source has one (an MLM checkpoint has none, so it starts fresh as
upstream's does), and the classifier is always freshly initialised under the job's seed. Decoupled
AdamW with betas (0.9, 0.98) and M2's pretraining parameter groups (see GlueConfig.filter_decay),
linear warmup over 6% of the steps from lr 0, then linear decay to 0; the training split in file
order every epoch (GlueConfig.shuffle); bf16 autocast on CUDA, with a regression task's head and
loss in fp32. The dev splits are evaluated after every epoch; the job's result is the last
epoch's, as upstream reports it.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2dist.checkpoint.convert import load_any
from m2dist.checkpoint.layout import checkpoint_markers
from m2dist.checkpoint.release import save_release
from m2dist.config import KernelConfig, OptimizerConfig
from m2dist.engine.data import fill_batch
from m2dist.errors import CheckpointError
from m2dist.glue.config import GlueConfig, TaskConfig
from m2dist.glue.encode import EncodedSplit, batch_to, load_encoded
from m2dist.glue.metrics import split_metrics, task_score
from m2dist.glue.step import FinetuneStep
from m2dist.models import MaskedLM, SequenceClassifier
from m2dist.optim import build_param_groups, warmup_linear_decay

# Events a job reports while it runs: ("progress", fraction), ("epoch", metrics).
Emit = Callable[[str, dict[str, Any]], None]


@dataclass
class JobSpec:
    """Everything a worker process needs to run one job (picklable)."""

    task: str
    seed: int
    num_labels: int
    # The task's encoded splits (save_encoded); "train" plus one or two dev splits.
    encoded_path: str
    # Checkpoint whose encoder the classifier starts from.
    init_checkpoint: str
    settings: TaskConfig
    glue: GlueConfig
    # Write the fine-tuned model here as a release folder (MNLI, for RTE/MRPC/STS-B).
    save_to: str = ""
    # Jobs that must finish first (the MNLI job for RTE/MRPC/STS-B).
    depends_on: tuple[str, ...] = ()

    @property
    def job_id(self) -> str:
        return f"{self.task}-s{self.seed}"


@dataclass
class JobResult:
    job_id: str
    task: str
    seed: int
    # The task's score (a fraction) and the last epoch's metrics per dev split.
    score: float
    metrics: dict[str, dict[str, float]]
    # One entry per epoch: epoch, train_loss, epoch_seconds, samples_per_s, <split>/<metric>, score.
    history: list[dict[str, float]] = field(default_factory=list)
    init_checkpoint: str = ""
    saved_checkpoint: str = ""
    device: str = ""
    train_examples: int = 0
    steps: int = 0
    # Whether the pooler came from the initial checkpoint (else freshly initialised).
    pooler_loaded: bool = False


def load_pretrained(path: str | Path) -> MaskedLM | SequenceClassifier:
    """`load_any` with a clear error for a DeepSpeed training checkpoint, which must be converted first."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / "checkpoints").is_dir() and not (path / "model.safetensors").exists():
        raise CheckpointError(
            f"{path}: a training run folder; its DeepSpeed checkpoints are in {path / 'checkpoints'}/<tag>. Convert "
            "one to a release folder first (python tools/convert_checkpoint.py <tag folder> <release_dir> --to release)"
        )
    if path.is_dir() and checkpoint_markers(path):
        raise CheckpointError(
            f"{path}: a DeepSpeed training checkpoint; convert it to a release folder first "
            f"(python tools/convert_checkpoint.py {path} <release_dir> --to release) and pass that folder"
        )
    return load_any(path)


def copy_encoder_weights(source: torch.nn.Module, target: SequenceClassifier, where: str = "checkpoint") -> bool:
    """Copy every `bert.*` tensor of `source` into `target`; the pooler only when `source` has one.
    Returns whether the pooler was copied. A missing or misshapen encoder tensor is an error."""
    source_state = source.state_dict()
    target_state = target.state_dict()
    copied, pooler_loaded = {}, False
    for key, value in target_state.items():
        if not key.startswith("bert."):
            continue
        if key not in source_state:
            if key.startswith("bert.pooler."):
                continue
            raise CheckpointError(f"{where}: encoder tensor {key} is missing")
        if source_state[key].shape != value.shape:
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(source_state[key].shape)}, the classifier expects {tuple(value.shape)}"
            )
        copied[key] = source_state[key]
        pooler_loaded = pooler_loaded or key.startswith("bert.pooler.")
    if pooler_loaded and not all(k in copied for k in target_state if k.startswith("bert.pooler.")):
        raise CheckpointError(f"{where}: the pooler is only partly present")
    target.load_state_dict(copied, strict=False)
    return pooler_loaded


def build_classifier(
    source: MaskedLM | SequenceClassifier, num_labels: int, glue: GlueConfig, settings: TaskConfig, where: str
) -> tuple[SequenceClassifier, bool]:
    """A fresh classifier (initialised under the current torch seed) with `source`'s encoder."""
    config = source.config
    kernels = KernelConfig(
        fftconv=glue.fftconv or config.kernels.fftconv,
        blockdiag=glue.blockdiag or config.kernels.blockdiag,
        fused_mixer=config.kernels.fused_mixer if glue.fused_mixer is None else glue.fused_mixer,
    )
    mask_padding = config.mask_padding if glue.mask_padding is None else glue.mask_padding
    config = dataclasses.replace(config, pool=settings.pool or config.pool, kernels=kernels, mask_padding=mask_padding)
    model = SequenceClassifier(config, num_labels)
    return model, copy_encoder_weights(source, model, where)


def compile_if_asked(model: torch.nn.Module, glue: GlueConfig) -> None:
    """`glue.compile`: torch.compile the classifier in place (its state dict's keys stay), static
    shapes: each batch shape compiles once."""
    if glue.compile:
        model.compile(dynamic=False)


def build_optimizer(
    model: torch.nn.Module, glue: GlueConfig, settings: TaskConfig, device: torch.device | None = None
) -> torch.optim.AdamW:
    """AdamW over m2dist's pretraining parameter groups (global; M2 filters; M2 positional features z);
    on a CUDA `device` fused (multi-tensor kernels over each group, in `optimizer_order`) and capturable
    (`step.FinetuneStep`'s graph).

    `build_param_groups` gives Composer's DecoupledAdamW (decay `wd x lr_t / peak_lr` per step), as
    "decoupled_adamw" asks, for every group (upstream); a task with optimizer "adamw", and the
    filter group under `filter_decay: adamw`, decay by `wd x lr_t` as torch's AdamW does.
    """
    groups = build_param_groups(
        model,
        OptimizerConfig(
            lr=settings.lr,
            betas=glue.betas,
            eps=glue.eps,
            weight_decay=settings.weight_decay,
            filter_lr=glue.filter_lr,
            filter_weight_decay=glue.filter_weight_decay,
            pos_emb_lr=glue.pos_emb_lr,
        ),
    )
    for group in groups:
        group["params"] = optimizer_order(group["params"])
        if settings.optimizer == "adamw" or (group["name"] == "filter" and glue.filter_decay == "adamw"):
            group["weight_decay"] = group["decoupled_weight_decay"]
    on_gpu = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, betas=glue.betas, eps=glue.eps, fused=on_gpu, capturable=on_gpu)


# torch's fused AdamW packs its launches (multi_tensor_apply over 4 tensor lists) with at most this
# many tensors and this many blocks, each block a chunk of up to 65,536 elements of one tensor.
ADAM_LAUNCH_TENSORS, ADAM_LAUNCH_CHUNKS, ADAM_CHUNK = 36, 320, 65536


def adam_chunks_per_launch(params: list[torch.nn.Parameter]) -> float:
    """The mean number of chunks (thread blocks) in the fused AdamW kernel's launches over `params`
    in this order, as torch packs them."""
    launches = tensors = chunks = 0
    total = sum(math.ceil(p.numel() / ADAM_CHUNK) for p in params)
    for p in params:
        tensors += 1
        n = math.ceil(p.numel() / ADAM_CHUNK)
        for i in range(n):
            chunks += 1
            if chunks == ADAM_LAUNCH_CHUNKS or (tensors == ADAM_LAUNCH_TENSORS and i == n - 1):
                launches += 1
                chunks, tensors = 0, 0 if i == n - 1 else 1
    launches += 1 if chunks else 0
    return total / max(1, launches)


def optimizer_order(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """`params` in the order the fused AdamW kernel runs best: their own, unless its launches would
    carry fewer than half the chunks a launch takes, then largest first. In M2's order a layer's
    large weights sit among its many small tensors (biases, norms, short filters), so launches
    stopped at 36 tensors with ~130 chunks, about one block per SM of an H100; sorted, the large
    tensors fill launches of 320 chunks and the small ones share the rest (on one H100, fine-tuning
    step at batch 16: 8.84 against 8.99 ms). BERT's order averages ~256 chunks a launch and stays
    (sorted measured 8.53 against 8.47 ms). The order is the optimizer's own: fine-tuning saves no
    optimizer state."""
    if adam_chunks_per_launch(params) >= ADAM_LAUNCH_CHUNKS / 2:
        return params
    return sorted(params, key=lambda p: p.numel(), reverse=True)


def build_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over `warmup_fraction` of the steps, then linear decay to 0 (Composer's
    LinearWithWarmupScheduler with alpha_f 0, as upstream fine-tunes)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_linear_decay(step, total_steps, warmup_fraction, final_fraction=0.0)
    )


def epoch_order(num_examples: int, shuffle: bool, generator: torch.Generator) -> torch.Tensor:
    """The training split's order for one epoch: file order (upstream), or a fresh permutation."""
    if shuffle:
        return torch.randperm(num_examples, generator=generator)
    return torch.arange(num_examples)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(
    model: SequenceClassifier, split: EncodedSplit, batch_size: int, device: torch.device, bf16: bool,
    fill_last: bool | None = None,
) -> np.ndarray:  # fmt: skip
    """The model's (N, C) outputs on every example of `split`, in fp32. With `fill_last` (None: on
    a GPU) a short last batch is filled up to `batch_size` with copies of its first row, whose
    outputs are dropped, so that no kernel is compiled or autotuned for a second shape."""
    model.eval()
    data = split.tensors()
    data.pop("labels")
    fill = (device.type == "cuda" if fill_last is None else fill_last) and len(split) > batch_size
    outputs = []
    for start in range(0, len(split), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in data.items()}
        rows = len(batch["input_ids"])
        if fill:
            batch = fill_batch(batch, batch_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs.append(model(**batch_to(batch, device)).logits.float()[:rows])
    model.train()
    # One transfer at the end: the batches are queued without waiting for each other.
    return torch.cat(outputs).cpu().numpy()


_source_cache: dict[str, MaskedLM | SequenceClassifier] = {}


def _load_source(path: str) -> MaskedLM | SequenceClassifier:
    # A worker runs many jobs from the same pretrained checkpoint; keep the last one loaded.
    if path not in _source_cache:
        _source_cache.clear()
        _source_cache[path] = load_pretrained(path)
    return _source_cache[path]


def run_job(spec: JobSpec, device: str | torch.device, emit: Emit | None = None) -> JobResult:
    """Fine-tune and evaluate one (task, seed); `emit` receives progress and per-epoch metrics."""
    emit = emit or (lambda kind, payload: None)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bf16 = device.type == "cuda" and spec.glue.precision == "bf16"
    splits = load_encoded(spec.encoded_path)
    train = splits.pop("train")
    settings = spec.settings

    seed_everything(spec.seed)
    source = _load_source(spec.init_checkpoint)
    model, pooler_loaded = build_classifier(source, spec.num_labels, spec.glue, settings, spec.init_checkpoint)
    model.to(device).train()
    compile_if_asked(model, spec.glue)
    optimizer = build_optimizer(model, spec.glue, settings, device)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    schedule = build_schedule(optimizer, total_steps, spec.glue.warmup_fraction)
    # The whole training split on the device (compact dtypes): a step gathers its rows there.
    train_step = FinetuneStep(
        model, optimizer, batch_to(train.tensors(), device, widen=False), settings.batch_size, bf16, spec.glue.cuda_graphs
    )
    order_generator = torch.Generator().manual_seed(spec.seed)
    report_every = max(1, total_steps // 50)
    history: list[dict[str, float]] = []
    metrics: dict[str, dict[str, float]] = {}
    step = 0
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        capture_before = train_step.capture_seconds
        order = epoch_order(len(train), spec.glue.shuffle, order_generator).to(device)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, len(train), settings.batch_size):
            loss_sum += train_step(order[start : start + settings.batch_size])
            schedule.step()
            step += 1
            if step % report_every == 0:
                emit("progress", {"fraction": step / total_steps})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds = time.perf_counter() - started
        metrics = {
            name: split_metrics(spec.task, evaluate(model, split, spec.glue.eval_batch_size, device, bf16), split.labels_N)
            for name, split in splits.items()
        }
        record = {
            "epoch": float(epoch),
            "train_loss": float(loss_sum) / steps_per_epoch,
            "epoch_seconds": epoch_seconds,
            "samples_per_s": len(train) / epoch_seconds,
            # Capturing the step's CUDA graph (first epoch only), included in epoch_seconds.
            "capture_seconds": train_step.capture_seconds - capture_before,
            "score": task_score(spec.task, metrics),
        }
        record.update({f"{split}/{name}": value for split, values in metrics.items() for name, value in values.items()})
        history.append(record)
        emit("epoch", record)
    saved = ""
    if spec.save_to:
        saved = str(save_release(model, spec.save_to, overwrite=True))
    return JobResult(
        job_id=spec.job_id,
        task=spec.task,
        seed=spec.seed,
        score=task_score(spec.task, metrics),
        metrics=metrics,
        history=history,
        init_checkpoint=spec.init_checkpoint,
        saved_checkpoint=saved,
        device=str(device),
        train_examples=len(train),
        steps=total_steps,
        pooler_loaded=pooler_loaded,
    )
