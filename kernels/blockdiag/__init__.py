"""Block-diagonal ("Monarch") matmul of the GLU MLP, with a dispatch between implementations.

A layer resolves the backend its config names once (`matmul_implementation`, `glu_implementation`)
and calls the result.
"""

from collections.abc import Callable

import torch

from kernels import use_triton
from kernels.blockdiag import reference
from kernels.triton_common import can_run, warn_once


def _reference_matmul(
    x: torch.Tensor, weight_KQP: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    y = reference.blockdiag_matmul(x, weight_KQP)
    y = y if bias is None else y + bias
    return y if residual is None else y + residual


def _no_triton(x: torch.Tensor) -> bool:
    """A CPU tensor without Triton's interpreter cannot run the kernels: warn once, use the reference."""
    if can_run(x):
        return False
    warn_once(f"blockdiag triton backend: no Triton on {x.device.type}; using the reference")
    return True


# The Triton module is imported on first use: it must follow TRITON_INTERPRET=1 in tests, and
# `import kernels.blockdiag` must work on machines without a GPU.
def _triton_matmul(
    x: torch.Tensor, weight_KQP: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    if _no_triton(x):
        return _reference_matmul(x, weight_KQP, bias, residual)
    from kernels.blockdiag import triton_blockdiag

    return triton_blockdiag.blockdiag_matmul(x, weight_KQP, bias, residual)


def _triton_glu(x: torch.Tensor, weight_KQP: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    if _no_triton(x):
        return reference.blockdiag_glu(x, weight_KQP, dropout_p)
    from kernels.blockdiag import triton_blockdiag

    return triton_blockdiag.blockdiag_glu(x, weight_KQP, dropout_p)


def _auto_matmul(
    x: torch.Tensor, weight_KQP: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    return (_triton_matmul if use_triton(x) else _reference_matmul)(x, weight_KQP, bias, residual)


def _auto_glu(x: torch.Tensor, weight_KQP: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    return (_triton_glu if use_triton(x) else reference.blockdiag_glu)(x, weight_KQP, dropout_p)


# "auto": the Triton kernels on an Ampere or newer GPU, the reference elsewhere (`use_triton`).
_MATMUL = {"auto": _auto_matmul, "reference": _reference_matmul, "triton": _triton_matmul}
_GLU = {"auto": _auto_glu, "reference": reference.blockdiag_glu, "triton": _triton_glu}
BACKENDS = tuple(_MATMUL)


def _pick(table: dict, backend: str):
    try:
        return table[backend]
    except KeyError:
        raise ValueError(f"unknown blockdiag backend {backend!r}; expected one of {BACKENDS}") from None


def matmul_implementation(backend: str) -> Callable[..., torch.Tensor]:
    """`blockdiag_matmul` of `backend`, resolved once by the layer that calls it."""
    return _pick(_MATMUL, backend)


def glu_implementation(backend: str) -> Callable[..., torch.Tensor]:
    """`blockdiag_glu` of `backend`, resolved once by the layer that calls it."""
    return _pick(_GLU, backend)


def blockdiag_matmul(
    x: torch.Tensor, weight_KQP: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
    *, backend: str = "reference",
) -> torch.Tensor:  # fmt: skip
    """x @ blockdiag(weight)^T + bias (+ residual). x: (..., K*P), weight_KQP: (K, Q, P), bias: (K*Q,)
    or None, residual: (..., K*Q) or None -> (..., K*Q)."""
    return matmul_implementation(backend)(x, weight_KQP, bias, residual)


def blockdiag_glu(
    x: torch.Tensor, weight_KQP: torch.Tensor, dropout_p: float = 0.0, *, backend: str = "reference"
) -> torch.Tensor:
    """dropout(GELU(g) * n) of the block-diagonal projection x: (..., K*P) -> (..., K*Q/2) = [g | n]
    halves; the Triton backend drops in its kernels' epilogues, the reference after them."""
    return glu_implementation(backend)(x, weight_KQP, dropout_p)


__all__ = ["BACKENDS", "blockdiag_glu", "blockdiag_matmul", "glu_implementation", "matmul_implementation"]
