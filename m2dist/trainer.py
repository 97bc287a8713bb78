"""Single-process training on synthetic tokens: the quickstart the README runs on a CPU.

Build the model and optimizer from the config, run `steps` MLM steps with the M2 recipe
(parameter groups, warmup + linear decay, grad clipping at 1.0) and print loss, lr, tokens/s and ETA.
"""

import math
import time
from dataclasses import dataclass, field

import torch

from m2dist.config import Config
from m2dist.data.synthetic import synthetic_corpus, synthetic_mlm_batches
from m2dist.models import MaskedLM, build_masked_lm, count_parameters
from m2dist.optim import build_optimizer, warmup_linear_decay


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    tokens_per_second: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def _format_eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def train_synthetic(config: Config, log=print) -> tuple[MaskedLM, TrainResult]:
    """Train `config.model` for `config.train.duration` steps on random tokens; returns the model and losses."""
    train = config.train
    torch.manual_seed(train.seed)
    device = resolve_device(train.device)
    seq_len = train.seq_len or config.model.l_max
    model = build_masked_lm(config.model).to(device)
    optimizer = build_optimizer(model, train.optimizer)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    corpus = synthetic_corpus(max(4 * train.global_batch_size, 64), seq_len, config.model.vocab_size, train.seed)
    batches = synthetic_mlm_batches(corpus, train.global_batch_size, config.model.vocab_size, train.mlm_probability, train.seed)
    log(
        f"{config.name}: {config.model.architecture} model, {count_parameters(model):,} parameters, "
        f"{train.duration} steps of {train.global_batch_size} x {seq_len} tokens on {device}"
    )
    result = TrainResult()
    model.train()
    start = time.perf_counter()
    for step in range(train.duration):
        scale = warmup_linear_decay(step, train.duration)
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group["lr"] = peak * scale
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step + 1}")
        result.losses.append(loss_value)
        elapsed = time.perf_counter() - start
        result.tokens_per_second = (step + 1) * train.global_batch_size * seq_len / elapsed
        if (step + 1) % train.log_every == 0 or step + 1 == train.duration:
            eta = elapsed / (step + 1) * (train.duration - step - 1)
            log(
                f"step {step + 1:>5}/{train.duration}  loss {loss_value:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"grad_norm {grad_norm:.3f}  tokens/s {result.tokens_per_second:,.0f}  MFU n/a  ETA {_format_eta(eta)}"
            )
    return model, result
