"""The one typed config tree of m2dist.

A YAML file in configs/ maps onto `Config`; `key=value` overrides on the command line address it by
dotted path (`model.hidden_size=256`). A file may start from another with `base: <file>.yaml`
(resolved next to it) and change only what differs. Every field has a docstring-like comment and
the checks in `__post_init__` name the key that is wrong and what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from m2dist.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def require(ok: bool, key: str, expected: str, value: Any) -> None:
    """Raise ConfigError "`key`: expected `expected`, got `value`" unless `ok` (the checks of the
    config dataclasses' `__post_init__`)."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


# The implementations of an op in kernels/ (each op's BACKENDS; tests/test_config.py checks they agree).
KernelBackend = Literal["auto", "reference", "triton"]
KERNEL_BACKENDS: tuple[str, ...] = typing.get_args(KernelBackend)


@dataclass
class KernelConfig:
    # Implementation of the gated FFT long convolution: "reference" (torch.fft), "triton" (the
    # Triton kernels) or "auto" (Triton on an Ampere or newer GPU, the reference elsewhere).
    fftconv: KernelBackend = "auto"
    # Implementation of the block-diagonal GLU MLP matmuls: "reference" (a torch GEMM per block), "triton"
    # or "auto", as above.
    blockdiag: KernelBackend = "auto"
    # The sequence mixer after in_linear (short convolution, gates, both long convolutions) as one
    # Triton operator where it applies (Triton fftconv backend, bf16/fp16, no padding mask, L a power
    # of two up to kernels.mixer.triton_mixer.MAX_LEN); per op (short convolution, then fftconv) when off.
    # Off by default: on one H200 it measured 0.6x the per-op path (docs/performance.md).
    fused_mixer: bool = False

    def __post_init__(self) -> None:
        require(self.fftconv in KERNEL_BACKENDS, "kernels.fftconv", f"one of {KERNEL_BACKENDS}", self.fftconv)
        require(self.blockdiag in KERNEL_BACKENDS, "kernels.blockdiag", f"one of {KERNEL_BACKENDS}", self.blockdiag)


@dataclass
class ModelConfig:
    # "m2": Monarch Mixer BERT; "bert": the BERT-base baseline (attention + dense GELU MLP).
    architecture: Literal["m2", "bert"] = "m2"
    # Vocabulary size, padded to a multiple of 64 (bert-base-uncased 30522 -> 30528).
    vocab_size: int = 30528
    # Hidden size d.
    hidden_size: int = 768
    # MLP inner size I (the GLU projects d -> 2I).
    intermediate_size: int = 3072
    # Number of layers.
    num_layers: int = 12
    # Attention heads (BERT baseline only).
    num_attention_heads: int = 12
    # Maximum sequence length: size of the learned positions and of the long-conv filters.
    l_max: int = 128
    # Token type vocabulary (segments A/B).
    type_vocab_size: int = 2
    # Id of [PAD] (its embedding row starts at zero).
    pad_token_id: int = 0
    # Dropout after embeddings, in the MLP and in the classifier.
    hidden_dropout: float = 0.1
    # Dropout on attention probabilities (BERT baseline only).
    attention_dropout: float = 0.1
    # LayerNorm epsilon of embeddings, MLP post-LN and heads.
    layer_norm_eps: float = 1e-12
    # Std of the normal init of every nn.Linear and embedding.
    initializer_range: float = 0.02
    # Width of the implicit filter MLP (upstream hyena_filter_order).
    filter_order: int = 128
    # Positional features fed to the filter MLP (t, cosines, sines; odd, >= 3).
    filter_emb_dim: int = 5
    # Initial frequency of the filter MLP's Sin activation (upstream hyena_w).
    filter_sin_freq: float = 10.0
    # Bidirectional long convolution (a second filter MLP for the reverse taps).
    bidirectional: bool = True
    # Residual long convolution on the mixer input with a second filter (step 7).
    residual_long_conv: bool = True
    # LayerNorm on the mixer input (upstream hyena_training_additions, the released 80M checkpoint).
    pre_layernorm: bool = False
    # Number of diagonal blocks of the MLP weights (1 = dense).
    mlp_nblocks: int = 4
    # Classification pooling: "cls" (first token) or "mean" (masked mean over tokens).
    pool: Literal["cls", "mean"] = "cls"
    # M2 only: zero pad positions (attention_mask 0) in each mixer's input, after its in_linear and
    # before its long convolutions, so that a padded sequence's outputs at its tokens equal the
    # unpadded sequence's. false = upstream: the mixer ignores the mask and pads take part in the
    # convolutions (released checkpoints were trained so). No parameters change.
    mask_padding: bool = False
    # Which implementation runs the heavy ops.
    kernels: KernelConfig = field(default_factory=KernelConfig)
    # Recompute each layer's activations in the backward (torch.utils.checkpoint): a layer keeps
    # only its input, for about a third more compute. For long sequences with larger batches.
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "l_max", "filter_order"):
            require(getattr(self, name) >= 1, f"model.{name}", "an integer >= 1", getattr(self, name))
        require(self.type_vocab_size >= 1, "model.type_vocab_size", "an integer >= 1", self.type_vocab_size)
        require(
            0 <= self.pad_token_id < self.vocab_size, "model.pad_token_id", f"in [0, {self.vocab_size})", self.pad_token_id
        )
        for name in ("hidden_dropout", "attention_dropout"):
            require(0.0 <= getattr(self, name) < 1.0, f"model.{name}", "a probability in [0, 1)", getattr(self, name))
        require(self.layer_norm_eps > 0, "model.layer_norm_eps", "> 0", self.layer_norm_eps)
        require(self.initializer_range > 0, "model.initializer_range", "> 0", self.initializer_range)
        require(
            self.filter_emb_dim >= 3 and self.filter_emb_dim % 2 == 1,
            "model.filter_emb_dim",
            "an odd integer >= 3",
            self.filter_emb_dim,
        )
        require(self.mlp_nblocks >= 1, "model.mlp_nblocks", "an integer >= 1", self.mlp_nblocks)
        if self.architecture == "m2":
            for name in ("hidden_size", "intermediate_size"):
                size = getattr(self, name)
                require(
                    size % self.mlp_nblocks == 0,
                    f"model.{name}",
                    f"a multiple of model.mlp_nblocks={self.mlp_nblocks}",
                    size,
                )
        else:
            require(
                self.num_attention_heads >= 1 and self.hidden_size % self.num_attention_heads == 0,
                "model.num_attention_heads",
                f"a divisor of model.hidden_size={self.hidden_size}",
                self.num_attention_heads,
            )


@dataclass
class OptimizerConfig:
    # Peak learning rate of the global parameter group (M2 8e-4, BERT 5e-4).
    lr: float = 8e-4
    # AdamW betas.
    betas: tuple[float, float] = (0.9, 0.98)
    # AdamW epsilon.
    eps: float = 1e-6
    # Decoupled weight decay of the global group.
    weight_decay: float = 1e-5
    # Learning rate and weight decay of the forward filter MLPs and their shared Sin frequency.
    filter_lr: float = 1e-3
    filter_weight_decay: float = 0.1
    # Learning rate of the filters' trainable positional features z (weight decay 0).
    pos_emb_lr: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("lr", "eps", "filter_lr", "pos_emb_lr"):
            require(getattr(self, name) > 0, f"train.optimizer.{name}", "> 0", getattr(self, name))
        for name in ("weight_decay", "filter_weight_decay"):
            require(getattr(self, name) >= 0, f"train.optimizer.{name}", ">= 0", getattr(self, name))
        require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "train.optimizer.betas",
            "two numbers in [0, 1)",
            self.betas,
        )


@dataclass
class TrainConfig:
    # Length of training, in `duration_unit`s.
    duration: int = 20
    # "steps" (optimizer steps), "samples" (sequences) or "tokens" (sequence slots, L per sample).
    duration_unit: Literal["steps", "samples", "tokens"] = "steps"
    # Sequences per optimizer step over all ranks (the recipe's 4096).
    global_batch_size: int = 8
    # Sequences per rank per forward pass; 0 = global_batch_size / world size (no accumulation).
    # Gradient accumulation = global_batch_size / (micro_batch_size x world size), which must divide.
    micro_batch_size: int = 0
    # Tokens per sequence (0 = model.l_max); the shards' manifest must say the same max_len.
    seq_len: int = 0
    # Share of tokens selected for MLM prediction (M2 0.30, BERT 0.15), replaced 80/10/10.
    mlm_probability: float = 0.30
    # "bf16": bf16 autocast with fp32 master weights; "fp32": everything in fp32.
    precision: Literal["bf16", "fp32"] = "bf16"
    # fp32 matmuls on the tensor cores in TF32 (10 bits of mantissa; bf16 has 7). "auto": on with
    # precision=bf16, whose only fp32 matmuls are M2's filter MLPs (kept out of autocast; the
    # m2-bert-80M-8k engine step at L=8192 0.982x with it on one H100), off with precision=fp32.
    tf32: Literal["auto", True, False] = "auto"
    # DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer state), 2 (+ gradients), 3 (+ parameters).
    zero_stage: int = 2
    # Keep optimizer state in CPU memory (ZeRO 1-3).
    offload_optimizer: bool = False
    # torch.compile the model inside the engine (DeepSpeed's `engine.compile()`, ZeRO 0-2): Inductor
    # fuses the elementwise work around the matmuls; the Triton kernels stay opaque custom ops.
    # "auto": on a GPU with ZeRO 0-2, compiled with CUDA graphs (mode "reduce-overhead"), the fastest
    # engine step measured (docs/performance.md); eager elsewhere. true: compiled with compile_mode.
    # Compilation takes the first steps (about a minute for M2-BERT-80M on one H200).
    compile: Literal["auto", True, False] = "auto"
    # torch.compile's mode with train.compile=true: "reduce-overhead" adds CUDA graphs of the forward
    # and backward (no kernel-launch cost per step; the masked-token gather has a fixed size for it).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # Clip the global gradient norm to this (0 = no clipping).
    grad_clip: float = 1.0
    # Linear warmup over this share of training, then linear decay to final_lr_fraction x peak.
    warmup_fraction: float = 0.06
    final_lr_fraction: float = 0.02
    # Evaluate MLM loss and accuracy on the validation split every this many steps (0 = only at the end).
    eval_every: int = 0
    # Validation batches per evaluation (0 = the whole validation split).
    eval_batches: int = 0
    # Save a checkpoint every this many steps (0 = only at the end); keep the newest keep_last.
    checkpoint_every: int = 0
    keep_last: int = 2
    # Leave this job after this many steps with a checkpoint (0 = run to the end); a job with the
    # same output_dir continues from it, e.g. to fit training into time-limited allocations.
    stop_after: int = 0
    # Run folder: checkpoints, logs and the default MLflow store; "{name}" is the config's name.
    output_dir: str = "outputs/{name}"
    # Seed of parameter init, data order and masking.
    seed: int = 17
    # Warm start: weights to begin a fresh run from instead of a random init ("" = none): a run folder
    # (its newest checkpoint), one of its checkpoints/step_N folders, a release folder or an upstream
    # checkpoint, of the same architecture; a shorter l_max is extended (m2dist/checkpoint/extend.py).
    # Only a run with no checkpoint of its own uses it: a resumed run continues from its checkpoint.
    init_from: str = ""
    # "cpu", "cuda", or "auto" (cuda when available).
    device: str = "auto"
    # Print a log line, and look for SIGUSR1/SIGTERM, every this many steps.
    log_every: int = 1
    # Optimizer steps in a row with a non-finite loss or gradient norm that the run rides out (ZeRO 1-2,
    # whose overflow check discards such a step's update); one more stops the run with an error and
    # without a checkpoint. 0 = stop at the first. Checked at log steps and before every checkpoint.
    max_nonfinite_steps: int = 0
    # Settings that may differ from the checkpoint's on resume although they change the model or the
    # data order (model.*, data.train, train.global_batch_size, train.seed, ...): keys or sections,
    # e.g. [model.layer_norm_eps]. Other such differences stop the resume with an error.
    resume_allow_changes: list[str] = field(default_factory=list)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        for name in ("duration", "global_batch_size", "log_every", "keep_last"):
            require(getattr(self, name) >= 1, f"train.{name}", "an integer >= 1", getattr(self, name))
        for name in ("micro_batch_size", "seq_len", "eval_every", "eval_batches", "checkpoint_every", "stop_after"):
            require(getattr(self, name) >= 0, f"train.{name}", "an integer >= 0", getattr(self, name))
        require(0.0 < self.mlm_probability < 1.0, "train.mlm_probability", "in (0, 1)", self.mlm_probability)
        require(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", "0, 1, 2 or 3", self.zero_stage)
        require(self.grad_clip >= 0, "train.grad_clip", ">= 0", self.grad_clip)
        require(0.0 <= self.warmup_fraction < 1.0, "train.warmup_fraction", "in [0, 1)", self.warmup_fraction)
        require(0.0 <= self.final_lr_fraction <= 1.0, "train.final_lr_fraction", "in [0, 1]", self.final_lr_fraction)
        require(self.device in ("auto", "cpu", "cuda"), "train.device", "auto, cpu or cuda", self.device)
        require(self.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", "an integer >= 0", self.max_nonfinite_steps)
        require(
            self.max_nonfinite_steps == 0 or self.zero_stage in (1, 2),
            "train.max_nonfinite_steps",
            f"0 with train.zero_stage={self.zero_stage} (only ZeRO 1-2 discard a non-finite step's update)",
            self.max_nonfinite_steps,
        )
        require(
            not (self.offload_optimizer and self.zero_stage == 0),
            "train.offload_optimizer",
            "false with train.zero_stage=0 (offload needs ZeRO 1-3)",
            self.offload_optimizer,
        )
        require(
            not (self.compile is True and self.zero_stage == 3),
            "train.compile",
            "false with train.zero_stage=3 (ZeRO-3 gathers parameters in hooks around each module)",
            self.compile,
        )


# Prefixes of the stream paths of `data.train` / `data.val` that are remote URLs, not local folders.
REMOTE_SCHEMES = ("s3://",)


@dataclass(frozen=True)
class StreamSpec:
    """One MDS shard directory: a local path or a remote URL, and its share of the mix."""

    # Local directory or remote URL (s3://bucket/prefix) holding index.json and the shards.
    path: str
    # Share of the samples drawn from this stream; None = in proportion to its size.
    proportion: float | None = None

    @property
    def is_remote(self) -> bool:
        return self.path.startswith(REMOTE_SCHEMES)


def parse_streams(spec: str) -> list[StreamSpec]:
    """`"s3://b/c4/train@0.8, /data/books/train@0.2"` -> two StreamSpec; `""` -> [].

    Either every stream has a proportion or none has; proportions must be > 0.
    """
    streams = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        path, sep, weight = item.rpartition("@")
        if not sep:
            streams.append(StreamSpec(item))
            continue
        try:
            proportion = float(weight)
        except ValueError:
            expected = "expected PATH@PROPORTION with a number after '@'"
            raise ValueError(f"stream {item!r}: {expected}, got {weight!r}") from None
        if not path or proportion <= 0:
            raise ValueError(f"stream {item!r}: expected PATH@PROPORTION with a path and a proportion > 0")
        streams.append(StreamSpec(path, proportion))
    if streams and len({s.proportion is None for s in streams}) > 1:
        raise ValueError(f"{spec!r}: give a @PROPORTION to every stream or to none")
    if len({s.path for s in streams}) < len(streams):
        raise ValueError(f"{spec!r}: a stream is listed twice")
    return streams


@dataclass
class DataConfig:
    # Training shards: comma-separated MDS directories or s3:// URLs written by tools/prepare_mds.py,
    # each optionally weighted PATH@PROPORTION to mix corpora ("s3://b/c4/train@0.8,/d/books/train@0.2");
    # "" = the embedded corpus (Python docs), tokenized on first use under `prepared_dir`, which
    # only a config with `allow_embedded_corpus` trains on.
    train: str = ""
    # Validation shards in the same form, without weights; "" = the embedded corpus' split when
    # `train` is "" too (otherwise no validation).
    val: str = ""
    # Tokenizer the shards were made with: a WordPiece vocab.txt or a sentencepiece .model;
    # "" = the bert-base-uncased vocab.txt shipped in m2dist/data/assets. Its SHA-256 must match the
    # shards' manifest.
    tokenizer: str = ""
    # Train on the embedded corpus when `train` is "" (the debug config); false: a run without
    # `train` stops before any work, so that a real recipe never trains on 5 MB of documentation.
    allow_embedded_corpus: bool = False
    # How the embedded corpus is cut into samples: "pad" (a paragraph per sample, padded to L) or
    # "concat" (the paragraphs joined into full windows of L tokens, as long-context pretraining
    # packs its text; batches then carry no attention mask, see m2dist/data/loader.py).
    embedded_mode: Literal["pad", "concat"] = "pad"
    # Where the embedded corpus is tokenized when `train` is ""; "" = ~/.cache/m2dist/embedded.
    prepared_dir: str = ""
    # Root of streaming's local cache of remote shards; each job gets a fresh folder under it.
    # "" = the system temporary directory.
    cache_dir: str = ""
    # DataLoader worker processes per rank (0 = load in the training process).
    num_workers: int = 2
    # Batches each worker prepares ahead.
    prefetch_factor: int = 2
    # Shuffle training samples (validation is never shuffled).
    shuffle: bool = True
    # Samples per shuffle block of streaming's py1e shuffle (0 = streaming's default).
    shuffle_block_size: int = 0
    # MLM rate of validation batches (0.15 as upstream evaluates, whatever train.mlm_probability is).
    eval_mlm_probability: float = 0.15

    def __post_init__(self) -> None:
        for key in ("train", "val"):
            try:
                streams = parse_streams(getattr(self, key))
            except ValueError as err:
                raise ConfigError(f"data.{key}: {err}") from None
            if key == "val":
                require(
                    all(s.proportion is None for s in streams),
                    "data.val",
                    "streams without @PROPORTION (validation reads each stream whole)",
                    self.val,
                )
        require(
            self.tokenizer == "" or self.tokenizer.endswith((".txt", ".model")),
            "data.tokenizer",
            'a WordPiece vocab ending in .txt, a sentencepiece model ending in .model, or ""',
            self.tokenizer,
        )
        require(self.num_workers >= 0, "data.num_workers", "an integer >= 0", self.num_workers)
        require(self.prefetch_factor >= 1, "data.prefetch_factor", "an integer >= 1", self.prefetch_factor)
        require(self.shuffle_block_size >= 0, "data.shuffle_block_size", "an integer >= 0", self.shuffle_block_size)
        require(
            0.0 < self.eval_mlm_probability < 1.0, "data.eval_mlm_probability", "in (0, 1)", self.eval_mlm_probability
        )


@dataclass
class TrackingConfig:
    # Log params, metrics and artifacts to MLflow from rank 0 (false: no tracking at all).
    enabled: bool = True
    # MLflow tracking URI; "" = $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db (no server).
    tracking_uri: str = ""
    # Project name: the MLflow experiment that every stage's runs go to (created on first use).
    experiment: str = "m2dist"
    # At the end of training, log the final consolidated model (safetensors + config + tokenizer) as
    # an MLflow pyfunc model, also written to <output_dir>/release.
    log_model: bool = True
    # Model Registry name of that model, one version per run ("{name}" = the config's name);
    # "" = log the model without registering it.
    registered_model: str = "{name}"
    # Send buffered metrics at least this often, in seconds.
    flush_every_seconds: float = 10.0
    # Send buffered metrics as soon as this many points are waiting.
    flush_every_entries: int = 1000
    # Metric points kept while the server is unreachable; beyond it the oldest are dropped and counted.
    max_buffered_metrics: int = 100_000
    # Seconds between attempts to reach the server again after a failed call.
    retry_every_seconds: float = 15.0
    # Longest wait in start() for the run to be created or reopened; training starts anyway after it.
    start_timeout_seconds: float = 20.0
    # Longest wait in close() for the last metrics and artifacts to be sent.
    close_timeout_seconds: float = 30.0

    def __post_init__(self) -> None:
        uri = self.tracking_uri
        require(
            uri in ("", "databricks") or ("://" in uri and not uri.startswith("file:")),
            "tracking.tracking_uri",
            'a URI such as http://127.0.0.1:5000 or sqlite:////abs/mlflow.db (file: stores are deprecated), or ""',
            self.tracking_uri,
        )
        require(self.experiment.strip() != "", "tracking.experiment", "a non-empty name", self.experiment)
        require(
            "/" not in self.registered_model and ":" not in self.registered_model,
            "tracking.registered_model",
            'a model name without "/" or ":", or ""',
            self.registered_model,
        )
        for name in ("flush_every_seconds", "retry_every_seconds"):
            require(getattr(self, name) > 0, f"tracking.{name}", "> 0", getattr(self, name))
        for name in ("start_timeout_seconds", "close_timeout_seconds"):
            require(getattr(self, name) >= 0, f"tracking.{name}", ">= 0", getattr(self, name))
        entries = self.flush_every_entries
        require(entries >= 1, "tracking.flush_every_entries", "an integer >= 1", entries)
        require(
            self.max_buffered_metrics >= self.flush_every_entries,
            "tracking.max_buffered_metrics",
            f">= tracking.flush_every_entries={self.flush_every_entries}",
            self.max_buffered_metrics,
        )


@dataclass
class Config:
    # A short name for logs and run names.
    name: str = "debug"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Pretraining shards, tokenizer and loader.
    data: DataConfig = field(default_factory=DataConfig)
    # MLflow experiment tracking (rank 0 only).
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        require(
            self.train.seq_len <= self.model.l_max,
            "train.seq_len",
            f"<= model.l_max={self.model.l_max}",
            self.train.seq_len,
        )

    @property
    def seq_len(self) -> int:
        """Tokens per training sequence: `train.seq_len`, or `model.l_max` when that is 0."""
        return self.train.seq_len or self.model.l_max

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_training_data(config: Config) -> None:
    """Refuse a pretraining run without data unless its config allows the embedded corpus."""
    if config.data.train or config.data.allow_embedded_corpus:
        return
    raise ConfigError(
        f"data.train: empty in config {config.name!r}, which needs its pretraining data: give the MDS shards "
        "made by tools/prepare_mds.py, e.g. data.train=/data/c4/train data.val=/data/c4/val (or s3:// URLs). "
        "Only the debug config trains on the embedded corpus (5 MB of Python documentation); "
        "data.allow_embedded_corpus=true allows it for another config"
    )


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "a list of " + ", ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert YAML scalars where lossless."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return config_section_from_dict(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `5e-4` (no dot) as a string; take it as the number it spells.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config annotation {tp!r}")


def config_section_from_dict(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """The config dataclass `cls` (a section such as ModelConfig, or Config itself) from plain values
    as read from YAML or JSON, each converted to its field's type; an unknown key or a value of the
    wrong type raises ConfigError naming its dotted path under `prefix`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{path}: unknown key; expected one of: {', '.join(sorted(fields))}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _leaf_keys(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, path)
        else:
            yield path


def _read_yaml(path: Path, seen: tuple[Path, ...] = (), origins: dict[str, Path] | None = None) -> dict[str, Any]:
    """The merged values of `path` and its `base:` chain; `origins` (if given) receives the file
    that set each dotted key, so that an error names the file holding the bad value."""
    if path in seen:
        raise ConfigError(f"{path}: base chain loops through {' -> '.join(map(str, seen))}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    base = values.pop("base", None)
    merged = values if base is None else _merge(_read_yaml((path.parent / base).resolve(), (*seen, path), origins), values)
    if origins is not None:
        origins.update(dict.fromkeys(_leaf_keys(values), path))
    return merged


def _origin_of(err: ConfigError, origins: dict[str, Path | None]) -> Path | None:
    """The file that set the key an error starts with (`model.x: ...`, `model.x[2]: ...`) or,
    failing that, every key under its nearest enclosing one; None for an override or when unknown."""
    key = re.sub(r"\[\d+\]", "", str(err).split(":", 1)[0])
    while key:
        if key in origins:
            return origins[key]
        children = {path for name, path in origins.items() if name.startswith(key + ".")}
        if len(children) == 1:
            return children.pop()
        key = key.rpartition(".")[0]
    return None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["model.hidden_size=256", "train.steps=5"]` -> nested dict, values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=5")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return nested


def resolve_config_path(name_or_path: str | Path, directory: Path = CONFIG_DIR) -> Path:
    """A path, or the name of a file in `directory` (configs/) with or without `.yaml`."""
    path = Path(name_or_path)
    if path.is_file():
        return path.resolve()
    for candidate in (directory / path, directory / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
    raise ConfigError(f"{name_or_path}: no such config file; the shipped configs ({directory}) are: {names}")


def config_from_dict(values: dict[str, Any], source: str = "<dict>") -> Config:
    return _build_named(Config, values, source)


def _build_named(cls: type, values: dict[str, Any], source: str) -> Any:
    try:
        return config_section_from_dict(cls, values, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_yaml_config(cls: type, name_or_path: str | Path, overrides: list[str] | None, directory: Path) -> Any:
    """Read a YAML file of `directory` (following `base:`) into the dataclass `cls`, with
    `key=value` overrides, every error prefixed with the file (and the overrides)."""
    path = resolve_config_path(name_or_path, directory)
    origins: dict[str, Path | None] = {}
    values = _read_yaml(path, origins=origins)  # type: ignore[arg-type]
    if overrides:
        try:
            parsed = parse_overrides(overrides)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        values = _merge(values, parsed)
        origins.update(dict.fromkeys(_leaf_keys(parsed)))
    source = f"{path}" + (f" with overrides {' '.join(overrides)}" if overrides else "")
    try:
        return config_section_from_dict(cls, values, "")
    except ConfigError as err:
        origin = _origin_of(err, origins)
        if origin is not None and origin != path:
            raise ConfigError(f"{origin}: {err} (a base of {source})") from None
        raise ConfigError(f"{source}: {err}") from None


def load_config(name_or_path: str | Path = "debug", overrides: list[str] | None = None) -> Config:
    """Read a YAML config (following `base:`), apply `key=value` overrides and check everything."""
    return load_yaml_config(Config, name_or_path, overrides, CONFIG_DIR)
