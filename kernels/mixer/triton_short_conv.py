"""Triton path of the mixer's causal short convolution (`reference.causal_short_conv`: upstream's
depthwise Conv1d of 3 taps, cut to its first L outputs), in the layouts around it.

- Forward: one program per (block of BL positions, block of BC channels, sequence). It reads
  `in_linear`'s output p in its (B, L, C) layout, three rows shifted by one position each, sums
  bias + the taps in fp32 in the reference's order, and writes the (B, C, L) layout that the long
  convolution's kernels take, rounded once to p's dtype: the transposition is the store's, the
  cast the output's, no pass of their own.
- Backward: one program per (block of positions, block of channels, group of BPG sequences). It
  reads the output's gradient g in the (B, C, L) layout and p, writes p's gradient in the (B, L, C)
  layout, dp[s] = sum_j w_j g[s + 2 - j], and accumulates the filter's and the bias's gradients
  over its sequences; a second kernel adds up their per-program partial sums.
- `in_linear`'s bias (optional): `in_linear` then runs without it, the forward adds it to every p
  it loads (in fp32, zero padding left zero), and the backward sums its gradient, which is dp's
  column sum, with the filter's: no reduction pass over dp of its own (one a layer, reading the
  whole (B, L, 3D) gradient, where `F.linear`'s backward takes the bias's gradient).
- The mixer input u (B, L, D), which the long convolution's kernels read as (B, D, L), is laid
  out by the same kernels (`causal_short_conv_and_layout`): the forward's programs of the first D
  channels copy their tile of u transposed, the backward's copy u's gradient back to (B, L, D).
  Separately, the copy and the transposed gradient were strided passes of their own (and left the
  LayerNorm before the mixer a strided gradient; docs/performance.md, fine-tuning step).

Shape legend: B batch, L sequence length, C channels (3D, the projection's width), D = C / 3 the
mixer's width, K = 3 taps.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_common import INTERPRET, new_output

TAPS = 3
# The backward's grid aims at about this many programs, each summing the parameter gradients of
# as many sequences as that leaves (fewer partial sums to add up afterwards).
TARGET_PROGRAMS = 2048
# A tile on a GPU, ROWS positions by COLS channels, and the backward's warps: the fastest backward
# of `tools/bench_kernels.py --conv-sweep 16,48,256` on one H200 (d=768, L=128) at batch 16 and 48
# (32.4 against 46.4 us with 32 x 64 tiles and 8 warps, 71.6 against 94.6). At 256 it was not
# among the three fastest (64 x 32 tiles, 8 warps: 302 against 336 us; this tile with 8192
# programs: 304); the engine's L=128 step (batch 256) measured the same with either tile.
ROWS, COLS, BWD_WARPS = 16, 32, 4
# How the backward pairs the gradient with the inputs for the taps' gradients
# (`_short_conv_bwd_kernel`): not timed on a GPU at L=128 against the first form, which stays the
# default there until it is.
PAIR_SHIFTED_INPUTS = False
# Whether the backward loads each sequence's tiles an iteration ahead (`_short_conv_bwd_kernel`'s
# PREFETCH), which overlaps their wait for memory with the previous sequence's work, for about 30
# registers a thread more at the GPU tiles (110 against 80 at L=128: 4 programs an SM instead of
# 6). Not yet timed on a GPU (`tools/bench_kernels.py --conv-sweep` times both forms); off until it is.
PREFETCH = False
# From this L on (longer sequences, fewer of them per backward program) the blocks of LONG_BLOCKS:
# the fastest of `tools/bench_kernels.py --ops none --conv-sweep B --conv-sweep-length L` on one
# H100 (d=768, 32,768 tokens) at L=512 (batch 64) and 8192 (batch 4), and within 1% of
# the fastest at 2048 (batch 16): the forward's 16 x 128 tile 180.0 against 225.5 us with the tile
# above at L=512 and 187.0 against 246.5 at 8192, the backward's 32 x 32 tile with the shifted
# inputs' pairing 279.6 against 354.9 and 329.3 against 391.0. L = 129 ... 511 was not timed.
LONG_MIN_LEN = 512
LONG_BLOCKS = {
    "rows": 32, "cols": 32, "warps_bwd": 4, "pair_shifted_inputs": True, "rows_fwd": 16, "cols_fwd": 128, "warps_fwd": 4,
    "prefetch": False,
}  # fmt: skip


def _blocks(
    batch: int, length: int, width: int, rows: int | None = None, cols: int | None = None,
    target_programs: int | None = None, warps_bwd: int | None = None, pair_shifted_inputs: bool | None = None,
    rows_fwd: int | None = None, cols_fwd: int | None = None, warps_fwd: int | None = None, prefetch: bool | None = None,
) -> dict[str, int]:  # fmt: skip
    """The backward's tile, BL positions by BC channels (ROWS x COLS on a GPU), BPG sequences per
    backward program (for about `target_programs` programs, TARGET_PROGRAMS by default), the
    backward's warps (BWD_WARPS on a GPU), its form of the taps' gradients (PAIR_SHIFTED_INPUTS)
    and whether it loads a sequence ahead (PREFETCH); the forward's tile, BL_FWD x BC_FWD (the
    backward's by default), and warps (4); from LONG_MIN_LEN on, LONG_BLOCKS' choices. The
    keywords override the defaults (`tools/bench_kernels.py --conv-sweep` times them)."""
    if length >= LONG_MIN_LEN:
        default = LONG_BLOCKS
    else:
        tile = (16, 16, 4) if INTERPRET else (ROWS, COLS, BWD_WARPS)
        default = dict(zip(("rows", "cols", "warps_bwd"), tile, strict=True)) | {
            "pair_shifted_inputs": PAIR_SHIFTED_INPUTS, "prefetch": PREFETCH,
        }  # fmt: skip
    bl, bc = rows or default["rows"], cols or default["cols"]
    tiles = triton.cdiv(length, bl) * triton.cdiv(width, bc)
    groups = max(1, min(batch, triton.cdiv(target_programs or TARGET_PROGRAMS, tiles)))
    pair = default["pair_shifted_inputs"] if pair_shifted_inputs is None else pair_shifted_inputs
    prefetch = default["prefetch"] if prefetch is None else prefetch
    return {
        "BL": bl, "BC": bc, "BPG": triton.cdiv(batch, groups), "num_warps_bwd": warps_bwd or default["warps_bwd"],
        "PAIR_SHIFTED_INPUTS": pair, "PREFETCH": prefetch, "BL_FWD": rows_fwd or default.get("rows_fwd", bl),
        "BC_FWD": cols_fwd or default.get("cols_fwd", bc), "num_warps": warps_fwd or default.get("warps_fwd", 4),
    }  # fmt: skip


def supports(p_BLC: torch.Tensor, weight_C1K: torch.Tensor) -> bool:
    """Whether this path takes the input: a 3-tap filter, on a GPU or in Triton's interpreter."""
    return weight_C1K.shape[-1] == TAPS and (p_BLC.device.type == "cuda" or INTERPRET)


@triton.jit
def _taps(w_ptr, o_c, m_c):
    w0 = tl.load(w_ptr + o_c * 3, mask=m_c, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + o_c * 3 + 1, mask=m_c, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + o_c * 3 + 2, mask=m_c, other=0.0).to(tl.float32)
    return w0, w1, w2


@triton.jit
def _raw_rows_at(ptr, base, o_s, o_c, m_c, L, C, valid=True):
    """[BL, BC] of a (B, L, C) tensor at positions o_s (zero outside [0, L), and everywhere unless
    `valid`), in the tensor's dtype."""
    m = (((o_s >= 0) & (o_s < L))[:, None] & m_c[None, :]) & valid
    return tl.load(ptr + base + o_s[:, None] * C + o_c[None, :], mask=m, other=0.0)


@triton.jit
def _raw_cols_at(ptr, base, o_t, o_c, m_c, L, valid):
    """[BL, BC] of a (B, C, L) tensor at positions o_t (zero past L, and everywhere unless `valid`),
    in the tensor's dtype."""
    m = ((o_t < L)[:, None] & m_c[None, :]) & valid
    return tl.load(ptr + base + o_c[None, :] * L + o_t[:, None], mask=m, other=0.0)


@triton.jit
def _biased(x, o_s, L, in_bias, HAS_IN_BIAS: tl.constexpr):
    """A tile of p at positions o_s (`_raw_rows_at`) as the convolution's input, fp32: plus
    `in_linear`'s bias (in_bias, [BC] fp32) with HAS_IN_BIAS, zero outside [0, L)."""
    x = x.to(tl.float32)
    if HAS_IN_BIAS:
        x = tl.where(((o_s >= 0) & (o_s < L))[:, None], x + in_bias[None, :], x)
    return x


@triton.jit
def _inputs_at(ptr, base, o_s, o_c, m_c, L, C, in_bias, HAS_IN_BIAS: tl.constexpr):
    """[BL, BC] of the convolution's input at positions o_s, p (B, L, C) (`_biased`); fp32."""
    return _biased(_raw_rows_at(ptr, base, o_s, o_c, m_c, L, C), o_s, L, in_bias, HAS_IN_BIAS)


@triton.jit
def _in_bias(inb_ptr, o_c, m_c, HAS_IN_BIAS: tl.constexpr):
    """`in_linear`'s bias at channels o_c, fp32 (zeros without HAS_IN_BIAS, unused)."""
    if HAS_IN_BIAS:
        return tl.load(inb_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    return tl.zeros_like(o_c).to(tl.float32)


@triton.jit
def _short_conv_fwd_kernel(
    p_ptr, w_ptr, b_ptr, inb_ptr, out_ptr, u_ptr, ut_ptr, L, C, D,
    HAS_U: tl.constexpr, HAS_IN_BIAS: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """out[b, c, t] = bias[c] + sum_j w[c, j] x[b, t + j - 2, c] for this program's tile, x = p
    (+ in_bias with HAS_IN_BIAS); with HAS_U, the tiles of the first D channels also copy u
    (B, L, D) to ut (B, D, L)."""
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BL + tl.arange(0, BL)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    if HAS_U:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if i_c * BC < D:
            m_u = o_c < D
            base_u = i_b.to(tl.int64) * L * D
            u = _raw_rows_at(u_ptr, base_u, o_t, o_c, m_u, L, D)
            m = (o_t < L)[:, None] & m_u[None, :]
            tl.store(ut_ptr + base_u + o_c[None, :] * L + o_t[:, None], u.to(ut_ptr.dtype.element_ty), mask=m)
    base = i_b.to(tl.int64) * L * C
    w0, w1, w2 = _taps(w_ptr, o_c, m_c)
    in_bias = _in_bias(inb_ptr, o_c, m_c, HAS_IN_BIAS)
    # the reference's order: ((x0 w0 + x1 w1) + x2 w2), then the bias
    acc = _inputs_at(p_ptr, base, o_t - 2, o_c, m_c, L, C, in_bias, HAS_IN_BIAS) * w0[None, :]
    acc += _inputs_at(p_ptr, base, o_t - 1, o_c, m_c, L, C, in_bias, HAS_IN_BIAS) * w1[None, :]
    acc += _inputs_at(p_ptr, base, o_t, o_c, m_c, L, C, in_bias, HAS_IN_BIAS) * w2[None, :]
    acc = tl.load(b_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :] + acc
    m = (o_t < L)[:, None] & m_c[None, :]
    tl.store(out_ptr + base + o_c[None, :] * L + o_t[:, None], acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sequence_tiles(g_ptr, p_ptr, base, o_s, o_c, m_c, L, C, valid, PAIR_SHIFTED_INPUTS: tl.constexpr):
    """(g0, g1, g2, x0, x1, x2) of one sequence for `_short_conv_bwd_kernel`'s tile, in their
    tensors' dtypes, zero unless `valid`: output position t = s + 2 - j took input position s
    through tap j, so g0, g1, g2 are g at s + 2, s + 1, s, and x0, x1, x2 p at s - 2, s - 1, s (x0
    and x1 are x2 without PAIR_SHIFTED_INPUTS, which alone reads them)."""
    g0 = _raw_cols_at(g_ptr, base, o_s + 2, o_c, m_c, L, valid)
    g1 = _raw_cols_at(g_ptr, base, o_s + 1, o_c, m_c, L, valid)
    g2 = _raw_cols_at(g_ptr, base, o_s, o_c, m_c, L, valid)
    x2 = _raw_rows_at(p_ptr, base, o_s, o_c, m_c, L, C, valid)
    x0, x1 = x2, x2
    if PAIR_SHIFTED_INPUTS:
        x0 = _raw_rows_at(p_ptr, base, o_s - 2, o_c, m_c, L, C, valid)
        x1 = _raw_rows_at(p_ptr, base, o_s - 1, o_c, m_c, L, C, valid)
    return g0, g1, g2, x0, x1, x2


@triton.jit
def _short_conv_bwd_kernel(
    g_ptr, p_ptr, w_ptr, inb_ptr, dp_ptr, part_ptr, gu_ptr, du_ptr, B, L, C, D, BPG,
    HAS_U: tl.constexpr, HAS_IN_BIAS: tl.constexpr, ROWS: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
    PAIR_SHIFTED_INPUTS: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """dp at this tile's positions for the sequences of group i_g; the filter's and bias's
    gradients over them as partial sums at part[(i_g * n_t + i_t), 0..3, c] (taps 0-2, bias; ROWS
    rows a program), with HAS_IN_BIAS `in_linear`'s bias's (dp's sum) at row 4 (ROWS 5); with
    HAS_U, the tiles of the first D channels also copy ut's gradient gu (B, D, L) to du (B, L, D).

    g is read in its (B, C, L) layout and p in its (B, L, C) one; products of the two need one
    of them in the other's register layout, a pass through shared memory. dp takes the three
    shifted g tiles and is stored in p's layout (one pass, in p's dtype). The taps' gradients
    either pair each shifted g tile with the input at the tile's positions, or, with
    PAIR_SHIFTED_INPUTS, the unshifted g tile with the inputs at the three shifted positions (the
    shifted input rows are aligned loads that the cache serves). An sm_90 compile of the GPU tile
    (`kernels.compile_report.loop_layout_conversions`) leaves three fp32 passes a sequence in the
    first form, one fp32 and one bf16 in the second.

    The loop walks the group's sequences one after the other, and each layout pass waits at a
    barrier for the tile it converts. The tiles are loaded in their own dtype, all of them before
    the first pass (`_sequence_tiles`), so that a sequence waits for memory once; each tile loaded
    as fp32 where it was used, the compiler issued each load just before its pass, three waits a
    sequence one after the other (`tests/test_kernels_triton.py` checks the order in the sm_90
    code; the registers are the same). With PREFETCH each iteration loads the next sequence's
    tiles before the current one's passes, whose tiles are then already in registers."""
    i_t, i_c, i_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_s = i_t * BL + tl.arange(0, BL)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    m = (o_s < L)[:, None] & m_c[None, :]
    b_start = i_g * BPG
    b_end = tl.minimum(B, b_start + BPG)
    if HAS_U:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if i_c * BC < D:
            m_u = o_c < D
            m_du = (o_s < L)[:, None] & m_u[None, :]
            if PREFETCH:
                base_u = (b_start + tl.zeros([], dtype=tl.int64)) * L * D
                gu_next = _raw_cols_at(gu_ptr, base_u, o_s, o_c, m_u, L, b_start < b_end)
            for b in range(b_start, b_end):
                base_u = (b + tl.zeros([], dtype=tl.int64)) * L * D
                if PREFETCH:  # as the loop below
                    gu = gu_next
                    gu_next = _raw_cols_at(gu_ptr, base_u + L * D, o_s, o_c, m_u, L, b + 1 < b_end)
                else:
                    gu = _raw_cols_at(gu_ptr, base_u, o_s, o_c, m_u, L, True)
                tl.store(du_ptr + base_u + o_s[:, None] * D + o_c[None, :], gu.to(du_ptr.dtype.element_ty), mask=m_du)
    w0, w1, w2 = _taps(w_ptr, o_c, m_c)
    in_bias = _in_bias(inb_ptr, o_c, m_c, HAS_IN_BIAS)
    dw0 = tl.zeros([BL, BC], dtype=tl.float32)
    dw1 = tl.zeros([BL, BC], dtype=tl.float32)
    dw2 = tl.zeros([BL, BC], dtype=tl.float32)
    db = tl.zeros([BL, BC], dtype=tl.float32)
    dinb = tl.zeros([BL, BC], dtype=tl.float32)
    if PREFETCH:  # the first sequence's tiles; each iteration then loads the next one's
        first = (b_start + tl.zeros([], dtype=tl.int64)) * L * C
        g0_next, g1_next, g2_next, x0_next, x1_next, x2_next = _sequence_tiles(
            g_ptr, p_ptr, first, o_s, o_c, m_c, L, C, b_start < b_end, PAIR_SHIFTED_INPUTS
        )
    for b in range(b_start, b_end):
        base = (b + tl.zeros([], dtype=tl.int64)) * L * C
        if PREFETCH:
            g0, g1, g2, x0, x1, x2 = g0_next, g1_next, g2_next, x0_next, x1_next, x2_next
            g0_next, g1_next, g2_next, x0_next, x1_next, x2_next = _sequence_tiles(
                g_ptr, p_ptr, base + L * C, o_s, o_c, m_c, L, C, b + 1 < b_end, PAIR_SHIFTED_INPUTS
            )
        else:
            g0, g1, g2, x0, x1, x2 = _sequence_tiles(g_ptr, p_ptr, base, o_s, o_c, m_c, L, C, True, PAIR_SHIFTED_INPUTS)
        g0, g1, g2 = g0.to(tl.float32), g1.to(tl.float32), g2.to(tl.float32)
        dp = g0 * w0[None, :] + g1 * w1[None, :] + g2 * w2[None, :]
        tl.store(dp_ptr + base + o_s[:, None] * C + o_c[None, :], dp.to(dp_ptr.dtype.element_ty), mask=m)
        x = _biased(x2, o_s, L, in_bias, HAS_IN_BIAS)
        if PAIR_SHIFTED_INPUTS:
            # the same sums over output positions t: dw_j pairs g[t] with the input at t + j - 2
            dw0 += g2 * _biased(x0, o_s - 2, L, in_bias, HAS_IN_BIAS)
            dw1 += g2 * _biased(x1, o_s - 1, L, in_bias, HAS_IN_BIAS)
            dw2 += g2 * x
        else:
            dw0 += g0 * x
            dw1 += g1 * x
            dw2 += g2 * x
        db += g2  # every output position once: t = s over s < L
        if HAS_IN_BIAS:
            dinb += dp  # zero past L: no output reads those positions
    p_part = part_ptr + (i_g * tl.num_programs(0) + i_t).to(tl.int64) * ROWS * C + o_c
    tl.store(p_part, tl.sum(dw0, axis=0), mask=m_c)
    tl.store(p_part + C, tl.sum(dw1, axis=0), mask=m_c)
    tl.store(p_part + 2 * C, tl.sum(dw2, axis=0), mask=m_c)
    tl.store(p_part + 3 * C, tl.sum(db, axis=0), mask=m_c)
    if HAS_IN_BIAS:
        tl.store(p_part + 4 * C, tl.sum(dinb, axis=0), mask=m_c)


@triton.jit
def _param_grads_kernel(
    part_ptr, dw_ptr, db_ptr, dinb_ptr, P, C, ROWS: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr
):  # fmt: skip
    """Row j of the parameter gradients for a block of channels: the sum over the P programs'
    partial sums part[:, j, c] (P, ROWS, C), rounded once to the output's dtype, into dweight
    (C, 1, 3) for taps j = 0-2, dbias (C,) for j = 3 and `in_linear`'s dbias (C,) for j = 4. One
    launch where torch took four (two sums, a transposition, a cast), each a few microseconds at
    fine-tuning sizes."""
    i_c, j = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    acc = tl.zeros([BP, BC], dtype=tl.float32)
    for r0 in range(0, P, BP):
        o_r = r0 + tl.arange(0, BP)
        m = (o_r < P)[:, None] & m_c[None, :]
        acc += tl.load(part_ptr + (o_r[:, None].to(tl.int64) * ROWS + j) * C + o_c[None, :], mask=m, other=0.0)
    total = tl.sum(acc, axis=0)
    if j < 3:
        tl.store(dw_ptr + o_c * 3 + j, total.to(dw_ptr.dtype.element_ty), mask=m_c)
    elif j == 3:
        tl.store(db_ptr + o_c, total.to(db_ptr.dtype.element_ty), mask=m_c)
    else:
        tl.store(dinb_ptr + o_c, total.to(dinb_ptr.dtype.element_ty), mask=m_c)


# The parameter-gradient reduction's tile: partial-sum rows by channels.
PARAM_ROWS, PARAM_COLS = 32, 64


@torch.library.custom_op("m2dist::short_conv", mutates_args=())
def short_conv(
    p: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, u: torch.Tensor | None, in_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, ut): out (B, C, L) in p's dtype, contiguous, of p (B, L, C), weight (C, 1, 3), bias
    (C,), and `in_linear`'s bias (C,) added to p where given; ut, with u (B, L, D) given, u laid out
    as (B, D, L) in u's dtype (else an empty tensor)."""
    batch, length, width = p.shape
    p, weight = p.contiguous(), weight.contiguous()
    out = new_output((batch, width, length), p.dtype, p.device)
    u = u.contiguous() if u is not None else None
    ut = new_output((batch, u.shape[2], length), u.dtype, p.device) if u is not None else p.new_empty(0)
    launch_forward(p, weight, bias.contiguous(), out, _blocks(batch, length, width), u, ut, in_bias)
    return out, ut


def launch_forward(
    p: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, blk: dict,
    u: torch.Tensor | None = None, ut: torch.Tensor | None = None, in_bias: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """`_short_conv_fwd_kernel` over contiguous p (B, L, C) (plus `in_linear`'s bias, where given)
    into out (B, C, L) (and u (B, L, D) into ut (B, D, L)) with the blocks `blk` (`_blocks`)."""
    batch, length, width = p.shape
    has_u, has_in_bias = u is not None, in_bias is not None
    grid = (triton.cdiv(length, blk["BL_FWD"]), triton.cdiv(width, blk["BC_FWD"]), batch)
    _short_conv_fwd_kernel[grid](
        p, weight, bias, in_bias.contiguous() if has_in_bias else bias, out, u if has_u else p, ut if has_u else out,
        length, width, u.shape[2] if has_u else 0,
        HAS_U=has_u, HAS_IN_BIAS=has_in_bias, BL=blk["BL_FWD"], BC=blk["BC_FWD"], num_warps=blk["num_warps"],
    )  # fmt: skip


@short_conv.register_fake
def _(p, weight, bias, u, in_bias):
    ut = p.new_empty(0) if u is None else u.new_empty((u.shape[0], u.shape[2], u.shape[1]))
    return p.new_empty((p.shape[0], p.shape[2], p.shape[1])), ut


@torch.library.custom_op("m2dist::short_conv_backward", mutates_args=())
def short_conv_backward(
    g: torch.Tensor, gu: torch.Tensor | None, p: torch.Tensor, weight: torch.Tensor, in_bias: torch.Tensor | None
) -> list[torch.Tensor]:
    """[dp (B, L, C) in p's dtype, dweight (C, 1, 3) and dbias (C,) in weight's dtype, du, din_bias]
    from the output's gradient g (B, C, L) and, where given, ut's gradient gu (B, D, L), which comes
    back laid out as u (B, L, D) in du (else an empty tensor); din_bias, `in_linear`'s bias's
    gradient, in weight's dtype where `in_bias` was given (else an empty tensor)."""
    batch, length, width = p.shape
    g, p, weight = g.contiguous(), p.contiguous(), weight.contiguous()
    dp = new_output(p.shape, p.dtype, p.device)
    has_u, has_in_bias = gu is not None, in_bias is not None
    gu = gu.contiguous() if has_u else g
    du = new_output((batch, length, gu.shape[1]), gu.dtype, p.device) if has_u else p.new_empty(0)
    in_bias = in_bias.contiguous() if has_in_bias else None
    parts = launch_backward(g, p, weight, dp, _blocks(batch, length, width), gu if has_u else None, du, in_bias)
    dweight = new_output(weight.shape, weight.dtype, p.device)
    dbias = new_output((width,), weight.dtype, p.device)
    din_bias = new_output((width,), weight.dtype, p.device) if has_in_bias else p.new_empty(0)
    rows = parts.shape[1]
    _param_grads_kernel[(triton.cdiv(width, PARAM_COLS), rows)](
        parts, dweight, dbias, din_bias if has_in_bias else dbias, parts.shape[0], width,
        ROWS=rows, BP=PARAM_ROWS, BC=PARAM_COLS,
    )  # fmt: skip
    return [dp, dweight, dbias, du, din_bias]


def launch_backward(
    g: torch.Tensor, p: torch.Tensor, weight: torch.Tensor, dp: torch.Tensor, blk: dict,
    gu: torch.Tensor | None = None, du: torch.Tensor | None = None, in_bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """`_short_conv_bwd_kernel` over contiguous g (B, C, L) and p (B, L, C) (plus `in_linear`'s
    bias, where given) into dp (and gu (B, D, L) into du (B, L, D)) with the blocks `blk`
    (`_blocks`); returns the per-program partial sums of the taps', the bias's and `in_bias`'s
    gradients, (programs along L and the batch, 4 or 5, C) fp32."""
    batch, length, width = p.shape
    grid = (triton.cdiv(length, blk["BL"]), triton.cdiv(width, blk["BC"]), triton.cdiv(batch, blk["BPG"]))
    has_u, has_in_bias = gu is not None, in_bias is not None
    rows = 5 if has_in_bias else 4
    parts = new_output((grid[2] * grid[0], rows, width), torch.float32, p.device)
    _short_conv_bwd_kernel[grid](
        g, p, weight, in_bias if has_in_bias else weight, dp, parts, gu if has_u else g, du if has_u else dp,
        batch, length, width, gu.shape[1] if has_u else 0, blk["BPG"],
        HAS_U=has_u, HAS_IN_BIAS=has_in_bias, ROWS=rows, BL=blk["BL"], BC=blk["BC"],
        PAIR_SHIFTED_INPUTS=blk["PAIR_SHIFTED_INPUTS"], PREFETCH=blk["PREFETCH"], num_warps=blk["num_warps_bwd"],
    )  # fmt: skip
    return parts


@short_conv_backward.register_fake
def _(g, gu, p, weight, in_bias):
    dp = torch.empty_like(p, memory_format=torch.contiguous_format)
    du = p.new_empty(0) if gu is None else gu.new_empty((gu.shape[0], gu.shape[2], gu.shape[1]))
    din_bias = p.new_empty(0) if in_bias is None else weight.new_empty(weight.shape[0])
    return [dp, torch.empty_like(weight), weight.new_empty(weight.shape[0]), du, din_bias]


def _setup_context(ctx, inputs, output):
    p, weight, bias, u, in_bias = inputs
    ctx.save_for_backward(p, weight, in_bias)
    ctx.bias_dtype = bias.dtype
    ctx.in_bias_dtype = None if in_bias is None else in_bias.dtype
    ctx.has_u = u is not None


def _backward(ctx, g, gu):
    p, weight, in_bias = ctx.saved_tensors
    has_gu = ctx.has_u and gu is not None
    dp, dweight, dbias, du, din_bias = short_conv_backward(g, gu if has_gu else None, p, weight, in_bias)
    din_bias = None if in_bias is None else din_bias.to(ctx.in_bias_dtype)
    return dp, dweight, dbias.to(ctx.bias_dtype), du if has_gu else None, din_bias


torch.library.register_autograd("m2dist::short_conv", _backward, setup_context=_setup_context)


def causal_short_conv(
    p_BLC: torch.Tensor, weight_C1K: torch.Tensor, bias_C: torch.Tensor, in_bias_C: torch.Tensor | None = None
) -> torch.Tensor:
    """`reference.causal_short_conv` by the kernels: (B, L, C) -> (B, C, L) in p's dtype,
    accumulated in fp32. The caller checks `supports`."""
    return short_conv(p_BLC, weight_C1K, bias_C, None, in_bias_C)[0]


def causal_short_conv_and_layout(
    p_BLC: torch.Tensor, weight_C1K: torch.Tensor, bias_C: torch.Tensor, u_BLD: torch.Tensor,
    in_bias_C: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(`causal_short_conv`, u_BLD laid out as (B, D, L)): the long convolution's two inputs in its
    layout from one kernel, where a copy of its own would transpose u (and, backward, add its
    gradient back as a transposed tensor). The caller checks `supports`."""
    return short_conv(p_BLC, weight_C1K, bias_C, u_BLD, in_bias_C)
