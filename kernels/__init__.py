"""Heavy ops of M2-BERT, one folder per op: a plain-PyTorch reference and the dispatch that picks a path."""

import hashlib
from pathlib import Path

import torch

_AMPERE_OR_NEWER: dict[int, bool] = {}


def source_fingerprint() -> str:
    """A digest of this package's Python source (the custom ops' schemas, implementations and
    autograd formulas)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.relative_to(Path(__file__).parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _tag_compile_caches() -> None:
    """Key torch.compile's on-disk caches (Inductor's and AOTAutograd's, shared by every process of
    a user) on this package's source too. They key a compiled graph on the graph Dynamo traced, in
    which a custom op is its name and arguments: a cache written by another version of these ops,
    whose outputs or saved tensors differed, would replay that version's backward and call its ops
    with the wrong arguments (seen when two versions of the long convolution were compiled one after
    the other on one machine)."""
    tag = f"m2dist-kernels-{source_fingerprint()}"
    current = torch.compiler.config.cache_key_tag
    if tag not in current.split("+"):
        torch.compiler.config.cache_key_tag = f"{current}+{tag}" if current else tag


_tag_compile_caches()


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
