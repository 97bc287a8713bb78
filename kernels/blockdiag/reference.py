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
    # One GEMM per block on a strided view of its chunk (no copy of x; cuBLAS on a GPU), the outputs
    # concatenated: cheaper than an einsum, whose batched GEMM copies x and y into block-major order.
    chunks = x.unflatten(-1, (n_blocks, p)).unbind(-2)
    return torch.cat([F.linear(chunk, w_QP) for chunk, w_QP in zip(chunks, weight_KQP.unbind(0))], dim=-1)


def blockdiag_glu(x: torch.Tensor, weight_KQP: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """dropout(GELU(g) * n) with [g, n] = blockdiag_matmul(x, weight) split in halves, dropout with
    probability `dropout_p` (0: none). (..., d) -> (..., I)."""
    a = _glu(x, weight_KQP)
    return F.dropout(a, dropout_p) if dropout_p > 0 else a


def _glu(x: torch.Tensor, weight_KQP: torch.Tensor) -> torch.Tensor:
    n_blocks, q, p = weight_KQP.shape
    if n_blocks % 2 or x.shape[-1] != n_blocks * p:
        # The halves split a block (or the shapes are wrong, which blockdiag_matmul reports).
        g, n = blockdiag_matmul(x, weight_KQP).chunk(2, dim=-1)
        return F.gelu(g, approximate="none") * n
    # With an even number of blocks, g's block k and n's block k (block half + k of the weight) give
    # columns k*Q:(k+1)*Q of the output: per pair, no (..., 2I) concatenation.
    chunks, blocks, half = x.unflatten(-1, (n_blocks, p)).unbind(-2), weight_KQP.unbind(0), n_blocks // 2
    pairs = [
        F.gelu(F.linear(chunks[k], blocks[k]), approximate="none") * F.linear(chunks[half + k], blocks[half + k])
        for k in range(half)
    ]
    return torch.cat(pairs, dim=-1)


def dense_blockdiag(weight_KQP: torch.Tensor) -> torch.Tensor:
    """The (K*Q, K*P) dense matrix with the K blocks on its diagonal (for tests)."""
    return torch.block_diag(*weight_KQP.unbind(0))
