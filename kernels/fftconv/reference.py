"""Plain-PyTorch reference of M2's gated bidirectional FFT long convolution (M2_SPEC 1.1-1.2).

Shape legend: B batch, D channels (the hidden size), L sequence length, N = 2L the FFT size.
Every Triton path of this op is tested against these functions.
"""

import torch
import torch.nn.functional as F


def bidirectional_filter(k_fwd_DL: torch.Tensor, k_rev_DL: torch.Tensor | None) -> torch.Tensor:
    """The length-2L circular filter of a (bi)directional long convolution.

    k_fwd_DL: (D, L) taps applied to the current and earlier positions.
    k_rev_DL: (D, L) taps applied to later positions, or None for a causal convolution.
    Returns (D, 2L): `pad(k_fwd, (0, L)) + pad(flip(k_rev), (L, 0))`.
    """
    length = k_fwd_DL.shape[-1]
    k_DN = F.pad(k_fwd_DL, (0, length))
    if k_rev_DL is not None:
        k_DN = k_DN + F.pad(k_rev_DL.flip(-1), (length, 0))
    return k_DN


def fftconv(x_BDL: torch.Tensor, k_DN: torch.Tensor, d_D: torch.Tensor) -> torch.Tensor:
    """Circular convolution of size N = 2L of x with k, plus the skip term x * d.

    x_BDL: (B, D, L) input; k_DN: (D, 2L) filter from `bidirectional_filter`; d_D: (D,) skip weight.
    The FFTs run in the filter's dtype (fp32 in the model) and the result is cast back to x's
    dtype, as upstream does.
    """
    length = x_BDL.shape[-1]
    n = 2 * length
    if k_DN.shape[-1] != n:
        raise ValueError(f"kernel length {k_DN.shape[-1]} does not match 2 * L = {n}")
    k_f = torch.fft.rfft(k_DN, n=n) / n
    x_f = torch.fft.rfft(x_BDL.to(k_DN.dtype), n=n)
    y_BDL = torch.fft.irfft(x_f * k_f, n=n, norm="forward")[..., :length]
    return (y_BDL + x_BDL * d_D[:, None]).to(x_BDL.dtype)


def gated_long_conv(
    u_BDL: torch.Tensor,
    x1_BDL: torch.Tensor,
    x2_BDL: torch.Tensor,
    v_BDL: torch.Tensor,
    k1_DN: torch.Tensor,
    d1_D: torch.Tensor,
    k2_DN: torch.Tensor | None = None,
    d2_D: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y = (conv(v * x1; k1) + (v * x1) * d1) * x2 + conv(u; k2) + u * d2` (M2_SPEC 1.1 steps 4-7)."""
    y_BDL = fftconv(v_BDL * x1_BDL, k1_DN, d1_D) * x2_BDL
    if k2_DN is not None:
        y_BDL = y_BDL + fftconv(u_BDL, k2_DN, d2_D)
    return y_BDL


def direct_bidirectional_conv(
    x_BDL: torch.Tensor, k_fwd_DL: torch.Tensor, k_rev_DL: torch.Tensor | None, d_D: torch.Tensor
) -> torch.Tensor:
    """O(L^2) definition used to test the FFT path:
    `y[t] = sum_{s<=t} k_fwd[t-s] x[s] + sum_{j>=1} k_rev[j-1] x[t+j] + d * x[t]`."""
    length = x_BDL.shape[-1]
    t = torch.arange(length, device=x_BDL.device)
    lag_LL = t[:, None] - t[None, :]  # [t, s] -> t - s
    fwd_DLL = torch.where(lag_LL >= 0, k_fwd_DL[:, lag_LL.clamp(min=0)], 0.0)
    toeplitz_DLL = fwd_DLL
    if k_rev_DL is not None:
        rev_DLL = torch.where(lag_LL < 0, k_rev_DL[:, (-lag_LL - 1).clamp(min=0)], 0.0)
        toeplitz_DLL = toeplitz_DLL + rev_DLL
    y_BDL = torch.einsum("dts,bds->bdt", toeplitz_DLL, x_BDL)
    return y_BDL + x_BDL * d_D[:, None]
