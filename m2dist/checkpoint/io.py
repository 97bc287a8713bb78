"""Checkpoint files: safe reading of torch files (tensors and plain containers only, never pickled
code), and safetensors files written and read one tensor at a time."""

import importlib
import json
import pickle
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m2dist.errors import CheckpointError


def safe_torch_load(path: str | Path) -> Any:
    """`torch.load(weights_only=True)` on CPU, with errors that name the file.

    A pickle that asks for anything beyond tensors and plain containers (a code payload, a custom
    class) is refused instead of executed.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused or unreadable: {first_line}. m2dist loads only tensors and plain containers "
            "(weights_only=True) and never runs code stored in a checkpoint"
        ) from None


# The classes DeepSpeed pickles into its checkpoint files beside tensors and plain containers (the
# ZeRO optimizer's loss scaler and stage, the fragment addresses of ZeRO-2). A file that names any
# other global is refused before DeepSpeed, which reads with weights_only=False, gets to unpickle it.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def check_torch_globals(path: str | Path, allowed: tuple[str, ...] = DEEPSPEED_GLOBALS) -> None:
    """Raise CheckpointError unless every global the torch file at `path` pickles is one that
    `weights_only=True` accepts or one of `allowed`. The pickle is scanned, never run."""
    path = Path(path)
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: truncated or not a torch file: {first_line}") from None
    refused = sorted(set(found) - set(allowed))
    if refused:
        raise CheckpointError(
            f"{path}: refused: it pickles {', '.join(refused[:3])}, which is neither a tensor, a plain "
            "container nor a DeepSpeed checkpoint class; m2dist never runs code stored in a checkpoint"
        )


def load_deepspeed_file(path: str | Path, mmap: bool = True) -> Any:
    """A DeepSpeed checkpoint file read with `weights_only=True`, its few classes allowed."""
    path = Path(path)
    check_torch_globals(path)
    classes = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attribute = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attribute))
    with torch.serialization.safe_globals(classes):
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
_DTYPES_BY_CODE = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file: its dtype, shape and byte range in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def read_safetensors_header(path: Path) -> dict[str, SafetensorsEntry]:
    """The tensors of a safetensors file by name, in file order, read from its header alone; a
    truncated file or a header that does not describe the data raises CheckpointError."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        length_bytes = file.read(8)
        length = struct.unpack("<Q", length_bytes)[0] if len(length_bytes) == 8 else size
        if 8 + length > size:
            raise CheckpointError(f"{path}: not a safetensors file, or truncated: no header of {length} bytes")
        try:
            header = json.loads(file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors header: {err}") from None
    header.pop("__metadata__", None)
    entries = {}
    for name, info in header.items():
        dtype = _DTYPES_BY_CODE.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: {name}: dtype {info.get('dtype')!r} is not one of {sorted(_DTYPES_BY_CODE)}")
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (8 + length + int(offset) for offset in info["data_offsets"])
        if end > size or end - begin != _nbytes(shape, dtype):
            raise CheckpointError(f"{path}: {name}: bytes {begin}-{end} do not hold {shape} {dtype} within {size} bytes: truncated?")
        entries[name] = SafetensorsEntry(dtype, shape, begin, end)
    return entries


def write_safetensors(
    path: Path, entries: Iterable[tuple[str, Any]], *, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file from lazy values (anything with `shape`, `dtype` and `contiguous()`):
    the header from their shapes and dtypes first, then the bytes of one materialized tensor at a
    time. `dtype` casts floating tensors."""
    items = list(entries)
    layout, offset = [], 0
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    for name, value in items:
        out_dtype = dtype if dtype is not None and value.dtype.is_floating_point else value.dtype
        if out_dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: dtype {out_dtype} cannot be written to safetensors")
        shape = tuple(int(s) for s in value.shape)
        size = _nbytes(shape, out_dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[out_dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        layout.append((out_dtype, shape))
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    # safetensors pads the header with spaces so that the data starts 8-byte aligned.
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        for (out_dtype, shape), (name, value) in zip(layout, items):
            tensor = value.contiguous()
            if tensor.is_floating_point():
                tensor = tensor.to(out_dtype)
            if tuple(tensor.shape) != shape or tensor.dtype != out_dtype:
                raise CheckpointError(f"{name}: materialized as {tuple(tensor.shape)} {tensor.dtype}, header says {shape} {out_dtype}")
            out.write(_byte_view(tensor).data)
            del tensor


def _byte_view(tensor: torch.Tensor):
    """The bytes of a contiguous CPU tensor as a numpy array that shares its memory."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


def read_safetensors_into(path: Path, targets: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Read the tensors named in `targets` (a state dict with the file's shapes) into them, one at a
    time with plain reads, cast to each target's dtype. No memory map: neither the file's pages nor
    a second copy of the weights count in this process's memory, only the tensor being cast.

    A target that shares memory with one read before (a tied weight stored under each of its names)
    is compared with it instead; returns the (first name, other name) pairs that differ."""
    entries = read_safetensors_header(path)
    first_name: dict[tuple[int, int], str] = {}
    differing = []
    with open(path, "rb") as file:
        for name, target in targets.items():
            entry = entries.get(name)
            if entry is None or entry.shape != tuple(target.shape):
                found = "missing" if entry is None else f"{entry.shape}"
                raise CheckpointError(f"{path}: {name}: expected {tuple(target.shape)}, found {found}")
            first = first_name.setdefault((target.data_ptr(), target.numel()), name)
            direct = first == name and target.dtype == entry.dtype and target.is_contiguous()
            buffer = target if direct else torch.empty(entry.shape, dtype=entry.dtype)
            file.seek(entry.begin)
            if file.readinto(_byte_view(buffer)) != entry.end - entry.begin:
                raise CheckpointError(f"{path}: {name}: file ends inside its bytes: truncated?")
            if first != name:
                if not torch.equal(buffer.to(target.dtype), target):
                    differing.append((first, name))
            elif not direct:
                with torch.no_grad():
                    target.copy_(buffer)
    return differing
