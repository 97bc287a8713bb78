"""The one typed config tree of m2dist.

A YAML file in configs/ maps onto `Config`; `key=value` overrides on the command line address it by
dotted path (`model.hidden_size=256`). A file may start from another with `base: <file>.yaml`
(resolved next to it) and change only what differs. Every field has a docstring-like comment and
the checks in `__post_init__` name the key that is wrong and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or impossible."""


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


@dataclass
class KernelConfig:
    # Implementation of the gated FFT long convolution: "reference" (torch.fft).
    fftconv: str = "reference"
    # Implementation of the block-diagonal GLU MLP matmuls: "reference" (torch einsum).
    blockdiag: str = "reference"

    def __post_init__(self) -> None:
        from kernels import blockdiag, fftconv

        _require(self.fftconv in fftconv.BACKENDS, "kernels.fftconv", f"one of {fftconv.BACKENDS}", self.fftconv)
        _require(
            self.blockdiag in blockdiag.BACKENDS, "kernels.blockdiag", f"one of {blockdiag.BACKENDS}", self.blockdiag
        )


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
    # Which implementation runs the heavy ops.
    kernels: KernelConfig = field(default_factory=KernelConfig)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "l_max", "filter_order"):
            _require(getattr(self, name) >= 1, f"model.{name}", "an integer >= 1", getattr(self, name))
        _require(self.type_vocab_size >= 1, "model.type_vocab_size", "an integer >= 1", self.type_vocab_size)
        _require(
            0 <= self.pad_token_id < self.vocab_size, "model.pad_token_id", f"in [0, {self.vocab_size})", self.pad_token_id
        )
        for name in ("hidden_dropout", "attention_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, f"model.{name}", "a probability in [0, 1)", getattr(self, name))
        _require(self.layer_norm_eps > 0, "model.layer_norm_eps", "> 0", self.layer_norm_eps)
        _require(self.initializer_range > 0, "model.initializer_range", "> 0", self.initializer_range)
        _require(
            self.filter_emb_dim >= 3 and self.filter_emb_dim % 2 == 1,
            "model.filter_emb_dim",
            "an odd integer >= 3",
            self.filter_emb_dim,
        )
        _require(self.mlp_nblocks >= 1, "model.mlp_nblocks", "an integer >= 1", self.mlp_nblocks)
        if self.architecture == "m2":
            for name in ("hidden_size", "intermediate_size"):
                size = getattr(self, name)
                _require(
                    size % self.mlp_nblocks == 0,
                    f"model.{name}",
                    f"a multiple of model.mlp_nblocks={self.mlp_nblocks}",
                    size,
                )
        else:
            _require(
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
            _require(getattr(self, name) > 0, f"train.optimizer.{name}", "> 0", getattr(self, name))
        for name in ("weight_decay", "filter_weight_decay"):
            _require(getattr(self, name) >= 0, f"train.optimizer.{name}", ">= 0", getattr(self, name))
        _require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "train.optimizer.betas",
            "two numbers in [0, 1)",
            self.betas,
        )


@dataclass
class TrainConfig:
    # Optimizer steps to run.
    steps: int = 20
    # Sequences per step.
    batch_size: int = 8
    # Tokens per sequence (0 = model.l_max).
    seq_len: int = 0
    # Share of tokens selected for MLM prediction (M2 0.30, BERT 0.15), replaced 80/10/10.
    mlm_probability: float = 0.30
    # Seed of parameters init, data and masking.
    seed: int = 17
    # "cpu", "cuda", or "auto" (cuda when available).
    device: str = "auto"
    # Print a log line every this many steps.
    log_every: int = 1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            _require(getattr(self, name) >= 1, f"train.{name}", "an integer >= 1", getattr(self, name))
        _require(self.seq_len >= 0, "train.seq_len", "an integer >= 0 (0 = model.l_max)", self.seq_len)
        _require(0.0 < self.mlm_probability < 1.0, "train.mlm_probability", "in (0, 1)", self.mlm_probability)
        _require(self.device in ("auto", "cpu", "cuda"), "train.device", "auto, cpu or cuda", self.device)


@dataclass
class Config:
    # A short name for logs and run names.
    name: str = "debug"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _require(
            self.train.seq_len <= self.model.l_max,
            "train.seq_len",
            f"<= model.l_max={self.model.l_max}",
            self.train.seq_len,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list of " + ", ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert YAML scalars where lossless."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config annotation {tp!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
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


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
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
    if base is None:
        return values
    return _merge(_read_yaml((path.parent / base).resolve(), (*seen, path)), values)


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


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a file in configs/ with or without `.yaml`."""
    path = Path(name_or_path)
    if path.exists():
        return path.resolve()
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.exists():
            return candidate
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"{name_or_path}: no such config file; the shipped configs are: {names}")


def config_from_dict(values: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return _build(Config, values, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(name_or_path: str | Path = "debug", overrides: list[str] | None = None) -> Config:
    """Read a YAML config (following `base:`), apply `key=value` overrides and check everything."""
    path = resolve_config_path(name_or_path)
    values = _read_yaml(path)
    if overrides:
        try:
            values = _merge(values, parse_overrides(overrides))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    source = f"{path}" + (f" with overrides {' '.join(overrides)}" if overrides else "")
    return config_from_dict(values, source)
