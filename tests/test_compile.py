"""The Triton operators as torch.library custom ops, and torch.compile of whole models over them.

`torch.library.opcheck` checks each op's schema, fake (meta) implementation, autograd registration
and its run under AOTAutograd with dynamic shapes; the compiled models must give the eager models'
loss and gradients. Without a GPU the kernels run in Triton's interpreter on tiny shapes.
"""

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.blockdiag import triton_blockdiag  # noqa: E402
from kernels.fftconv import triton_cufft, triton_fftconv, triton_toeplitz  # noqa: E402
from kernels.mixer import triton_mixer, triton_short_conv  # noqa: E402
from m2dist.config import KernelConfig, load_config  # noqa: E402
from m2dist.models import MaskedLM  # noqa: E402
from m2dist.models.m2 import M2Layer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Everything but the slow "test_aot_dispatch_dynamic" for the backward ops, whose outputs feed no
# further autograd (opcheck's full set runs on the forward ops).
OPCHECK_ALL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _rand(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("residual", [True, False])
def test_opcheck_fftconv(residual):
    batch, dim, length = 2, 16, 40
    plan = list(triton_fftconv.fft_plan(length, triton_fftconv.MAX_ONCHIP, triton_fftconv.TILE))
    u, x1, x2, v = (_rand(batch, dim, length, requires_grad=True) for _ in range(4))
    k = _rand(dim, 2 * length) * 0.1
    k1r, k1i = (t.requires_grad_() for t in triton_fftconv.filter_spectrum(k, length, plan))
    k2r, k2i = (t.requires_grad_() for t in triton_fftconv.filter_spectrum(k.flip(-1), length, plan))
    d1, d2 = _rand(dim, requires_grad=True), _rand(dim, requires_grad=True)
    if not residual:
        u = k2r = k2i = d2 = None
    # u as the model passes it: a (B, D, L) view of a (B, L, D) tensor.
    if u is not None:
        u = u.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    args = (u, x1, x2, v, k1r, k1i, d1, k2r, k2i, d2, plan)
    torch.library.opcheck(triton_fftconv.fftconv, args, test_utils=OPCHECK_ALL)
    dy = _rand(batch, dim, length)
    bwd_args = (dy, *[t.detach() if isinstance(t, torch.Tensor) else t for t in args])
    torch.library.opcheck(triton_fftconv.fftconv_backward, bwd_args, test_utils=OPCHECK_ALL[:3])


@pytest.mark.parametrize("residual,operands", [(True, "fp16"), (False, "fp16"), (True, "split")])
def test_opcheck_toeplitz(residual, operands):
    batch, dim, length = 3, 4, 40  # two 32-position tiles in the interpreter
    u = _rand(batch, dim, length, requires_grad=True) if residual else None
    # x = [x1; x2; v] packed along the channels, as the short convolution writes it
    x = _rand(batch, 3 * dim, length, dtype=torch.bfloat16, requires_grad=True)
    k1, d1 = (_rand(dim, 2 * length) * 0.1).requires_grad_(), _rand(dim, requires_grad=True)
    k2, d2 = ((_rand(dim, 2 * length) * 0.1).requires_grad_(), _rand(dim, requires_grad=True)) if residual else (None, None)
    args = (u, x, k1, d1, k2, d2, operands, True)
    torch.library.opcheck(triton_toeplitz.toeplitz_conv, args, test_utils=OPCHECK_ALL)
    y, z1, rows, scales = triton_toeplitz.toeplitz_conv(*args)
    u_, x_, k1_, d1_, k2_, d2_ = (t.detach() if isinstance(t, torch.Tensor) else t for t in args[:6])
    bwd_args = (torch.randn_like(y), u_, x_, z1.detach(), rows.detach(), scales.detach(), k1_, d1_, k2_, d2_)
    torch.library.opcheck(triton_toeplitz.toeplitz_conv_backward, bwd_args, test_utils=OPCHECK_ALL[:3])


@pytest.mark.parametrize("residual", [True, False])
def test_opcheck_cufft(residual):
    # The forward keeps z1 and its spectra for the backward (empty tensors when nothing needs it).
    batch, dim, length = 2, 4, 40
    u = _rand(batch, dim, length, requires_grad=True) if residual else None
    x = _rand(batch, 3 * dim, length, dtype=torch.bfloat16, requires_grad=True)
    k1, d1 = (_rand(dim, 2 * length) * 0.1).requires_grad_(), _rand(dim, requires_grad=True)
    k2, d2 = ((_rand(dim, 2 * length) * 0.1).requires_grad_(), _rand(dim, requires_grad=True)) if residual else (None, None)
    args = (u, x, k1, d1, k2, d2)
    torch.library.opcheck(triton_cufft.cufft_conv, (*args, True), test_utils=OPCHECK_ALL)
    u_, x_, k1_, d1_, k2_, d2_ = (t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    # without a backward to feed (as `packed_gated_long_conv` calls it where nothing needs a gradient)
    torch.library.opcheck(triton_cufft.cufft_conv, (u_, x_, k1_, d1_, k2_, d2_, False), test_utils=OPCHECK_ALL)
    y, *kept = triton_cufft.cufft_conv(*args, True)
    bwd_args = (torch.randn_like(y), u_, x_, *(t.detach() for t in kept), k1_, d1_, k2_, d2_)
    torch.library.opcheck(triton_cufft.cufft_conv_backward, bwd_args, test_utils=OPCHECK_ALL[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_short_conv(dtype):
    p = _rand(2, 37, 40, dtype=dtype, requires_grad=True)  # partial tiles of positions and channels
    weight, bias = _rand(40, 1, 3, requires_grad=True), _rand(40, requires_grad=True)
    u = _rand(2, 37, 13, requires_grad=True)  # the mixer input, laid out by the same kernels
    in_bias = _rand(40, requires_grad=True)  # in_linear's bias, added to p by the same kernels
    for u_or_none, in_bias_or_none in ((None, None), (u, None), (u, in_bias), (None, in_bias)):
        args = (p, weight, bias, u_or_none, in_bias_or_none)
        torch.library.opcheck(triton_short_conv.short_conv, args, test_utils=OPCHECK_ALL)
        out, ut = triton_short_conv.short_conv(*args)
        gu = None if u_or_none is None else torch.randn_like(ut)
        in_bias_ = None if in_bias_or_none is None else in_bias_or_none.detach()
        bwd_args = (torch.randn_like(out), gu, p.detach(), weight.detach(), in_bias_)
        torch.library.opcheck(triton_short_conv.short_conv_backward, bwd_args, test_utils=OPCHECK_ALL[:3])


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_blockdiag_matmul(bias):
    nblocks, p, q, rows = 2, 16, 24, 40
    x = _rand(rows, nblocks * p, requires_grad=True)
    w = _rand(nblocks, q, p, requires_grad=True)
    b = _rand(nblocks * q, requires_grad=True) if bias else None
    torch.library.opcheck(triton_blockdiag.blockdiag_matmul_op, (x, w, b), test_utils=OPCHECK_ALL)
    for need_dx in (True, False):
        args = (_rand(rows, nblocks * q), x.detach(), w.detach(), need_dx)
        torch.library.opcheck(triton_blockdiag.blockdiag_matmul_backward, args, test_utils=OPCHECK_ALL[:3])


def test_opcheck_blockdiag_glu():
    nblocks, p, q, rows = 4, 16, 32, 40
    x, w = _rand(rows, nblocks * p, requires_grad=True), _rand(nblocks, q, p, requires_grad=True)
    seed = torch.tensor([1234], device=x.device)
    for seed_p in ((None, 0.0), (seed, 0.25)):
        torch.library.opcheck(triton_blockdiag.blockdiag_glu_op, (x, w, *seed_p), test_utils=OPCHECK_ALL)
        args = (_rand(rows, nblocks * q // 2), x.detach(), w.detach(), *seed_p)
        torch.library.opcheck(triton_blockdiag.blockdiag_glu_backward, args, test_utils=OPCHECK_ALL[:3])
        # the GLU on the plain GEMMs that keeps its pre-activation for the backward
        torch.library.opcheck(triton_blockdiag.blockdiag_glu_kept_op, (x, w, *seed_p), test_utils=OPCHECK_ALL)
        pre = triton_blockdiag.blockdiag_glu_kept_op(x.detach(), w.detach(), *seed_p)[1]
        torch.library.opcheck(triton_blockdiag.blockdiag_glu_backward, (*args, pre), test_utils=OPCHECK_ALL[:3])


@pytest.mark.parametrize("residual", [True, False])
def test_opcheck_sequence_mixer(residual):
    batch, length, dim = 3, 16, 16
    p = _rand(batch, length, 3 * dim, dtype=torch.bfloat16, requires_grad=True)
    w, b = (_rand(3 * dim, 3) * 0.5).requires_grad_(), _rand(3 * dim, requires_grad=True)
    u = _rand(batch, length, dim, requires_grad=True)
    k1 = triton_mixer.packed_spectrum(_rand(dim, 2 * length) * 0.1).requires_grad_()
    d1 = _rand(dim, requires_grad=True)
    k2 = triton_mixer.packed_spectrum(_rand(dim, 2 * length) * 0.1).requires_grad_() if residual else None
    d2 = _rand(dim, requires_grad=True) if residual else None
    args = (p, w, b, u, k1, d1, k2, d2, True)
    torch.library.opcheck(triton_mixer.sequence_mixer_op, args, test_utils=OPCHECK_ALL)
    _, z1 = triton_mixer.sequence_mixer_op(*args)
    p_, w_, b_, u_, k1_, d1_, k2_, d2_ = [t.detach() if t is not None else None for t in args[:8]]
    bwd_args = (_rand(batch, length, dim, dtype=torch.bfloat16), p_, w_, b_, u_, z1.detach(), k1_, d1_, k2_, d2_)
    torch.library.opcheck(triton_mixer.sequence_mixer_backward, bwd_args, test_utils=OPCHECK_ALL[:3])


BACKENDS = {
    "reference": KernelConfig("reference", "reference"),
    "triton": KernelConfig("triton", "triton"),
    "fused": KernelConfig("triton", "triton", fused_mixer=True),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_m2_layer_compiles_without_graph_breaks(backend):
    # fullgraph=True raises on any graph break inside the layer.
    cfg = dataclasses.replace(
        load_config("debug").model, hidden_size=32, intermediate_size=64, num_layers=1, l_max=40,
        filter_order=16, hidden_dropout=0.0, kernels=BACKENDS[backend],
    )  # fmt: skip
    layer = M2Layer(cfg).to(DEVICE)
    h = _rand(2, 40, 32, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h), layer(h), rtol=1e-5, atol=1e-5)


def test_compiled_m2_layer_has_the_short_convolution_lay_out_the_mixer_input():
    # The short convolution's kernels lay the mixer input u out for the long convolution inside a
    # whole-model graph as they do eagerly: left to Inductor as a transposed view, u was written by
    # a strided fp32 store in the layer norm's kernel before the op.
    cfg = dataclasses.replace(
        load_config("debug").model, hidden_size=32, intermediate_size=64, num_layers=1, l_max=40,
        filter_order=16, hidden_dropout=0.0, kernels=BACKENDS["triton"],
    )  # fmt: skip
    layer = M2Layer(cfg).to(DEVICE)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(layer, fullgraph=True, backend=record)(_rand(2, 40, 32))
    calls = [n for g in graphs for n in g.graph.nodes if n.target is torch.ops.m2dist.short_conv.default]
    # u goes to the op; so does in_linear's bias (its gradient comes back with the filter's)
    assert len(calls) == 1 and calls[0].args[3] is not None and calls[0].args[4] is not None


def test_m2_layer_with_the_fused_mixer_compiles_without_graph_breaks():
    # In bf16 the mixer takes the fused operator, which the compiled graph calls as one op.
    cfg = dataclasses.replace(
        load_config("debug").model, hidden_size=32, intermediate_size=64, num_layers=1, l_max=32,
        filter_order=16, hidden_dropout=0.0, kernels=BACKENDS["fused"],
    )  # fmt: skip
    layer = M2Layer(cfg).to(DEVICE, torch.bfloat16)
    h = _rand(2, 32, 32, dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(h)
    torch.testing.assert_close(out, layer(h), rtol=0, atol=0)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in layer.parameters() if p.requires_grad)


def _loss_and_grads(run, model, batch):
    model.zero_grad(set_to_none=True)
    loss = run(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize(
    "architecture,backend", [("m2", "reference"), ("m2", "triton"), ("bert", "reference")]
)
def test_compiled_model_gives_the_eager_loss_and_gradients(architecture, backend):
    # Inductor on the whole MLM model (the CPU's C++ backend here; Triton on a GPU), forward and
    # backward, dropout off so both runs compute the same function.
    cfg = dataclasses.replace(
        load_config("debug").model, architecture=architecture, hidden_size=32, intermediate_size=64,
        num_layers=1, l_max=32, filter_order=16, num_attention_heads=2, hidden_dropout=0.0, attention_dropout=0.0,
        kernels=BACKENDS[backend],
    )  # fmt: skip
    torch.manual_seed(0)
    model = MaskedLM(cfg).to(DEVICE)
    input_ids = torch.randint(200, cfg.vocab_size, (2, 32), device=DEVICE)
    labels = torch.full_like(input_ids, -100)
    labels[:, 1::3] = input_ids[:, 1::3]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    eager_loss, eager_grads = _loss_and_grads(model, model, batch)
    compiled_loss, compiled_grads = _loss_and_grads(torch.compile(model), model, batch)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def _grad_errors(model, run, batch, exact):
    loss, grads = _loss_and_grads(run, model, batch)
    errors = {"loss": (loss.double() - exact[0].double()).abs().item()}
    for name, g in exact[1].items():
        errors[name] = (grads[name].double() - g.double()).abs().max().item()
    return errors


@pytest.mark.gpu
@pytest.mark.parametrize(
    "length,batch_size,kernels", [(128, 16, "triton"), (128, 16, "fused"), (512, 4, "triton"), (8192, 1, "triton")]
)
def test_compiled_model_on_gpu_matches_eager(length, batch_size, kernels):
    # m2-bert-80M's widths with two layers, bf16 autocast as in training. Against the fp32 model on
    # the reference path, the compiled Triton model's error on the loss and every gradient is at most
    # twice the eager Triton model's, plus two bf16 ulps of the tensor's scale.
    cfg = dataclasses.replace(
        load_config("m2-bert-80M").model, num_layers=2, l_max=length, hidden_dropout=0.0, kernels=BACKENDS[kernels]
    )
    torch.manual_seed(0)
    model = MaskedLM(cfg).cuda()
    reference = MaskedLM(dataclasses.replace(cfg, kernels=BACKENDS["reference"])).cuda()
    reference.load_state_dict(model.state_dict())
    input_ids = torch.randint(200, cfg.vocab_size, (batch_size, length), device="cuda")
    labels = torch.full_like(input_ids, -100)
    labels[:, 1::3] = input_ids[:, 1::3]
    batch = {"input_ids": input_ids, "labels": labels}
    exact = _loss_and_grads(reference, reference, batch)
    compiled = torch.compile(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager_err = _grad_errors(model, model, batch, exact)
        # The second compiled step reuses the graph and its saved tensors' layout.
        compiled_errs = [_grad_errors(model, compiled, batch, exact) for _ in range(2)]
    for compiled_err in compiled_errs:
        for name, err in compiled_err.items():
            scale = exact[0].abs().item() if name == "loss" else exact[1][name].abs().max().item()
            assert err <= 2 * eager_err[name] + 2**-7 * scale, f"{name}: compiled {err:.3e}, eager {eager_err[name]:.3e}"


def test_compile_caches_are_keyed_on_the_kernels_source(tmp_path):
    # torch.compile's caches key a graph on the custom ops' names and arguments, not on what the
    # ops return or save for their backward: importing `kernels` adds a digest of its source to
    # their key (once), so that another version of the ops never replays this version's graphs.
    import shutil
    import subprocess
    import sys

    import kernels

    tag = torch.compiler.config.cache_key_tag
    assert f"m2dist-kernels-{kernels.source_fingerprint()}" in tag.split("+")
    kernels._tag_compile_caches()
    assert torch.compiler.config.cache_key_tag == tag
    # A copy of the package with one op's source changed has another digest.
    copy = tmp_path / "kernels"
    shutil.copytree(kernels.__path__[0], copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "fftconv" / "triton_cufft.py", "a") as source:
        source.write("\n# another version\n")
    script = "import kernels, torch; print(kernels.source_fingerprint(), torch.compiler.config.cache_key_tag)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TORCH_COMPILE_CACHE_KEY_TAG": "user"}
    fingerprint, copied_tag = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert fingerprint != kernels.source_fingerprint() and copied_tag == f"user+m2dist-kernels-{fingerprint}"
