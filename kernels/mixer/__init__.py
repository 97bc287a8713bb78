"""M2's sequence mixer after `in_linear`: causal short convolution, gates and the two long
convolutions, from the projection (B, L, 3D) and the mixer input (B, L, D) to the output (B, L, D).

Two ways to compute it: per op (the short convolution, then `kernels.fftconv`'s gated long
convolution of the backend, with the transposes between layouts), or, with `fused`, one Triton
operator (`triton_mixer`) where it applies (no padding mask, bf16/fp16, L a power of two up to
`triton_mixer.MAX_LEN`). A layer resolves its implementation once (`implementation`).

Per op, the Triton backends take the short convolution's own kernels (`triton_short_conv`: the
projection's (B, L, C) layout in, the long convolution's (B, C, L) out, and back; they also lay the
mixer input u out as (B, D, L) for the long convolution and its gradient back as (B, L, D), where
separate copies were strided passes of their own, eagerly and inside a whole-model compilation
alike); the reference backend takes the reference, `torch.compile`d on a GPU, and a transposed
view of u.
"""

import functools
from collections.abc import Callable

import torch

import kernels.fftconv
from kernels import use_triton
from kernels.mixer import reference
from kernels.mixer.reference import causal_short_conv
from kernels.triton_common import can_run

SequenceMixer = Callable[..., torch.Tensor]


@functools.cache
def _compiled_short_conv():
    # Static shapes: one specialised kernel per (B, L, C), as a model with fixed shapes uses it. With
    # automatic dynamic shapes the second shape seen recompiles a generic kernel that is slower for
    # every shape after it (the benchmark's second length measured the per-op mixer 1.7x slower).
    return torch.compile(causal_short_conv, dynamic=False)


def _short_conv(p_BLC, weight_C1K, bias_C, u_BLD, in_bias_C=None):
    """(x (B, C, L), u (B, D, L) as a transposed view, or None without u). On a GPU, outside a
    whole-model compilation, the short convolution runs compiled (one fused pass with its
    transposition and cast; see `causal_short_conv`)."""
    compiled = p_BLC.is_cuda and not torch.compiler.is_compiling()
    x_BCL = (_compiled_short_conv() if compiled else causal_short_conv)(p_BLC, weight_C1K, bias_C, in_bias_C)
    return x_BCL, None if u_BLD is None else u_BLD.transpose(1, 2)


# Whether the Triton backends take the short convolution's kernels (False: the reference's path,
# as `tools/bench_kernels.py` compares them).
TRITON_SHORT_CONV = True


def _triton_short_conv(p_BLC, weight_C1K, bias_C, u_BLD, in_bias_C=None):
    """(x (B, C, L), u (B, D, L)) from the short convolution's kernels; `_short_conv` where they do
    not apply. The kernels also lay u out contiguously (and its gradient back), where aten's copies
    were strided passes of their own; inside a whole-model compilation too, where a transposed view
    left to Inductor became a strided fp32 store in the layer norm's kernel before the op."""
    # Imported on first use: Triton modules must be imported after TRITON_INTERPRET is set.
    from kernels.mixer import triton_short_conv

    if TRITON_SHORT_CONV and triton_short_conv.supports(p_BLC, weight_C1K):
        if u_BLD is None:
            return triton_short_conv.causal_short_conv(p_BLC, weight_C1K, bias_C, in_bias_C), None
        return triton_short_conv.causal_short_conv_and_layout(p_BLC, weight_C1K, bias_C, u_BLD, in_bias_C)
    return _short_conv(p_BLC, weight_C1K, bias_C, u_BLD, in_bias_C)


def _per_op(
    gated_long_conv, p_BLC, weight_C1K, bias_C, u_BLD, k1_DN, d1_D, k2_DN, d2_D, mask_BL, in_bias_C,
    short_conv=_short_conv,
):  # fmt: skip
    """`gated_long_conv`: `kernels.fftconv`'s packed implementation, which takes the short
    convolution's (B, 3D, L) output x = [x1; x2; v] as it is. `short_conv` gives x and u in the
    long convolution's (B, D, L) layout (u only for the residual convolution, the one that reads it)."""
    dim = u_BLD.shape[-1]
    residual = k2_DN is not None
    x_BCL, u_BDL = short_conv(p_BLC, weight_C1K, bias_C, u_BLD if residual else None, in_bias_C)
    if mask_BL is not None:
        x1_BDL, x2_BDL, v_BDL = x_BCL.split(dim, dim=1)
        x_BCL = torch.cat([x1_BDL, x2_BDL, v_BDL * mask_BL.to(v_BDL.dtype)[:, None, :]], dim=1)
    y_BDL = gated_long_conv(u_BDL if residual else u_BLD.transpose(1, 2), x_BCL, k1_DN, d1_D, k2_DN, d2_D)
    return y_BDL.transpose(1, 2)


def _fused_or_per_op(per_op_conv, p_BLC, weight_C1K, bias_C, u_BLD, k1_DN, d1_D, k2_DN, d2_D, mask_BL, in_bias_C):
    # Imported on first use: Triton modules must be imported after TRITON_INTERPRET is set.
    from kernels.mixer import triton_mixer

    if mask_BL is None and can_run(p_BLC) and triton_mixer.supports(p_BLC):
        if in_bias_C is not None:  # the fused operator takes the projection with its bias
            p_BLC = (p_BLC + in_bias_C).to(p_BLC.dtype)
        return triton_mixer.sequence_mixer(p_BLC, weight_C1K, bias_C, u_BLD, k1_DN, d1_D, k2_DN, d2_D)
    return _triton_per_op(per_op_conv, p_BLC, weight_C1K, bias_C, u_BLD, k1_DN, d1_D, k2_DN, d2_D, mask_BL, in_bias_C)


def _triton_per_op(per_op_conv, p_BLC, *args):
    return _per_op(per_op_conv, p_BLC, *args, short_conv=_triton_short_conv)


def _auto(triton_path, triton_conv, reference_conv, p_BLC, *args):
    """"auto": `triton_path` (fused or per op) on an Ampere or newer GPU, the reference elsewhere."""
    if use_triton(p_BLC):
        return triton_path(triton_conv, p_BLC, *args)
    return _per_op(reference_conv, p_BLC, *args)


class _ChannelsFirstInputLinear(torch.autograd.Function):
    """`F.linear` of x (B, L, D) stored channels-first, as x_BDL (B, D, L) contiguous, whose input
    gradient comes back in that same storage. The output and the weight's gradient need x as (B L, D)
    rows, so the forward lays it out once (the copy `F.linear` makes too; on a GPU by a tiled
    transpose, `triton_layout`, where aten's copy is a strided pass) and keeps it; the input's
    gradient, `F.linear`'s (B, L, D) rows that the convolution's backward then copied to (B, D, L),
    is here one batched GEMM per sequence, W^T (D, O) @ dOut_b^T (O, L), straight into (B, D, L).
    Under autocast the operands are cast once to its dtype, as autocast would cast them."""

    @staticmethod
    def forward(ctx, x_BDL, weight_OD, bias_O):
        device = x_BDL.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_BDL.dtype
        x_BDL = x_BDL.to(dtype)
        if can_run(x_BDL):
            # Imported on first use: Triton modules must be imported after TRITON_INTERPRET is set.
            from kernels.mixer.triton_layout import channels_last

            x_BLD = channels_last(x_BDL)
        else:
            x_BLD = x_BDL.transpose(1, 2).contiguous()
        weight_OD = weight_OD.to(dtype)
        ctx.save_for_backward(x_BLD, weight_OD)
        ctx.has_bias = bias_O is not None
        return torch.nn.functional.linear(x_BLD, weight_OD, None if bias_O is None else bias_O.to(dtype))

    @staticmethod
    def backward(ctx, grad_BLO):
        x_BLD, weight_OD = ctx.saved_tensors
        grad_BLO = grad_BLO.to(x_BLD.dtype)
        batch, _, dim = x_BLD.shape
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        grad_BDL = torch.bmm(weight_OD.t().expand(batch, dim, -1), grad_BLO.transpose(1, 2)) if needs_x else None
        grad_weight = grad_BLO.flatten(0, 1).t() @ x_BLD.flatten(0, 1) if needs_weight else None
        grad_bias = grad_BLO.sum((0, 1)) if ctx.has_bias and needs_bias else None
        return grad_BDL, grad_weight, grad_bias


def channels_first_input_linear(x_BLD: torch.Tensor, weight_OD: torch.Tensor, bias_O: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x_BLD, weight, bias)`; where x is a transposed view of a contiguous (B, D, L) tensor,
    as the per-op mixer returns its output, run eagerly, its gradient comes back in that layout
    (`_ChannelsFirstInputLinear`), so that the convolution's backward reads it without a copy. Inside a
    whole-model compilation Inductor places the layout changes itself."""
    channels_first = x_BLD.dim() == 3 and x_BLD.transpose(1, 2).is_contiguous() and not x_BLD.is_contiguous()
    if not channels_first or torch.compiler.is_compiling():
        return torch.nn.functional.linear(x_BLD, weight_OD, bias_O)
    return _ChannelsFirstInputLinear.apply(x_BLD.transpose(1, 2), weight_OD, bias_O)


def _check_shapes(p_BLC, weight_C1K, bias_C, u_BLD, k1_DN, d1_D, k2_DN, d2_D) -> None:
    if u_BLD.dim() != 3 or p_BLC.shape != (*u_BLD.shape[:2], 3 * u_BLD.shape[-1]):
        raise ValueError(
            f"projected_BLC must be (batch, length, 3 * dim) for u_BLD (batch, length, dim) {tuple(u_BLD.shape)}, "
            f"got {tuple(p_BLC.shape)}"
        )
    if weight_C1K.dim() != 3 or weight_C1K.shape[:2] != (p_BLC.shape[-1], 1) or bias_C.shape != (p_BLC.shape[-1],):
        raise ValueError(
            f"the short filter must be ({p_BLC.shape[-1]}, 1, taps) with a ({p_BLC.shape[-1]},) bias, "
            f"got {tuple(weight_C1K.shape)}, {tuple(bias_C.shape)}"
        )
    if (k2_DN is None) != (d2_D is None):
        raise ValueError("k2_DN and d2_D must be given together")
    _, length, dim = u_BLD.shape
    for name, k, d in (("k1_DN", k1_DN, d1_D), ("k2_DN", k2_DN, d2_D)):
        if k is not None and (k.shape != (dim, 2 * length) or d.shape != (dim,)):
            raise ValueError(
                f"{name} must be ({dim}, {2 * length}) with a ({dim},) skip weight, got {tuple(k.shape)}, {tuple(d.shape)}"
            )


def _checked(impl, p_BLC, weight_C1K, bias_C, u_BLD, k1_DN, d1_D, k2_DN=None, d2_D=None, mask_BL=None, *, in_bias_C=None):
    _check_shapes(p_BLC, weight_C1K, bias_C, u_BLD, k1_DN, d1_D, k2_DN, d2_D)
    if in_bias_C is not None and in_bias_C.shape != bias_C.shape:
        raise ValueError(f"in_bias_C must be ({p_BLC.shape[-1]},), got {tuple(in_bias_C.shape)}")
    if in_bias_C is not None and mask_BL is not None:
        raise ValueError("in_bias_C with mask_BL: pass the projection with its bias, its padding zeroed")
    return impl(p_BLC, weight_C1K, bias_C, u_BLD, k1_DN, d1_D, k2_DN, d2_D, mask_BL, in_bias_C)


def implementation(backend: str, fused: bool = False) -> SequenceMixer:
    """The sequence mixer with `kernels.fftconv`'s `backend`, called as
    `mixer(projected_BLC, short_weight_C1K, short_bias_C, u_BLD, k1_DN, d1_D, k2_DN, d2_D, mask_BL,
    in_bias_C=None)`.

    `fused` (Triton backends only) computes it as one operator where that applies, per op elsewhere.
    mask_BL (B, L), 1 at tokens: the short convolution's v is zeroed at padding (per op only).
    in_bias_C: `in_linear`'s bias, where the projection comes without it: the short convolution adds
    it to its input and takes its gradient (`triton_short_conv`: no reduction pass over the
    projection's gradient of its own)."""
    gated_long_conv = kernels.fftconv.implementation(backend, packed=True)
    reference_conv = kernels.fftconv.implementation("reference", packed=True)
    if backend == "reference":
        impl = functools.partial(_per_op, gated_long_conv)
    elif backend == "triton":
        impl = functools.partial(_fused_or_per_op if fused else _triton_per_op, gated_long_conv)
    else:
        triton_path = _fused_or_per_op if fused else _triton_per_op
        impl = functools.partial(_auto, triton_path, gated_long_conv, reference_conv)
    return functools.partial(_checked, impl)


def sequence_mixer(
    projected_BLC: torch.Tensor,
    short_weight_C1K: torch.Tensor,
    short_bias_C: torch.Tensor,
    u_BLD: torch.Tensor,
    k1_DN: torch.Tensor,
    d1_D: torch.Tensor,
    k2_DN: torch.Tensor | None = None,
    d2_D: torch.Tensor | None = None,
    *,
    in_bias_C: torch.Tensor | None = None,
    backend: str = "reference",
    fused: bool = False,
) -> torch.Tensor:
    """`reference.sequence_mixer` by `backend` (see `implementation`)."""
    mixer = implementation(backend, fused)
    return mixer(projected_BLC, short_weight_C1K, short_bias_C, u_BLD, k1_DN, d1_D, k2_DN, d2_D, in_bias_C=in_bias_C)


__all__ = ["SequenceMixer", "causal_short_conv", "implementation", "reference", "sequence_mixer"]
