"""Direct path of the gated bidirectional long convolution, for bf16/fp16 inputs up to moderate L.

The circular convolution of size N = 2L of a zero-padded length-L input, cut to L, is a product
with the L x L Toeplitz matrix `T[t, s] = K[(t - s) mod N]`: per channel, the batch of sequences
times T is a GEMM. For short sequences that GEMM on tensor cores moves and computes less than the
transform pair (an FFT of size 2L does ~10 passes over twice the data in fp32), so it wins up to
the length where the O(L) work per element overtakes the O(log L) of the FFT (`MAX_LEN`, measured
on an H200; longer inputs take the FFT kernels of `triton_fftconv`).

- Forward: one program per (channel, batch block, output block); T's tiles are read from the
  kernel row K (fp32, cached on chip) and split into a high and a low half-precision part, so the
  filter keeps ~16 mantissa bits while the activations enter the tensor cores as they are (bf16 or
  fp16, as torch's path rounds them); fp32 accumulation. The gating, both skip terms, the post-gate
  and the residual convolution are fused; the gated conv output z1 is kept for the backward.
- Backward, activations: the same GEMM with T transposed, one program per input block; writes all
  four input gradients and per-program partial sums of the skip-weight gradients.
- Backward, filters: dK[j] = sum over (b, t - s = j mod N) of ga[b, t] a[b, s]. A program owns one
  diagonal of the (t block, s block) grid, where every tile has the same lags, so it accumulates
  `ga[:, t block]^T a[:, s block]` (a GEMM over the batch) over the whole diagonal and reduces the
  tile along its diagonals once at the end (a skew with `tl.gather`, then column sums).

Shape legend: B batch, D channels, L sequence length, N = 2L the circular filter length; BB, BT, BS
block sizes along batch, output time and input time; BLK the tile of the filter-gradient kernel.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_common import INTERPRET, new_output

# Longest L sent to this path by the dispatch: on an H200 (bf16, d=768, fwd + bwd) it takes 3.9 ms
# against the FFT kernel's 6.5 ms at L=128, but 10.9 against 7.6 at L=512 (`tools/bench_kernels.py`).
MAX_LEN = 128


@triton.jit
def _kernel_tile(k_row_ptr, o_t, o_s, L, N):
    """T[t, s] = K[(t - s) mod N] for the index grids o_t, o_s (broadcast to one tile), fp32;
    zero where t or s is past L."""
    lag = o_t - o_s
    idx = tl.where(lag < 0, lag + N, lag)
    return tl.load(k_row_ptr + idx, mask=(o_t < L) & (o_s < L), other=0.0)


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
def _dot_split(a_f32, b_f32, acc, DT: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b + acc, a rounded to DT, b as a high DT part plus (SPLIT) a low DT part."""
    a = _operand(a_f32, DT, UPCAST)
    b_hi = _operand(b_f32, DT, UPCAST)
    acc = tl.dot(a, b_hi, acc)
    if SPLIT:
        acc = tl.dot(a, _operand(b_f32 - b_hi.to(tl.float32), DT, UPCAST), acc)
    return acc


@triton.jit
def _load(ptr, p, m):
    return tl.load(ptr + p, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _gated(v_ptr, x1_ptr, p, m, DT: tl.constexpr):
    """v * x1 rounded to the activations' dtype, as torch's path computes it, in fp32."""
    return (_load(v_ptr, p, m) * _load(x1_ptr, p, m)).to(DT).to(tl.float32)


@triton.jit
def _batch_rows(i_b, i_d, B, D, L, BB: tl.constexpr):
    """[BB, 1] offsets of the rows (b, i_d, :) of batch block i_b in a contiguous (B, D, L) tensor
    (element (b, d, l) at (b * D + d) * L + l), and their mask."""
    o_b = i_b * BB + tl.arange(0, BB)
    return (o_b[:, None].to(tl.int64) * D + i_d) * L, o_b[:, None] < B


@triton.jit
def _fwd_kernel(
    u_ptr, x1_ptr, x2_ptr, v_ptr, k1_ptr, d1_ptr, k2_ptr, d2_ptr, y_ptr, z1_ptr,
    B, D, L,
    HAS_RES: tl.constexpr, SAVE_Z1: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
):  # fmt: skip
    DT: tl.constexpr = y_ptr.dtype.element_ty
    i_d, i_b, i_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    N = 2 * L
    o_t = i_t * BT + tl.arange(0, BT)
    p_row, m_b = _batch_rows(i_b, i_d, B, D, L, BB)
    k1_row = k1_ptr + i_d * N
    k2_row = k2_ptr + i_d * N
    acc1 = tl.zeros([BB, BT], dtype=tl.float32)
    acc2 = tl.zeros([BB, BT], dtype=tl.float32)
    for s0 in range(0, L, BS):
        o_s = s0 + tl.arange(0, BS)
        p = p_row + o_s[None, :]
        m = m_b & (o_s[None, :] < L)
        b_a = _gated(v_ptr, x1_ptr, p, m, DT)
        acc1 = _dot_split(b_a, _kernel_tile(k1_row, o_t[None, :], o_s[:, None], L, N), acc1, DT, SPLIT, UPCAST)
        if HAS_RES:
            b_u = _load(u_ptr, p, m)
            acc2 = _dot_split(b_u, _kernel_tile(k2_row, o_t[None, :], o_s[:, None], L, N), acc2, DT, SPLIT, UPCAST)
    p = p_row + o_t[None, :]
    m = m_b & (o_t[None, :] < L)
    b_z1 = (acc1 + _gated(v_ptr, x1_ptr, p, m, DT) * tl.load(d1_ptr + i_d)).to(DT)
    b_y = b_z1.to(tl.float32) * _load(x2_ptr, p, m)
    if HAS_RES:
        b_y += acc2 + _load(u_ptr, p, m) * tl.load(d2_ptr + i_d)
    tl.store(y_ptr + p, b_y.to(DT), mask=m)
    if SAVE_Z1:
        tl.store(z1_ptr + p, b_z1, mask=m)


@triton.jit
def _bwd_inputs_kernel(
    dy_ptr, u_ptr, x1_ptr, x2_ptr, v_ptr, z1_ptr, k1_ptr, d1_ptr, k2_ptr, d2_ptr,
    du_ptr, dx1_ptr, dx2_ptr, dv_ptr, dd1_ptr, dd2_ptr,
    B, D, L,
    HAS_RES: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
):  # fmt: skip
    """Input gradients of the block (batch block, input positions o_s) of channel i_d; the
    skip-weight gradients as partial sums at dd*_ptr[(i_b * n_s + i_s) * D + i_d]."""
    DT: tl.constexpr = dv_ptr.dtype.element_ty
    i_d, i_b, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    N = 2 * L
    o_s = i_s * BS + tl.arange(0, BS)
    p_row, m_b = _batch_rows(i_b, i_d, B, D, L, BB)
    k1_row = k1_ptr + i_d * N
    k2_row = k2_ptr + i_d * N
    acc1 = tl.zeros([BB, BS], dtype=tl.float32)
    acc2 = tl.zeros([BB, BS], dtype=tl.float32)
    for t0 in range(0, L, BT):
        o_t = t0 + tl.arange(0, BT)
        p = p_row + o_t[None, :]
        m = m_b & (o_t[None, :] < L)
        b_g = _load(dy_ptr, p, m)
        b_ga = (b_g * _load(x2_ptr, p, m)).to(DT).to(tl.float32)
        acc1 = _dot_split(b_ga, _kernel_tile(k1_row, o_t[:, None], o_s[None, :], L, N), acc1, DT, SPLIT, UPCAST)
        if HAS_RES:
            acc2 = _dot_split(b_g, _kernel_tile(k2_row, o_t[:, None], o_s[None, :], L, N), acc2, DT, SPLIT, UPCAST)
    p = p_row + o_s[None, :]
    m = m_b & (o_s[None, :] < L)
    b_g = _load(dy_ptr, p, m)
    b_x1 = _load(x1_ptr, p, m)
    b_v = _load(v_ptr, p, m)
    b_ga = (b_g * _load(x2_ptr, p, m)).to(DT).to(tl.float32)
    b_da = acc1 + b_ga * tl.load(d1_ptr + i_d)
    tl.store(dv_ptr + p, (b_da * b_x1).to(DT), mask=m)
    tl.store(dx1_ptr + p, (b_da * b_v).to(DT), mask=m)
    tl.store(dx2_ptr + p, (b_g * _load(z1_ptr, p, m)).to(DT), mask=m)
    p_part = (i_b * tl.num_programs(2) + i_s) * D + i_d
    tl.store(dd1_ptr + p_part, tl.sum(b_ga * (b_v * b_x1).to(DT).to(tl.float32)))
    if HAS_RES:
        b_u = _load(u_ptr, p, m)
        tl.store(du_ptr + p, (acc2 + b_g * tl.load(d2_ptr + i_d)).to(du_ptr.dtype.element_ty), mask=m)
        tl.store(dd2_ptr + p_part, tl.sum(b_g * b_u))


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
    dy_ptr, u_ptr, x1_ptr, x2_ptr, v_ptr, neg1_ptr, pos1_ptr, neg2_ptr, pos2_ptr,
    B, D, L, NB, W,
    HAS_RES: tl.constexpr, UPCAST: tl.constexpr, BB: tl.constexpr, BLK: tl.constexpr,
):  # fmt: skip
    """Filter gradients by lag for channel i_d and the tile diagonal q = t block - s block: the
    sums of lags q * BLK - c go to neg*[i_d, q * BLK - c + NB * BLK], those of lags
    q * BLK + BLK - c to pos*[i_d, ...] (rows of width W)."""
    DT: tl.constexpr = dy_ptr.dtype.element_ty
    i_d = tl.program_id(0)
    q = tl.program_id(1) - (NB - 1)
    o_blk = tl.arange(0, BLK)
    acc1 = tl.zeros([BLK, BLK], dtype=tl.float32)
    acc2 = tl.zeros([BLK, BLK], dtype=tl.float32)
    for i in range(tl.maximum(q, 0), tl.minimum(NB, NB + q)):
        o_t = i * BLK + o_blk
        o_s = (i - q) * BLK + o_blk
        for b0 in range(0, B, BB):
            o_b = b0 + tl.arange(0, BB)
            m_b = o_b < B
            # ga^T as [BLK (t), BB] and a as [BB, BLK (s)]
            p_t = (o_b[None, :].to(tl.int64) * D + i_d) * L + o_t[:, None]
            m_t = m_b[None, :] & (o_t[:, None] < L)
            p_s = (o_b[:, None].to(tl.int64) * D + i_d) * L + o_s[None, :]
            m_s = m_b[:, None] & (o_s[None, :] < L)
            b_gt = _load(dy_ptr, p_t, m_t)
            b_gat = b_gt * _load(x2_ptr, p_t, m_t)
            acc1 = _dot(b_gat, _gated(v_ptr, x1_ptr, p_s, m_s, DT), acc1, DT, UPCAST)
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


def _blocks(batch: int, length: int) -> dict[str, int]:
    """Block sizes: BB, BT, BS for the two GEMM kernels, BB_F and BLK for the filter kernel.

    Batch blocks of 32 rows: on an H200 (d=768, L=128, fwd + bwd) they take 1.26 ms at B=256 and
    about 1.0 ms at B=48, against 2.16 and 1.31 ms with one block of up to 128 rows (the wide
    blocks spill and leave too few programs per SM). The filter kernel steps through the batch 16
    rows at a time: with 32 rows, Triton 3.6 on an H200 computed the residual filter's gradient
    wrong (6-9% off, `test_fftconv_toeplitz_gpu` at batch 48), with 16 or 64 rows right."""
    if INTERPRET:
        return {"BB": 16, "BT": 32, "BS": 32, "BB_F": 16, "BLK": 32, "num_warps": 4}
    rows = min(32, max(16, triton.next_power_of_2(batch)))
    return {"BB": rows, "BT": 64, "BS": 64, "BB_F": 16, "BLK": 64, "num_warps": 8}


def supports(v_BDL: torch.Tensor) -> bool:
    """Whether this path takes the input: half-precision activations, L <= MAX_LEN, on a GPU or in
    Triton's interpreter."""
    return (
        v_BDL.dtype in (torch.bfloat16, torch.float16)
        and v_BDL.shape[-1] <= MAX_LEN
        and (v_BDL.device.type == "cuda" or INTERPRET)
    )


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index contiguous (B, D, L) tensors."""
    return t if t is None else t.contiguous()


# The op computes in the given layout and returns fresh contiguous tensors, which is what the fake
# implementations below state to torch.compile. The residual branch is present iff k2 is given.
@torch.library.custom_op("m2dist::toeplitz_conv", mutates_args=())
def toeplitz_conv(
    u: torch.Tensor | None, x1: torch.Tensor, x2: torch.Tensor, v: torch.Tensor, k1: torch.Tensor, d1: torch.Tensor,
    k2: torch.Tensor | None, d2: torch.Tensor | None, split: bool, save_z1: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y, z1): the output (B, D, L) in v's dtype and, if `save_z1`, the gated convolution before
    the post-gate (kept for the backward; else an empty tensor)."""
    batch, dim, length = v.shape
    has_res = k2 is not None
    u, x1, x2, v = map(_rows, (u, x1, x2, v))
    k1, d1 = k1.float().contiguous(), d1.float().contiguous()
    k2, d2 = (k2.float().contiguous(), d2.float().contiguous()) if has_res else (k1, d1)
    blk = _blocks(batch, length)
    y = new_output(v.shape, v.dtype, v.device)
    z1 = new_output(v.shape, v.dtype, v.device) if save_z1 else v.new_empty(0)
    grid = (dim, triton.cdiv(batch, blk["BB"]), triton.cdiv(length, blk["BT"]))
    _fwd_kernel[grid](
        u if has_res else v, x1, x2, v, k1, d1, k2, d2, y, z1 if save_z1 else y, batch, dim, length,
        HAS_RES=has_res, SAVE_Z1=save_z1, SPLIT=split, UPCAST=INTERPRET,
        BB=blk["BB"], BT=blk["BT"], BS=blk["BS"], num_warps=blk["num_warps"],
    )  # fmt: skip
    return y, z1


@toeplitz_conv.register_fake
def _(u, x1, x2, v, k1, d1, k2, d2, split, save_z1):
    return torch.empty_like(v, memory_format=torch.contiguous_format), v.new_empty(v.shape if save_z1 else (0,))


@torch.library.custom_op("m2dist::toeplitz_conv_backward", mutates_args=())
def toeplitz_conv_backward(
    dy: torch.Tensor, u: torch.Tensor | None, x1: torch.Tensor, x2: torch.Tensor, v: torch.Tensor, z1: torch.Tensor,
    k1: torch.Tensor, d1: torch.Tensor, k2: torch.Tensor | None, d2: torch.Tensor | None, split: bool,
) -> list[torch.Tensor]:  # fmt: skip
    """[dx1, dx2, dv, dk1, dd1] and, with the residual branch, [du, dk2, dd2] after them; each
    gradient in its input's dtype."""
    has_res = k2 is not None
    batch, dim, length = v.shape
    blk = _blocks(batch, length)
    dy, u, x1, x2, v, z1 = map(_rows, (dy, u, x1, x2, v, z1))
    k1f, d1f = k1.float().contiguous(), d1.float().contiguous()
    k2f, d2f = (k2.float().contiguous(), d2.float().contiguous()) if has_res else (k1f, d1f)
    u_or_v = u if has_res else v
    dx1, dx2, dv = (new_output(v.shape, v.dtype, v.device) for _ in range(3))
    du = new_output(u.shape, u.dtype, u.device) if has_res else dv
    n_b, n_s = triton.cdiv(batch, blk["BB"]), triton.cdiv(length, blk["BS"])
    dd1_part = new_output((n_b * n_s, dim), torch.float32, v.device)
    dd2_part = new_output((n_b * n_s, dim), torch.float32, v.device) if has_res else dd1_part
    _bwd_inputs_kernel[(dim, n_b, n_s)](
        dy, u_or_v, x1, x2, v, z1, k1f, d1f, k2f, d2f, du, dx1, dx2, dv, dd1_part, dd2_part,
        batch, dim, length, HAS_RES=has_res, SPLIT=split, UPCAST=INTERPRET,
        BB=blk["BB"], BT=blk["BT"], BS=blk["BS"], num_warps=blk["num_warps"],
    )  # fmt: skip
    nb = triton.cdiv(length, blk["BLK"])
    width = 2 * nb * blk["BLK"] + 1
    lag_sums = torch.zeros((4 if has_res else 2, dim, width), dtype=torch.float32, device=v.device)
    _bwd_filter_kernel[(dim, 2 * nb - 1)](
        dy, u_or_v, x1, x2, v, lag_sums[0], lag_sums[1], lag_sums[-2], lag_sums[-1],
        batch, dim, length, nb, width, HAS_RES=has_res, UPCAST=INTERPRET,
        BB=blk["BB_F"], BLK=blk["BLK"], num_warps=blk["num_warps"],
    )  # fmt: skip
    origin = nb * blk["BLK"]
    dk1 = _circular(lag_sums[0] + lag_sums[1], origin, length).to(k1.dtype)
    grads = [dx1, dx2, dv, dk1, dd1_part.sum(0).to(d1.dtype)]
    if has_res:
        dk2 = _circular(lag_sums[2] + lag_sums[3], origin, length).to(k2.dtype)
        grads += [du, dk2, dd2_part.sum(0).to(d2.dtype)]
    return grads


@toeplitz_conv_backward.register_fake
def _(dy, u, x1, x2, v, z1, k1, d1, k2, d2, split):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x1, x2, v, k1, d1)]
    if k2 is not None:
        grads += [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (u, k2, d2)]
    return grads


def _toeplitz_setup_context(ctx, inputs, output):
    u, x1, x2, v, k1, d1, k2, d2, split, _ = inputs
    ctx.save_for_backward(u, x1, x2, v, output[1], k1, d1, k2, d2)
    ctx.split = split


def _toeplitz_backward(ctx, dy, _dz1):
    u, x1, x2, v, z1, k1, d1, k2, d2 = ctx.saved_tensors
    grads = toeplitz_conv_backward(dy, u, x1, x2, v, z1, k1, d1, k2, d2, ctx.split)
    dx1, dx2, dv, dk1, dd1 = grads[:5]
    du, dk2, dd2 = grads[5:] if k2 is not None else (None, None, None)
    return du, dx1, dx2, dv, dk1, dd1, dk2, dd2, None, None


torch.library.register_autograd("m2dist::toeplitz_conv", _toeplitz_backward, setup_context=_toeplitz_setup_context)


def _circular(by_lag: torch.Tensor, origin: int, length: int) -> torch.Tensor:
    """(D, W) sums by lag (lag 0 at column `origin`) -> (D, 2L) gradient of the circular filter:
    lags 0..L-1 at 0..L-1, lags -(L-1)..-1 at L+1..2L-1, column L (never used) zero."""
    zero = torch.zeros_like(by_lag[:, :1])
    return torch.cat([by_lag[:, origin : origin + length], zero, by_lag[:, origin - length + 1 : origin]], dim=1)


def gated_long_conv(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN=None, d2_D=None, *, split: bool = True):
    """`y = (conv(v * x1; k1) + (v * x1) * d1) * x2 + conv(u; k2) + u * d2` by the Toeplitz GEMM.

    x1, x2, v (B, D, L) in bf16 or fp16 (one dtype); u (B, D, L) in any float dtype, rounded to v's
    for the tensor cores (its skip term is not); the output has v's dtype. k1_DN, k2_DN: (D, 2L)
    circular filters; d1_D, d2_D: (D,). `split` False rounds the filter to the activations' dtype (one GEMM, not two).
    The caller (`kernels.fftconv`) checks shapes and picks this path.
    """
    if v_BDL.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the Toeplitz path takes bf16 or fp16 activations, got {v_BDL.dtype}")
    has_res = k2_DN is not None
    inputs = (u_BDL if has_res else None, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D)
    save_z1 = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return toeplitz_conv(*inputs, split, save_z1)[0]
