"""Import and export of released upstream M2-BERT checkpoints (M2_SPEC 6).

Two upstream layouts:
- a Composer `.pt` file: weights under `state` -> `model`, every key prefixed `model.`;
- a Hugging Face-style folder: `config.json` + `pytorch_model.bin` or `model.safetensors`.
m2dist's modules use upstream's names, so the state dict maps one to one; what this module adds is
the upstream `config.json`, `position_ids`, strict key/shape checks and safe loading.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from m2dist.checkpoint.io import safe_torch_load
from m2dist.config import ModelConfig
from m2dist.errors import CheckpointError, OutputExistsError
from m2dist.models import MaskedLM, SequenceClassifier

COMPOSER_PREFIX = "model."
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# Upstream config.json keys that m2dist's ModelConfig reads directly.
_UPSTREAM_TO_M2DIST = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "max_position_embeddings": "l_max",
    "type_vocab_size": "type_vocab_size",
    "pad_token_id": "pad_token_id",
    "hidden_dropout_prob": "hidden_dropout",
    "layer_norm_eps": "layer_norm_eps",
    "initializer_range": "initializer_range",
    "hyena_filter_order": "filter_order",
    "hyena_emb_dim": "filter_emb_dim",
    "hyena_w": "filter_sin_freq",
    "bidirectional": "bidirectional",
    "residual_long_conv": "residual_long_conv",
    "hyena_training_additions": "pre_layernorm",
}
# Upstream switches whose other values select variants that were never released as M2-BERT.
_REQUIRED_FLAGS = {
    "monarch_mixer_sequence_mixing": True,
    "use_glu_mlp": True,
    "use_positional_encodings": True,
    "hyena_w_mod": 1,
}


def config_from_upstream(upstream: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The m2dist ModelConfig of an upstream `config.json` dict."""
    for key, value in _REQUIRED_FLAGS.items():
        if key in upstream and upstream[key] != value:
            raise CheckpointError(f"{source}: {key}={upstream[key]!r} is not supported; m2dist implements {key}={value!r}")
    long_conv_l_max = upstream.get("long_conv_l_max", upstream.get("max_position_embeddings"))
    if long_conv_l_max != upstream.get("max_position_embeddings"):
        raise CheckpointError(
            f"{source}: long_conv_l_max={long_conv_l_max} differs from max_position_embeddings="
            f"{upstream.get('max_position_embeddings')}; m2dist uses one l_max for both"
        )
    values: dict[str, Any] = {"architecture": "m2"}
    for up_key, key in _UPSTREAM_TO_M2DIST.items():
        if up_key in upstream and upstream[up_key] is not None:
            values[key] = upstream[up_key]
    values["mlp_nblocks"] = upstream.get("monarch_mlp_nblocks", 4) if upstream.get("use_monarch_mlp", True) else 1
    values["pool"] = "mean" if upstream.get("pool_all", False) else "cls"
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from None


def config_to_upstream(config: ModelConfig, architecture: str = "BertForMaskedLM") -> dict[str, Any]:
    """The upstream `config.json` dict of an M2 ModelConfig."""
    if config.architecture != "m2":
        raise ValueError(f"only M2-BERT has an upstream layout; got architecture={config.architecture!r}")
    upstream: dict[str, Any] = {up: getattr(config, key) for up, key in _UPSTREAM_TO_M2DIST.items()}
    upstream.update(_REQUIRED_FLAGS)
    upstream.update(
        architectures=[architecture],
        model_type="bert",
        hidden_act="gelu",
        attention_probs_dropout_prob=0.0,
        long_conv_l_max=config.l_max,
        long_conv_kernel_learning_rate=1e-3,
        hyena_lr_pos_emb=1e-5,
        hyena_wd=0.1,
        hyena_filter_dropout=0.0,
        use_monarch_mlp=config.mlp_nblocks > 1,
        monarch_mlp_nblocks=config.mlp_nblocks,
        pool_all=config.pool == "mean",
    )
    return upstream


def config_from_state_dict(state: dict[str, torch.Tensor], source: str = "checkpoint") -> ModelConfig:
    """Infer the M2 ModelConfig from tensor shapes (Composer files carry no model config)."""
    try:
        vocab_size, hidden = state["bert.embeddings.word_embeddings.weight"].shape
        l_max = state["bert.embeddings.position_embeddings.weight"].shape[0]
        layer0 = "bert.encoder.layer.0."
        order, emb_dim = state[layer0 + "attention.filter_fn.implicit_filter.0.weight"].shape
        nblocks, _, inner_per_block = state[layer0 + "mlp.wo.weight"].shape
        type_vocab = state["bert.embeddings.token_type_embeddings.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"{source}: not an M2-BERT state dict: key {err} is missing") from None
    layers = {int(k.split(".")[3]) for k in state if k.startswith("bert.encoder.layer.")}
    try:
        return ModelConfig(
            architecture="m2",
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=nblocks * inner_per_block,
            num_layers=max(layers) + 1,
            l_max=l_max,
            type_vocab_size=type_vocab,
            filter_order=order,
            filter_emb_dim=emb_dim,
            bidirectional=(layer0 + "attention.filter_fn.implicit_filter_rev.0.weight") in state,
            residual_long_conv=(layer0 + "attention.filter_fn2.bias") in state,
            pre_layernorm=(layer0 + "attention.layernorm.weight") in state,
            mlp_nblocks=nblocks,
        )
    except ValueError as err:
        raise CheckpointError(f"{source}: inferred an impossible config: {err}") from None


def _read_upstream(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict without prefixes, upstream config.json dict or None) of a file or folder."""
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise CheckpointError(f"{path}: an upstream checkpoint folder needs config.json")
        try:
            upstream_config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_file}: not valid JSON: {err}") from None
        weight_file = next((path / name for name in WEIGHT_FILES if (path / name).exists()), None)
        if weight_file is None:
            raise CheckpointError(f"{path}: found none of {', '.join(WEIGHT_FILES)}")
        return _load_weights(weight_file), upstream_config
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    raw = safe_torch_load(path)
    state = raw
    if isinstance(raw, dict) and "state" in raw:
        try:
            state = raw["state"]["model"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: a Composer checkpoint needs its weights under state -> model") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    if state and all(k.startswith(COMPOSER_PREFIX) for k in state):
        state = {k[len(COMPOSER_PREFIX) :]: v for k, v in state.items()}
    return state, None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = safe_torch_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def key_problems(model: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The missing, unexpected and misshaped keys of a state dict given by its shapes, one entry per kind."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(shapes[k])}"
        for k in expected
        if k in shapes and tuple(shapes[k]) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append("missing keys:\n  " + "\n  ".join(missing))
    if unexpected:
        problems.append("unexpected keys:\n  " + "\n  ".join(unexpected))
    if misshaped:
        problems.append("misshaped keys:\n  " + "\n  ".join(misshaped))
    return problems


def shared_keys_problem(first: str, differing: list[str]) -> str:
    return f"keys shared in the model hold different tensors: {first} vs {', '.join(differing)}"


def state_dict_error(source: str, problems: list[str]) -> CheckpointError:
    return CheckpointError(f"{source}: state dict does not match the model:\n" + "\n".join(problems))


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error listing every missing, unexpected and misshaped key, and every pair of keys
    that the model shares (tied decoder, shared Sin frequency) whose tensors differ."""
    problems = key_problems(model, {k: tuple(v.shape) for k, v in state.items()})
    if not problems:
        aliases: dict[tuple[int, int], list[str]] = {}
        for key, tensor in model.state_dict().items():
            aliases.setdefault((tensor.data_ptr(), tensor.numel()), []).append(key)
        for keys in aliases.values():
            differing = [k for k in keys[1:] if not torch.equal(state[k], state[keys[0]])]
            if differing:
                problems.append(shared_keys_problem(keys[0], differing))
    if problems:
        raise state_dict_error(source, problems)


def import_upstream(path: str | Path, config: ModelConfig | None = None) -> MaskedLM | SequenceClassifier:
    """Build the m2dist model of an upstream checkpoint and load its weights, strictly.

    An MLM checkpoint (`cls.predictions.*`) gives a MaskedLM, a classification one
    (`classifier.*`) a SequenceClassifier. `config` overrides what the checkpoint says.
    """
    path = Path(path)
    state, upstream_config = _read_upstream(path)
    if config is None:
        if upstream_config is not None:
            config = config_from_upstream(upstream_config, str(path / "config.json"))
        else:
            config = config_from_state_dict(state, str(path))
    if "classifier.weight" in state:
        model: MaskedLM | SequenceClassifier = SequenceClassifier(config, state["classifier.weight"].shape[0])
    else:
        model = MaskedLM(config)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model


def upstream_state_dict(model: MaskedLM | SequenceClassifier) -> dict[str, torch.Tensor]:
    """The model's weights under upstream's keys, every entry its own contiguous CPU tensor."""
    if model.config.architecture != "m2":
        raise ValueError("only M2-BERT models have an upstream layout")
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def export_upstream(
    model: MaskedLM | SequenceClassifier, destination: str | Path, *, safetensors: bool = False, overwrite: bool = False
) -> Path:
    """Write an upstream checkpoint: a folder (config.json + pytorch_model.bin or model.safetensors),
    or a Composer-style file when `destination` ends in `.pt`. Refuses to overwrite unless told to."""
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise OutputExistsError(f"{destination} exists; pass overwrite=True (--overwrite) to replace it")
    state = upstream_state_dict(model)
    if destination.suffix == ".pt":
        destination.parent.mkdir(parents=True, exist_ok=True)
        composer_state = {COMPOSER_PREFIX + k: v for k, v in state.items()}
        _atomic_torch_save({"state": {"model": composer_state}}, destination)
        return destination
    destination.mkdir(parents=True, exist_ok=True)
    architecture = "BertForSequenceClassification" if isinstance(model, SequenceClassifier) else "BertForMaskedLM"
    upstream_config = config_to_upstream(model.config, architecture)
    if isinstance(model, SequenceClassifier):
        upstream_config["num_labels"] = model.num_labels
    (destination / "config.json").write_text(json.dumps(upstream_config, indent=1) + "\n")
    for name in WEIGHT_FILES:
        (destination / name).unlink(missing_ok=True)
    if safetensors:
        from safetensors.torch import save_file

        tmp = destination / "model.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(destination / "model.safetensors")
    else:
        _atomic_torch_save(state, destination / "pytorch_model.bin")
    return destination


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
