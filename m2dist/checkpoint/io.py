"""Safe reading of checkpoint files: tensors and plain containers only, never pickled code."""

import pickle
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint is unreadable, unsafe, or does not match the model."""


class OutputExistsError(FileExistsError):
    """The destination exists and the caller did not ask to overwrite it."""


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
