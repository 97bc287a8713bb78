"""The ZeRO 1-2 gradient norm as a foreach norm: DeepSpeed's value, in a handful of ops."""

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m2dist.config import load_config
from m2dist.engine.grad_norm import foreach_grad_norm, install_foreach_grad_norm


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_foreach_grad_norm_is_the_squared_norm_of_all_gradients():
    torch.manual_seed(0)
    grads = [torch.randn(7, 3), torch.randn(11).bfloat16(), torch.randn(2, 2, 2)]
    padding = torch.full((5,), 1e3)
    padding._zero_padding = True  # DeepSpeed's alignment padding: not a gradient
    expected = sum(float(g.double().square().sum()) for g in grads)
    assert float(foreach_grad_norm([*grads, padding])) == pytest.approx(expected, rel=1e-6)
    assert float(foreach_grad_norm([])) == 0.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_engine_grad_norm_is_deepspeeds_in_a_few_ops(tmp_path, zero_stage, device, in_process_rank):
    """Through the training engine (one rank): each step's norm equals DeepSpeed's per-tensor loop
    to 1e-6, with a constant number of ops instead of two per parameter."""
    from m2dist.engine.trainer import Trainer

    config = load_config(
        "debug",
        [
            f"train.zero_stage={zero_stage}", f"train.device={device}", "train.duration=3", "train.global_batch_size=4",
            "train.seq_len=32", "train.compile=false", "tracking.enabled=false", "data.num_workers=0",
            f"train.output_dir={tmp_path}",
        ],
    )  # fmt: skip
    trainer = Trainer(config)
    optimizer = trainer.engine.optimizer
    assert isinstance(optimizer.get_grad_norm_direct, functools.partial)
    assert not install_foreach_grad_norm(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    ours = optimizer.get_grad_norm_direct
    deepspeeds = type(optimizer).get_grad_norm_direct.__get__(optimizer)
    calls = []

    def both(gradients, params, norm_type=2):
        for norm in (ours, deepspeeds):
            with CountOps() as counter:
                value = norm(gradients, params, norm_type)
            calls.append((norm is ours, float(value), counter.count, len(gradients)))
        return ours(gradients, params, norm_type)

    optimizer.get_grad_norm_direct = both
    try:
        for _ in range(2):
            trainer.train_step()
    finally:
        trainer.close()
    ours_calls = [c for c in calls if c[0]]
    theirs_calls = [c for c in calls if not c[0]]
    assert len(ours_calls) >= 2
    for (_, mine, mine_ops, num_grads), (_, theirs, theirs_ops, _) in zip(ours_calls, theirs_calls):
        assert theirs > 0 and mine == pytest.approx(theirs, rel=1e-6)
        assert theirs_ops >= 2 * num_grads and mine_ops <= 16
    # A constant number of ops, whatever the group's tensor count.
    assert len({ops for _, _, ops, _ in ours_calls}) == 1
    # One call per parameter group per step; the global group holds most of the model's tensors.
    assert max(num_grads for *_, num_grads in ours_calls) > 20
