"""One data-parallel rank: the ZeRO 1-2 gradient all-reduce is left out, and training is bit for bit
what DeepSpeed's path gives; so is it with the multi-tensor flatten (`m2dist.engine.zero_flatten`)."""

import functools

import pytest
import torch

import m2dist.engine.trainer as trainer_module
from m2dist.config import load_config
from m2dist.engine.zero_reduction import skip_single_rank_reduction


def _train(tmp_path, zero_stage, skip):
    """Losses and final weights of 3 steps of the debug config on one rank."""
    config = load_config(
        "debug",
        [
            f"train.zero_stage={zero_stage}", "train.duration=3", "train.global_batch_size=4", "train.seq_len=32",
            "tracking.enabled=false", "data.num_workers=0", f"train.output_dir={tmp_path}",
        ],
    )  # fmt: skip
    trainer = trainer_module.Trainer(config)
    optimizer = trainer.engine.optimizer
    skipped = isinstance(optimizer.buffered_reduce_fallback, functools.partial)
    assert skipped == skip
    calls = {"skipped": 0, "deepspeed": 0, "flatten": 0}
    if skip:
        # Count the replacement's calls and DeepSpeed's own method's: it must not run when the
        # dtypes match (it would flatten and copy).
        func, original = optimizer.buffered_reduce_fallback.func, optimizer.buffered_reduce_fallback.args[0]

        def deepspeeds(*args, **kwargs):
            calls["deepspeed"] += 1
            return original(*args, **kwargs)

        def replacement(*args, **kwargs):
            calls["skipped"] += 1
            return func(*args, **kwargs)

        optimizer.buffered_reduce_fallback = functools.partial(replacement, deepspeeds)
    flatten = optimizer.flatten

    def counted_flatten(tensors):
        calls["flatten"] += 1
        return flatten(tensors)

    optimizer.flatten = counted_flatten
    try:
        losses = [float(trainer.train_step()[0]) for _ in range(3)]
    finally:
        trainer.close()
    assert calls["deepspeed"] == 0 and calls["skipped"] >= 3 * skip
    assert calls["flatten"] >= 3, "no step flattened: a test of the flatten would not see it"
    weights = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    return losses, weights


def _assert_same_training(run, baseline):
    """The same losses and final weights, bit for bit."""
    assert run[0] == baseline[0]
    for name, tensor in baseline[1].items():
        assert torch.equal(run[1][name], tensor), name


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_single_rank_training_is_unchanged_without_the_reduction(tmp_path, zero_stage, in_process_rank, monkeypatch):
    skipped = _train(tmp_path / "skip", zero_stage, skip=True)
    monkeypatch.setattr(trainer_module, "skip_single_rank_reduction", lambda optimizer: False)
    reduced = _train(tmp_path / "reduce", zero_stage, skip=False)
    _assert_same_training(skipped, reduced)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_single_rank_training_is_unchanged_with_the_multi_tensor_flatten(
    tmp_path, zero_stage, in_process_rank, monkeypatch
):
    foreach = _train(tmp_path / "foreach", zero_stage, skip=True)
    monkeypatch.setattr(trainer_module, "install_foreach_flatten", lambda optimizer: False)
    concatenated = _train(tmp_path / "cat", zero_stage, skip=True)
    _assert_same_training(foreach, concatenated)


def test_other_optimizers_are_left_alone():
    assert not skip_single_rank_reduction(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
