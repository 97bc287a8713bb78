"""What the Triton paths of every op share: the interpreter switch, output allocation, kernels'
stride arguments, the dot precision for an input dtype, whether a tensor can run the kernels,
constant tables kept on a device, and a warning given once.

Importing this module does not import Triton, so the dispatch can use it on any machine.
"""

import concurrent.futures
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


def strides(*tensors: torch.Tensor) -> list[int]:
    """The strides of `tensors`, one after the other: a kernel's stride arguments."""
    return [s for t in tensors for s in t.stride()]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for operands of `dtype`: fp32 keeps fp32 accuracy through the
    3-pass tf32 product; bf16/fp16 operands are finer than tf32 can spoil, so one pass."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def can_run(t: torch.Tensor) -> bool:
    """Whether the kernels can take `t`: on a CUDA GPU, or anywhere in the interpreter."""
    return t.device.type == "cuda" or INTERPRET


# One thread that moves constant tables to a GPU (`device_constants`).
_CONSTANTS_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="m2dist-constants")


def device_constants(tables: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """`tables` (built on the CPU) on `device`, for a cache that lives as long as the process (DFT
    matrices, twiddles). On a GPU they are copied from a thread of their own: while torch.compile's
    CUDA graphs warm up or record a step, every allocation of the calling thread comes from the
    graph's private memory pool, and a tensor that stays alive there after the step fails the graph's
    check ("tensor(s) in the cudagraph pool not tracked as outputs"). The first call for a shape
    must not come during a stream capture (the graph's warm-up run precedes it)."""
    if device.type != "cuda":
        return {name: t.to(device) for name, t in tables.items()}
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "constant tables for a new shape were requested while a CUDA graph is being captured; "
            "run the step once before capturing it (torch.compile's CUDA graphs do)"
        )
    if device.index is None:  # the helper thread's current device is not necessarily this one's
        device = torch.device("cuda", torch.cuda.current_device())

    def copy():
        with torch.cuda.device(device):
            moved = {name: t.to(device) for name, t in tables.items()}
            torch.cuda.current_stream().synchronize()
        return moved

    return _CONSTANTS_THREAD.submit(copy).result()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)
