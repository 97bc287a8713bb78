"""Reading the training engine's DeepSpeed checkpoints (ZeRO stages 0-3) without holding them whole.

A source is a run folder (`<output_dir>`), its `checkpoints/` folder, or one tag folder inside it;
`resolve_zero_checkpoint` turns any of them into (checkpoints root, tag). `consolidated_state`
returns a lazy fp32 state dict: the optimizer shards are memory-mapped, their Adam moments never
read, and each value becomes a tensor only on `materialize(value)` (for ZeRO-0/1/2 a view of the
mapped file; for ZeRO-3 DeepSpeed's `GatheredTensor` gathers one tensor from the ranks' shards).
`m2dist.checkpoint.io.write_safetensors` streams such a dict to disk tensor by tensor.

DeepSpeed's model and optimizer files hold a few pickled DeepSpeed classes beside tensors, and
DeepSpeed reads them with `weights_only=False`: every file of a tag is scanned first
(`m2dist.checkpoint.io.check_torch_globals`) and refused if its pickle names anything else, and its
sizes and checksums are verified against the tag's manifest.
"""

from __future__ import annotations

import math
import resource
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from m2dist.checkpoint.io import load_deepspeed_file, safe_torch_load
from m2dist.checkpoint.layout import (
    CHECKPOINTS_DIR, CLIENT_STATE, COMPLETE, LATEST, MODEL_STATES, complete_tags, find_resume_tag, verify_tag,
)  # fmt: skip
from m2dist.config import ModelConfig, config_section_from_dict
from m2dist.errors import CheckpointError, ConfigError
from m2dist.models import MaskedLM


def current_rss_mib() -> float:
    """This process's resident set size now, in MiB (Linux /proc/self/statm)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * resource.getpagesize() / 2**20


class RssSampler:
    """Samples the resident set size from a thread while the block runs: `before` is the RSS on
    entry, `peak` the largest sample. Unlike getrusage's lifetime peak, it sees only this work."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.before = self.peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_mib())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        import gc

        gc.collect()
        self.before = self.peak = current_rss_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss_mib())


def resolve_zero_checkpoint(source: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints root, tag) for a run folder, a checkpoints folder or a tag folder.

    Without `tag`: the tag named by `latest` or, when that one fails verification, the newest
    complete one that verifies (with a warning naming the bad file). The tag folder must hold the
    engine's COMPLETE marker (a save cut short has none) and files that match its manifest, and
    their pickles may hold tensors, plain containers and DeepSpeed's few classes only.
    """
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint folder")
    if _model_states_file(source) is not None:
        if tag is not None and tag != source.name:
            raise CheckpointError(f"{source} is the checkpoint of tag {source.name!r}; --tag {tag} does not match it")
        root, tag = source.parent, source.name
    else:
        root = source / CHECKPOINTS_DIR if (source / CHECKPOINTS_DIR).is_dir() else source
        if tag is None:
            if not (root / LATEST).exists():
                raise CheckpointError(f"{root}: no '{LATEST}' file; pass --tag (complete tags: {complete_tags(root) or 'none'})")
            tag = find_resume_tag(root, set_aside=False)
            if tag is None:
                raise CheckpointError(f"{root}: no complete checkpoint (no tag folder with a {COMPLETE} marker)")
    folder = root / tag
    if not folder.is_dir():
        raise CheckpointError(f"{root}: no checkpoint tag {tag!r}; complete tags: {complete_tags(root) or 'none'}")
    if not (folder / COMPLETE).exists():
        raise CheckpointError(
            f"{folder}: no {COMPLETE} marker: the save was cut short; complete tags: {complete_tags(root) or 'none'}"
        )
    if _model_states_file(folder) is None:
        raise CheckpointError(f"{folder}: not a DeepSpeed checkpoint: no *{MODEL_STATES}")
    problems = verify_tag(folder)
    if problems:
        raise CheckpointError(
            f"{folder}: damaged checkpoint: {'; '.join(problems[:3])}; was the save interrupted or the copy incomplete? "
            f"(complete tags: {complete_tags(root)})"
        )
    return root, tag


def _model_states_file(folder: Path) -> Path | None:
    files = sorted(folder.glob(f"*{MODEL_STATES}"))
    return files[0] if files else None


def zero_stage(folder: Path) -> int:
    """The ZeRO stage recorded by DeepSpeed in the tag's model state file."""
    states = load_deepspeed_file(_model_states_file(folder))
    config = states.get("ds_config") or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def client_state(root: Path, tag: str) -> dict[str, Any]:
    """The engine's client state of a tag: step, losses, tokens seen and the resolved config."""
    return safe_torch_load(root / tag / CLIENT_STATE)


def model_config(state: Mapping[str, Any], source: str) -> ModelConfig:
    try:
        return config_section_from_dict(ModelConfig, dict(state["config"]["model"]), "model")
    except (KeyError, TypeError):
        raise CheckpointError(f"{source}: client state has no 'config' with a 'model' section") from None
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None


class FlatSlice:
    """A parameter at [start, start + numel) of a ZeRO-1/2 parameter group, whose fp32 master copy is
    split into consecutive equal partitions, one per rank (memory-mapped). `contiguous()` is a view of
    the partition that holds it; only a parameter split between two ranks is copied."""

    def __init__(self, partitions: list[torch.Tensor], start: int, shape: torch.Size):
        self.partitions = partitions
        self.start = start
        self.shape = torch.Size(shape)
        self.dtype = partitions[0].dtype

    def contiguous(self) -> torch.Tensor:
        begin, end = self.start, self.start + self.shape.numel()
        pieces, offset = [], 0
        for partition in self.partitions:
            low, high = max(begin, offset), min(end, offset + partition.numel())
            if low < high:
                pieces.append(partition[low - offset : high - offset])
            offset += partition.numel()
        if not pieces:
            return torch.empty(self.shape, dtype=self.dtype)
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(self.shape)


def _zero12_lazy_state(folder: Path) -> dict[str, Any]:
    """ZeRO-1/2: DeepSpeed's consolidation (`zero_to_fp32`, whose parsers read the files) without its
    concatenation of each parameter group's partitions into one fp32 vector, a copy of all weights."""
    from deepspeed.utils import zero_to_fp32

    model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(str(folder)))[0]
    optim_files = zero_to_fp32.get_optim_files(str(folder))
    _, world_size, flat_groups, paddings = zero_to_fp32.parse_optim_states(optim_files, str(folder))
    state: dict[str, Any] = dict(model_states.buffers)
    state.update(model_states.frozen_param_fragments or {})
    for group, shapes in enumerate(model_states.param_shapes):
        partitions = [flat_groups[rank][group] for rank in range(world_size)]
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            state[name] = FlatSlice(partitions, offset, shape)
            offset += math.prod(shape) + (paddings[group][index] if paddings is not None else 0)
        # DeepSpeed pads each group to a multiple of 2 x world size; anything else is a mismatch.
        available = sum(partition.numel() for partition in partitions)
        align = 2 * world_size
        if math.ceil(offset / align) != math.ceil(available / align):
            raise ValueError(f"parameter group {group}: the shapes cover {offset} values, the partitions hold {available}")
    for name, source in model_states.shared_params:
        if source in state:
            state[name] = state[source]
    return state


def consolidated_state(root: Path, tag: str) -> dict[str, Any]:
    """Lazy fp32 state dict of a ZeRO-1/2/3 tag (values: tensors, `FlatSlice`s or DeepSpeed's
    GatheredTensor); ZeRO-0 keeps full weights in the model state file, which is memory-mapped
    instead (the module itself: in a bf16 ZeRO-0 run these are the bf16 weights, not the fp32 master
    copy)."""
    folder = root / tag
    try:
        stage = zero_stage(folder)
        if stage == 0:
            return dict(load_deepspeed_file(folder / MODEL_STATES)["module"])
        if stage in (1, 2):
            return _zero12_lazy_state(folder)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, lazy_mode=True)
    except (RuntimeError, ValueError, KeyError, EOFError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{folder}: DeepSpeed could not consolidate this checkpoint: {first_line}") from None


def materialize(value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of a lazy state dict, contiguous, on CPU; floating tensors cast to `dtype` if given."""
    tensor = value.contiguous()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor


def empty_model(config: ModelConfig) -> MaskedLM:
    """The model's structure on the meta device: names and shapes, no weights."""
    with torch.device("meta"):
        return MaskedLM(config)


def add_shared_names(lazy_state: dict[str, Any], model: torch.nn.Module) -> None:
    """Give tensors shared under several names (tied decoder, shared Sin frequencies) every name the
    model's state dict has: ZeRO-3 checkpoints record each shared parameter once."""
    names_by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_by_tensor.setdefault(id(tensor), []).append(name)
    for names in names_by_tensor.values():
        present = [name for name in names if name in lazy_state]
        if present:
            for name in names:
                lazy_state.setdefault(name, lazy_state[present[0]])


def check_lazy_state(model: torch.nn.Module, lazy_state: Mapping[str, Any], source: str) -> None:
    """Same keys and shapes as the model's state dict (after `add_shared_names`)."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(lazy_state)), sorted(set(lazy_state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, target in expected.items():
        if tuple(lazy_state[name].shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: {name}: shape {tuple(lazy_state[name].shape)}, model expects {tuple(target.shape)}")


def model_from_state(config: ModelConfig, lazy_state: dict[str, Any], source: str) -> MaskedLM:
    """The model holding the lazy state's tensors themselves, not copies of them: for ZeRO-0/1/2 its
    weights are views of the memory-mapped checkpoint (private mappings: writes never reach the
    file), so they are in memory once. (Built on the CPU and then given the tensors: a model built on
    the meta device measured ~150 MiB more RSS, torch's meta kernels loading on first use.)"""
    model = MaskedLM(config)
    add_shared_names(lazy_state, model)
    check_lazy_state(model, lazy_state, source)
    for name, target in model.state_dict(keep_vars=True).items():
        target.data = materialize(lazy_state[name], target.dtype)
    _return_freed_memory()
    return model


def _return_freed_memory() -> None:
    """Hand memory freed by torch back to the system. glibc keeps freed blocks of a few MiB in its
    heap, where they stay resident: the weights a model was built with, once replaced, would still
    count as much as the weights themselves. A no-op where the C library is not glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_zero_model(root: Path, tag: str) -> MaskedLM:
    """The MLM of a tag in fp32 (the optimizer's master weights)."""
    config = model_config(client_state(root, tag), str(root / tag / CLIENT_STATE))
    return model_from_state(config, consolidated_state(root, tag), str(root / tag))
