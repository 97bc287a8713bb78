"""The training log's throughput meter (m2dist.engine.metrics.ThroughputMeter)."""

import pytest
import torch

from m2dist.engine import metrics


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_leaves_out_the_first_window_with_its_one_off_costs(monkeypatch):
    """A first window with 60 s of compilation, then 1 s a step: the ETA after the second window
    counts 1 s a step, not the first window's average; tokens/s is per window."""
    clock = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    meter = metrics.ThroughputMeter(100, 1, 6.0, None, torch.device("cpu"))
    for step in range(10):
        clock.now += 61.0 if step == 0 else 1.0
        meter.record_step(0.0)
    first = meter.summary(steps_left=90)
    assert first["time/eta_s"] == pytest.approx(90 * 7.0)  # (61 + 9) s over 10 steps: all there is yet
    assert first["throughput/tokens_per_s"] == pytest.approx(1000 / 70)
    for _ in range(10):
        clock.now += 1.0
        meter.record_step(0.25)
    second = meter.summary(steps_left=80)
    assert second["time/eta_s"] == pytest.approx(80.0)
    assert second["throughput/tokens_per_s"] == pytest.approx(100.0)
    assert second["throughput/data_wait_pct"] == pytest.approx(25.0)
