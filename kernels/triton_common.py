"""What the Triton paths of every op share: the interpreter switch, output allocation, the dot
precision for an input dtype, whether a tensor can run the kernels, and a warning given once.

Importing this module does not import Triton, so the dispatch can use it on any machine.
"""

import os
import warnings

import torch

# Triton's interpreter runs the kernels on the CPU (tests); it must be chosen before the kernel
# modules are imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Tests set this to fill every output with NaN before a kernel writes it.
POISON_OUTPUTS = False

_WARNED: set[str] = set()


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for a kernel to write (NaN-filled under POISON_OUTPUTS)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for operands of `dtype`: fp32 keeps fp32 accuracy through the
    3-pass tf32 product; bf16/fp16 operands are finer than tf32 can spoil, so one pass."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def can_run(t: torch.Tensor) -> bool:
    """Whether the kernels can take `t`: on a CUDA GPU, or anywhere in the interpreter."""
    return t.device.type == "cuda" or INTERPRET


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)
