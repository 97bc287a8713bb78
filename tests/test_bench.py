"""The throughput benchmarks' timing and the engine mode of tools/bench_train.py (CPU)."""

import time

import pytest

from m2dist.bench.train import benchmark_engine_step, format_row, speedups_over, time_steps


def test_warm_up_lasts_until_the_step_time_is_stable():
    # A step that is slow for its first 7 calls (compilation, autotuning) and fast after: the
    # warm-up runs on until two windows agree, and the result is the fast time.
    calls = []

    def step():
        calls.append(None)
        time.sleep(0.02 if len(calls) <= 7 else 0.002)

    seconds = time_steps(step, steps=5)
    # Far below the slow calls' 20 ms, also on a loaded machine.
    assert seconds < 0.01, seconds
    assert len(calls) >= 3 * 5 + 5  # windows slow, mixed, fast at least; then the timed steps


@pytest.mark.slow
def test_engine_mode_times_the_training_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    result = benchmark_engine_step("debug (engine)", "debug", seq_len=32, batch_size=4, steps=2)
    assert not result.error
    assert result.batch_size == 4 and result.seq_len == 32
    assert result.tokens_per_s == pytest.approx(4 * 32 / (result.step_ms / 1000), rel=1e-6)
    row = format_row(result, speedups_over([result], "debug")[32])
    assert row.startswith("| debug (engine) | 32 | 4 |") and "| 1.00x |" in row
    # The run folder was temporary: nothing is left behind.
    assert not list(tmp_path.glob("m2dist-engine-bench-*"))
