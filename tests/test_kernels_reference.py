"""The plain-PyTorch references of the heavy ops against their definitions, in float64."""

import dataclasses

import pytest
import torch

from kernels.blockdiag import blockdiag_glu, blockdiag_matmul
from kernels.blockdiag.reference import dense_blockdiag
from kernels.fftconv import bidirectional_filter, gated_long_conv
from kernels.fftconv.reference import direct_bidirectional_conv, fftconv
from m2dist.config import load_config
from m2dist.models import MaskedLM
from m2dist.models.m2 import MonarchMixerSequenceMixing

f64 = torch.float64


@pytest.mark.parametrize("length", [1, 7, 128, 500])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_fftconv_equals_direct_convolution(length, bidirectional):
    generator = torch.Generator().manual_seed(length)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=f64, requires_grad=True)

    x, k_fwd, d = rand(3, 4, length), rand(4, length), rand(4)
    k_rev = rand(4, length) if bidirectional else None
    y_fft = fftconv(x, bidirectional_filter(k_fwd, k_rev), d)
    y_direct = direct_bidirectional_conv(x, k_fwd, k_rev, d)
    torch.testing.assert_close(y_fft, y_direct, rtol=1e-10, atol=1e-10)
    upstream_grad = torch.randn(y_fft.shape, generator=generator, dtype=f64)
    inputs = [x, k_fwd, d] + ([k_rev] if bidirectional else [])
    grads_fft = torch.autograd.grad(y_fft, inputs, upstream_grad)
    grads_direct = torch.autograd.grad(y_direct, inputs, upstream_grad)
    for g_fft, g_direct in zip(grads_fft, grads_direct):
        torch.testing.assert_close(g_fft, g_direct, rtol=1e-10, atol=1e-10)


def test_bidirectional_filter_taps():
    # y[t] = sum_{s<=t} k_fwd[t-s] x[s] + sum_{j>=1} k_rev[j-1] x[t+j]: impulse responses.
    length = 6
    k_fwd = torch.arange(1.0, length + 1, dtype=f64)[None]
    k_rev = -torch.arange(1.0, length + 1, dtype=f64)[None]
    x = torch.zeros(1, 1, length, dtype=f64)
    x[..., 2] = 1.0
    y = fftconv(x, bidirectional_filter(k_fwd, k_rev), torch.zeros(1, dtype=f64))
    torch.testing.assert_close(y[0, 0], torch.tensor([-2.0, -1.0, 1.0, 2.0, 3.0, 4.0], dtype=f64))


def test_gated_long_conv_composition():
    generator = torch.Generator().manual_seed(1)
    u, x1, x2, v = (torch.randn(2, 3, 9, generator=generator, dtype=f64) for _ in range(4))
    k1, k2 = (torch.randn(3, 18, generator=generator, dtype=f64) for _ in range(2))
    d1, d2 = (torch.randn(3, generator=generator, dtype=f64) for _ in range(2))
    y = gated_long_conv(u, x1, x2, v, k1, d1, k2, d2)
    torch.testing.assert_close(y, fftconv(v * x1, k1, d1) * x2 + fftconv(u, k2, d2))
    torch.testing.assert_close(gated_long_conv(u, x1, x2, v, k1, d1), fftconv(v * x1, k1, d1) * x2)
    with pytest.raises(ValueError, match="unknown fftconv backend 'cuda'"):
        gated_long_conv(u, x1, x2, v, k1, d1, backend="cuda")


def test_fftconv_keeps_input_dtype_and_computes_in_fp32():
    x = torch.randn(2, 4, 16).to(torch.bfloat16)
    k, d = torch.randn(4, 32), torch.randn(4)
    y = fftconv(x, k, d)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), fftconv(x.float(), k, d), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("nblocks", [1, 4])
def test_blockdiag_equals_dense_blockdiag_matrix(nblocks):
    generator = torch.Generator().manual_seed(nblocks)
    weight = torch.randn(nblocks, 12, 8, generator=generator, dtype=f64, requires_grad=True)
    bias = torch.randn(nblocks * 12, generator=generator, dtype=f64, requires_grad=True)
    x = torch.randn(3, 5, nblocks * 8, generator=generator, dtype=f64, requires_grad=True)
    y = blockdiag_matmul(x, weight, bias)
    y_dense = x @ dense_blockdiag(weight).T + bias
    torch.testing.assert_close(y, y_dense)
    g = torch.randn(y.shape, generator=generator, dtype=f64)
    for a, b in zip(torch.autograd.grad(y, [x, weight, bias], g), torch.autograd.grad(y_dense, [x, weight, bias], g)):
        torch.testing.assert_close(a, b)
    glu = blockdiag_glu(x, weight)
    gate, value = (x @ dense_blockdiag(weight).T).chunk(2, dim=-1)
    torch.testing.assert_close(glu, torch.nn.functional.gelu(gate) * value)


def test_blockdiag_shape_error():
    with pytest.raises(ValueError, match="input has 10 features, the weight expects 4 x 8"):
        blockdiag_matmul(torch.randn(2, 10), torch.randn(4, 3, 8))


def _tiny_model_config(**changes):
    base = load_config("debug").model
    return dataclasses.replace(
        base, vocab_size=256, hidden_size=8, intermediate_size=16, num_layers=2, l_max=12, filter_order=8, **changes
    )


@pytest.mark.parametrize("pre_layernorm", [False, True])
def test_mixer_gradcheck_float64(pre_layernorm):
    torch.manual_seed(0)
    mixer = MonarchMixerSequenceMixing(_tiny_model_config(pre_layernorm=pre_layernorm)).double()
    u = torch.randn(2, 5, 8, dtype=f64, requires_grad=True)
    params = [p for p in mixer.parameters()]
    assert torch.autograd.gradcheck(lambda x, *_: mixer(x), (u, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_mixer_is_bidirectional_and_short_conv_is_causal():
    torch.manual_seed(0)
    mixer = MonarchMixerSequenceMixing(_tiny_model_config()).double()
    u = torch.randn(1, 12, 8, dtype=f64)
    t = 6
    changed = u.clone()
    changed[0, t] += 1.0
    delta = (mixer(changed) - mixer(u)).abs().sum(-1)[0]
    assert (delta[:t] > 1e-8).all() and (delta[t + 1 :] > 1e-8).all()

    short = mixer.short_filter.double()
    x = torch.randn(1, 24, 12, dtype=f64)
    x_changed = x.clone()
    x_changed[..., t] += 1.0
    short_delta = (short(x_changed)[..., :12] - short(x)[..., :12]).abs().sum(1)[0]
    # Causal: position t affects outputs t, t+1, t+2 only.
    assert (short_delta[:t] == 0).all() and (short_delta[t : t + 3] > 0).all() and (short_delta[t + 3 :] == 0).all()


def test_whole_model_is_bidirectional():
    torch.manual_seed(0)
    model = MaskedLM(_tiny_model_config()).double().eval()
    ids = torch.randint(110, 256, (1, 12))
    changed = ids.clone()
    changed[0, 5] = 105
    delta = (model(changed).logits - model(ids).logits).abs().sum(-1)[0]
    assert (delta[:5] > 0).all() and (delta[6:] > 0).all()


def test_auto_backends_run_the_reference_off_the_gpu():
    # "auto" (the config default) picks the Triton kernels only for tensors on an Ampere or newer
    # GPU; on the CPU it must be the reference, bit for bit.
    gen = torch.Generator().manual_seed(0)
    u, x1, x2, v = (torch.randn(2, 8, 16, generator=gen) for _ in range(4))
    k_DN, d_D = torch.randn(8, 32, generator=gen), torch.randn(8, generator=gen)
    assert torch.equal(
        gated_long_conv(u, x1, x2, v, k_DN, d_D, k_DN, d_D, backend="auto"),
        gated_long_conv(u, x1, x2, v, k_DN, d_D, k_DN, d_D, backend="reference"),
    )
    x, w = torch.randn(3, 8, generator=gen), torch.randn(2, 8, 4, generator=gen)
    assert torch.equal(blockdiag_glu(x, w, backend="auto"), blockdiag_glu(x, w, backend="reference"))
    assert torch.equal(blockdiag_matmul(x, w[:, :4], backend="auto"), blockdiag_matmul(x, w[:, :4], backend="reference"))


def test_auto_takes_torch_fft_beyond_the_triton_length(monkeypatch):
    # On a GPU, "auto" takes the Triton kernels up to AUTO_TRITON_MAX_LEN and torch.fft (the
    # reference) beyond it, through both entries (the packed one is the sequence mixer's); "triton"
    # keeps the kernels at every length. A stand-in GPU check and recording stand-ins for the paths.
    import kernels.fftconv as fftconv

    taken = []

    def recording(name, fn):
        return lambda *args: taken.append(name) or fn(*args)

    monkeypatch.setattr(fftconv, "use_triton", lambda t: True)
    monkeypatch.setattr(fftconv, "AUTO_TRITON_MAX_LEN", 16)
    triton_path = recording("triton", fftconv.reference.gated_long_conv)
    monkeypatch.setattr(fftconv, "_triton_gated_long_conv", triton_path)
    monkeypatch.setitem(fftconv._BACKENDS, "triton", triton_path)
    monkeypatch.setattr(fftconv.reference, "gated_long_conv", recording("reference", fftconv.reference.gated_long_conv))
    gen = torch.Generator().manual_seed(0)
    for length in (16, 17):
        u, x1, x2, v = (torch.randn(2, 8, length, generator=gen) for _ in range(4))
        k_DN, d_D = torch.randn(8, 2 * length, generator=gen), torch.randn(8, generator=gen)
        fftconv.gated_long_conv(u, x1, x2, v, k_DN, d_D, k_DN, d_D, backend="auto")
        fftconv.implementation("auto", packed=True)(u, torch.cat([x1, x2, v], dim=1), k_DN, d_D, k_DN, d_D)
        fftconv.gated_long_conv(u, x1, x2, v, k_DN, d_D, k_DN, d_D, backend="triton")
    assert taken == ["triton"] * 3 + ["reference", "reference", "triton"]


def test_auto_takes_the_cufft_path_beyond_the_triton_length(monkeypatch):
    # From CUFFT_MIN_LEN on, "auto" on a GPU takes the cuFFT path at every length, also beyond
    # AUTO_TRITON_MAX_LEN (where it measured faster than torch.fft), through both entries.
    from kernels import fftconv
    from kernels.fftconv import triton_cufft

    taken = []
    monkeypatch.setattr(fftconv, "use_triton", lambda t: True)
    monkeypatch.setattr(fftconv, "can_run", lambda t: True)
    monkeypatch.setattr(fftconv, "AUTO_TRITON_MAX_LEN", 16)
    monkeypatch.setattr(fftconv, "CUFFT_MIN_LEN", 17)
    unpacked, packed = fftconv.reference.gated_long_conv, fftconv._unpacked
    monkeypatch.setattr(triton_cufft, "gated_long_conv", lambda *a: taken.append("cufft") or unpacked(*a))
    monkeypatch.setattr(
        triton_cufft, "packed_gated_long_conv", lambda *a: taken.append("cufft packed") or packed(unpacked, *a)
    )
    gen = torch.Generator().manual_seed(0)
    u, x1, x2, v = (torch.randn(2, 8, 17, generator=gen) for _ in range(4))
    k_DN, d_D = torch.randn(8, 34, generator=gen), torch.randn(8, generator=gen)
    fftconv.gated_long_conv(u, x1, x2, v, k_DN, d_D, k_DN, d_D, backend="auto")
    fftconv.implementation("auto", packed=True)(u, torch.cat([x1, x2, v], dim=1), k_DN, d_D, k_DN, d_D)
    assert taken == ["cufft", "cufft packed"]


def test_device_constants_refuses_a_new_table_during_a_graph_capture(monkeypatch):
    # A table first asked for while a CUDA graph is captured would be allocated inside the graph:
    # the error says so before anything reaches the device. Off a GPU the tables are moved as given.
    from kernels import triton_common

    tables = {"twiddles": torch.arange(4.0)}
    assert torch.equal(triton_common.device_constants(tables, torch.device("cpu"))["twiddles"], tables["twiddles"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"):
        triton_common.device_constants(tables, torch.device("cuda"))
