"""ZeRO 1-2's flattening as one multi-tensor copy: the same tensor as DeepSpeed's `torch.cat` (the
same training, bit for bit: `tests/test_zero_reduction.py`)."""

import pytest
import torch

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


@pytest.mark.parametrize("zenflow", [False, True])
def test_installs_on_zero_optimizers_but_zenflows(zenflow):
    # ZenFlow's flatten transposes matrices before concatenating them: it keeps its own.
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = object.__new__(DeepSpeedZeroOptimizer)
    optimizer.flatten, optimizer.zenflow = _cat, zenflow
    assert install_foreach_flatten(optimizer) == (not zenflow)
    assert (optimizer.flatten is _cat) == zenflow
    tensors = [torch.arange(6.0).reshape(2, 3), torch.ones(2)]
    assert torch.equal(optimizer.flatten(tensors), _cat(tensors))


def test_other_optimizers_are_left_alone():
    assert not install_foreach_flatten(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
