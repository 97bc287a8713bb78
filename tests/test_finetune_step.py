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


def train(model, split, batch_size: int, epochs: int, cuda_graph: bool, device: str):
    """Losses and final weights of `epochs` passes over `split` in file order (last batch partial)."""
    glue, settings = GlueConfig(), TaskConfig(lr=1e-3, batch_size=batch_size)
    optimizer = build_optimizer(model, glue, settings, torch.device(device))
    examples = len(split["labels"])
    steps = epochs * -(-examples // batch_size)
    schedule = build_schedule(optimizer, steps, 0.2)
    step = FinetuneStep(model, optimizer, split, batch_size, bf16=device == "cuda", cuda_graph=cuda_graph)
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
    losses and weights as all-eager training, and the graph replayed for the full batches; also with
    the classifier compiled (`glue.compile`), whose fused kernels round differently."""
    model = tiny_classifier(architecture, "cuda")
    twin = copy.deepcopy(model)
    compile_if_asked(model, GlueConfig(compile=compiled))
    tolerance = {"rtol": 2e-2, "atol": 2e-3} if compiled else {"rtol": 1e-3, "atol": 1e-4}
    split = random_split(52, 128, "cuda")
    graph_losses, graph_weights, step = train(model, split, 8, epochs=2, cuda_graph=True, device="cuda")
    eager_losses, eager_weights, _ = train(twin, split, 8, epochs=2, cuda_graph=False, device="cuda")
    assert step.graph is not None and step.warmup_steps == EAGER_STEPS
    assert step.capture_seconds > 0
    torch.testing.assert_close(graph_losses, eager_losses, **tolerance)
    for key, value in eager_weights.items():
        rtol, atol = 2 * tolerance["rtol"], 2 * tolerance["atol"]
        torch.testing.assert_close(graph_weights[key], value, rtol=rtol, atol=atol, msg=key)
    assert not torch.equal(graph_weights["classifier.weight"], tiny_classifier(architecture, "cpu").classifier.weight)
