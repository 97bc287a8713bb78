"""Triton path of the gated bidirectional FFT long convolution (M2_SPEC 1.1 steps 4-7).

`y = (conv(v * x1; k1) + (v * x1) * d1) * x2 + conv(u; k2) + u * d2`, forward and backward.

Algorithm (FlashFFTConv's, in Triton): an FFT of size N is Bailey's four-step FFT. The on-chip
transform of size M = M1 * M2 is matrix products with small DFT matrices (tl.dot on tensor cores,
tf32 or fp16 operands (`transform_precision`), and fp32 accumulation; complex numbers as pairs
of real tiles) and twiddle products:
    time n = M2 * n1 + n2, frequency k = k1 + M1 * k2,
    X[k1, k2] = sum_n2 W_M^(n2 k1) (sum_n1 x[n1, n2] W_M1^(n1 k1)) W_M2^(n2 k2),
with the M2-point transform itself split again (M2 = 16 x 16) from M = 4096 on, so every product
is 16 wide. The sequences of a (batch, block of C channels) stay on chip from the gated input to
the gated output: the zero padding to 2L is never materialised (the first stage contracts only the
rows that hold data), the product with the filter spectrum, the output cut to L, the skip terms,
the post-gate and the residual convolution are fused, so each input and output crosses HBM once.
The two inverse transforms of a step share one complex transform: both results are real, so
`IDFT(Y1 + i Y2) = y1 + i y2`.
Other sizes add an outer radix R = N / M (M = 256 below N = 4096, M = 4096 above: the plan that
measured fastest, see `fft_plan`): one program per (channel block, outer frequency r) computes row r
of the outer R-point DFT from the data (read through L2 R times), runs the on-chip transform, and
writes its inverse row to a complex fp32 scratch; a second kernel combines the R rows (the outer
inverse DFT) and applies the gates.
The filter spectra are computed once per call in torch (`torch.fft`, O(D N)) and arranged in the
kernel's frequency order; their gradient `sum_b conj(X) G` is accumulated by the backward kernel,
and autograd carries it back to the time-domain filters.

Shape legend: B batch, D channels, L sequence length, N = 2 * Lp the FFT size (Lp = L rounded up to
a power of two, at least 128), R outer radix, M = M1 * M2 on-chip transform size (N = R * M),
C channels per program.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    INTERPRET,
    device_constants,
    dot_precision,
    new_output,
    strides,
)

# Cap on the on-chip transform size M (a power of two >= 256; tests lower it). MAX_ONCHIP, TILE and
# NUM_WARPS are the defaults of the plan; tools/bench_kernels.py --variants overrides them to tune.
MAX_ONCHIP = 4096
# Elements (channels x spectrum) of one program's tile when the transform is small.
TILE = 2048
# Warps per program of the main kernels; None picks by tile size.
NUM_WARPS = None
MAX_SEQLEN = 32768
# The transforms' tensor-core operands for bf16/fp16 activations (fp32 activations always take the
# 3-pass tf32 product). False: tf32. True: fp16, each transform's input scaled by a power of two to at
# most 1 and the output scaled back (`_dft`, `_idft`). Both carry 11 significant bits, so the error is
# the same; fp16 runs the tensor cores at twice tf32's rate and moves half the bytes through shared
# memory in the stages' layout changes (an sm_90 compile: the same registers, half the shared
# memory). Its range holds: a radix-16 stage grows values at most 16-fold, so a 4096-point transform
# of inputs within 1 stays below 6,000 (fp16's largest value is 65,504).
# None (the default) chooses per plan (`transform_precision`): fp16 for the three-stage on-chip
# transforms (M = 4096, i.e. L >= 2048), tf32 for the 256-point ones. Measured on one H200 (bf16,
# d=768, 65,536 tokens, forward + backward, `tools/bench_kernels.py --ops fftconv --fft-operands
# tf32,fp16`): fp16 took 8.28 against tf32's 9.43 ms at L=2048, 12.82 against 13.92 at 8192 and
# 34.18 against 33.86 at 32768, but 9.81 against 8.45 at L=512, where the transform is 256 points.
FP16_OPERANDS: bool | None = None
# On-chip transform size from which the default takes fp16 operands.
FP16_MIN_ONCHIP = 4096
# Triton's interpreter does not round a half-precision tl.dot as a GPU does: there the operands are
# rounded to fp16 and multiplied in fp32, which is exact for them, as on the tensor cores. Its tf32
# products are exact fp32 ones, where the tensor cores drop an fp32 operand's 13 low mantissa bits
# (truncation, not rounding: Triton passes fp32 registers to the tf32 MMA as they are); the
# interpreter drops them too (`_tf32_truncate`), so that it computes what the GPU computes.
_UPCAST = tl.constexpr(INTERPRET)
# fp32's bits that tf32 keeps (sign, exponent, 10 mantissa bits), and half the unit of the 13 it
# leaves out (the rounding's bias).
_TF32_KEPT_BITS = tl.constexpr(0xFFFFE000)
_TF32_HALF_UNIT = tl.constexpr(0x1000)


def transform_precision(dtype: torch.dtype, plan=None) -> str:
    """The transforms' `PREC` for activations of `dtype` under `plan` (`fft_plan`'s tuple): "fp16"
    for bf16/fp16 activations where `FP16_OPERANDS` says so (None: on-chip transforms of at least
    `FP16_MIN_ONCHIP` points; no plan counts as the largest), else `dot_precision`'s."""
    if dtype in (torch.bfloat16, torch.float16):
        use_fp16 = FP16_OPERANDS
        if use_fp16 is None:
            use_fp16 = plan is None or plan[2] * plan[3] >= FP16_MIN_ONCHIP
        if use_fp16:
            return "fp16"
    return dot_precision(dtype)


@triton.jit
def complex_mul(ar, ai, br, bi):
    """(ar + i ai)(br + i bi) as its real and imaginary parts."""
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _tf32_round(x):
    """fp32 x rounded to the nearest tf32 value (ties away from zero, as PTX's cvt.rna.tf32.f32),
    still fp32: the magnitude's bits plus half the dropped unit, then the 13 low bits cleared. A
    carry into the exponent is the correct rounding up (to infinity past tf32's largest value);
    infinities and NaNs stay what they are."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + _TF32_HALF_UNIT) & _TF32_KEPT_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_truncate(x):
    """fp32 x with the 13 low mantissa bits that tf32 leaves out cleared: what the tensor cores take
    of an fp32 operand (the interpreter's model of them)."""
    return (x.to(tl.uint32, bitcast=True) & _TF32_KEPT_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _operand(x, PREC: tl.constexpr):
    """x as a tensor-core operand: PREC "fp16" rounds it to fp16 (the caller keeps it in range; in
    the interpreter carried in fp32 after the rounding); "tf32" rounds it to the nearest tf32 value
    (the tensor cores would truncate it: 2x the error, which the fp32 residual input's filter
    gradient showed); the 3-pass precisions leave it to tl.dot."""
    if PREC == "fp16":
        x = x.to(tl.float16)
        if _UPCAST:
            x = x.to(tl.float32)
    elif PREC == "tf32":
        x = _tf32_round(x)
    return x


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """a @ b (+ acc) with fp32 accumulation, a and b already PREC's operands (`_operand`: each tile
    made one once, where it is loaded or computed, not once per product)."""
    if PREC == "fp16":
        if _UPCAST:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)
    elif PREC == "tf32" and _UPCAST:
        return tl.dot(_tf32_truncate(a), _tf32_truncate(b), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def unit_scale(amax):
    """The power of two 2^-e that brings amax >= 0 to at most 1 (1 for 0; e within +-100)."""
    e = tl.ceil(tl.log2(tl.where(amax > 0, amax, 1.0)))
    return tl.exp2(-tl.minimum(tl.maximum(e, -100.0), 100.0))


@triton.jit
def _stage_first(
    xr, xi, fr_ptr, fi_ptr, twr_ptr, twi_ptr,
    C: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, K1: tl.constexpr,
    HAS_IMAG: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """DFT over n1 of C sequences of length M = M1 * M2 (time M2 * n1 + m2), times the twiddle
    W_M^(m2 k1). xr, xi: [C * M2, K1] (only n1 < K1 hold data). Returns [C, M2, M1]."""
    o_k = tl.arange(0, K1)
    o_m1 = tl.arange(0, M1)
    o_m2 = tl.arange(0, M2)
    # [K1, M1]
    p_f = o_k[:, None] * M1 + o_m1[None, :]
    b_fr = _operand(tl.load(fr_ptr + p_f), PREC)
    b_fi = _operand(tl.load(fi_ptr + p_f), PREC)
    b_br = _dot(xr, b_fr, None, PREC)
    b_bi = _dot(xr, b_fi, None, PREC)
    if HAS_IMAG:
        b_br = _dot(xi, -b_fi, b_br, PREC)
        b_bi = _dot(xi, b_fr, b_bi, PREC)
    # [M2, M1]
    p_tw = o_m2[:, None] * M1 + o_m1[None, :]
    b_twr = tl.load(twr_ptr + p_tw)
    b_twi = tl.load(twi_ptr + p_tw)
    return complex_mul(tl.reshape(b_br, (C, M2, M1)), tl.reshape(b_bi, (C, M2, M1)), b_twr[None, :, :], b_twi[None, :, :])


@triton.jit
def _stage_dft(xr, xi, fr_ptr, fi_ptr, M2: tl.constexpr, CONJ: tl.constexpr, PREC: tl.constexpr):
    """[ROWS, M2] @ F_M2 (or its conjugate), complex."""
    o_m2 = tl.arange(0, M2)
    # [M2, M2]
    p_f = o_m2[:, None] * M2 + o_m2[None, :]
    b_fr = _operand(tl.load(fr_ptr + p_f), PREC)
    b_fi = _operand(tl.load(fi_ptr + p_f), PREC)
    if CONJ:
        b_fi = -b_fi
    b_yr = _dot(xr, b_fr, None, PREC)
    b_yr = _dot(xi, -b_fi, b_yr, PREC)
    b_yi = _dot(xr, b_fi, None, PREC)
    b_yi = _dot(xi, b_fr, b_yi, PREC)
    return b_yr, b_yi


@triton.jit
def _stage_last_inv(
    dr, di, fr_ptr, fi_ptr, twr_ptr, twi_ptr,
    C: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, K1: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Inverse of `_stage_first`: dr, di [C * M1, M2] (row c * M1 + k1, column m2) times the
    conjugate twiddle, then the inverse DFT over k1 for n1 < K1. Returns [C * M2, K1] (time M2 n1 + m2)."""
    o_k = tl.arange(0, K1)
    o_m1 = tl.arange(0, M1)
    o_m2 = tl.arange(0, M2)
    # [M1, M2]: the transposed twiddles, conjugated
    p_tw = o_m2[None, :] * M1 + o_m1[:, None]
    b_twr = tl.load(twr_ptr + p_tw)
    b_twi = tl.load(twi_ptr + p_tw)
    b_er, b_ei = complex_mul(
        tl.reshape(dr, (C, M1, M2)), tl.reshape(di, (C, M1, M2)), b_twr[None, :, :], -b_twi[None, :, :]
    )
    b_er, b_ei = _operand(b_er, PREC), _operand(b_ei, PREC)
    b_er = tl.reshape(tl.permute(b_er, (0, 2, 1)), (C * M2, M1))
    b_ei = tl.reshape(tl.permute(b_ei, (0, 2, 1)), (C * M2, M1))
    # [M1, K1]
    p_f = o_m1[:, None] * M1 + o_k[None, :]
    b_fr = _operand(tl.load(fr_ptr + p_f), PREC)
    b_fi = _operand(tl.load(fi_ptr + p_f), PREC)
    b_or = _dot(b_er, b_fr, None, PREC)
    b_or = _dot(b_ei, b_fi, b_or, PREC)
    b_oi = _dot(b_ei, b_fr, None, PREC)
    b_oi = _dot(b_er, -b_fi, b_oi, PREC)
    return b_or, b_oi


@triton.jit
def _dft(
    xr, xi, amax, tab_ptr,
    C: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, P2: tl.constexpr, K1: tl.constexpr,
    HAS_IMAG: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Forward DFT of C sequences of length M = M1 * M2.

    xr, xi: [C * M2, K1] time tiles, row c * M2 + m2, column n1, time M2 * n1 + m2 (only n1 < K1
    hold data). P2 == 1: the M2-point DFT is one matrix product (two stages in all); otherwise it
    is itself two stages P2 x P3 (three in all). Returns the spectra as [C * M / SC, SC] tiles with
    SC = M2 (P2 == 1) or P3: row (c, k1[, k2]), column k2 or k3; frequency k1 + M1 (k2 + P2 k3).
    `tab_ptr` holds the tables of `_tables`, at the offsets of `_tab_offsets`. amax: a bound on the
    inputs' modulus, by which PREC "fp16" scales them to at most 1 (undone on the output).
    """
    fa_r, fa_i, ta_r, ta_i, fb_r, fb_i, tb_r, tb_i, fc_r, fc_i = _tab_offsets(tab_ptr, M1, M2, P2)
    if PREC == "fp16":
        scale = unit_scale(amax)
        xr *= scale
        if HAS_IMAG:
            xi *= scale
    xr = _operand(xr, PREC)
    if HAS_IMAG:
        xi = _operand(xi, PREC)
    b_cr, b_ci = _stage_first(xr, xi, fa_r, fa_i, ta_r, ta_i, C, M1, M2, K1, HAS_IMAG, PREC)
    # Rounded to the operand dtype before the layout change (fp16 moves half the bytes).
    b_cr, b_ci = _operand(b_cr, PREC), _operand(b_ci, PREC)
    if P2 == 1:
        b_cr = tl.reshape(tl.permute(b_cr, (0, 2, 1)), (C * M1, M2))
        b_ci = tl.reshape(tl.permute(b_ci, (0, 2, 1)), (C * M1, M2))
        b_yr, b_yi = _stage_dft(b_cr, b_ci, fc_r, fc_i, M2, False, PREC)
    else:
        P3: tl.constexpr = M2 // P2
        # m2 = P3 n2 + n3: each k1 row is a sequence of length M2, as a [P3, P2] time tile.
        b_cr = tl.reshape(tl.permute(tl.reshape(b_cr, (C, P2, P3, M1)), (0, 3, 2, 1)), (C * M1 * P3, P2))
        b_ci = tl.reshape(tl.permute(tl.reshape(b_ci, (C, P2, P3, M1)), (0, 3, 2, 1)), (C * M1 * P3, P2))
        b_cr, b_ci = _stage_first(b_cr, b_ci, fb_r, fb_i, tb_r, tb_i, C * M1, P2, P3, P2, True, PREC)
        b_cr, b_ci = _operand(b_cr, PREC), _operand(b_ci, PREC)
        b_cr = tl.reshape(tl.permute(b_cr, (0, 2, 1)), (C * M1 * P2, P3))
        b_ci = tl.reshape(tl.permute(b_ci, (0, 2, 1)), (C * M1 * P2, P3))
        b_yr, b_yi = _stage_dft(b_cr, b_ci, fc_r, fc_i, P3, False, PREC)
    if PREC == "fp16":
        b_yr *= 1.0 / scale
        b_yi *= 1.0 / scale
    return b_yr, b_yi


@triton.jit
def _idft(
    yr, yi, tab_ptr,
    C: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, P2: tl.constexpr, K1: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Unnormalised inverse DFT (exponent +) of C spectra in the layout `_dft` returns.
    Returns the time tiles [C * M2, K1] (real, imaginary), n1 < K1 only. PREC "fp16" scales the
    spectra by the power of two that brings their largest part to at most 1 (undone on the output)."""
    fa_r, fa_i, ta_r, ta_i, fb_r, fb_i, tb_r, tb_i, fc_r, fc_i = _tab_offsets(tab_ptr, M1, M2, P2)
    if PREC == "fp16":
        scale = unit_scale(tl.maximum(tl.max(tl.abs(yr)), tl.max(tl.abs(yi))))
        yr *= scale
        yi *= scale
    yr, yi = _operand(yr, PREC), _operand(yi, PREC)
    if P2 == 1:
        b_dr, b_di = _stage_dft(yr, yi, fc_r, fc_i, M2, True, PREC)
    else:
        P3: tl.constexpr = M2 // P2
        b_dr, b_di = _stage_dft(yr, yi, fc_r, fc_i, P3, True, PREC)
        # Time tiles [C * M1 * P3, P2] of the M2-point inverses, then [C * M1, M2] (column m2 = P3 n2 + n3).
        b_dr, b_di = _stage_last_inv(b_dr, b_di, fb_r, fb_i, tb_r, tb_i, C * M1, P2, P3, P2, PREC)
        b_dr = tl.reshape(tl.permute(tl.reshape(b_dr, (C, M1, P3, P2)), (0, 1, 3, 2)), (C * M1, M2))
        b_di = tl.reshape(tl.permute(tl.reshape(b_di, (C, M1, P3, P2)), (0, 1, 3, 2)), (C * M1, M2))
    b_or, b_oi = _stage_last_inv(b_dr, b_di, fa_r, fa_i, ta_r, ta_i, C, M1, M2, K1, PREC)
    if PREC == "fp16":
        b_or *= 1.0 / scale
        b_oi *= 1.0 / scale
    return b_or, b_oi


@triton.jit
def _tab_offsets(tab_ptr, M1: tl.constexpr, M2: tl.constexpr, P2: tl.constexpr):
    """Pointers to the tables packed by `_tables`: F_M1, W_M^(m2 k1) [M2, M1], F_P2,
    W_M2^(n3 k2) [P3, P2], F_P3 with P3 = M2 / P2 (P2 == 1: F_P3 = F_M2); real and imaginary planes."""
    P3: tl.constexpr = M2 // P2
    fa_r = tab_ptr
    fa_i = fa_r + M1 * M1
    ta_r = fa_i + M1 * M1
    ta_i = ta_r + M1 * M2
    fb_r = ta_i + M1 * M2
    fb_i = fb_r + P2 * P2
    tb_r = fb_i + P2 * P2
    tb_i = tb_r + P2 * P3
    fc_r = tb_i + P2 * P3
    fc_i = fc_r + P3 * P3
    return fa_r, fa_i, ta_r, ta_i, fb_r, fb_i, tb_r, tb_i, fc_r, fc_i


@triton.jit
def _load_outer_row(
    pa_ptr, s_ab, s_ad, s_al, pb_ptr, s_bb, s_bd, s_bl, wc_ptr, ws_ptr,
    i_b, i_r, o_d, o_t, m_d, L,
    R: tl.constexpr, M: tl.constexpr, HAS_B: tl.constexpr,
):  # fmt: skip
    """Row r of the outer R-point DFT of the zero-padded product a * b (b optional), before the
    outer twiddle, and max |a * b| over the tile's whole rows (the same in every program of the
    row's R). o_d, o_t, m_d: [C * M2, K1] channel, inner time and channel mask of the tile.
    With R == 1 this is the plain (real) sequence."""
    b_zr = tl.zeros(o_t.shape, tl.float32)
    b_zi = tl.zeros(o_t.shape, tl.float32)
    amax = 0.0
    # Only the first R / 2 outer rows hold data (the rest is the zero padding to 2L).
    for n0 in tl.static_range(max(R // 2, 1)):
        o_tn = o_t + n0 * M
        m_x = m_d & (o_tn < L)
        b_x = tl.load(pa_ptr + i_b * s_ab + o_d * s_ad + o_tn * s_al, mask=m_x, other=0.0).to(tl.float32)
        if HAS_B:
            b_x *= tl.load(pb_ptr + i_b * s_bb + o_d * s_bd + o_tn * s_bl, mask=m_x, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(b_x)))
        if R == 1:
            b_zr = b_x
        else:
            i_w = (n0 * i_r) % R
            b_zr += b_x * tl.load(wc_ptr + i_w)
            b_zi -= b_x * tl.load(ws_ptr + i_w)
    return b_zr, b_zi, amax


@triton.jit
def _pow2_ratio(num, den):
    """2^round(log2(num / den)) for maxima num, den >= 0, within 2^+-100; 1 when either is 0."""
    ok = (num > 0) & (den > 0)
    e = tl.floor(tl.log2(tl.where(ok, num, 1.0)) - tl.log2(tl.where(ok, den, 1.0)) + 0.5)
    return tl.exp2(tl.minimum(tl.maximum(e, -100.0), 100.0))


@triton.jit
def _tile_indices(
    i_d0, i_r, D, R: tl.constexpr, M: tl.constexpr, M2: tl.constexpr, P2: tl.constexpr, K1: tl.constexpr,
    C: tl.constexpr,
):  # fmt: skip
    """In-tile offsets of a program of channels i_d0.. i_d0 + C and outer frequency i_r.

    Time tile [C * M2, K1]: row c * M2 + n2 (o_row), channel o_d, inner time o_t = M2 * n1 + n2,
    channel mask m_d. Spectrum tile [C * SR, SC] (the layout `_dft` returns) in the filter spectra's
    layout [D, R, M / SC, SC] of `filter_spectrum`: base i_k0, offsets p_k, mask m_k."""
    o_row = tl.arange(0, C * M2)
    o_d = o_row[:, None] // M2
    o_t = tl.arange(0, K1)[None, :] * M2 + (o_row % M2)[:, None]
    m_d = (i_d0 + o_d) < D
    SC: tl.constexpr = M2 // P2
    SR: tl.constexpr = M // SC
    o_frow = tl.arange(0, C * SR)
    o_fd = o_frow // SR
    i_k0 = (i_d0 * R + i_r) * M
    p_k = (o_fd * (R * M) + (o_frow % SR) * SC)[:, None] + tl.arange(0, SC)[None, :]
    m_k = ((i_d0 + o_fd) < D)[:, None]
    return o_row, o_d, o_t, m_d, i_k0, p_k, m_k


@triton.jit
def _dft_conv_fwd_kernel(
    u_ptr, x1_ptr, x2_ptr, v_ptr, y_ptr, sr_ptr, si_ptr,
    k1r_ptr, k1i_ptr, k2r_ptr, k2i_ptr, d1_ptr, d2_ptr,
    tab_ptr, otr_ptr, oti_ptr, wc_ptr, ws_ptr,
    B, D, L, B_PER,
    s_ub, s_ud, s_ul, s_x1b, s_x1d, s_x1l, s_x2b, s_x2d, s_x2l, s_vb, s_vd, s_vl, s_yb, s_yd, s_yl,
    R: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, P2: tl.constexpr, K1: tl.constexpr, C: tl.constexpr,
    HAS_RES: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_dc = tl.program_id(0).to(tl.int64)
    i_bs = tl.program_id(1).to(tl.int64)
    i_r = tl.program_id(2).to(tl.int64)
    M: tl.constexpr = M1 * M2
    # An outer row sums at most R / 2 rows of data (twiddled): its modulus is within this many times theirs.
    OUTER_GAIN: tl.constexpr = max(R // 2, 1)
    # Time tile [C * M2, K1]: row c * M2 + n2, column n1, inner time M2 * n1 + n2.
    # Scalar (int64) offsets of the channel block go into the base pointers; in-tile offsets are int32.
    i_d0 = i_dc * C
    u_ptr += i_d0 * s_ud
    x1_ptr += i_d0 * s_x1d
    x2_ptr += i_d0 * s_x2d
    v_ptr += i_d0 * s_vd
    d1_ptr += i_d0
    d2_ptr += i_d0
    o_row, o_d, o_t, m_d, i_k0, p_k, m_k = _tile_indices(i_d0, i_r, D, R, M, M2, P2, K1, C)
    if R > 1:
        # Outer twiddle W_N^(r m) at the tile's inner times, [C * M2, K1].
        b_otr = tl.load(otr_ptr + i_r * M + o_t)
        b_oti = tl.load(oti_ptr + i_r * M + o_t)
    else:
        b_d1 = tl.load(d1_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
        if HAS_RES:
            b_d2 = tl.load(d2_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    i_blo = i_bs * B_PER
    i_bhi = tl.minimum(i_blo + B_PER, B)
    for i_b in range(i_blo, i_bhi):
        b_ar, b_ai, amax_a = _load_outer_row(
            v_ptr, s_vb, s_vd, s_vl, x1_ptr, s_x1b, s_x1d, s_x1l, wc_ptr, ws_ptr,
            i_b, i_r, o_d, o_t, m_d, L, R, M, True,
        )  # fmt: skip
        if R > 1:
            b_ar, b_ai = complex_mul(b_ar, b_ai, b_otr, b_oti)
        b_ar, b_ai = _dft(b_ar, b_ai, amax_a * OUTER_GAIN, tab_ptr, C, M1, M2, P2, K1, R > 1, PREC)
        # The spectra are re-read (from L2) every iteration: holding them costs registers.
        b_yr, b_yi = complex_mul(
            b_ar, b_ai, tl.load(k1r_ptr + i_k0 + p_k, mask=m_k, other=0.0), tl.load(k1i_ptr + i_k0 + p_k, mask=m_k, other=0.0)
        )
        if HAS_RES:
            b_ur, b_ui, amax_u = _load_outer_row(
                u_ptr, s_ub, s_ud, s_ul, u_ptr, s_ub, s_ud, s_ul, wc_ptr, ws_ptr,
                i_b, i_r, o_d, o_t, m_d, L, R, M, False,
            )  # fmt: skip
            if R > 1:
                b_ur, b_ui = complex_mul(b_ur, b_ui, b_otr, b_oti)
            b_ur, b_ui = _dft(b_ur, b_ui, amax_u * OUTER_GAIN, tab_ptr, C, M1, M2, P2, K1, R > 1, PREC)
            b_ur, b_ui = complex_mul(
                b_ur, b_ui, tl.load(k2r_ptr + i_k0 + p_k, mask=m_k, other=0.0), tl.load(k2i_ptr + i_k0 + p_k, mask=m_k, other=0.0)
            )
            # Y1 + i Y2: one inverse transform gives y1 (real part) and y2 (imaginary part).
            b_yr -= b_ui
            b_yi += b_ur
        b_y1, b_y2 = _idft(b_yr, b_yi, tab_ptr, C, M1, M2, P2, K1, PREC)
        if R == 1:
            m_x = m_d & (o_t < L)
            b_v = tl.load(v_ptr + i_b * s_vb + o_d * s_vd + o_t * s_vl, mask=m_x, other=0.0).to(tl.float32)
            b_x1 = tl.load(x1_ptr + i_b * s_x1b + o_d * s_x1d + o_t * s_x1l, mask=m_x, other=0.0).to(tl.float32)
            b_x2 = tl.load(x2_ptr + i_b * s_x2b + o_d * s_x2d + o_t * s_x2l, mask=m_x, other=0.0).to(tl.float32)
            b_y = (b_y1 + b_d1 * b_v * b_x1) * b_x2
            if HAS_RES:
                b_u = tl.load(u_ptr + i_b * s_ub + o_d * s_ud + o_t * s_ul, mask=m_x, other=0.0).to(tl.float32)
                b_y += b_y2 + b_d2 * b_u
            tl.store(y_ptr + i_b * s_yb + i_d0 * s_yd + o_d * s_yd + o_t * s_yl, b_y.to(y_ptr.dtype.element_ty), mask=m_x)
        else:
            # Conjugate outer twiddle, then the row goes to the scratch [B, D, R, M].
            b_sr, b_si = complex_mul(b_y1, b_y2, b_otr, -b_oti)
            p_s = ((i_b * D + i_d0) * R + i_r) * M + (o_d * (R * M) + o_t)
            tl.store(sr_ptr + p_s, b_sr, mask=m_d)
            tl.store(si_ptr + p_s, b_si, mask=m_d)


@triton.jit
def _outer_inverse(sr_ptr, si_ptr, wc_ptr, ws_ptr, i_b, i_d, o_m, D, R: tl.constexpr, M: tl.constexpr):
    """sum_r W_R^(-n0 r) S[b, d, r, m] for n0 < R / 2: [R / 2, BLK] (real, imaginary)."""
    o_n0 = tl.arange(0, R // 2)
    b_pr = tl.zeros((R // 2, o_m.shape[0]), tl.float32)
    b_pi = tl.zeros((R // 2, o_m.shape[0]), tl.float32)
    for r in tl.static_range(R):
        # [BLK]
        p_s = ((i_b * D + i_d) * R + r) * M + o_m
        b_sr = tl.load(sr_ptr + p_s)[None, :]
        b_si = tl.load(si_ptr + p_s)[None, :]
        # [R / 2]
        b_wc = tl.load(wc_ptr + (o_n0 * r) % R)[:, None]
        b_ws = tl.load(ws_ptr + (o_n0 * r) % R)[:, None]
        b_pr += b_wc * b_sr - b_ws * b_si
        b_pi += b_wc * b_si + b_ws * b_sr
    return b_pr, b_pi


@triton.jit
def _fwd_combine_kernel(
    sr_ptr, si_ptr, u_ptr, x1_ptr, x2_ptr, v_ptr, y_ptr, d1_ptr, d2_ptr, wc_ptr, ws_ptr,
    D, L,
    s_ub, s_ud, s_ul, s_x1b, s_x1d, s_x1l, s_x2b, s_x2d, s_x2l, s_vb, s_vd, s_vl, s_yb, s_yd, s_yl,
    R: tl.constexpr, M: tl.constexpr, BLK: tl.constexpr, HAS_RES: tl.constexpr,
):  # fmt: skip
    i_m = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    o_m = i_m * BLK + tl.arange(0, BLK)
    b_y1, b_y2 = _outer_inverse(sr_ptr, si_ptr, wc_ptr, ws_ptr, i_b, i_d, o_m, D, R, M)
    # [R / 2, BLK]
    o_t = tl.arange(0, R // 2)[:, None] * M + o_m[None, :]
    m_t = o_t < L
    b_v = tl.load(v_ptr + i_b * s_vb + i_d * s_vd + o_t * s_vl, mask=m_t, other=0.0).to(tl.float32)
    b_x1 = tl.load(x1_ptr + i_b * s_x1b + i_d * s_x1d + o_t * s_x1l, mask=m_t, other=0.0).to(tl.float32)
    b_x2 = tl.load(x2_ptr + i_b * s_x2b + i_d * s_x2d + o_t * s_x2l, mask=m_t, other=0.0).to(tl.float32)
    b_y = (b_y1 + tl.load(d1_ptr + i_d).to(tl.float32) * b_v * b_x1) * b_x2
    if HAS_RES:
        b_u = tl.load(u_ptr + i_b * s_ub + i_d * s_ud + o_t * s_ul, mask=m_t, other=0.0).to(tl.float32)
        b_y += b_y2 + tl.load(d2_ptr + i_d).to(tl.float32) * b_u
    tl.store(y_ptr + i_b * s_yb + i_d * s_yd + o_t * s_yl, b_y.to(y_ptr.dtype.element_ty), mask=m_t)


@triton.jit
def _dft_conv_bwd_kernel(
    u_ptr, x1_ptr, x2_ptr, v_ptr, dy_ptr, du_ptr, dx1_ptr, dx2_ptr, dv_ptr,
    s1r_ptr, s1i_ptr, s2r_ptr, s2i_ptr, scale_ptr, dd1_ptr, dd2_ptr,
    k1r_ptr, k1i_ptr, k2r_ptr, k2i_ptr, dk1r_ptr, dk1i_ptr, dk2r_ptr, dk2i_ptr, d1_ptr, d2_ptr,
    tab_ptr, otr_ptr, oti_ptr, wc_ptr, ws_ptr,
    B, D, L, B_PER,
    s_ub, s_ud, s_ul, s_x1b, s_x1d, s_x1l, s_x2b, s_x2d, s_x2l, s_vb, s_vd, s_vl, s_gb, s_gd, s_gl,
    R: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, P2: tl.constexpr, K1: tl.constexpr, C: tl.constexpr,
    HAS_RES: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Gradients of `_dft_conv_fwd_kernel`. Input gradients are written (B, D, L) contiguous; with
    R > 1 the inverse rows go to the scratches S1 = y1 + i da_conv and S2 = du_conv, and the
    gradients are finished by `_bwd_combine_kernel`. dk*: spectrum gradients sum_b conj(X) G in the filter
    layout; dd*: partial sums of the skip-weight gradients per program and tile row, [n_bsplit, D, M2]."""
    i_dc = tl.program_id(0).to(tl.int64)
    i_bs = tl.program_id(1).to(tl.int64)
    i_r = tl.program_id(2).to(tl.int64)
    M: tl.constexpr = M1 * M2
    # An outer row sums at most R / 2 rows of data (twiddled): its modulus is within this many times theirs.
    OUTER_GAIN: tl.constexpr = max(R // 2, 1)
    # Scalar (int64) offsets of the channel block go into the base pointers; in-tile offsets are int32.
    i_d0 = i_dc * C
    u_ptr += i_d0 * s_ud
    x1_ptr += i_d0 * s_x1d
    x2_ptr += i_d0 * s_x2d
    v_ptr += i_d0 * s_vd
    d1_ptr += i_d0
    d2_ptr += i_d0
    dy_ptr += i_d0 * s_gd
    o_row, o_d, o_t, m_d, i_k0, p_k, m_k = _tile_indices(i_d0, i_r, D, R, M, M2, P2, K1, C)
    SC: tl.constexpr = M2 // P2
    SR: tl.constexpr = M // SC
    b_dk1r = tl.zeros((C * SR, SC), tl.float32)
    b_dk1i = tl.zeros((C * SR, SC), tl.float32)
    if HAS_RES:
        b_dk2r = tl.zeros((C * SR, SC), tl.float32)
        b_dk2i = tl.zeros((C * SR, SC), tl.float32)
    if R > 1:
        b_otr = tl.load(otr_ptr + i_r * M + o_t)
        b_oti = tl.load(oti_ptr + i_r * M + o_t)
    else:
        b_d1 = tl.load(d1_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
        # Skip-weight gradients, summed per tile row here and over rows and programs in torch.
        b_dd1 = tl.zeros((C * M2,), tl.float32)
        if HAS_RES:
            b_d2 = tl.load(d2_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
            b_dd2 = tl.zeros((C * M2,), tl.float32)
    i_blo = i_bs * B_PER
    i_bhi = tl.minimum(i_blo + B_PER, B)
    for i_b in range(i_blo, i_bhi):
        # Conv 1: a = v * x1 and its upstream gradient g1 = dy * x2.
        b_ar, b_ai, amax_a = _load_outer_row(
            v_ptr, s_vb, s_vd, s_vl, x1_ptr, s_x1b, s_x1d, s_x1l, wc_ptr, ws_ptr,
            i_b, i_r, o_d, o_t, m_d, L, R, M, True,
        )  # fmt: skip
        b_gr, b_gi, amax_g = _load_outer_row(
            dy_ptr, s_gb, s_gd, s_gl, x2_ptr, s_x2b, s_x2d, s_x2l, wc_ptr, ws_ptr,
            i_b, i_r, o_d, o_t, m_d, L, R, M, True,
        )  # fmt: skip
        if R > 1:
            b_ar, b_ai = complex_mul(b_ar, b_ai, b_otr, b_oti)
            b_gr, b_gi = complex_mul(b_gr, b_gi, b_otr, b_oti)
        b_ar, b_ai = _dft(b_ar, b_ai, amax_a * OUTER_GAIN, tab_ptr, C, M1, M2, P2, K1, R > 1, PREC)
        b_gr, b_gi = _dft(b_gr, b_gi, amax_g * OUTER_GAIN, tab_ptr, C, M1, M2, P2, K1, R > 1, PREC)
        b_dk1r += b_ar * b_gr + b_ai * b_gi
        b_dk1i += b_ar * b_gi - b_ai * b_gr
        # A K1 (for y1, needed by dx2) + i s G1 conj(K1) (the correlation giving da): one inverse.
        # Gradients are orders of magnitude below activations, and the tf32 transform's error is
        # relative to the larger part: the power of two s brings G1 to A's scale (exactly undone).
        scale = _pow2_ratio(amax_a, amax_g)
        b_k1r = tl.load(k1r_ptr + i_k0 + p_k, mask=m_k, other=0.0)
        b_k1i = tl.load(k1i_ptr + i_k0 + p_k, mask=m_k, other=0.0)
        b_pr, b_pi = complex_mul(b_ar, b_ai, b_k1r, b_k1i)
        b_qr, b_qi = complex_mul(b_gr * scale, b_gi * scale, b_k1r, -b_k1i)
        b_y1, b_dac = _idft(
            b_pr - b_qi, b_pi + b_qr, tab_ptr, C, M1, M2, P2, K1, PREC
        )
        if R == 1:
            b_dac = b_dac / scale
            m_x = m_d & (o_t < L)
            p_x = (i_b * D + i_d0) * L + (o_d * L + o_t)
            b_v = tl.load(v_ptr + i_b * s_vb + o_d * s_vd + o_t * s_vl, mask=m_x, other=0.0).to(tl.float32)
            b_x1 = tl.load(x1_ptr + i_b * s_x1b + o_d * s_x1d + o_t * s_x1l, mask=m_x, other=0.0).to(tl.float32)
            b_x2 = tl.load(x2_ptr + i_b * s_x2b + o_d * s_x2d + o_t * s_x2l, mask=m_x, other=0.0).to(tl.float32)
            b_dy = tl.load(dy_ptr + i_b * s_gb + o_d * s_gd + o_t * s_gl, mask=m_x, other=0.0).to(tl.float32)
            b_a = b_v * b_x1
            b_g1 = b_dy * b_x2
            b_da = b_dac + b_d1 * b_g1
            tl.store(dv_ptr + p_x, (b_da * b_x1).to(dv_ptr.dtype.element_ty), mask=m_x)
            tl.store(dx1_ptr + p_x, (b_da * b_v).to(dx1_ptr.dtype.element_ty), mask=m_x)
            tl.store(dx2_ptr + p_x, (b_dy * (b_y1 + b_d1 * b_a)).to(dx2_ptr.dtype.element_ty), mask=m_x)
            b_dd1 += tl.sum(b_g1 * b_a, axis=1)
        else:
            # The combine kernel divides da by the scale of the row's channel block.
            tl.store(scale_ptr + i_b * tl.num_programs(0) + i_dc, scale)
            b_sr, b_si = complex_mul(b_y1, b_dac, b_otr, -b_oti)
            p_s = ((i_b * D + i_d0) * R + i_r) * M + (o_d * (R * M) + o_t)
            tl.store(s1r_ptr + p_s, b_sr, mask=m_d)
            tl.store(s1i_ptr + p_s, b_si, mask=m_d)
        if HAS_RES:
            # Conv 2 on u with upstream gradient dy.
            b_ur, b_ui, amax_u = _load_outer_row(
                u_ptr, s_ub, s_ud, s_ul, u_ptr, s_ub, s_ud, s_ul, wc_ptr, ws_ptr,
                i_b, i_r, o_d, o_t, m_d, L, R, M, False,
            )  # fmt: skip
            b_hr, b_hi, amax_h = _load_outer_row(
                dy_ptr, s_gb, s_gd, s_gl, dy_ptr, s_gb, s_gd, s_gl, wc_ptr, ws_ptr,
                i_b, i_r, o_d, o_t, m_d, L, R, M, False,
            )  # fmt: skip
            if R > 1:
                b_ur, b_ui = complex_mul(b_ur, b_ui, b_otr, b_oti)
                b_hr, b_hi = complex_mul(b_hr, b_hi, b_otr, b_oti)
            b_ur, b_ui = _dft(b_ur, b_ui, amax_u * OUTER_GAIN, tab_ptr, C, M1, M2, P2, K1, R > 1, PREC)
            b_hr, b_hi = _dft(b_hr, b_hi, amax_h * OUTER_GAIN, tab_ptr, C, M1, M2, P2, K1, R > 1, PREC)
            b_dk2r += b_ur * b_hr + b_ui * b_hi
            b_dk2i += b_ur * b_hi - b_ui * b_hr
            b_qr, b_qi = complex_mul(
                b_hr, b_hi, tl.load(k2r_ptr + i_k0 + p_k, mask=m_k, other=0.0), -tl.load(k2i_ptr + i_k0 + p_k, mask=m_k, other=0.0)
            )
            b_duc, b_duci = _idft(b_qr, b_qi, tab_ptr, C, M1, M2, P2, K1, PREC)
            if R == 1:
                b_u = tl.load(u_ptr + i_b * s_ub + o_d * s_ud + o_t * s_ul, mask=m_x, other=0.0).to(tl.float32)
                tl.store(du_ptr + p_x, (b_duc + b_d2 * b_dy).to(du_ptr.dtype.element_ty), mask=m_x)
                b_dd2 += tl.sum(b_dy * b_u, axis=1)
            else:
                b_sr, b_si = complex_mul(b_duc, b_duci, b_otr, -b_oti)
                tl.store(s2r_ptr + p_s, b_sr, mask=m_d)
                tl.store(s2i_ptr + p_s, b_si, mask=m_d)
    if ATOMIC:
        tl.atomic_add(dk1r_ptr + i_k0 + p_k, b_dk1r, mask=m_k)
        tl.atomic_add(dk1i_ptr + i_k0 + p_k, b_dk1i, mask=m_k)
    else:
        tl.store(dk1r_ptr + i_k0 + p_k, b_dk1r, mask=m_k)
        tl.store(dk1i_ptr + i_k0 + p_k, b_dk1i, mask=m_k)
    if HAS_RES:
        if ATOMIC:
            tl.atomic_add(dk2r_ptr + i_k0 + p_k, b_dk2r, mask=m_k)
            tl.atomic_add(dk2i_ptr + i_k0 + p_k, b_dk2i, mask=m_k)
        else:
            tl.store(dk2r_ptr + i_k0 + p_k, b_dk2r, mask=m_k)
            tl.store(dk2i_ptr + i_k0 + p_k, b_dk2i, mask=m_k)
    if R == 1:
        p_dd = (i_bs * D + i_d0) * M2 + o_row
        m_dd = (i_d0 + o_row // M2) < D
        tl.store(dd1_ptr + p_dd, b_dd1, mask=m_dd)
        if HAS_RES:
            tl.store(dd2_ptr + p_dd, b_dd2, mask=m_dd)


@triton.jit
def _bwd_combine_kernel(
    s1r_ptr, s1i_ptr, s2r_ptr, s2i_ptr, scale_ptr, u_ptr, x1_ptr, x2_ptr, v_ptr, dy_ptr,
    du_ptr, dx1_ptr, dx2_ptr, dv_ptr, dd1_ptr, dd2_ptr, d1_ptr, d2_ptr, wc_ptr, ws_ptr,
    D, L,
    s_ub, s_ud, s_ul, s_x1b, s_x1d, s_x1l, s_x2b, s_x2d, s_x2l, s_vb, s_vd, s_vl, s_gb, s_gd, s_gl,
    R: tl.constexpr, M: tl.constexpr, BLK: tl.constexpr, C: tl.constexpr, HAS_RES: tl.constexpr,
):  # fmt: skip
    """Outer inverse of the backward's scratch rows and the gradients' gates. dd*: partial sums
    [B, n_mblocks, D]."""
    i_m = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    o_m = i_m * BLK + tl.arange(0, BLK)
    b_y1, b_dac = _outer_inverse(s1r_ptr, s1i_ptr, wc_ptr, ws_ptr, i_b, i_d, o_m, D, R, M)
    b_dac = b_dac / tl.load(scale_ptr + i_b * tl.cdiv(D, C) + i_d // C)
    # [R / 2, BLK]
    o_t = tl.arange(0, R // 2)[:, None] * M + o_m[None, :]
    m_t = o_t < L
    p_x = i_b * (D * L) + i_d * L + o_t
    b_v = tl.load(v_ptr + i_b * s_vb + i_d * s_vd + o_t * s_vl, mask=m_t, other=0.0).to(tl.float32)
    b_x1 = tl.load(x1_ptr + i_b * s_x1b + i_d * s_x1d + o_t * s_x1l, mask=m_t, other=0.0).to(tl.float32)
    b_x2 = tl.load(x2_ptr + i_b * s_x2b + i_d * s_x2d + o_t * s_x2l, mask=m_t, other=0.0).to(tl.float32)
    b_dy = tl.load(dy_ptr + i_b * s_gb + i_d * s_gd + o_t * s_gl, mask=m_t, other=0.0).to(tl.float32)
    b_d1 = tl.load(d1_ptr + i_d).to(tl.float32)
    b_a = b_v * b_x1
    b_g1 = b_dy * b_x2
    b_da = b_dac + b_d1 * b_g1
    tl.store(dv_ptr + p_x, (b_da * b_x1).to(dv_ptr.dtype.element_ty), mask=m_t)
    tl.store(dx1_ptr + p_x, (b_da * b_v).to(dx1_ptr.dtype.element_ty), mask=m_t)
    tl.store(dx2_ptr + p_x, (b_dy * (b_y1 + b_d1 * b_a)).to(dx2_ptr.dtype.element_ty), mask=m_t)
    p_dd = (i_b * tl.num_programs(0) + i_m) * D + i_d
    tl.store(dd1_ptr + p_dd, tl.sum(tl.sum(b_g1 * b_a, axis=1), axis=0))
    if HAS_RES:
        b_duc, b_unused = _outer_inverse(s2r_ptr, s2i_ptr, wc_ptr, ws_ptr, i_b, i_d, o_m, D, R, M)
        b_u = tl.load(u_ptr + i_b * s_ub + i_d * s_ud + o_t * s_ul, mask=m_t, other=0.0).to(tl.float32)
        tl.store(du_ptr + p_x, (b_duc + tl.load(d2_ptr + i_d).to(tl.float32) * b_dy).to(du_ptr.dtype.element_ty), mask=m_t)
        tl.store(dd2_ptr + p_dd, tl.sum(tl.sum(b_dy * b_u, axis=1), axis=0))


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def fft_plan(length: int, max_onchip: int, tile: int) -> tuple[int, int, int, int, int, int, int]:
    """(N, R, M1, M2, P2, K1, C) for sequences of `length`: FFT size N = R * M with the on-chip
    transform M = M1 * M2 in two stages (P2 == 1) or three (M2 = P2 * P3, radix 16), K1 columns of
    the time tile that hold data, C channels per program."""
    n = 2 * max(128, _next_pow2(length))
    # Measured on an H200: the on-chip transform is fastest with radix-16 stages; 32- and 64-point
    # stages spill registers. So sizes between 256 and 4096 take an outer radix over 256-point
    # transforms, and 4096 and above run three radix-16 stages on chip.
    m = min(n if n <= 256 or n >= 4096 else 256, max_onchip, 4096)
    r = n // m
    if m >= 4096:
        # Three radix-16 (or 32 x 16 x 16) stages keep every matrix product at 16 wide.
        m1, p2 = m // 256, 16
    else:
        m1, p2 = 1 << ((m.bit_length() - 1 + 1) // 2), 1
    m2 = m // m1
    k1 = max(m1 // 2, 16) if r == 1 else m1
    c = max(1, tile // m)
    return n, r, m1, m2, p2, k1, c


@functools.lru_cache(maxsize=None)
def _tables(n: int, r: int, m1: int, m2: int, p2: int, device: torch.device) -> dict[str, torch.Tensor]:
    """DFT matrices and twiddles of one plan, computed in float64 and stored fp32: "tab" packs
    F_M1, W_M^(m2 k1) [M2, M1], F_P2, W_M2^(n3 k2) [P3, P2], F_P3 (real and imaginary planes, the
    order `_tab_offsets` reads); "otr"/"oti" the outer twiddles W_N^(r m) [R, M]; "wc"/"ws"
    cos/sin(2 pi a / R)."""
    m, p3 = m1 * m2, m2 // p2

    def w(a, b, den):  # W_den^(a b) = exp(-2 pi i a b / den), outer product of index vectors
        idx = torch.arange(a, dtype=torch.int64)[:, None] * torch.arange(b, dtype=torch.int64)[None, :]
        ang = 2 * math.pi * (idx % den).double() / den
        return [torch.cos(ang).flatten(), -torch.sin(ang).flatten()]

    parts = w(m1, m1, m1) + w(m2, m1, m) + w(p2, p2, p2) + w(p3, p2, m2) + w(p3, p3, p3)
    tabs = {"tab": torch.cat(parts).float()}
    tabs["otr"], tabs["oti"] = (t.float() for t in w(r, m, n))
    ang = 2 * math.pi * torch.arange(r, dtype=torch.float64) / r
    tabs["wc"], tabs["ws"] = torch.cos(ang).float(), torch.sin(ang).float()
    return device_constants(tabs, device)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # Interpreter: a few programs, enough to exercise the batch split and its atomics.
    return 2


def _launch_config(batch: int, dim: int, plan, device: torch.device, waves: int) -> tuple[int, int, int]:
    """(B_PER, n_bsplit, num_warps): programs loop over B_PER batch elements (reusing the filter
    spectra, and in the backward accumulating their gradient in registers) while `waves` programs
    per multiprocessor keep the GPU busy."""
    n, r, m1, m2, p2, k1, c = plan
    per_split = triton.cdiv(dim, c) * r
    nsplit = min(batch, max(1, triton.cdiv(waves * _num_sms(device), per_split)))
    b_per = triton.cdiv(batch, nsplit)
    nsplit = triton.cdiv(batch, b_per)
    tile = c * m1 * m2
    num_warps = NUM_WARPS or (4 if tile <= 1024 else 8)
    return b_per, nsplit, num_warps


def _out_dtype(*tensors) -> torch.dtype:
    """The inputs' promoted dtype (None entries skipped)."""
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors if t is not None])


def fftconv_fwd(u, x1, x2, v, k1r, k1i, d1, k2r, k2i, d2, plan) -> torch.Tensor:
    """Forward launcher. u, x1, x2, v: (B, D, L); k*r, k*i: fp32 spectra from `filter_spectrum`; d*: (D,).
    k2r/k2i/d2 None drop the residual convolution. Returns y: (B, D, L) in the inputs' dtype."""
    batch, dim, length = v.shape
    n, r, m1, m2, p2, k1, c = plan
    has_res = k2r is not None
    # The result's dtype is the inputs' promoted dtype, as in the reference (u may be fp32 while
    # x1, x2, v are bf16 under autocast); each input is read in its own dtype.
    out_dtype = _out_dtype(u, x1, x2, v)
    y = new_output((batch, dim, length), out_dtype, v.device)
    tabs = _tables(n, r, m1, m2, p2, v.device)
    b_per, nsplit, num_warps = _launch_config(batch, dim, plan, v.device, waves=8)
    m = m1 * m2
    if r > 1:
        sr = torch.empty((batch, dim, r, m), dtype=torch.float32, device=v.device)
        si = torch.empty_like(sr)
    else:
        sr = si = y
    uu = u if has_res else v
    grid = (triton.cdiv(dim, c), nsplit, r)
    _dft_conv_fwd_kernel[grid](
        uu, x1, x2, v, y, sr, si,
        k1r, k1i, k2r if has_res else k1r, k2i if has_res else k1i, d1, d2 if has_res else d1,
        tabs["tab"], tabs["otr"], tabs["oti"], tabs["wc"], tabs["ws"],
        batch, dim, length, b_per, *strides(uu, x1, x2, v, y),
        R=r, M1=m1, M2=m2, P2=p2, K1=k1, C=c, HAS_RES=has_res, PREC=transform_precision(v.dtype, plan), num_warps=num_warps,
        num_stages=1,
    )  # fmt: skip
    if r > 1:
        blk = min(m, 4096 // r)
        _fwd_combine_kernel[(m // blk, dim, batch)](
            sr, si, uu, x1, x2, v, y, d1, d2 if has_res else d1, tabs["wc"], tabs["ws"],
            dim, length, *strides(uu, x1, x2, v, y),
            R=r, M=m, BLK=blk, HAS_RES=has_res, num_warps=4,
        )  # fmt: skip
    return y


def fftconv_bwd(dy, u, x1, x2, v, k1r, k1i, d1, k2r, k2i, d2, plan):
    """Backward launcher: (du, dx1, dx2, dv, dk1r, dk1i, dd1, dk2r, dk2i, dd2); the residual's
    gradients are None without it. Spectrum gradients are fp32 in the spectra's layout."""
    batch, dim, length = v.shape
    n, r, m1, m2, p2, k1, c = plan
    m = m1 * m2
    has_res = k2r is not None
    dev = v.device
    grads = [new_output((batch, dim, length), t.dtype, dev) for t in ((u if has_res else v), x1, x2, v)]
    du, dx1, dx2, dv = grads
    tabs = _tables(n, r, m1, m2, p2, dev)
    b_per, nsplit, num_warps = _launch_config(batch, dim, plan, v.device, waves=4)
    atomic = nsplit > 1
    alloc = torch.zeros if atomic else torch.empty
    dk1r, dk1i = alloc(k1r.shape, dtype=torch.float32, device=dev), alloc(k1r.shape, dtype=torch.float32, device=dev)
    dk2r, dk2i = (alloc(k1r.shape, dtype=torch.float32, device=dev) for _ in range(2)) if has_res else (dk1r, dk1i)
    if r > 1:
        s1r, s1i = (torch.empty((batch, dim, r, m), dtype=torch.float32, device=dev) for _ in range(2))
        s2r, s2i = (torch.empty((batch, dim, r, m), dtype=torch.float32, device=dev) for _ in range(2)) if has_res else (s1r, s1i)
        # Per (batch row, channel block) scale of the packed inverse, read by the combine kernel.
        scale = torch.empty((batch, triton.cdiv(dim, c)), dtype=torch.float32, device=dev)
        blk = min(m, 4096 // r)
        dd1 = torch.empty((batch, m // blk, dim), dtype=torch.float32, device=dev)
    else:
        s1r = s1i = s2r = s2i = scale = dv
        dd1 = torch.empty((nsplit, dim, m2), dtype=torch.float32, device=dev)
    dd2 = torch.empty_like(dd1) if has_res else dd1
    uu = u if has_res else v
    _dft_conv_bwd_kernel[(triton.cdiv(dim, c), nsplit, r)](
        uu, x1, x2, v, dy, du, dx1, dx2, dv, s1r, s1i, s2r, s2i, scale, dd1, dd2,
        k1r, k1i, k2r if has_res else k1r, k2i if has_res else k1i, dk1r, dk1i, dk2r, dk2i,
        d1, d2 if has_res else d1,
        tabs["tab"], tabs["otr"], tabs["oti"], tabs["wc"], tabs["ws"],
        batch, dim, length, b_per, *strides(uu, x1, x2, v, dy),
        R=r, M1=m1, M2=m2, P2=p2, K1=k1, C=c, HAS_RES=has_res, ATOMIC=atomic,
        PREC=transform_precision(v.dtype, plan),
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    if r > 1:
        _bwd_combine_kernel[(m // blk, dim, batch)](
            s1r, s1i, s2r, s2i, scale, uu, x1, x2, v, dy, du, dx1, dx2, dv, dd1, dd2,
            d1, d2 if has_res else d1, tabs["wc"], tabs["ws"],
            dim, length, *strides(uu, x1, x2, v, dy),
            R=r, M=m, BLK=blk, C=c, HAS_RES=has_res, num_warps=4,
        )  # fmt: skip
    # Partial sums: [n_bsplit, D, M2] (R == 1) or [B, n_mblocks, D].
    sum_dims = (0, 2) if r == 1 else (0, 1)
    dd1 = dd1.sum(sum_dims).to(d1.dtype)
    if not has_res:
        return None, dx1, dx2, dv, dk1r, dk1i, dd1, None, None, None
    dd2 = dd2.sum(sum_dims).to(d2.dtype)
    return du, dx1, dx2, dv, dk1r, dk1i, dd1, dk2r, dk2i, dd2


def _rows_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """t with unit stride along L. The kernels take any strides, but a (B, D, L) view of a
    (B, L, D) tensor (the model's u, and the gradient coming back through its output's transpose)
    makes every load of a sequence a gather. A transposing copy costs two passes over the tensor;
    the gathers made the kernels 1.6x (forward) and 1.9x (backward) slower in an L=8192 model step
    on one H200 (engine profiles of two runs, before and after this copy)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _spectra(k1r, k1i, k2r, k2i):
    return [t.contiguous() if t is not None else None for t in (k1r, k1i, k2r, k2i)]


# The filters enter as spectra (see `filter_spectrum`); `plan` is `fft_plan`'s tuple. The residual
# branch is present iff k2r is given. Outputs are fresh contiguous tensors, as the fake
# implementations state to torch.compile.
@torch.library.custom_op("m2dist::fftconv", mutates_args=())
def fftconv(
    u: torch.Tensor | None, x1: torch.Tensor, x2: torch.Tensor, v: torch.Tensor,
    k1r: torch.Tensor, k1i: torch.Tensor, d1: torch.Tensor,
    k2r: torch.Tensor | None, k2i: torch.Tensor | None, d2: torch.Tensor | None, plan: list[int],
) -> torch.Tensor:  # fmt: skip
    u, x1, x2, v = map(_rows_contiguous, (u, x1, x2, v))
    k1r, k1i, k2r, k2i = _spectra(k1r, k1i, k2r, k2i)
    return fftconv_fwd(u, x1, x2, v, k1r, k1i, d1, k2r, k2i, d2, tuple(plan))


@fftconv.register_fake
def _(u, x1, x2, v, k1r, k1i, d1, k2r, k2i, d2, plan):
    return v.new_empty(v.shape, dtype=_out_dtype(u, x1, x2, v))


@torch.library.custom_op("m2dist::fftconv_backward", mutates_args=())
def fftconv_backward(
    dy: torch.Tensor, u: torch.Tensor | None, x1: torch.Tensor, x2: torch.Tensor, v: torch.Tensor,
    k1r: torch.Tensor, k1i: torch.Tensor, d1: torch.Tensor,
    k2r: torch.Tensor | None, k2i: torch.Tensor | None, d2: torch.Tensor | None, plan: list[int],
) -> list[torch.Tensor]:  # fmt: skip
    """[dx1, dx2, dv, dk1r, dk1i, dd1] and, with the residual branch, [du, dk2r, dk2i, dd2] after them."""
    u, x1, x2, v, dy = map(_rows_contiguous, (u, x1, x2, v, dy))
    k1r, k1i, k2r, k2i = _spectra(k1r, k1i, k2r, k2i)
    du, dx1, dx2, dv, dk1r, dk1i, dd1, dk2r, dk2i, dd2 = fftconv_bwd(
        dy, u, x1, x2, v, k1r, k1i, d1, k2r, k2i, d2, tuple(plan)
    )
    grads = [dx1, dx2, dv, dk1r, dk1i, dd1]
    return grads + [du, dk2r, dk2i, dd2] if k2r is not None else grads


@fftconv_backward.register_fake
def _(dy, u, x1, x2, v, k1r, k1i, d1, k2r, k2i, d2, plan):
    def like(t, dtype=None):
        return t.new_empty(t.shape, dtype=dtype or t.dtype)

    grads = [like(x1), like(x2), like(v), like(k1r, torch.float32), like(k1i, torch.float32), like(d1)]
    if k2r is not None:
        grads += [like(u), like(k2r, torch.float32), like(k2i, torch.float32), like(d2)]
    return grads


def _fftconv_setup_context(ctx, inputs, output):
    *tensors, plan = inputs
    # Saved as given: a strided u is the layer's input, which autograd keeps anyway; the backward
    # re-lays it out.
    ctx.save_for_backward(*tensors)
    ctx.plan = plan


def _fftconv_backward(ctx, dy):
    u, x1, x2, v, k1r, k1i, d1, k2r, k2i, d2 = ctx.saved_tensors
    # The transposed view of the (B, L, D) gradient, laid out outside the op, where a compiled
    # backward does it as a tiled transpose (see `triton_toeplitz._toeplitz_backward`).
    grads = fftconv_backward(_rows_contiguous(dy), u, x1, x2, v, k1r, k1i, d1, k2r, k2i, d2, ctx.plan)
    dx1, dx2, dv, dk1r, dk1i, dd1 = grads[:6]
    du, dk2r, dk2i, dd2 = grads[6:] if k2r is not None else (None, None, None, None)
    return du, dx1, dx2, dv, dk1r, dk1i, dd1, dk2r, dk2i, dd2, None


torch.library.register_autograd("m2dist::fftconv", _fftconv_backward, setup_context=_fftconv_setup_context)


def filter_spectrum(k_DN: torch.Tensor, length: int, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """FFT(k) / N of a (D, 2L) circular filter, re-laid out for the FFT size N >= 2L of `plan` (the
    taps keep their lags, so the convolution of the first L outputs is unchanged) and arranged in
    the kernels' frequency order. Returns (real, imaginary), each (D, R, M1, P2, M2 / P2) fp32;
    differentiable."""
    n, r, m1, m2, p2, _, _ = plan
    dim = k_DN.shape[0]
    k_DN = k_DN.float()
    if n != 2 * length:
        # Lags 0..L-1 stay at the front and lags -(L-1)..-1 at the back; index L is never used.
        gap = k_DN.new_zeros(dim, n - 2 * length + 1)
        k_DN = torch.cat([k_DN[:, :length], gap, k_DN[:, length + 1 :]], dim=-1)
    k_f = torch.fft.fft(k_DN, n=n) / n
    # Frequency r + R * (k1 + M1 * (k2 + P2 * k3)) goes to [r, k1, k2, k3] (k2 absent when P2 == 1).
    k_f = k_f.reshape(dim, m2 // p2, p2, m1, r).permute(0, 4, 3, 2, 1)
    return k_f.real.contiguous(), k_f.imag.contiguous()


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
    max_onchip: int = MAX_ONCHIP,
) -> torch.Tensor:
    """`y = (conv(v * x1; k1) + (v * x1) * d1) * x2 + conv(u; k2) + u * d2` through Triton.

    u_BDL, x1_BDL, x2_BDL, v_BDL: (B, D, L), fp32/bf16/fp16 (one dtype); k1_DN, k2_DN: (D, 2L)
    circular filters; d1_D, d2_D: (D,). k2/d2 None drop the residual convolution. Returns (B, D, L).
    Shapes, the length limit MAX_SEQLEN and the device are checked by the caller
    (`kernels.fftconv.gated_long_conv`). The gated inputs' dtype decides the transforms' precision:
    under autocast u is fp32 while the gates are bf16, and the 3-pass product would triple the
    transform's cost to keep digits the rest of the layer has already rounded away.
    `max_onchip` (a power of two >= 256) caps the on-chip transform; tests lower it to reach the
    outer-radix path at small L.
    """
    length = v_BDL.shape[-1]
    if max_onchip < 256 or max_onchip & (max_onchip - 1):
        raise ValueError(f"max_onchip must be a power of two >= 256, got {max_onchip}")
    plan = fft_plan(int(length), max_onchip, TILE)
    k1r, k1i = filter_spectrum(k1_DN, length, plan)
    k2r = k2i = None
    if k2_DN is not None:
        k2r, k2i = filter_spectrum(k2_DN, length, plan)
    return fftconv(
        u_BDL if k2_DN is not None else None, x1_BDL, x2_BDL, v_BDL, k1r, k1i, d1_D, k2r, k2i, d2_D, list(plan)
    )
