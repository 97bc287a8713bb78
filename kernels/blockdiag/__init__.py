"""Block-diagonal ("Monarch") matmul of the GLU MLP, with a dispatch between implementations.

The model calls `blockdiag_matmul` and `blockdiag_glu` with a backend name from the config.
"""

import torch

from kernels.blockdiag import reference

_MATMUL = {"reference": reference.blockdiag_matmul}
_GLU = {"reference": reference.blockdiag_glu}
BACKENDS = tuple(_MATMUL)


def _pick(table: dict, backend: str):
    try:
        return table[backend]
    except KeyError:
        raise ValueError(f"unknown blockdiag backend {backend!r}; expected one of {BACKENDS}") from None


def blockdiag_matmul(
    x: torch.Tensor, weight_KQP: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "reference"
) -> torch.Tensor:
    """x: (..., K*P), weight_KQP: (K, Q, P), bias: (K*Q,) or None -> (..., K*Q)."""
    y = _pick(_MATMUL, backend)(x, weight_KQP)
    return y if bias is None else y + bias


def blockdiag_glu(x: torch.Tensor, weight_KQP: torch.Tensor, *, backend: str = "reference") -> torch.Tensor:
    """GELU(g) * n of the block-diagonal projection x: (..., K*P) -> (..., K*Q/2) = [g | n] halves."""
    return _pick(_GLU, backend)(x, weight_KQP)


__all__ = ["BACKENDS", "blockdiag_glu", "blockdiag_matmul"]
