"""Heavy ops of M2-BERT, one folder per op: a plain-PyTorch reference and the dispatch that picks a path."""

import functools

import torch


@functools.cache
def _ampere_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def use_triton(t: torch.Tensor) -> bool:
    """The "auto" backends' choice: the Triton kernels for tensors on a CUDA GPU of compute
    capability 8.0 or newer (their bf16 and tf32 tensor-core products need it), the reference
    elsewhere."""
    if not t.is_cuda:
        return False
    return _ampere_or_newer(t.device.index if t.device.index is not None else torch.cuda.current_device())
