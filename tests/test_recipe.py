"""The published recipe as upstream ran it (M2_SPEC 3-4): GLUE pooling, decay and data order, the
released 80M variant, initialisation, warmup, precision, the DeepSpeed pin, data that a real config
must be given, the long-context recipe; and `model.mask_padding`, padding-invariant outputs."""

import dataclasses
import tomllib

import pytest
import torch

from m2dist.checkpoint.extend import check_compatible
from m2dist.config import CONFIG_DIR, KernelConfig, check_training_data, load_config
from m2dist.engine.deepspeed_config import batch_layout, check_deepspeed_precision
from m2dist.errors import ConfigError
from m2dist.glue.config import GLUE_CONFIG_DIR, load_glue_config
from m2dist.glue.finetune import build_classifier, build_optimizer, build_schedule
from m2dist.glue.runner import check_model
from m2dist.models import MaskedLM, SequenceClassifier, count_parameters
from m2dist.models.m2 import M2Layer
from m2dist.optim import warmup_linear_decay
from tests.conftest import REPO_ROOT

M2_GLUE_CONFIGS = ["m2-bert-80M", "m2-bert-110M", "m2-bert-260M", "m2-bert-341M"]
# Upstream's GLUE driver carries QNLI's pool_all into every later task of its yaml order.
UPSTREAM_POOLING = {
    "mnli": "cls", "qnli": "mean", "qqp": "cls", "sst2": "mean",
    "cola": "mean", "mrpc": "mean", "stsb": "mean", "rte": "cls",
}  # fmt: skip


def _debug_model_config(**changes):
    return dataclasses.replace(load_config("debug").model, **changes)


@pytest.mark.parametrize("name", M2_GLUE_CONFIGS)
def test_glue_pooling_per_task_is_what_upstream_ran(name):
    glue = load_glue_config(name)
    assert {task: glue.task(task).pool for task in UPSTREAM_POOLING} == UPSTREAM_POOLING
    # STS-B starts from the MNLI classifier (pooler trained on [CLS]) and pools the mean.
    mnli = SequenceClassifier(_debug_model_config(num_layers=1), 3)
    model, pooler_loaded = build_classifier(mnli, 1, glue, glue.tasks.stsb, "mnli")
    assert pooler_loaded and model.bert.pooler.mean and model.config.pool == "mean"
    assert torch.equal(model.bert.pooler.dense.weight, mnli.bert.pooler.dense.weight)
    model, _ = build_classifier(mnli, 3, glue, glue.tasks.rte, "mnli")
    assert not model.bert.pooler.mean


def test_glue_kernels_default_to_the_checkpoints_and_can_be_changed():
    source = SequenceClassifier(_debug_model_config(num_layers=1, kernels=KernelConfig("reference", "auto", fused_mixer=True)), 3)
    glue = load_glue_config("default")
    model, _ = build_classifier(source, 3, glue, glue.tasks.rte, "source")
    assert model.config.kernels == source.config.kernels
    glue = load_glue_config("default", ["fused_mixer=false", "fftconv=triton"])
    model, _ = build_classifier(source, 3, glue, glue.tasks.rte, "source")
    assert model.config.kernels == KernelConfig("triton", "auto", fused_mixer=False)


def _zero_grads_step(model, optimizer, schedule, steps_before: int) -> None:
    for _ in range(steps_before):
        schedule.step()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0: only the decay moves the weights
    optimizer.step()


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize(
    "task, overrides, at_step, filter_factor",
    [
        # Decoupled (Composer): wd x lr_t / lr_peak, 10% at the peak, half at half the warmup.
        ("sst2", [], 6, 1 - 0.1),
        ("sst2", [], 3, 1 - 0.1 * 0.5),
        # A task the 80M config switches to torch AdamW: wd x lr_t for every group.
        ("rte", [], 6, 1 - 0.1 * 1e-3),
        # The documented deviation for the filter group.
        ("sst2", ["filter_decay=adamw"], 6, 1 - 0.1 * 1e-3),
    ],
)
def test_finetuning_step_decays_filters_as_upstream(task, overrides, at_step, filter_factor):
    glue = load_glue_config("m2-bert-80M", overrides)
    settings = glue.task(task)
    torch.manual_seed(0)
    model = SequenceClassifier(_debug_model_config(num_layers=1), 2)
    optimizer = build_optimizer(model, glue, settings)
    schedule = build_schedule(optimizer, total_steps=100, warmup_fraction=glue.warmup_fraction)  # warmup 6 steps
    filter_weight = model.bert.encoder.layer[0].attention.filter_fn.implicit_filter[0].weight
    classifier_weight = model.classifier.weight
    before = filter_weight.detach().clone(), classifier_weight.detach().clone()
    _zero_grads_step(model, optimizer, schedule, at_step)
    scale = at_step / 6
    global_factor = 1 - settings.weight_decay * (settings.lr * scale if settings.optimizer == "adamw" else scale)
    torch.testing.assert_close(filter_weight.detach(), before[0] * filter_factor, rtol=1e-6, atol=0)
    torch.testing.assert_close(classifier_weight.detach(), before[1] * global_factor, rtol=2e-7, atol=0)


def test_default_glue_protocol_is_upstreams():
    glue = load_glue_config("default")
    assert glue.filter_decay == "decoupled" and glue.shuffle is False
    assert all(glue.task(t).pool == "" for t in UPSTREAM_POOLING)  # BERT: the checkpoint's [CLS]


def _encoded_task(tmp_path, rows: int):
    from m2dist.data.tokenizer import load_tokenizer
    from m2dist.glue.encode import encode_examples, save_encoded
    from m2dist.glue.tasks import read_glue_task
    from tests.test_glue import write_glue_fixture

    data = read_glue_task(write_glue_fixture(tmp_path / "glue", rows=rows), "sst2")
    tokenizer = load_tokenizer()
    splits = {"train": encode_examples(data.train, tokenizer, 16), "dev": encode_examples(data.dev["dev"], tokenizer, 16)}
    return save_encoded(splits, tmp_path / "sst2.npz"), splits["train"]


@pytest.mark.parametrize("shuffle", [False, True])
def test_finetuning_reads_the_training_split_in_file_order_every_epoch(tmp_path, monkeypatch, shuffle):
    import m2dist.glue.finetune as finetune
    import m2dist.glue.step as step
    from m2dist.checkpoint.release import save_release

    torch.manual_seed(0)
    checkpoint = save_release(MaskedLM(_debug_model_config(num_layers=1, l_max=16)), tmp_path / "mlm")
    encoded, train = _encoded_task(tmp_path, rows=8)
    glue = load_glue_config(
        "default", ["tasks.sst2.epochs=2", "tasks.sst2.batch_size=2", "eval_batch_size=8", f"shuffle={shuffle}"]
    )
    seen = []
    original = step.gather_batch

    def recording_gather_batch(split, index):  # the training step's batches
        batch = original(split, index)
        seen.append(batch["input_ids"].clone())
        return batch

    monkeypatch.setattr(step, "gather_batch", recording_gather_batch)
    spec = finetune.JobSpec("sst2", 19, 2, str(encoded), str(checkpoint), glue.tasks.sst2, glue)
    finetune.run_job(spec, "cpu")
    file_order = torch.as_tensor(train.input_ids_NL).long()
    epochs = [torch.cat(seen[:4]), torch.cat(seen[4:])]
    assert len(seen) == 8
    if shuffle:
        assert not torch.equal(epochs[0], epochs[1])
    else:
        assert torch.equal(epochs[0], file_order) and torch.equal(epochs[1], file_order)


def test_released_80M_is_the_pre_layernorm_variant():
    released = load_config("m2-bert-80M").model
    assert released.pre_layernorm is True
    assert count_parameters(MaskedLM(dataclasses.replace(released, num_layers=1))) == count_parameters(
        MaskedLM(dataclasses.replace(load_config("m2-bert-80M-noln").model, num_layers=1))
    ) + 2 * 768  # the one LayerNorm per layer
    glue = load_glue_config("m2-bert-80M")
    assert glue.model == "m2-bert-80M"
    check_model(glue, released, "released.pt")
    with pytest.raises(ConfigError, match=r"noln.pt: not a m2-bert-80M checkpoint.*model.pre_layernorm=False \(expected True\)"):
        check_model(glue, load_config("m2-bert-80M-noln").model, "noln.pt")
    for name in M2_GLUE_CONFIGS[1:]:
        check_model(load_glue_config(name), load_config(name).model, name)
    with pytest.raises(ConfigError, match="model: nonexistent: no such config file"):
        load_glue_config("default", ["model=nonexistent"])


def test_blockdiag_output_bias_is_uniform_in_one_over_sqrt_out_features():
    torch.manual_seed(0)
    mlp = M2Layer(_debug_model_config()).mlp  # wo: 512 -> 128
    bias = mlp.wo.bias.detach()
    assert bias.abs().max() <= 1 / 128**0.5
    assert bias.abs().max() > 1 / 512**0.5  # wider than a fan-in of in_features would draw


def test_warmup_starts_at_lr_zero():
    assert warmup_linear_decay(0, 100, 0.06) == 0.0
    assert warmup_linear_decay(3, 100, 0.06) == pytest.approx(0.5)
    assert warmup_linear_decay(6, 100, 0.06) == pytest.approx(1.0)
    from m2dist.engine.trainer import WarmupLinearDecay

    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    schedule = WarmupLinearDecay(optimizer, total_steps=100, warmup_fraction=0.06, final_fraction=0.02)
    assert schedule.get_last_lr() == [0.0]
    schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(1e-3 / 6)
    glue_schedule = build_schedule(torch.optim.AdamW([parameter], lr=1e-3), 100, 0.06)
    assert glue_schedule.get_last_lr() == [0.0]


def test_regression_head_and_loss_in_fp32_under_autocast():
    torch.manual_seed(0)
    config = _debug_model_config(num_layers=1, hidden_dropout=0.0, kernels=KernelConfig("reference", "reference"))
    input_ids = torch.randint(200, 1000, (2, 16))
    for num_labels, head_dtype in ((1, torch.float32), (3, torch.bfloat16)):
        model = SequenceClassifier(config, num_labels).eval()
        labels = torch.tensor([0.5, 2.0]) if num_labels == 1 else torch.tensor([0, 2])
        encoder_dtypes = []
        in_linear = model.bert.encoder.layer[0].attention.in_linear
        in_linear.register_forward_hook(lambda module, args, out: encoder_dtypes.append(out.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids, labels=labels)
            hidden = model.bert(input_ids)
        assert encoder_dtypes == [torch.bfloat16] * 2  # the encoder stays in bf16
        assert out.logits.dtype == head_dtype and out.loss.dtype == torch.float32
        if num_labels == 1:
            expected = model.classifier(model.bert.pooler(hidden.float(), None))
            torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)


def test_deepspeed_without_torch_autocast_is_refused_for_bf16():
    with pytest.raises(ConfigError, match=r"bf16 needs deepspeed >= 0.17.2.*installed: 0.17.1.*silently train in fp32"):
        check_deepspeed_precision("bf16", "0.17.1")
    for version in ("0.17.2", "0.19.8", "0.18.0rc1"):
        check_deepspeed_precision("bf16", version)
    check_deepspeed_precision("fp32", "0.16.0")
    from packaging.requirements import Requirement

    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    deepspeed = next(Requirement(d) for d in dependencies if d.startswith("deepspeed"))
    assert not deepspeed.specifier.contains("0.17.1") and deepspeed.specifier.contains("0.17.2")


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_only_the_debug_config_trains_on_the_embedded_corpus(name):
    config = load_config(name)
    if name == "debug":
        check_training_data(config)
        return
    with pytest.raises(ConfigError, match=rf"data.train: empty in config '{name}'.*data.train=.*allow_embedded_corpus=true"):
        check_training_data(config)
    check_training_data(load_config(name, ["data.allow_embedded_corpus=true"]))
    check_training_data(load_config(name, ["data.train=/data/c4/train", "data.val=/data/c4/val"]))


def test_pretraining_without_data_stops_before_any_work(tmp_path):
    from m2dist.train import main

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="data.train: empty in config 'm2-bert-80M'"):
        main(["--config", "m2-bert-80M", f"train.output_dir={out}", "train.device=cpu"])
    assert not out.exists()


@pytest.mark.parametrize("name", ["m2-bert-80M-2k", "m2-bert-80M-8k", "m2-bert-80M-32k"])
def test_long_context_recipes_follow_upstreams_published_one(name):
    config = load_config(name)
    # Upstream's only long-context pretraining config (341M at 2k): lr 5e-4, global batch 256.
    assert (config.train.optimizer.lr, config.train.global_batch_size) == (5e-4, 256)
    for world_size in (1, 8):
        batch_layout(config, world_size)  # the micro-batch divides the per-rank batch
    # The released 80M's architecture: a warm start from m2-bert-80M (then 2k, 8k) is allowed.
    check_compatible(load_config("m2-bert-80M").model, config.model, name)
    assert "341M" in (CONFIG_DIR / "m2-bert-80M-2k.yaml").read_text()


def test_glue_configs_in_the_repository_load():
    for path in sorted(GLUE_CONFIG_DIR.glob("*.yaml")):
        load_glue_config(path.stem)


# `model.mask_padding`: a padded input's outputs at its tokens equal the unpadded input's.
LENGTH, PADDED = 20, 32


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _padded_pair(vocab: int, batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(200, vocab, (batch, LENGTH), generator=generator)
    padded = torch.nn.functional.pad(ids, (0, PADDED - LENGTH))  # [PAD] = 0
    mask = (padded != 0).long()
    return ids, padded, mask


def _tiny_m2(mask_padding: bool, kernels: str = "reference", pre_layernorm: bool = False):
    return _debug_model_config(
        hidden_size=32, intermediate_size=64, num_layers=2, l_max=PADDED, filter_order=16, hidden_dropout=0.0,
        vocab_size=1024, pre_layernorm=pre_layernorm, mask_padding=mask_padding,
        kernels=KernelConfig(kernels, kernels),
    )  # fmt: skip


def _outputs_and_grads(model, forward):
    model.zero_grad()
    out = forward()
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_padding_invariance(model, unpadded, padded):
    """Outputs to 1e-6 relative; parameter gradients to 1e-5 (the filter MLPs' gradients sum over
    FFTs of size 2 x 20 and 2 x 32 positions, rounded differently)."""
    out_u, grads_u = _outputs_and_grads(model, unpadded)
    out_p, grads_p = _outputs_and_grads(model, padded)
    assert _relative_error(out_p, out_u) <= 1e-6
    assert grads_u.keys() == grads_p.keys()
    errors = {name: _relative_error(grads_p[name], grad) for name, grad in grads_u.items() if grad.abs().max() > 0}
    assert max(errors.values()) <= 1e-5, sorted(errors.items(), key=lambda e: -e[1])[:3]


@pytest.mark.parametrize("pre_layernorm", [False, True])
def test_mask_padding_makes_mlm_outputs_padding_invariant(pre_layernorm):
    torch.manual_seed(0)
    model = MaskedLM(_tiny_m2(True, pre_layernorm=pre_layernorm)).eval()
    ids, padded, mask = _padded_pair(1024)
    _check_padding_invariance(
        model, lambda: model(ids).logits, lambda: model(padded, attention_mask=mask).logits[:, :LENGTH]
    )
    # Upstream (the default): the pads take part in the convolutions.
    model.bert.encoder.layer[0].mask_padding = model.bert.encoder.layer[1].mask_padding = False
    with torch.no_grad():
        assert _relative_error(model(padded, attention_mask=mask).logits[:, :LENGTH], model(ids).logits) > 1e-3


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_mask_padding_makes_glue_classifier_padding_invariant(pool):
    torch.manual_seed(0)
    model = SequenceClassifier(dataclasses.replace(_tiny_m2(True), pool=pool), 3).eval()
    ids, padded, mask = _padded_pair(1024, batch=3)
    _check_padding_invariance(
        model, lambda: model(ids).logits, lambda: model(padded, attention_mask=mask).logits
    )
    # Through fine-tuning: a GLUE config turns it on for a checkpoint saved without it.
    glue = load_glue_config("default", ["mask_padding=true"])
    source = SequenceClassifier(_tiny_m2(False), 3)
    built, _ = build_classifier(source, 3, glue, glue.tasks.rte, "source")
    assert built.config.mask_padding and all(layer.mask_padding for layer in built.bert.encoder.layer)
    assert not build_classifier(source, 3, load_glue_config("default"), glue.tasks.rte, "source")[0].config.mask_padding


def test_mask_padding_on_the_triton_path():
    """The same layer on the Triton kernels (the interpreter without a GPU), forward and backward."""
    torch.manual_seed(0)
    layer = M2Layer(_tiny_m2(True, kernels="triton")).eval()
    h = torch.randn(2, PADDED, 32)
    mask = torch.ones(2, PADDED, dtype=torch.long)
    mask[:, LENGTH:] = 0
    h_unpadded = h[:, :LENGTH].contiguous()
    _check_padding_invariance(
        layer, lambda: layer(h_unpadded, torch.ones(2, LENGTH)), lambda: layer(h, mask)[:, :LENGTH]
    )
