"""m2dist's own release folder: `model.safetensors` + `config.json` (the m2dist ModelConfig).

`load_release(path)` rebuilds the model in one call; the weights are checked key by key first.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from m2dist.checkpoint.io import read_safetensors_header, read_safetensors_into
from m2dist.checkpoint.upstream import key_problems, shared_keys_problem, state_dict_error
from m2dist.config import ModelConfig, config_section_from_dict
from m2dist.errors import CheckpointError, ConfigError, OutputExistsError
from m2dist.models import MaskedLM, SequenceClassifier

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The `format` of a release's config.json (folders of older versions have only its `model` section).
RELEASE_FORMAT = "m2dist-release"


def save_release(
    model: MaskedLM | SequenceClassifier, destination: str | Path, *, dtype: torch.dtype = torch.float32, overwrite: bool = False
) -> Path:
    """Write the release folder; refuses to replace an existing one unless `overwrite`."""
    from safetensors.torch import save_file

    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise OutputExistsError(f"{destination} exists; pass overwrite=True (--overwrite) to replace it")
    destination.mkdir(parents=True, exist_ok=True)
    meta = {"format": RELEASE_FORMAT, "model": dataclasses.asdict(model.config), "task": "mlm"}
    if isinstance(model, SequenceClassifier):
        meta.update(task="classification", num_labels=model.num_labels)
    state = {
        k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype, copy=True).contiguous()
        for k, v in model.state_dict().items()
    }
    tmp = destination / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(destination / WEIGHTS_FILE)
    (destination / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return destination


def load_release(path: str | Path) -> MaskedLM | SequenceClassifier:
    """The model saved by `save_release`, in fp32. The weights are read into the model one tensor at
    a time, so they are in memory once."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for required in (config_file, weights_file):
        if not required.exists():
            raise CheckpointError(f"{path}: not an m2dist release folder: {required.name} is missing")
    meta = json.loads(config_file.read_text())
    if "model" not in meta:
        raise CheckpointError(f"{config_file}: expected a 'model' section (an upstream config.json? use import_upstream)")
    try:
        config = config_section_from_dict(ModelConfig, meta["model"], "model")
    except ConfigError as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    if meta.get("task") == "classification":
        model: MaskedLM | SequenceClassifier = SequenceClassifier(config, int(meta["num_labels"]))
    else:
        model = MaskedLM(config)
    shapes = {name: entry.shape for name, entry in read_safetensors_header(weights_file).items()}
    problems = key_problems(model, shapes)
    if not problems:
        differing = read_safetensors_into(weights_file, model.state_dict())
        problems = [shared_keys_problem(first, [other]) for first, other in differing]
    if problems:
        raise state_dict_error(str(weights_file), problems)
    return model
