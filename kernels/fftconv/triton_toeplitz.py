"""Direct path of the gated bidirectional long convolution, for bf16/fp16 inputs up to moderate L.

The circular convolution of size N = 2L of a zero-padded length-L input, cut to L, is a product
with the L x L Toeplitz matrix `T[t, s] = K[(t - s) mod N]`: per channel, the batch of sequences
times T is a GEMM. For short sequences that GEMM on tensor cores moves and computes less than the
transform pair (an FFT of size 2L does ~10 passes over twice the data in fp32), so it wins up to
the length where the O(L) work per element overtakes the O(log L) of the FFT (`MAX_LEN`, measured
on an H200; longer inputs take the FFT kernels of `triton_fftconv`).

- Filter rows: a small kernel rotates each fp32 filter row K by L (R[j] = K[(j - L) mod N], so
  that T[t, s] = R[t - s + L]) once per call, in the form the tensor cores take (`OPERANDS`):
  "fp16", R scaled by a power of two into fp16's range (11 significant bits), or "split", a high
  and a low part in the activations' dtype (~16 bits, two products per block); the forward keeps
  the rows for the backward.
- Forward: one program per (channel, block of BT output positions, group of BPG sequences). It
  reads the filter tiles of all L inputs by its BT outputs from the rows once and runs them over
  its sequences BB at a time (one GEMM with K = L per block, or two with "split"); fp32
  accumulation. The activations enter the tensor cores as torch's path rounds them (bf16 or
  fp16); with "fp16" operands each sequence's row is first scaled by a power of two to at most 1,
  which bf16 values survive exactly, and the product is scaled back.
  Building the tiles costs about as much as a block's products, hence the groups. The gating, both
  skip terms, the post-gate and the residual convolution are fused; the gated conv output z1 is
  kept for the backward. The gated branch's inputs come packed, x = [x1; x2; v] (B, 3D, L), as the
  short convolution writes them.
- Backward, activations: the same GEMM with T transposed, per block of input positions; writes the
  packed gradient [dx1; dx2; dv], du, and per-program partial sums of the skip-weight gradients,
  which a finishing kernel adds up with the filter gradients' lag sums below.
- Backward, filters: dK[j] = sum over (b, t - s = j mod N) of ga[b, t] a[b, s]. A program owns one
  diagonal of the (t block, s block) grid, where every tile has the same lags, so it accumulates
  `ga[:, t block]^T a[:, s block]` (a GEMM over the batch) over the whole diagonal and reduces the
  tile along its diagonals once at the end (a skew with `tl.gather`, then column sums).

Shape legend: B batch, D channels, C = 3D the packed gated inputs, L sequence length (LP: the next
power of two), N = 2L the circular filter length; BB, BT, BS block sizes along batch, output time and
input time; BPG sequences per program; BLK the tile of the filter-gradient kernel.
"""

import torch
import triton
import triton.language as tl

from kernels.fftconv.triton_fftconv import unit_scale
from kernels.triton_common import INTERPRET, new_output

# How the filter enters the tensor cores: "fp16" (one product per block; the filter row and each
# sequence's activations scaled by powers of two into fp16's range, 11 significant bits) or
# "split" (the filter as high and low parts in the activations' dtype, ~16 bits, two products).
OPERAND_MODES = ("fp16", "split")
OPERANDS = "fp16"

# Longest L sent to this path by the dispatch: on an H200 (bf16, d=768, fwd + bwd) it takes 3.9 ms
# against the FFT kernel's 6.5 ms at L=128, but 10.9 against 7.6 at L=512 (`tools/bench_kernels.py`).
MAX_LEN = 128


@triton.jit
def _rows_kernel(
    k1_ptr, k2_ptr, rows_ptr, scales_ptr, L, N, HAS_RES: tl.constexpr, SPLIT: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    """The filter rows the GEMM kernels build their Toeplitz tiles from, for channel i_d: row
    R[j] = K[(j - L) mod N] (so that T[t, s] = R[t - s + L], an index without wrap-around) for
    filter f (k1, then k2 with the residual branch), in rows' dtype. SPLIT: the high part
    hi = R rounded and the low part lo = R - hi rounded again at rows[f, i_d, 0 or 1, j], and
    scales[f, i_d] = 1; else R times the power of two 2^-e that brings its largest magnitude to at
    most 1 at rows[f, i_d, 0, j], and 2^e at scales[f, i_d]."""
    DT: tl.constexpr = rows_ptr.dtype.element_ty
    PARTS: tl.constexpr = 2 if SPLIT else 1
    i_d, D = tl.program_id(0), tl.num_programs(0)
    o_j = tl.arange(0, NP)
    m = o_j < N
    src = tl.where(o_j < L, o_j + L, o_j - L)  # (j - L) mod N for 0 <= j < N = 2L
    for f in tl.static_range(2 if HAS_RES else 1):
        k_ptr = k1_ptr if f == 0 else k2_ptr
        row = tl.load(k_ptr + i_d * N + src, mask=m, other=0.0)
        p_out = rows_ptr + (f * D + i_d) * PARTS * N + o_j
        if SPLIT:
            hi = row.to(DT)
            tl.store(p_out, hi, mask=m)
            tl.store(p_out + N, (row - hi.to(tl.float32)).to(DT), mask=m)
            tl.store(scales_ptr + f * D + i_d, 1.0)
        else:
            scale = unit_scale(tl.max(tl.abs(row), axis=0))
            tl.store(p_out, (row * scale).to(DT), mask=m)
            tl.store(scales_ptr + f * D + i_d, 1.0 / scale)


@triton.jit
def _operand(x_f32, DT: tl.constexpr, UPCAST: tl.constexpr):
    """x rounded to the tensor-core dtype DT (UPCAST: carried in fp32, for Triton's interpreter,
    whose half-precision dot is not exact)."""
    x = x_f32.to(DT)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dot(a_f32, b_f32, acc, DT: tl.constexpr, UPCAST: tl.constexpr):
    return tl.dot(_operand(a_f32, DT, UPCAST), _operand(b_f32, DT, UPCAST), acc)


@triton.jit
def _tile_load(ptr, idx, o_t, o_s, L, FULL: tl.constexpr, UPCAST: tl.constexpr):
    if FULL:  # every t and s of the tile below L: no mask
        x = tl.load(ptr + idx)
    else:
        x = tl.load(ptr + idx, mask=(o_t < L) & (o_s < L), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _filter_parts(row_ptr, o_t, o_s, L, N, SPLIT: tl.constexpr, FULL: tl.constexpr, UPCAST: tl.constexpr):
    """The Toeplitz tile T[t, s] = K[(t - s) mod N] for the index grids o_t, o_s (broadcast to one
    tile), zero where t or s is past L, as tensor-core operands read from the channel's filter rows
    (`_rows_kernel`, `row_ptr` at the channel's first): its high (or scaled) part and, with SPLIT,
    its low part (else the first again, unused). FULL: L is the padded length, so no index reaches L."""
    idx = o_t - o_s + L
    hi = _tile_load(row_ptr, idx, o_t, o_s, L, FULL, UPCAST)
    lo = hi
    if SPLIT:
        lo = _tile_load(row_ptr + N, idx, o_t, o_s, L, FULL, UPCAST)
    return hi, lo


@triton.jit
def _product(a_f32, hi, lo, DT: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """a @ (hi + lo) in fp32, the filter tile as its parts (`_filter_parts`) in DT. SPLIT: a (whose
    values are DT's, as the caller rounded them) as it is, two products; else each row of a scaled
    by the power of two that brings it to at most 1 (exact for bf16 values within fp16's range
    after it), one product, and the rows scaled back (the filter's scale is the caller's)."""
    if SPLIT:
        a = _operand(a_f32, DT, UPCAST)
        return tl.dot(a, lo, tl.dot(a, hi))
    scale = unit_scale(tl.max(tl.abs(a_f32), axis=1))[:, None]
    return tl.dot(_operand(a_f32 * scale, DT, UPCAST), hi) / scale


@triton.jit
def _load(ptr, p, m):
    return tl.load(ptr + p, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _gated(x_ptr, p, m, DL, DT: tl.constexpr):
    """v * x1 rounded to the activations' dtype, as torch's path computes it, in fp32; x1 at p of
    the packed [x1; x2; v] rows, v 2 D L elements after it."""
    return (_load(x_ptr, p + 2 * DL, m) * _load(x_ptr, p, m)).to(DT).to(tl.float32)


@triton.jit
def _rows(o_b, i_d, D, L, CH: tl.constexpr):
    """[BB, 1] offsets of the rows (b, i_d, :) in a contiguous (B, CH D, L) tensor."""
    return (o_b[:, None].to(tl.int64) * (CH * D) + i_d) * L


@triton.jit
def _toeplitz_fwd_kernel(
    u_ptr, x_ptr, rows_ptr, scales_ptr, d1_ptr, d2_ptr, y_ptr, z1_ptr,
    B, D, L, BPG,
    HAS_RES: tl.constexpr, SAVE_Z1: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    LP: tl.constexpr, BB: tl.constexpr, BT: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    """y at output positions o_t of channel i_d for the sequences of group i_g (BPG of them). The
    filter tiles (all L inputs by BT outputs) are built once and serve every batch block."""
    DT: tl.constexpr = y_ptr.dtype.element_ty
    OP: tl.constexpr = rows_ptr.dtype.element_ty
    PARTS: tl.constexpr = 2 if SPLIT else 1
    i_d, i_t, i_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    N = 2 * L
    DL = D * L
    o_t = i_t * BT + tl.arange(0, BT)
    o_s = tl.arange(0, LP)
    k1_hi, k1_lo = _filter_parts(rows_ptr + i_d * PARTS * N, o_t[None, :], o_s[:, None], L, N, SPLIT, FULL, UPCAST)
    k1_scale = tl.load(scales_ptr + i_d)
    if HAS_RES:
        k2_hi, k2_lo = _filter_parts(rows_ptr + (D + i_d) * PARTS * N, o_t[None, :], o_s[:, None], L, N, SPLIT, FULL, UPCAST)
        k2_scale = tl.load(scales_ptr + D + i_d)
    d1 = tl.load(d1_ptr + i_d)
    d2 = tl.load(d2_ptr + i_d)
    for b0 in range(i_g * BPG, tl.minimum(B, (i_g + 1) * BPG), BB):
        o_b = b0 + tl.arange(0, BB)
        m_b = o_b[:, None] < B
        x_row, u_row = _rows(o_b, i_d, D, L, 3), _rows(o_b, i_d, D, L, 1)
        m_in = m_b & (o_s[None, :] < L)
        acc = _product(_gated(x_ptr, x_row + o_s[None, :], m_in, DL, DT), k1_hi, k1_lo, OP, SPLIT, UPCAST) * k1_scale
        m_out = m_b & (o_t[None, :] < L)
        p_x, p_u = x_row + o_t[None, :], u_row + o_t[None, :]
        b_z1 = (acc + _gated(x_ptr, p_x, m_out, DL, DT) * d1).to(DT)
        b_y = b_z1.to(tl.float32) * _load(x_ptr, p_x + DL, m_out)
        if HAS_RES:
            b_y += _product(_load(u_ptr, u_row + o_s[None, :], m_in), k2_hi, k2_lo, OP, SPLIT, UPCAST) * k2_scale
            b_y += _load(u_ptr, p_u, m_out) * d2
        tl.store(y_ptr + p_u, b_y.to(DT), mask=m_out)
        if SAVE_Z1:
            tl.store(z1_ptr + p_u, b_z1, mask=m_out)


@triton.jit
def _bwd_inputs_kernel(
    dy_ptr, u_ptr, x_ptr, z1_ptr, rows_ptr, scales_ptr, d1_ptr, d2_ptr,
    du_ptr, dx_ptr, dd1_ptr, dd2_ptr,
    B, D, L, BPG,
    HAS_RES: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    LP: tl.constexpr, BB: tl.constexpr, BS: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    """Input gradients at input positions o_s of channel i_d for the sequences of group i_g, into
    the packed [dx1; dx2; dv] rows and du; the skip-weight gradients as this program's partial
    sums at dd*_ptr[(i_g * n_s + i_s) * D + i_d]. The transposed filter tiles are built once."""
    DT: tl.constexpr = dx_ptr.dtype.element_ty
    OP: tl.constexpr = rows_ptr.dtype.element_ty
    PARTS: tl.constexpr = 2 if SPLIT else 1
    i_d, i_s, i_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    N = 2 * L
    DL = D * L
    o_s = i_s * BS + tl.arange(0, BS)
    o_t = tl.arange(0, LP)
    k1_hi, k1_lo = _filter_parts(rows_ptr + i_d * PARTS * N, o_t[:, None], o_s[None, :], L, N, SPLIT, FULL, UPCAST)
    k1_scale = tl.load(scales_ptr + i_d)
    if HAS_RES:
        k2_hi, k2_lo = _filter_parts(rows_ptr + (D + i_d) * PARTS * N, o_t[:, None], o_s[None, :], L, N, SPLIT, FULL, UPCAST)
        k2_scale = tl.load(scales_ptr + D + i_d)
    d1 = tl.load(d1_ptr + i_d)
    d2 = tl.load(d2_ptr + i_d)
    dd1 = tl.zeros([BB, BS], dtype=tl.float32)
    dd2 = tl.zeros([BB, BS], dtype=tl.float32)
    for b0 in range(i_g * BPG, tl.minimum(B, (i_g + 1) * BPG), BB):
        o_b = b0 + tl.arange(0, BB)
        m_b = o_b[:, None] < B
        x_row, u_row = _rows(o_b, i_d, D, L, 3), _rows(o_b, i_d, D, L, 1)
        m_in = m_b & (o_t[None, :] < L)
        b_g = _load(dy_ptr, u_row + o_t[None, :], m_in)
        b_ga = (b_g * _load(x_ptr, x_row + DL + o_t[None, :], m_in)).to(DT).to(tl.float32)
        acc = _product(b_ga, k1_hi, k1_lo, OP, SPLIT, UPCAST) * k1_scale
        if HAS_RES:
            acc2 = _product(b_g, k2_hi, k2_lo, OP, SPLIT, UPCAST) * k2_scale
        m = m_b & (o_s[None, :] < L)
        p_x, p_u = x_row + o_s[None, :], u_row + o_s[None, :]
        b_g = _load(dy_ptr, p_u, m)
        b_x1 = _load(x_ptr, p_x, m)
        b_v = _load(x_ptr, p_x + 2 * DL, m)
        b_ga = (b_g * _load(x_ptr, p_x + DL, m)).to(DT).to(tl.float32)
        b_da = acc + b_ga * d1
        tl.store(dx_ptr + p_x, (b_da * b_v).to(DT), mask=m)
        tl.store(dx_ptr + p_x + DL, (b_g * _load(z1_ptr, p_u, m)).to(DT), mask=m)
        tl.store(dx_ptr + p_x + 2 * DL, (b_da * b_x1).to(DT), mask=m)
        dd1 += b_ga * (b_v * b_x1).to(DT).to(tl.float32)
        if HAS_RES:
            tl.store(du_ptr + p_u, (acc2 + b_g * d2).to(du_ptr.dtype.element_ty), mask=m)
            dd2 += b_g * _load(u_ptr, p_u, m)
    p_part = (i_g * tl.num_programs(1) + i_s) * D + i_d
    tl.store(dd1_ptr + p_part, tl.sum(tl.sum(dd1, axis=1), axis=0))
    if HAS_RES:
        tl.store(dd2_ptr + p_part, tl.sum(tl.sum(dd2, axis=1), axis=0))


@triton.jit
def _diagonal_sums(acc, BLK: tl.constexpr):
    """For a [BLK, BLK] tile M[tau, sigma]: (neg, pos) with neg[c] the sum of M over tau - sigma = -c
    and pos[c] the sum over tau - sigma = BLK - c (pos[0] = 0)."""
    o = tl.arange(0, BLK)
    shifted = o[:, None] + o[None, :]
    # skew[tau, c] = M[tau, (tau + c) mod BLK], whose lag tau - sigma is -c, or BLK - c once wrapped
    skew = tl.gather(acc, shifted % BLK, axis=1)
    wrapped = shifted >= BLK
    return tl.sum(tl.where(wrapped, 0.0, skew), axis=0), tl.sum(tl.where(wrapped, skew, 0.0), axis=0)


@triton.jit
def _bwd_filter_kernel(
    dy_ptr, u_ptr, x_ptr, neg1_ptr, pos1_ptr, neg2_ptr, pos2_ptr,
    B, D, L, NB, W,
    HAS_RES: tl.constexpr, UPCAST: tl.constexpr, BB: tl.constexpr, BLK: tl.constexpr,
):  # fmt: skip
    """Filter gradients by lag for channel i_d and the tile diagonal q = t block - s block: the
    sums of lags q * BLK - c go to neg*[i_d, q * BLK - c + NB * BLK], those of lags
    q * BLK + BLK - c to pos*[i_d, ...] (rows of width W). The diagonals are the grid's first axis,
    so that a channel's programs, which read overlapping tiles of the same rows, run side by side
    and share them through the L2 cache."""
    DT: tl.constexpr = dy_ptr.dtype.element_ty
    i_d = tl.program_id(1)
    q = tl.program_id(0) - (NB - 1)
    o_blk = tl.arange(0, BLK)
    acc1 = tl.zeros([BLK, BLK], dtype=tl.float32)
    acc2 = tl.zeros([BLK, BLK], dtype=tl.float32)
    for i in range(tl.maximum(q, 0), tl.minimum(NB, NB + q)):
        o_t = i * BLK + o_blk
        o_s = (i - q) * BLK + o_blk
        for b0 in range(0, B, BB):
            o_b = b0 + tl.arange(0, BB)
            m_b = o_b < B
            # ga^T as [BLK (t), BB] and a as [BB, BLK (s)]; dy and u (B, D, L), x packed (B, 3D, L)
            p_t = (o_b[None, :].to(tl.int64) * D + i_d) * L + o_t[:, None]
            p_xt = (o_b[None, :].to(tl.int64) * (3 * D) + i_d) * L + o_t[:, None]
            m_t = m_b[None, :] & (o_t[:, None] < L)
            p_s = (o_b[:, None].to(tl.int64) * D + i_d) * L + o_s[None, :]
            p_xs = (o_b[:, None].to(tl.int64) * (3 * D) + i_d) * L + o_s[None, :]
            m_s = m_b[:, None] & (o_s[None, :] < L)
            b_gt = _load(dy_ptr, p_t, m_t)
            b_gat = b_gt * _load(x_ptr, p_xt + D * L, m_t)
            acc1 = _dot(b_gat, _gated(x_ptr, p_xs, m_s, D * L, DT), acc1, DT, UPCAST)
            if HAS_RES:
                acc2 = _dot(b_gt, _load(u_ptr, p_s, m_s), acc2, DT, UPCAST)
    p_out = i_d * W + q * BLK + NB * BLK - o_blk
    neg, pos = _diagonal_sums(acc1, BLK)
    tl.store(neg1_ptr + p_out, neg)
    tl.store(pos1_ptr + p_out + BLK, pos)
    if HAS_RES:
        neg, pos = _diagonal_sums(acc2, BLK)
        tl.store(neg2_ptr + p_out, neg)
        tl.store(pos2_ptr + p_out + BLK, pos)


@triton.jit
def _finish_filter_kernel(
    lag_ptr, dd_part_ptr, dk1_ptr, dk2_ptr, dd1_ptr, dd2_ptr,
    D, L, W, P, NEG_END, POS_START,
    BD: tl.constexpr, NP: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """For filter f (program 1; k1, then k2) and a block of BD channels: the circular filter's
    gradient dk (D, N) from the filter kernel's lag sums and the skip weight's gradient dd (D,)
    from the input kernel's P partial sums, each rounded once to its output's dtype.

    lag_ptr: (2 F, D, W), the sums by lag of `_bwd_filter_kernel` (neg, then pos, per filter), lag 0
    at column W // 2; neg written at columns 1..NEG_END, pos at POS_START..W - 1, the rest never
    written (and holding no lag). dk[:, c] is lag c for c < L, lag c - N for c > L, zero at c = L
    (the circular filter's column that no product uses)."""
    i_b, f = tl.program_id(0), tl.program_id(1)
    N = 2 * L
    o_d = i_b * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_c = tl.arange(0, NP)
    col = W // 2 + tl.where(o_c < L, o_c, o_c - N)
    valid = m_d[:, None] & ((o_c < N) & (o_c != L))[None, :]
    p_neg = lag_ptr + ((2 * f) * D + o_d[:, None]).to(tl.int64) * W + col[None, :]
    by_lag = tl.load(p_neg, mask=valid & (col <= NEG_END)[None, :], other=0.0)
    by_lag += tl.load(p_neg + D * W, mask=valid & (col >= POS_START)[None, :], other=0.0)
    acc = tl.zeros([BP, BD], dtype=tl.float32)
    for r0 in range(0, P, BP):
        o_r = r0 + tl.arange(0, BP)
        m = (o_r < P)[:, None] & m_d[None, :]
        acc += tl.load(dd_part_ptr + ((f * P + o_r[:, None]).to(tl.int64) * D + o_d[None, :]), mask=m, other=0.0)
    dd = tl.sum(acc, axis=0)
    p_dk = o_d[:, None] * N + o_c[None, :]
    m_dk = m_d[:, None] & (o_c < N)[None, :]
    if f == 0:
        tl.store(dk1_ptr + p_dk, by_lag.to(dk1_ptr.dtype.element_ty), mask=m_dk)
        tl.store(dd1_ptr + o_d, dd.to(dd1_ptr.dtype.element_ty), mask=m_d)
    else:
        tl.store(dk2_ptr + p_dk, by_lag.to(dk2_ptr.dtype.element_ty), mask=m_dk)
        tl.store(dd2_ptr + o_d, dd.to(dd2_ptr.dtype.element_ty), mask=m_d)


# The GEMM kernels' grids aim at about this many programs, sharing each program's filter tiles
# among as many sequences as that leaves. At d=768 and L=128 a channel's programs alone exceed it:
# one group of all the sequences, each channel's tiles built once.
TARGET_PROGRAMS = 256


def _groups(batch: int, programs_per_group: int, rows: int, target: int) -> int:
    """Sequences per group (BPG): a whole number of `rows`-row blocks, as many groups as a grid of
    about `target` programs leaves."""
    groups = max(1, min(triton.cdiv(batch, rows), triton.cdiv(target, programs_per_group)))
    return triton.cdiv(triton.cdiv(batch, groups), rows) * rows


def _blocks(
    batch: int, dim: int, length: int, *, rows_fwd: int = 16, cols_fwd: int | None = None, warps: int = 8,
    rows_bwd: int = 16, cols_bwd: int | None = None, warps_bwd: int = 8, target_programs: int | None = None,
    rows_filter: int = 16, blk_filter: int | None = None, warps_filter: int = 4,
) -> dict[str, int]:  # fmt: skip
    """Block sizes of the three kernels; the keywords override the defaults (`tools/bench_kernels.py
    --conv-sweep` times them). Forward: BB rows per batch block, BT output positions and BPG
    sequences per program; input gradients: BB_BWD, BS (input positions) and BPG_BWD; filter
    gradients: BB_F rows per step through the batch and BLK, its tile.

    A GEMM program builds its filter tiles (all L inputs by BT outputs) once and runs them over BPG
    sequences, a batch block at a time, so that the tiles are shared by as many sequences as a grid
    of about `TARGET_PROGRAMS` (`target_programs`) leaves. The defaults are the fastest of a sweep
    with the fp16 operands on one H100 (d=768, L=128, batch 16, 48 and 256, each kernel alone):
    16-row blocks by all 128 positions with 8 warps for both GEMM kernels, 4 warps within 2%
    (forward 29 against 35 us at batch 16, 59 against 82 at 48 and 214 against 258 at 256 with the
    previous 32 x 128 blocks from batch 32 on and 16 x 64 below; input gradients 36 against 45, 74
    against 99 and 319 against 379 with the previous 32 x 64 blocks, 16 x 32 at batch 16, and 1,024
    programs), the filter gradients with 4 warps (on one H200 with the split operands, 44 against 72
    us at batch 16, 64 against 91 at 48, 177 against 219 at 256; the fp16 sweep found no faster
    tile). The filter kernel steps through the batch 16 rows at a time: with 32 rows, Triton 3.6 on
    an H200 computed the residual filter's gradient wrong (6-9% off, `test_fftconv_toeplitz_gpu` at
    batch 48), with 16 or 64 rows right."""
    padded = max(16, triton.next_power_of_2(length))
    target = target_programs or TARGET_PROGRAMS
    cols_fwd = min(cols_fwd or (32 if INTERPRET else 128), padded)
    cols_bwd = min(cols_bwd or (32 if INTERPRET else 128), padded)
    return {
        "LP": padded,
        "BB": rows_fwd, "BT": cols_fwd, "num_warps": warps,
        "BPG": _groups(batch, dim * triton.cdiv(length, cols_fwd), rows_fwd, target),
        "BB_BWD": rows_bwd, "BS": cols_bwd, "num_warps_bwd": warps_bwd,
        "BPG_BWD": _groups(batch, dim * triton.cdiv(length, cols_bwd), rows_bwd, target),
        "BB_F": rows_filter, "BLK": blk_filter or (32 if INTERPRET else 64), "num_warps_filter": warps_filter,
    }  # fmt: skip


def supports(v_BDL: torch.Tensor) -> bool:
    """Whether this path takes the input: half-precision activations, L <= MAX_LEN, on a GPU or in
    Triton's interpreter."""
    return (
        v_BDL.dtype in (torch.bfloat16, torch.float16)
        and v_BDL.shape[-1] <= MAX_LEN
        and (v_BDL.device.type == "cuda" or INTERPRET)
    )


def _rows_layout(
    k1: torch.Tensor, two_filters: bool, dtype: torch.dtype, operands: str,
) -> tuple[tuple[int, int, int, int], torch.dtype, bool]:  # fmt: skip
    """(shape, dtype, split) of the filter rows for (D, N) filters and activations of `dtype`:
    "split" operands (1 or 2, D, 2, N) in `dtype`, high and low parts; "fp16" (1 or 2, D, 1, N) in
    fp16, scaled. Their scales are (1 or 2, D) fp32, the shape's first two."""
    if operands not in OPERAND_MODES:
        raise ValueError(f"the Toeplitz kernels' operands must be one of {OPERAND_MODES}, got {operands!r}")
    split = operands == "split"
    dim, n = k1.shape
    return (2 if two_filters else 1, dim, 2 if split else 1, n), (dtype if split else torch.float16), split


def filter_rows(k1, k2, dtype: torch.dtype, operands: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, scales): the tile rows of fp32 filters k1 (and k2) (D, N) for activations of `dtype`
    (`_rows_kernel`, laid out as `_rows_layout` says) and the rows' scales (ones for "split")."""
    shape, rows_dtype, split = _rows_layout(k1, k2 is not None, dtype, operands)
    dim, n = k1.shape
    rows = new_output(shape, rows_dtype, k1.device)
    scales = new_output(shape[:2], torch.float32, k1.device)
    _rows_kernel[(dim,)](
        k1, k1 if k2 is None else k2, rows, scales, n // 2, n,
        HAS_RES=k2 is not None, SPLIT=split, NP=triton.next_power_of_2(n),
    )  # fmt: skip
    return rows, scales


def launch_forward(u, x, rows, scales, d1, d2, y, z1, has_res: bool, save_z1: bool, blk: dict) -> None:
    """`_toeplitz_fwd_kernel` over (B, 3D, L) x into y (and z1) with the filter rows and their
    scales (`filter_rows`; the rows' shape says how they were made) and the block sizes `blk`
    (`_blocks`)."""
    batch, width, length = x.shape
    dim = width // 3
    grid = (dim, triton.cdiv(length, blk["BT"]), triton.cdiv(batch, blk["BPG"]))
    _toeplitz_fwd_kernel[grid](
        u, x, rows, scales, d1, d2, y, z1 if save_z1 else y, batch, dim, length, blk["BPG"],
        HAS_RES=has_res, SAVE_Z1=save_z1, SPLIT=rows.shape[2] == 2, UPCAST=INTERPRET,
        LP=blk["LP"], BB=blk["BB"], BT=blk["BT"], FULL=length == blk["LP"], num_warps=blk["num_warps"],
    )  # fmt: skip


def launch_backward_inputs(dy, u, x, z1, rows, scales, d1, d2, du, dx, has_res: bool, blk: dict):
    """`_bwd_inputs_kernel` into dx (and du) with the forward's filter rows and scales; returns the
    skip weights' partial sums (2 or 1, P, D)."""
    batch, width, length = x.shape
    dim = width // 3
    n_s, n_g = triton.cdiv(length, blk["BS"]), triton.cdiv(batch, blk["BPG_BWD"])
    dd_parts = new_output((2 if has_res else 1, n_g * n_s, dim), torch.float32, x.device)
    _bwd_inputs_kernel[(dim, n_s, n_g)](
        dy, u, x, z1, rows, scales, d1, d2, du, dx, dd_parts[0], dd_parts[-1], batch, dim, length, blk["BPG_BWD"],
        HAS_RES=has_res, SPLIT=rows.shape[2] == 2, UPCAST=INTERPRET,
        LP=blk["LP"], BB=blk["BB_BWD"], BS=blk["BS"], FULL=length == blk["LP"], num_warps=blk["num_warps_bwd"],
    )  # fmt: skip
    return dd_parts


def launch_backward_filters(dy, u, x, has_res: bool, blk: dict) -> tuple[torch.Tensor, int, int]:
    """`_bwd_filter_kernel`: (lag sums (2 or 4, D, W) fp32, lag 0 at column W // 2; the last
    column of the neg sums and the first of the pos sums that it writes)."""
    batch, width, length = x.shape
    dim = width // 3
    nb = triton.cdiv(length, blk["BLK"])
    lags = 2 * nb * blk["BLK"] + 1
    lag_sums = new_output((4 if has_res else 2, dim, lags), torch.float32, x.device)
    _bwd_filter_kernel[(2 * nb - 1, dim)](
        dy, u, x, lag_sums[0], lag_sums[1], lag_sums[-2], lag_sums[-1],
        batch, dim, length, nb, lags, HAS_RES=has_res, UPCAST=INTERPRET,
        BB=blk["BB_F"], BLK=blk["BLK"], num_warps=blk["num_warps_filter"],
    )  # fmt: skip
    return lag_sums, (2 * nb - 1) * blk["BLK"], blk["BLK"] + 1


# The finishing kernel's channels per program.
FINISH_CHANNELS = 16


def finish_filter_grads(lag_sums, neg_end, pos_start, dd_parts, k1, d1, k2, d2) -> list[torch.Tensor]:
    """[dk1, dd1] and with k2 [dk2, dd2] from the kernels' lag sums and skip-weight partial sums,
    in the parameters' dtypes (`_finish_filter_kernel`)."""
    dim, n = k1.shape
    has_res = k2 is not None
    dk1, dd1 = new_output(k1.shape, k1.dtype, k1.device), new_output(d1.shape, d1.dtype, k1.device)
    dk2, dd2 = (new_output(k2.shape, k2.dtype, k1.device), new_output(d2.shape, d2.dtype, k1.device)) if has_res else (dk1, dd1)
    _finish_filter_kernel[(triton.cdiv(dim, FINISH_CHANNELS), 2 if has_res else 1)](
        lag_sums, dd_parts, dk1, dk2, dd1, dd2, dim, n // 2, lag_sums.shape[-1], dd_parts.shape[1], neg_end, pos_start,
        BD=FINISH_CHANNELS, NP=triton.next_power_of_2(n), BP=32,
    )  # fmt: skip
    return [dk1, dd1, dk2, dd2] if has_res else [dk1, dd1]


# The ops take the gated branch's inputs packed as x = [x1; x2; v] along the channels (B, 3D, L),
# as the short convolution writes them, and return its gradient the same way: no split or
# concatenation around them. They compute in contiguous layouts and return fresh contiguous
# tensors, which is what the fake implementations state to torch.compile. The residual branch is
# present iff k2 is given.
@torch.library.custom_op("m2dist::toeplitz_conv", mutates_args=())
def toeplitz_conv(
    u: torch.Tensor | None, x: torch.Tensor, k1: torch.Tensor, d1: torch.Tensor,
    k2: torch.Tensor | None, d2: torch.Tensor | None, operands: str, save_z1: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y, z1, rows, scales): the output (B, D, L) in x's dtype; if `save_z1`, the gated convolution
    before the post-gate (kept for the backward; else an empty tensor); the filters' tile rows and
    their scales for `operands` (`filter_rows`, kept for the backward's input gradients)."""
    batch, width, length = x.shape
    dim = width // 3
    has_res = k2 is not None
    x = x.contiguous()
    u = u.contiguous() if has_res else x
    d1 = d1.float().contiguous()
    d2 = d2.float().contiguous() if has_res else d1
    rows, scales = filter_rows(k1.float().contiguous(), k2.float().contiguous() if has_res else None, x.dtype, operands)
    y = new_output((batch, dim, length), x.dtype, x.device)
    z1 = new_output((batch, dim, length), x.dtype, x.device) if save_z1 else x.new_empty(0)
    launch_forward(u, x, rows, scales, d1, d2, y, z1, has_res, save_z1, _blocks(batch, dim, length))
    return y, z1, rows, scales


@toeplitz_conv.register_fake
def _(u, x, k1, d1, k2, d2, operands, save_z1):
    shape = (x.shape[0], x.shape[1] // 3, x.shape[2])
    rows_shape, rows_dtype, _ = _rows_layout(k1, k2 is not None, x.dtype, operands)
    rows = x.new_empty(rows_shape, dtype=rows_dtype)
    scales = x.new_empty(rows_shape[:2], dtype=torch.float32)
    return x.new_empty(shape), x.new_empty(shape if save_z1 else (0,)), rows, scales


@torch.library.custom_op("m2dist::toeplitz_conv_backward", mutates_args=())
def toeplitz_conv_backward(
    dy: torch.Tensor, u: torch.Tensor | None, x: torch.Tensor, z1: torch.Tensor, rows: torch.Tensor,
    scales: torch.Tensor, k1: torch.Tensor, d1: torch.Tensor, k2: torch.Tensor | None, d2: torch.Tensor | None,
) -> list[torch.Tensor]:  # fmt: skip
    """[dx, dk1, dd1] and, with the residual branch, [du, dk2, dd2] after them; dx packed as x
    (B, 3D, L), each gradient in its input's dtype. `rows`, `scales`: the forward's filter rows."""
    has_res = k2 is not None
    batch, width, length = x.shape
    dim = width // 3
    blk = _blocks(batch, dim, length)
    dy, x, z1, rows, scales = dy.contiguous(), x.contiguous(), z1.contiguous(), rows.contiguous(), scales.contiguous()
    u = u.contiguous() if has_res else x
    d1f = d1.float().contiguous()
    d2f = d2.float().contiguous() if has_res else d1f
    dx = new_output(x.shape, x.dtype, x.device)
    du = new_output(u.shape, u.dtype, u.device) if has_res else dx
    dd_parts = launch_backward_inputs(dy, u, x, z1, rows, scales, d1f, d2f, du, dx, has_res, blk)
    lag_sums, neg_end, pos_start = launch_backward_filters(dy, u, x, has_res, blk)
    params = finish_filter_grads(lag_sums, neg_end, pos_start, dd_parts, k1, d1, k2, d2)
    return [dx, *params[:2], du, *params[2:]] if has_res else [dx, *params]


@toeplitz_conv_backward.register_fake
def _(dy, u, x, z1, rows, scales, k1, d1, k2, d2):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, k1, d1)]
    if k2 is not None:
        grads += [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (u, k2, d2)]
    return grads


def _toeplitz_setup_context(ctx, inputs, output):
    u, x, k1, d1, k2, d2, _, _ = inputs
    ctx.save_for_backward(u, x, output[1], output[2], output[3], k1, d1, k2, d2)


def _toeplitz_backward(ctx, dy, _dz1, _drows, _dscales):
    u, x, z1, rows, scales, k1, d1, k2, d2 = ctx.saved_tensors
    # dy reaches here as the transposed view of the (B, L, D) gradient that `out_linear` gives:
    # laid out here, outside the op, a compiled backward does it as one of Inductor's tiled
    # transposes (inside, it was aten's strided copy, one of the slowest kernels of the step).
    grads = toeplitz_conv_backward(dy.contiguous(), u, x, z1, rows, scales, k1, d1, k2, d2)
    dx, dk1, dd1 = grads[:3]
    du, dk2, dd2 = grads[3:] if k2 is not None else (None, None, None)
    return du, dx, dk1, dd1, dk2, dd2, None, None


torch.library.register_autograd("m2dist::toeplitz_conv", _toeplitz_backward, setup_context=_toeplitz_setup_context)


def packed_gated_long_conv(u_BDL, x_BCL, k1_DN, d1_D, k2_DN=None, d2_D=None, *, operands: str | None = None):
    """`gated_long_conv` with the gated branch's inputs packed as x = [x1; x2; v] (B, 3D, L) in bf16
    or fp16, as the short convolution writes them; its gradient comes back packed the same way.

    u (B, D, L) in any float dtype, rounded to x's for the tensor cores (its skip term is not); it
    is laid out contiguously here, once, so that the backward reuses the forward's copy. The
    output has x's dtype. k1_DN, k2_DN: (D, 2L) circular filters; d1_D, d2_D: (D,). `operands`: how
    the filter enters the tensor cores (`OPERAND_MODES`; None: `OPERANDS`). The caller checks shapes."""
    if x_BCL.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the Toeplitz path takes bf16 or fp16 activations, got {x_BCL.dtype}")
    if x_BCL.shape[-1] > MAX_LEN:
        # A program holds its filter tiles for all L inputs: longer inputs take the FFT kernels.
        raise ValueError(f"the Toeplitz path takes L <= {MAX_LEN}, got L={x_BCL.shape[-1]}")
    has_res = k2_DN is not None
    inputs = (u_BDL.contiguous() if has_res else None, x_BCL, k1_DN, d1_D, k2_DN, d2_D)
    save_z1 = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return toeplitz_conv(*inputs, operands or OPERANDS, save_z1)[0]


def gated_long_conv(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN=None, d2_D=None, *, operands: str | None = None):
    """`y = (conv(v * x1; k1) + (v * x1) * d1) * x2 + conv(u; k2) + u * d2` by the Toeplitz GEMM.

    x1, x2, v (B, D, L) in bf16 or fp16 (one dtype), packed into one tensor here (one copy; the
    sequence mixer passes the packed tensor to `packed_gated_long_conv` instead); otherwise as
    `packed_gated_long_conv`. The caller (`kernels.fftconv`) checks shapes and picks this path.
    """
    return packed_gated_long_conv(u_BDL, torch.cat([x1_BDL, x2_BDL, v_BDL], dim=1), k1_DN, d1_D, k2_DN, d2_D, operands=operands)
