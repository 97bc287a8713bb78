"""Conversions between checkpoint layouts, each validated by reloading the result.

Sources: a training run's DeepSpeed checkpoint (the run folder, its `checkpoints/` folder or one tag
folder; any ZeRO stage), an m2dist release folder, an upstream M2 folder (config.json + weights) or an
upstream Composer `.pt` / plain state-dict file. Targets:
- `release`: m2dist's folder (model.safetensors, config.json); from a training run also the tokenizer
  and a model_card.md. A ZeRO checkpoint is consolidated lazily and written tensor by tensor.
- `upstream`: the upstream M2-BERT layout.
- `universal`: DeepSpeed's universal checkpoint of a training run (`layout.make_universal`, as the
  engine makes it), for resuming on another number of ranks.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from m2dist.checkpoint import zero
from m2dist.checkpoint.io import load_deepspeed_file, read_safetensors_header, write_safetensors
from m2dist.checkpoint.layout import CLIENT_STATE, COMPLETE, make_universal, run_markers, universal_tag
from m2dist.checkpoint.release import CONFIG_FILE, RELEASE_FORMAT, WEIGHTS_FILE, load_release, save_release
from m2dist.checkpoint.upstream import WEIGHT_FILES, export_upstream, import_upstream
from m2dist.data.tokenizer import tokenizer_file
from m2dist.errors import CheckpointError, OutputExistsError
from m2dist.models import MaskedLM, SequenceClassifier

TARGETS = ("release", "upstream", "universal")
MODEL_CARD = "model_card.md"


def source_kind(source: str | Path) -> str:
    """"run" (a training run, its checkpoints folder or one tag folder), "release" (an m2dist
    release folder), "upstream" (an upstream folder) or "file" (an upstream checkpoint file).

    A folder's kind comes from the files m2dist writes: the engine's markers and shards
    (`layout.run_markers`), or a release's config.json with its `model` section. A folder holding
    both a training run's files and model weights is refused: which of its files would be read is
    not for m2dist to guess.
    """
    source = Path(source)
    if source.is_file():
        return "file"
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint file or folder")
    markers = run_markers(source)
    weights = [name for name in WEIGHT_FILES if (source / name).exists()]
    if markers and weights:
        raise CheckpointError(
            f"{source}: refused: it holds both a training run's files ({', '.join(markers)}) and model weights "
            f"({', '.join(weights)}), so its kind is ambiguous; a release or upstream folder holds no training "
            "checkpoint files and a run folder no weight files"
        )
    if markers:
        return "run"
    config_file = source / CONFIG_FILE
    if config_file.exists():
        try:
            meta = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{config_file}: not valid JSON: {err}") from None
        if isinstance(meta, dict) and "model" in meta:
            return "release"
    return "upstream"


def load_any(source: str | Path, tag: str | None = None) -> MaskedLM | SequenceClassifier:
    """The model in a training run's checkpoint (fp32 master weights), a release folder, an upstream
    folder or an upstream checkpoint file (see `source_kind`)."""
    source = Path(source)
    kind = source_kind(source)
    if kind == "run":
        return zero.load_zero_model(*zero.resolve_zero_checkpoint(source, tag))
    if tag is not None:
        raise ValueError(f"tag={tag!r} applies to a training run's checkpoints only, not to {source}")
    if kind == "release":
        return load_release(source)
    return import_upstream(source)


@torch.no_grad()
def _probe_logits(model: MaskedLM | SequenceClassifier) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    length = min(model.config.l_max, 16)
    input_ids = torch.randint(model.config.vocab_size, (2, length), generator=generator)
    return model.eval()(input_ids).logits


def checked_probe_logits(model: MaskedLM | SequenceClassifier, source: str | Path) -> torch.Tensor:
    """The model's logits on the check input; CheckpointError, before anything is written, when its
    weights or those logits hold NaN or infinity (a diverged run)."""
    bad = [name for name, tensor in model.state_dict().items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    advice = "the training diverged; refusing to convert it (pick an earlier checkpoint with --tag)"
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} tensor(s) hold NaN or infinity ({', '.join(bad[:3])}): {advice}")
    logits = _probe_logits(model)
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"{source}: the weights are finite but the logits on the check input are not: {advice}")
    return logits


def _check_logits(expected: torch.Tensor, got: torch.Tensor, written: Path, source: Path, bf16: bool) -> None:
    tolerance = 5e-2 if bf16 else 1e-5
    error = ((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()
    # Written so that a NaN error fails too.
    if not error <= tolerance:
        raise CheckpointError(f"{written}: reloaded model differs from {source}: relative error {error:.2e} > {tolerance}")


def _claim_destination(destination: Path, overwrite: bool) -> None:
    if destination.exists() and not overwrite:
        raise OutputExistsError(f"{destination} exists; pass overwrite=True (--overwrite) to replace it")


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    to: str,
    *,
    tag: str | None = None,
    safetensors: bool = False,
    bf16: bool = False,
    overwrite: bool = False,
    stats: dict[str, float] | None = None,
) -> Path:
    """Convert `source` to the `to` layout at `destination`, then reload it and check it: keys,
    shapes and dtypes, and logits on a fixed input equal to the source model's.

    `tag` picks a training run's checkpoint (default: `latest`). If `stats` is given, it receives
    `rss_before_mib` (the RSS once the libraries are imported) and `peak_rss_mib` (the largest RSS
    sampled during the conversion).
    """
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; expected one of {TARGETS}")
    source, destination = Path(source), Path(destination)
    _claim_destination(destination, overwrite)
    from_run = source_kind(source) == "run"
    if from_run:
        # Imported before measuring, so that the memory figures are those of the conversion.
        import deepspeed.utils.zero_to_fp32  # noqa: F401
    with zero.RssSampler() as rss:
        written = _convert(source, destination, to, from_run, tag, safetensors, bf16, overwrite)
    if stats is not None:
        stats.update(rss_before_mib=rss.before, peak_rss_mib=rss.peak)
    return written


def _convert(
    source: Path, destination: Path, to: str, from_run: bool, tag: str | None, safetensors: bool, bf16: bool,
    overwrite: bool,
) -> Path:
    if from_run and to == "release":
        return _zero_to_release(source, destination, tag, bf16=bf16)
    if to == "universal":
        if not from_run:
            raise CheckpointError(f"{source}: --to universal needs a training run's DeepSpeed checkpoint")
        return _zero_to_universal(source, destination, tag)
    model = load_any(source, tag)
    expected = checked_probe_logits(model, source)
    if to == "release":
        dtype = torch.bfloat16 if bf16 else torch.float32
        written = save_release(model, destination, dtype=dtype, overwrite=overwrite)
        reloaded = load_release(written)
    else:
        written = export_upstream(model, destination, safetensors=safetensors, overwrite=overwrite)
        reloaded = import_upstream(written)
    _check_logits(expected, _probe_logits(reloaded), written, source, bf16 and to == "release")
    return written


def _zero_to_release(source: Path, destination: Path, tag: str | None, *, bf16: bool) -> Path:
    """Stream the consolidated fp32 weights of a run's checkpoint into a release folder.

    The fp32 weights are in memory about once at any time, never the optimizer's moments: the source
    model is built (its own weights, freed when replaced) and then holds the memory-mapped master
    weights themselves (ZeRO-1/2; ZeRO-3 gathers each tensor into a copy), which are written tensor by
    tensor and run for the logits check; with those unmapped, the release is read back into a fresh
    model with plain reads. On top: the model's initialisation temporaries and DeepSpeed's one-off full
    read of the model state file (ZeRO-1/2, before anything else is held).
    """
    root, tag = zero.resolve_zero_checkpoint(source, tag)
    state = zero.client_state(root, tag)
    config = zero.model_config(state, str(root / tag / CLIENT_STATE))
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = zero.model_from_state(config, zero.consolidated_state(root, tag), str(root / tag))
    expected = checked_probe_logits(model, root / tag)
    destination.mkdir(parents=True, exist_ok=True)
    tokenizer = _copy_tokenizer(state, destination)
    meta = {"format": RELEASE_FORMAT, "model": dataclasses.asdict(config), "task": "mlm", "tokenizer": tokenizer}
    # Tied weights are stored under each of their names, as save_release does.
    tmp = destination / (WEIGHTS_FILE + ".tmp")
    write_safetensors(tmp, model.state_dict().items(), dtype=dtype)
    tmp.replace(destination / WEIGHTS_FILE)
    (destination / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    num_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model
    gc.collect()
    _check_release_dtypes(destination / WEIGHTS_FILE, dtype)
    reloaded = load_release(destination)
    _check_logits(expected, _probe_logits(reloaded), destination, root / tag, bf16)
    (destination / MODEL_CARD).write_text(_model_card(state, config, num_parameters, root, tag, dtype))
    return destination


def _check_release_dtypes(weights_file: Path, dtype: torch.dtype) -> None:
    for name, entry in read_safetensors_header(weights_file).items():
        if entry.dtype.is_floating_point and entry.dtype != dtype:
            raise CheckpointError(f"{weights_file}: {name} is {entry.dtype}, expected {dtype}")


def _copy_tokenizer(state: dict[str, Any], destination: Path) -> str:
    """Copy the run's tokenizer (data.tokenizer, or the shipped default vocab) as vocab.txt or
    tokenizer.model; returns the file name."""
    configured = state["config"].get("data", {}).get("tokenizer", "")
    path = tokenizer_file(configured)
    if not path.is_file():
        raise CheckpointError(f"the run's tokenizer {path} (data.tokenizer) is not a file here; run from the training directory")
    name = "tokenizer.model" if path.suffix == ".model" else "vocab.txt"
    shutil.copyfile(path, destination / name)
    return name


def _model_card(state: dict[str, Any], config, num_parameters: int, root: Path, tag: str, dtype: torch.dtype) -> str:
    run = state["config"]
    data = run.get("data", {})
    losses = state.get("losses") or []
    final_loss = f"{losses[-1][1]:.4f} (step {losses[-1][0]})" if losses else "not recorded"
    tokens = state.get("tokens_seen")
    return "\n".join(
        [
            f"# {run.get('name', 'm2dist')} ({config.architecture}, masked language model)",
            "",
            f"- Size: {config.num_layers} layers, hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
            f"max length {config.l_max}, vocabulary {config.vocab_size}",
            f"- Parameters: {num_parameters:,} (weights stored in {str(dtype).removeprefix('torch.')})",
            f"- Data: {data.get('train') or 'embedded corpus (Python 3.11 docs)'}; tokenizer "
            f"{data.get('tokenizer') or 'bert-base-uncased vocab (shipped)'}",
            f"- Steps: {state.get('step')}; tokens seen: {tokens:,}" if tokens is not None else f"- Steps: {state.get('step')}",
            f"- Final training MLM loss: {final_loss}",
            f"- Source run: {(root / tag).resolve()}",
            "",
            "Load with `m2dist.checkpoint.release.load_release(path)`.",
            "",
        ]
    )


def _zero_to_universal(source: Path, destination: Path, tag: str | None) -> Path:
    """DeepSpeed's universal checkpoint of a run's tag, made as the engine makes it (`make_universal`).
    The engine resumes from it on another world size when it sits at
    `<output_dir>/checkpoints/<tag>_universal`."""
    root, tag = zero.resolve_zero_checkpoint(source, tag)
    if destination.resolve() == (root / universal_tag(tag)).resolve():
        staging = root
    else:
        # make_universal converts <root>/<tag> into <root>/<tag>_universal (and DeepSpeed writes
        # <root>/latest_universal): give it a root that holds only a link to the source tag, then
        # move the result into place.
        staging = destination.parent / f".{destination.name}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / tag).symlink_to((root / tag).resolve(), target_is_directory=True)
    if destination.exists():
        shutil.rmtree(destination)
    try:
        made = staging / make_universal(staging, tag)
        if staging is not root:
            made.replace(destination)
    finally:
        if staging is not root:
            shutil.rmtree(staging, ignore_errors=True)
    _check_universal(destination, root, tag)
    return destination


def _check_universal(folder: Path, root: Path, tag: str) -> None:
    """Every model parameter has its fp32 master weight, of the right size, in the universal folder."""
    config = zero.model_config(zero.client_state(root, tag), str(root / tag))
    expected = {name: p.numel() for name, p in zero.empty_model(config).named_parameters()}
    for required in (COMPLETE, CLIENT_STATE):
        if not (folder / required).exists():
            raise CheckpointError(f"{folder}: universal checkpoint lacks {required}")
    params = folder / "zero"
    found = {p.name for p in params.iterdir()} if params.is_dir() else set()
    missing = sorted(set(expected) - found)
    if missing:
        raise CheckpointError(f"{folder}: universal checkpoint lacks parameters {missing[:5]}")
    for name, numel in expected.items():
        weight = load_deepspeed_file(params / name / "fp32.pt")
        weight = weight["param"] if isinstance(weight, dict) else weight
        # ZeRO-3's universal weights are flat; compare sizes.
        if weight.numel() != numel:
            raise CheckpointError(f"{folder}: {name} has {weight.numel()} elements, the model expects {numel}")
