"""The ZeRO 1-2 step without host syncs: the same training as DeepSpeed's step, no host read of the
gradient norm, a step with a non-finite gradient skipped on the device, and no device
synchronization by DeepSpeed's timers."""

import functools
import math

import pytest
import torch

import m2dist.engine.trainer as trainer_module
from m2dist.config import load_config
from m2dist.engine.device_overflow import install_device_overflow_check


class HostReads:
    """Counts calls that read a tensor's value on the host (each a device sync on a GPU)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))
        self.active = False

    def _counting(self, original):
        def read(tensor, *args, **kwargs):
            self.count += self.active
            return original(tensor, *args, **kwargs)

        return read


def _trainer(tmp_path, zero_stage, grad_clip=1.0, device="cpu"):
    config = load_config(
        "debug",
        [
            f"train.zero_stage={zero_stage}", f"train.device={device}", "train.duration=4",
            "train.global_batch_size=4", "train.seq_len=32", f"train.grad_clip={grad_clip}", "train.compile=false",
            "tracking.enabled=false", "data.num_workers=0", f"train.output_dir={tmp_path}",
        ],
    )  # fmt: skip
    return trainer_module.Trainer(config)


def _poison_next_backward(trainer):
    """A NaN gradient for one parameter in the next backward; returns the hook's handle."""
    param = next(p for p in trainer.engine.module.parameters() if p.requires_grad)
    return param.register_hook(lambda grad: grad * float("nan"))


def _state(trainer):
    weights = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    inner = trainer.engine.optimizer.optimizer
    steps = [float(inner.state[p]["step"]) for group in inner.param_groups for p in group["params"] if p in inner.state]
    return weights, steps


def _run(tmp_path, zero_stage, device_check, device):
    """Two finite steps, one with a NaN gradient, one more: per step the loss, the gradient norm
    and the weights after it; and the optimizer's step counts after the poisoned step."""
    trainer = _trainer(tmp_path, zero_stage, device=device)
    installed = isinstance(trainer.engine.optimizer.scaled_global_norm, functools.partial)
    assert installed == device_check
    record = []
    try:
        for step in range(4):
            handle = _poison_next_backward(trainer) if step == 2 else None
            loss, _ = trainer.train_step()
            if handle is not None:
                handle.remove()
            weights, adam_steps = _state(trainer)
            record.append((float(loss), float(trainer._grad_norm()), weights, adam_steps))
    finally:
        trainer.close()
    return record


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_sync_free_step_trains_as_deepspeeds_and_skips_a_nonfinite_step(
    tmp_path, zero_stage, device, in_process_rank, monkeypatch
):
    ours = _run(tmp_path / "device", zero_stage, device_check=True, device=device)
    monkeypatch.setattr(trainer_module, "install_device_overflow_check", lambda optimizer: False)
    deepspeeds = _run(tmp_path / "host", zero_stage, device_check=False, device=device)
    # Finite steps: the same losses, norms and weights; bit for bit on the CPU, to fp32 rounding on
    # a GPU, whose kernels' atomic sums make two runs of the same step differ in the last bits.
    exact = device == "cpu"
    for step in (0, 1):
        assert ours[step][0] == deepspeeds[step][0]
        assert ours[step][1] == (deepspeeds[step][1] if exact else pytest.approx(deepspeeds[step][1], rel=1e-5))
        for name, tensor in deepspeeds[step][2].items():
            if exact:
                assert torch.equal(ours[step][2][name], tensor), (step, name)
            else:
                torch.testing.assert_close(ours[step][2][name], tensor, msg=f"step {step}, {name}")
    # The poisoned step: both report an infinite norm and leave the weights and Adam's step count.
    for run in (ours, deepspeeds):
        assert math.isinf(run[2][1]), run[2][1]
        assert run[2][3] == run[1][3]
        for name, tensor in run[1][2].items():
            assert torch.equal(run[2][2][name], tensor), name
    # Training goes on: finite, and the weights move again.
    assert math.isfinite(ours[3][0]) and math.isfinite(ours[3][1])
    assert ours[3][3] == [s + 1 for s in ours[2][3]]
    assert any(not torch.equal(ours[3][2][k], v) for k, v in ours[2][2].items())


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_sync_free_step_reads_nothing_on_the_host(tmp_path, grad_clip, in_process_rank, monkeypatch):
    """DeepSpeed's own step reads the norm on the host (4 times a step with clipping); ours never."""
    trainer = _trainer(tmp_path, zero_stage=1, grad_clip=grad_clip)
    reads = HostReads(monkeypatch)
    try:
        trainer.train_step()
        reads.active = True
        trainer.train_step()
        reads.active = False
    finally:
        trainer.close()
    assert reads.count == 0


def test_host_read_counter_sees_deepspeeds_checks(tmp_path, in_process_rank, monkeypatch):
    """The counter above can fail: with DeepSpeed's step it counts the norm's host reads."""
    monkeypatch.setattr(trainer_module, "install_device_overflow_check", lambda optimizer: False)
    trainer = _trainer(tmp_path, zero_stage=1)
    reads = HostReads(monkeypatch)
    try:
        reads.active = True
        trainer.train_step()
    finally:
        trainer.close()
    assert reads.count >= 2


class DeviceSyncs:
    """Counts the accelerator's device synchronizations (DeepSpeed's timers call them)."""

    def __init__(self, monkeypatch):
        from deepspeed.accelerator import get_accelerator

        self.count = 0
        accelerator = get_accelerator()
        original = accelerator.synchronize

        def synchronize(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(accelerator, "synchronize", synchronize)


def _syncs_in_steps(tmp_path, monkeypatch) -> int:
    """Device synchronizations in steps 3-5 (DeepSpeed's throughput timer starts at its third step)."""
    trainer = _trainer(tmp_path, zero_stage=1)
    try:
        for _ in range(2):
            trainer.train_step()
        syncs = DeviceSyncs(monkeypatch)
        for _ in range(3):
            trainer.train_step()
    finally:
        trainer.close()
    return syncs.count


def test_step_never_waits_for_the_device(tmp_path, in_process_rank, monkeypatch):
    """No device synchronization inside the step, so the host can queue the next step's kernels
    while the GPU runs this one's."""
    assert _syncs_in_steps(tmp_path, monkeypatch) == 0


def test_sync_counter_sees_deepspeeds_throughput_timer(tmp_path, in_process_rank, monkeypatch):
    """The counter above can fail: DeepSpeed's default throughput timer synchronizes twice a step."""
    build = trainer_module.build_deepspeed_config

    def with_default_timers(*args, **kwargs):
        return {k: v for k, v in build(*args, **kwargs).items() if k != "timers"}

    monkeypatch.setattr(trainer_module, "build_deepspeed_config", with_default_timers)
    assert _syncs_in_steps(tmp_path, monkeypatch) >= 3


def test_other_optimizers_are_left_alone():
    assert not install_device_overflow_check(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
