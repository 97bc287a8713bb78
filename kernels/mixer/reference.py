"""Plain-PyTorch reference of M2's whole sequence mixer after `in_linear` (M2_SPEC 1.1 steps 3-7):
the causal short convolution, the gates and both long convolutions, in the projection's layout.

Shape legend: B batch, L sequence length, D hidden size, C = 3D the projection's width, K the
short filter's taps, N = 2L the long convolution's circular length.
"""

import torch
import torch.nn.functional as F

from kernels.fftconv import reference as fftconv_reference


def causal_short_conv(
    p_BLC: torch.Tensor, weight_C1K: torch.Tensor, bias_C: torch.Tensor, in_bias_C: torch.Tensor | None = None
) -> torch.Tensor:
    """Upstream's short filter, a depthwise Conv1d(C, C, K, groups=C, padding=K-1) cut to its first
    L outputs, i.e. causal: out[b, c, t] = bias[c] + sum_j weight[c, 0, j] p[b, t + j - (K - 1), c].
    With `in_bias_C`, `in_linear`'s bias, the input is p + in_bias (zero-padded after the add), in
    the accumulation dtype: `in_linear` then runs without its bias, whose gradient is this input's.

    Takes the in-projection's (B, L, C) layout and returns (B, C, L), contiguous, in p's dtype,
    accumulated in at least fp32. Written as K shifted products so that on a GPU `torch.compile`
    fuses the convolution, the transposition and the cast into one pass (and the backward into
    another), where cuDNN's depthwise kernels with the transposing copy before them cost as much
    as the long convolution at L=128.
    """
    taps = weight_C1K.shape[-1]
    length = p_BLC.shape[1]
    acc = torch.promote_types(p_BLC.dtype, torch.float32)
    input_BLC = p_BLC.to(acc) if in_bias_C is None else p_BLC.to(acc) + in_bias_C.to(acc)
    padded_BLC = F.pad(input_BLC, (0, 0, taps - 1, 0))
    weight_KC = weight_C1K[:, 0].t().to(acc)
    out_BLC = bias_C.to(acc) + sum(padded_BLC[:, j : j + length] * weight_KC[j] for j in range(taps))
    return out_BLC.to(p_BLC.dtype).transpose(1, 2).contiguous()


def sequence_mixer(
    projected_BLC: torch.Tensor,
    short_weight_C1K: torch.Tensor,
    short_bias_C: torch.Tensor,
    u_BLD: torch.Tensor,
    k1_DN: torch.Tensor,
    d1_D: torch.Tensor,
    k2_DN: torch.Tensor | None = None,
    d2_D: torch.Tensor | None = None,
    in_bias_C: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y = (conv(v * x1; k1) + (v * x1) * d1) * x2 + conv(u; k2) + u * d2`, (B, L, D), where
    [x1, x2, v] = causal_short_conv(projected) split in three along the channels.

    projected_BLC: `in_linear`'s output (B, L, 3D), without its bias where `in_bias_C` is given;
    u_BLD: the mixer's input (B, L, D); k1_DN, k2_DN: (D, 2L) circular filters; d1_D, d2_D: (D,).
    k2/d2 None drops the residual convolution.
    """
    dim = u_BLD.shape[-1]
    x_BCL = causal_short_conv(projected_BLC, short_weight_C1K, short_bias_C, in_bias_C)
    x1_BDL, x2_BDL, v_BDL = x_BCL.split(dim, dim=1)
    y_BDL = fftconv_reference.gated_long_conv(u_BLD.transpose(1, 2), x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D)
    return y_BDL.transpose(1, 2)
