"""The GLUE fine-tuning protocol as a typed config (M2_SPEC 4), read from configs/glue/*.yaml.

`configs/glue/default.yaml` holds the published per-task table; a per-model file such as
`configs/glue/m2-bert-80M.yaml` starts from it with `base: default.yaml` and changes what the M2
configs change. Loading follows m2dist.config: unknown keys and wrong types raise `ConfigError`
naming the key and the file; `key=value` overrides address fields by dotted path
(`tasks.rte.epochs=1`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from m2dist.config import CONFIG_DIR, KERNEL_BACKENDS, TrackingConfig, load_yaml_config, require, resolve_config_path
from m2dist.errors import ConfigError

GLUE_CONFIG_DIR = CONFIG_DIR / "glue"
# The protocol's seeds; a task runs the first `len(seeds)` of them by default.
PROTOCOL_SEEDS = (19, 8364, 717, 10536, 90166)


@dataclass
class TaskConfig:
    # Peak learning rate of the global parameter group.
    lr: float = 3e-5
    # Weight decay: per step `weight_decay x lr/peak lr` with "decoupled_adamw" (Composer's
    # DecoupledAdamW, what the published numbers use), `weight_decay x lr` with "adamw" (torch AdamW).
    weight_decay: float = 3e-6
    # Passes over the training split.
    epochs: int = 3
    # Training sequences per optimizer step.
    batch_size: int = 16
    # One fine-tuning job per seed; results are averaged over seeds.
    seeds: list[int] = field(default_factory=lambda: [19])
    # "decoupled_adamw" or "adamw" (see weight_decay).
    optimizer: Literal["decoupled_adamw", "adamw"] = "decoupled_adamw"
    # Classifier pooling: "cls", "mean" (masked mean over tokens), or "" to keep the checkpoint's
    # (the pretraining config's `model.pool`, "cls"). The M2 configs set it per task as upstream ran.
    pool: Literal["", "cls", "mean"] = ""
    # Start from the MNLI-finetuned encoder (and pooler) instead of the pretrained one.
    init_from_mnli: bool = False

    def check(self, key: str) -> None:
        require(self.lr > 0, f"{key}.lr", "> 0", self.lr)
        require(self.weight_decay >= 0, f"{key}.weight_decay", ">= 0", self.weight_decay)
        require(self.epochs >= 1, f"{key}.epochs", "an integer >= 1", self.epochs)
        require(self.batch_size >= 1, f"{key}.batch_size", "an integer >= 1", self.batch_size)
        require(
            len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds),
            f"{key}.seeds",
            "a non-empty list of distinct integers",
            self.seeds,
        )


@dataclass
class TextTaskConfig(TaskConfig):
    """A labeled-text classification task from a CSV or JSONL file (not part of the GLUE score)."""

    # Column (CSV) or field (JSONL) holding the text.
    text_column: str = "text"
    # Optional second text of a pair task ("" = single sentence).
    text_pair_column: str = ""
    # Column or field holding the label (any string; the label set is the training split's).
    label_column: str = "label"
    # Share of the training file held out as dev when no dev file is given, by a stable hash of
    # the text (duplicates stay on one side).
    dev_fraction: float = 0.1

    def check(self, key: str) -> None:
        super().check(key)
        require(self.init_from_mnli is False, f"{key}.init_from_mnli", "false for the text task", self.init_from_mnli)
        for name in ("text_column", "label_column"):
            require(getattr(self, name) != "", f"{key}.{name}", "a column name", getattr(self, name))
        require(0.0 < self.dev_fraction < 1.0, f"{key}.dev_fraction", "in (0, 1)", self.dev_fraction)


@dataclass
class GlueTasks:
    mnli: TaskConfig = field(default_factory=TaskConfig)
    qnli: TaskConfig = field(default_factory=TaskConfig)
    qqp: TaskConfig = field(default_factory=TaskConfig)
    sst2: TaskConfig = field(default_factory=TaskConfig)
    cola: TaskConfig = field(default_factory=TaskConfig)
    mrpc: TaskConfig = field(default_factory=TaskConfig)
    stsb: TaskConfig = field(default_factory=TaskConfig)
    rte: TaskConfig = field(default_factory=TaskConfig)
    # The generic labeled-text task (--text-train / --rotten-tomatoes).
    text: TextTaskConfig = field(default_factory=TextTaskConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).check(f"tasks.{f.name}")
        require(not self.mnli.init_from_mnli, "tasks.mnli.init_from_mnli", "false", self.mnli.init_from_mnli)


@dataclass
class GlueConfig:
    # A short name for the MLflow parent run and the output folder.
    name: str = "glue"
    # Tokens per input: pairs are cut longest-first, then padded; 0 = the model's l_max (M2 mixes
    # pad tokens into its convolutions, so the protocol pads to l_max = 128).
    seq_len: int = 0
    # "bf16": bf16 autocast on CUDA (fp32 master weights); "fp32". CPU runs always use fp32.
    precision: Literal["bf16", "fp32"] = "bf16"
    # AdamW betas and epsilon.
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    # Linear warmup over this share of each job's steps, then linear decay to 0.
    warmup_fraction: float = 0.06
    # M2 only: lr and weight decay of the forward filter MLPs (+ Sin frequency), lr of the filters'
    # positional features z (weight decay 0), as upstream fine-tunes with its pretraining groups.
    filter_lr: float = 1e-3
    filter_weight_decay: float = 0.1
    pos_emb_lr: float = 1e-5
    # How the filter group's weight decay applies in tasks with optimizer "decoupled_adamw":
    # "decoupled" (upstream, and m2dist's pretraining) = Composer's DecoupledAdamW, wd x lr_t/peak lr
    # per step (10% per step at peak with wd 0.1); "adamw" = torch AdamW's wd x lr_t (1e-4 per step
    # at peak), a deviation that keeps the filters of a randomly initialised model from being
    # flattened within tens of steps. Tasks with optimizer "adamw" decay every group by wd x lr_t.
    filter_decay: Literal["decoupled", "adamw"] = "decoupled"
    # Shuffle the training split every epoch. Upstream reads each task in file order every epoch
    # (false); true draws a new order per epoch from the job's seed.
    shuffle: bool = False
    # Implementations of the M2 heavy ops ("" = as saved in the checkpoint).
    fftconv: Literal["", "auto", "reference", "triton"] = ""
    blockdiag: Literal["", "auto", "reference", "triton"] = ""
    # The sequence mixer as one fused Triton operator (`model.kernels.fused_mixer`); null = as saved.
    fused_mixer: bool | None = None
    # Zero pad positions inside the M2 mixer (`model.mask_padding`); null = as saved in the checkpoint.
    mask_padding: bool | None = None
    # The pretraining config (configs/<model>.yaml) whose checkpoints this protocol is for; a
    # checkpoint of another architecture (size, layers, the 80M's mixer LayerNorm) is refused
    # before any work, naming the differences. "" = any checkpoint.
    model: str = ""
    # Sequences per evaluation forward pass.
    eval_batch_size: int = 128
    # On a GPU, replay each job's training step as one CUDA graph (m2dist.glue.step).
    cuda_graphs: bool = True
    # torch.compile the classifier (static shapes) before the step is captured: Inductor fuses the
    # elementwise work around the matmuls and kernels. On one H200 (random-init models, L=128, with
    # the CUDA graph) it made m2-bert-80M's step 1.12x and bert-base's 1.33-1.34x faster at batch 16
    # and 48, for about 20-30 s more in a job's first epoch (docs/performance.md). Off by default.
    compile: bool = False
    # For smoke runs: use a fixed random subset of this many training / dev rows per split (0 = all).
    max_train_examples: int = 0
    max_eval_examples: int = 0
    # Tokenizer: a WordPiece vocab.txt or sentencepiece .model; "" = bert-base-uncased (shipped).
    tokenizer: str = ""
    tasks: GlueTasks = field(default_factory=GlueTasks)
    # MLflow: one parent run, a nested run per job. "" URI = $MLFLOW_TRACKING_URI, else
    # sqlite:///<output_dir>/mlflow.db; the experiment is the project's, as for pretraining.
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        require(self.name.strip() != "", "name", "a non-empty name", self.name)
        require(self.seq_len >= 0, "seq_len", "an integer >= 0", self.seq_len)
        require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas", "two numbers in [0, 1)", self.betas
        )
        require(self.eps > 0, "eps", "> 0", self.eps)
        require(0.0 <= self.warmup_fraction < 1.0, "warmup_fraction", "in [0, 1)", self.warmup_fraction)
        for name in ("filter_lr", "pos_emb_lr"):
            require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        require(self.filter_weight_decay >= 0, "filter_weight_decay", ">= 0", self.filter_weight_decay)
        require(self.fftconv in ("", *KERNEL_BACKENDS), "fftconv", f"'' or one of {KERNEL_BACKENDS}", self.fftconv)
        require(self.blockdiag in ("", *KERNEL_BACKENDS), "blockdiag", f"'' or one of {KERNEL_BACKENDS}", self.blockdiag)
        if self.model:
            try:
                resolve_config_path(self.model)
            except ConfigError as err:
                raise ConfigError(f"model: {err}") from None
        for name in ("eval_batch_size",):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        for name in ("max_train_examples", "max_eval_examples"):
            require(getattr(self, name) >= 0, name, "an integer >= 0", getattr(self, name))

    def task(self, name: str) -> TaskConfig:
        return getattr(self.tasks, name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_glue_config(name_or_path: str | Path = "default", overrides: list[str] | None = None) -> GlueConfig:
    """Read a GLUE YAML config (following `base:`), apply `key=value` overrides and check everything."""
    return load_yaml_config(GlueConfig, name_or_path, overrides, GLUE_CONFIG_DIR)