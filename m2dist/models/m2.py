"""One M2-BERT layer: the Monarch Mixer sequence mixer and the block-diagonal GLU MLP (M2_SPEC 1.1-1.3).

Module and parameter names follow the released upstream checkpoints (M2_UPSTREAM_KEYS.txt), so a
state dict of these modules IS the upstream layout.

Shape legend: B batch, L sequence length, D hidden size, I MLP inner size, O filter MLP order,
E positional feature size, N = 2L the long-conv FFT size.
"""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels.blockdiag
import kernels.fftconv
import kernels.mixer
from m2dist.config import ModelConfig


class Sin(nn.Module):
    """sin(freq * x) with a trainable frequency per channel; one instance is shared by every
    activation of both filter MLPs of a HyenaFilter."""

    def __init__(self, dim: int, freq: float):
        super().__init__()
        self.freq = nn.Parameter(torch.full((1, dim), float(freq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


def positional_features(emb_dim: int, l_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (1, l_max, E), t (1, l_max, 1)) as built for l_max: t = linspace(0, 1, l_max),
    z = [t, Re(exp(-i f w)), Im(exp(-i f w))] with w = 2 pi arange(l_max) / l_max."""
    bands = (emb_dim - 1) // 2
    t_1L1 = torch.linspace(0, 1, l_max)[None, :, None]
    w_1L1 = 2 * math.pi * torch.arange(l_max, dtype=torch.float32)[None, :, None] / l_max
    f_11F = torch.linspace(1e-4, bands - 1, bands)[None, None]
    z = torch.exp(-1j * f_11F * w_1L1)
    return torch.cat([t_1L1, z.real, z.imag], dim=-1), t_1L1


class PositionalFeatures(nn.Module):
    """z = [t, Re(exp(-i f w)), Im(exp(-i f w))] of shape (1, l_max, E); z is trained, t is a buffer.

    Built once for l_max; a shorter input uses the first L rows (t is not re-spaced).
    """

    def __init__(self, emb_dim: int, l_max: int):
        super().__init__()
        z_1LE, t_1L1 = positional_features(emb_dim, l_max)
        self.z = nn.Parameter(z_1LE)
        self.register_buffer("t", t_1L1)

    def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.z[:, :length], self.t[:, :length]


class ExponentialModulation(nn.Module):
    """The decay rates |delta_c| of the modulation k[t, c] *= exp(-t |delta_c|) (a buffer, applied by
    `stacked_long_filters`): fixed, from fast (30%) to slow (150%) to 1e-2."""

    def __init__(self, d_model: int, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5, target: float = 1e-2):
        super().__init__()
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, d_model)[None, None])


def _filter_mlp(emb_dim: int, order: int, d_model: int, act: Sin) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(emb_dim, order), act,
        nn.Linear(order, order), act,
        nn.Linear(order, order), act,
        nn.Linear(order, d_model, bias=False),
    )  # fmt: skip


class HyenaFilter(nn.Module):
    """Implicit long-conv filter: an MLP of positional features, exponentially modulated.

    `bias` is the skip weight D of the convolution (named as upstream).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.bias = nn.Parameter(torch.randn(d))
        self.pos_emb = PositionalFeatures(config.filter_emb_dim, config.l_max)
        act = Sin(config.filter_order, config.filter_sin_freq)
        self.implicit_filter = _filter_mlp(config.filter_emb_dim, config.filter_order, d, act)
        if config.bidirectional:
            self.implicit_filter_rev = _filter_mlp(config.filter_emb_dim, config.filter_order, d, act)
        self.modulation = ExponentialModulation(d)
        self.bidirectional = config.bidirectional

    def circular_filter(self, length: int) -> torch.Tensor:
        """The (D, 2L) circular filter for inputs of length L (see `long_filters`)."""
        return long_filters([self], length)[0]


def long_filters(filters: list[HyenaFilter], length: int) -> list[torch.Tensor]:
    """The (D, 2L) circular filters of `filters` (of one config) for inputs of length L, in fp32
    also under autocast: the filter MLPs are tiny ((L, E) -> (L, D)), and casting their weights to
    bf16 on every call cost more host time than their matmuls take on the GPU.

    All filters are computed together, their MLPs as batched matmuls; on a GPU in one
    `torch.compile`d function, so that a model's 24 filters cost a few fused kernels per step,
    not ~40 launches (or one compiled call) each."""
    first = filters[0]
    tensors = (
        [f.pos_emb.z for f in filters],
        first.pos_emb.t,
        [f.modulation.deltas for f in filters],
        [f.implicit_filter[1].freq for f in filters],
        [_linear_params(f.implicit_filter) for f in filters],
        [_linear_params(f.implicit_filter_rev) for f in filters] if first.bidirectional else None,
    )
    compute = _compiled_stacked_long_filters() if _compile_here(first.bias) else stacked_long_filters
    with torch.autocast(first.bias.device.type, enabled=False):
        return compute(*tensors, length)


def _linear_params(mlp: nn.Sequential) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [(layer.weight, layer.bias) for layer in mlp if isinstance(layer, nn.Linear)]


def stacked_long_filters(zs, t_1L1, deltas, freqs, fwd_mlps, rev_mlps, length: int) -> list[torch.Tensor]:
    """The functional form of F HyenaFilters' `_filter_mlp`s + `ExponentialModulation`, stacked.

    zs: F positional features (1, l_max, E); t_1L1: the positions (1, l_max, 1), as built for l_max;
    deltas: F decay rates (1, 1, D); freqs: F Sin frequencies (1, O), shared by a filter's MLPs;
    fwd_mlps, rev_mlps: F lists of (weight, bias) per Linear (rev_mlps None: causal filters).
    Each MLP is (Linear, Sin) for all but the last Linear; its (L, D) output times
    exp(-t |delta|) gives the taps. Returns F (D, 2L) circular filters from `bidirectional_filter`."""
    n_filters = len(zs)
    mlps = fwd_mlps + (rev_mlps or [])
    repeat = len(mlps) // n_filters
    # Features along dim 1, positions along dim 2: every weight is the left operand of its batched
    # matmul, so that its gradient comes out contiguous like the weight. (As the right operand,
    # transposed, it came out transposed, and autograd copied the weights' gradients into their
    # layout in every backward: 168 copies a step more, counted on the CPU for m2-bert-80M.)
    z_MEL = torch.cat(zs * repeat)[:, :length].transpose(1, 2)
    freq_MO1 = torch.stack(freqs * repeat).transpose(1, 2)
    h = z_MEL
    for i in range(len(mlps[0]) - 1):
        weight_MOI = torch.stack([mlp[i][0] for mlp in mlps])
        bias_MO1 = torch.stack([mlp[i][1] for mlp in mlps])[:, :, None]
        h = torch.sin(freq_MO1 * torch.baddbmm(bias_MO1, weight_MOI, h))
    weight_MDO = torch.stack([mlp[-1][0] for mlp in mlps])
    decay_MDL = torch.exp(-t_1L1[:, :length] * torch.cat(deltas * repeat).abs()).transpose(1, 2)
    k_MDL = torch.bmm(weight_MDO, h) * decay_MDL
    k_rev = k_MDL[n_filters:] if rev_mlps is not None else None
    return list(kernels.fftconv.bidirectional_filter(k_MDL[:n_filters], k_rev).unbind(0))


def _compile_here(t: torch.Tensor) -> bool:
    """Whether to run a part of the layer through its own torch.compile'd function: on a GPU,
    unless the whole model is being compiled (then the part is traced into the model's graph)."""
    return t.is_cuda and not torch.compiler.is_compiling()


@functools.cache
def _compiled_stacked_long_filters():
    return torch.compile(stacked_long_filters)


def zero_padding(x_BLC: torch.Tensor, mask_BL: torch.Tensor | None) -> torch.Tensor:
    """x_BLC times mask_BL (1 at tokens, 0 at padding): pad positions set to zero
    (`model.mask_padding`). No mask returns x itself."""
    if mask_BL is None:
        return x_BLC
    return x_BLC * mask_BL.to(x_BLC.dtype)[..., None]


class MixerInputLinear(nn.Linear):
    """The mixer's `in_linear`: an nn.Linear (same parameters and keys) that can leave its bias out,
    for the short convolution to add (`kernels.mixer.implementation`'s in_bias_C)."""

    def forward(self, x_BLD: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        return F.linear(x_BLD, self.weight, self.bias if add_bias else None)


class MixerOutputLinear(nn.Linear):
    """The mixer's `out_linear`: an nn.Linear (same parameters and keys) whose input gradient keeps
    the mixer output's channels-first layout (`kernels.mixer.channels_first_input_linear`)."""

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return kernels.mixer.channels_first_input_linear(x_BLD, self.weight, self.bias)


class MonarchMixerSequenceMixing(nn.Module):
    """The sequence mixer that replaces attention. (B, L, D) -> (B, L, D); no residual, no norm around it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.d_model = d
        self.l_max = config.l_max
        self.sequence_mixer = kernels.mixer.implementation(config.kernels.fftconv, fused=config.kernels.fused_mixer)
        self.filter_fn = HyenaFilter(config)
        self.filter_fn2 = HyenaFilter(config) if config.residual_long_conv else None
        self.in_linear = MixerInputLinear(d, 3 * d)
        self.out_linear = MixerOutputLinear(d, d)
        # Upstream's `hyena_training_additions`: default nn.LayerNorm eps (1e-5), not layer_norm_eps.
        self.layernorm = nn.LayerNorm(d) if config.pre_layernorm else None
        # Its parameters (named as upstream's); applied by `kernels.mixer.causal_short_conv`.
        self.short_filter = nn.Conv1d(3 * d, 3 * d, kernel_size=3, groups=3 * d, padding=2)

    def filters(self) -> list[HyenaFilter]:
        """The long convolutions' filters: the gated one, then the residual one if any."""
        return [self.filter_fn] + ([self.filter_fn2] if self.filter_fn2 is not None else [])

    def forward(
        self, u_BLD: torch.Tensor, filters_DN: list[torch.Tensor] | None = None, mask_BL: torch.Tensor | None = None
    ) -> torch.Tensor:
        """filters_DN: the `filters()`' circular filters for this L, when the caller computed them (with the
        other layers'); None computes them here. mask_BL (B, L): 1 at tokens, 0 at padding; given,
        pad positions are zeroed in the mixer input, after `in_linear` and in the gated long
        convolution's input, so that no convolution mixes them into real positions."""
        length = u_BLD.shape[1]
        if filters_DN is None:
            filters_DN = long_filters(self.filters(), length)
        if self.layernorm is not None:
            u_BLD = self.layernorm(u_BLD)
        u_BLD = zero_padding(u_BLD, mask_BL)
        # Without a padding mask `in_linear`'s bias goes to the mixer, whose short convolution adds it
        # to its input and takes its gradient with the filter's (no reduction over the projection's
        # gradient of its own); with one, the padding must read zero, bias included. The bias is read
        # after in_linear's forward: ZeRO-3 partitions a module's parameters again when its forward
        # ends, and a parameter read afterwards is gathered for this module (as the short filter's).
        projected_BLC = zero_padding(self.in_linear(u_BLD, add_bias=mask_BL is not None), mask_BL)
        in_bias_C = self.in_linear.bias if mask_BL is None else None
        k2_DN = d2_D = None
        if self.filter_fn2 is not None:
            k2_DN, d2_D = filters_DN[1], self.filter_fn2.bias
        y_BLD = self.sequence_mixer(
            projected_BLC, self.short_filter.weight, self.short_filter.bias, u_BLD,
            filters_DN[0], self.filter_fn.bias, k2_DN, d2_D, mask_BL, in_bias_C=in_bias_C,
        )  # fmt: skip
        return self.out_linear(y_BLD)


class BlockdiagLinear(nn.Module):
    """Linear layer with a block-diagonal weight (nblocks, out/nblocks, in/nblocks), no permutation."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool = True, backend: str = "reference"):
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            raise ValueError(f"in_features={in_features} and out_features={out_features} must divide by nblocks={nblocks}")
        self.in_features, self.out_features = in_features, out_features
        self.matmul = kernels.blockdiag.matmul_implementation(backend)
        # Registered before the weight, as upstream, so state dicts list keys in the same order.
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.weight = nn.Parameter(torch.empty(nblocks, out_features // nblocks, in_features // nblocks))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Dense kaiming-uniform(a=sqrt(5)) init scaled by sqrt(nblocks), keeping the diagonal blocks."""
        nblocks, q, p = self.weight.shape
        dense = torch.empty(self.out_features, self.in_features, device=self.weight.device)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        dense *= math.sqrt(nblocks)
        for i in range(nblocks):
            self.weight[i].copy_(dense[i * q : (i + 1) * q, i * p : (i + 1) * p])
        if self.bias is not None:
            # Upstream takes the bias's fan-in from the bias's own length: U(+-1/sqrt(out_features)).
            bound = 1 / math.sqrt(self.out_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T + bias, plus `residual` (shaped as the output) if given: the Triton backend adds
        the bias and the residual in one pass where its GEMMs have no bias epilogue."""
        return self.matmul(x, self.weight, self.bias, residual)


class GatedBlockdiagMLP(nn.Module):
    """`LayerNorm(BlockDiag_I->d(dropout(GELU(g) * n)) + x)` with [g, n] = BlockDiag_d->2I(x) (post-LN GLU)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, inner, nblocks = config.hidden_size, config.intermediate_size, config.mlp_nblocks
        backend = config.kernels.blockdiag
        self.gated_layers = BlockdiagLinear(d, 2 * inner, nblocks, bias=False, backend=backend)
        # The hidden dropout runs inside the GLU op (in the Triton kernels' epilogues).
        self.dropout_p = config.hidden_dropout
        self.wo = BlockdiagLinear(inner, d, nblocks, backend=backend)
        self.layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.glu = kernels.blockdiag.glu_implementation(backend)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        a_BLI = self.glu(x_BLD, self.gated_layers.weight, self.dropout_p if self.training else 0.0)
        return self.layernorm(self.wo(a_BLI, residual=x_BLD))


class M2Layer(nn.Module):
    """`h_out = MLP(SeqMixer(h))`; the mixer ignores the attention mask, as upstream, unless
    `model.mask_padding` is on."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = MonarchMixerSequenceMixing(config)
        self.mlp = GatedBlockdiagMLP(config)
        self.mask_padding = config.mask_padding

    def forward(
        self, h_BLD: torch.Tensor, attention_mask_BL: torch.Tensor | None = None, filters_DN: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """filters_DN: the mixer's circular filters, if the caller computed them (`layer_long_filters`)."""
        mask_BL = attention_mask_BL if self.mask_padding else None
        return self.mlp(self.attention(h_BLD, filters_DN, mask_BL))


def layer_long_filters(layers: list[M2Layer], length: int) -> list[list[torch.Tensor]]:
    """Every layer's circular filters for inputs of length L, computed together (`long_filters`)."""
    per_layer = [layer.attention.filters() for layer in layers]
    flat = long_filters([f for filters in per_layer for f in filters], length)
    out, start = [], 0
    for filters in per_layer:
        out.append(flat[start : start + len(filters)])
        start += len(filters)
    return out


def m2_special_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(forward filter MLP params incl. the shared Sin frequency, positional features z) of every
    HyenaFilter under `module`: the two groups with their own lr/weight decay (M2_SPEC 3)."""
    filter_params: dict[int, nn.Parameter] = {}
    pos_params: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        if isinstance(sub, HyenaFilter):
            for p in sub.implicit_filter.parameters():
                filter_params[id(p)] = p
            pos_params[id(sub.pos_emb.z)] = sub.pos_emb.z
    return list(filter_params.values()), list(pos_params.values())


def init_weights(module: nn.Module, initializer_range: float) -> None:
    """Upstream init: nn.Linear and embeddings N(0, std), zero bias, padding row zero; LayerNorm (1, 0).
    BlockdiagLinear, convs, D, freq and z keep their own init."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=initializer_range)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=initializer_range)
            if sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


