"""The gated bidirectional long convolution with cuFFT's transforms around Triton's gate kernels
(M2_SPEC 1.1 steps 4-7): `y = (conv(v * x1; k1) + (v * x1) * d1) * x2 + conv(u; k2) + u * d2`.

Where `triton_fftconv` computes the transforms on chip as products of small DFT matrices, this path
leaves them to cuFFT (`torch.fft`: fp32, real input, half spectra of L + 1 frequencies) and fuses
everything between them into Triton kernels, three a direction plus the transforms:

- forward: `_pad_kernel` writes the transforms' inputs, a = v * x1 and u zero-padded to N = 2L, as
  the slots of one fp32 buffer (S, B, D, N); one batched rfft; `_spectra_kernel` multiplies each
  slot by its filter's spectrum and writes the product in the form the inverse takes (below); one
  batched complex inverse; `_fwd_gates_kernel` adds the skip terms, applies the post-gate and
  writes y (B, D, L), and z1 = y1 + d1 a (the gated convolution before the post-gate) in x's dtype
  for the backward's dx2, as the Toeplitz path keeps it. With gradients needed it also keeps its
  spectra for the backward: A, U and the filters' K1, K2.
- backward: `_pad_kernel` writes g1 = dy * x2 and dy; one rfft; `_spectra_kernel` forms G1 conj(K1)
  (the correlation that gives da) and H conj(K2) (du) and sums the filters' gradient spectra over
  the batch, sum_b conj(A) G1 and sum_b conj(U) H, from the forward's spectra; one complex inverse
  of both; `_bwd_gates_kernel` finishes the input gradients, packed as x, and the skip weights'
  partial sums. Keeping the spectra took the engine step of `m2-bert-80M-8k` (batch 4, L=8192)
  from 102.92 to 95.69 ms on one H100, for 5.7 GiB more at the peak (about 0.5 GiB a layer: 2 x B
  x D x (L + 1) complex64 for the inputs and 2 x D x (L + 1) for the filters; a layer under
  activation checkpointing keeps them only from its recomputation to its backward).

With rfft(k) unscaled and irfft's 1/N, irfft(rfft(a) rfft(k)) is the circular convolution of size
N, whose first L outputs are the bidirectional convolution (the padding keeps the wrap-around
out); the filters' gradients come back in the time domain as irfft(sum_b conj(A) G), the
correlation of the input with the output gradient.

The inverses are not irfft: torch's real inverse copies its input first (cuFFT's complex-to-real
transform overwrites it) and scales its output by 1/N in a pass of its own, two extra passes over
the largest buffer. The spectrum kernel instead writes, for each product Y, the spectrum Z of size
M = L of the complex sequence y[2n] + i y[2n + 1] (the standard real-from-half-size-complex
identity, `_half_spectrum_pair`) with the 1/N folded in; an unnormalized complex inverse of Z is
then the real result, its floats in order. The filters' gradient spectra take the same form.

Measured on one H100 (docs/performance.md, "The cuFFT path"): forward + backward faster than the
DFT-matmul kernels from L=512 on and than torch.fft's autograd at every length measured, 512 ...
32768. Pairing two real sequences of like scale in one complex transform (a + i u, and one complex
inverse for two real results) measured 1.6-1.8x slower than these real transforms at L = 512 ...
8192.

Shape legend: B batch, D channels, L sequence length, N = 2L the transform size, F = L + 1 the
half spectrum, M = L, S slots of a buffer.
"""

import torch
import triton
import triton.language as tl

from kernels.fftconv.triton_fftconv import complex_mul
from kernels.triton_common import new_output, strides

# Tiles of the element-wise kernels: (channels, positions) per program, and warps.
PAD_BLOCK = (32, 128)
GATES_BLOCK = (32, 128)
GATES_WARPS = 4
# Frequencies per program of `_spectra_kernel` (each program loops over the batch).
SPECTRA_BLOCK = 512


@triton.jit
def _pad_kernel(
    out_ptr, x_ptr, u_ptr, dy_ptr,
    D, L, slot,
    s_xb, s_xd, s_xl, s_ub, s_ud, s_ul, s_gb, s_gd, s_gl,
    GRAD: tl.constexpr, HAS_RES: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """The transforms' inputs as the slots of out (S, B, D, 2L) fp32, `slot` elements apart, each
    zero from L on: forward a = v * x1, then with HAS_RES u; with GRAD g1 = dy * x2, then with
    HAS_RES dy. x: (B, 3D, L) = [x1; x2; v]."""
    i_n = tl.program_id(0)
    i_d = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    N = 2 * L
    o_d = i_d * BD + tl.arange(0, BD)
    o_n = i_n * BN + tl.arange(0, BN)
    m_d = (o_d < D)[:, None]
    m_in = m_d & (o_n < L)[None, :]
    m_out = m_d & (o_n < N)[None, :]
    p_x = x_ptr + i_b * s_xb + o_d[:, None] * s_xd + o_n[None, :] * s_xl
    p_out = out_ptr + (i_b * D + o_d[:, None]) * N + o_n[None, :]
    if GRAD:
        b_x2 = tl.load(p_x + D * s_xd, mask=m_in, other=0.0).to(tl.float32)
        b_dy = tl.load(dy_ptr + i_b * s_gb + o_d[:, None] * s_gd + o_n[None, :] * s_gl, mask=m_in, other=0.0).to(tl.float32)
        tl.store(p_out, b_dy * b_x2, mask=m_out)
        if HAS_RES:
            tl.store(p_out + slot, b_dy, mask=m_out)
    else:
        b_x1 = tl.load(p_x, mask=m_in, other=0.0).to(tl.float32)
        b_v = tl.load(p_x + 2 * D * s_xd, mask=m_in, other=0.0).to(tl.float32)
        tl.store(p_out, b_v * b_x1, mask=m_out)
        if HAS_RES:
            p_u = u_ptr + i_b * s_ub + o_d[:, None] * s_ud + o_n[None, :] * s_ul
            tl.store(p_out + slot, tl.load(p_u, mask=m_in, other=0.0).to(tl.float32), mask=m_out)


@triton.jit
def _load_complex(ptr, p, m):
    """(re, im) of the complex numbers at float offsets p (each the real part's), one vector load."""
    pair = tl.arange(0, 2)[None, :]
    return tl.split(tl.load(ptr + p[:, None] + pair, mask=m[:, None] & (pair < 2), other=0.0))


@triton.jit
def _store_complex(ptr, p, re, im, m):
    pair = tl.arange(0, 2)[None, :]
    tl.store(ptr + p[:, None] + pair, tl.join(re, im), mask=m[:, None] & (pair < 2))


@triton.jit
def _half_spectrum_pair(pr, pi, qr, qi, tr, ti, scale):
    """Z[k] and Z[M - k] of the complex sequence z[n] = y[2n] + i y[2n + 1] (times `scale`), from
    the real y's half spectrum at k (p) and M - k (q), M = N / 2 and t = exp(i pi k / M): with
    E = (p + conj q) / 2 and O = (p - conj q) t / 2 (the even and odd samples' spectra at k),
    Z[k] = E + i O and Z[M - k] = conj E + i conj O."""
    er = (pr + qr) * 0.5
    ei = (pi - qi) * 0.5
    or_, oi = complex_mul((pr - qr) * 0.5, (pi + qi) * 0.5, tr, ti)
    return (er - oi) * scale, (ei + or_) * scale, (er + oi) * scale, (or_ - ei) * scale


@triton.jit
def _store_half_spectrum_pair(z_ptr, p_zk, p_zq, m_k, m_zq, pr, pi, qr, qi, tr, ti, scale):
    """`_half_spectrum_pair` of a half spectrum's values at k (p) and M - k (q), stored at z_ptr."""
    zkr, zki, zqr, zqi = _half_spectrum_pair(pr, pi, qr, qi, tr, ti, scale)
    _store_complex(z_ptr, p_zk, zkr, zki, m_k)
    _store_complex(z_ptr, p_zq, zqr, zqi, m_zq)


@triton.jit
def _product_to_half_spectrum(x_ptr, z_ptr, p_p, p_q, p_zk, p_zq, m_k, m_zq, kpr, kpi, kqr, kqi, tr, ti, scale):
    """The product of the spectrum at x_ptr with a filter's (k at k and M - k: p and q) written to
    z_ptr in the inverse's half-size form (`_half_spectrum_pair`); returns the spectrum's values."""
    xpr, xpi = _load_complex(x_ptr, p_p, m_k)
    xqr, xqi = _load_complex(x_ptr, p_q, m_k)
    pr, pi = complex_mul(xpr, xpi, kpr, kpi)
    qr, qi = complex_mul(xqr, xqi, kqr, kqi)
    _store_half_spectrum_pair(z_ptr, p_zk, p_zq, m_k, m_zq, pr, pi, qr, qi, tr, ti, scale)
    return xpr, xpi, xqr, xqi


@triton.jit
def _conj_times(a_ptr, p, m, xr, xi):
    """conj(a) x, a loaded at float offsets p: a term of a filter's gradient spectrum."""
    ar, ai = _load_complex(a_ptr, p, m)
    return complex_mul(ar, -ai, xr, xi)


@triton.jit
def _spectra_kernel(
    s_ptr, a_ptr, z_ptr, k1_ptr, k2_ptr, dk1_ptr, dk2_ptr, B, D, M, slot, z_slot,
    GRAD: tl.constexpr, HAS_RES: tl.constexpr, BF: tl.constexpr,
):  # fmt: skip
    """The products of the half spectra s (S, B, D, M + 1), S the products (1 or 2), with the
    filters' k1, k2 (D, M + 1), written as the inverse transforms' inputs: z (S, B, D, M), each
    product Y in the half-size form Z whose unnormalized complex inverse of size M is irfft(Y) (1/N
    included) with its even and odd samples as real and imaginary parts, y[2n] + i y[2n + 1].
    Complex numbers as (re, im) floats; the slots of s (and a) `slot` floats apart, of z `z_slot`.
    Forward: slots A[, U] -> A K1[, U K2]. GRAD: slots G1[, H] -> G1 conj(K1)[, H conj(K2)], and
    with the forward's spectra a (S, B, D, M + 1) = [A, U], the filters' gradient spectra
    sum_b conj(A) G1[, sum_b conj(U) H] in the same half-size form, dk1[, dk2] (D, M). One program:
    one channel, BF frequencies k <= M / 2 and their mirrors M - k, every batch row."""
    i_f = tl.program_id(0)
    i_d = tl.program_id(1).to(tl.int64)
    F = M + 1
    o_k = i_f * BF + tl.arange(0, BF)
    m_k = o_k <= M // 2
    o_q = M - o_k
    # Z has M entries: the mirror of k = 0 is the Nyquist frequency, an input only.
    m_zq = m_k & (o_k > 0)
    angle = o_k.to(tl.float32) * (3.141592653589793 / M)
    b_tr = tl.cos(angle)
    b_ti = tl.sin(angle)
    scale = 1.0 / M
    p_kp = (i_d * F + o_k) * 2
    p_kq = (i_d * F + o_q) * 2
    b_k1pr, b_k1pi = _load_complex(k1_ptr, p_kp, m_k)
    b_k1qr, b_k1qi = _load_complex(k1_ptr, p_kq, m_k)
    if HAS_RES:
        b_k2pr, b_k2pi = _load_complex(k2_ptr, p_kp, m_k)
        b_k2qr, b_k2qi = _load_complex(k2_ptr, p_kq, m_k)
    if GRAD:
        # The filters' conjugates: the backward's products are correlations.
        b_k1pi = -b_k1pi
        b_k1qi = -b_k1qi
        if HAS_RES:
            b_k2pi = -b_k2pi
            b_k2qi = -b_k2qi
        b_dk1pr = tl.zeros((BF,), tl.float32)
        b_dk1pi = tl.zeros((BF,), tl.float32)
        b_dk1qr = tl.zeros((BF,), tl.float32)
        b_dk1qi = tl.zeros((BF,), tl.float32)
        b_dk2pr = tl.zeros((BF,), tl.float32)
        b_dk2pi = tl.zeros((BF,), tl.float32)
        b_dk2qr = tl.zeros((BF,), tl.float32)
        b_dk2qi = tl.zeros((BF,), tl.float32)
    for i_b in range(B):
        row = i_b * D + i_d
        p_p = (row * F + o_k) * 2
        p_q = (row * F + o_q) * 2
        p_zk = (row * M + o_k) * 2
        p_zq = (row * M + o_q) * 2
        b_xpr, b_xpi, b_xqr, b_xqi = _product_to_half_spectrum(
            s_ptr, z_ptr, p_p, p_q, p_zk, p_zq, m_k, m_zq, b_k1pr, b_k1pi, b_k1qr, b_k1qi, b_tr, b_ti, scale
        )
        if GRAD:
            b_cr, b_ci = _conj_times(a_ptr, p_p, m_k, b_xpr, b_xpi)
            b_dk1pr += b_cr
            b_dk1pi += b_ci
            b_cr, b_ci = _conj_times(a_ptr, p_q, m_k, b_xqr, b_xqi)
            b_dk1qr += b_cr
            b_dk1qi += b_ci
        if HAS_RES:
            b_xpr, b_xpi, b_xqr, b_xqi = _product_to_half_spectrum(
                s_ptr + slot, z_ptr + z_slot, p_p, p_q, p_zk, p_zq, m_k, m_zq,
                b_k2pr, b_k2pi, b_k2qr, b_k2qi, b_tr, b_ti, scale,
            )  # fmt: skip
            if GRAD:
                b_cr, b_ci = _conj_times(a_ptr + slot, p_p, m_k, b_xpr, b_xpi)
                b_dk2pr += b_cr
                b_dk2pi += b_ci
                b_cr, b_ci = _conj_times(a_ptr + slot, p_q, m_k, b_xqr, b_xqi)
                b_dk2qr += b_cr
                b_dk2qi += b_ci
    if GRAD:
        # As the products, in the half-size form (k = M / 2 is its own mirror: both stores write
        # the same value): an unnormalized complex inverse gives the filter's gradient, where
        # torch's irfft would copy its input and scale its output, a pass over each of its own.
        p_zk = (i_d * M + o_k) * 2
        p_zq = (i_d * M + o_q) * 2
        _store_half_spectrum_pair(dk1_ptr, p_zk, p_zq, m_k, m_zq, b_dk1pr, b_dk1pi, b_dk1qr, b_dk1qi, b_tr, b_ti, scale)
        if HAS_RES:
            _store_half_spectrum_pair(
                dk2_ptr, p_zk, p_zq, m_k, m_zq, b_dk2pr, b_dk2pi, b_dk2qr, b_dk2qi, b_tr, b_ti, scale
            )


@triton.jit
def _tile(i_d, i_l, D, L, BD: tl.constexpr, BL: tl.constexpr):
    o_d = i_d * BD + tl.arange(0, BD)
    o_l = i_l * BL + tl.arange(0, BL)
    return o_d, o_l, (o_d < D)[:, None] & (o_l < L)[None, :]


@triton.jit
def _fwd_gates_kernel(
    y_ptr, z1_ptr, c_ptr, x_ptr, u_ptr, d1_ptr, d2_ptr,
    D, L, slot,
    s_xb, s_xd, s_xl, s_ub, s_ud, s_ul,
    HAS_RES: tl.constexpr, SAVE_Z1: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
):  # fmt: skip
    """y = z1 x2 + y2 + d2 u with z1 = y1 + d1 a into y (B, D, L) (and with SAVE_Z1 z1 (B, D, L) in
    its dtype), from the convolutions c (S, B, D, 2L) (y1, y2: the first L of slots `slot` elements
    apart), x = [x1; x2; v] and u."""
    i_l = tl.program_id(0)
    i_d = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_d, o_l, m = _tile(i_d, i_l, D, L, BD, BL)
    p_x = x_ptr + i_b * s_xb + o_d[:, None] * s_xd + o_l[None, :] * s_xl
    b_x1 = tl.load(p_x, mask=m, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_x + D * s_xd, mask=m, other=0.0).to(tl.float32)
    b_v = tl.load(p_x + 2 * D * s_xd, mask=m, other=0.0).to(tl.float32)
    p_c = c_ptr + (i_b * D + o_d[:, None]) * (2 * L) + o_l[None, :]
    b_d1 = tl.load(d1_ptr + o_d, mask=o_d < D, other=0.0).to(tl.float32)[:, None]
    b_z1 = tl.load(p_c, mask=m, other=0.0) + b_d1 * b_v * b_x1
    p_out = (i_b * D + o_d[:, None]) * L + o_l[None, :]
    if SAVE_Z1:
        tl.store(z1_ptr + p_out, b_z1.to(z1_ptr.dtype.element_ty), mask=m)
    b_y = b_z1 * b_x2
    if HAS_RES:
        b_u = tl.load(u_ptr + i_b * s_ub + o_d[:, None] * s_ud + o_l[None, :] * s_ul, mask=m, other=0.0).to(tl.float32)
        b_d2 = tl.load(d2_ptr + o_d, mask=o_d < D, other=0.0).to(tl.float32)[:, None]
        b_y += tl.load(p_c + slot, mask=m, other=0.0) + b_d2 * b_u
    tl.store(y_ptr + p_out, b_y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_gates_kernel(
    dx_ptr, du_ptr, dd_ptr, c_ptr, z1_ptr, x_ptr, u_ptr, dy_ptr, d1_ptr, d2_ptr,
    D, L, slot, dd_slot,
    s_xb, s_xd, s_xl, s_ub, s_ud, s_ul, s_gb, s_gd, s_gl,
    HAS_RES: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
):  # fmt: skip
    """The input gradients from the correlations c (S, B, D, 2L) of g1 with k1 and of dy with k2
    (the first L of slots `slot` elements apart) and the forward's z1: dx (B, 3D, L) packed as x,
    du (B, D, L); dd (1 or 2, B * n_l, D; `dd_slot` = B n_l D apart) the skip weights' partial sums
    over the program's positions."""
    i_l = tl.program_id(0)
    i_d = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_d, o_l, m = _tile(i_d, i_l, D, L, BD, BL)
    m_d = o_d < D
    p_x = x_ptr + i_b * s_xb + o_d[:, None] * s_xd + o_l[None, :] * s_xl
    b_x1 = tl.load(p_x, mask=m, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_x + D * s_xd, mask=m, other=0.0).to(tl.float32)
    b_v = tl.load(p_x + 2 * D * s_xd, mask=m, other=0.0).to(tl.float32)
    b_dy = tl.load(dy_ptr + i_b * s_gb + o_d[:, None] * s_gd + o_l[None, :] * s_gl, mask=m, other=0.0).to(tl.float32)
    p_c = c_ptr + (i_b * D + o_d[:, None]) * (2 * L) + o_l[None, :]
    p_out = (i_b * D + o_d[:, None]) * L + o_l[None, :]
    b_z1 = tl.load(z1_ptr + p_out, mask=m, other=0.0).to(tl.float32)
    b_d1 = tl.load(d1_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    b_g1 = b_dy * b_x2
    b_da = tl.load(p_c, mask=m, other=0.0) + b_d1 * b_g1
    p_dx = dx_ptr + (i_b * 3 * D + o_d[:, None]) * L + o_l[None, :]
    ty = dx_ptr.dtype.element_ty
    tl.store(p_dx, (b_da * b_v).to(ty), mask=m)
    tl.store(p_dx + D * L, (b_dy * b_z1).to(ty), mask=m)
    tl.store(p_dx + 2 * D * L, (b_da * b_x1).to(ty), mask=m)
    # The partial sums' row: (batch row, position block).
    p_dd = dd_ptr + (i_b * tl.num_programs(0) + i_l) * D + o_d
    tl.store(p_dd, tl.sum(b_g1 * b_v * b_x1, axis=1), mask=m_d)
    if HAS_RES:
        b_u = tl.load(u_ptr + i_b * s_ub + o_d[:, None] * s_ud + o_l[None, :] * s_ul, mask=m, other=0.0).to(tl.float32)
        b_d2 = tl.load(d2_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
        b_du = tl.load(p_c + slot, mask=m, other=0.0) + b_d2 * b_dy
        tl.store(du_ptr + p_out, b_du.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(p_dd + dd_slot, tl.sum(b_dy * b_u, axis=1), mask=m_d)


def _out_dtype(x: torch.Tensor, u: torch.Tensor | None, has_res: bool) -> torch.dtype:
    """The output's dtype, the reference's: x's, promoted with u's where the residual branch adds it
    (under autocast u is the layer's fp32 input while the gates are bf16)."""
    return torch.promote_types(x.dtype, u.dtype) if has_res else x.dtype


def _transformed(x, u, dy, has_res: bool) -> torch.Tensor:
    """rfft of `_pad_kernel`'s slots, (S, B, D, L + 1) complex64: the forward's [A, U], with dy
    the backward's [G1, H]."""
    batch, width, length = x.shape
    dim = width // 3
    grad = dy is not None
    padded = new_output((2 if has_res else 1, batch, dim, 2 * length), torch.float32, x.device)
    bd, bn = PAD_BLOCK
    uu = u if has_res else x
    gg = dy if grad else x
    _pad_kernel[(triton.cdiv(2 * length, bn), triton.cdiv(dim, bd), batch)](
        padded, x, uu, gg, dim, length, padded[0].numel(), *strides(x, uu, gg),
        GRAD=grad, HAS_RES=has_res, BD=bd, BN=bn,
    )  # fmt: skip
    return torch.fft.rfft(padded)


def _convolved(
    spectra: torch.Tensor, k1_spectrum: torch.Tensor, k2_spectrum: torch.Tensor | None,
    forward_spectra: torch.Tensor | None = None,
):  # fmt: skip
    """`_spectra_kernel` on `spectra` (`_transformed`'s) with the filters' spectra (D, L + 1)
    complex64, then the inverse transforms: (c, dk1, dk2) with c (1 or 2, B, D, 2L) fp32 the
    convolutions (in the backward, given the forward's spectra, the correlations) of which the
    first L are the output's; in the backward also the filters' gradients dk (D, 2L) fp32 (dk2
    None without the residual branch)."""
    _, batch, dim, freqs = spectra.shape
    half = freqs - 1
    grad = forward_spectra is not None
    has_res = k2_spectrum is not None
    k2_spectrum = k1_spectrum if k2_spectrum is None else k2_spectrum
    dk1 = k1_spectrum.new_empty((dim, half)) if grad else k1_spectrum
    dk2 = k1_spectrum.new_empty((dim, half)) if grad and has_res else dk1
    z = torch.empty((2 if has_res else 1, batch, dim, half), dtype=spectra.dtype, device=spectra.device)
    a = forward_spectra if grad else spectra
    _spectra_kernel[(triton.cdiv(half // 2 + 1, SPECTRA_BLOCK), dim)](
        *(torch.view_as_real(t) for t in (spectra, a, z, k1_spectrum, k2_spectrum, dk1, dk2)), batch, dim, half,
        2 * spectra[0].numel(), 2 * z[0].numel(), GRAD=grad, HAS_RES=has_res, BF=SPECTRA_BLOCK,
    )  # fmt: skip
    del spectra
    # The complex inverse of size L, unnormalized (the kernel scaled z): no copy of its input, which
    # the real inverse's C2R transform would overwrite, and no scaling pass after it.
    c = _real_inverse(z)
    return c, (_real_inverse(dk1) if grad else None), (_real_inverse(dk2) if grad and has_res else None)


def _real_inverse(z: torch.Tensor) -> torch.Tensor:
    """The real sequences (..., 2M) fp32 whose half-size forms (`_half_spectrum_pair`, 1/N
    included) z (..., M) complex64 holds."""
    return torch.view_as_real(torch.fft.ifft(z, norm="forward")).flatten(-2)


def _gates_grid(batch: int, dim: int, length: int) -> tuple[int, int, int]:
    bd, bl = GATES_BLOCK
    return triton.cdiv(length, bl), triton.cdiv(dim, bd), batch


# The ops take the gated branch's inputs packed as x = [x1; x2; v] along the channels (B, 3D, L), as
# the short convolution writes them, in any strides (u too: the model passes a transposed view of
# its (B, L, D) input), and return fresh contiguous tensors, which is what the fake implementations
# state to torch.compile. The residual branch is present iff k2 is given. For the backward the
# forward keeps, besides z1, the spectra it computed: the inputs' [A, U] (S, B, D, L + 1) and the
# filters' (D, L + 1), as (re, im) float pairs; the backward then transforms only g1 and dy.
@torch.library.custom_op("m2dist::cufft_conv", mutates_args=())
def cufft_conv(
    u: torch.Tensor | None, x: torch.Tensor, k1: torch.Tensor, d1: torch.Tensor,
    k2: torch.Tensor | None, d2: torch.Tensor | None, for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y, z1, spectra, k1_spectrum, k2_spectrum): the output (B, D, L) in `_out_dtype`; if
    `for_backward`, the gated convolution before the post-gate, y1 + d1 v x1, in x's dtype, and the
    spectra (fp32 (..., L + 1, 2); k2's empty without the residual branch), else empty tensors."""
    batch, width, length = x.shape
    dim = width // 3
    has_res = k2 is not None
    spectra = _transformed(x, u, None, has_res)
    k1_spectrum = torch.fft.rfft(k1.float())
    k2_spectrum = torch.fft.rfft(k2.float()) if has_res else None
    conv, _, _ = _convolved(spectra, k1_spectrum, k2_spectrum)
    y = new_output((batch, dim, length), _out_dtype(x, u, has_res), x.device)
    z1 = new_output((batch, dim, length), x.dtype, x.device) if for_backward else x.new_empty(0)
    uu = u if has_res else x
    bd, bl = GATES_BLOCK
    _fwd_gates_kernel[_gates_grid(batch, dim, length)](
        y, z1 if for_backward else y, conv, x, uu, d1, d2 if has_res else d1, dim, length, conv[0].numel(),
        *strides(x, uu), HAS_RES=has_res, SAVE_Z1=for_backward, BD=bd, BL=bl, num_warps=GATES_WARPS,
    )  # fmt: skip
    if not for_backward:
        return y, z1, *(x.new_empty(0, dtype=torch.float32) for _ in range(3))
    kept = [torch.view_as_real(t) for t in (spectra, k1_spectrum)]
    return y, z1, *kept, torch.view_as_real(k2_spectrum) if has_res else x.new_empty(0, dtype=torch.float32)


@cufft_conv.register_fake
def _(u, x, k1, d1, k2, d2, for_backward):
    batch, width, length = x.shape
    shape = (batch, width // 3, length)
    y = x.new_empty(shape, dtype=_out_dtype(x, u, k2 is not None))
    if not for_backward:
        return y, x.new_empty(0), *(x.new_empty(0, dtype=torch.float32) for _ in range(3))
    freqs = (width // 3, length + 1, 2)
    slots = 1 if k2 is None else 2
    kept = [x.new_empty((slots, batch, *freqs), dtype=torch.float32), x.new_empty(freqs, dtype=torch.float32)]
    return y, x.new_empty(shape), *kept, x.new_empty(freqs if k2 is not None else (0,), dtype=torch.float32)


@torch.library.custom_op("m2dist::cufft_conv_backward", mutates_args=())
def cufft_conv_backward(
    dy: torch.Tensor, u: torch.Tensor | None, x: torch.Tensor, z1: torch.Tensor, spectra: torch.Tensor,
    k1_spectrum: torch.Tensor, k2_spectrum: torch.Tensor, k1: torch.Tensor, d1: torch.Tensor,
    k2: torch.Tensor | None, d2: torch.Tensor | None,
) -> list[torch.Tensor]:  # fmt: skip
    """[dx, dk1, dd1] and, with the residual branch, [du, dk2, dd2] after them; dx packed as x
    (B, 3D, L), each gradient in its input's dtype. z1 and the spectra: the forward's."""
    batch, width, length = x.shape
    dim = width // 3
    has_res = k2 is not None
    conv, dk1, dk2 = _convolved(
        _transformed(x, u, dy, has_res), torch.view_as_complex(k1_spectrum),
        torch.view_as_complex(k2_spectrum) if has_res else None, torch.view_as_complex(spectra),
    )  # fmt: skip
    dx = new_output(x.shape, x.dtype, x.device)
    du = new_output(u.shape, u.dtype, u.device) if has_res else dx
    n_l, n_d, _ = _gates_grid(batch, dim, length)
    dd_parts = new_output((2 if has_res else 1, batch * n_l, dim), torch.float32, x.device)
    uu = u if has_res else x
    bd, bl = GATES_BLOCK
    _bwd_gates_kernel[(n_l, n_d, batch)](
        dx, du, dd_parts, conv, z1, x, uu, dy, d1, d2 if has_res else d1, dim, length, conv[0].numel(),
        dd_parts[0].numel(), *strides(x, uu, dy), HAS_RES=has_res, BD=bd, BL=bl, num_warps=GATES_WARPS,
    )  # fmt: skip
    grads = [dx, dk1.to(k1.dtype), dd_parts[0].sum(0).to(d1.dtype)]
    if has_res:
        grads += [du, dk2.to(k2.dtype), dd_parts[1].sum(0).to(d2.dtype)]
    return grads


@cufft_conv_backward.register_fake
def _(dy, u, x, z1, spectra, k1_spectrum, k2_spectrum, k1, d1, k2, d2):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, k1, d1)]
    if k2 is not None:
        grads += [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (u, k2, d2)]
    return grads


def _cufft_setup_context(ctx, inputs, output):
    u, x, k1, d1, k2, d2, _ = inputs
    ctx.save_for_backward(u, x, *output[1:], k1, d1, k2, d2)


def _cufft_backward(ctx, dy, *_):
    u, x, z1, spectra, k1_spectrum, k2_spectrum, k1, d1, k2, d2 = ctx.saved_tensors
    grads = cufft_conv_backward(dy, u, x, z1, spectra, k1_spectrum, k2_spectrum, k1, d1, k2, d2)
    dx, dk1, dd1 = grads[:3]
    du, dk2, dd2 = grads[3:] if k2 is not None else (None, None, None)
    return du, dx, dk1, dd1, dk2, dd2, None


torch.library.register_autograd("m2dist::cufft_conv", _cufft_backward, setup_context=_cufft_setup_context)


def packed_gated_long_conv(u_BDL, x_BCL, k1_DN, d1_D, k2_DN=None, d2_D=None):
    """`gated_long_conv` with the gated branch's inputs packed as x = [x1; x2; v] (B, 3D, L), as the
    short convolution writes them; its gradient comes back packed the same way. The output has x's
    dtype, promoted with u's (as the reference's). k1_DN, k2_DN: (D, 2L) circular filters; d1_D,
    d2_D: (D,). The caller checks shapes."""
    has_res = k2_DN is not None
    inputs = (u_BDL if has_res else None, x_BCL, k1_DN, d1_D, k2_DN, d2_D)
    for_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return cufft_conv(*inputs, for_backward)[0]


def gated_long_conv(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN=None, d2_D=None):
    """`y = (conv(v * x1; k1) + (v * x1) * d1) * x2 + conv(u; k2) + u * d2` with cuFFT's transforms.

    x1, x2, v (B, D, L) (one dtype), packed into one tensor here (one copy; the sequence mixer passes
    the packed tensor to `packed_gated_long_conv` instead); otherwise as `packed_gated_long_conv`."""
    return packed_gated_long_conv(u_BDL, torch.cat([x1_BDL, x2_BDL, v_BDL], dim=1), k1_DN, d1_D, k2_DN, d2_D)
