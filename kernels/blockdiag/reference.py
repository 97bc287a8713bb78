"""Plain-PyTorch reference of the block-diagonal ("Monarch") matmul and the GLU built on it.

Shape legend: ... any leading dims, K number of blocks, P input features per block,
Q output features per block, I the GLU's inner size.
"""

import torch
import torch.nn.functional as F


def blockdiag_matmul(x: torch.Tensor, weight_KQP: torch.Tensor) -> torch.Tensor:
    """y = x @ blockdiag(weight).T: x's last dim split into K contiguous chunks of P, chunk i
    multiplied by block i, outputs concatenated. x: (..., K*P) -> (..., K*Q)."""
    n_blocks, q, p = weight_KQP.shape
    if x.shape[-1] != n_blocks * p:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {n_blocks} x {p}")
    x_KP = x.reshape(*x.shape[:-1], n_blocks, p)
    y_KQ = torch.einsum("...kp,kqp->...kq", x_KP, weight_KQP)
    return y_KQ.reshape(*x.shape[:-1], n_blocks * q)


def blockdiag_glu(x: torch.Tensor, weight_KQP: torch.Tensor) -> torch.Tensor:
    """GELU(g) * n with [g, n] = blockdiag_matmul(x, weight) split in halves. (..., d) -> (..., I)."""
    gated = blockdiag_matmul(x, weight_KQP)
    g, n = gated.chunk(2, dim=-1)
    return F.gelu(g, approximate="none") * n


def dense_blockdiag(weight_KQP: torch.Tensor) -> torch.Tensor:
    """The (K*Q, K*P) dense matrix with the K blocks on its diagonal (for tests)."""
    return torch.block_diag(*weight_KQP.unbind(0))
