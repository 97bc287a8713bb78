"""Triton path of the block-diagonal ("Monarch") matmul and the GLU MLP built on it (M2_SPEC 1.3).

Kernels:
- `_bmm_kernel`: one GEMM per diagonal block, C[g] = A[g] @ B[g] (+ bias), any strides, fp32
  accumulation, optional split-K with fp32 atomics. It computes the forward y = x @ blockdiag(W)^T,
  the input gradient dy @ blockdiag(W) and the weight gradient dy_g^T @ x_g in fp32 and in Triton's
  interpreter; bf16/fp16 on a GPU take cuBLAS's batched GEMMs on strided views instead
  (`cublas_gemms`: faster by measurement).
- `_glu_fwd_kernel`: GELU(g) * n with [g, n] = x @ blockdiag(W)^T. Output column j < I belongs to
  block j // Q of the first half (input chunk j // Q) for g and to block K/2 + j // Q (input chunk
  K/2 + j // Q) for n; one program computes both GEMM tiles and applies the GLU in the epilogue,
  so the (M, 2I) pre-activation never reaches HBM.
- `_glu_bwd_kernel`: recomputes g and n the same way and writes d[g, n] = [da n GELU'(g), da GELU(g)],
  from which `_bmm_kernel` gives dx and dW.
- `_glu_act_fwd_kernel` / `_glu_act_bwd_kernel` (`glu_via_gemms`: where the GLU draws dropout and
  cuBLAS runs the plain GEMMs): the GLU as the up-projection on the plain GEMMs, writing the (M, 2I)
  pre-activation, then GELU(g) * n (and its gradient) elementwise, with the same dropout mask; the
  backward recomputes the pre-activation.
- Dropout on the GLU's output (the MLP's hidden dropout) in both kernels' epilogues: the keep mask of
  element (row, column) is a function of a seed tensor and the element's position only
  (`_dropout_keep`), so the backward regenerates the forward's mask whatever tiles each autotunes to,
  and neither the dropped output's mask nor a separate dropout pass touches HBM.

Shape legend: M rows (tokens), K number of blocks, P input features per block, Q output features
per block, I = K Q / 2 the GLU's inner size.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.triton_common import INTERPRET, dot_precision, new_output


def _configs(shapes, split_k=(1,)):
    if INTERPRET:
        bm, bn, bk, warps, stages = shapes[0]
        return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": split_k[0]}, num_warps=warps, num_stages=stages)]
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": s}, num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in shapes
        for s in split_k
    ]


_GEMM_SHAPES = [
    (64, 64, 32, 4, 1) if INTERPRET else (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
]
# The GLU kernels hold two accumulators (g and n) and stream x and W through the reduction in
# BK-wide slices, one [BM, BN] tile of g and n a program. The candidates are the six fastest of a
# sweep of 20 tiles on one H200 (`tools/bench_kernels.py --glu-sweep`; bf16, d=768, 32,768 tokens:
# forward + backward 0.88-1.04 ms, the previous candidates' autotuned choice about 0.99), mostly
# 4 warps at 64 x 128 and 128 x 64 with two or three stages, although an sm_90 compile
# (`kernels.compile_report`) showed 4-warp tiles spilling registers where 8-warp ones did not.
_GLU_SHAPES = [
    (64, 64, 32, 4, 1) if INTERPRET else (64, 128, 64, 4, 2),
    (64, 128, 32, 4, 3),
    (128, 64, 32, 4, 3),
    (128, 64, 64, 4, 2),
    (64, 256, 32, 8, 3),
    (128, 128, 32, 8, 3),
]
# "Resident" GLU programs (BM, BN, NSUB, num_warps, num_stages): the program's BM rows of x (both
# input chunks, all P features) stay on chip while it sweeps NSUB column tiles of W, so x crosses
# L2 once per NSUB * BN columns instead of once per BN (at d=768 a streamed 128 x 64 program moves
# 18 bytes from L2 per output element, a resident one sweeping 256 columns about 9). Their shared memory
# grows with P: `_prune_glu_configs` drops them where x does not fit. In an sm_90 compile at d=768
# (P = 128 + 64) the last two spill nothing in either kernel, the first nothing in the forward and
# 448 bytes a thread in the backward.
_GLU_RESIDENT_SHAPES = [
    (128, 64, 4, 8, 2),
    (128, 32, 8, 8, 2),
    (64, 32, 16, 4, 2),
]
_RESIDENT_X_BYTES = 128 * 1024
# Whether the autotuner tries the resident programs. Off: on one H200 (bf16, d=768, 32,768 tokens)
# the autotuner picked the 64 x 32 x 16 resident program and the GLU forward + backward took
# 2.36 ms against 1.83 for the streamed programs alone (an earlier run of the same benchmark, not side
# by side; its reference was 8% faster), and
# tuning them costs minutes of compilation per shape. They stay tested (forced by the tests).
_GLU_TRY_RESIDENT = False


def _glu_configs():
    streamed = [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "NSUB": 1, "RESIDENT": False}, num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in _GLU_SHAPES[: 1 if INTERPRET else None]
    ]
    if INTERPRET or not _GLU_TRY_RESIDENT:
        return streamed
    resident = [
        triton.Config({"BM": bm, "BN": bn, "BK": 32, "NSUB": nsub, "RESIDENT": True}, num_warps=warps, num_stages=stages)
        for bm, bn, nsub, warps, stages in _GLU_RESIDENT_SHAPES
    ]
    return streamed + resident


def _prune_glu_configs(configs, named_args, **kwargs):
    """Resident configs whose x rows (two chunks of PA + PB features) would not fit on chip."""
    args = {**named_args, **kwargs}
    row_bytes = 2 * (args["PA"] + args["PB"]) * args["x_ptr"].element_size()
    return [c for c in configs if not c.kwargs["RESIDENT"] or c.kwargs["BM"] * row_bytes <= _RESIDENT_X_BYTES]


def resident_split(p: int) -> tuple[int, int]:
    """(PA, PB): P as the largest power of two PA <= P and a power of two PB >= P - PA (0 if none),
    the two tiles a resident GLU program holds each input chunk in; each at least 16 wide, the
    least reduction a tensor-core `tl.dot` takes (the tiles are masked beyond P)."""
    pa = max(16, 1 << (p.bit_length() - 1))
    return pa, (max(16, triton.next_power_of_2(p - pa)) if p > pa else 0)


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's interpreter computes bf16 products wrongly: there the tiles go through fp32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _bmm_body(
    a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K,
    s_ag, s_am, s_ak, s_bg, s_bk, s_bn, s_cg, s_cm, s_cn,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C[g] = A[g] @ B[g] (+ bias[g * N + n]); A[g]: [M, K], B[g]: [K, N], C[g]: [M, N].
    Grid (tiles of M x N, groups, SPLIT_K); split-K programs add into a zeroed fp32 C."""
    i_t = tl.program_id(0)
    i_g = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    # Grouped order: GROUP_M row tiles share the column tiles of B while they sit in L2.
    n_in_group = GROUP_M * n_n
    i_first = (i_t // n_in_group) * GROUP_M
    group_size = tl.minimum(n_m - i_first, GROUP_M)
    i_m = (i_first + (i_t % n_in_group) % group_size).to(tl.int64)
    i_n = ((i_t % n_in_group) // group_size).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BK) * BK
    k_lo = i_s * k_per
    o_k = k_lo + tl.arange(0, BK)
    p_a = a_ptr + i_g * s_ag + o_m[:, None] * s_am + o_k[None, :] * s_ak
    p_b = b_ptr + i_g * s_bg + o_k[:, None] * s_bk + o_n[None, :] * s_bn
    b_acc = tl.zeros((BM, BN), tl.float32)
    k_hi = tl.minimum(k_lo + k_per, K)
    for k in range(k_lo, k_hi, BK):
        m_k = (k + tl.arange(0, BK)) < k_hi
        # [BM, BK]
        b_a = tl.load(p_a, mask=m_m[:, None] & m_k[None, :], other=0.0)
        # [BK, BN]
        b_b = tl.load(p_b, mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_acc = _mma(b_a, b_b, b_acc, PREC, UPCAST)
        p_a += BK * s_ak
        p_b += BK * s_bk
    if HAS_BIAS:
        b_acc += tl.load(bias_ptr + i_g * N + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_c = c_ptr + i_g * s_cg + o_m[:, None] * s_cm + o_n[None, :] * s_cn
    if ATOMIC:
        tl.atomic_add(p_c, b_acc, mask=m_m[:, None] & m_n[None, :])
    else:
        tl.store(p_c, b_acc.to(c_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


_bmm_kernel = triton.autotune(configs=_configs(_GEMM_SHAPES), key=["M", "N", "K", "PREC"])(_bmm_body)
_bmm_splitk_kernel = triton.autotune(
    configs=_configs(_GEMM_SHAPES[:3], split_k=(1, 4, 8) if not INTERPRET else (2,)),
    key=["M", "N", "K", "PREC"],
    reset_to_zero=["c_ptr"],
)(_bmm_body)


@triton.jit
def _gelu_parts(b_g):
    """(GELU(g), GELU'(g)) with the exact erf GELU."""
    b_cdf = 0.5 * (1.0 + tl.math.erf(b_g * 0.7071067811865476))
    b_pdf = tl.exp(-0.5 * b_g * b_g) * 0.3989422804014327
    return b_g * b_cdf, b_cdf + b_g * b_pdf


# Dropout draws 16 random bits per element: philox4x on (row, column // 8) gives 4 x 32 bits, i.e.
# the 8 columns 8c ... 8c + 7 of a row; an element is kept when its 16 bits reach round(p * 2^16).
DROPOUT_BITS = 16
DROPOUT_GROUP = 8


def kernels_draw_dropout(q: int, dropout_p: float) -> bool:
    """Whether the GLU kernels can draw dropout(dropout_p) for blocks of Q output columns: each
    Philox draw covers 8 columns, so Q must be a multiple of 8 (p = 1 drops everything)."""
    return 0.0 < dropout_p < 1.0 and q % DROPOUT_GROUP == 0


def dropout_threshold(p: float) -> int:
    """The 16-bit threshold of dropout probability p: an element is dropped when its bits are below it."""
    return round(p * (1 << DROPOUT_BITS))


@triton.jit
def _dropout_keep(seed, o_m, j0, THRESHOLD, BM: tl.constexpr, BN: tl.constexpr):
    """[BM, BN] keep mask for rows o_m and columns j0 + arange(BN), j0 a multiple of 8."""
    o_c = (j0 // 8 + tl.arange(0, BN // 8)).to(tl.uint32)
    c0 = tl.broadcast_to(o_m.to(tl.uint32)[:, None], (BM, BN // 8))
    c1 = tl.broadcast_to(o_c[None, :], (BM, BN // 8))
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    lo, hi = 0xFFFF, 16
    r01 = tl.join(tl.join(r0 & lo, r0 >> hi), tl.join(r1 & lo, r1 >> hi))
    r23 = tl.join(tl.join(r2 & lo, r2 >> hi), tl.join(r3 & lo, r3 >> hi))
    # [BM, BN // 8, 2, 2, 2] -> [BM, BN]: the 8 draws of column group c in columns 8c ... 8c + 7.
    bits = tl.reshape(tl.join(r01, r23), (BM, BN))
    return bits >= THRESHOLD


@triton.jit
def _dropout_mask_kernel(seed_ptr, keep_ptr, M, N, THRESHOLD, BM: tl.constexpr, BN: tl.constexpr):
    """keep[m, n] of `_dropout_keep` for an (M, N) output (tests, and the mask's documentation)."""
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    j0 = tl.program_id(1) * BN
    o_j = j0 + tl.arange(0, BN)
    keep = _dropout_keep(tl.load(seed_ptr), o_m, j0, THRESHOLD, BM, BN)
    tl.store(keep_ptr + o_m[:, None] * N + o_j[None, :], keep.to(tl.int8), mask=(o_m < M)[:, None] & (o_j < N)[None, :])


def dropout_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The (rows, cols) bool keep mask that the GLU kernels apply with this seed and probability."""
    keep = torch.empty((rows, cols), dtype=torch.int8, device=seed.device)
    grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 32))
    _dropout_mask_kernel[grid](seed, keep, rows, cols, dropout_threshold(p), BM=16, BN=32)
    return keep.bool()


@triton.jit
def _glu_gemms(
    x_ptr, w_ptr, i_m, i_q, i_kg, M, P, Q, s_xm,
    HALF: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr,
):  # fmt: skip
    """Tiles [BM, BN] of g (block i_kg, input chunk i_kg) and n (block and chunk i_kg + HALF).
    Offsets within the tile are int32 from an int64 base (int64 pointer tiles take two registers
    an element; `kernels.compile_report`)."""
    i_kg = i_kg.to(tl.int32)
    o_m = tl.arange(0, BM)
    o_q = i_q.to(tl.int32) * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    m_m = i_m * BM + o_m < M
    m_q = o_q < Q
    i_kn = i_kg + HALF
    # x: [BM, BK] at columns chunk * P + p; W^T: [BK, BN] at W[block, q, p].
    x_rows = x_ptr + i_m * BM * s_xm
    p_xg = x_rows + o_m[:, None] * s_xm + (i_kg * P + o_k)[None, :]
    p_xn = x_rows + o_m[:, None] * s_xm + (i_kn * P + o_k)[None, :]
    p_wg = w_ptr + (i_kg * Q + o_q)[None, :] * P + o_k[:, None]
    p_wn = w_ptr + (i_kn * Q + o_q)[None, :] * P + o_k[:, None]
    b_g = tl.zeros((BM, BN), tl.float32)
    b_n = tl.zeros((BM, BN), tl.float32)
    for k in range(0, P, BK):
        m_k = (k + o_k) < P
        m_x = m_m[:, None] & m_k[None, :]
        m_w = m_k[:, None] & m_q[None, :]
        b_g = _mma(tl.load(p_xg, mask=m_x, other=0.0), tl.load(p_wg, mask=m_w, other=0.0), b_g, PREC, UPCAST)
        b_n = _mma(tl.load(p_xn, mask=m_x, other=0.0), tl.load(p_wn, mask=m_w, other=0.0), b_n, PREC, UPCAST)
        p_xg += BK
        p_xn += BK
        p_wg += BK
        p_wn += BK
    return b_g, b_n


@triton.jit
def _x_tile(x_rows, o_m, m_m, s_xm, chunk, P, OFF: tl.constexpr, WIDTH: tl.constexpr):
    """x[rows, chunk * P + OFF : ... + WIDTH] as a [BM, WIDTH] tile, zero beyond P."""
    o_k = OFF + tl.arange(0, WIDTH)
    return tl.load(x_rows + o_m[:, None] * s_xm + (chunk * P + o_k)[None, :], mask=m_m[:, None] & (o_k < P)[None, :], other=0.0)


@triton.jit
def _wt_tile(w_ptr, block, o_q, m_q, P, Q, OFF: tl.constexpr, WIDTH: tl.constexpr):
    """W[block, o_q, OFF : OFF + WIDTH]^T as a [WIDTH, BN] tile, zero beyond P."""
    o_k = OFF + tl.arange(0, WIDTH)
    return tl.load(w_ptr + (block * Q + o_q)[None, :] * P + o_k[:, None], mask=(o_k < P)[:, None] & m_q[None, :], other=0.0)


@triton.jit
def _resident_x(x_ptr, i_m, i_kg, M, P, s_xm, HALF: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, BM: tl.constexpr):
    """The program's rows of x for g (chunk i_kg) and n (chunk i_kg + HALF), each as a PA-wide and a
    PB-wide tile (the PB tiles are unused when PB = 0)."""
    o_m = tl.arange(0, BM)
    m_m = i_m * BM + o_m < M
    x_rows = x_ptr + i_m * BM * s_xm
    xg_a = _x_tile(x_rows, o_m, m_m, s_xm, i_kg, P, 0, PA)
    xn_a = _x_tile(x_rows, o_m, m_m, s_xm, i_kg + HALF, P, 0, PA)
    xg_b, xn_b = xg_a, xn_a
    if PB > 0:
        xg_b = _x_tile(x_rows, o_m, m_m, s_xm, i_kg, P, PA, PB)
        xn_b = _x_tile(x_rows, o_m, m_m, s_xm, i_kg + HALF, P, PA, PB)
    return xg_a, xn_a, xg_b, xn_b


@triton.jit
def _glu_gemms_resident(
    xg_a, xn_a, xg_b, xn_b, w_ptr, i_q, i_kg, P, Q,
    HALF: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Tiles [BM, BN] of g and n, column tile i_q, from x rows already on chip (`_resident_x`)."""
    o_q = i_q * BN + tl.arange(0, BN)
    m_q = o_q < Q
    i_kn = i_kg + HALF
    b_g = _mma(xg_a, _wt_tile(w_ptr, i_kg, o_q, m_q, P, Q, 0, PA), tl.zeros((BM, BN), tl.float32), PREC, UPCAST)
    b_n = _mma(xn_a, _wt_tile(w_ptr, i_kn, o_q, m_q, P, Q, 0, PA), tl.zeros((BM, BN), tl.float32), PREC, UPCAST)
    if PB > 0:
        b_g = _mma(xg_b, _wt_tile(w_ptr, i_kg, o_q, m_q, P, Q, PA, PB), b_g, PREC, UPCAST)
        b_n = _mma(xn_b, _wt_tile(w_ptr, i_kn, o_q, m_q, P, Q, PA, PB), b_n, PREC, UPCAST)
    return b_g, b_n


@triton.jit
def _glu_tile(M, Q, HALF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile within a block, block of g) of this program, grouped for L2 reuse."""
    i_t = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_q = tl.cdiv(Q, BN)
    n_n = n_q * HALF
    n_in_group = GROUP_M * n_n
    i_first = (i_t // n_in_group) * GROUP_M
    group_size = tl.minimum(n_m - i_first, GROUP_M)
    i_m = (i_first + (i_t % n_in_group) % group_size).to(tl.int64)
    i_n = ((i_t % n_in_group) // group_size).to(tl.int64)
    return i_m, i_n % n_q, i_n // n_q


@triton.jit
def _glu_program(
    x_ptr, seed_ptr, M, P, Q, s_xm, HALF: tl.constexpr, DROPOUT: tl.constexpr, PA: tl.constexpr,
    PB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NSUB: tl.constexpr, RESIDENT: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """What a GLU program sets up before its column tiles: (row tile, column group, block of g,
    its rows o_m, the dropout seed (0 without), x's rows on chip (resident programs; 0 otherwise))."""
    i_m, i_c, i_kg = _glu_tile(M, Q, HALF, BM, BN * NSUB, GROUP_M)
    i_c, i_kg = i_c.to(tl.int32), i_kg.to(tl.int32)
    xg_a, xn_a, xg_b, xn_b = 0, 0, 0, 0
    if RESIDENT:
        xg_a, xn_a, xg_b, xn_b = _resident_x(x_ptr, i_m, i_kg, M, P, s_xm, HALF, PA, PB, BM)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    return i_m, i_c, i_kg, i_m * BM + tl.arange(0, BM), seed, xg_a, xn_a, xg_b, xn_b


@triton.jit
def _glu_tile_gemms(
    x_ptr, w_ptr, xg_a, xn_a, xg_b, xn_b, i_m, i_q, i_kg, M, P, Q, s_xm,
    HALF: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RESIDENT: tl.constexpr,
):  # fmt: skip
    """Tiles [BM, BN] of g and n at column tile i_q, from x on chip or streamed."""
    if RESIDENT:
        return _glu_gemms_resident(xg_a, xn_a, xg_b, xn_b, w_ptr, i_q, i_kg, P, Q, HALF, PREC, UPCAST, PA, PB, BM, BN)
    else:
        return _glu_gemms(x_ptr, w_ptr, i_m, i_q, i_kg, M, P, Q, s_xm, HALF, PREC, UPCAST, BM, BN, BK)


@triton.jit
def _glu_fwd_kernel(
    x_ptr, w_ptr, o_ptr, seed_ptr, M, P, Q, s_xm, s_om, THRESHOLD, SCALE,
    HALF: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, PA: tl.constexpr,
    PB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NSUB: tl.constexpr,
    RESIDENT: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """o[:, kg * Q + q] = GELU(g) * n for kg < HALF; x: [M, 2 HALF P], w: [2 HALF, Q, P], o: [M, HALF Q];
    with DROPOUT, times keep * SCALE. A program computes NSUB column tiles of BN (one when x streams)."""
    i_m, i_c, i_kg, o_m, seed, xg_a, xn_a, xg_b, xn_b = _glu_program(
        x_ptr, seed_ptr, M, P, Q, s_xm, HALF, DROPOUT, PA, PB, BM, BN, NSUB, RESIDENT, GROUP_M
    )
    for s in range(NSUB):
        i_q = i_c * NSUB + s
        b_g, b_n = _glu_tile_gemms(
            x_ptr, w_ptr, xg_a, xn_a, xg_b, xn_b, i_m, i_q, i_kg, M, P, Q, s_xm,
            HALF, PREC, UPCAST, PA, PB, BM, BN, BK, RESIDENT,
        )  # fmt: skip
        b_gelu, _ = _gelu_parts(b_g)
        b_o = b_gelu * b_n
        o_q = i_q * BN + tl.arange(0, BN)
        j0 = i_kg * Q + i_q * BN
        if DROPOUT:
            b_o = tl.where(_dropout_keep(seed, o_m, j0, THRESHOLD, BM, BN), b_o * SCALE, 0.0)
        p_o = o_ptr + o_m[:, None] * s_om + (j0 + tl.arange(0, BN))[None, :]
        tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=(o_m < M)[:, None] & (o_q < Q)[None, :])


@triton.jit
def _glu_bwd_kernel(
    x_ptr, w_ptr, da_ptr, dp_ptr, seed_ptr, M, P, Q, s_xm, s_dam, s_dpm, THRESHOLD, SCALE,
    HALF: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, PA: tl.constexpr,
    PB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NSUB: tl.constexpr,
    RESIDENT: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Gradient of the pre-activation, dp: [M, 2 HALF Q] (block layout), from da: [M, HALF Q] (the
    gradient of the dropped output with DROPOUT, masked here as the forward masked)."""
    i_m, i_c, i_kg, o_m, seed, xg_a, xn_a, xg_b, xn_b = _glu_program(
        x_ptr, seed_ptr, M, P, Q, s_xm, HALF, DROPOUT, PA, PB, BM, BN, NSUB, RESIDENT, GROUP_M
    )
    for s in range(NSUB):
        i_q = i_c * NSUB + s
        b_g, b_n = _glu_tile_gemms(
            x_ptr, w_ptr, xg_a, xn_a, xg_b, xn_b, i_m, i_q, i_kg, M, P, Q, s_xm,
            HALF, PREC, UPCAST, PA, PB, BM, BN, BK, RESIDENT,
        )  # fmt: skip
        b_gelu, b_dgelu = _gelu_parts(b_g)
        o_q = i_q * BN + tl.arange(0, BN)
        j0 = i_kg * Q + i_q * BN
        o_j = j0 + tl.arange(0, BN)
        m_o = (o_m < M)[:, None] & (o_q < Q)[None, :]
        # [BM, BN]
        b_da = tl.load(da_ptr + o_m[:, None] * s_dam + o_j[None, :], mask=m_o, other=0.0).to(tl.float32)
        if DROPOUT:
            b_da = tl.where(_dropout_keep(seed, o_m, j0, THRESHOLD, BM, BN), b_da * SCALE, 0.0)
        p_dg = dp_ptr + o_m[:, None] * s_dpm + o_j[None, :]
        tl.store(p_dg, (b_da * b_n * b_dgelu).to(dp_ptr.dtype.element_ty), mask=m_o)
        tl.store(p_dg + HALF * Q, (b_da * b_gelu).to(dp_ptr.dtype.element_ty), mask=m_o)


_GLU_KEY = ["M", "P", "Q", "PREC", "DROPOUT"]
_GLU_PRUNE = {"early_config_prune": _prune_glu_configs}
_glu_fwd = triton.autotune(configs=_glu_configs(), key=_GLU_KEY, prune_configs_by=_GLU_PRUNE)(_glu_fwd_kernel)
_glu_bwd = triton.autotune(configs=_glu_configs(), key=_GLU_KEY, prune_configs_by=_GLU_PRUNE)(_glu_bwd_kernel)


@triton.jit
def _glu_act_fwd_kernel(
    pre_ptr, o_ptr, seed_ptr, M, I, s_pm, s_om, THRESHOLD, SCALE,
    DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """o = GELU(g) * n (with DROPOUT, times keep * SCALE) from the pre-activation [g, n]: (M, 2I)."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    j0 = tl.program_id(1) * BN
    o_j = j0 + tl.arange(0, BN)
    m = (o_m < M)[:, None] & (o_j < I)[None, :]
    p_g = pre_ptr + o_m[:, None].to(tl.int64) * s_pm + o_j[None, :]
    b_g = tl.load(p_g, mask=m, other=0.0).to(tl.float32)
    b_n = tl.load(p_g + I, mask=m, other=0.0).to(tl.float32)
    b_gelu, _ = _gelu_parts(b_g)
    b_o = b_gelu * b_n
    if DROPOUT:
        b_o = tl.where(_dropout_keep(tl.load(seed_ptr), o_m, j0, THRESHOLD, BM, BN), b_o * SCALE, 0.0)
    tl.store(o_ptr + o_m[:, None].to(tl.int64) * s_om + o_j[None, :], b_o.to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _glu_act_bwd_kernel(
    pre_ptr, da_ptr, dp_ptr, seed_ptr, M, I, s_pm, s_dam, s_dpm, THRESHOLD, SCALE,
    DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """d[g, n] = [da n GELU'(g), da GELU(g)] (M, 2I) from the pre-activation and da (M, I), the
    gradient of the dropped output with DROPOUT (masked as the forward masked)."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    j0 = tl.program_id(1) * BN
    o_j = j0 + tl.arange(0, BN)
    m = (o_m < M)[:, None] & (o_j < I)[None, :]
    rows = o_m[:, None].to(tl.int64)
    p_g = pre_ptr + rows * s_pm + o_j[None, :]
    b_g = tl.load(p_g, mask=m, other=0.0).to(tl.float32)
    b_n = tl.load(p_g + I, mask=m, other=0.0).to(tl.float32)
    b_da = tl.load(da_ptr + rows * s_dam + o_j[None, :], mask=m, other=0.0).to(tl.float32)
    if DROPOUT:
        b_da = tl.where(_dropout_keep(tl.load(seed_ptr), o_m, j0, THRESHOLD, BM, BN), b_da * SCALE, 0.0)
    b_gelu, b_dgelu = _gelu_parts(b_g)
    p_dg = dp_ptr + rows * s_dpm + o_j[None, :]
    tl.store(p_dg, (b_da * b_n * b_dgelu).to(dp_ptr.dtype.element_ty), mask=m)
    tl.store(p_dg + I, (b_da * b_gelu).to(dp_ptr.dtype.element_ty), mask=m)


# The activation kernels' tile on a GPU, rows by output columns, and their warps: the fastest
# forward + backward of `tools/bench_kernels.py --ops none --dims 768 --act-sweep` on one H100
# (32,768 rows, I = 3072, dropout 0.1): 231 + 346 us, 87% and 96% of the copy bandwidth, against
# 244 + 418 with 32 x 128 tiles and 4 warps.
ACT_ROWS, ACT_COLS, ACT_WARPS = 8, 256, 8


def _act_grid(
    m: int, inner: int, rows: int | None = None, cols: int | None = None, warps: int | None = None
) -> tuple[dict, tuple[int, int]]:  # fmt: skip
    """The activation kernels' blocks (ACT_ROWS x ACT_COLS, ACT_WARPS on a GPU; the keywords
    override them, `tools/bench_kernels.py --act-sweep` times them) and their grid over (M, I)."""
    bm, bn, warps_default = (16, 32, 4) if INTERPRET else (ACT_ROWS, ACT_COLS, ACT_WARPS)
    blocks = dict(BM=rows or bm, BN=cols or bn, num_warps=warps or warps_default)
    return blocks, (triton.cdiv(m, blocks["BM"]), triton.cdiv(inner, blocks["BN"]))


def launch_act_forward(pre: torch.Tensor, out: torch.Tensor, dropout: dict, **tile) -> None:
    """`_glu_act_fwd_kernel` from the pre-activation (M, 2I) into out (M, I), with the dropout
    arguments `dropout` (`_dropout_args`) and the tile overrides `tile` (`_act_grid`)."""
    blocks, grid = _act_grid(out.shape[0], out.shape[1], **tile)
    _glu_act_fwd_kernel[grid](
        pre, out, M=out.shape[0], I=out.shape[1], s_pm=pre.stride(0), s_om=out.stride(0), **blocks, **dropout
    )  # fmt: skip


def launch_act_backward(pre: torch.Tensor, da: torch.Tensor, dpre: torch.Tensor, dropout: dict, **tile) -> None:
    """`_glu_act_bwd_kernel`: the pre-activation's gradient dpre (M, 2I) from pre (M, 2I) and the
    output's gradient da (M, I); arguments as `launch_act_forward`'s."""
    blocks, grid = _act_grid(da.shape[0], da.shape[1], **tile)
    _glu_act_bwd_kernel[grid](
        pre, da, dpre, M=da.shape[0], I=da.shape[1], s_pm=pre.stride(0), s_dam=da.stride(0),
        s_dpm=dpre.stride(0), **blocks, **dropout,
    )  # fmt: skip


def _bmm(a, b, out, bias, n_groups, m, n, k, a_strides, b_strides, c_strides, atomic=False):
    """Launch C[g] = A[g] @ B[g] for g < n_groups; strides are (group, row, column) triples."""
    kernel = _bmm_splitk_kernel if atomic else _bmm_kernel

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), n_groups, meta["SPLIT_K"])

    kernel[grid](
        a, b, out, bias if bias is not None else out, m, n, k, *a_strides, *b_strides, *c_strides,
        HAS_BIAS=bias is not None, ATOMIC=atomic, PREC=dot_precision(a.dtype), UPCAST=INTERPRET, GROUP_M=8,
    )  # fmt: skip


def cublas_gemms(t: torch.Tensor) -> bool:
    """Whether the plain block-diagonal GEMMs of `t` (bf16/fp16 on a GPU) run on cuBLAS, batched over
    the blocks on strided views of the rows (no copies), instead of `_bmm_body`. On one H200 (bf16,
    d=768, 32,768 tokens, the MLP's output projection) cuBLAS took 0.078 / 0.092 / 0.093 ms for the
    forward / input gradient / weight gradient, the Triton kernel at the best of 16 tiles 0.107 /
    0.139 / 0.114 (`tools/bench_kernels.py --ops gemms`). fp32 (tf32x3 in the kernel) and the
    interpreter keep the Triton kernel."""
    return not INTERPRET and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


def column_blocks(t: torch.Tensor, nb: int) -> torch.Tensor:
    """(M, nb * F) rows as the (nb, M, F) view of their nb column blocks (no copy)."""
    return t.view(t.shape[0], nb, -1).transpose(0, 1)


def bmm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b batched, accumulated and returned in fp32 (cuBLAS writes fp32 from half inputs)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def _cublas_fwd(x_MKP: torch.Tensor, w_KQP: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    nb, q, _ = w_KQP.shape
    y = new_output((x_MKP.shape[0], nb * q), x_MKP.dtype, x_MKP.device)
    torch.bmm(column_blocks(x_MKP, nb), w_KQP.transpose(1, 2), out=column_blocks(y, nb))
    return y if bias is None else y.add_(bias)


def _cublas_dx(dy_MKQ: torch.Tensor, w_KQP: torch.Tensor) -> torch.Tensor:
    nb, _, p = w_KQP.shape
    dx = new_output((dy_MKQ.shape[0], nb * p), dy_MKQ.dtype, dy_MKQ.device)
    torch.bmm(column_blocks(dy_MKQ, nb), w_KQP, out=column_blocks(dx, nb))
    return dx


def _cublas_dw(dy_MKQ: torch.Tensor, x_MKP: torch.Tensor, w_KQP: torch.Tensor) -> torch.Tensor:
    nb = w_KQP.shape[0]
    return bmm_fp32(column_blocks(dy_MKQ, nb).transpose(1, 2), column_blocks(x_MKP, nb))


def _triton_fwd(x_MKP: torch.Tensor, w_KQP: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m = x_MKP.shape[0]
    nb, q, p = w_KQP.shape
    y = new_output((m, nb * q), x_MKP.dtype, x_MKP.device)
    _bmm(
        x_MKP, w_KQP, y, bias, nb, m, q, p,
        (p * x_MKP.stride(1), x_MKP.stride(0), x_MKP.stride(1)),
        (w_KQP.stride(0), w_KQP.stride(2), w_KQP.stride(1)),
        (q * y.stride(1), y.stride(0), y.stride(1)),
    )  # fmt: skip
    return y


def _triton_dx(dy_MKQ: torch.Tensor, w_KQP: torch.Tensor) -> torch.Tensor:
    m = dy_MKQ.shape[0]
    nb, q, p = w_KQP.shape
    dx = new_output((m, nb * p), dy_MKQ.dtype, dy_MKQ.device)
    _bmm(
        dy_MKQ, w_KQP, dx, None, nb, m, p, q,
        (q * dy_MKQ.stride(1), dy_MKQ.stride(0), dy_MKQ.stride(1)),
        (w_KQP.stride(0), w_KQP.stride(1), w_KQP.stride(2)),
        (p * dx.stride(1), dx.stride(0), dx.stride(1)),
    )  # fmt: skip
    return dx


def _triton_dw(dy_MKQ: torch.Tensor, x_MKP: torch.Tensor, w_KQP: torch.Tensor) -> torch.Tensor:
    m = x_MKP.shape[0]
    nb, q, p = w_KQP.shape
    dw = torch.zeros((nb, q, p), dtype=torch.float32, device=x_MKP.device)
    # dw[g] = dy_g^T @ x_g: rows q, reduction over the M tokens (split across programs).
    _bmm(
        dy_MKQ, x_MKP, dw, None, nb, q, p, m,
        (q * dy_MKQ.stride(1), dy_MKQ.stride(1), dy_MKQ.stride(0)),
        (p * x_MKP.stride(1), x_MKP.stride(0), x_MKP.stride(1)),
        (dw.stride(0), dw.stride(1), dw.stride(2)),
        atomic=True,
    )  # fmt: skip
    return dw


class BlockdiagGemms(NamedTuple):
    """The three GEMMs of y = x @ blockdiag(w)^T (+ bias), x_MKP: (M, K*P), w_KQP: (K, Q, P):
    `fwd(x, w, bias)` -> y (M, K*Q); `dx(dy, w)` -> (M, K*P); `dw(dy, x, w)` -> (K, Q, P) in fp32."""

    fwd: Callable
    dx: Callable
    dw: Callable


GEMMS = {
    "triton": BlockdiagGemms(_triton_fwd, _triton_dx, _triton_dw),
    "cublas": BlockdiagGemms(_cublas_fwd, _cublas_dx, _cublas_dw),
}


def gemms_for(t: torch.Tensor) -> BlockdiagGemms:
    """The GEMMs that run for inputs like `t` (`cublas_gemms`)."""
    return GEMMS["cublas" if cublas_gemms(t) else "triton"]


def blockdiag_fwd(x_MKP: torch.Tensor, w_KQP: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ blockdiag(w)^T (+ bias). x_MKP: (M, K*P), w_KQP: (K, Q, P), bias: (K*Q,) -> (M, K*Q)."""
    return gemms_for(x_MKP).fwd(x_MKP, w_KQP, bias)


def blockdiag_bwd(dy_MKQ: torch.Tensor, x_MKP: torch.Tensor, w_KQP: torch.Tensor, need_dx: bool = True):
    """(dx (M, K*P) or None, dw (K, Q, P) fp32) of y = x @ blockdiag(w)^T."""
    gemms = gemms_for(x_MKP)
    return gemms.dx(dy_MKQ, w_KQP) if need_dx else None, gemms.dw(dy_MKQ, x_MKP, w_KQP)


def _draws_dropout(seed: torch.Tensor | None, dropout_p: float) -> bool:
    """Whether a GLU call with this seed and probability applies dropout."""
    return seed is not None and dropout_p > 0


def _dropout_args(seed: torch.Tensor | None, dropout_p: float, q: int, like: torch.Tensor) -> dict:
    """The GLU kernels' dropout arguments: the seed tensor (a dummy pointer without dropout)."""
    on = _draws_dropout(seed, dropout_p)
    if on and not kernels_draw_dropout(q, dropout_p):
        raise ValueError(f"the GLU kernels' dropout needs Q % {DROPOUT_GROUP} == 0 and p < 1, got Q={q}, p={dropout_p}")
    return dict(
        seed_ptr=seed if on else like, THRESHOLD=dropout_threshold(dropout_p) if on else 0,
        SCALE=1.0 / (1.0 - dropout_p) if on else 1.0, DROPOUT=on,
    )  # fmt: skip


# The GLU as its up-projection on the plain block-diagonal GEMMs (`gemms_for`: cuBLAS for bf16/fp16 on
# a GPU), writing the (M, 2I) pre-activation, then an elementwise kernel for GELU(g) * n (and the
# dropout); the backward recomputes the pre-activation the same way. The fused GLU kernels never
# write it, but drawing the dropout mask in their GEMM epilogues costs more than the traffic saved:
# on one H200, bf16, 32,768 tokens, the MLP forward + backward took 2.017 ms via the GEMMs against
# 2.270 fused with dropout at d=768 (2.447 against 2.508 at d=960), and 1.995 against 1.752 without
# (2.259 against 2.203). `tools/bench_kernels.py --ops glu` times both. True / False force a path.
GLU_VIA_GEMMS: bool | None = None


def glu_via_gemms(x: torch.Tensor, dropout: bool) -> bool:
    """Whether the GLU of `x` runs as the plain GEMMs and the activation kernels (`GLU_VIA_GEMMS`):
    by default where it draws dropout and cuBLAS runs the GEMMs, the fused kernels otherwise."""
    if GLU_VIA_GEMMS is not None:
        return GLU_VIA_GEMMS
    return dropout and cublas_gemms(x)


# Whether the GLU on the plain GEMMs keeps its (M, 2I) pre-activation, which its forward writes
# anyway, for the backward (`m2dist::blockdiag_glu_kept`) instead of recomputing it there: one
# up-projection GEMM fewer a layer (in the engine's profile at L=128 the recomputation is 12 of
# the up-projection's 24 launches a step, 1.8 ms) for 2I bf16 values more of saved activations a
# token and layer (12 KiB at d=768). On one H200 (`tools/bench_kernels.py --ops glu`, 32,768 tokens,
# with dropout) the GLU's forward + backward takes 1.88 against 2.32 ms at d=768 and 2.10 against
# 2.41 at d=960; the engine's M2-BERT-80M step at L=128 (batch 256) 60.7 against 62.9 ms, its
# peak memory 18.0 against 13.5 GiB.
GLU_KEEPS_PRE_ACTIVATION = True


def keeps_pre_activation(x: torch.Tensor, dropout: bool) -> bool:
    """Whether the GLU of `x` keeps its pre-activation for the backward: on the plain GEMMs
    (`glu_via_gemms`) with `GLU_KEEPS_PRE_ACTIVATION`."""
    return GLU_KEEPS_PRE_ACTIVATION and glu_via_gemms(x, dropout)


def _glu_grid(m: int, q: int, nb: int):
    """Programs of the GLU kernels: row tiles x column groups of NSUB * BN x the g blocks."""

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(q, meta["BN"] * meta["NSUB"]) * (nb // 2),)

    return grid


def glu_fwd(
    x_MKP: torch.Tensor, w_KQP: torch.Tensor, seed: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """GELU(g) * n, [g, n] = x @ blockdiag(w)^T. x_MKP: (M, K*P), w_KQP: (K, Q, P) -> (M, K*Q/2); with a
    seed and dropout_p > 0, dropout of it (Q a multiple of 8)."""
    m = x_MKP.shape[0]
    nb, q, p = w_KQP.shape
    if glu_via_gemms(x_MKP, _draws_dropout(seed, dropout_p)):
        return glu_fwd_via_gemms(x_MKP, w_KQP, seed, dropout_p)[0]
    out = new_output((m, nb * q // 2), x_MKP.dtype, x_MKP.device)
    pa, pb = resident_split(p)
    _glu_fwd[_glu_grid(m, q, nb)](
        x_MKP, w_KQP, out, M=m, P=p, Q=q, s_xm=x_MKP.stride(0), s_om=out.stride(0), HALF=nb // 2,
        PREC=dot_precision(x_MKP.dtype), UPCAST=INTERPRET, PA=pa, PB=pb, GROUP_M=8,
        **_dropout_args(seed, dropout_p, q, out),
    )  # fmt: skip
    return out


def glu_fwd_via_gemms(
    x_MKP: torch.Tensor, w_KQP: torch.Tensor, seed: torch.Tensor | None = None, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`glu_fwd`'s output, the (M, K*Q) pre-activation [g, n]) on the plain GEMMs and the
    activation kernel (`glu_via_gemms`)."""
    m = x_MKP.shape[0]
    nb, q, _ = w_KQP.shape
    out = new_output((m, nb * q // 2), x_MKP.dtype, x_MKP.device)
    pre = gemms_for(x_MKP).fwd(x_MKP, w_KQP, None)
    launch_act_forward(pre, out, _dropout_args(seed, dropout_p, q, out))
    return out, pre


def glu_bwd(
    da_MI: torch.Tensor, x_MKP: torch.Tensor, w_KQP: torch.Tensor, seed: torch.Tensor | None = None,
    dropout_p: float = 0.0, pre: torch.Tensor | None = None,
):  # fmt: skip
    """(dx (M, K*P), dw (K, Q, P) fp32) of `glu_fwd` with the same seed and dropout_p; the dropout
    mask is recomputed, and the pre-activation unless the forward's `pre` is given (then on the
    plain GEMMs, as `glu_fwd_via_gemms` computed it)."""
    m = x_MKP.shape[0]
    nb, q, p = w_KQP.shape
    dpre = new_output((m, nb * q), x_MKP.dtype, x_MKP.device)
    if pre is not None or glu_via_gemms(x_MKP, _draws_dropout(seed, dropout_p)):
        if pre is None:
            pre = gemms_for(x_MKP).fwd(x_MKP, w_KQP, None)
        launch_act_backward(pre, da_MI, dpre, _dropout_args(seed, dropout_p, q, dpre))
        return blockdiag_bwd(dpre, x_MKP, w_KQP)
    pa, pb = resident_split(p)
    _glu_bwd[_glu_grid(m, q, nb)](
        x_MKP, w_KQP, da_MI, dpre, M=m, P=p, Q=q, s_xm=x_MKP.stride(0), s_dam=da_MI.stride(0),
        s_dpm=dpre.stride(0), HALF=nb // 2, PREC=dot_precision(x_MKP.dtype), UPCAST=INTERPRET, PA=pa, PB=pb,
        GROUP_M=8, **_dropout_args(seed, dropout_p, q, dpre),
    )  # fmt: skip
    return blockdiag_bwd(dpre, x_MKP, w_KQP)


def _rows(x: torch.Tensor, features: int) -> torch.Tensor:
    """x as (M, features) rows of unit stride, the layout the kernels index."""
    x = x.reshape(-1, features)
    return x if x.stride(1) == 1 else x.contiguous()


# The ops take (M, K*P) rows and a (K, Q, P) weight in one dtype and return fresh contiguous
# tensors, as the fake implementations state to torch.compile; the weight gradient is fp32.
@torch.library.custom_op("m2dist::blockdiag_matmul", mutates_args=())
def blockdiag_matmul_op(x_MKP: torch.Tensor, weight_KQP: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    nb, q, p = weight_KQP.shape
    return blockdiag_fwd(_rows(x_MKP, nb * p), weight_KQP.contiguous(), bias)


@blockdiag_matmul_op.register_fake
def _(x_MKP, weight_KQP, bias):
    nb, q, _ = weight_KQP.shape
    return x_MKP.new_empty((x_MKP.shape[0], nb * q))


@torch.library.custom_op("m2dist::blockdiag_matmul_backward", mutates_args=())
def blockdiag_matmul_backward(
    dy_MKQ: torch.Tensor, x_MKP: torch.Tensor, weight_KQP: torch.Tensor, need_dx: bool
) -> list[torch.Tensor]:
    """[dw (K, Q, P) fp32] preceded by dx (M, K*P) if `need_dx`."""
    nb, q, p = weight_KQP.shape
    dx, dw = blockdiag_bwd(_rows(dy_MKQ, nb * q), _rows(x_MKP, nb * p), weight_KQP.contiguous(), need_dx)
    return [dx, dw] if need_dx else [dw]


@blockdiag_matmul_backward.register_fake
def _(dy_MKQ, x_MKP, weight_KQP, need_dx):
    dw = weight_KQP.new_empty(weight_KQP.shape, dtype=torch.float32)
    return [x_MKP.new_empty(x_MKP.shape), dw] if need_dx else [dw]


def _matmul_setup_context(ctx, inputs, output):
    x_MKP, weight_KQP, bias = inputs
    ctx.save_for_backward(x_MKP, weight_KQP)
    ctx.has_bias = bias is not None


def _matmul_backward(ctx, dy_MKQ):
    x_MKP, weight_KQP = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    grads = blockdiag_matmul_backward(dy_MKQ, x_MKP, weight_KQP, need_dx)
    dx = grads[0] if need_dx else None
    dbias = dy_MKQ.sum(0, dtype=torch.float32).to(dy_MKQ.dtype) if ctx.has_bias else None
    return dx, grads[-1].to(weight_KQP.dtype), dbias


torch.library.register_autograd("m2dist::blockdiag_matmul", _matmul_backward, setup_context=_matmul_setup_context)


@torch.library.custom_op("m2dist::blockdiag_glu", mutates_args=())
def blockdiag_glu_op(
    x_MKP: torch.Tensor, weight_KQP: torch.Tensor, seed: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    nb, q, p = weight_KQP.shape
    return glu_fwd(_rows(x_MKP, nb * p), weight_KQP.contiguous(), seed, dropout_p)


@blockdiag_glu_op.register_fake
def _(x_MKP, weight_KQP, seed, dropout_p):
    nb, q, _ = weight_KQP.shape
    return x_MKP.new_empty((x_MKP.shape[0], nb * q // 2))


@torch.library.custom_op("m2dist::blockdiag_glu_backward", mutates_args=())
def blockdiag_glu_backward(
    da_MI: torch.Tensor, x_MKP: torch.Tensor, weight_KQP: torch.Tensor, seed: torch.Tensor | None, dropout_p: float,
    pre_MKQ: torch.Tensor | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """[dx (M, K*P), dw (K, Q, P) fp32]; the dropout mask is recomputed, and the pre-activation
    unless the forward kept it (`pre_MKQ`, from `blockdiag_glu_kept_op`)."""
    nb, q, p = weight_KQP.shape
    pre = None if pre_MKQ is None else _rows(pre_MKQ, nb * q)
    dx, dw = glu_bwd(_rows(da_MI, nb * q // 2), _rows(x_MKP, nb * p), weight_KQP.contiguous(), seed, dropout_p, pre)
    return [dx, dw]


@blockdiag_glu_backward.register_fake
def _(da_MI, x_MKP, weight_KQP, seed, dropout_p, pre_MKQ=None):
    return [x_MKP.new_empty(x_MKP.shape), weight_KQP.new_empty(weight_KQP.shape, dtype=torch.float32)]


def _glu_setup_context(ctx, inputs, output):
    x_MKP, weight_KQP, seed, ctx.dropout_p = inputs
    ctx.save_for_backward(x_MKP, weight_KQP, seed)


def _glu_backward(ctx, da_MI):
    x_MKP, weight_KQP, seed = ctx.saved_tensors
    dx, dw = blockdiag_glu_backward(da_MI, x_MKP, weight_KQP, seed, ctx.dropout_p)
    return dx, dw.to(weight_KQP.dtype), None, None


torch.library.register_autograd("m2dist::blockdiag_glu", _glu_backward, setup_context=_glu_setup_context)


# The GLU on the plain GEMMs keeping its pre-activation for the backward (`keeps_pre_activation`).
@torch.library.custom_op("m2dist::blockdiag_glu_kept", mutates_args=())
def blockdiag_glu_kept_op(
    x_MKP: torch.Tensor, weight_KQP: torch.Tensor, seed: torch.Tensor | None, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the GLU's output (M, K*Q/2), its pre-activation (M, K*Q))."""
    nb, q, p = weight_KQP.shape
    return glu_fwd_via_gemms(_rows(x_MKP, nb * p), weight_KQP.contiguous(), seed, dropout_p)


@blockdiag_glu_kept_op.register_fake
def _(x_MKP, weight_KQP, seed, dropout_p):
    nb, q, _ = weight_KQP.shape
    return x_MKP.new_empty((x_MKP.shape[0], nb * q // 2)), x_MKP.new_empty((x_MKP.shape[0], nb * q))


def _glu_kept_setup_context(ctx, inputs, output):
    x_MKP, weight_KQP, seed, ctx.dropout_p = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x_MKP, weight_KQP, seed, output[1])


def _glu_kept_backward(ctx, da_MI, _dpre):
    x_MKP, weight_KQP, seed, pre_MKQ = ctx.saved_tensors
    dx, dw = blockdiag_glu_backward(da_MI, x_MKP, weight_KQP, seed, ctx.dropout_p, pre_MKQ)
    return dx, dw.to(weight_KQP.dtype), None, None


torch.library.register_autograd("m2dist::blockdiag_glu_kept", _glu_kept_backward, setup_context=_glu_kept_setup_context)


def glu_rows(x_MKP: torch.Tensor, weight_KQP: torch.Tensor, seed: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """The GLU op of rows x_MKP (M, K*P) -> (M, K*Q/2): the one that keeps its pre-activation for
    the backward where `keeps_pre_activation`, else the one that recomputes it."""
    if keeps_pre_activation(x_MKP, _draws_dropout(seed, dropout_p)):
        return blockdiag_glu_kept_op(x_MKP, weight_KQP, seed, dropout_p)[0]
    return blockdiag_glu_op(x_MKP, weight_KQP, seed, dropout_p)


def _check(x: torch.Tensor, weight_KQP: torch.Tensor) -> None:
    if weight_KQP.dim() != 3 or x.shape[-1] != weight_KQP.shape[0] * weight_KQP.shape[2]:
        raise ValueError(f"x's last dim must be K*P for a (K, Q, P) weight, got {tuple(x.shape)} and {tuple(weight_KQP.shape)}")


def _cast(x: torch.Tensor, *params):
    """Autocast's rule for a matmul (inputs to the autocast dtype), else the weights to x's dtype;
    the casts are differentiable, so fp32 master weights get fp32 gradients."""
    dtype = x.dtype
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    return [t if t is None else t.to(dtype) for t in (x, *params)]


@triton.jit
def _bias_residual_kernel(y_ptr, bias_ptr, r_ptr, out_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr):
    """out = y + bias + r on the [BM, BN] tile (i_m, i_n) of the (M, N) rows, summed in fp32 and
    rounded once to out's dtype."""
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    m = (o_m[:, None] < M) & m_n[None, :]
    p = o_m[:, None].to(tl.int64) * N + o_n[None, :]
    acc = tl.load(y_ptr + p, mask=m, other=0.0).to(tl.float32)
    acc += tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(r_ptr + p, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + p, acc.to(out_ptr.dtype.element_ty), mask=m)


class _BiasResidualAdd(torch.autograd.Function):
    """y + bias + residual over (M, N) rows in one pass (`_bias_residual_kernel`); the backward passes
    the gradient on to y and the residual and sums it for the bias."""

    @staticmethod
    def forward(ctx, y_MN, bias_N, r_MN):
        rows, width = y_MN.shape
        out = new_output((rows, width), y_MN.dtype, y_MN.device)
        grid = (triton.cdiv(rows, BIAS_RESIDUAL_ROWS), triton.cdiv(width, BIAS_RESIDUAL_COLS))
        _bias_residual_kernel[grid](y_MN, bias_N, r_MN, out, rows, width, BM=BIAS_RESIDUAL_ROWS, BN=BIAS_RESIDUAL_COLS)
        return out

    @staticmethod
    def backward(ctx, g_MN):
        return g_MN, g_MN.sum(0), g_MN


# `_bias_residual_kernel`'s tile.
BIAS_RESIDUAL_ROWS, BIAS_RESIDUAL_COLS = 16, 256


def add_bias_and_residual(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """y + bias + residual for y (..., N), bias (N,) and residual shaped as y: one Triton pass where
    all three share y's dtype and are contiguous, run eagerly (aten adds a broadcast bias with its
    non-vectorized kernel, then the residual in a second pass); torch's adds elsewhere, inside a
    compiled graph too, where Inductor fuses them."""
    fused = (
        not torch.compiler.is_compiling()
        and residual.shape == y.shape
        and all(t.dtype == y.dtype and t.is_contiguous() for t in (y, bias, residual))
    )
    if not fused:
        return y + bias + residual
    width = y.shape[-1]
    return _BiasResidualAdd.apply(y.reshape(-1, width), bias, residual.reshape(-1, width)).reshape(y.shape)


def blockdiag_matmul(
    x: torch.Tensor, weight_KQP: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ blockdiag(weight)^T + bias (+ residual). x: (..., K*P), weight_KQP: (K, Q, P), bias:
    (K*Q,) or None, residual: (..., K*Q) or None -> (..., K*Q)."""
    _check(x, weight_KQP)
    x, weight_KQP, bias = _cast(x, weight_KQP, bias)
    nb, q, p = weight_KQP.shape
    # The Triton GEMM adds the bias in its epilogue. cuBLAS's batched GEMM has no bias epilogue, so
    # on cuBLAS the bias is added here, outside the op, where a compiled graph fuses it into the
    # kernel that follows (the MLP's residual add and LayerNorm), and an eager one adds it with the
    # residual in one pass (`add_bias_and_residual`); inside the op it was a broadcast add of its
    # own over the output, one aten `elementwise_kernel` a layer (71 us at 32,768 tokens, d=768, in
    # the engine's profile on one H200).
    bias_in_op = None if cublas_gemms(x) else bias
    y_MKQ = blockdiag_matmul_op(x.reshape(-1, nb * p), weight_KQP, bias_in_op)
    y = y_MKQ.reshape(*x.shape[:-1], nb * q)
    if bias is not None and bias_in_op is None:
        if residual is not None:
            return add_bias_and_residual(y, bias, residual)
        y = y + bias
    return y if residual is None else y + residual


def blockdiag_glu(x: torch.Tensor, weight_KQP: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """dropout(GELU(g) * n) with [g, n] = x @ blockdiag(weight)^T split in halves. x: (..., K*P),
    weight_KQP: (K, Q, P) with K even -> (..., K*Q/2). Dropout (probability `dropout_p`, 0 for none)
    runs in the kernels' epilogues, its mask drawn from a seed that the CUDA generator draws (so
    CUDA graphs and activation checkpointing see it as any dropout); where a block's outputs are not
    a multiple of 8 columns, or p = 1, it runs after them instead."""
    _check(x, weight_KQP)
    if weight_KQP.shape[0] % 2:
        raise ValueError(f"the fused GLU needs an even number of blocks, got {weight_KQP.shape[0]}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {dropout_p}")
    x, weight_KQP = _cast(x, weight_KQP)
    nb, q, p = weight_KQP.shape
    fused = kernels_draw_dropout(q, dropout_p)
    seed = torch.randint(0, 2**62, (1,), device=x.device) if fused else None
    a = glu_rows(x.reshape(-1, nb * p), weight_KQP, seed, dropout_p if fused else 0.0)
    a = a.reshape(*x.shape[:-1], nb * q // 2)
    return torch.nn.functional.dropout(a, dropout_p) if dropout_p > 0 and not fused else a
