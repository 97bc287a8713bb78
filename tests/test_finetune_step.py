"""The fine-tuning step (m2dist.glue.step): eager on any device, one CUDA graph on a GPU, same result."""

import copy
import dataclasses

import pytest
import torch

from m2dist.config import load_config
from m2dist.glue.config import GlueConfig, TaskConfig, load_glue_config
from m2dist.glue.finetune import build_optimizer, build_schedule, compile_if_asked
from m2dist.glue.step import EAGER_STEPS, FinetuneStep, gather_batch
from m2dist.models import SequenceClassifier


def tiny_classifier(architecture: str, device: str) -> SequenceClassifier:
    model = load_config("debug").model
    heads = {"num_attention_heads": 4, "attention_dropout": 0.0} if architecture == "bert" else {}
    model = dataclasses.replace(model, architecture=architecture, hidden_dropout=0.0, num_layers=2, **heads)
    torch.manual_seed(0)
    return SequenceClassifier(model, num_labels=3).to(device)


def random_split(examples: int, length: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(4, length + 1, (examples,), generator=generator)
    return {
        "input_ids": torch.randint(5, 1000, (examples, length), generator=generator, dtype=torch.int32).to(device),
        "token_type_ids": torch.zeros(examples, length, dtype=torch.int8, device=device),
        "attention_mask": (torch.arange(length)[None] < lengths[:, None]).to(device),
        "labels": torch.randint(0, 3, (examples,), generator=generator).to(device),
    }


def train(model, split, batch_size: int, epochs: int, cuda_graph: bool, device: str, fill: bool | None = None):
    """Losses and final weights of `epochs` passes over `split` in file order (last batch partial);
    `fill` sets the step's `fill_short_batches` (None: its default)."""
    glue, settings = GlueConfig(), TaskConfig(lr=1e-3, batch_size=batch_size)
    optimizer = build_optimizer(model, glue, settings, torch.device(device))
    examples = len(split["labels"])
    steps = epochs * -(-examples // batch_size)
    schedule = build_schedule(optimizer, steps, 0.2)
    step = FinetuneStep(model, optimizer, split, batch_size, bf16=device == "cuda", cuda_graph=cuda_graph)
    if fill is not None:
        step.fill_short_batches = fill
    losses = []
    for _ in range(epochs):
        for start in range(0, examples, batch_size):
            losses.append(step(torch.arange(start, min(start + batch_size, examples), device=device)))
            schedule.step()
    return torch.stack(losses).cpu(), {k: v.detach().cpu() for k, v in model.state_dict().items()}, step


def test_gather_batch_widens_ids_and_keeps_labels():
    split = random_split(10, 16, "cpu")
    batch = gather_batch(split, torch.tensor([3, 1]))
    assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.int64
    assert torch.equal(batch["input_ids"], split["input_ids"][[3, 1]].long())
    assert torch.equal(batch["labels"], split["labels"][[3, 1]])


def test_eager_step_is_the_plain_training_loop():
    """The step object trains exactly as forward / backward / AdamW step / zero_grad written out."""
    model = tiny_classifier("m2", "cpu")
    reference = copy.deepcopy(model)
    split = random_split(20, 32, "cpu")
    losses, weights, step = train(model, split, batch_size=8, epochs=1, cuda_graph=True, device="cpu")
    assert step.graph is None  # no CUDA graph on a CPU

    optimizer = build_optimizer(reference, GlueConfig(), TaskConfig(lr=1e-3, batch_size=8))
    schedule = build_schedule(optimizer, 3, 0.2)
    expected = []
    for start in (0, 8, 16):
        loss = reference(**gather_batch(split, torch.arange(start, min(start + 8, 20)))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        expected.append(loss.detach())
    torch.testing.assert_close(losses, torch.stack(expected), rtol=0, atol=0)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("regression", [False, True], ids=["classes", "regression"])
def test_short_batch_filled_up_trains_as_the_short_batch(regression):
    """A short batch filled up to the batch size (as on a GPU) with rows the loss ignores: the
    model sees one batch shape, and the losses and weights are those of the plain loop."""
    model = tiny_classifier("m2", "cpu")
    if regression:
        model.classifier = torch.nn.Linear(model.classifier.in_features, 1)
        model.num_labels = 1
    twin = copy.deepcopy(model)
    split = random_split(20, 32, "cpu")
    if regression:
        split["labels"] = torch.rand(20, generator=torch.Generator().manual_seed(2))
    shapes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    filled_losses, filled_weights, step = train(model, split, batch_size=8, epochs=2, cuda_graph=False, device="cpu", fill=True)
    plain_losses, plain_weights, _ = train(twin, split, batch_size=8, epochs=2, cuda_graph=False, device="cpu", fill=False)
    assert shapes == [8] * 6  # 20 examples: batches of 8, 8 and 4 filled up to 8, twice
    torch.testing.assert_close(filled_losses, plain_losses, rtol=1e-5, atol=1e-6)
    for key, value in plain_weights.items():
        torch.testing.assert_close(filled_weights[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_classifier_losses_leave_out_ignored_rows():
    model = tiny_classifier("m2", "cpu").eval()
    split = random_split(6, 16, "cpu")
    batch = gather_batch(split, torch.arange(6))
    labels = batch["labels"].clone()
    labels[4:] = SequenceClassifier.IGNORE_INDEX
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = torch.nn.functional.cross_entropy(logits[:4], batch["labels"][:4])
    torch.testing.assert_close(model(**{**batch, "labels": labels}).loss, expected)
    model.classifier, model.num_labels = torch.nn.Linear(model.classifier.in_features, 1), 1
    targets = torch.tensor([0.1, 0.5, 0.9, 0.3, float("nan"), float("nan")])
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.squeeze(-1)
    torch.testing.assert_close(model(**{**batch, "labels": targets}).loss, ((logits[:4] - targets[:4]) ** 2).mean())


def test_glue_compile_compiles_the_classifier_in_place():
    """glue.compile (off by default) compiles the module itself: its state dict's keys, which the
    MNLI-initialised tasks and the saved jobs use, stay as they are."""
    model = tiny_classifier("m2", "cpu")
    keys = list(model.state_dict())
    compile_if_asked(model, load_glue_config("default"))
    assert model._compiled_call_impl is None
    compile_if_asked(model, GlueConfig(compile=True))
    assert model._compiled_call_impl is not None
    assert list(model.state_dict()) == keys


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("architecture", ["m2", "bert"])
def test_captured_step_trains_as_the_eager_step(architecture, compiled):
    """Two epochs of 7 steps (the last partial) with the step captured after EAGER_STEPS: the same
    losses and weights as all-eager training on the batches as they are, and the graph replayed for
    every later batch, the short ones filled up; also with the classifier compiled
    (`glue.compile`), whose fused kernels round differently."""
    model = tiny_classifier(architecture, "cuda")
    twin = copy.deepcopy(model)
    compile_if_asked(model, GlueConfig(compile=compiled))
    tolerance = {"rtol": 2e-2, "atol": 2e-3} if compiled else {"rtol": 1e-3, "atol": 1e-4}
    split = random_split(52, 128, "cuda")
    graph_losses, graph_weights, step = train(model, split, 8, epochs=2, cuda_graph=True, device="cuda")
    # The eager twin trains on the short batches as they are; the graph replays them filled up.
    eager_losses, eager_weights, _ = train(twin, split, 8, epochs=2, cuda_graph=False, device="cuda", fill=False)
    assert step.graph is not None and step.warmup_steps == EAGER_STEPS
    assert step.capture_seconds > 0
    torch.testing.assert_close(graph_losses, eager_losses, **tolerance)
    for key, value in eager_weights.items():
        rtol, atol = 2 * tolerance["rtol"], 2 * tolerance["atol"]
        torch.testing.assert_close(graph_weights[key], value, rtol=rtol, atol=atol, msg=key)
    assert not torch.equal(graph_weights["classifier.weight"], tiny_classifier(architecture, "cpu").classifier.weight)


def test_evaluation_fills_its_last_batch_and_drops_the_filled_outputs():
    """`evaluate` with `fill_last` (the default on a GPU): every batch has the batch size, and the
    outputs are those of the examples themselves, in order."""
    import numpy as np

    from m2dist.glue.encode import EncodedSplit
    from m2dist.glue.finetune import evaluate

    model = tiny_classifier("m2", "cpu")
    generator = np.random.default_rng(3)
    split = EncodedSplit(
        input_ids_NL=generator.integers(5, 1000, (11, 16), dtype=np.int32),
        token_type_ids_NL=np.zeros((11, 16), dtype=np.int8),
        lengths_N=generator.integers(4, 17, 11),
        labels_N=generator.integers(0, 3, 11),
    )
    shapes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    filled = evaluate(model, split, 4, torch.device("cpu"), bf16=False, fill_last=True)
    assert shapes == [4, 4, 4]
    plain = evaluate(model, split, 4, torch.device("cpu"), bf16=False, fill_last=False)
    assert shapes[3:] == [4, 4, 3] and filled.shape == plain.shape == (11, 3)
    np.testing.assert_allclose(filled, plain, rtol=1e-5, atol=1e-6)


def test_adam_chunks_per_launch_packs_as_torch():
    # 36 tensors close a launch, so do 320 chunks (the tensor that fills it goes on in the next).
    from m2dist.glue.finetune import adam_chunks_per_launch

    chunk = 65536
    assert adam_chunks_per_launch([torch.empty(10)] * 36) == 36
    assert adam_chunks_per_launch([torch.empty(10)] * 37) == 37 / 2
    assert adam_chunks_per_launch([torch.empty(320 * chunk + 1)]) == 321 / 2
    assert adam_chunks_per_launch([torch.empty(300 * chunk), torch.empty(40 * chunk)]) == 340 / 2


def test_optimizer_order_sorts_m2s_parameters_and_keeps_berts():
    # M2's layers mix large weights with many small tensors: its launches, in model order, carry
    # too few chunks, and its groups go largest first; BERT's order fills launches and stays.
    from m2dist.glue.finetune import ADAM_LAUNCH_CHUNKS, adam_chunks_per_launch

    for name, sorted_groups in (("m2-bert-80M", {"global", "filter"}), ("bert-base", set())):
        model = SequenceClassifier(load_config(name).model, num_labels=2)
        position = {id(p): i for i, p in enumerate(model.parameters())}
        optimizer = build_optimizer(model, GlueConfig(), TaskConfig(lr=1e-3, batch_size=16))
        for group in optimizer.param_groups:
            params = group["params"]
            in_model_order = sorted(params, key=lambda p: position[id(p)])
            sizes = [p.numel() for p in params]
            if group["name"] in sorted_groups:
                assert adam_chunks_per_launch(in_model_order) < ADAM_LAUNCH_CHUNKS / 2
                assert sizes == sorted(sizes, reverse=True), group["name"]
                assert [id(p) for p in params] != [id(p) for p in in_model_order], group["name"]
            else:
                assert [position[id(p)] for p in params] == sorted(position[id(p)] for p in params), (name, group["name"])
