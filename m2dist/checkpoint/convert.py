"""Conversions between checkpoint layouts, each validated by reloading the result.

Sources: an m2dist release folder, an upstream M2 folder (config.json + weights) or an upstream
Composer `.pt` / plain state-dict file. Targets: `release` (m2dist) and `upstream`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from m2dist.checkpoint.io import CheckpointError
from m2dist.checkpoint.release import CONFIG_FILE, load_release, save_release
from m2dist.checkpoint.upstream import export_upstream, import_upstream
from m2dist.models import MaskedLM, SequenceClassifier

TARGETS = ("release", "upstream")


def load_any(source: str | Path) -> MaskedLM | SequenceClassifier:
    """The model in a release folder, an upstream folder or an upstream checkpoint file."""
    source = Path(source)
    config_file = source / CONFIG_FILE
    if source.is_dir() and config_file.exists():
        try:
            is_release = "model" in json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_file}: not valid JSON: {err}") from None
        if is_release:
            return load_release(source)
    return import_upstream(source)


@torch.no_grad()
def _probe_logits(model: MaskedLM | SequenceClassifier) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    length = min(model.config.l_max, 16)
    input_ids = torch.randint(model.config.vocab_size, (2, length), generator=generator)
    return model.eval()(input_ids).logits


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    to: str,
    *,
    safetensors: bool = False,
    bf16: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert `source` to the `to` layout at `destination`, then reload it and check that its
    logits on a fixed input match the source model's."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; expected one of {TARGETS}")
    model = load_any(source)
    if to == "release":
        written = save_release(model, destination, dtype=torch.bfloat16 if bf16 else torch.float32, overwrite=overwrite)
        reloaded = load_release(written)
    else:
        written = export_upstream(model, destination, safetensors=safetensors, overwrite=overwrite)
        reloaded = import_upstream(written)
    expected, got = _probe_logits(model), _probe_logits(reloaded)
    tolerance = 5e-2 if bf16 else 1e-5
    error = ((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()
    if error > tolerance:
        raise CheckpointError(f"{written}: reloaded model differs from {source}: relative error {error:.2e} > {tolerance}")
    return written
