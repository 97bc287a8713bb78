"""Short-sequence path of the gated bidirectional long convolution: the Toeplitz products on cuBLAS.

The circular convolution of size N = 2L of a zero-padded length-L input, cut to L, is per channel
a product with an L x L Toeplitz matrix: `c = z @ W` for the (B, L) batch of the channel's
sequences, `W[s, t] = K[(t - s) mod N]`. Batched over the D channels that is one strided batched
GEMM, which cuBLAS runs at the tensor cores' rate straight from the (B, D, L) activations (the
batch stride is L, so the views the model passes need no copies). On an H200 at L=128 one such
GEMM for 32,768 tokens at d=768 takes 0.04 ms, where the Triton Toeplitz kernel
(`triton_toeplitz`), which rebuilds T's tiles from the filter row inside every program, needs
0.85 ms for its forward.

- Filters: W is gathered from the fp32 kernel row and split into a high and a low half-precision
  part (~16 mantissa bits), two GEMMs accumulated in fp32; the activations enter as they are
  (bf16 or fp16). The backward rebuilds W rather than keeping it.
- Forward: c1 = (v * x1) @ W1, c2 = u @ W2, then one elementwise pass for the gates and skips
  (z1 = c1 + z * d1 rounded as the reference rounds it, y = z1 * x2 + c2 + u * d2) that writes y
  in the (B, L, D) layout of the output projection's input.
- Backward: the input gradients are the same GEMMs with W transposed; the filter gradients are
  `z^T @ dc` per channel (a GEMM over the batch) folded along its diagonals into lags.
- The elementwise passes are torch functions; on a GPU they run `torch.compile`d, so each is one
  fused Triton kernel that also does the layout change.

Shape legend: B batch, D channels, L sequence length, N = 2L the circular kernel length.
"""

import functools

import torch
import torch.nn.functional as F

# Longest L sent to this path by the "auto" dispatch: W is D x L x L per filter part, rebuilt in
# every call, and the GEMMs do O(L) work per element against the FFT's O(log L).
MAX_LEN = 512


def supports(v_BDL: torch.Tensor) -> bool:
    """Whether this path takes the input: half-precision activations, L <= MAX_LEN."""
    return v_BDL.dtype in (torch.bfloat16, torch.float16) and v_BDL.shape[-1] <= MAX_LEN


def toeplitz_parts(k_DN: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) parts in `dtype` of W (D, L, L), W[d, s, t] = k[d, (t - s) mod 2L]; high + low
    carries k to about twice `dtype`'s precision."""
    pos = torch.arange(length, device=k_DN.device)
    w_DLL = k_DN.float()[:, (pos[None, :] - pos[:, None]) % (2 * length)]
    high = w_DLL.to(dtype)
    return high, (w_DLL - high.float()).to(dtype)


def _bmm_f32(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """acc + a @ b in fp32 for half-precision a, b (batched). cuBLAS accumulates in fp32 and writes
    fp32; elsewhere (the CPU tests) the operands are upcast, which is exact for the products."""
    if a.is_cuda:
        if acc is None:
            return torch.bmm(a, b, out_dtype=torch.float32)
        return torch.baddbmm(acc, a, b, out_dtype=torch.float32)
    out = torch.bmm(a.float(), b.float())
    return out if acc is None else acc + out


def _conv(x_BDL: torch.Tensor, parts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(D, B, L) fp32 circular convolution of x (B, D, L), unit stride in L, with W = high + low."""
    x_DBL = x_BDL.transpose(0, 1)
    return _bmm_f32(x_DBL, parts[1], _bmm_f32(x_DBL, parts[0]))


def _conv_transposed(g_BDL: torch.Tensor, parts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(D, B, L) fp32 gradient of `_conv`'s input: g @ W^T."""
    g_DBL = g_BDL.transpose(0, 1)
    return _bmm_f32(g_DBL, parts[1].transpose(1, 2), _bmm_f32(g_DBL, parts[0].transpose(1, 2)))


def _filter_grad(x_BDL: torch.Tensor, g_BDL: torch.Tensor) -> torch.Tensor:
    """(D, L, L) fp32 x^T @ g per channel: the gradient of W."""
    return _bmm_f32(x_BDL.transpose(0, 1).transpose(1, 2), g_BDL.transpose(0, 1))


def lag_sums(dw_DLL: torch.Tensor) -> torch.Tensor:
    """(D, 2L) gradient of the circular kernel from W's gradient: dk[j] = sum of dW[s, t] over
    (t - s) mod 2L = j; column L (no pair of positions has that lag) is zero.

    Flipping s and laying each row out with stride 2L - 1 puts dW[s, t] in column t - s + L - 1,
    so the lags become column sums of one strided view."""
    dim, length, _ = dw_DLL.shape
    skew = F.pad(dw_DLL.flip(1), (0, length)).flatten(1)[:, : length * (2 * length - 1)]
    by_lag = skew.view(dim, length, 2 * length - 1).sum(1)  # lag m at column m + L - 1
    zero = by_lag.new_zeros(dim, 1)
    return torch.cat([by_lag[:, length - 1 :], zero, by_lag[:, : length - 1]], dim=1)


def _rows(x_BDL: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, laid out (B, D, L) with unit stride in L (a GEMM operand)."""
    return x_BDL.to(dtype, memory_format=torch.contiguous_format)


def _as_BLD(x_BDL: torch.Tensor) -> torch.Tensor:
    """x (B, D, L) stored as (B, L, D): the layout of the output projection (and of the residual
    stream), so the caller's transposes are free."""
    return x_BDL.transpose(1, 2).contiguous().transpose(1, 2)


def _forward_prologue(u_BDL, x1_BDL, v_BDL):
    """(z = v * x1 as the reference rounds it, u in z's dtype) as GEMM operands."""
    z_BDL = _rows(v_BDL * x1_BDL, v_BDL.dtype)
    u_rows = None if u_BDL is None else _rows(u_BDL, v_BDL.dtype)
    return z_BDL, u_rows


def _forward_epilogue(c1_DBL, c2_DBL, z_BDL, x2_BDL, u_BDL, d1_D, d2_D):
    """(y in the (B, L, D) layout, z1 = conv(z) + z * d1 rounded to z's dtype)."""
    z1_BDL = (c1_DBL.transpose(0, 1) + z_BDL * d1_D[:, None]).to(z_BDL.dtype)
    y_BDL = z1_BDL.float() * x2_BDL
    if c2_DBL is not None:
        y_BDL = y_BDL + c2_DBL.transpose(0, 1) + u_BDL * d2_D[:, None]
    return _as_BLD(y_BDL.to(z_BDL.dtype)), z1_BDL


def _backward_prologue(dy_BDL, x2_BDL, residual: bool):
    """(ga = dy * x2, dy) in x2's dtype as GEMM operands (dy only with the residual conv)."""
    ga_BDL = _rows(dy_BDL * x2_BDL, x2_BDL.dtype)
    return ga_BDL, (_rows(dy_BDL, x2_BDL.dtype) if residual else None)


def _backward_epilogue(dzc_DBL, duc_DBL, dy_BDL, ga_BDL, z_BDL, z1_BDL, x1_BDL, v_BDL, u_BDL, d1_D, d2_D):
    """(dv, dx1, dx2, du, dd1, dd2) from the GEMMs' input gradients dzc (of z) and duc (of u)."""
    dtype = v_BDL.dtype
    dz_BDL = dzc_DBL.transpose(0, 1) + ga_BDL * d1_D[:, None]
    grads = [(dz_BDL * x1_BDL).to(dtype), (dz_BDL * v_BDL).to(dtype), (dy_BDL * z1_BDL).to(dtype)]
    dd1_D = (ga_BDL.float() * z_BDL).sum((0, 2))
    if duc_DBL is None:
        return (*grads, None, dd1_D, None)
    du_BDL = _as_BLD((duc_DBL.transpose(0, 1) + dy_BDL * d2_D[:, None]).to(u_BDL.dtype))
    return (*grads, du_BDL, dd1_D, (dy_BDL.float() * u_BDL).sum((0, 2)))


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


def _run(fn, *args):
    """fn, `torch.compile`d on a GPU (one fused kernel per pass); eager elsewhere."""
    on_gpu = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    return (_compiled(fn) if on_gpu else fn)(*args)


class ToeplitzGemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, x1, x2, v, k1, d1, k2, d2):
        length = v.shape[-1]
        residual = k2 is not None
        z, u_rows = _run(_forward_prologue, u, x1, v)
        c1 = _conv(z, _run(toeplitz_parts, k1, length, v.dtype))
        c2 = _conv(u_rows, _run(toeplitz_parts, k2, length, v.dtype)) if residual else None
        y, z1 = _run(_forward_epilogue, c1, c2, z, x2, u, d1.float(), d2.float() if residual else None)
        ctx.save_for_backward(u, u_rows, x1, x2, v, z, z1, k1, d1, k2, d2)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, u_rows, x1, x2, v, z, z1, k1, d1, k2, d2 = ctx.saved_tensors
        length = v.shape[-1]
        residual = k2 is not None
        ga, dy_rows = _run(_backward_prologue, dy, x2, residual)
        dzc = _conv_transposed(ga, _run(toeplitz_parts, k1, length, v.dtype))
        dk1 = _run(lag_sums, _filter_grad(z, ga)).to(k1.dtype)
        duc = dk2 = None
        if residual:
            duc = _conv_transposed(dy_rows, _run(toeplitz_parts, k2, length, v.dtype))
            dk2 = _run(lag_sums, _filter_grad(u_rows, dy_rows)).to(k2.dtype)
        dv, dx1, dx2, du, dd1, dd2 = _run(
            _backward_epilogue, dzc, duc, dy, ga, z, z1, x1, v, u, d1.float(), d2.float() if residual else None
        )
        return du, dx1, dx2, dv, dk1, dd1.to(d1.dtype), dk2, None if dd2 is None else dd2.to(d2.dtype)


def gated_long_conv(u_BDL, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN=None, d2_D=None):
    """`y = (conv(v * x1; k1) + (v * x1) * d1) * x2 + conv(u; k2) + u * d2` by batched Toeplitz GEMMs.

    x1, x2, v (B, D, L) in bf16 or fp16 (one dtype), any strides with unit stride in L; u (B, D, L)
    in any float dtype, rounded to v's for the GEMM (its skip term is not). Returns y (B, D, L) in
    v's dtype, stored as (B, L, D). k1_DN, k2_DN: (D, 2L) circular kernels; d1_D, d2_D: (D,).
    The caller (`kernels.fftconv`) checks shapes and picks this path.
    """
    if v_BDL.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the Toeplitz GEMM path takes bf16 or fp16 activations, got {v_BDL.dtype}")
    return ToeplitzGemmFunction.apply(u_BDL if k2_DN is not None else None, x1_BDL, x2_BDL, v_BDL, k1_DN, d1_D, k2_DN, d2_D)
