"""Training-step throughput on one GPU: m2dist models and Hugging Face's BERT in the same run.

A step is forward + backward + AdamW (fused on CUDA) under bf16 autocast, on random tokens with
the config's MLM masking rate; the m2dist models compute the MLM head on the masked positions
only (a fixed number of rows, as in the engine: `masked_capacity`), Hugging Face's BertForMaskedLM
on every position (as it does). Tokens per step are the same for every model at a given length.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from m2dist.config import Config, KernelConfig, ModelConfig, load_config
from m2dist.engine.metrics import peak_flops, training_flops_per_token
from m2dist.engine.trainer import Trainer
from m2dist.models import build_masked_lm, masked_capacity


@dataclass
class BenchResult:
    model: str
    seq_len: int
    batch_size: int
    tokens_per_s: float
    step_ms: float
    tflops: float | None
    mfu: float | None
    peak_memory_gib: float
    error: str = ""
    # Rows compare with the baseline row of the same L and variant (the engine's compile mode).
    variant: str = ""


def _hf_bert(config: ModelConfig):
    from transformers import BertConfig, BertForMaskedLM

    hf_config = BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=max(config.l_max, 512), attn_implementation="sdpa",
    )  # fmt: skip
    return BertForMaskedLM(hf_config)


def time_steps(step: Callable[[], None], steps: int, window: int = 5, max_warmup: int = 100) -> float:
    """Seconds per step as a training run sees them: steps run back to back and the host waits for
    the device only at the end of each window of `window` steps, as the training loop waits only at
    its log steps. Host work that the device's queue hides costs nothing; host work it cannot hide
    (a sync inside the step, or more host than device time) counts. Windows run until one's time is
    within 3% of the one before (compilation, autotuning and allocator growth all settle in the
    first windows), so no result depends on its position in a run; then the median of as many
    windows as `steps` steps fill (at least 3)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()

    def timed_window(n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - begin) / n

    previous = timed_window(window)
    for _ in range(max_warmup // window):
        current = timed_window(window)
        if abs(current - previous) <= 0.03 * previous:
            break
        previous = current
    windows = max(3, math.ceil(steps / window))
    return statistics.median(timed_window(window) for _ in range(windows))


def benchmark_step(
    name: str,
    build: Callable[[], torch.nn.Module],
    model_config: ModelConfig,
    seq_len: int,
    batch_size: int,
    mlm_probability: float,
    device: torch.device,
    steps: int = 10,
) -> BenchResult:
    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    # The engine's bf16 runs take TF32 for their fp32 matmuls (train.tf32=auto): M2's filter MLPs.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        model = build().to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        input_ids = torch.randint(1000, model_config.vocab_size, (batch_size, seq_len), device=device)
        labels = torch.where(torch.rand(input_ids.shape, device=device) < mlm_probability, input_ids, -100)
        # m2dist's models gather a fixed number of rows for the MLM head, as the engine's step does.
        fixed_gather = {} if name.startswith(HF_NAME) else {"max_masked": masked_capacity(labels.numel(), mlm_probability)}

        def step() -> None:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = model(input_ids=input_ids, labels=labels, **fixed_gather).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = time_steps(step, steps)
    except torch.OutOfMemoryError:
        return BenchResult(name, seq_len, batch_size, 0.0, 0.0, None, None, 0.0, error="OOM")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    tokens_per_s = batch_size * seq_len / seconds
    flops = tokens_per_s * training_flops_per_token(model_config, seq_len, mlm_probability)
    peak = peak_flops(device, "bf16")
    return BenchResult(
        name, seq_len, batch_size, tokens_per_s, 1000 * seconds, flops / 1e12,
        None if peak is None else flops / peak, torch.cuda.max_memory_allocated(device) / 2**30,
    )  # fmt: skip


def run_benchmark(
    config_names: list[str],
    seq_lens: list[int],
    tokens_per_step: int,
    include_hf: bool,
    steps: int = 10,
    kernel_backends: tuple[str, ...] = ("triton",),
    compile_model: bool = False,
) -> list[BenchResult]:
    """Every config at every L (M2 configs once per kernel backend), with Hugging Face's BERT
    beside each BERT config. `compile_model` wraps each model in `torch.compile`."""
    device = torch.device("cuda")
    results = []
    for seq_len in seq_lens:
        batch = max(1, tokens_per_step // seq_len)
        for name in config_names:
            config = load_config(name)
            model_config = dataclasses.replace(config.model, l_max=max(config.model.l_max, seq_len), hidden_dropout=0.0)
            mlm = config.train.mlm_probability
            variants = [(name, model_config)]
            if model_config.architecture == "m2":
                variants = [(f"{name} ({backend})", dataclasses.replace(model_config, kernels=kernel_config(backend)))
                            for backend in kernel_backends]  # fmt: skip
            if include_hf and model_config.architecture == "bert":
                variants.append((HF_NAME, model_config))
            for label, cfg in variants:
                build = (lambda cfg=cfg: _hf_bert(cfg)) if label == HF_NAME else (lambda cfg=cfg: build_masked_lm(cfg))
                if compile_model:
                    build = (lambda build=build: torch.compile(build()))
                    label += " compiled"
                results.append(benchmark_step(label, build, cfg, seq_len, batch, mlm, device, steps))
                print(format_row(results[-1]), flush=True)
    return results


def kernel_config(backend: str) -> KernelConfig:
    """The kernels of a benchmark variant: a backend for both ops, or "fused" (the Triton kernels
    with the fused sequence mixer)."""
    if backend == "fused":
        return KernelConfig("triton", "triton", fused_mixer=True)
    return KernelConfig(backend, backend)


def split_config_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """"name" or "name:key=value,key=value" -> (name, overrides)."""
    name, _, overrides = spec.partition(":")
    return name, tuple(o for o in overrides.split(",") if o)


def engine_config(
    name: str, seq_len: int, batch_size: int, output_dir: str, overrides: tuple[str, ...] = ()
) -> Config:
    """Config `name` set up for a throughput run of the engine: L and one micro-batch of
    `batch_size` per step, no tracking, the embedded corpus when the config names no data, cut in
    concat mode (full rows, no padding: its paragraphs are far shorter than 8,192 tokens, and pad
    mode made most of a long row padding, and gave BERT's attention a mask), then `overrides`
    (key=value, e.g. train.compile=true). The data loader keeps the config's workers,
    as training runs it: with none, masking and collating each batch ran on the host inside the timed
    step (m2-bert-80M at L=128 on one H200 read 163k tokens/s so, against 279k for the profiled
    engine step with the workers)."""
    config = load_config(name)
    return load_config(
        name,
        [
            *overrides,
            f"train.seq_len={seq_len}",
            f"model.l_max={max(config.model.l_max, seq_len)}",
            f"train.global_batch_size={batch_size}",
            f"train.micro_batch_size={batch_size}",
            f"train.output_dir={output_dir}",
            "tracking.enabled=false",
            "data.allow_embedded_corpus=true",
            "data.embedded_mode=concat",
        ],
    )


def benchmark_engine_step(
    label: str, name: str, seq_len: int, batch_size: int, steps: int = 10, overrides: tuple[str, ...] = ()
) -> BenchResult:
    """tokens/s of `m2dist/train.py`'s step (`Trainer.train_step`: DeepSpeed with the config's ZeRO
    stage and precision, the data loader, the schedule) on one device, timed as `benchmark_step`."""
    with tempfile.TemporaryDirectory(prefix="m2dist-engine-bench-") as out:
        cfg = engine_config(name, seq_len, batch_size, out, overrides)
        trainer = Trainer(cfg)
        device = trainer.device
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds = time_steps(trainer.train_step, steps)
        except torch.OutOfMemoryError:
            return BenchResult(label, seq_len, batch_size, 0.0, 0.0, None, None, 0.0, error="OOM")
        finally:
            trainer.close()
    tokens_per_s = batch_size * seq_len / seconds
    flops = tokens_per_s * training_flops_per_token(cfg.model, seq_len, cfg.train.mlm_probability)
    peak = peak_flops(device, cfg.train.precision)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return BenchResult(
        label, seq_len, batch_size, tokens_per_s, 1000 * seconds, flops / 1e12, None if peak is None else flops / peak, memory
    )


# The engine benchmark's modes besides torch.compile's (the config as it trains, and eager): their
# overrides and the suffix of their rows' labels.
ENGINE_MODES = {"auto": ((), ""), "eager": (("train.compile=false",), ", eager")}


def engine_mode(mode: str) -> tuple[tuple[str, ...], str]:
    """(overrides, label suffix) of an engine benchmark mode: "auto", "eager" or a torch.compile mode."""
    return ENGINE_MODES.get(mode, (("train.compile=true", f"train.compile_mode={mode}"), f", compiled {mode}"))


def run_engine_benchmark(
    config_names: list[str],
    seq_lens: list[int],
    tokens_per_step: int,
    steps: int = 10,
    compile_modes: tuple[str, ...] = ("auto",),
) -> list[BenchResult]:
    """Every config's engine step at every L with the same tokens per step, once per entry of
    `compile_modes` ("auto": the config's train.compile; "eager"; or train.compile=true with that
    torch.compile mode). A config may carry its own overrides, "name:key=value,key=value"
    (`split_config_spec`)."""
    results = []
    for seq_len in seq_lens:
        batch = max(1, tokens_per_step // seq_len)
        for mode in compile_modes:
            overrides, suffix = engine_mode(mode)
            for spec in config_names:
                name, own = split_config_spec(spec)
                label = f"{name} (engine{suffix}{''.join(', ' + o for o in own)})"
                result = benchmark_engine_step(label, name, seq_len, batch, steps, overrides + own)
                results.append(dataclasses.replace(result, variant=mode))
                print(format_row(results[-1]), flush=True)
    return results


def speedups_over(results: list[BenchResult], baseline: str) -> dict[tuple[int, str], float]:
    """`baseline`'s tokens/s per (L, variant) (the denominator of the speedup column), `baseline` a
    name prefix."""
    return {(r.seq_len, r.variant): r.tokens_per_s for r in results if r.model.startswith(baseline) and not r.error}


HF_NAME = "hf-bert-base (sdpa)"


HEADER = (
    "| model | L | batch | tokens/s | vs HF BERT | step ms | TFLOP/s | MFU | peak GiB |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: BenchResult, baseline_tokens_per_s: float | None = None) -> str:
    if r.error:
        return f"| {r.model} | {r.seq_len} | {r.batch_size} | {r.error} | | | | | |"
    mfu = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%"
    speedup = f"{r.tokens_per_s / baseline_tokens_per_s:.2f}x" if baseline_tokens_per_s else ""
    return (
        f"| {r.model} | {r.seq_len} | {r.batch_size} | {r.tokens_per_s:,.0f} | {speedup} | {r.step_ms:.1f} | "
        f"{r.tflops:.1f} | {mfu} | {r.peak_memory_gib:.1f} |"
    )
