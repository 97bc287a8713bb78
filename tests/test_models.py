import dataclasses
import unittest.mock

import pytest
import torch

from m2dist.config import CONFIG_DIR, ModelConfig, load_config
from m2dist.models import MaskedLM, SequenceClassifier, count_parameters
from kernels.mixer import causal_short_conv
from m2dist.models.model import LayerStack
from m2dist.optim import build_param_groups

# Upstream's counts for the MLM model (vocab 30528, l_max 128, decoder tied).
UPSTREAM_PARAMETER_COUNTS = {
    "m2-bert-80M": 80_285_760,
    "m2-bert-80M-noln": 80_267_328,
    "m2-bert-110M": 115_583_616,
}


@pytest.mark.parametrize("name, expected", UPSTREAM_PARAMETER_COUNTS.items())
def test_parameter_counts_equal_upstream(name, expected):
    assert count_parameters(MaskedLM(load_config(name).model)) == expected


def _tiny_batch(config: ModelConfig, batch: int, length: int):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(200, config.vocab_size, (batch, length), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[:, 1::3] = input_ids[:, 1::3]
    return input_ids, labels


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_config_builds_and_trains_one_step(name):
    config = load_config(name).model
    torch.manual_seed(0)
    model = MaskedLM(config)
    input_ids, labels = _tiny_batch(config, batch=2, length=min(config.l_max, 32))
    out = model(input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
    assert out.logits.shape == (int((labels != -100).sum()), config.vocab_size)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # Every trainable parameter receives a gradient (nothing is disconnected).
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["m2-bert-80M-2k", "m2-bert-80M-8k", "m2-bert-80M-32k"])
def test_long_configs_run_at_their_full_length(name):
    # The real l_max with a narrow, one-layer model so that CPU runs it in seconds.
    config = dataclasses.replace(load_config(name).model, hidden_size=32, intermediate_size=64, num_layers=1)
    model = MaskedLM(config)
    input_ids, labels = _tiny_batch(config, batch=1, length=config.l_max)
    out = model(input_ids, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.bert.encoder.layer[0].attention.filter_fn.pos_emb.z.grad is not None


@pytest.mark.parametrize("architecture", ["m2", "bert"])
def test_no_attention_mask_is_a_mask_of_ones(architecture):
    # Batches of full rows (concat-mode shards) come without a mask: the model must compute what
    # a mask of all ones gives, loss and every gradient.
    config = dataclasses.replace(load_config("debug").model, architecture=architecture, num_attention_heads=4)
    model = MaskedLM(config)
    input_ids, labels = _tiny_batch(config, batch=2, length=32)
    grads = []
    for mask in (torch.ones_like(input_ids), None):
        model.zero_grad()
        torch.manual_seed(3)  # the same dropout draws
        out = model(input_ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_ones, grads_ones), (loss_none, grads_none) = grads
    torch.testing.assert_close(loss_none, loss_ones)
    for with_ones, without in zip(grads_ones, grads_none):
        torch.testing.assert_close(without, with_ones)


def test_longer_than_l_max_is_an_error():
    config = load_config("debug").model
    with pytest.raises(ValueError, match="exceeds the model's l_max=128"):
        MaskedLM(config)(torch.zeros(1, 129, dtype=torch.long))


def test_mlm_loss_only_on_masked_positions():
    config = load_config("debug").model
    model = MaskedLM(config).eval()
    input_ids, labels = _tiny_batch(config, batch=2, length=16)
    full_logits = model(input_ids).logits
    out = model(input_ids, labels=labels)
    masked = labels != -100
    torch.testing.assert_close(out.logits, full_logits[masked])
    expected = torch.nn.functional.cross_entropy(full_logits[masked], labels[masked])
    torch.testing.assert_close(out.loss, expected)
    assert out.num_masked == int(masked.sum())


def test_fixed_size_masked_gather_gives_the_exact_loss_and_gradients():
    config = load_config("debug").model
    torch.manual_seed(0)
    model = MaskedLM(config).eval()
    input_ids, labels = _tiny_batch(config, batch=2, length=16)
    num_masked = int((labels != -100).sum())
    results = {}
    for max_masked in (None, num_masked, num_masked + 5, labels.numel()):
        model.zero_grad()
        out = model(input_ids, labels=labels, max_masked=max_masked)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[max_masked] = (out.loss.detach(), grads)
        assert int(out.num_masked) == num_masked
        assert out.logits.shape[0] == (num_masked if max_masked is None else max_masked)
    exact_loss, exact_grads = results[None]
    for max_masked, (loss, grads) in results.items():
        torch.testing.assert_close(loss, exact_loss, msg=f"max_masked={max_masked}")
        assert grads.keys() == exact_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, exact_grads[name], rtol=1e-4, atol=1e-6, msg=f"{name}, {max_masked}")


def test_training_forward_gives_no_differentiable_logits_for_the_backward_to_fill():
    """A compiled training step's backward takes a gradient for each differentiable output; the
    logits' was never given and was made as a (rows, vocab) tensor of zeros every step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    config = load_config("debug").model
    torch.manual_seed(0)
    model = MaskedLM(config)
    input_ids, labels = _tiny_batch(config, batch=2, length=16)
    out = torch.compile(model, backend="aot_eager")(input_ids, labels=labels, max_masked=labels.numel())
    assert out.loss.requires_grad and not out.logits.requires_grad

    class LogitSized(TorchDispatchMode):
        made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.shape == out.logits.shape:
                self.made.append(str(func))
            return result

    with LogitSized() as mode:
        out.loss.backward()
    assert not [name for name in mode.made if "zeros" in name or "fill" in name], mode.made


def test_fixed_size_masked_gather_too_small_gives_a_nonfinite_loss():
    config = load_config("debug").model
    model = MaskedLM(config).eval()
    input_ids, labels = _tiny_batch(config, batch=2, length=16)
    num_masked = int((labels != -100).sum())
    assert torch.isnan(model(input_ids, labels=labels, max_masked=num_masked - 1).loss)


def test_masked_capacity_holds_the_binomial_tail():
    from m2dist.models import masked_capacity

    torch.manual_seed(0)
    for tokens, probability in ((32768, 0.30), (32768, 0.15), (1024, 0.3), (64, 0.3)):
        capacity = masked_capacity(tokens, probability)
        assert tokens * probability < capacity <= tokens
        counts = (torch.rand(2000, tokens) < probability).sum(1)
        assert int(counts.max()) <= capacity, (tokens, probability)
    # Large batches pay little: under 8% more rows than the mean at 32k tokens and 30%.
    assert masked_capacity(32768, 0.3) < 1.08 * 32768 * 0.3
    assert masked_capacity(16, 0.3) == 16


def test_decoder_is_tied_to_word_embeddings():
    model = MaskedLM(load_config("debug").model)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("architecture", ["m2", "bert"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_classifier_heads(architecture, pool):
    config = dataclasses.replace(load_config("debug").model, architecture=architecture, pool=pool, num_attention_heads=4)
    model = SequenceClassifier(config, num_labels=3).eval()
    input_ids, _ = _tiny_batch(config, batch=4, length=16)
    mask = torch.ones_like(input_ids)
    mask[:, 10:] = 0
    out = model(input_ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 1]))
    assert out.logits.shape == (4, 3) and torch.isfinite(out.loss)
    regression = SequenceClassifier(config, num_labels=1)
    assert regression(input_ids, labels=torch.rand(4)).loss.ndim == 0
    if pool == "mean":
        # Masked positions do not enter the mean: changing them leaves the pooled output alone
        # for BERT (attention masks them); M2's mixer sees them, as upstream's does.
        changed = input_ids.clone()
        changed[:, 12] = 999
        same = torch.allclose(model(changed, attention_mask=mask).logits, out.logits)
        assert same == (architecture == "bert")


def test_m2_parameter_groups_follow_the_recipe():
    config = load_config("m2-bert-80M")
    model = MaskedLM(dataclasses.replace(config.model, num_layers=2))
    groups = {g["name"]: g for g in build_param_groups(model, config.train.optimizer)}
    filter_fn = model.bert.encoder.layer[0].attention.filter_fn
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert id(filter_fn.implicit_filter[0].weight) in ids["filter"]
    assert id(filter_fn.implicit_filter[1].freq) in ids["filter"]  # shared Sin, also used by the reverse MLP
    assert id(filter_fn.implicit_filter_rev[0].weight) in ids["global"]
    assert id(filter_fn.pos_emb.z) in ids["pos_emb"]
    assert (groups["filter"]["lr"], groups["filter"]["decoupled_weight_decay"]) == (1e-3, 0.1)
    assert (groups["pos_emb"]["lr"], groups["pos_emb"]["decoupled_weight_decay"]) == (1e-5, 0.0)
    assert (groups["global"]["lr"], groups["global"]["decoupled_weight_decay"]) == (8e-4, 1e-5)
    all_ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))


def test_weight_decay_is_decoupled_from_the_learning_rate():
    """Composer's DecoupledAdamW, as upstream: w <- w (1 - wd lr_t / lr_peak) - lr_t adam_update."""
    from m2dist.config import OptimizerConfig
    from m2dist.optim import build_optimizer

    weight = torch.nn.Parameter(torch.full((4,), 2.0))
    model = torch.nn.Module()
    model.weight = weight
    config = OptimizerConfig(lr=1e-3, weight_decay=0.1)
    optimizer = build_optimizer(model, config)
    for group in optimizer.param_groups:
        group["lr"] = 0.5e-3  # half-way down the schedule: half the decay
    weight.grad = torch.zeros(4)  # Adam's update is 0 for a zero gradient
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.full((4,), 2.0 * (1 - 0.1 * 0.5)))


def test_causal_short_conv_is_upstreams_cut_conv1d():
    # Upstream applies Conv1d(C, C, 3, groups=C, padding=2) to (B, C, L) and keeps the first L
    # outputs; `causal_short_conv` takes (B, L, C) and must give the same values and gradients.
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv1d(48, 48, 3, groups=48, padding=2).double()
    p_BLC = torch.randn(2, 17, 48, generator=gen, dtype=torch.float64, requires_grad=True)
    expected = conv(p_BLC.transpose(1, 2))[..., :17]
    out = causal_short_conv(p_BLC, conv.weight, conv.bias)
    assert out.shape == (2, 48, 17) and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    upstream = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    wrt = [p_BLC, conv.weight, conv.bias]
    for got, want in zip(torch.autograd.grad(out, wrt, upstream), torch.autograd.grad(expected, wrt, upstream)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.gpu
def test_compiled_short_conv_matches_eager_under_autocast():
    # On a GPU the model runs the torch.compile'd short conv; bf16 in, bf16 out, fp32 inside.
    from kernels.mixer import _compiled_short_conv

    gen = torch.Generator(device="cuda").manual_seed(0)
    p_BLC = torch.randn(4, 128, 2304, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(2304, 1, 3, device="cuda", generator=gen, requires_grad=True)
    bias = torch.randn(2304, device="cuda", generator=gen, requires_grad=True)
    upstream = torch.randn(4, 2304, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    results = []
    for fn in (causal_short_conv, _compiled_short_conv()):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(p_BLC, weight, bias)
        results.append((out, *torch.autograd.grad(out, [p_BLC, weight, bias], upstream)))
    for eager, compiled in zip(*results):
        assert eager.dtype == compiled.dtype
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=1e-2, atol=1e-2)


def test_long_filters_are_the_modules_mlps_modulated_and_folded():
    # `long_filters` computes many HyenaFilters' kernels as one stacked function of their
    # parameters: check each against its own modules, values and gradients.
    from m2dist.models.m2 import HyenaFilter, long_filters

    torch.manual_seed(0)
    filters = [HyenaFilter(load_config("debug").model).double() for _ in range(3)]

    def from_modules(hyena):
        z_1LE, t_1L1 = hyena.pos_emb(24)
        decay_1LD = torch.exp(-t_1L1 * hyena.modulation.deltas.abs())
        k_fwd_DL = (hyena.implicit_filter(z_1LE) * decay_1LD)[0].t()
        k_rev_DL = (hyena.implicit_filter_rev(z_1LE) * decay_1LD)[0].t()
        zeros = torch.zeros_like(k_fwd_DL)
        return torch.cat([k_fwd_DL, zeros], 1) + torch.cat([zeros, k_rev_DL.flip(1)], 1)

    got, expected = long_filters(filters, 24), [from_modules(f) for f in filters]
    params = [p for f in filters for p in f.parameters() if p is not f.bias]
    upstream = [torch.randn_like(k) for k in expected]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    stacked_grads = torch.autograd.grad(got, params, upstream)
    for a, b in zip(stacked_grads, torch.autograd.grad(expected, params, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # the batched matmuls sum in another order
    # laid out as the parameters are: autograd takes them as they come, with no copy per parameter
    assert all(g.is_contiguous() for g in stacked_grads)
    torch.testing.assert_close(filters[1].circular_filter(24), expected[1], rtol=0, atol=1e-12)


def test_layers_given_their_kernels_equal_layers_computing_them():
    # LayerStack computes every layer's kernels in one batch and passes them down.
    from m2dist.models.m2 import M2Layer, layer_long_filters

    torch.manual_seed(0)
    layers = [M2Layer(load_config("debug").model).eval() for _ in range(2)]  # no dropout
    h = torch.randn(2, 16, 128)
    for layer, filters_DN in zip(layers, layer_long_filters(layers, 16)):
        torch.testing.assert_close(layer(h, None, filters_DN), layer(h), rtol=0, atol=0)
        # ... and the kernels handed down are the ones used.
        assert not torch.equal(layer(h, None, [torch.zeros_like(k) for k in filters_DN]), layer(h))


def test_filter_mlps_run_in_fp32_under_autocast():
    from m2dist.models.m2 import HyenaFilter

    hyena = HyenaFilter(load_config("debug").model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k_autocast = hyena.circular_filter(16)
    assert k_autocast.dtype == torch.float32
    torch.testing.assert_close(k_autocast, hyena.circular_filter(16), rtol=0, atol=0)


@pytest.mark.gpu
def test_compiled_long_filters_match_eager():
    from m2dist.models.m2 import HyenaFilter, _compiled_stacked_long_filters, long_filters, stacked_long_filters

    filters = [HyenaFilter(load_config("m2-bert-80M").model).cuda() for _ in range(4)]
    params = [p for f in filters for p in f.parameters() if p is not f.bias]
    upstream = [torch.randn(768, 256, device="cuda") for _ in filters]
    results = []
    for fn in (stacked_long_filters, _compiled_stacked_long_filters()):
        with unittest.mock.patch("m2dist.models.m2.stacked_long_filters", fn), unittest.mock.patch(
            "m2dist.models.m2._compiled_stacked_long_filters", lambda fn=fn: fn
        ):
            out = long_filters(filters, 128)
        results.append((*out, *torch.autograd.grad(out, params, upstream)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["m2", "bert"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(architecture):
    # Dropout on: the recomputation must draw the same masks as the forward.
    dropout = dict(hidden_dropout=0.1, attention_dropout=0.1)
    base = dataclasses.replace(load_config("debug").model, architecture=architecture, num_attention_heads=4, **dropout)
    input_ids = torch.randint(5, base.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.where(torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3, input_ids, -100)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = MaskedLM(dataclasses.replace(base, activation_checkpointing=checkpointing))
        first_layer = next(m for m in model.modules() if isinstance(m, LayerStack)).layer[0]
        calls = []
        first_layer.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(3)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # the backward recomputes the layer
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bert_baseline_is_hugging_faces_bert():
    """The baseline is BERT as Hugging Face implements it: with Hugging Face's weights loaded under
    their own names, the MLM logits on a padded batch and the gradients of a masked-token loss agree."""
    transformers = pytest.importorskip("transformers")
    config = dataclasses.replace(
        load_config("bert-base").model, hidden_size=64, intermediate_size=256, num_layers=2, num_attention_heads=4
    )
    hf_config = transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=config.l_max, type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps, pad_token_id=config.pad_token_id, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(hf_config).eval()
    ours = MaskedLM(config).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert [k for k in missing if not k.endswith("position_ids")] == []
    # Hugging Face lists the decoder's bias twice (also as cls.predictions.bias).
    assert [k for k in unexpected if not k.endswith("position_ids")] == ["cls.predictions.bias"]

    input_ids, mask = torch.randint(5, 1000, (3, 20)), torch.ones(3, 20, dtype=torch.long)
    mask[1, 14:] = 0
    mask[2, 5:] = 0
    labels = torch.full_like(input_ids, -100)
    labels[:, 2] = input_ids[:, 2]
    labels[0, 17] = input_ids[0, 17]
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=mask).logits
        got = ours(input_ids, mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)

    loss_hf = hf(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    loss_ours = ours(input_ids, mask, labels=labels).loss
    torch.testing.assert_close(loss_ours, loss_hf, atol=1e-5, rtol=1e-5)
    loss_hf.backward()
    loss_ours.backward()
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
