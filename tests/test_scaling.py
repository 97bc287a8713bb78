"""The scaling and all-reduce tools on CPU: the sweep's table and the resume check's three runs from
the runs' metrics (with a stand-in launcher), and the all-reduce benchmark under torchrun."""

import json
import subprocess
import sys

import pytest

from m2dist.bench.allreduce import bus_bandwidth, parse_size, size_range
from m2dist.engine.metrics import METRICS_FILE
from m2dist.bench.scaling import RunFailed, run_resume_check, run_scaling
from tests.conftest import REPO_ROOT
from tests.test_engine import _env, _free_port

# Writes metrics.jsonl records instead of training: the tools' orchestration in a second.
FAKE_LAUNCHER = f"{sys.executable} {REPO_ROOT / 'tests' / 'fake_launcher.py'}"


def test_bus_bandwidth_is_nccl_tests_definition():
    assert bus_bandwidth(100.0, 1) == 0.0
    assert bus_bandwidth(100.0, 2) == pytest.approx(100.0)
    assert bus_bandwidth(100.0, 8) == pytest.approx(175.0)
    with pytest.raises(ValueError, match="world_size"):
        bus_bandwidth(1.0, 0)
    assert size_range(parse_size("1M"), parse_size("1G")) == [2**k for k in range(20, 31)]
    assert parse_size("64KiB") == 65536
    with pytest.raises(ValueError, match="64X"):
        parse_size("64X")


@pytest.mark.slow
def test_all_reduce_benchmark_on_two_gloo_processes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    args = ["--min-bytes", "64K", "--max-bytes", "1M", "--factor", "4", "--repeats", "3", "--warmup", "1"]
    result = subprocess.run(
        [*torchrun, str(REPO_ROOT / "tools" / "bench_allreduce.py"), *args], cwd=tmp_path, env=_env(tmp_path),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "over 2 ranks, backend gloo" in result.stdout
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "iB" in line]
    assert [row[0].strip() for row in rows] == ["64 KiB", "256 KiB", "1 MiB"], result.stdout
    for _, _, algbw, busbw in rows:
        # 2 ranks: busbw = algbw x 2(2-1)/2.
        assert float(algbw) > 0 and float(busbw) == float(algbw)


def test_bad_gpu_count_and_failed_run_name_the_run_and_its_log(tmp_path):
    with pytest.raises(ValueError, match="--gpus: expected GPU counts in \\[1, "):
        run_scaling(["debug"], [1, 100_000], [2], [64], steps=2, log_every=1, work_dir=tmp_path / "a", progress=False)
    launcher = tmp_path / "deepspeed"
    launcher.write_text("#!/bin/sh\necho 'rank 0: CUDA out of memory' >&2\nexit 3\n")
    launcher.chmod(0o755)
    with pytest.raises(RunFailed, match="debug_L64_zero2_gpus1 failed") as failure:
        run_scaling(
            ["debug"], [1], [2], [64], steps=2, log_every=1, work_dir=tmp_path / "b", launcher=str(launcher),
            progress=False,
        )  # fmt: skip
    log = tmp_path / "b" / "debug_L64_zero2_gpus1.log"
    assert str(log) in str(failure.value) and "CUDA out of memory" in str(failure.value)
    assert "train.zero_stage=2" in log.read_text()


def test_scaling_sweep_table_from_the_runs_metrics(tmp_path):
    # With the stand-in launcher (the engine's metrics.jsonl is checked in test_engine.py): each
    # point's tokens/s is the mean after the first window, efficiency is relative to 1 GPU.
    points, root = run_scaling(
        ["debug"], [2, 1], [2], [64], tokens_per_gpu=256, steps=3, log_every=1, work_dir=tmp_path / "sweep",
        launcher=FAKE_LAUNCHER, progress=False,
    )  # fmt: skip
    shapes = [(p.run.num_gpus, p.run.micro_batch_size, p.run.zero_stage, p.run.seq_len) for p in points]
    assert shapes == [(1, 4, 2, 64), (2, 4, 2, 64)]
    assert [p.tokens_per_s for p in points] == pytest.approx([1000.0, 1000.0 * 2**0.9])
    assert [p.peak_memory_gib for p in points] == pytest.approx([1.3, 1.3])
    assert points[0].efficiency == pytest.approx(1.0)
    assert points[1].efficiency == pytest.approx(2**0.9 / 2)
    log = (root / "debug_L64_zero2_gpus2.log").read_text()
    assert "--num_gpus 2" in log and "train.micro_batch_size=4" in log and "train.global_batch_size=8" in log
    table = (root / "scaling.md").read_text().splitlines()
    assert table[0].startswith("| model | L | ZeRO | GPUs |")
    assert [line.split(" | ")[3] for line in table[2:]] == ["1", "2"]
    assert f"{100 * points[1].efficiency:.1f}%" in table[3]
    saved = json.loads((root / "scaling.json").read_text())
    assert saved[1]["efficiency"] == pytest.approx(points[1].efficiency) and saved[1]["num_gpus"] == 2


def test_resume_check_runs_and_compares_the_three_runs(tmp_path):
    # The orchestration, with a launcher that writes metrics instead of training (the engine's own
    # resume onto fewer ranks through a universal checkpoint is tested in test_engine.py and
    # test_convert.py): the stopped run stops at the step, the resumed one appends on 1 rank, both
    # keep the global batch, and the losses after the resume are compared step by step.
    check, root = run_resume_check(
        "debug", 2, 1, 2, steps=4, zero_stage=2, seq_len=64, tokens_per_gpu=256,
        work_dir=tmp_path / "resume", launcher=FAKE_LAUNCHER,
        progress=False,
    )  # fmt: skip
    lines = (root / "resumed" / METRICS_FILE).read_text().splitlines()
    assert [(r["step"], r["world_size"]) for r in map(json.loads, lines)] == [(1, 2), (2, 2), (3, 1), (4, 1)]
    assert check.steps == [3, 4]
    assert check.max_relative_difference == 0.0
    logs = {name: (root / f"{name}.log").read_text() for name in ("uninterrupted_gpus2", "stopped_at_2_gpus2", "resumed_gpus1")}
    assert "train.stop_after=2" in logs["stopped_at_2_gpus2"] and "train.stop_after" not in logs["resumed_gpus1"]
    assert all("train.global_batch_size=8" in log for log in logs.values())
    assert "relative loss difference max" in (root / "resume.md").read_text()
