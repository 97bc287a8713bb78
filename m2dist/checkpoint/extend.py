"""Warm start of a longer-context model from a trained shorter one: l_max L0 -> L1 >= L0.

Only four kinds of tensors have l_max rows; each is extended as below, everything else (filter
MLPs, Sin frequencies, modulation decays, mixers, MLPs, norms, heads) is copied unchanged:
- `*.embeddings.position_embeddings.weight` (L0, D), the learned absolute positions: TILED, row j
  of the new table is row j mod L0 of the old one (a last, partial copy when L0 does not divide L1).
  This is how Longformer and BigBird extended RoBERTa's 512 positions; it keeps the token-level
  differences between neighbouring positions that the model learned, and the first L0 rows are the
  trained ones exactly, so the embeddings of an input of length <= L0 do not change.
- `*.embeddings.position_ids` (1, L0): arange(L1), as an L1 model builds it.
- each Hyena filter's `pos_emb.t` (1, L0, 1), the buffer of the exponential modulation:
  linspace(0, 1, L1), as an L1 model builds it.
- each Hyena filter's `pos_emb.z` (1, L0, E), the trained positional features fed to the filter
  MLP: the L1 formula plus the trained deviation from the L0 formula, resampled linearly onto the
  new grid: `z1 = z_init(L1) + resample(z - z_init(L0))`.

Why the filters are resampled rather than kept at their absolute lags: the filter is a function of
the normalised position t in [0, 1] over the whole window (the MLP input z(t) and the modulation
exp(-t |delta|), whose decay rates are fixed buffers), so an L1 model's filters span L1 tokens. The
extended state is exactly what an L1 model holds (t and position_ids are its own buffers), and its
filter at normalised position t is the trained filter at t, stretched L1 / L0 times (as position
interpolation does for rotary embeddings), up to the O(1 / L0) offset between the two formulas'
Fourier grids. Keeping the trained filter at absolute lags instead would need t to run past 1, where
the fixed decays (each channel reaches 1e-2 by t = 0.3 .. 1.5) scale every tap beyond 1.5 L0 by less
than 1e-2 for good: a 32k model that could never learn 32k-long filters. The price: outputs
on inputs of length <= L0 are not the source model's (the embeddings are, the long convolutions are
not); training at L1 adapts them.

Shape legend: L0 / L1 source / target l_max, D hidden size, E positional feature size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from m2dist.checkpoint.convert import load_any
from m2dist.checkpoint.upstream import check_state_dict
from m2dist.config import ModelConfig
from m2dist.errors import CheckpointError
from m2dist.models import MaskedLM, SequenceClassifier
from m2dist.models.m2 import positional_features

POSITION_TABLE = "embeddings.position_embeddings.weight"
POSITION_IDS = "embeddings.position_ids"
FILTER_FEATURES = "pos_emb.z"
FILTER_POSITIONS = "pos_emb.t"
# ModelConfig fields a warm start may change: l_max, and settings of training, init or the kernels
# that leave the weights' meaning alone.
FREE_FIELDS = (
    "l_max", "hidden_dropout", "attention_dropout", "initializer_range", "filter_sin_freq", "pool", "kernels",
    "mask_padding", "activation_checkpointing",
)  # fmt: skip


def source_l_max(state: Mapping[str, torch.Tensor], source: str = "state dict") -> int:
    """The one l_max of a state dict: the row count of its position table and filter features."""
    lengths = {
        key: tensor.shape[1] if key.endswith((FILTER_FEATURES, FILTER_POSITIONS, POSITION_IDS)) else tensor.shape[0]
        for key, tensor in state.items()
        if key.endswith((POSITION_TABLE, POSITION_IDS, FILTER_FEATURES, FILTER_POSITIONS))
    }
    if not lengths:
        raise CheckpointError(f"{source}: no position table or filter features ({POSITION_TABLE}, *.{FILTER_FEATURES})")
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{key}: {length}" for key, length in sorted(lengths.items()))
        raise CheckpointError(f"{source}: position tensors disagree on l_max: {listing}")
    return next(iter(lengths.values()))


def _tile(table_LD: torch.Tensor, l_max: int) -> torch.Tensor:
    return table_LD.repeat(math.ceil(l_max / table_LD.shape[0]), 1)[:l_max]


def _extend_filter_features(z_1LE: torch.Tensor, l_max: int) -> torch.Tensor:
    length, emb_dim = z_1LE.shape[1], z_1LE.shape[2]
    init_1LE, _ = positional_features(emb_dim, length)
    deviation_1EL = (z_1LE.float() - init_1LE).transpose(1, 2)
    # align_corners: row i of either grid sits at t = i / (rows - 1), the filter's own coordinate.
    resampled_1EL = F.interpolate(deviation_1EL, size=l_max, mode="linear", align_corners=True)
    target_1LE, _ = positional_features(emb_dim, l_max)
    return (target_1LE + resampled_1EL.transpose(1, 2)).to(z_1LE.dtype)


def extend_state_dict(
    state: Mapping[str, torch.Tensor], l_max: int, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """The state dict of the same model with l_max rows instead of L0 (see the module docstring for
    what is extended how). l_max == L0 returns the tensors unchanged; l_max < L0 is an error."""
    length = source_l_max(state, source)
    if l_max < length:
        raise CheckpointError(
            f"{source}: has l_max={length}, longer than the target l_max={l_max}; a warm start only extends"
        )
    if l_max == length:
        return dict(state)
    extended = {}
    for key, tensor in state.items():
        if key.endswith(POSITION_TABLE):
            extended[key] = _tile(tensor, l_max)
        elif key.endswith(POSITION_IDS):
            extended[key] = torch.arange(l_max, dtype=tensor.dtype)[None]
        elif key.endswith(FILTER_POSITIONS):
            # t does not depend on the number of features.
            extended[key] = positional_features(3, l_max)[1].to(tensor.dtype)
        elif key.endswith(FILTER_FEATURES):
            extended[key] = _extend_filter_features(tensor, l_max)
        else:
            extended[key] = tensor
    return extended


def check_compatible(source_config: ModelConfig, target_config: ModelConfig, source: str) -> None:
    """Raise unless the two configs describe the same architecture apart from FREE_FIELDS."""
    free = FREE_FIELDS
    if source_config.architecture == target_config.architecture == "m2":
        free += ("num_attention_heads",)
    differing = [
        f"model.{field.name}={getattr(source_config, field.name)!r} in the source, "
        f"{getattr(target_config, field.name)!r} in this config"
        for field in dataclasses.fields(ModelConfig)
        if field.name not in free and getattr(source_config, field.name) != getattr(target_config, field.name)
    ]
    if differing:
        raise CheckpointError(
            f"{source}: not the architecture of this config: " + "; ".join(differing)
            + f". A warm start may change only {', '.join(FREE_FIELDS)}"
        )  # fmt: skip


def warm_start(model: MaskedLM | SequenceClassifier, source: str | Path) -> str:
    """Load into `model` the weights of `source` (a training run, one of its checkpoints, a release
    folder or an upstream checkpoint: whatever `convert.load_any` reads), extended to the model's
    l_max. Returns a one-line account for the log."""
    source_model = load_any(source)
    check_compatible(source_model.config, model.config, str(source))
    target_l_max = model.config.l_max
    state = extend_state_dict(source_model.state_dict(), target_l_max, str(source))
    check_state_dict(model, state, str(source))
    model.load_state_dict(state, strict=True)
    length = source_model.config.l_max
    if length == target_l_max:
        return f"initialized from {source} (l_max {length})"
    return (
        f"initialized from {source}: l_max {length} -> {target_l_max} "
        "(position table tiled, filter positional features resampled)"
    )
