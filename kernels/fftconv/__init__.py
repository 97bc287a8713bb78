"""Gated bidirectional FFT long convolution: the sequence mixer's heavy op.

The model calls `gated_long_conv` with a backend name from the config; each backend computes the
same function as `reference.gated_long_conv`.
"""

import torch

from kernels.fftconv import reference
from kernels.fftconv.reference import bidirectional_kernel



def _triton_gated_long_conv(*args):
    # Imported on first use: the Triton module must be imported after TRITON_INTERPRET is set,
    # and `import kernels.fftconv` must work on machines without a GPU.
    from kernels.fftconv import triton_fftconv

    return triton_fftconv.gated_long_conv(*args)


_BACKENDS = {"reference": reference.gated_long_conv, "triton": _triton_gated_long_conv}
BACKENDS = tuple(_BACKENDS)


def gated_long_conv(
    u_BDL: torch.Tensor,
    x1_BDL: torch.Tensor,
    x2_BDL: torch.Tensor,
    v_BDL: torch.Tensor,
    k1_DN: torch.Tensor,
    d1_D: torch.Tensor,
    k2_DN: torch.Tensor | None = None,
    d2_D: torch.Tensor | None = None,
    *,
    backend: str = "reference",
) -> torch.Tensor:
    """`y = (conv(v * x1; k1) + (v * x1) * d1) * x2 + conv(u; k2) + u * d2`.

    u_BDL, x1_BDL, x2_BDL, v_BDL: (B, D, L); k1_DN, k2_DN: (D, 2L) circular kernels from
    `bidirectional_kernel`; d1_D, d2_D: (D,). k2/d2 None drops the residual long convolution.
    Returns (B, D, L) in the dtype of the inputs.
    """
    try:
        impl = _BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown fftconv backend {backend!r}; expected one of {BACKENDS}") from None
    if (k2_DN is None) != (d2_D is None):
        raise ValueError("k2_DN and d2_D must be given together")
    return impl(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D)


__all__ = ["BACKENDS", "bidirectional_kernel", "gated_long_conv"]
