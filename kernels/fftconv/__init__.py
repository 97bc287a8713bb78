"""Gated bidirectional FFT long convolution: the sequence mixer's heavy op.

A layer resolves the backend its config names once (`implementation`) and calls the result; each
backend computes the same function as `reference.gated_long_conv`.
"""

import functools
from collections.abc import Callable

import torch

from kernels import use_triton
from kernels.fftconv import reference
from kernels.fftconv.reference import bidirectional_filter
from kernels.triton_common import can_run, warn_once


def _triton_gated_long_conv(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D):
    """The faster Triton algorithm for the input: cuFFT's transforms from `CUFFT_MIN_LEN` on, the
    Toeplitz GEMM for half-precision inputs up to `triton_toeplitz.MAX_LEN`, the FFT (DFT matmuls)
    otherwise; the reference (warned once) where none can run (a CPU without Triton's interpreter,
    L above `triton_fftconv.MAX_SEQLEN`)."""
    # Imported on first use: the Triton modules must be imported after TRITON_INTERPRET is set,
    # and `import kernels.fftconv` must work on machines without a GPU.
    from kernels.fftconv import triton_fftconv, triton_toeplitz

    length = v_BDL.shape[-1]
    if takes_cufft(v_BDL):
        from kernels.fftconv import triton_cufft

        return triton_cufft.gated_long_conv(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D)
    if not can_run(v_BDL) or length > triton_fftconv.MAX_SEQLEN:
        warn_once(
            f"fftconv triton backend: L={length} on {v_BDL.device.type} is not supported "
            f"(L <= {triton_fftconv.MAX_SEQLEN}, CUDA or TRITON_INTERPRET=1); using the reference"
        )
        return reference.gated_long_conv(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D)
    impl = triton_toeplitz if triton_toeplitz.supports(v_BDL) else triton_fftconv
    return impl.gated_long_conv(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D)


def _check_shapes(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D) -> None:
    if v_BDL.dim() != 3:
        raise ValueError(f"v_BDL must be (batch, channels, length), got shape {tuple(v_BDL.shape)}")
    _, dim, length = v_BDL.shape
    # The gated branch's inputs share one dtype; u, the residual branch's input, may differ (under
    # autocast it is the layer's fp32 input while the projections are bf16).
    for name, t in (("x1_BDL", x1_BDL), ("x2_BDL", x2_BDL)):
        if t.shape != v_BDL.shape or t.dtype != v_BDL.dtype:
            raise ValueError(
                f"{name} must have v_BDL's shape {tuple(v_BDL.shape)} and dtype {v_BDL.dtype}, "
                f"got {tuple(t.shape)} {t.dtype}"
            )
    if k2_DN is not None and u_BDL.shape != v_BDL.shape:
        raise ValueError(f"u_BDL must have v_BDL's shape {tuple(v_BDL.shape)}, got {tuple(u_BDL.shape)}")
    for name, k, d in (("k1_DN", k1_DN, d1_D), ("k2_DN", k2_DN, d2_D)):
        if k is not None and (k.shape != (dim, 2 * length) or d.shape != (dim,)):
            raise ValueError(
                f"{name} must be ({dim}, {2 * length}) with a ({dim},) skip weight, got {tuple(k.shape)}, {tuple(d.shape)}"
            )


# The shortest L from which the Triton backend computes the long convolution's transforms with cuFFT
# (`triton_cufft`: fp32 real-to-complex transforms, the gates and spectrum products in Triton
# kernels around them) instead of the DFT-matmul kernels (`triton_fftconv`); None: never. Measured on
# one H100 (`tools/bench_kernels.py --ops fftconv,mixer`, the sequence mixer with bf16 gates and fp32
# u as under autocast, d=768, 65,536 tokens, forward + backward; docs/performance.md, "The cuFFT
# path"): 8.28 against the DFT-matmul kernels' 11.16 ms at L=512, 8.19 against 14.75 at 1024, 8.09
# against 12.57 at 2048, 8.62 against 16.44 at 8192, 13.02 against 42.12 at 32768. L = 129 ... 511
# was not measured (L <= 128 takes the Toeplitz kernels).
CUFFT_MIN_LEN: int | None = 512


def takes_cufft(v_BDL: torch.Tensor) -> bool:
    """Whether the Triton backend takes the cuFFT path for this input (`CUFFT_MIN_LEN`): any float
    dtype, on a GPU or in Triton's interpreter (torch.fft's CPU transforms around the kernels)."""
    return CUFFT_MIN_LEN is not None and v_BDL.shape[-1] >= CUFFT_MIN_LEN and can_run(v_BDL)


# Where the cuFFT path does not take the input (`CUFFT_MIN_LEN` None or above L), the longest L at
# which "auto" takes the Triton kernels; longer inputs take torch.fft (the reference). Measured on
# one H200 (bf16, d=768, 65,536 tokens, forward + backward, the FFT kernels with their default
# operands, `tools/bench_kernels.py --ops fftconv,mixer`): at L=32768 the FFT
# kernels took 34.2 ms against torch.fft's 16.0; at L=8192 the sequence mixer with them took 16.0 ms
# against 16.8 with torch.fft (both with the compiled reference short convolution), at 2048 12.8
# against 15.4; at L=16384 (4 x 16384 tokens) 22.4 ms against 18.6 with torch.fft.
AUTO_TRITON_MAX_LEN = 8192


def _auto_takes_triton(v_BDL: torch.Tensor) -> bool:
    """"auto"'s choice: the Triton kernels on an Ampere or newer GPU (`use_triton`) up to
    `AUTO_TRITON_MAX_LEN` and wherever the cuFFT path takes the input, the reference elsewhere."""
    return use_triton(v_BDL) and (v_BDL.shape[-1] <= AUTO_TRITON_MAX_LEN or takes_cufft(v_BDL))


def _auto_gated_long_conv(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D):
    impl = _triton_gated_long_conv if _auto_takes_triton(v_BDL) else reference.gated_long_conv
    return impl(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D)


def _unpacked(impl, u_BDL, x_BCL, k1_DN, d1_D, k2_DN, d2_D):
    return impl(u_BDL, *x_BCL.chunk(3, dim=1), k1_DN, d1_D, k2_DN, d2_D)


def _triton_packed(u_BDL, x_BCL, k1_DN, d1_D, k2_DN, d2_D):
    """The cuFFT and Toeplitz paths take the packed tensor as it is (no split, and its gradient comes
    back in one buffer); the DFT-matmul kernels take its three views."""
    from kernels.fftconv import triton_toeplitz

    if takes_cufft(x_BCL):
        from kernels.fftconv import triton_cufft

        return triton_cufft.packed_gated_long_conv(u_BDL, x_BCL, k1_DN, d1_D, k2_DN, d2_D)
    if triton_toeplitz.supports(x_BCL):  # a GPU or the interpreter, bf16/fp16, L <= MAX_LEN
        return triton_toeplitz.packed_gated_long_conv(u_BDL, x_BCL, k1_DN, d1_D, k2_DN, d2_D)
    return _unpacked(_triton_gated_long_conv, u_BDL, x_BCL, k1_DN, d1_D, k2_DN, d2_D)


def _auto_packed(u_BDL, x_BCL, k1_DN, d1_D, k2_DN, d2_D):
    if _auto_takes_triton(x_BCL):
        return _triton_packed(u_BDL, x_BCL, k1_DN, d1_D, k2_DN, d2_D)
    return _unpacked(reference.gated_long_conv, u_BDL, x_BCL, k1_DN, d1_D, k2_DN, d2_D)


# "auto": the Triton kernels on an Ampere or newer GPU up to AUTO_TRITON_MAX_LEN, the reference
# elsewhere; "triton" forces the kernels at every length they take.
_BACKENDS = {"auto": _auto_gated_long_conv, "reference": reference.gated_long_conv, "triton": _triton_gated_long_conv}
_PACKED_BACKENDS = {
    "auto": _auto_packed,
    "reference": functools.partial(_unpacked, reference.gated_long_conv),
    "triton": _triton_packed,
}
BACKENDS = tuple(_BACKENDS)

GatedLongConv = Callable[..., torch.Tensor]


def _checked(impl: GatedLongConv, u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN=None, d2_D=None) -> torch.Tensor:
    if (k2_DN is None) != (d2_D is None):
        raise ValueError("k2_DN and d2_D must be given together")
    _check_shapes(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D)
    return impl(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D)


def _checked_packed(impl: GatedLongConv, u_BDL, x_BCL, k1_DN, d1_D, k2_DN=None, d2_D=None) -> torch.Tensor:
    if (k2_DN is None) != (d2_D is None):
        raise ValueError("k2_DN and d2_D must be given together")
    if x_BCL.dim() != 3 or x_BCL.shape[1] % 3:
        raise ValueError(f"x_BCL must be (batch, 3 * channels, length), got shape {tuple(x_BCL.shape)}")
    _check_shapes(u_BDL, *x_BCL.chunk(3, dim=1), k1_DN, d1_D, k2_DN, d2_D)
    return impl(u_BDL, x_BCL, k1_DN, d1_D, k2_DN, d2_D)


def implementation(backend: str, packed: bool = False) -> GatedLongConv:
    """`gated_long_conv` of `backend`, with its argument checks; a layer resolves its backend once,
    when it is built, and calls the result. `packed`: called as `(u_BDL, x_BCL, k1_DN, d1_D, k2_DN,
    d2_D)` with the gated branch's inputs as one (B, 3D, L) tensor x = [x1; x2; v] (as the short
    convolution writes them), whose gradient then comes back in one buffer where the kernels allow."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown fftconv backend {backend!r}; expected one of {BACKENDS}")
    if packed:
        return functools.partial(_checked_packed, _PACKED_BACKENDS[backend])
    return functools.partial(_checked, _BACKENDS[backend])


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

    u_BDL, x1_BDL, x2_BDL, v_BDL: (B, D, L); k1_DN, k2_DN: (D, 2L) circular filters from
    `bidirectional_filter`; d1_D, d2_D: (D,). k2/d2 None drops the residual long convolution.
    Returns (B, D, L) in the dtype of the inputs.
    """
    return implementation(backend)(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D)


__all__ = ["BACKENDS", "GatedLongConv", "bidirectional_filter", "gated_long_conv", "implementation"]
