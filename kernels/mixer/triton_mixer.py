"""The whole M2 sequence mixer after `in_linear` as one Triton operator, forward and backward.

`reference.sequence_mixer` computes, from the projection p (B, L, 3D) and the mixer input u (B, L, D):

    [x1, x2, v] = causal 3-tap short convolution of p,  a = v * x1
    y = (conv(a; k1) + a * d1) * x2 + conv(u; k2) + u * d2          (B, L, D)

where conv is the circular convolution of size N = 2L of the zero-padded input, cut to L. Here one
program owns a block of BD channels of one sequence (forward) or of a run of sequences (backward),
in the (B, L, C) layout `in_linear` writes and `out_linear` reads: no transposes, no casts, no
concatenation around the op, and every intermediate but z1 (below) stays on chip.

The convolutions are computed as DFT matrix products on tensor cores, channels along the GEMMs'
N dimension. A real input of length L zero-padded to N = 2L has a half spectrum with exactly 2L
real degrees of freedom, packed into two (L, BD) tiles: R[f] = Re X[f] for f < L, and I[f] = Im X[f]
for 1 <= f < L with the real Nyquist bin X[L] in row 0 (Im X[0] = 0). With the (L, L) matrices

    Cf[f, s] = cos(2 pi f s / N),   Sf[f, s] = -sin(2 pi f s / N) (f >= 1),   Sf[0, s] = (-1)^s

the transform is R = Cf a, I = Sf a; the filter's half spectrum K = rfft(k) / N is packed the same
way (`packed_spectrum`), the product Y = X K is a complex product per bin (the Nyquist row real),
and since only the first L outputs are kept, the inverse is y = Cf^T W YR + Sf^T W YI with
W = diag(1, 2, ..., 2) (the conjugate half's bins). The backward is the same machinery transposed:
dK accumulates X^* G over the batch, dX = K^* G, da = Cf^T dR + Sf^T dI, with G the weighted
transform of the output gradient. The spectrum is computed in row blocks of BF frequencies, so
that a DFT operand tile stays within shared memory at any L.

Precision: the tensor cores take fp16 operands (`OPERAND_DTYPE`) with fp32 accumulation: the
DFT matrices, and each transform's input tile scaled per channel by a power of two (`_operand`),
so that the rounding is relative to the channel's largest value and small gradients keep their
digits. fp16's 11 significant bits matter for the matrices: their rounding is the same for every
sequence and channel and does not average out of the gradients summed over them (in bf16 it left
those 2-7x above torch's error; a bf16 high + low split held torch's error at 2.6x the products).
Everything else (short convolution, gates, skip terms, complex products, parameter-gradient sums)
stays fp32 on chip, with one rounding at each output.

FLOPs per token and channel, per DFT product: 2L. A convolution's forward takes 4 products (two
transforms, two inverses) and its backward 6 (the output gradient's and the input's transforms,
two inverses): 8 forward and 12 backward per mixer, 40 L FLOPs per token and channel (5.1k at
L=128). The op pays while L is small; `MAX_LEN` bounds what the dispatch sends here. The forward
keeps z1 = conv(a; k1) + a d1 (bf16) for the backward when a gradient is needed, which costs
2 x D h bytes per token beside the floor below and saves the backward 4 products and the
registers they hold.

HBM traffic per token (the floor the benchmark times against), with h the activations' bytes and
s u's: forward reads p (3D h) and u (D s) and writes y (D h); backward reads p, u and dy (D h) and
writes dp (3D h) and du (D s): (11 h + 3 s) D bytes per token for forward + backward.

Shape legend: B batch, L sequence length, D channels, C = 3D, BD channels per program, BF
frequencies per spectrum block, BPP sequences per backward program, NBP backward programs per
channel block.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.triton_common import INTERPRET, device_constants, new_output

# Longest L the dispatch sends to this operator (longer inputs take the per-op kernels): at L=256 an
# sm_90 compile of the kernels spills 0.3-1.5 KiB per thread (`compile_report`), at 128 little.
MAX_LEN = 128
# The shortest: tl.dot needs tiles of at least 16 rows.
MIN_LEN = 16
# The tensor cores' operand dtype. fp16 carries 11 significant bits to bf16's 8, which the DFT
# matrices need: their rounding is the same for every sequence and channel, so it does not average
# out of the gradients summed over them, and in bf16 it left those 2-7x above torch's error. Its
# range is covered by a power-of-two scale per channel of each operand tile (`_operand`).
OPERAND_DTYPE = torch.float16


def mixer_traffic_bytes(tokens: int, dim: int, act_bytes: int = 2, u_bytes: int = 4) -> dict[str, int]:
    """The minimal HBM traffic of the mixer in bytes (see the module docstring): forward reads p and
    u and writes y; backward also reads dy and writes dp and du."""
    forward = (3 * act_bytes + u_bytes + act_bytes) * dim * tokens
    backward = (3 * act_bytes + u_bytes + act_bytes + 3 * act_bytes + u_bytes) * dim * tokens
    return {"forward": forward, "forward_backward": forward + backward}


@functools.cache
def dft_matrices(length: int, device: torch.device) -> torch.Tensor:
    """(2, L, L) in `OPERAND_DTYPE`: [Cf, Sf], the packed half-spectrum transform of a length-L
    input zero-padded to 2L (module docstring)."""
    f = torch.arange(length, dtype=torch.float64)[:, None]
    s = torch.arange(length, dtype=torch.float64)[None, :]
    angle = 2 * math.pi * f * s / (2 * length)
    cos, sin = torch.cos(angle), -torch.sin(angle)
    sin[0] = torch.cos(math.pi * s[0])
    return device_constants({"dft": torch.stack([cos, sin]).to(OPERAND_DTYPE)}, device)["dft"]


@functools.cache
def _spectrum_matrix(length: int, device: torch.device) -> torch.Tensor:
    """(2L, 2L) fp32: a (2L,) filter's packed half spectrum / 2L as one matrix product (rows: Re K[f]
    for f < L; the real Nyquist K[L]; Im K[f] for 1 <= f < L)."""
    n = 2 * length
    f = torch.arange(length, dtype=torch.float64)[:, None]
    t = torch.arange(n, dtype=torch.float64)[None, :]
    angle = 2 * math.pi * f * t / n
    imag = -torch.sin(angle)
    imag[0] = torch.cos(math.pi * t[0])
    return device_constants({"spectrum": (torch.cat([torch.cos(angle), imag]) / n).float()}, device)["spectrum"]


def packed_spectrum(k_DN: torch.Tensor) -> torch.Tensor:
    """(2, L, D) fp32: the (D, 2L) circular filter's half spectrum / 2L in the operator's packing,
    [Re K[0..L-1]; Nyquist K[L], Im K[1..L-1]] (differentiable). One fp32 matrix product (also under
    autocast), not an rfft and the copies of its packing: a launch per filter, not six."""
    dim, n = k_DN.shape
    with torch.autocast(k_DN.device.type, enabled=False):
        return (_spectrum_matrix(n // 2, k_DN.device) @ k_DN.float().t()).view(2, n // 2, dim)


@triton.jit
def _round(x, DT: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 x rounded to DT (to nearest even), in fp32. Triton's interpreter truncates fp32 -> bf16,
    so there (UPCAST) the rounding is done on the bits."""
    if UPCAST and DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(DT).to(tl.float32)


@triton.jit
def _up(x, DT: tl.constexpr, UPCAST: tl.constexpr):
    """x rounded to the tensor-core dtype DT (UPCAST: carried in fp32, for Triton's interpreter,
    whose half-precision dot is not exact)."""
    x = _round(x, DT, UPCAST)
    if not UPCAST:
        x = x.to(DT)
    return x


@triton.jit
def _taps(p_ptr, row0, o_t, cols, m_c, L: tl.constexpr, C):
    """(p[t - 2], p[t - 1], p[t]) at the columns `cols` of sequence row0 (zero before t = 0), fp32."""
    m = m_c[None, :]
    p = p_ptr + row0 * C + (o_t[:, None] * C + cols[None, :])
    p0 = tl.load(p - 2 * C, mask=m & (o_t[:, None] >= 2), other=0.0).to(tl.float32)
    p1 = tl.load(p - C, mask=m & (o_t[:, None] >= 1), other=0.0).to(tl.float32)
    p2 = tl.load(p, mask=m, other=0.0).to(tl.float32)
    return p0, p1, p2


@triton.jit
def _short_conv(p_ptr, w_ptr, b_ptr, row0, o_t, cols, m_c, L: tl.constexpr, C):
    """The causal short convolution at `cols`, fp32 (not rounded: it never leaves the chip)."""
    p0, p1, p2 = _taps(p_ptr, row0, o_t, cols, m_c, L, C)
    w0 = tl.load(w_ptr + cols * 3, mask=m_c, other=0.0)
    w1 = tl.load(w_ptr + cols * 3 + 1, mask=m_c, other=0.0)
    w2 = tl.load(w_ptr + cols * 3 + 2, mask=m_c, other=0.0)
    bias = tl.load(b_ptr + cols, mask=m_c, other=0.0)
    return bias[None, :] + p0 * w0[None, :] + p1 * w1[None, :] + p2 * w2[None, :]


@triton.jit
def _gates(p_ptr, w_ptr, b_ptr, row0, o_t, o_c, m_c, D, L: tl.constexpr):
    """(x1, x2, v): the short convolution's three (L, BD) fp32 tiles at channels o_c of sequence row0."""
    C = 3 * D
    x1 = _short_conv(p_ptr, w_ptr, b_ptr, row0, o_t, o_c, m_c, L, C)
    x2 = _short_conv(p_ptr, w_ptr, b_ptr, row0, o_t, D + o_c, m_c, L, C)
    v = _short_conv(p_ptr, w_ptr, b_ptr, row0, o_t, 2 * D + o_c, m_c, L, C)
    return x1, x2, v


@triton.jit
def _dft_block(dft_ptr, f0, L: tl.constexpr, BF: tl.constexpr, UPCAST: tl.constexpr):
    """Rows f0..f0+BF of (Cf, Sf), (BF, L) each, in their stored dtype (fp32 under UPCAST)."""
    o_f = f0 + tl.arange(0, BF)
    p = dft_ptr + o_f[:, None] * L + tl.arange(0, L)[None, :]
    cf, sf = tl.load(p), tl.load(p + L * L)
    if UPCAST:
        cf, sf = cf.to(tl.float32), sf.to(tl.float32)
    return cf, sf


@triton.jit
def _operand(x, MT: tl.constexpr, UPCAST: tl.constexpr):
    """An fp32 (R, BD) tile as a tensor-core operand in MT: (x / s rounded to MT, s) with s the
    power of two at or above each column's largest magnitude, so that the rounding is relative to
    the column's scale and no column leaves MT's range (gradients 1e-5 of the activations, say)."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-30)  # an all-zero column: any scale
    scale = tl.exp2(tl.ceil(tl.log2(amax)))
    return _up(x * (1.0 / scale)[None, :], MT, UPCAST), scale


@triton.jit
def _mm(m, x_op, x_scale):
    """m @ (x_op * x_scale): a DFT block times a scaled operand (`_operand`), fp32."""
    return tl.dot(m, x_op) * x_scale[None, :]


@triton.jit
def _spectrum_tiles(k_ptr, f0, o_c, m_c, D, L: tl.constexpr, BF: tl.constexpr):
    """The packed (BF, BD) tiles (re, im) of a (2, L, D) fp32 spectrum at rows f0..f0+BF."""
    p = (f0 + tl.arange(0, BF))[:, None] * D + o_c[None, :]
    m = m_c[None, :]
    return tl.load(k_ptr + p, mask=m, other=0.0), tl.load(k_ptr + L * D + p, mask=m, other=0.0)


@triton.jit
def _times(xr, xi, kr, ki, nyquist):
    """The packed complex product X K (rows flagged `nyquist` hold the real DC and Nyquist bins)."""
    return xr * kr - tl.where(nyquist, 0.0, xi * ki), tl.where(nyquist, xi * ki, xr * ki + xi * kr)


@triton.jit
def _times_conj(gr, gi, kr, ki, nyquist):
    """The packed product G K^* (the adjoint of `_times` in X for fixed K, and in K for fixed X)."""
    return gr * kr + tl.where(nyquist, 0.0, gi * ki), tl.where(nyquist, gi * ki, gi * kr - gr * ki)


@triton.jit
def _conv(x, k_ptr, dft_ptr, o_c, m_c, D, L: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
          UPCAST: tl.constexpr):  # fmt: skip
    """conv(x; k) for an (L, BD) fp32 tile x: (L, BD) fp32. Four DFT products per spectrum block:
    two forward, two inverse."""
    MT: tl.constexpr = dft_ptr.dtype.element_ty
    x_op, x_scale = _operand(x, MT, UPCAST)
    out = tl.zeros([L, BD], dtype=tl.float32)
    for f0 in range(0, L, BF):
        cf, sf = _dft_block(dft_ptr, f0, L, BF, UPCAST)
        kr, ki = _spectrum_tiles(k_ptr, f0, o_c, m_c, D, L, BF)
        o_f = f0 + tl.arange(0, BF)
        yr, yi = _times(_mm(cf, x_op, x_scale), _mm(sf, x_op, x_scale), kr, ki, (o_f == 0)[:, None])
        weight = tl.where(o_f == 0, 1.0, 2.0)[:, None]
        out = _inverse(cf, yr * weight, out, MT, UPCAST)
        out = _inverse(sf, yi * weight, out, MT, UPCAST)
    return out


@triton.jit
def _inverse(m, y, acc, MT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + M^T y for a (BF, L) DFT block M and an fp32 (BF, BD) spectrum block y (an MT operand)."""
    y_op, y_scale = _operand(y, MT, UPCAST)
    return acc + _mm(tl.trans(m), y_op, y_scale)


@triton.jit
def _conv_backward(x, g, skip, k_ptr, gk_ptr, dft_ptr, o_c, m_c, D, L: tl.constexpr, BF: tl.constexpr,
                   BD: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """For out = conv(x; k) + x * skip and its gradient g ((L, BD) fp32): returns dx (L, BD) fp32
    and adds dK, in the packed layout, to the (2, L, D) fp32 tensor at gk_ptr. Six DFT products per
    spectrum block. x and g are dead once they are operands (the backward is bound by registers)."""
    MT: tl.constexpr = dft_ptr.dtype.element_ty
    x_op, x_scale = _operand(x, MT, UPCAST)
    g_op, g_scale = _operand(g, MT, UPCAST)
    dx = g * skip[None, :]
    for f0 in range(0, L, BF):
        cf, sf = _dft_block(dft_ptr, f0, L, BF, UPCAST)
        kr, ki = _spectrum_tiles(k_ptr, f0, o_c, m_c, D, L, BF)
        o_f = f0 + tl.arange(0, BF)
        nyquist = (o_f == 0)[:, None]
        weight = tl.where(o_f == 0, 1.0, 2.0)[:, None]
        gr = _mm(cf, g_op, g_scale) * weight
        gi = _mm(sf, g_op, g_scale) * weight
        dkr, dki = _times_conj(gr, gi, _mm(cf, x_op, x_scale), _mm(sf, x_op, x_scale), nyquist)
        p = o_f[:, None] * D + o_c[None, :]
        m = m_c[None, :]
        tl.store(gk_ptr + p, tl.load(gk_ptr + p, mask=m, other=0.0) + dkr, mask=m)
        tl.store(gk_ptr + L * D + p, tl.load(gk_ptr + L * D + p, mask=m, other=0.0) + dki, mask=m)
        # The next sequence's load of these sums may fall to other threads of the program.
        tl.debug_barrier()
        dxr, dxi = _times_conj(gr, gi, kr, ki, nyquist)
        dx = _inverse(cf, dxr, dx, MT, UPCAST)
        dx = _inverse(sf, dxi, dx, MT, UPCAST)
    return dx


@triton.jit
def _mixer_fwd_kernel(
    p_ptr, w_ptr, b_ptr, u_ptr, k1_ptr, d1_ptr, k2_ptr, d2_ptr, dft_ptr, y_ptr, z1_ptr,
    B, D,
    HAS_RES: tl.constexpr, SAVE_Z1: tl.constexpr, UPCAST: tl.constexpr,
    L: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """y for channel block i_c of sequence i_b; with SAVE_Z1 also z1 = conv(a; k1) + a d1 (rounded
    to the activations' dtype, for the backward)."""
    DT: tl.constexpr = y_ptr.dtype.element_ty
    i_c, i_b = tl.program_id(0), tl.program_id(1)
    o_t = tl.arange(0, L)
    o_c = i_c * BD + tl.arange(0, BD)
    m_c = o_c < D
    row0 = tl.cast(i_b, tl.int64) * L  # int64: offsets past 2^31 at large batches
    x1, x2, v = _gates(p_ptr, w_ptr, b_ptr, row0, o_t, o_c, m_c, D, L)
    a = v * x1
    d1 = tl.load(d1_ptr + o_c, mask=m_c, other=0.0)
    z1 = _conv(a, k1_ptr, dft_ptr, o_c, m_c, D, L, BF, BD, UPCAST) + a * d1[None, :]
    p_out = row0 * D + (o_t[:, None] * D + o_c[None, :])
    m_out = m_c[None, :]
    if SAVE_Z1:
        tl.store(z1_ptr + p_out, _round(z1, DT, UPCAST).to(DT), mask=m_out)
    y = z1 * x2
    if HAS_RES:
        u = tl.load(u_ptr + p_out, mask=m_out, other=0.0).to(tl.float32)
        d2 = tl.load(d2_ptr + o_c, mask=m_c, other=0.0)
        y += _conv(u, k2_ptr, dft_ptr, o_c, m_c, D, L, BF, BD, UPCAST) + u * d2[None, :]
    tl.store(y_ptr + p_out, _round(y, DT, UPCAST).to(DT), mask=m_out)


@triton.jit
def _shifted(x, by: tl.constexpr, o_t, L: tl.constexpr):
    """x[t + by] along the rows of an (L, BD) tile, zero past the end."""
    rows = tl.minimum(o_t + by, L - 1)[:, None] + tl.zeros_like(x).to(tl.int32)
    return tl.where((o_t + by < L)[:, None], tl.gather(x, rows, axis=0), 0.0)


@triton.jit
def _short_conv_backward(dx, p_ptr, w_ptr, dp_ptr, row0, o_t, cols, m_c, L: tl.constexpr, C, UPCAST: tl.constexpr):
    """Writes dp at `cols` for the short convolution's output gradient dx (L, BD) fp32; returns the
    partial sums (dw0, dw1, dw2, db) over the tile, (BD,) each."""
    DT: tl.constexpr = dp_ptr.dtype.element_ty
    w0 = tl.load(w_ptr + cols * 3, mask=m_c, other=0.0)
    w1 = tl.load(w_ptr + cols * 3 + 1, mask=m_c, other=0.0)
    w2 = tl.load(w_ptr + cols * 3 + 2, mask=m_c, other=0.0)
    dp = dx * w2[None, :] + _shifted(dx, 1, o_t, L) * w1[None, :] + _shifted(dx, 2, o_t, L) * w0[None, :]
    p_out = row0 * C + (o_t[:, None] * C + cols[None, :])
    tl.store(dp_ptr + p_out, _round(dp, DT, UPCAST).to(DT), mask=m_c[None, :])
    p0, p1, p2 = _taps(p_ptr, row0, o_t, cols, m_c, L, C)
    return tl.sum(dx * p0, axis=0), tl.sum(dx * p1, axis=0), tl.sum(dx * p2, axis=0), tl.sum(dx, axis=0)


@triton.jit
def _store_short_grads(dw_ptr, db_ptr, i_pb, cols, m_c, C, dw0, dw1, dw2, db):
    base = i_pb * 3 * C
    tl.store(dw_ptr + base + cols, dw0, mask=m_c)
    tl.store(dw_ptr + base + C + cols, dw1, mask=m_c)
    tl.store(dw_ptr + base + 2 * C + cols, dw2, mask=m_c)
    tl.store(db_ptr + i_pb * C + cols, db, mask=m_c)


@triton.jit
def _bwd_gated_kernel(
    dy_ptr, p_ptr, w_ptr, b_ptr, z1_ptr, k1_ptr, d1_ptr, dft_ptr, dp_ptr, dk1_ptr, dd1_ptr, dw_ptr, db_ptr,
    B, D, BPP,
    UPCAST: tl.constexpr, L: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """The gated branch's backward for sequences i_pb * BPP ... of channel block i_c, from the
    forward's z1: dp in place;
    the parameter gradients as this program's partial sums at row i_pb of the (NBP, ...) partial
    tensors (dk1: (NBP, 2, L, D), zeroed by the caller; dd1: (NBP, D); dw: (NBP, 3, C); db: (NBP, C)).
    Ordered so that each tile dies early: the backward is bound by registers."""
    i_c, i_pb = tl.program_id(0), tl.program_id(1)
    C = 3 * D
    o_t = tl.arange(0, L)
    o_c = i_c * BD + tl.arange(0, BD)
    m_c = o_c < D
    d1 = tl.load(d1_ptr + o_c, mask=m_c, other=0.0)
    dk1_part = dk1_ptr + i_pb * 2 * L * D
    zero = tl.zeros([BD], dtype=tl.float32)
    dd1 = zero
    dw10, dw11, dw12, db1 = zero, zero, zero, zero
    dw20, dw21, dw22, db2 = zero, zero, zero, zero
    dwv0, dwv1, dwv2, dbv = zero, zero, zero, zero
    for b in range(i_pb * BPP, tl.minimum(B, (i_pb + 1) * BPP)):
        row0 = tl.cast(b, tl.int64) * L
        x1, x2, v = _gates(p_ptr, w_ptr, b_ptr, row0, o_t, o_c, m_c, D, L)
        a = v * x1
        p_out = row0 * D + (o_t[:, None] * D + o_c[None, :])
        z1 = tl.load(z1_ptr + p_out, mask=m_c[None, :], other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + p_out, mask=m_c[None, :], other=0.0).to(tl.float32)
        s0, s1, s2, sb = _short_conv_backward(dy * z1, p_ptr, w_ptr, dp_ptr, row0, o_t, D + o_c, m_c, L, C, UPCAST)
        dw20, dw21, dw22, db2 = dw20 + s0, dw21 + s1, dw22 + s2, db2 + sb
        dz1 = dy * x2
        dd1 += tl.sum(dz1 * a, axis=0)
        da = _conv_backward(a, dz1, d1, k1_ptr, dk1_part, dft_ptr, o_c, m_c, D, L, BF, BD, UPCAST)
        # x1 and v again from the projection (cache hits), not kept alive through the transforms
        x1 = _short_conv(p_ptr, w_ptr, b_ptr, row0, o_t, o_c, m_c, L, C)
        s0, s1, s2, sb = _short_conv_backward(da * x1, p_ptr, w_ptr, dp_ptr, row0, o_t, 2 * D + o_c, m_c, L, C, UPCAST)
        dwv0, dwv1, dwv2, dbv = dwv0 + s0, dwv1 + s1, dwv2 + s2, dbv + sb
        v = _short_conv(p_ptr, w_ptr, b_ptr, row0, o_t, 2 * D + o_c, m_c, L, C)
        s0, s1, s2, sb = _short_conv_backward(da * v, p_ptr, w_ptr, dp_ptr, row0, o_t, o_c, m_c, L, C, UPCAST)
        dw10, dw11, dw12, db1 = dw10 + s0, dw11 + s1, dw12 + s2, db1 + sb
    _store_short_grads(dw_ptr, db_ptr, i_pb, o_c, m_c, C, dw10, dw11, dw12, db1)
    _store_short_grads(dw_ptr, db_ptr, i_pb, D + o_c, m_c, C, dw20, dw21, dw22, db2)
    _store_short_grads(dw_ptr, db_ptr, i_pb, 2 * D + o_c, m_c, C, dwv0, dwv1, dwv2, dbv)
    tl.store(dd1_ptr + i_pb * D + o_c, dd1, mask=m_c)


@triton.jit
def _bwd_residual_kernel(
    dy_ptr, u_ptr, k2_ptr, d2_ptr, dft_ptr, du_ptr, dk2_ptr, dd2_ptr,
    B, D, BPP,
    UPCAST: tl.constexpr, L: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """The residual convolution's backward for the same programs as `_bwd_gated_kernel`: du in
    place, dk2 and dd2 as partial sums."""
    DU: tl.constexpr = du_ptr.dtype.element_ty
    i_c, i_pb = tl.program_id(0), tl.program_id(1)
    o_t = tl.arange(0, L)
    o_c = i_c * BD + tl.arange(0, BD)
    m_c = o_c < D
    m_out = m_c[None, :]
    d2 = tl.load(d2_ptr + o_c, mask=m_c, other=0.0)
    dk2_part = dk2_ptr + i_pb * 2 * L * D
    dd2 = tl.zeros([BD], dtype=tl.float32)
    for b in range(i_pb * BPP, tl.minimum(B, (i_pb + 1) * BPP)):
        p_out = tl.cast(b, tl.int64) * L * D + (o_t[:, None] * D + o_c[None, :])
        dy = tl.load(dy_ptr + p_out, mask=m_out, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + p_out, mask=m_out, other=0.0).to(tl.float32)
        dd2 += tl.sum(dy * u, axis=0)
        du = _conv_backward(u, dy, d2, k2_ptr, dk2_part, dft_ptr, o_c, m_c, D, L, BF, BD, UPCAST)
        tl.store(du_ptr + p_out, _round(du, DU, UPCAST).to(DU), mask=m_out)
    tl.store(dd2_ptr + i_pb * D + o_c, dd2, mask=m_c)


# Block sizes (BD, BF, BPP, num_warps) that replace the autotuned choice (tools/bench_kernels.py
# --mixer-variants sweeps them).
BLOCKS: dict[str, int] | None = None
# The autotuner's candidates (BD channels per program, BF spectrum rows per block, warps). The
# kernels are bound by registers: an sm_90 compile at L=128 (`compile_report`) spills nothing in the
# forward and the residual backward with 16 or 32 channels and 8 warps, while the gated backward
# (three gates' gradients beside the transforms) spills ~250 B a thread at 16 channels and 8 warps
# and 2-5 KiB with 32 channels or 4 warps.
_TUNING = [(16, 16, 8), (16, 32, 8), (32, 16, 8), (32, 32, 8)]
_TUNING_GATED_BACKWARD = [(16, 16, 8), (16, 32, 8), (16, 16, 4)]
# Triton's interpreter cannot time candidates: it runs fixed blocks.
FIXED_BLOCKS = {"BD": 16, "BF": 16, "num_warps": 4} if INTERPRET else None


def _sequences_per_program(batch: int) -> int:
    """BPP: runs of up to 8 sequences per backward program, fewer for small batches, so that a
    (768 channels, 256 sequences) batch gives 768 programs and a batch of 16 gives 384."""
    if INTERPRET and BLOCKS is None:
        return 2
    if BLOCKS is not None:
        return BLOCKS["BPP"]
    return max(1, min(8, batch // 32))


def _drop_blocks_longer_than_the_input(configs, named_args, **kwargs):
    length = kwargs.get("L", named_args.get("L"))
    kept = [c for c in configs if c.kwargs["BF"] <= length]
    return kept or [triton.Config({"BD": 16, "BF": length}, num_warps=4)]


def _tuned(kernel, key, candidates=None, **options):
    configs = [triton.Config({"BD": bd, "BF": bf}, num_warps=warps) for bd, bf, warps in candidates or _TUNING]
    prune = {"early_config_prune": _drop_blocks_longer_than_the_input}
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune, **options)(kernel)


_fwd_tuned = _tuned(_mixer_fwd_kernel, key=["B", "D", "L", "HAS_RES"])
# The filter-gradient partials are accumulated in place: zeroed before each timed trial.
_bwd_gated_tuned = _tuned(
    _bwd_gated_kernel, key=["B", "D", "BPP", "L"], candidates=_TUNING_GATED_BACKWARD, reset_to_zero=["dk1_ptr"]
)
_bwd_residual_tuned = _tuned(_bwd_residual_kernel, key=["B", "D", "BPP", "L"], reset_to_zero=["dk2_ptr"])


def _launch(tuned, kernel, dim, grid_rows, length, *args, **constexprs):
    """The autotuned kernel on a GPU, the fixed blocks of `BLOCKS` or of the interpreter otherwise,
    on a grid of (channel blocks of `dim`, grid_rows)."""
    fixed = BLOCKS if BLOCKS is not None else FIXED_BLOCKS
    if fixed is None:
        tuned[lambda meta: (triton.cdiv(dim, meta["BD"]), grid_rows)](*args, L=length, **constexprs)
        return
    bf = min(fixed["BF"], length)
    kernel[(triton.cdiv(dim, fixed["BD"]), grid_rows)](
        *args, L=length, BF=bf, BD=fixed["BD"], num_warps=fixed["num_warps"], **constexprs
    )


def supports(projected_BLC: torch.Tensor) -> bool:
    """Whether the operator takes the input: bf16/fp16, L a power of two in [MIN_LEN, MAX_LEN], on a
    GPU or in Triton's interpreter."""
    length = projected_BLC.shape[1]
    return (
        projected_BLC.dtype in (torch.bfloat16, torch.float16)
        and MIN_LEN <= length <= MAX_LEN
        and length & (length - 1) == 0
        and (projected_BLC.device.type == "cuda" or INTERPRET)
    )


# The residual branch is present iff k2 is given; spectra are packed (2, L, D) fp32 tensors.
@torch.library.custom_op("m2dist::sequence_mixer", mutates_args=())
def sequence_mixer_op(
    p: torch.Tensor, w: torch.Tensor, b: torch.Tensor, u: torch.Tensor, k1: torch.Tensor, d1: torch.Tensor,
    k2: torch.Tensor | None, d2: torch.Tensor | None, save_z1: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y, z1): y (B, L, D) in p's dtype, from p (B, L, 3D), the short filter w (3D, 3) and b (3D,),
    u (B, L, D); with `save_z1` the gated convolution before the post-gate (B, L, D) for the
    backward (else an empty tensor)."""
    batch, length, width = p.shape
    dim = width // 3
    has_res = k2 is not None
    dft = dft_matrices(length, p.device)
    p, u = p.contiguous(), u.contiguous()
    w, b, k1, d1 = (t.float().contiguous() for t in (w, b, k1, d1))
    k2, d2 = (k2.float().contiguous(), d2.float().contiguous()) if has_res else (k1, d1)
    y = new_output((batch, length, dim), p.dtype, p.device)
    z1 = new_output((batch, length, dim), p.dtype, p.device) if save_z1 else p.new_empty(0)
    _launch(
        _fwd_tuned, _mixer_fwd_kernel, dim, batch, length, p, w, b, u, k1, d1, k2, d2, dft, y, z1 if save_z1 else y, batch, dim,
        HAS_RES=has_res, SAVE_Z1=save_z1, UPCAST=INTERPRET,
    )  # fmt: skip
    return y, z1


@sequence_mixer_op.register_fake
def _(p, w, b, u, k1, d1, k2, d2, save_z1):
    shape = (p.shape[0], p.shape[1], p.shape[2] // 3)
    return p.new_empty(shape), p.new_empty(shape if save_z1 else (0,))


@torch.library.custom_op("m2dist::sequence_mixer_backward", mutates_args=())
def sequence_mixer_backward(
    dy: torch.Tensor, p: torch.Tensor, w: torch.Tensor, b: torch.Tensor, u: torch.Tensor, z1: torch.Tensor,
    k1: torch.Tensor, d1: torch.Tensor, k2: torch.Tensor | None, d2: torch.Tensor | None,
) -> list[torch.Tensor]:  # fmt: skip
    """[dp, dw, db, dk1, dd1] and, with the residual branch, [du, dk2, dd2]; each in its input's dtype."""
    batch, length, width = p.shape
    dim = width // 3
    has_res = k2 is not None
    bpp = _sequences_per_program(batch)
    dft = dft_matrices(length, p.device)
    dy, p, u, z1 = dy.contiguous(), p.contiguous(), u.contiguous(), z1.contiguous()
    wf, bf, k1f, d1f = (t.float().contiguous() for t in (w, b, k1, d1))
    k2f, d2f = (k2.float().contiguous(), d2.float().contiguous()) if has_res else (None, None)
    n_pb = triton.cdiv(batch, bpp)
    dp = new_output(p.shape, p.dtype, p.device)
    dk1 = torch.zeros((n_pb, 2, length, dim), dtype=torch.float32, device=p.device)
    dd1 = new_output((n_pb, dim), torch.float32, p.device)
    dw = new_output((n_pb, 3, width), torch.float32, p.device)
    db = new_output((n_pb, width), torch.float32, p.device)
    _launch(
        _bwd_gated_tuned, _bwd_gated_kernel, dim, n_pb, length,
        dy, p, wf, bf, z1, k1f, d1f, dft, dp, dk1, dd1, dw, db, batch, dim, bpp, UPCAST=INTERPRET,
    )  # fmt: skip
    if has_res:
        du = new_output(u.shape, u.dtype, u.device)
        dk2 = torch.zeros((n_pb, 2, length, dim), dtype=torch.float32, device=p.device)
        dd2 = new_output((n_pb, dim), torch.float32, p.device)
        _launch(
            _bwd_residual_tuned, _bwd_residual_kernel, dim, n_pb, length,
            dy, u, k2f, d2f, dft, du, dk2, dd2, batch, dim, bpp, UPCAST=INTERPRET,
        )  # fmt: skip
    grads = [dp, dw.sum(0).t().contiguous().to(w.dtype), db.sum(0).to(b.dtype), dk1.sum(0).to(k1.dtype), dd1.sum(0).to(d1.dtype)]
    if has_res:
        grads += [du, dk2.sum(0).to(k2.dtype), dd2.sum(0).to(d2.dtype)]
    return grads


@sequence_mixer_backward.register_fake
def _(dy, p, w, b, u, z1, k1, d1, k2, d2):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (p, w, b, k1, d1)]
    if k2 is not None:
        grads += [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (u, k2, d2)]
    return grads


def _setup_context(ctx, inputs, output):
    p, w, b, u, k1, d1, k2, d2, _ = inputs
    ctx.save_for_backward(p, w, b, u, output[1], k1, d1, k2, d2)


def _backward(ctx, dy, _dz1):
    p, w, b, u, z1, k1, d1, k2, d2 = ctx.saved_tensors
    grads = sequence_mixer_backward(dy, p, w, b, u, z1, k1, d1, k2, d2)
    dp, dw, db, dk1, dd1 = grads[:5]
    du, dk2, dd2 = grads[5:] if k2 is not None else (None, None, None)
    return dp, dw, db, du, dk1, dd1, dk2, dd2, None


torch.library.register_autograd("m2dist::sequence_mixer", _backward, setup_context=_setup_context)


def sequence_mixer(projected_BLC, short_weight_C1K, short_bias_C, u_BLD, k1_DN, d1_D, k2_DN=None, d2_D=None):
    """`reference.sequence_mixer` as one operator: projected_BLC (B, L, 3D) in bf16 or fp16, u_BLD
    (B, L, D) in any float dtype (rounded to the projection's for the tensor cores, not in its skip
    term); returns (B, L, D) in the projection's dtype. The caller (`kernels.mixer`) checks shapes
    and `supports`."""
    if not supports(projected_BLC):
        raise ValueError(
            f"the fused mixer takes bf16/fp16 projections with L a power of two in [{MIN_LEN}, {MAX_LEN}], "
            f"got {projected_BLC.dtype} L={projected_BLC.shape[1]}"
        )
    width = short_weight_C1K.shape[0]
    w_C3 = short_weight_C1K.reshape(width, short_weight_C1K.shape[-1])
    has_res = k2_DN is not None
    k1 = packed_spectrum(k1_DN)
    k2 = packed_spectrum(k2_DN) if has_res else None
    inputs = (projected_BLC, w_C3, short_bias_C, u_BLD, k1, d1_D, k2, d2_D)
    save_z1 = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return sequence_mixer_op(*inputs, save_z1)[0]


# The activations' dtypes of a compile report's kernels, by argument name (everything else fp32).
_REPORT_DTYPES = {"p_ptr": "bf16", "dy_ptr": "bf16", "y_ptr": "bf16", "z1_ptr": "bf16", "dp_ptr": "bf16", "dft_ptr": "fp16"}


def compile_report(length: int = 128, block: tuple[int, int, int] = _TUNING[0], arch: int = 90) -> dict[str, dict]:
    """The three kernels' registers, spills and shared memory (`kernels.compile_report.resources`)
    compiled for sm_`arch` at one block choice (BD, BF, num_warps), bf16 activations and fp32 u:
    {"forward" | "backward gated" | "backward residual": {...}}."""
    from kernels.compile_report import resources

    block_d, block_f, warps = block
    constexprs = {
        "HAS_RES": True, "SAVE_Z1": True, "UPCAST": False,
        "L": length, "BF": block_f, "BD": block_d,
    }  # fmt: skip
    kernels = {"forward": _mixer_fwd_kernel, "backward gated": _bwd_gated_kernel, "backward residual": _bwd_residual_kernel}
    return {name: resources(kernel, constexprs, _REPORT_DTYPES, warps, arch=arch) for name, kernel in kernels.items()}
