"""Heavy ops of M2-BERT, one folder per op: a plain-PyTorch reference and the dispatch that picks a path."""

import torch

_AMPERE_OR_NEWER: dict[int, bool] = {}


# A constant for torch.compile: the device's capability never changes within a process.
@torch.compiler.assume_constant_result
def _ampere_or_newer(device_index: int) -> bool:
    if device_index not in _AMPERE_OR_NEWER:
        _AMPERE_OR_NEWER[device_index] = torch.cuda.get_device_capability(device_index) >= (8, 0)
    return _AMPERE_OR_NEWER[device_index]


def use_triton(t: torch.Tensor) -> bool:
    """The "auto" backends' choice: the Triton kernels for tensors on a CUDA GPU of compute
    capability 8.0 or newer (their bf16 and tf32 tensor-core products need it), the reference
    elsewhere."""
    if not t.is_cuda:
        return False
    return _ampere_or_newer(t.device.index)
