"""The Triton kernels against the float64 references, forward and every gradient.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before the kernel
modules are imported) on tiny shapes; the `gpu` tests run the same checks at real sizes. A kernel's
error against float64 must stay within twice torch's own error at the same input precision, plus
a small atol (`err(kernel) <= 2 * err(torch) + atol`), and every output starts NaN-filled.
"""

import dataclasses
import functools
import math
import os

import pytest
import torch
import triton
import triton.language as tl

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.blockdiag import reference as blockdiag_reference  # noqa: E402
from kernels.blockdiag import triton_blockdiag  # noqa: E402
from kernels.fftconv import reference as fftconv_reference  # noqa: E402
from kernels.fftconv import triton_cufft, triton_fftconv, triton_toeplitz  # noqa: E402
from kernels.mixer import reference as mixer_reference  # noqa: E402
from kernels.mixer import triton_mixer  # noqa: E402
from kernels import triton_common  # noqa: E402
from m2dist.config import KernelConfig, load_config  # noqa: E402
from m2dist.models.m2 import M2Layer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f64 = torch.float64


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts NaN-filled, so an element the kernel forgets to write fails."""
    monkeypatch.setattr(triton_common, "POISON_OUTPUTS", True)


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert not a.isnan().any(), "NaN in the output: an element was not written"
    return (a.double() - ref).abs().max().item()


def _check(name: str, kernel_out, torch_out, ref, atol_rel: float) -> None:
    """err(kernel) <= 2 err(torch at the same precision) + atol, atol relative to the output's scale."""
    atol = atol_rel * ref.abs().max().item()
    err_kernel, err_torch = _max_err(kernel_out, ref), _max_err(torch_out, ref)
    assert err_kernel <= 2 * err_torch + atol, f"{name}: kernel error {err_kernel:.3e}, torch {err_torch:.3e}, atol {atol:.1e}"


def _compare(fn_kernel, fn_torch, inputs64, dtype, atol_rel, grad_mask=None, seed=0, fp32_inputs=(), upstream_scale=1.0):
    """Forward and all input gradients of fn_kernel and fn_torch at `dtype` against fn_torch in float64,
    with one random upstream gradient (N(0, upstream_scale^2)). Inputs at the indices `fp32_inputs`
    stay fp32 (autocast's mix)."""
    grad_mask = grad_mask or [True] * len(inputs64)

    def prepare(cast):
        out = []
        for i, (t, g) in enumerate(zip(inputs64, grad_mask)):
            if t is None:
                out.append(None)
                continue
            c = cast(t.detach(), i).requires_grad_(g)
            out.append(c)
        return out

    def run(fn, ins, upstream):
        y = fn(*ins)
        wrt = [t for t in ins if t is not None and t.requires_grad]
        return y, torch.autograd.grad(y, wrt, upstream.to(y.dtype))

    ins64 = prepare(lambda t, i: t)
    y64 = fn_torch(*ins64)
    gen = torch.Generator(device=y64.device).manual_seed(seed)
    upstream = upstream_scale * torch.randn(y64.shape, generator=gen, dtype=f64, device=y64.device)
    y64, g64 = run(fn_torch, ins64, upstream)

    # Activations at `dtype`; filter parameters stay fp32 as in the model (and in the reference).
    low = [t is not None and t.dim() == 3 and i not in fp32_inputs for i, t in enumerate(inputs64)]

    def cast(t, i):
        return t.to(dtype) if low[i] else t.float()

    y_k, g_k = run(fn_kernel, prepare(cast), upstream)
    y_t, g_t = run(fn_torch, prepare(cast), upstream)
    _check("output", y_k, y_t, y64, atol_rel)
    for i, (a, b, r) in enumerate(zip(g_k, g_t, g64)):
        _check(f"grad {i}", a, b, r, atol_rel)


def _conv_inputs(batch, dim, length, residual, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=f64) * scale).to(DEVICE)

    u, x1, x2, v = (rand(batch, dim, length) for _ in range(4))
    k1, d1 = rand(dim, 2 * length, scale=0.1), rand(dim)
    k2, d2 = (rand(dim, 2 * length, scale=0.1), rand(dim)) if residual else (None, None)
    return [u, x1, x2, v, k1, d1, k2, d2]


# Interpreter shapes: awkward L (63 and 500 are not powers of two), batch 3, D a multiple of 16.
@pytest.mark.parametrize(
    "length,dtype,residual",
    [
        (63, torch.float32, True),
        (63, torch.bfloat16, True),
        (128, torch.float32, False),
        (128, torch.float16, True),
        (500, torch.float32, True),
        (500, torch.bfloat16, True),
    ],
)
def test_fftconv_matches_reference(length, dtype, residual):
    inputs = _conv_inputs(3, 16, length, residual, seed=length)
    mask = [residual, True, True, True, True, True, residual, residual]
    _compare(
        triton_fftconv.gated_long_conv, fftconv_reference.gated_long_conv, inputs, dtype,
        atol_rel=1e-5 if dtype == torch.float32 else 1e-3, grad_mask=mask,
    )  # fmt: skip


@triton.jit
def _tf32_round_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + o, triton_fftconv._tf32_round(tl.load(x_ptr + o, mask=o < N)), mask=o < N)


def test_tf32_rounding_is_to_the_nearest():
    # The tensor cores truncate fp32 operands to tf32 (the interpreter models it, `_tf32_truncate`);
    # the FFT kernels round them first. Each value must land on the nearer of its two tf32
    # neighbours, halfway cases away from zero, across magnitudes and at the exponent's carry.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=gen) * torch.logspace(-30, 30, 4096)
    bits = x.view(torch.int32)
    ties = ((bits & ~0x1FFF) | 0x1000).view(torch.float32)[:512]  # exactly halfway
    carry = torch.tensor([1.99999, -1.99999, 3.9999995, 0.0, -0.0])  # rounding into the next binade
    x = torch.cat([x, ties, carry]).to(DEVICE)
    out = torch.empty_like(x)
    _tf32_round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    x64, out = x.double().cpu(), out.cpu()
    down = (x.cpu().view(torch.int32) & ~0x1FFF).view(torch.float32).double()
    up = down + torch.sign(x64) * torch.ldexp(torch.ones_like(x64), torch.frexp(down)[1] - 11)
    up = torch.where(down == 0, down, up)
    nearer = torch.where((x64 - down).abs() < (up - x64).abs(), down, up)
    assert torch.equal(out.double(), nearer), "not rounded to the nearest tf32 value (ties away from zero)"
    assert ((out.view(torch.int32) & 0x1FFF) == 0).all(), "low mantissa bits left"
    # past tf32's largest value to infinity; infinities and NaN stay
    special = torch.tensor([3.4028235e38, -3.4028235e38, float("inf"), float("-inf"), float("nan")], device=DEVICE)
    out = torch.empty_like(special)
    _tf32_round_kernel[(1,)](special, out, special.numel(), BLOCK=8)
    assert out[:4].tolist() == [float("inf"), float("-inf"), float("inf"), float("-inf")] and out[4].isnan()


def test_fftconv_autocast_mix():
    # Under autocast the residual input u is the layer's fp32 input while x1, x2, v are bf16: the
    # output is fp32 and the transforms run at the gated inputs' (bf16) precision.
    inputs = _conv_inputs(3, 16, 200, True, seed=5)
    _compare(
        triton_fftconv.gated_long_conv, fftconv_reference.gated_long_conv, inputs, torch.bfloat16,
        atol_rel=1e-3, fp32_inputs=(0,),
    )  # fmt: skip


@pytest.mark.parametrize("length", [63, 500])
def test_fftconv_gradients_far_below_the_activations(length):
    # In training the upstream gradient is ~1e-4 of the activations. The backward packs the
    # gradient's correlation with the activations' convolution into one complex inverse transform,
    # whose error is relative to the larger part; the kernel rescales the gradient's part by a power
    # of two. (Here the interpreter checks the rescaling is undone exactly, in one and in two passes;
    # on a GPU `test_fftconv_gpu_small_gradients` checks the tf32 precision it buys.)
    inputs = _conv_inputs(3, 16, length, True, seed=7)
    _compare(
        triton_fftconv.gated_long_conv, fftconv_reference.gated_long_conv, inputs, torch.bfloat16,
        atol_rel=1e-3, fp32_inputs=(0,), upstream_scale=1e-5,
    )  # fmt: skip


def test_fftconv_model_layout_reaches_the_kernels_as_rows_at_gate_precision(monkeypatch):
    # In the model u arrives as a (B, D, L) view of the (B, L, D) layer input in fp32 and the
    # output's gradient through a transpose: the kernels must get unit-stride rows (a gather per
    # load made them 1.6-1.9x slower) and the bf16 gates' tf32 products, not the 3-pass ones
    # (which tripled the transform's cost).
    seen = []

    def spy(launcher, name):
        def wrapped(first, second, *rest):
            seen.append((name, first.stride(-1), second.stride(-1)))
            return launcher(first, second, *rest)

        return wrapped

    precisions = []
    original_precision = triton_fftconv.dot_precision
    def precision(dtype):
        precisions.append(original_precision(dtype))
        return precisions[-1]

    monkeypatch.setattr(triton_fftconv, "dot_precision", precision)
    monkeypatch.setattr(triton_fftconv, "fftconv_fwd", spy(triton_fftconv.fftconv_fwd, "forward"))
    monkeypatch.setattr(triton_fftconv, "fftconv_bwd", spy(triton_fftconv.fftconv_bwd, "backward"))
    u, x1, x2, v, k1, d1, k2, d2 = _conv_inputs(2, 16, 40, True, seed=6)
    u_BLD = u.float().transpose(1, 2).contiguous().requires_grad_()
    x1, x2, v = (t.bfloat16() for t in (x1, x2, v))
    y = triton_fftconv.gated_long_conv(u_BLD.transpose(1, 2), x1, x2, v, k1.float(), d1.float(), k2.float(), d2.float())
    y.transpose(1, 2).sum().backward()
    # the launchers' first two tensors: forward (u, x1), backward (dy, u); unit stride along L
    assert seen == [("forward", 1, 1), ("backward", 1, 1)]
    assert precisions == ["tf32", "tf32"]
    assert u_BLD.grad is not None and not u_BLD.grad.isnan().any()


@pytest.fixture
def fp16_operands(monkeypatch):
    """The FFT kernels' transforms with fp16 tensor-core operands (`triton_fftconv.FP16_OPERANDS`)."""
    monkeypatch.setattr(triton_fftconv, "FP16_OPERANDS", True)


# fp16 transform operands. The interpreter rounds the operands to fp16 as the tensor cores take
# them (its tf32 products are exact fp32), so these check the precision a GPU gets. Activations
# 100x (unscaled, the stages' growth overflows fp16) and gradients 1e-5 of the activations
# (unscaled, they sink into fp16's subnormals), on every kind of plan: two stages (L=63, 128),
# outer radix over two stages (300, 500), three stages (1500) and outer radix over three (2100).
@pytest.mark.parametrize(
    "length,batch,dtype,act_scale,upstream_scale,fp32_u",
    [
        (63, 3, torch.bfloat16, 1.0, 1.0, False),
        (128, 3, torch.float16, 1.0, 1.0, False),
        (300, 2, torch.bfloat16, 100.0, 1.0, False),
        (500, 3, torch.bfloat16, 1.0, 1e-5, True),
        (1500, 1, torch.bfloat16, 100.0, 1e-5, False),
        (2100, 1, torch.bfloat16, 1.0, 1.0, False),
    ],
)
def test_fftconv_fp16_operands_match_reference(fp16_operands, length, batch, dtype, act_scale, upstream_scale, fp32_u):
    inputs = _conv_inputs(batch, 16, length, True, seed=length)
    inputs[:4] = [t * act_scale for t in inputs[:4]]
    _compare(
        triton_fftconv.gated_long_conv, fftconv_reference.gated_long_conv, inputs, dtype, atol_rel=1e-3,
        fp32_inputs=(0,) if fp32_u else (), upstream_scale=upstream_scale,
    )  # fmt: skip


def test_fftconv_fp16_operands_only_for_half_precision_activations(fp16_operands):
    assert triton_fftconv.transform_precision(torch.bfloat16) == "fp16"
    assert triton_fftconv.transform_precision(torch.float16) == "fp16"
    assert triton_fftconv.transform_precision(torch.float32) == "tf32x3"


def test_fftconv_operands_by_plan_by_default(monkeypatch):
    # The default: fp16 for the three-stage on-chip transforms (L >= 2048), tf32 for the 256-point
    # ones (with or without an outer radix); fp32 activations always the 3-pass product; forced
    # either way by FP16_OPERANDS.
    monkeypatch.setattr(triton_fftconv, "FP16_OPERANDS", None)

    def prec(length, dtype=torch.bfloat16):
        plan = triton_fftconv.fft_plan(length, triton_fftconv.MAX_ONCHIP, triton_fftconv.TILE)
        return triton_fftconv.transform_precision(dtype, plan)

    assert [prec(n) for n in (128, 512, 1024)] == ["tf32"] * 3
    assert [prec(n) for n in (2048, 8192, 32768)] == ["fp16"] * 3
    assert prec(1500, torch.float16) == "fp16" and prec(8192, torch.float32) == "tf32x3"
    monkeypatch.setattr(triton_fftconv, "FP16_OPERANDS", False)
    assert prec(8192) == "tf32"
    monkeypatch.setattr(triton_fftconv, "FP16_OPERANDS", True)
    assert prec(512) == "fp16"


def test_fftconv_outer_radix_path():
    # A lowered on-chip limit sends L = 200 (FFT size 512) through the outer-radix kernels (R = 2).
    inputs = _conv_inputs(2, 16, 200, True, seed=3)

    def fn(*args):
        return triton_fftconv.gated_long_conv(*args, max_onchip=256)

    _compare(fn, fftconv_reference.gated_long_conv, inputs, torch.float32, atol_rel=1e-5)


def test_fftconv_three_stage_path():
    # L = 2100 pads to FFT size 8192 = 2 (outer) x 4096 (on chip, three radix-16 stages).
    inputs = _conv_inputs(1, 16, 2100, True, seed=4)
    _compare(triton_fftconv.gated_long_conv, fftconv_reference.gated_long_conv, inputs, torch.float32, atol_rel=1e-5)


def test_fftconv_dispatch_and_errors():
    from kernels.fftconv import BACKENDS, gated_long_conv

    assert "triton" in BACKENDS
    u, x1, x2, v, k1, d1, _, _ = _conv_inputs(1, 16, 40, False, seed=1)
    y = gated_long_conv(u.float(), x1.float(), x2.float(), v.float(), k1.float(), d1.float(), backend="triton")
    ref = fftconv_reference.gated_long_conv(u, x1, x2, v, k1, d1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="k1_DN must be"):
        gated_long_conv(u, x1, x2, v, k1[:, :-1], d1, backend="triton")
    with pytest.raises(ValueError, match="x1_BDL must have v_BDL's shape .* and dtype torch.float64"):
        gated_long_conv(u, x1.float(), x2, v, k1, d1, backend="triton")
    # Half-precision inputs up to MAX_LEN take the Toeplitz path, fp32 ones the FFT.
    assert triton_toeplitz.supports(v.bfloat16()) and not triton_toeplitz.supports(v.float())


# The Toeplitz GEMM path (bf16/fp16 inputs): L = 63 and 80 leave partial blocks (block 32 in the
# interpreter), batch 3 a partial batch block; with and without the residual convolution. L = 32
# is its own padded length: the tiles are read without masks. Both operand modes.
@pytest.mark.parametrize("operands", triton_toeplitz.OPERAND_MODES)
@pytest.mark.parametrize(
    "length,dtype,residual", [(63, torch.bfloat16, True), (80, torch.float16, False), (32, torch.bfloat16, True)]
)
def test_fftconv_toeplitz_matches_reference(length, dtype, residual, operands):
    inputs = _conv_inputs(3, 16, length, residual, seed=length)
    mask = [residual, True, True, True, True, True, residual, residual]
    fn = functools.partial(triton_toeplitz.gated_long_conv, operands=operands)
    _compare(fn, fftconv_reference.gated_long_conv, inputs, dtype, atol_rel=1e-3, grad_mask=mask)


# The cuFFT path (fp32 transforms, Triton gates): any length (63 and 500 are not powers of two) and
# dtype, with and without the residual convolution; autocast's mix (u fp32, gates bf16, the output
# in fp32 as the reference's); gradients 1e-5 of the activations.
@pytest.mark.parametrize(
    "length,dtype,residual,fp32_u,upstream_scale",
    [
        (63, torch.float32, True, False, 1.0),
        (64, torch.bfloat16, False, False, 1.0),
        (500, torch.bfloat16, True, True, 1.0),
        (40, torch.float16, True, False, 1e-5),
    ],
)
def test_fftconv_cufft_matches_reference(length, dtype, residual, fp32_u, upstream_scale):
    inputs = _conv_inputs(3, 16, length, residual, seed=length)
    mask = [residual, True, True, True, True, True, residual, residual]
    _compare(
        triton_cufft.gated_long_conv, fftconv_reference.gated_long_conv, inputs, dtype,
        atol_rel=1e-5 if dtype == torch.float32 else 1e-3, grad_mask=mask, fp32_inputs=(0,) if fp32_u else (),
        upstream_scale=upstream_scale,
    )  # fmt: skip


def test_fftconv_cufft_takes_strided_inputs_and_packs_the_gradient():
    # The model passes u as a (B, D, L) view of its (B, L, D) input and the output's gradient through
    # a transpose; the gated inputs' gradient comes back as one (B, 3D, L) tensor.
    u, x1, x2, v, k1, d1, k2, d2 = (t if t.dim() != 3 else t.float() for t in _conv_inputs(2, 16, 48, True, seed=3))
    k1, d1, k2, d2 = (t.float() for t in (k1, d1, k2, d2))
    u_view = u.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    x = torch.cat([x1, x2, v], dim=1).requires_grad_()
    y = triton_cufft.packed_gated_long_conv(u_view, x, k1, d1, k2, d2)
    upstream = torch.randn(y.shape[0], y.shape[2], y.shape[1], device=y.device).transpose(1, 2)
    y.backward(upstream)
    u_ref, x_ref = u.clone().requires_grad_(), x.detach().clone().requires_grad_()
    y_ref = fftconv_reference.gated_long_conv(u_ref, *x_ref.chunk(3, dim=1), k1, d1, k2, d2)
    y_ref.backward(upstream)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert x.grad.shape == x.shape and x.grad.is_contiguous()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u_view.grad, u_ref.grad, rtol=1e-5, atol=1e-5)


def test_fftconv_cufft_dispatch(monkeypatch):
    # From CUFFT_MIN_LEN on the Triton backend (and the packed form the mixer calls) takes the cuFFT
    # path; below it, or with no threshold, the kernels it took before.
    from kernels import fftconv

    calls = []
    monkeypatch.setattr(triton_cufft, "cufft_conv", lambda *a: calls.append(a[1].shape[-1]) or (a[1][:, : a[1].shape[1] // 3],))
    u, x1, x2, v, k1, d1, k2, d2 = (t.float() for t in _conv_inputs(1, 16, 64, True, seed=2))
    packed = fftconv.implementation("triton", packed=True)
    x = torch.cat([x1, x2, v], dim=1)
    for threshold, taken in ((None, False), (128, False), (64, True)):
        monkeypatch.setattr(fftconv, "CUFFT_MIN_LEN", threshold)
        calls.clear()
        fftconv.gated_long_conv(u, x1, x2, v, k1, d1, k2, d2, backend="triton")
        packed(u, x, k1, d1, k2, d2)
        assert calls == ([64, 64] if taken else []), threshold


# fp16 operands are scaled into fp16's range: each filter row by its own power of two, each
# sequence's activations and gradients by theirs. Filters from 1e-7 (subnormal in fp16 unscaled)
# to 1e3 across the channels (one channel's both filters all zeros, their scale 1), activations 300x (the gated
# product ~1e5, past fp16's largest 65,504) and an upstream gradient of 1e-6, no skip terms: every
# channel of the output and of the input gradients stays within a few bf16 ulps of its own scale of
# the "split" operands' results, whose filter parts keep bf16's (fp32's) range.
def test_fftconv_toeplitz_fp16_operands_scale_into_range():
    u, x1, x2, v, k1, d1, k2, d2 = _conv_inputs(3, 16, 40, True, seed=9)
    k1 = k1 * torch.logspace(-6, 4, 16, dtype=f64, device=k1.device)[:, None]
    k1[3] = 0.0
    k2 = k2 * torch.logspace(4, -6, 16, dtype=f64, device=k2.device)[:, None]
    k2[3] = 0.0
    acts = [(t * scale).bfloat16().requires_grad_() for t, scale in ((u, 300), (x1, 300), (x2, 1), (v, 300))]
    params = [k1.float(), torch.zeros_like(d1).float(), k2.float(), torch.zeros_like(d2).float()]  # no skip terms
    upstream = (1e-6 * torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(2))).bfloat16().to(DEVICE)
    results = {}
    for operands in triton_toeplitz.OPERAND_MODES:
        y = triton_toeplitz.gated_long_conv(*acts, *params, operands=operands)
        results[operands] = (y, *torch.autograd.grad(y, acts, upstream))
    names = ["output", "du", "dx1", "dx2", "dv"]
    for name, ours, split in zip(names, results["fp16"], results["split"]):
        ours, split = ours.double(), split.double()
        assert ours.isfinite().all(), name
        scale = split.abs().amax(dim=(0, 2))
        assert (scale[[i for i in range(16) if i != 3]] > 0).all(), name
        err = (ours - split).abs().amax(dim=(0, 2))
        assert (err <= 2**-6 * scale).all(), f"{name}: per-channel error / scale {(err / scale).max().item():.2e}"
    assert (results["fp16"][0][:, 3] == 0).all()


def test_fftconv_toeplitz_operands_checked():
    inputs = [t.bfloat16() if t.dim() == 3 else t.float() for t in _conv_inputs(1, 16, 8, False, seed=1)[:6]]
    with pytest.raises(ValueError, match="operands must be one of .*, got 'tf32'"):
        triton_toeplitz.gated_long_conv(*inputs, operands="tf32")


# A program runs its filter tiles over a group of sequences, 16 at a time in the interpreter: batch
# 40 at d=4, L=40 (two 32-position tiles, 8 programs per group) makes 3 groups of one block with
# the default grid target, 2 groups (of two blocks and of one partial block) with a target of 16
# programs, and one group of three blocks with a target of 1. Every row is computed the same way
# whatever the grouping: the outputs and input gradients must be identical, the skip weights'
# gradients (partial sums per program) equal to rounding; and the grouped run matches float64.
def test_fftconv_toeplitz_batch_groups(monkeypatch):
    inputs = [t.float() if t.dim() < 3 else t.bfloat16() for t in _conv_inputs(40, 4, 40, True, seed=5)]
    upstream = torch.randn(40, 4, 40, generator=torch.Generator().manual_seed(0)).bfloat16().to(DEVICE)
    results = {}
    # The interpreter's geometry (16-row blocks by 32 positions) on a GPU too.
    blocks_of = functools.partial(triton_toeplitz._blocks, rows_fwd=16, cols_fwd=32, rows_bwd=16, cols_bwd=32)
    monkeypatch.setattr(triton_toeplitz, "_blocks", blocks_of)
    for target, groups in ((1024, 3), (16, 2), (1, 1)):
        monkeypatch.setattr(triton_toeplitz, "TARGET_PROGRAMS", target)
        blocks = blocks_of(40, 4, 40)
        for per_group, rows in ((blocks["BPG"], blocks["BB"]), (blocks["BPG_BWD"], blocks["BB_BWD"])):
            assert triton.cdiv(40, per_group) == groups and per_group % rows == 0
        ins = [t.detach().requires_grad_() for t in inputs]
        y = triton_toeplitz.gated_long_conv(*ins)
        results[target] = (y, *torch.autograd.grad(y, ins, upstream))
    for target in (1024, 16):
        for i, (a, b) in enumerate(zip(results[target], results[1])):
            if i in (6, 8):  # d1, d2
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(a, b), f"output {i} differs between {target} and 1 programs"
    # (the bf16 rounding of z1 and of the gate products, kept as the kernels always did, reaches a
    # few times torch's worst-case error on dv at this batch)
    monkeypatch.setattr(triton_toeplitz, "TARGET_PROGRAMS", 16)
    _compare(triton_toeplitz.gated_long_conv, fftconv_reference.gated_long_conv, _conv_inputs(40, 4, 40, True, seed=5),
             torch.bfloat16, atol_rel=1e-2)  # fmt: skip


def _mixer_inputs(batch, length, dim, residual, seed):
    """[projection (B, L, 3D), short filter (3D, 1, 3), its bias, u (B, L, D), k1, d1, k2, d2]."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=f64) * scale).to(DEVICE)

    width = 3 * dim
    p, w, b, u = rand(batch, length, width), rand(width, 1, 3, scale=0.5), rand(width, scale=0.1), rand(batch, length, dim)
    k1, d1 = rand(dim, 2 * length, scale=0.1), rand(dim)
    k2, d2 = (rand(dim, 2 * length, scale=0.1), rand(dim)) if residual else (None, None)
    return [p, w, b, u, k1, d1, k2, d2]


# The fused mixer in the interpreter (16 channels and 2 sequences per program, spectrum blocks of
# 16 rows): D = 24 leaves a partial channel block, batch 3 a partial run of sequences, L = 64 four
# spectrum blocks. The short filter (index 1) stays fp32, as in the model.
@pytest.mark.parametrize(
    "batch,length,dim,residual", [(3, 32, 24, True), (2, 64, 16, False), (4, 16, 32, True), (2, 128, 16, True)]
)
def test_fused_mixer_matches_reference(batch, length, dim, residual):
    inputs = _mixer_inputs(batch, length, dim, residual, seed=length + dim)
    mask = [True, True, True, residual, True, True, residual, residual]
    _compare(
        triton_mixer.sequence_mixer, mixer_reference.sequence_mixer, inputs, torch.bfloat16,
        atol_rel=1e-3, grad_mask=mask, fp32_inputs=(1,),
    )  # fmt: skip


def test_fused_mixer_gradients_far_below_the_activations():
    inputs = _mixer_inputs(3, 32, 16, True, seed=11)
    _compare(
        triton_mixer.sequence_mixer, mixer_reference.sequence_mixer, inputs, torch.bfloat16,
        atol_rel=1e-3, fp32_inputs=(1,), upstream_scale=1e-5,
    )  # fmt: skip


def test_fused_mixer_dispatch():
    from kernels.mixer import implementation

    p, w, b, u, k1, d1, k2, d2 = _mixer_inputs(2, 32, 16, True, seed=2)
    fused = implementation("triton", fused=True)
    ref = mixer_reference.sequence_mixer(p, w, b, u, k1, d1, k2, d2)
    # fp32 projections, a padding mask or an L that is not a power of two take the per-op path
    torch.testing.assert_close(fused(p.float(), w.float(), b.float(), u.float(), k1.float(), d1.float(), k2.float(), d2.float()).double(), ref, rtol=1e-4, atol=1e-4)
    mask = torch.ones(2, 32, device=DEVICE)
    mask[1, 20:] = 0
    args = (p.bfloat16(), w.float(), b.float(), u.float(), k1.float(), d1.float(), k2.float(), d2.float())
    assert torch.equal(fused(*args, mask), implementation("triton")(*args, mask))
    assert not triton_mixer.supports(p[:, :24].bfloat16()) and triton_mixer.supports(p.bfloat16())
    with pytest.raises(ValueError, match=r"projected_BLC must be \(batch, length, 3 \* dim\)"):
        fused(p[..., :-1], w, b, u, k1, d1, k2, d2)
    with pytest.raises(ValueError, match="the short filter must be"):
        fused(p, w[:, :, :2].squeeze(1), b, u, k1, d1, k2, d2)
    for mixer in (fused, implementation("triton")):
        with pytest.raises(ValueError, match=r"k1_DN must be \(16, 64\)"):
            mixer(p, w, b, u, k1[:, :-2], d1, k2, d2)
        with pytest.raises(ValueError, match="k2_DN and d2_D must be given together"):
            mixer(p, w, b, u, k1, d1, k2, None)



def test_fused_mixer_autotuned_launch(monkeypatch):
    # The GPU's launch path (autotuner, blocks pruned to the input's L, grid from the chosen
    # channel block), here with one candidate so that the interpreter needs no timing.
    configs = triton_mixer._drop_blocks_longer_than_the_input(
        [triton.Config({"BD": 32, "BF": 64}), triton.Config({"BD": 16, "BF": 16})], {}, L=32
    )
    assert [c.kwargs for c in configs] == [{"BD": 16, "BF": 16}]
    assert triton_mixer._drop_blocks_longer_than_the_input([triton.Config({"BD": 32, "BF": 64})], {"L": 16})[0].kwargs == {"BD": 16, "BF": 16}
    inputs = _mixer_inputs(3, 32, 24, True, seed=5)
    p, w, b, u, k1, d1, k2, d2 = inputs
    args = [p.bfloat16(), w.float(), b.float(), u.float(), k1.float(), d1.float(), k2.float(), d2.float()]
    fixed = [t.detach().clone().requires_grad_() for t in args]
    tuned = [t.detach().clone().requires_grad_() for t in args]
    y_fixed = triton_mixer.sequence_mixer(*fixed)
    upstream = torch.randn_like(y_fixed)
    y_fixed.backward(upstream)
    monkeypatch.setattr(triton_mixer, "_TUNING", [(16, 16, 4)])
    monkeypatch.setattr(triton_mixer, "_fwd_tuned", triton_mixer._tuned(triton_mixer._mixer_fwd_kernel, key=["D", "L"]))
    for name, partials in (("_bwd_gated", "dk1_ptr"), ("_bwd_residual", "dk2_ptr")):
        autotuned = triton_mixer._tuned(getattr(triton_mixer, f"{name}_kernel"), key=["D", "L"], reset_to_zero=[partials])
        monkeypatch.setattr(triton_mixer, f"{name}_tuned", autotuned)
    launched = []
    kernel = triton_mixer._launch

    def spy(tuned_kernel, *rest, **kw):
        launched.append(tuned_kernel)
        return kernel(tuned_kernel, *rest, **kw)

    monkeypatch.setattr(triton_mixer, "_launch", spy)
    monkeypatch.setattr(triton_mixer, "FIXED_BLOCKS", None)
    y_tuned = triton_mixer.sequence_mixer(*tuned)
    y_tuned.backward(upstream)
    assert launched == [triton_mixer._fwd_tuned, triton_mixer._bwd_gated_tuned, triton_mixer._bwd_residual_tuned]
    # the same blocks as the interpreter's fixed ones: the same results
    assert torch.equal(y_tuned, y_fixed)
    assert all(torch.equal(a.grad, ref.grad) for a, ref in zip(tuned, fixed))


def test_packed_spectrum_is_the_filters_half_spectrum():
    # The operator's packing of rfft(k) / 2L, as one fp32 product, also under bf16 autocast.
    k = torch.randn(24, 64, dtype=f64, device=DEVICE)
    n, length = 64, 32
    k64 = k.clone().requires_grad_()
    k_f = torch.fft.rfft(k64, n=n) / n
    imag = torch.cat([k_f.real[:, length:], k_f.imag[:, 1:length]], dim=1)
    expected = torch.stack([k_f.real[:, :length], imag]).transpose(1, 2)
    k32 = k.float().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        packed = triton_mixer.packed_spectrum(k32)
    assert packed.dtype == torch.float32 and packed.shape == (2, length, 24)
    torch.testing.assert_close(packed.double(), expected, rtol=0, atol=1e-6)
    upstream = torch.randn(packed.shape, dtype=f64, device=DEVICE)
    (want,) = torch.autograd.grad(expected, k64, upstream)
    (got,) = torch.autograd.grad(packed, k32, upstream.float())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def _compiled_report(body: str) -> dict:
    """The dict `report` that `body` fills, run by Python without Triton's interpreter, where
    `kernels.compile_report`'s `resources`, `loop_layout_conversions` and `loop_memory_order` (imported for it) compile
    kernels for sm_90."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json\nfrom kernels.compile_report import loop_layout_conversions, loop_memory_order, resources\n"
        + body + "print(json.dumps(report))\n"
    )  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sm90_report(body: str) -> dict:
    """`_compiled_report` of `body`, every kernel in it checked to fit the register file and shared
    memory."""
    report = _compiled_report(body)
    for name, usage in report.items():
        assert usage["registers"] <= 255 and usage["shared_bytes"] <= 227 * 1024, (name, usage)
    return report


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernels themselves")
def test_kernels_compile_for_hopper_within_the_register_file():
    # The interpreter does not compile: Triton's own compiler (sm_90, as for an H100/H200) must
    # take the fused mixer's kernels, with at most a little spilling at the first autotuning
    # candidate, and the GLU kernels (with dropout) at their nearly spill-free tiles.
    report = _sm90_report(
        "from kernels.mixer import triton_mixer as m\n"
        "from kernels.blockdiag import triton_blockdiag as b\n"
        "report = m.compile_report(128)\n"
        "glu = dict(HALF=2, DROPOUT=True, PREC='tf32', UPCAST=False, PA=128, PB=64, BM=128, BN=64, BK=32, NSUB=1,\n"
        "           RESIDENT=False, GROUP_M=8)\n"
        "dtypes = {n: 'bf16' for n in ('x_ptr', 'w_ptr', 'o_ptr', 'da_ptr', 'dp_ptr')}\n"
        "dtypes.update(seed_ptr='i64', SCALE='fp32')\n"
        "report['glu forward'] = resources(b._glu_fwd_kernel, glu, dtypes, 8, 4)\n"
        "report['glu backward'] = resources(b._glu_bwd_kernel, glu, dtypes, 8, 4)\n"
        "glu.update(BN=32, NSUB=8, RESIDENT=True, PA=128, PB=64)\n"
        "report['glu forward resident'] = resources(b._glu_fwd_kernel, glu, dtypes, 8, 2)\n"
        "report['glu backward resident'] = resources(b._glu_bwd_kernel, glu, dtypes, 8, 2)\n"
    )
    glu = {"glu forward", "glu backward", "glu forward resident", "glu backward resident"}
    assert set(report) == {"forward", "backward gated", "backward residual", *glu}
    for name, usage in report.items():
        assert usage["spill_bytes"] <= (128 if name.startswith("glu") else 512), (name, usage)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernels themselves")
def test_fft_kernels_with_fp16_operands_compile_for_hopper():
    # The interpreter does not compile: the FFT kernels with fp16 transform operands must compile for
    # sm_90 (as launched: unit strides along L) on each kind of plan with outer radix or three stages,
    # within the register file and shared memory. (Their tf32 build spills as much: 0.5-1.3 KiB a
    # thread in the backward, a bound recorded here so that a change cannot add much silently.)
    report = _sm90_report(
        "from kernels.fftconv import triton_fftconv as t\n"
        "acts = ('u_ptr', 'x1_ptr', 'x2_ptr', 'v_ptr', 'y_ptr', 'dy_ptr', 'du_ptr', 'dx1_ptr', 'dx2_ptr', 'dv_ptr')\n"
        "units = ('s_ul', 's_x1l', 's_x2l', 's_vl', 's_gl', 's_yl')\n"
        "report = {}\n"
        "for length in (512, 2048, 8192):\n"
        "    n, r, m1, m2, p2, k1, c = t.fft_plan(length, t.MAX_ONCHIP, t.TILE)\n"
        "    plan = dict(R=r, M1=m1, M2=m2, P2=p2, K1=k1, C=c, HAS_RES=True, PREC='fp16')\n"
        "    warps = t._launch_config(1, 768, (n, r, m1, m2, p2, k1, c), t.torch.device('cpu'), 4)[2]\n"
        "    dtypes = dict.fromkeys(acts, 'bf16')\n"
        "    report[f'forward {length}'] = resources(t._dft_conv_fwd_kernel, plan, dtypes, warps, 1, unit_args=units)\n"
        "    report[f'backward {length}'] = resources(t._dft_conv_bwd_kernel, dict(plan, ATOMIC=True), dtypes, warps, 1, unit_args=units)\n"
    )
    assert len(report) == 6
    for name, usage in report.items():
        assert usage["spill_bytes"] <= 2048, (name, usage)


def test_fused_mixer_traffic_floor_formula():
    # forward: p (3 x 2 B) + u (4 B) + y (2 B) per token and channel; backward adds dy, dp, du
    floor = triton_mixer.mixer_traffic_bytes(tokens=10, dim=4)
    assert floor == {"forward": 12 * 40, "forward_backward": (12 + 6 + 4 + 2 + 6 + 4) * 40}

def _blockdiag_inputs(shape, nblocks, p, q, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, nblocks * p, generator=gen, dtype=f64)
    w = torch.randn(nblocks, q, p, generator=gen, dtype=f64) / p**0.5
    b = torch.randn(nblocks * q, generator=gen, dtype=f64)
    return [t.to(DEVICE) for t in (x, w, b)]


def _cast_all(dtype):
    return lambda t: t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,nblocks,p,q", [((3, 37), 4, 16, 24), ((50,), 2, 40, 16)])
def test_blockdiag_matmul_matches_reference(dtype, shape, nblocks, p, q):
    x, w, b = _blockdiag_inputs(shape, nblocks, p, q, seed=p)
    _compare_all(
        lambda x, w, b: triton_blockdiag.blockdiag_matmul(x, w, b),
        lambda x, w, b: blockdiag_reference.blockdiag_matmul(x, w) + b,
        [x, w, b], dtype,
    )  # fmt: skip


@pytest.mark.parametrize("cublas", [True, False], ids=["cublas", "triton"])
def test_blockdiag_matmul_bias_outside_the_op_on_cublas(cublas, monkeypatch):
    # cuBLAS's batched GEMM has no bias epilogue: there the bias is added outside the op (where a
    # compiled graph fuses it), with the same values and gradients; the Triton GEMM takes it inside.
    x, w, b = _blockdiag_inputs((6, 5), 4, 16, 32, seed=3)
    monkeypatch.setattr(triton_blockdiag, "cublas_gemms", lambda t: cublas)
    biases = []
    fwd = triton_blockdiag.blockdiag_fwd
    monkeypatch.setattr(triton_blockdiag, "blockdiag_fwd", lambda x, w, bias: biases.append(bias) or fwd(x, w, bias))
    _compare_all(
        lambda x, w, b: triton_blockdiag.blockdiag_matmul(x, w, b),
        lambda x, w, b: blockdiag_reference.blockdiag_matmul(x, w) + b,
        [x, w, b], torch.bfloat16,
    )  # fmt: skip
    assert biases and all((bias is None) == cublas for bias in biases)


@pytest.fixture(params=["streamed", "resident", "gemms", "gemms, kept"])
def glu_programs(request, monkeypatch):
    """The GLU kernels with x streamed through the reduction (the autotuner's choice; the
    interpreter's one config) or resident: a sweep of column tiles a program, x's P features as a
    PA- and a PB-wide tile (in the interpreter two tiles of 16, on a GPU a tile of the autotuner's);
    or the GLU as the plain GEMMs' up-projection and the activation kernels (`GLU_VIA_GEMMS`), its
    backward recomputing the pre-activation or given the forward's (`GLU_KEEPS_PRE_ACTIVATION`)."""
    monkeypatch.setattr(triton_blockdiag, "GLU_VIA_GEMMS", request.param.startswith("gemms"))
    monkeypatch.setattr(triton_blockdiag, "GLU_KEEPS_PRE_ACTIVATION", request.param == "gemms, kept")
    if request.param == "resident":
        bm, bn, nsub, warps, stages = (16, 16, 2, 4, 1) if DEVICE == "cpu" else triton_blockdiag._GLU_RESIDENT_SHAPES[1]
        config = triton.Config({"BM": bm, "BN": bn, "BK": 32, "NSUB": nsub, "RESIDENT": True}, num_warps=warps, num_stages=stages)
        for kernel in (triton_blockdiag._glu_fwd, triton_blockdiag._glu_bwd):
            monkeypatch.setattr(kernel, "configs", [config])
            monkeypatch.setattr(kernel, "cache", {})
    return request.param


def test_resident_split_covers_p_with_two_powers_of_two_of_at_least_16():
    # Each tile at least 16 wide, a tensor-core dot's least reduction.
    assert [triton_blockdiag.resident_split(p) for p in (8, 16, 24, 192, 240, 256, 448)] == [
        (16, 0), (16, 0), (16, 16), (128, 64), (128, 128), (256, 0), (256, 256),
    ]  # fmt: skip


def test_resident_glu_programs_are_pruned_where_x_does_not_fit():
    configs = [
        triton.Config({"BM": bm, "BN": 64, "BK": 32, "NSUB": 4, "RESIDENT": resident})
        for bm in (64, 128) for resident in (False, True)
    ]  # fmt: skip

    def kept(dtype, pa, pb):
        x = torch.empty(1, 1, dtype=dtype)
        return [(c.kwargs["BM"], c.kwargs["RESIDENT"]) for c in triton_blockdiag._prune_glu_configs(configs, {"x_ptr": x}, PA=pa, PB=pb)]

    everything = [(64, False), (64, True), (128, False), (128, True)]
    assert kept(torch.bfloat16, 128, 64) == everything  # d=768: 96 KiB of x at 128 rows
    assert kept(torch.bfloat16, 256, 256) == [(64, False), (64, True), (128, False)]  # d=1792
    assert kept(torch.float32, 256, 256) == [(64, False), (128, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,nblocks,p,q", [((3, 37), 4, 16, 32), ((50,), 2, 24, 40)])
def test_blockdiag_glu_matches_reference(dtype, shape, nblocks, p, q, glu_programs):
    x, w, _ = _blockdiag_inputs(shape, nblocks, p, q, seed=q)
    _compare_all(triton_blockdiag.blockdiag_glu, blockdiag_reference.blockdiag_glu, [x, w], dtype, _glu_atol(dtype, glu_programs))


def _glu_atol(dtype, glu_programs):
    """The GLU's tolerance: the GEMMs path rounds the pre-activation and its gradient to bf16 as
    torch's path does, which Triton's interpreter does by truncation (up to one ulp, 2^-8 of the
    scale, twice); the default elsewhere."""
    return 2**-6 if glu_programs.startswith("gemms") and dtype == torch.bfloat16 and triton_common.INTERPRET else None


def _glu_with_dropout(x, w, seed, p):
    """The GLU op with dropout on rows of x (`glu_rows`), shaped as x."""
    nb, q, _ = w.shape
    return triton_blockdiag.glu_rows(x.reshape(-1, x.shape[-1]), w, seed, p).reshape(*x.shape[:-1], nb * q // 2)


def test_glu_on_the_gemms_keeps_its_pre_activation_or_recomputes_it(monkeypatch):
    # The up-projection runs once (in the forward) when the pre-activation is kept and twice when the
    # backward recomputes it; the gradients are the same bit for bit (same seed, same mask).
    monkeypatch.setattr(triton_blockdiag, "GLU_VIA_GEMMS", True)
    ups = []
    for name, gemms in triton_blockdiag.GEMMS.items():
        counted = gemms._replace(fwd=lambda *a, fwd=gemms.fwd: (ups.append(1), fwd(*a))[1])
        monkeypatch.setitem(triton_blockdiag.GEMMS, name, counted)
    x, w, _ = _blockdiag_inputs((2, 9), 4, 16, 32, seed=11)
    seed = torch.tensor([5], device=DEVICE)
    grads = {}
    for keeps in (False, True):
        monkeypatch.setattr(triton_blockdiag, "GLU_KEEPS_PRE_ACTIVATION", keeps)
        ups.clear()
        x_, w_ = x.float().requires_grad_(), w.float().requires_grad_()
        _glu_with_dropout(x_, w_, seed, 0.2).square().sum().backward()
        assert len(ups) == (1 if keeps else 2)
        grads[keeps] = (x_.grad, w_.grad)
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,nblocks,p,q", [((3, 37), 4, 16, 32), ((50,), 2, 24, 40)])
def test_blockdiag_glu_dropout_is_the_glu_times_its_keep_mask(dtype, shape, nblocks, p, q, glu_programs):
    # Forward and backward draw the mask from the seed and each element's position: both must match
    # the reference GLU times the mask that `dropout_keep_mask` (other tiles) draws from the seed.
    x, w, _ = _blockdiag_inputs(shape, nblocks, p, q, seed=q + 1)
    seed, prob = torch.tensor([2024], device=DEVICE), 0.3
    rows, inner = x[..., 0].numel(), nblocks * q // 2
    keep = triton_blockdiag.dropout_keep_mask(seed, rows, inner, prob).reshape(*shape, inner)
    assert 0.15 < 1 - keep.float().mean().item() < 0.45
    _compare_all(
        lambda x, w: _glu_with_dropout(x, w, seed, prob),
        lambda x, w: blockdiag_reference.blockdiag_glu(x, w) * keep / (1 - prob),
        [x, w], dtype, _glu_atol(dtype, glu_programs),
    )  # fmt: skip


def test_glu_runs_via_the_gemms_where_it_draws_dropout_on_cublas(monkeypatch):
    # The measured choice: the GEMMs and the activation kernels where the GLU draws dropout and
    # cuBLAS runs the GEMMs; the fused kernels without dropout or without cuBLAS; a forced path wins.
    x = torch.zeros(4, 8, device=DEVICE)
    monkeypatch.setattr(triton_blockdiag, "GLU_VIA_GEMMS", None)
    for cublas in (True, False):
        monkeypatch.setattr(triton_blockdiag, "cublas_gemms", lambda t, cublas=cublas: cublas)
        assert [triton_blockdiag.glu_via_gemms(x, dropout) for dropout in (True, False)] == [cublas, False]
    for forced in (True, False):
        monkeypatch.setattr(triton_blockdiag, "GLU_VIA_GEMMS", forced)
        assert [triton_blockdiag.glu_via_gemms(x, dropout) for dropout in (True, False)] == [forced, forced]


def test_dropout_keep_mask_is_a_fair_draw_per_seed():
    rows, cols, prob = 256, 512, 0.1
    masks = {s: triton_blockdiag.dropout_keep_mask(torch.tensor([s], device=DEVICE), rows, cols, prob) for s in (1, 2)}
    again = triton_blockdiag.dropout_keep_mask(torch.tensor([1], device=DEVICE), rows, cols, prob)
    assert torch.equal(masks[1], again)
    assert (masks[1] != masks[2]).float().mean().item() > 0.1
    dropped = ~masks[1]
    assert abs(dropped.float().mean().item() - prob) < 0.005
    # No pattern along rows, columns or the 8 columns that share one draw of 128 bits.
    assert (dropped.float().mean(0) - prob).abs().max().item() < 0.1
    assert (dropped.float().mean(1) - prob).abs().max().item() < 0.06
    assert (dropped.float().reshape(rows, -1, 8).mean((0, 1)) - prob).abs().max().item() < 0.01
    both = (dropped[:, :-1] & dropped[:, 1:]).float().mean().item()
    assert abs(both - prob**2) < 0.003


def test_blockdiag_glu_dropout_draws_from_the_torch_generator_and_falls_back_unfused():
    x, w, _ = _blockdiag_inputs((40,), 4, 16, 32, seed=5)
    x, w = x.float(), w.float()
    glu = blockdiag_reference.blockdiag_glu(x, w)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(triton_blockdiag.blockdiag_glu(x, w, 0.5))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    kept = outs[0] != 0
    torch.testing.assert_close(outs[0][kept], 2 * glu[kept], rtol=1e-3, atol=1e-5)
    assert torch.equal(triton_blockdiag.blockdiag_glu(x, w, 1.0), torch.zeros_like(glu))
    # 20 columns a block: not a multiple of 8, so torch's dropout runs after the kernel.
    x, w, _ = _blockdiag_inputs((40,), 2, 16, 20, seed=6)
    a = triton_blockdiag.blockdiag_glu(x.float(), w.float(), 0.5)
    kept = a != 0
    torch.testing.assert_close(a[kept], 2 * blockdiag_reference.blockdiag_glu(x.float(), w.float())[kept], rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="dropout probability"):
        triton_blockdiag.blockdiag_glu(x.float(), w.float(), 1.5)
    with pytest.raises(ValueError, match="Q % 8 == 0"):
        triton_blockdiag.glu_fwd(x.float(), w.float().contiguous(), torch.tensor([1], device=DEVICE), 0.5)


def _compare_all(fn_kernel, fn_torch, inputs64, dtype, atol_rel=None):
    """Like `_compare`, with every input (weights too) at `dtype`, as under a bf16 model."""
    atol_rel = atol_rel or (1e-5 if dtype == torch.float32 else 1e-3)
    ins64 = [t.detach().requires_grad_() for t in inputs64]
    y64 = fn_torch(*ins64)
    upstream = torch.randn(y64.shape, generator=torch.Generator(device=y64.device).manual_seed(7), dtype=f64, device=y64.device)
    g64 = torch.autograd.grad(y64, ins64, upstream)
    outs = []
    for fn in (fn_kernel, fn_torch):
        ins = [t.detach().to(dtype).requires_grad_() for t in inputs64]
        y = fn(*ins)
        outs.append((y, torch.autograd.grad(y, ins, upstream.to(dtype))))
    (y_k, g_k), (y_t, g_t) = outs
    _check("output", y_k, y_t, y64, atol_rel)
    for i, (a, b, r) in enumerate(zip(g_k, g_t, g64)):
        _check(f"grad {i}", a, b, r, atol_rel)


TRITON = KernelConfig(fftconv="triton", blockdiag="triton")


def _layer_pair(length, hidden, inner, dtype, kernels=TRITON):
    base = load_config("debug").model
    cfg = dataclasses.replace(
        base, hidden_size=hidden, intermediate_size=inner, num_layers=1, l_max=length, filter_order=16,
        hidden_dropout=0.0, kernels=KernelConfig("reference", "reference"),
    )  # fmt: skip
    torch.manual_seed(0)
    ref = M2Layer(cfg).to(DEVICE, dtype)
    tri = M2Layer(dataclasses.replace(cfg, kernels=kernels)).to(DEVICE, dtype)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def _run_layer(layer, h, autocast):
    x = h.clone().requires_grad_()
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(torch.ones_like(y) * torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape).to(y.dtype))
    return {"output": y, "input grad": x.grad} | {n: p.grad for n, p in layer.named_parameters()}


def _check_layer(length, hidden, inner, batch, dtype, rtol):
    """The layer on the Triton path against the reference path, parameters and input in `dtype`."""
    ref, tri = _layer_pair(length, hidden, inner, dtype)
    h = torch.randn(batch, length, hidden, device=DEVICE, dtype=dtype)
    out_ref, out_tri = _run_layer(ref, h, False), _run_layer(tri, h, False)
    assert out_ref.keys() == out_tri.keys()
    for name, r in out_ref.items():
        scale = r.abs().max().item()
        err = _max_err(out_tri[name], r.double())
        assert err <= rtol * scale + 1e-6, f"{name}: error {err:.3e} at scale {scale:.3e}"


def _check_layer_autocast(length, hidden, inner, batch, kernels=TRITON):
    """Under bf16 autocast, as in training (bf16 activations reach the kernels): the Triton path's
    error against the fp32 layer is at most 2.5x the reference path's under the same autocast,
    plus two bf16 ulps of the tensor's scale (2^-7 of its largest entry). (The block-diagonal GLU
    kernel's error is about 2x torch's: it rounds the GLU product to bf16. The Toeplitz kernels
    round the residual input u to bf16 for the tensor cores, where the reference transforms it in
    fp32, so their error does not fall below bf16 resolution when the reference's does: with the
    filters in fp32 the reference's error on the residual skip weight's gradient is 3x below the
    Toeplitz path's at L=63, whose own error is nearly 4x below what it was with bf16 filters.)"""
    ref, tri = _layer_pair(length, hidden, inner, torch.float32, kernels)
    h = torch.randn(batch, length, hidden, device=DEVICE)
    exact = _run_layer(ref, h, False)
    for layer in (ref, tri):
        layer.zero_grad()
    out_ref, out_tri = _run_layer(ref, h, True), _run_layer(tri, h, True)
    for name, e in exact.items():
        atol = 2**-7 * e.abs().max().item()
        err_tri, err_ref = _max_err(out_tri[name], e.double()), _max_err(out_ref[name], e.double())
        assert err_tri <= 2.5 * err_ref + atol, f"{name}: Triton error {err_tri:.3e}, reference {err_ref:.3e}"


def test_m2_layer_triton_matches_reference():
    _check_layer(length=63, hidden=32, inner=64, batch=2, dtype=torch.float32, rtol=1e-4)


def test_m2_layer_triton_matches_reference_under_autocast():
    # bf16 activations: the convolution takes the Toeplitz path. (CPU autocast leaves LayerNorm in
    # bf16, so the block-diagonal kernel's bf16 output would change the layer's output dtype here;
    # on a GPU, where LayerNorm autocasts to fp32, `test_m2_layer_gpu` runs both kernels.)
    _check_layer_autocast(length=63, hidden=32, inner=64, batch=2, kernels=KernelConfig(fftconv="triton"))


def test_m2_layer_cufft_matches_reference_under_autocast(monkeypatch):
    # The layer's own path to the cuFFT convolution: the short convolution's packed output, u as a
    # view of the fp32 layer input, the gradient of the packed gates and of u back through the mixer.
    from kernels import fftconv

    monkeypatch.setattr(fftconv, "CUFFT_MIN_LEN", 16)
    calls = []
    op = triton_cufft.cufft_conv
    monkeypatch.setattr(triton_cufft, "cufft_conv", lambda *a: calls.append(a[1].shape) or op(*a))
    _check_layer_autocast(length=63, hidden=32, inner=64, batch=2, kernels=KernelConfig(fftconv="triton"))
    # Once, the Triton layer's forward under autocast: the layers it is checked against are the reference's.
    assert calls == [(2, 96, 63)]


def test_m2_layer_fused_mixer_matches_reference_under_autocast():
    # bf16 projection, fp32 layer input u: the fused operator with u split for its transforms.
    _check_layer_autocast(length=32, hidden=32, inner=64, batch=3, kernels=KernelConfig(fftconv="triton", fused_mixer=True))


# GPU: the same checks at real sizes.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,fp16", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)], ids=["bf16", "bf16-fp16-operands", "fp32"])
@pytest.mark.parametrize("length,batch,dim", [(128, 8, 768), (500, 4, 960), (2048, 2, 768), (8192, 2, 768), (32768, 1, 768)])
def test_fftconv_gpu(length, batch, dim, dtype, fp16, monkeypatch):
    monkeypatch.setattr(triton_fftconv, "FP16_OPERANDS", fp16)
    inputs = _conv_inputs(batch, dim, length, True, seed=length)
    _compare(
        triton_fftconv.gated_long_conv, fftconv_reference.gated_long_conv, inputs, dtype,
        atol_rel=1e-5 if dtype == torch.float32 else 1e-3,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [False, True], ids=["tf32", "fp16-operands"])
@pytest.mark.parametrize("length,batch,dim", [(500, 4, 960), (8192, 2, 768)])
def test_fftconv_gpu_small_gradients(length, batch, dim, fp16, monkeypatch):
    monkeypatch.setattr(triton_fftconv, "FP16_OPERANDS", fp16)
    # Gradients 1e-5 of the activations: the tf32 transforms' error must stay relative to each
    # gradient, not to the activations packed beside it. (All inputs bf16: with u in fp32 torch's
    # own error on du is ~1e-7 of its scale, below what tf32 transforms reach, about 1e-3.)
    inputs = _conv_inputs(batch, dim, length, True, seed=length)
    _compare(
        triton_fftconv.gated_long_conv, fftconv_reference.gated_long_conv, inputs, torch.bfloat16,
        atol_rel=1e-3, upstream_scale=1e-5,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("upstream_scale", [1.0, 1e-5])
@pytest.mark.parametrize("length,batch,dim", [(500, 4, 960), (2048, 2, 768), (8192, 2, 768), (32768, 1, 768)])
def test_fftconv_cufft_gpu(length, batch, dim, upstream_scale):
    # Autocast's mix (u fp32, the gates bf16), and gradients 1e-5 of the activations.
    inputs = _conv_inputs(batch, dim, length, True, seed=length)
    _compare(
        triton_cufft.gated_long_conv, fftconv_reference.gated_long_conv, inputs, torch.bfloat16,
        atol_rel=1e-3, fp32_inputs=(0,), upstream_scale=upstream_scale,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("dim", [768, 960])
def test_blockdiag_gpu(dtype, dim, glu_programs):
    if glu_programs == "resident" and dtype == torch.float32:
        pytest.skip("fp32 rows of x do not fit on chip (the autotuner prunes resident programs there)")
    x, w, b = _blockdiag_inputs((4, 509), 4, dim // 4, dim // 4, seed=dim)
    _compare_all(triton_blockdiag.blockdiag_matmul, lambda x, w, b: blockdiag_reference.blockdiag_matmul(x, w) + b, [x, w, b], dtype)
    x, w, _ = _blockdiag_inputs((4, 509), 4, dim // 4, 2 * dim, seed=dim + 1)
    _compare_all(triton_blockdiag.blockdiag_glu, blockdiag_reference.blockdiag_glu, [x, w], dtype)
    seed, prob = torch.tensor([dim], device=DEVICE), 0.1
    keep = triton_blockdiag.dropout_keep_mask(seed, 4 * 509, 4 * dim, prob).reshape(4, 509, 4 * dim)
    _compare_all(
        lambda x, w: _glu_with_dropout(x, w, seed, prob),
        lambda x, w: blockdiag_reference.blockdiag_glu(x, w) * keep / (1 - prob),
        [x, w], dtype,
    )  # fmt: skip


@pytest.mark.gpu
# Batch 48: a partial batch block; 256: groups of many blocks, and 16 filter-kernel steps; L=100 and
# 64: a partial and a single output block (the path takes L <= MAX_LEN).
@pytest.mark.parametrize("length,batch,dim", [(128, 8, 768), (128, 48, 768), (128, 256, 256), (100, 4, 960), (64, 300, 768)])
def test_fftconv_toeplitz_gpu(length, batch, dim):
    inputs = _conv_inputs(batch, dim, length, True, seed=length)
    _compare(triton_toeplitz.gated_long_conv, fftconv_reference.gated_long_conv, inputs, torch.bfloat16, atol_rel=1e-3)


@pytest.mark.gpu
# Batch 48: six runs of 8 sequences per backward program; d=960: a partial channel block of 32
# would be none (960 = 30 x 32), so d=1000 checks the mask too.
@pytest.mark.parametrize("batch,length,dim", [(8, 128, 768), (48, 128, 960), (5, 128, 1000), (256, 128, 768), (16, 64, 768)])
def test_fused_mixer_gpu(batch, length, dim):
    inputs = _mixer_inputs(batch, length, dim, True, seed=length + dim)
    _compare(
        triton_mixer.sequence_mixer, mixer_reference.sequence_mixer, inputs, torch.bfloat16,
        atol_rel=1e-3, fp32_inputs=(1,),
    )  # fmt: skip
    _compare(
        triton_mixer.sequence_mixer, mixer_reference.sequence_mixer, inputs, torch.bfloat16,
        atol_rel=1e-3, fp32_inputs=(1,), upstream_scale=1e-5,
    )  # fmt: skip


@pytest.mark.gpu
def test_m2_layer_fused_mixer_gpu():
    _check_layer_autocast(length=128, hidden=768, inner=3072, batch=8, kernels=dataclasses.replace(TRITON, fused_mixer=True))


@pytest.mark.gpu
def test_m2_layer_gpu():
    _check_layer(length=512, hidden=768, inner=3072, batch=4, dtype=torch.float32, rtol=1e-3)
    _check_layer_autocast(length=512, hidden=768, inner=3072, batch=4)
    _check_layer_autocast(length=128, hidden=768, inner=3072, batch=8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without a GPU")
def test_triton_backend_without_triton_falls_back_to_the_reference_with_one_warning():
    # The dispatch, not the Triton modules, decides: a CPU without the interpreter runs the reference.
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "from kernels.blockdiag import blockdiag_glu\n"
        "from kernels.fftconv import gated_long_conv\n"
        "from kernels.blockdiag import reference as bd\n"
        "from kernels.fftconv import reference as fc\n"
        "x, w = torch.randn(3, 32), torch.randn(4, 8, 8)\n"
        "u, x1, x2, v = (torch.randn(1, 4, 8) for _ in range(4))\n"
        "k, d = torch.randn(4, 16), torch.randn(4)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(2):\n"
        "        assert torch.equal(blockdiag_glu(x, w, backend='triton'), bd.blockdiag_glu(x, w))\n"
        "        assert torch.equal(gated_long_conv(u, x1, x2, v, k, d, backend='triton'), fc.gated_long_conv(u, x1, x2, v, k, d))\n"
        "print(sorted(str(c.message).split(':')[0] for c in caught))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['blockdiag triton backend', 'fftconv triton backend']"


@pytest.mark.parametrize("engine", ["cublas", "triton"])
@pytest.mark.parametrize("nblocks,p,q,rows", [(4, 16, 24, 37), (2, 40, 16, 5)])
def test_blockdiag_gemms_of_each_engine_match_the_reference(engine, nblocks, p, q, rows):
    # Each engine's three GEMMs on their own (the benchmark times them one by one). cuBLAS's are
    # torch.bmm on strided views of the rows, written in place, which the CPU runs too.
    x, w, b = _blockdiag_inputs((rows,), nblocks, p, q, seed=rows)
    x, w, b = x.float(), w.float(), b.float()
    gemms = triton_blockdiag.GEMMS[engine]
    y = gemms.fwd(x, w, b)
    torch.testing.assert_close(y, blockdiag_reference.blockdiag_matmul(x, w) + b, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(y)
    x_ = x.clone().requires_grad_()
    w_ = w.clone().requires_grad_()
    blockdiag_reference.blockdiag_matmul(x_, w_).backward(dy)
    torch.testing.assert_close(gemms.dx(dy, w), x_.grad, rtol=1e-4, atol=1e-4)
    dw = gemms.dw(dy, x, w)
    assert dw.dtype == torch.float32
    torch.testing.assert_close(dw, w_.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_and_residual_in_one_pass(dtype):
    # 37 x 300: partial tiles of rows and columns (16 x 256). fp32 sums, rounded once (the
    # interpreter rounds bf16 by truncation: one ulp).
    gen = torch.Generator().manual_seed(9)
    y, bias, r = (torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_() for shape in ((37, 300), (300,), (37, 300)))
    out = triton_blockdiag.add_bias_and_residual(y, bias, r)
    expected = (y.detach().float() + bias.detach().float() + r.detach().float()).to(dtype)
    ulp = 0.0 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(out, expected, rtol=ulp, atol=1e-6)
    g = torch.randn(37, 300, generator=gen).to(DEVICE, dtype)
    out.backward(g)
    assert torch.equal(y.grad, g) and torch.equal(r.grad, g)
    torch.testing.assert_close(bias.grad, g.sum(0))


def test_m2_mlp_adds_bias_and_residual_in_one_pass_on_cublas(monkeypatch):
    # The block-diagonal output projection on cuBLAS's GEMMs (torch.bmm, which the CPU runs too)
    # with the residual: the bias and residual added by the one-pass kernel, the MLP's output and
    # gradients as the reference backend's.
    calls = []
    fused = triton_blockdiag._BiasResidualAdd

    class Counted(fused):
        @staticmethod
        def forward(ctx, *args):
            calls.append(1)
            return fused.forward(ctx, *args)

    monkeypatch.setattr(triton_blockdiag, "cublas_gemms", lambda t: True)
    monkeypatch.setattr(triton_blockdiag, "_BiasResidualAdd", Counted)
    ref, tri = _layer_pair(16, 32, 64, torch.float32, KernelConfig(blockdiag="triton"))
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE).requires_grad_()
    outs = []
    for mlp in (ref.mlp, tri.mlp):
        x.grad = None
        y = mlp(x)
        y.backward(torch.ones_like(y) * torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        outs.append([y, x.grad] + [p.grad for p in mlp.parameters()])
    assert calls == [1]
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


# The short convolution's kernels: awkward L and C (partial tiles of positions and channels), the
# projection's (B, L, C) layout in, (B, C, L) out, fp32 and bf16 activations with fp32 parameters.
# With `in_linear`'s bias (the projection without it), its gradient, dp's column sums, comes from the
# backward kernel's partial sums.
@pytest.mark.parametrize("pair_shifted_inputs", [False, True], ids=["", "pair_shifted_inputs"])
@pytest.mark.parametrize("in_bias", [False, True], ids=["", "in_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,length,width", [(3, 37, 40), (1, 5, 24), (2, 64, 48)])
def test_short_conv_matches_reference(dtype, batch, length, width, in_bias, pair_shifted_inputs, monkeypatch):
    from kernels.mixer import triton_short_conv

    monkeypatch.setattr(triton_short_conv, "PAIR_SHIFTED_INPUTS", pair_shifted_inputs)
    gen = torch.Generator().manual_seed(length + width)
    p = torch.randn(batch, length, width, generator=gen, dtype=f64).to(DEVICE)
    weight = torch.randn(width, 1, 3, generator=gen, dtype=f64).to(DEVICE)
    bias = torch.randn(width, generator=gen, dtype=f64).to(DEVICE)
    params = [weight, bias] + ([torch.randn(width, generator=gen, dtype=f64).to(DEVICE)] if in_bias else [])
    out = triton_short_conv.causal_short_conv(p.to(dtype), *[t.float() for t in params])
    assert out.shape == (batch, width, length) and out.is_contiguous() and out.dtype == dtype
    # (Triton's interpreter rounds to bf16 by truncation, up to one ulp: 2^-8 of the output's scale.)
    bf16_atol = 2**-7 if triton_common.INTERPRET else 1e-3
    _compare(triton_short_conv.causal_short_conv, mixer_reference.causal_short_conv, [p, *params], dtype,
             atol_rel=1e-6 if dtype == torch.float32 else bf16_atol, fp32_inputs=(1,))  # fmt: skip


def test_short_conv_backward_blocks_give_the_same_gradients():
    # The block choices the benchmark's sweep times (tiles, sequences per program) compute the same
    # gradients: dp bit for bit, the parameter gradients' partial sums to the same totals.
    from kernels.mixer import triton_short_conv

    gen = torch.Generator().manual_seed(7)
    batch, length, width = 5, 37, 40
    p = torch.randn(batch, length, width, generator=gen).to(DEVICE)
    g = torch.randn(batch, width, length, generator=gen).to(DEVICE)
    weight = torch.randn(width, 1, 3, generator=gen).to(DEVICE)

    def backward(**overrides):
        dp = torch.empty_like(p)
        blk = triton_short_conv._blocks(batch, length, width, **overrides)
        return dp, triton_short_conv.launch_backward(g, p, weight, dp, blk).sum(0), blk

    dp, sums, default = backward()
    assert default["BPG"] == 1  # the default grid: one sequence a program at this size
    for overrides in (
        dict(target_programs=1), dict(rows=32, cols=16, target_programs=4), dict(rows=16, cols=32),
        dict(pair_shifted_inputs=True), dict(pair_shifted_inputs=True, rows=32, cols=16, target_programs=4),
        dict(prefetch=True, target_programs=1), dict(prefetch=True, rows=32, cols=16, target_programs=4),
        dict(prefetch=True, pair_shifted_inputs=True, target_programs=1),
    ):  # fmt: skip
        dp_, sums_, blk = backward(**overrides)
        assert blk != default
        torch.testing.assert_close(dp_, dp, rtol=0, atol=0)
        torch.testing.assert_close(sums_, sums, rtol=1e-5, atol=1e-5)
    assert triton_short_conv._blocks(batch, length, width, target_programs=1)["BPG"] == batch


def test_short_conv_takes_the_long_blocks_from_their_length_on(monkeypatch):
    # From LONG_MIN_LEN on the kernels take LONG_BLOCKS' tiles and pairing (the keywords still
    # override them), and compute what the reference computes with them.
    from kernels.mixer import triton_short_conv

    long_blocks = triton_short_conv._blocks(4, triton_short_conv.LONG_MIN_LEN, 2304)
    chosen = triton_short_conv.LONG_BLOCKS
    assert (long_blocks["BL"], long_blocks["BC"], long_blocks["BL_FWD"], long_blocks["BC_FWD"]) == (
        chosen["rows"], chosen["cols"], chosen["rows_fwd"], chosen["cols_fwd"],
    )  # fmt: skip
    assert long_blocks["PAIR_SHIFTED_INPUTS"] == chosen["pair_shifted_inputs"] and long_blocks["PREFETCH"] == chosen["prefetch"]
    assert triton_short_conv._blocks(4, triton_short_conv.LONG_MIN_LEN, 2304, rows=16)["BL"] == 16
    short = triton_short_conv._blocks(4, triton_short_conv.LONG_MIN_LEN - 1, 2304)
    assert short["PAIR_SHIFTED_INPUTS"] == triton_short_conv.PAIR_SHIFTED_INPUTS and short["BL_FWD"] == short["BL"]
    assert short["PREFETCH"] == triton_short_conv.PREFETCH
    monkeypatch.setattr(triton_short_conv, "LONG_MIN_LEN", 32)
    gen = torch.Generator().manual_seed(5)
    batch, length, width = 3, 37, 40
    p = torch.randn(batch, length, width, generator=gen, dtype=f64).to(DEVICE)
    params = [torch.randn(width, 1, 3, generator=gen, dtype=f64).to(DEVICE), torch.randn(width, generator=gen, dtype=f64).to(DEVICE)]
    assert triton_short_conv._blocks(batch, length, width)["BC_FWD"] == chosen["cols_fwd"]
    _compare(triton_short_conv.causal_short_conv, mixer_reference.causal_short_conv, [p, *params], torch.float32,
             atol_rel=1e-6, fp32_inputs=(1,))  # fmt: skip


def test_short_conv_forward_blocks_give_the_same_outputs():
    # The forward's tiles the benchmark's sweep times compute the same convolution and layout of u,
    # bit for bit (partial tiles of positions and channels here).
    from kernels.mixer import triton_short_conv

    gen = torch.Generator().manual_seed(8)
    batch, length, width, dim = 3, 37, 42, 14
    p = torch.randn(batch, length, width, generator=gen).to(DEVICE, torch.bfloat16)
    weight = torch.randn(width, 1, 3, generator=gen).to(DEVICE)
    bias, in_bias = torch.randn(2, width, generator=gen).to(DEVICE)
    u = torch.randn(batch, length, dim, generator=gen).to(DEVICE)

    def forward(**overrides):
        out = torch.empty(batch, width, length, dtype=p.dtype, device=DEVICE)
        ut = torch.empty(batch, dim, length, device=DEVICE)
        blk = triton_short_conv._blocks(batch, length, width, **overrides)
        triton_short_conv.launch_forward(p, weight, bias, out, blk, u, ut, in_bias)
        return out, ut, blk

    out, ut, default = forward()
    torch.testing.assert_close(ut, u.transpose(1, 2), rtol=0, atol=0)
    for overrides in (dict(rows_fwd=32, cols_fwd=16), dict(rows_fwd=16, cols_fwd=32, warps_fwd=8), dict(rows_fwd=64)):
        out_, ut_, blk = forward(**overrides)
        tile = ("BL_FWD", "BC_FWD", "num_warps")
        assert [blk[k] for k in tile] != [default[k] for k in tile]
        torch.testing.assert_close(out_, out, rtol=0, atol=0)
        torch.testing.assert_close(ut_, ut, rtol=0, atol=0)


def test_short_conv_takes_the_triton_path_per_op(monkeypatch):
    # The Triton backends' per-op mixer calls the kernels, the reference backend the reference; both
    # give the reference mixer's output.
    from kernels import mixer
    from kernels.mixer import triton_short_conv

    calls = []
    kernel = triton_short_conv.causal_short_conv_and_layout
    monkeypatch.setattr(triton_short_conv, "causal_short_conv_and_layout", lambda *a: (calls.append(1), kernel(*a))[1])
    inputs = _mixer_inputs(2, 32, 16, True, seed=3)
    ref = mixer_reference.sequence_mixer(*inputs)
    args = [t.float() for t in inputs]  # fp32, as the kernels compute
    for backend in ("triton", "reference"):
        torch.testing.assert_close(mixer.implementation(backend)(*args).double(), ref, rtol=1e-3, atol=1e-3)
    assert calls == [1]
    monkeypatch.setattr(mixer, "TRITON_SHORT_CONV", False)
    mixer.implementation("triton")(*args)
    assert calls == [1]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_m2_mixer_adds_the_projection_bias_in_the_short_convolution(backend):
    # Without a padding mask in_linear runs without its bias and the short convolution adds it: the
    # same output and gradients as with the bias in in_linear (the path a padding mask takes; an
    # all-ones mask changes nothing else). On the Triton path no reduction over the projection's
    # gradient runs besides the kernels: the bias's gradient comes with the filter's.
    from torch.utils._python_dispatch import TorchDispatchMode

    _, layer = _layer_pair(32, 16, 32, torch.float32, KernelConfig(fftconv=backend))
    mixing = layer.attention
    h = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    grad_out = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    projection_size = 2 * 32 * 3 * 16

    class RecordSums(TorchDispatchMode):
        """The sums over a tensor of the projection's size."""

        def __init__(self):
            super().__init__()
            self.sums = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith("sum") and args[0].numel() == projection_size:
                self.sums.append(func.__name__)
            return func(*args, **(kwargs or {}))

    results = []
    for mask in (None, torch.ones(2, 32, device=DEVICE)):
        x = h.clone().requires_grad_()
        mixing.zero_grad()
        with RecordSums() as record:
            mixing(x, mask_BL=mask).backward(grad_out)
        results.append(([x.grad] + [p.grad.clone() for p in mixing.parameters()], record.sums))
    (folded, folded_sums), (in_linear, in_linear_sums) = results
    for a, b in zip(folded, in_linear):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert mixing.in_linear.bias.grad.abs().sum() > 0
    assert len(in_linear_sums) >= 1  # F.linear's bias gradient
    if backend == "triton":
        assert folded_sums == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernels themselves")
def test_short_conv_kernels_compile_for_hopper_without_spills():
    # The interpreter does not compile: the short convolution's kernels at their GPU tile, with and
    # without in_linear's bias (the backward in its two pairings, loading ahead with the second),
    # compiled for sm_90 (an H100/H200), spill nothing.
    report = _sm90_report(
        "from kernels.mixer import triton_short_conv as t\n"
        "report = {}\n"
        "fwd = dict(p_ptr='bf16', out_ptr='bf16')\n"
        "bwd = dict(g_ptr='bf16', p_ptr='bf16', dp_ptr='bf16')\n"
        "for bias in (False, True):\n"
        "    rows = 5 if bias else 4\n"
        "    tile = dict(HAS_U=True, HAS_IN_BIAS=bias, BL=t.ROWS, BC=t.COLS)\n"
        "    report[f'forward {bias}'] = resources(t._short_conv_fwd_kernel, tile, fwd, 4)\n"
        "    for pair in (False, True):\n"
        "        args = {**tile, 'ROWS': rows, 'PAIR_SHIFTED_INPUTS': pair, 'PREFETCH': pair}\n"
        "        report[f'backward {bias} {pair}'] = resources(t._short_conv_bwd_kernel, args, bwd, t.BWD_WARPS)\n"
        "    sums = dict(ROWS=rows, BP=t.PARAM_ROWS, BC=t.PARAM_COLS)\n"
        "    report[f'parameter sums {bias}'] = resources(t._param_grads_kernel, sums, {}, 4)\n"
    )
    assert len(report) == 8 and all(usage["spill_bytes"] == 0 for usage in report.values()), report


# The short convolution's backward as the sm_90 reports below compile it: its module as t, the
# arguments a launch aligns to 16 bytes (`aligned`) and its tensors' dtypes (`dtypes`).
_SHORT_CONV_BWD_SM90 = (
    "from kernels.mixer import triton_short_conv as t\n"
    "aligned = ('g_ptr', 'p_ptr', 'dp_ptr', 'w_ptr', 'inb_ptr', 'part_ptr', 'gu_ptr', 'du_ptr', 'L', 'C', 'D')\n"
    "dtypes = dict(g_ptr='bf16', p_ptr='bf16', dp_ptr='bf16')\n"
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a compile for sm_90 without running it")
def test_short_conv_backward_pairing_shifted_inputs_takes_fewer_layout_passes():
    # The backward reads the gradient in its (B, C, L) layout and the projection in (B, L, C):
    # every product of the two takes one of them through shared memory into the other's register
    # layout, each sequence. Pairing the unshifted gradient with the shifted inputs
    # (PAIR_SHIFTED_INPUTS) must leave the compiler fewer such passes in the sequence loop, and
    # fewer bytes, than pairing the shifted gradients with the inputs.
    report = _compiled_report(
        _SHORT_CONV_BWD_SM90
        + "report = {}\n"
        "for pair in (False, True):\n"
        "    tile = dict(HAS_U=False, HAS_IN_BIAS=True, BL=t.ROWS, BC=t.COLS, ROWS=5, PAIR_SHIFTED_INPUTS=pair, PREFETCH=False)\n"
        "    report[str(pair)] = loop_layout_conversions(t._short_conv_bwd_kernel, tile, dtypes, t.BWD_WARPS, aligned_args=aligned)\n"
    )  # fmt: skip
    (shifted_gradients,), (shifted_inputs,) = report["False"], report["True"]  # one loop, over the sequences

    def passed_bytes(conversions):
        sizes = {"f32": 4, "bf16": 2}
        return sum(math.prod(map(int, c.split("x")[:-1])) * sizes[c.split("x")[-1]] for c in conversions)

    assert len(shifted_inputs) < len(shifted_gradients), report
    assert passed_bytes(shifted_inputs) < passed_bytes(shifted_gradients), report


@pytest.mark.skipif(torch.cuda.is_available(), reason="a compile for sm_90 without running it")
def test_short_conv_backward_loads_each_sequence_before_its_layout_passes():
    # Each layout pass of the backward's sequence loop ends at a barrier; a pass whose tile was
    # loaded just before it waits there for memory. The loop issues all its loads first (the
    # current sequence's, or with PREFETCH the next one's): in the sm_90 code of the GPU tiles
    # (both pairings, the short and the long blocks), every global load of the loop comes before
    # its first barrier. (The kernel that loaded its tiles as fp32 one at a time had loads
    # between the barriers: "LL||LLLL||L||SL" at L=128.)
    report = _compiled_report(
        _SHORT_CONV_BWD_SM90
        + "long = t.LONG_BLOCKS\n"
        "report = {}\n"
        "for prefetch in (False, True):\n"
        "    for pair in (False, True):\n"
        "        for name, bl, bc, warps in (('short', t.ROWS, t.COLS, t.BWD_WARPS), ('long', long['rows'], long['cols'], long['warps_bwd'])):\n"
        "            tile = dict(HAS_U=False, HAS_IN_BIAS=True, BL=bl, BC=bc, ROWS=5, PAIR_SHIFTED_INPUTS=pair, PREFETCH=prefetch)\n"
        "            report[f'{prefetch} {name} {pair}'] = loop_memory_order(t._short_conv_bwd_kernel, tile, dtypes, warps, aligned_args=aligned)\n"
    )  # fmt: skip
    assert len(report) == 8, report
    for name, (order,) in report.items():  # one loop, over the sequences
        loads_before, barrier, after = order.partition("|")
        assert barrier and loads_before.count("L") >= 4 and "L" not in after, (name, order)


def _check_short_conv_layout(dtype, batch, length, dim):
    from kernels.mixer import triton_short_conv

    gen = torch.Generator().manual_seed(11)
    p = torch.randn(batch, length, 3 * dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = torch.randn(3 * dim, 1, 3, generator=gen).to(DEVICE).requires_grad_()
    bias = torch.randn(3 * dim, generator=gen).to(DEVICE).requires_grad_()
    u = torch.randn(batch, length, dim, generator=gen).to(DEVICE).requires_grad_()
    x, u_BDL = triton_short_conv.causal_short_conv_and_layout(p, weight, bias, u)
    assert u_BDL.is_contiguous() and torch.equal(u_BDL, u.transpose(1, 2))
    assert torch.equal(x, triton_short_conv.causal_short_conv(p, weight, bias))
    gx = torch.randn(x.shape, generator=gen).to(DEVICE, dtype)
    gu = torch.randn(u_BDL.shape, generator=gen).to(DEVICE)
    dp, dw, db, du = torch.autograd.grad((x, u_BDL), (p, weight, bias, u), (gx, gu))
    assert du.is_contiguous() and torch.equal(du, gu.transpose(1, 2))
    alone = torch.autograd.grad(triton_short_conv.causal_short_conv(p, weight, bias), (p, weight, bias), gx)
    for ours, theirs in zip((dp, dw, db), alone):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("prefetch", [False, True], ids=["", "prefetch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_conv_lays_out_the_mixer_input(dtype, prefetch, monkeypatch):
    # The kernels that lay out the projection also copy the mixer input u (B, L, D) to (B, D, L)
    # and its gradient back, bit for bit; D = 13 leaves partial channel tiles (C = 39). Loading a
    # sequence ahead, the backward's programs take all three sequences (one program per tile).
    from kernels.mixer import triton_short_conv

    monkeypatch.setattr(triton_short_conv, "PREFETCH", prefetch)
    if prefetch:
        monkeypatch.setattr(triton_short_conv, "TARGET_PROGRAMS", 1)
    _check_short_conv_layout(dtype, batch=3, length=37, dim=13)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [16, 256])
def test_short_conv_lays_out_the_mixer_input_gpu(batch):
    # M2-BERT-80M at L=128 (fp32 u under autocast, bf16 projection), as fine-tuning and the engine run it.
    _check_short_conv_layout(torch.bfloat16, batch=batch, length=128, dim=768)


def test_triton_mixer_makes_no_strided_pass_over_its_input():
    # The per-op Triton mixer takes u (B, L, D) (fp32, as under autocast) and gives u's gradient
    # (B, L, D) contiguous, with no strided pass over u or its gradient of its own: the layout
    # changes are the short convolution kernels' loads and stores.
    from torch.utils._python_dispatch import TorchDispatchMode

    from kernels import mixer

    inputs = [t.float().requires_grad_() for t in _mixer_inputs(2, 32, 16, True, seed=4)]
    inputs[0] = inputs[0].detach().bfloat16().requires_grad_()
    u = inputs[3]
    strided = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            u_sized = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == u.dtype and a.numel() == u.numel()]
            if not isinstance(out, torch.Tensor) or not out._is_view():
                strided.extend(func.__name__ for a in u_sized if not a.is_contiguous())
            return out

    with Record():
        y = mixer.implementation("triton")(*inputs)
        (du,) = torch.autograd.grad(y, [u], torch.randn_like(y))
    assert strided == [] and du.is_contiguous()


@pytest.mark.parametrize("autocast", [False, True])
def test_channels_first_input_linear_keeps_the_gradient_in_the_input_layout(autocast):
    # The mixer's out_linear: the same output and gradients as nn.Linear (bf16 under CPU autocast),
    # with the input's gradient laid out (B, D, L) as the input is stored.
    from kernels.mixer import channels_first_input_linear

    gen = torch.Generator().manual_seed(3)
    x_BDL = torch.randn(3, 8, 5, generator=gen)
    weight, bias = torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen)
    grad_out = torch.randn(3, 5, 6, generator=gen)
    results = []
    for fn in (channels_first_input_linear, torch.nn.functional.linear):
        leaves = [t.clone().requires_grad_() for t in (x_BDL, weight, bias)]
        x_BLD = leaves[0].transpose(1, 2)
        seen = []
        x_BLD.register_hook(seen.append)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(x_BLD, leaves[1], leaves[2])
        out.backward(grad_out.to(out.dtype))
        results.append((out, seen[0], [t.grad for t in leaves]))
    (out, seen, grads), (out_ref, seen_ref, grads_ref) = results
    assert out.dtype == out_ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    tol = {"atol": 2e-2, "rtol": 2e-2} if autocast else {}
    torch.testing.assert_close(out, out_ref, **tol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **tol)
    assert seen.transpose(1, 2).is_contiguous() and not seen.is_contiguous()
    assert seen_ref.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_transposes(dtype):
    # Partial tiles in both dimensions (the kernel's are 64 x 64), three sequences.
    from kernels.mixer.triton_layout import channels_last

    x = torch.randn(3, 70, 100, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    y = channels_last(x)
    assert y.shape == (3, 100, 70) and y.is_contiguous() and y.dtype == dtype
    assert torch.equal(y, x.transpose(1, 2))


@pytest.mark.gpu
def test_channels_last_gpu():
    # The fine-tuning step's mixer output at batch 48 (M2-BERT-80M, L=128).
    from kernels.mixer.triton_layout import channels_last

    x = torch.randn(48, 768, 128, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(channels_last(x), x.transpose(1, 2))


def test_m2_mixer_makes_no_strided_copy_of_its_output():
    # The eager per-op M2 mixer with its out_linear (bf16, as under autocast): no aten layout copy of
    # the mixer output or its gradient. The forward's layout change for the projection is the
    # tiled transpose's (`triton_layout`); the convolution's backward reads the gradient as
    # out_linear gives it.
    from torch.utils._python_dispatch import TorchDispatchMode

    _, layer = _layer_pair(32, 16, 32, torch.bfloat16, KernelConfig(fftconv="triton"))
    mixing = layer.attention
    h = torch.randn(2, 32, 16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    size = h.numel()
    passes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__ in ("clone.default", "copy_.default", "_to_copy.default"):
                sized = [a for a in args if isinstance(a, torch.Tensor) and a.numel() == size]
                passes.extend((phase, func.__name__) for a in sized if not a.is_contiguous())
            return out

    with Record():
        phase = "forward"
        y = mixing(h)
        phase = "backward"
        y.backward(torch.randn_like(y))
    assert passes == []


@pytest.mark.gpu
@pytest.mark.parametrize("batch,length", [(16, 128), (48, 128), (256, 128), (4, 8192)])
def test_short_conv_gpu(batch, length):
    # M2-BERT-80M's projection at L=128 (C = 3 x 768), as the engine and fine-tuning pass it, and at
    # L=8192 (the long sequences' blocks): without in_linear's bias, which the kernels add (and
    # whose gradient they sum).
    from kernels.mixer import triton_short_conv

    gen = torch.Generator().manual_seed(batch)
    p = torch.randn(batch, length, 2304, generator=gen, dtype=f64).to(DEVICE)
    weight = (torch.randn(2304, 1, 3, generator=gen, dtype=f64) * 0.5).to(DEVICE)
    bias = (torch.randn(2304, generator=gen, dtype=f64) * 0.1).to(DEVICE)
    in_bias = (torch.randn(2304, generator=gen, dtype=f64) * 0.1).to(DEVICE)
    _compare(triton_short_conv.causal_short_conv, mixer_reference.causal_short_conv, [p, weight, bias, in_bias],
             torch.bfloat16, atol_rel=1e-3, fp32_inputs=(1,))  # fmt: skip


def test_mixer_output_linear_takes_any_input_as_nn_linear():
    # 2-D and contiguous 3-D inputs take F.linear.
    from m2dist.models.m2 import MixerOutputLinear

    linear = MixerOutputLinear(8, 6)
    for x in (torch.randn(5, 8), torch.randn(2, 5, 8)):
        torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
