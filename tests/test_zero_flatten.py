"""ZeRO 1-2's flattening as one multi-tensor copy: the same tensor as DeepSpeed's `torch.cat`, and
the same training, bit for bit."""

import pytest
import torch

import m2dist.engine.trainer as trainer_module
from m2dist.config import load_config
from m2dist.engine.zero_flatten import flatten_by_foreach_copy, install_foreach_flatten


def _cat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_flatten_is_the_concatenation():
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3, 4, generator=gen), torch.randn((), generator=gen), torch.zeros(0),
        torch.randn(5, 6, generator=gen).t(), torch.randn(2, 3, 4, generator=gen)[:, 1],
    ]  # fmt: skip
    fallbacks = []
    flat = flatten_by_foreach_copy(tensors, lambda ts: fallbacks.append(ts) or _cat(ts))
    assert not fallbacks
    assert flat.is_contiguous() and torch.equal(flat, _cat(tensors))
    assert flat.data_ptr() not in {t.data_ptr() for t in tensors}


@pytest.mark.parametrize(
    "tensors",
    [[], [torch.ones(2), torch.ones(2, dtype=torch.float64)], [torch.ones(2, requires_grad=True), torch.ones(3)]],
    ids=["empty", "mixed dtypes", "tracked by autograd"],
)
def test_lists_it_does_not_handle_go_to_the_fallback(tensors):
    sentinel = torch.tensor([7.0])
    assert flatten_by_foreach_copy(tensors, lambda ts: sentinel) is sentinel


def _train(tmp_path, zero_stage):
    """Losses and final weights of 3 steps of the debug config on one rank, and the flattens run."""
    config = load_config(
        "debug",
        [
            f"train.zero_stage={zero_stage}", "train.duration=3", "train.global_batch_size=4", "train.seq_len=32",
            "tracking.enabled=false", "data.num_workers=0", f"train.output_dir={tmp_path}",
        ],
    )  # fmt: skip
    trainer = trainer_module.Trainer(config)
    flatten, calls = trainer.engine.optimizer.flatten, []
    trainer.engine.optimizer.flatten = lambda tensors: calls.append(len(tensors)) or flatten(tensors)
    try:
        losses = [float(trainer.train_step()[0]) for _ in range(3)]
    finally:
        trainer.close()
    weights = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    return losses, weights, calls


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_training_is_unchanged_with_the_multi_tensor_flatten(tmp_path, zero_stage, in_process_rank, monkeypatch):
    ours = _train(tmp_path / "foreach", zero_stage)
    assert ours[2], "the optimizer step flattens nothing: the test would not see the change"
    monkeypatch.setattr(trainer_module, "install_foreach_flatten", lambda optimizer: False)
    deepspeeds = _train(tmp_path / "cat", zero_stage)
    assert ours[0] == deepspeeds[0]
    for name, tensor in deepspeeds[1].items():
        assert torch.equal(ours[1][name], tensor), name


def test_other_optimizers_are_left_alone():
    assert not install_foreach_flatten(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
