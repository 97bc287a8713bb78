"""The throughput benchmarks' timing and the engine mode of tools/bench_train.py (CPU)."""

import dataclasses
import os
import subprocess
import sys
import time

import pytest

from m2dist.bench.train import time_steps
from tests.conftest import REPO_ROOT


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
def test_engine_mode_times_the_training_engine(tmp_path):
    # The tool as users run it, in its own process: the engine joins a process group and fills the
    # launcher's variables in the environment, which must not leak into other tests' launches.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    # Without loader workers (the benchmark keeps the config's, as training does: starting them on a
    # 2-core machine took this test from 12 s to 58 s).
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "bench_train.py"), "--configs", "debug:data.num_workers=0",
           "--seq-lens", "32", "--tokens-per-step", "128", "--steps", "2", "--engine"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout[out.stdout.index("| model | L | batch | tokens/s | vs bert-base |") :]
    row = next(line for line in table.splitlines() if line.startswith("| debug (engine, data.num_workers=0) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    seq_len, batch, tokens_per_s, step_ms = int(cells[1]), int(cells[2]), float(cells[3].replace(",", "")), float(cells[5])
    assert (seq_len, batch) == (32, 4)
    assert tokens_per_s == pytest.approx(batch * seq_len / (step_ms / 1000), rel=0.01)
    # The run folder was temporary: nothing is left behind.
    assert not list(tmp_path.glob("m2dist-engine-bench-*"))


def test_finetune_benchmark_times_the_glue_step_on_cpu():
    import torch

    from m2dist.bench.finetune import FinetuneCase, benchmark_finetune_steps, format_row, glue_config_for

    glue = glue_config_for("debug")
    cases = [FinetuneCase("debug", glue), FinetuneCase("debug", glue, ("model.kernels.fused_mixer=true",))]
    result, with_overrides = benchmark_finetune_steps(
        cases, 4, True, torch.device("cpu"), seq_len=32, first_steps=2, block_steps=1, rounds=2
    )
    assert result.cuda_graph is False  # no CUDA graph on a CPU: the eager step was timed
    assert result.step_ms > 0 and result.epoch_seconds(11_573) == pytest.approx(2894 * result.step_ms / 1000)
    assert format_row(result).startswith("| debug | 4 | eager | ")
    assert with_overrides.model == "debug, model.kernels.fused_mixer=true"


def test_finetune_benchmark_times_the_models_in_turn(monkeypatch):
    # Each model is warmed up alone, then the timed blocks alternate between the models, so that
    # both are timed in the same stretch of the run; a row is the median of its blocks.
    import types

    import torch

    from m2dist.bench import finetune

    calls, per_step = [], {"a": [1.0, 1.0, 9.0], "b": [2.0, 3.0, 2.0]}

    def fake_runner(name, glue, batch_size, cuda_graph, device, seq_len, overrides):
        def run(n):
            calls.append((name, n))
            timed = len([c for c in calls if c == (name, 4)])
            return n * (per_step[name][timed - 1] if n == 4 else 5.0) / 1000
        return run, types.SimpleNamespace(graph=None), seq_len

    monkeypatch.setattr(finetune, "_finetune_runner", fake_runner)
    glue = finetune.glue_config_for("debug")
    cases = [finetune.FinetuneCase("a", glue), finetune.FinetuneCase("b", glue, ("model.x=1",))]
    results = finetune.benchmark_finetune_steps(cases, 4, False, torch.device("cpu"), 32, first_steps=1, block_steps=2, rounds=3)
    # warm-up: the first steps, then two blocks that agree
    assert calls[:6] == [("a", 1), ("a", 2), ("a", 2), ("b", 1), ("b", 2), ("b", 2)]
    assert calls[6:] == [("a", 4), ("b", 4)] * 3
    assert [r.model for r in results] == ["a", "b, model.x=1"]
    assert [r.step_ms for r in results] == pytest.approx([1.0, 2.0])
    assert results[0].first_overhead_s == pytest.approx(0.005 - 0.001)


def test_concurrent_finetune_jobs_share_the_device():
    # Two processes fine-tune at once on the CPU, as --jobs-per-device 2 runs them on a GPU: the
    # device's time per step is positive, and a job that fails is reported, not waited for.
    import torch

    from m2dist.bench.finetune import concurrent_step_ms, format_concurrent, glue_config_for

    glue = glue_config_for("debug")
    shared_ms = concurrent_step_ms("debug", glue, 4, False, torch.device("cpu"), 2, seq_len=32, warmup=1, steps=2)
    assert 0 < shared_ms < 60_000
    assert format_concurrent("debug", "graph", 4, 2, 5.0, 8.0) == "| debug | CUDA graph | 4 | 2 | 5.00 | 1.60x |"
    with pytest.raises(RuntimeError, match="a concurrent fine-tuning job of debug at batch 4 failed: .*model.no_such_key"):
        concurrent_step_ms("debug", glue, 4, False, torch.device("cpu"), 2, seq_len=32, warmup=1, steps=1,
                           overrides=("model.no_such_key=1",))  # fmt: skip


def test_finetune_benchmark_writes_a_profile_of_the_step(tmp_path):
    import torch

    from m2dist.bench.finetune import FinetuneCase, benchmark_finetune_steps, glue_config_for

    report = tmp_path / "profiles" / "finetune-debug-b4.txt"
    case = FinetuneCase("debug", glue_config_for("debug"), profile_to=report)
    (result,) = benchmark_finetune_steps([case], 4, False, torch.device("cpu"), seq_len=32, first_steps=1, block_steps=1, rounds=1)
    text = report.read_text()
    assert text.startswith(f"fine-tuning step of debug: batch 4, L=32, eager; {result.step_ms:.2f} ms a step unprofiled")
    assert "Top operators by self device time" in text and "aten::" in text
    assert "device time per step (sum of kernels)" in text.splitlines()[0]


def test_whole_glue_estimate_adds_every_job_and_waits_for_mnli():
    import math

    from m2dist.bench.finetune import TRAIN_EXAMPLES, glue_wall_time
    from m2dist.glue.config import load_glue_config

    glue = load_glue_config("default")
    step_ms = {16: 10.0, 32: 20.0, 48: 30.0}
    overhead = {16: 1.0, 32: 2.0, 48: 3.0}

    def job(task):
        s = getattr(glue.tasks, task)
        return s.epochs * math.ceil(TRAIN_EXAMPLES[task] / s.batch_size) * step_ms[s.batch_size] / 1000 + overhead[s.batch_size]

    tasks = ["mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte"]
    total = sum(job(t) * len(getattr(glue.tasks, t).seeds) for t in tasks)
    assert glue_wall_time(glue, step_ms, overhead, devices=1) == pytest.approx(total)
    eight = glue_wall_time(glue, step_ms, overhead, devices=8)
    # The MNLI-initialised tasks start after MNLI: never sooner than MNLI plus the longest of them.
    assert eight >= job("mnli") + max(job(t) for t in ("stsb", "mrpc", "rte")) - 1e-9
    assert total / 8 <= eight < total


def test_a_benchmark_variant_names_its_kernels_and_overrides():
    from m2dist.bench.train import engine_config, kernel_config, split_config_spec
    from m2dist.config import load_config

    assert kernel_config("fused").fused_mixer and kernel_config("fused").fftconv == "triton"
    assert not kernel_config("reference").fused_mixer
    name, overrides = split_config_spec("debug:model.kernels.fused_mixer=true,train.compile=true")
    assert (name, overrides) == ("debug", ("model.kernels.fused_mixer=true", "train.compile=true"))
    assert split_config_spec("bert-base") == ("bert-base", ())
    config = engine_config(name, 32, 4, "/tmp/unused", overrides)
    assert config.model.kernels.fused_mixer and config.train.compile
    # the loader runs as in training, with the config's workers (not in the timed step)
    assert config.data.num_workers == load_config("debug").data.num_workers > 0
    # full rows of real tokens at every length: no padding for the models to compute, no attention mask
    assert config.data.embedded_mode == "concat" and load_config("debug").data.embedded_mode == "pad"


def test_mixer_benchmark_times_every_path(monkeypatch):
    # On the CPU (Triton's interpreter) with a stand-in timer: every path runs forward and
    # backward, the fused one once per block variant, each against the traffic floor.
    import m2dist.bench.kernels as bench

    timed = []

    def one_call(fn):
        fn()
        timed.append(fn)
        return 2.0

    monkeypatch.setattr(bench, "_bench", one_call)
    from kernels.mixer import triton_short_conv

    short_convs = []
    kernel = triton_short_conv.causal_short_conv_and_layout
    monkeypatch.setattr(triton_short_conv, "causal_short_conv_and_layout", lambda *a: (short_convs.append(1), kernel(*a))[1])
    from kernels.fftconv import triton_cufft

    cufft_calls = []
    cufft_min_len = bench.kernels.fftconv.CUFFT_MIN_LEN
    cufft = triton_cufft.packed_gated_long_conv
    monkeypatch.setattr(triton_cufft, "packed_gated_long_conv", lambda *a: (cufft_calls.append(1), cufft(*a))[1])
    rows = bench.bench_mixer([32], 64, [16], [(16, 16, 1, 4), (16, 32, 2, 4)], copy_bw=1e9, device="cpu")
    assert [r[1] for r in rows] == [
        "reference", "per op", "per op, cuFFT transforms", "per op, compiled short conv",
        "fused BD=16 BF=16 BPP=1 w=4", "fused BD=16 BF=32 BPP=2 w=4",
    ]  # fmt: skip
    floor_ms = bench.triton_mixer.mixer_traffic_bytes(64, 16)["forward_backward"] / 1e9 * 1e3
    assert rows[4][5] == pytest.approx(2.0 / floor_ms) and rows[4][6] == pytest.approx(1.0)
    assert len(timed) == 12 and bench.triton_mixer.BLOCKS is None
    # the short convolution's kernels on both per-op rows (forward, then forward + backward), the
    # cuFFT path on its own row only, its switch restored after
    assert len(short_convs) == 4 and bench.kernels.mixer.TRITON_SHORT_CONV
    assert len(cufft_calls) == 2 and bench.kernels.fftconv.CUFFT_MIN_LEN == cufft_min_len
    # Beyond the length where "auto" leaves the FFT kernels, the default path gets a row of its own.
    monkeypatch.setattr(bench.kernels.fftconv, "AUTO_TRITON_MAX_LEN", 16)
    rows = bench.bench_mixer([32], 64, [16], [], copy_bw=1e9, device="cpu")
    assert [r[1] for r in rows][:3] == ["reference", "per op", "per op, torch.fft (default)"]
    # Where the default takes the cuFFT path (beyond that length too), the other row is the
    # DFT-matmul kernels'. (D = 16: 3D = 48 would pass a threshold of 40 where L = 32 does not.)
    # The cuFFT path's calls: the default rows' (per op, compiled short conv) or its own row's.
    for threshold, row, calls in ((32, "per op, DFT-matmul kernels", 4), (40, "per op, cuFFT transforms", 2)):
        monkeypatch.setattr(bench.kernels.fftconv, "CUFFT_MIN_LEN", threshold)
        cufft_calls.clear()
        rows = bench.bench_mixer([32], 64, [16], [], copy_bw=1e9, device="cpu")
        labels = [r[1] for r in rows]
        assert row in labels and ("per op, torch.fft (default)" in labels) == (threshold > 32)
        assert len(cufft_calls) == calls
        assert bench.kernels.fftconv.CUFFT_MIN_LEN == threshold


def test_blockdiag_gemm_benchmark_times_both_engines(monkeypatch):
    # Interpreter, stand-in timer: each plain GEMM once per engine, then the fused GLU forward
    # beside cuBLAS's up-projection; the rates come from the GEMM's FLOPs and the timings.
    import torch

    import m2dist.bench.kernels as bench

    calls = []

    def one_call(fn):
        calls.append(fn())
        return 4.0 if len(calls) % 2 else 2.0  # Triton first, then cuBLAS

    monkeypatch.setattr(bench, "_bench", one_call)
    rows = bench.bench_blockdiag_gemms([64], [32], gemm_rate=1e12, device="cpu")
    names = [r[1] for r in rows]
    assert names[:3] == ["output projection, forward", "output projection, input gradient", "output projection, weight gradient"]
    assert len(rows) == 6 and len(calls) == 12
    # the weight gradients come back in fp32, (blocks, out/blocks, in/blocks)
    assert calls[4].dtype == calls[5].dtype == torch.float32 and tuple(calls[4].shape) == (4, 16, 64)
    line = bench._fmt_gemm(rows[0])  # 2 x 32 x 256 x 64 / 4 FLOPs in 2 ms on cuBLAS
    assert line.endswith("| 2.00x |") and f"| {2 * 32 * 256 * 64 / 4 / 2e-3 / 1e12:.0f} |" in line


def test_glu_row_lists_every_variant():
    import m2dist.bench.kernels as bench

    row = ("d=64 I=256 M=32", 2.0, 1.0, 2.0, 1.5, 100.0, 0.25, None, None, 2.5, 1.25, 1.1, 0.9, 1.05, 1.15)
    assert bench._fmt_glu(row) == (
        "| d=64 I=256 M=32 | 2.000 | 1.000 | 2.00x | 1.50x | 100 | 25.0% | - | - | 2.500 | 1.250 | 2.00x | 1.100 | 0.900 | 1.050"
        " | 1.150 |"
    )


def test_glu_tile_sweep_times_each_tile_and_marks_the_candidates(monkeypatch):
    import m2dist.bench.kernels as bench

    monkeypatch.setattr(bench, "_SWEEP_TILES", [(16, 16, 4)])
    times = iter([3.0, 1.0, 2.0, 1.5, 1.0, 1.0, 5.0, 5.0])
    monkeypatch.setattr(bench, "_bench", lambda fn: (fn(), next(times))[1])
    rows = bench.sweep_glu_tiles(64, 32, top=3, device="cpu")
    # four configs (BK 32/64 x 2/3 stages), the three fastest forward + backward, fastest first
    assert [r[0] for r in rows] == [(16, 16, 64, 4, 2), (16, 16, 32, 4, 3), (16, 16, 32, 4, 2)]
    assert bench._fmt_sweep(rows[0], {(16, 16, 64, 4, 2)}).endswith("| 2.000 | yes |")


def test_act_tile_sweep_times_both_kernels_at_each_tile_and_the_default(monkeypatch):
    # Interpreter, tiny sizes: both activation kernels launch at each tile and at the default.
    import m2dist.bench.kernels as bench

    monkeypatch.setattr(bench, "_ACT_SWEEP", [dict(rows=16, cols=32), dict(rows=32, cols=32, warps=2)])
    times = iter([3.0, 3.0, 1.0, 2.0, 4.0, 4.0])
    monkeypatch.setattr(bench, "_bench", lambda fn: (fn(), next(times))[1])
    rows = bench.sweep_glu_act_tiles(8, 64, copy_bw=1e6, top=1, device="cpu")
    # the fastest of the two tiles, then the default (8 x 64 x 2 bytes: 3 moved forward, 5 backward)
    assert [(r[0], r[1], r[2]) for r in rows] == [(dict(rows=32, cols=32, warps=2), 1.0, 2.0), ({}, 4.0, 4.0)]
    assert rows[0][3] == 3 * 64 * 32 * 2 / 1e-3 / 1e6
    assert bench._fmt_act_sweep(rows[0]) == "| rows=32, cols=32, warps=2 | 1000.0 | 2000.0 | 1229% | 1024% |"
    assert bench._fmt_act_sweep(rows[1]).startswith("| default | 4000.0 |")


def test_conv_block_sweep_times_each_kernel_at_each_block_choice(monkeypatch):
    # Interpreter, tiny channels: every kernel launches at the default blocks and at each choice.
    import m2dist.bench.kernels as bench

    monkeypatch.setattr(
        bench, "_CONV_SWEEP",
        {
            "forward": [dict(rows_fwd=16, cols_fwd=32), dict(rows_fwd=16, cols_fwd=64, target_programs=1)],
            "input gradients": [dict(rows_bwd=16, cols_bwd=32)],
            "filter gradients": [dict(rows_filter=16, blk_filter=32), dict(rows_filter=64, blk_filter=32)],
            "short conv forward": [dict(rows_fwd=32, cols_fwd=64, warps_fwd=8)],
            "short conv backward": [dict(rows=32, cols=16), dict(target_programs=1)],
        },
    )  # fmt: skip
    times = iter([4.0, 2.0, 1.0, 3.0, 3.0, 5.0, 6.0, 4.0, 2.0, 1.5, 2.0, 3.0, 1.0])
    monkeypatch.setattr(bench, "_bench", lambda fn: (fn(), next(times))[1])
    rows = bench.sweep_conv_blocks(2, 128, [16], top=2, device="cpu")
    assert [(r[1], r[3], r[4]) for r in rows] == [
        ("forward", 1.0, 4.0), ("forward", 2.0, 4.0), ("input gradients", 3.0, 3.0),
        ("filter gradients", 4.0, 5.0), ("filter gradients", 6.0, 5.0), ("short conv forward", 1.5, 2.0),
        ("short conv backward", 1.0, 2.0), ("short conv backward", 3.0, 2.0),
    ]  # fmt: skip
    assert rows[0][2] == dict(rows_fwd=16, cols_fwd=64, target_programs=1)
    assert rows[5][2] == dict(rows_fwd=32, cols_fwd=64, warps_fwd=8)
    assert rows[6][2] == dict(target_programs=1)
    expected = "| 16 | forward | rows_fwd=16, cols_fwd=64, target_programs=1 | 1000.0 | 4000.0 | 4.00x |"
    assert bench._fmt_conv_sweep(rows[0]) == expected


def test_conv_block_sweep_times_only_the_kernels_named(monkeypatch):
    import runpy

    import m2dist.bench.kernels as bench

    monkeypatch.setattr(bench, "_CONV_SWEEP", {**bench._CONV_SWEEP, "filter gradients": [dict(rows_filter=64)]})
    monkeypatch.setattr(bench, "_bench", lambda fn: (fn(), 1.0)[1])
    rows = bench.sweep_conv_blocks(2, 128, [16], device="cpu", kernels=["filter gradients"])
    assert [(r[1], r[2]) for r in rows] == [("filter gradients", dict(rows_filter=64))]
    with pytest.raises(ValueError, match="unknown convolution kernels \\['backward'\\]"):
        bench.sweep_conv_blocks(2, 128, [16], device="cpu", kernels=["backward"])
    # the tool refuses a wrong name before it touches a GPU
    monkeypatch.setattr("sys.argv", ["bench_kernels.py", "--conv-sweep", "16", "--conv-kernels", "forward,backward"])
    with pytest.raises(SystemExit, match="--conv-kernels: expected a comma list of forward, input gradients"):
        runpy.run_path(str(REPO_ROOT / "tools" / "bench_kernels.py"), run_name="__main__")


def test_device_idle_finds_the_gaps_between_kernels_and_the_host_work_in_them():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from m2dist.bench.profile import device_idle, format_device_idle

    def event(name, start, end, device=DeviceType.CUDA, parent=None, annotation=False):
        return SimpleNamespace(
            name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device, cpu_parent=parent,
            is_user_annotation=annotation,
        )  # fmt: skip

    step = event("train_step", 0, 1000, DeviceType.CPU)
    events = [
        event("fwd", 100, 300), event("overlapping copy", 250, 320), event("inside", 260, 280),
        event("CompiledFunction", 100, 900, annotation=True),  # a range on the device's timeline, not work
        event("bwd", 330, 500),  # 10 us after the copy: idle, but not a long gap
        event("adamw", 700, 760), event("norm", 800, 900),  # 200 and 40 us gaps
        step, event("optimizer step", 520, 690, DeviceType.CPU), event("cudaLaunchKernel", 690, 695, DeviceType.CPU, step),
        event("zero-length", 950, 950),
    ]  # fmt: skip
    idle = device_idle(events, top=1, min_gap_us=20)
    assert (idle.window_us, idle.busy_us, idle.idle_us) == (800, 550, 250)
    assert (idle.long_gaps, idle.long_gap_us) == (2, 240)
    (gap,) = idle.gaps
    assert (gap.start_us, gap.end_us, gap.before, gap.after) == (500, 700, "bwd", "adamw")
    # outermost host operators only (the launch inside the step is not listed on its own)
    assert gap.host == (("train_step", 200), ("optimizer step", 170))
    text = format_device_idle(idle, steps=2)
    assert text.startswith("Device idle between its first and last event: 0.12 ms a step of 0.40 (31.2%)")
    assert "200 us after bwd until adamw; host: train_step 200 us; optimizer step 170 us" in text
    assert device_idle([step]) is None


def test_aten_by_input_shape_ranks_eager_operators_by_their_kernels_time_per_step():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from m2dist.bench.profile import aten_by_input_shape, format_aten_by_input_shape

    def avg(key, shapes, count, device_us, device=DeviceType.CPU):
        return SimpleNamespace(key=key, input_shapes=shapes, count=count, device_time_total=device_us, device_type=device)

    averages = [
        avg("aten::copy_", [[256, 768, 128], [256, 768, 128]], 24, 1700.0),
        avg("aten::copy_", [[768, 3], [768, 3]], 24, 60.0),
        avg("aten::view", [[4, 4]], 10, 0.0),  # launches nothing
        avg("elementwise_kernel", [], 24, 1700.0, DeviceType.CUDA),  # a kernel, not an operator
        avg("## Call CompiledFxGraph", [], 2, 9000.0),  # not aten
    ]
    rows = aten_by_input_shape(averages, steps=2)
    assert [(r.name, r.calls, r.device_us) for r in rows] == [("aten::copy_", 12, 850.0), ("aten::copy_", 12, 30.0)]
    assert rows[0].shapes == "[[256, 768, 128], [256, 768, 128]]"
    assert aten_by_input_shape(averages, steps=2, top=1) == rows[:1]
    text = format_aten_by_input_shape(rows)
    assert "    850.0 us    12.0 calls  aten::copy_ [[256, 768, 128], [256, 768, 128]]" in text


def test_kernels_by_kind_sums_each_kind_per_step_with_the_projects_triton_kernels_by_module():
    from types import SimpleNamespace

    from m2dist.bench.profile import format_kernels_by_kind, kernel_kind, kernels_by_kind

    def avg(key, device_us, count):
        return SimpleNamespace(key=key, self_device_time_total=device_us, count=count)

    conv, glu = kernel_kind("_bwd_inputs_kernel"), kernel_kind("_glu_act_fwd_kernel")
    assert conv.startswith("M2 convolution") and glu.startswith("block-diagonal GLU")
    for forward in ("_toeplitz_fwd_kernel", "_dft_conv_fwd_kernel", "_short_conv_fwd_kernel", "_mixer_fwd_kernel"):
        assert kernel_kind(forward) == conv
    assert kernel_kind("_spectra_kernel") == conv  # the cuFFT path's own kernels
    assert kernel_kind("void vector_fft_symm_r2c<16384u, EPT<32u>, 1u, 0u, (padding_t)0>").startswith("cuFFT")
    assert kernel_kind("_channels_last_kernel") == "layout transposes (Triton)"
    assert kernel_kind("sm80_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize64x64x8") == "fp32 GEMMs (the filter MLPs)"
    assert kernel_kind("void at::native::elementwise_kernel<128, 2, ...>").startswith("strided elementwise")
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<8, ...>").startswith("other elementwise")
    averages = [
        avg("_toeplitz_fwd_kernel", 2000.0, 48), avg("_bwd_inputs_kernel", 1000.0, 24), avg("_glu_act_fwd_kernel", 600.0, 24),
        avg("nvjet_sm90_tst_96x128_64x6_2x1_v_bz_NNN", 2400.0, 96), avg("a mystery kernel", 20.0, 2),
    ]  # fmt: skip
    rows = kernels_by_kind(averages, steps=2)
    assert [(r.kind, r.device_us, r.launches) for r in rows] == [
        (conv, 1500.0, 36), ("GEMMs (cuBLAS)", 1200.0, 48), (glu, 300.0, 12), ("other", 10.0, 1),
    ]  # fmt: skip
    assert [(k.name, k.device_us, k.launches) for k in rows[0].kernels] == [
        ("_toeplitz_fwd_kernel", 1000.0, 24), ("_bwd_inputs_kernel", 500.0, 12),
    ]  # fmt: skip
    assert kernels_by_kind(averages, steps=2, top=1)[0].kernels == rows[0].kernels[:1]
    text = format_kernels_by_kind(rows)
    assert f"      1.50 ms       36  {conv}\n          1.00 ms     24  _toeplitz_fwd_kernel\n" in text
    assert "GEMMs (cuBLAS)\n      0.30 ms" in text  # a kind of one kernel: no lines under it
    assert text.endswith("      3.01 ms       97  all\n")


def test_engine_profile_reports_the_step_and_its_top_operators(tmp_path, in_process_rank):
    from m2dist.bench.profile import profile_training
    from m2dist.config import load_config

    config = load_config(
        "debug",
        [
            "train.duration=4", "train.global_batch_size=4", "train.seq_len=32", "tracking.enabled=false",
            "data.num_workers=0", f"train.output_dir={tmp_path / 'run'}",
        ],
    )  # fmt: skip
    report = tmp_path / "engine.txt"
    header = profile_training(config, warmup=1, steps=1, output=report)
    assert header.startswith(f"debug: L=32, 128 tokens per step, 1 rank(s), ZeRO-{config.train.zero_stage}, ")
    text = report.read_text()
    assert text.startswith(header) and "device time per step (sum of kernels)" in header
    assert "Top operators by self device time" in text and "Top operators by total host time" in text


def test_host_syncs_are_counted_at_the_frames_that_made_them(monkeypatch):
    # torch.cuda's sync debug mode needs a GPU: here the step warns as that mode does at each
    # synchronizing call. Other warnings pass through; the mode is set for the steps and restored.
    # The explicit waits that mode does not report (torch.cuda.synchronize, an event's synchronize)
    # are counted where they are called, and torch's functions are back in place after.
    import warnings

    import torch

    from m2dist.bench.profile import SYNC_WARNING, format_host_syncs, host_syncs

    modes, waited = [], []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def device_wait(device=None):
        waited.append(("device", device))

    def event_wait(event):
        waited.append(("event", event))

    monkeypatch.setattr(torch.cuda, "synchronize", device_wait)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", event_wait)

    def read_loss():
        warnings.warn(SYNC_WARNING, UserWarning)

    def read_norm():
        warnings.warn(f"Warning: {SYNC_WARNING}", UserWarning)

    def wait_for_timer():
        torch.cuda.synchronize(0)  # as DeepSpeed's get_accelerator().synchronize() calls it
        torch.cuda.Event.synchronize("an event")

    def step():
        for _ in range(2):
            read_loss()  # one place, twice a step
        read_norm()
        wait_for_timer()
        warnings.warn("a warning of another kind", UserWarning)

    with pytest.warns(UserWarning, match="a warning of another kind") as others:
        syncs = host_syncs(step, steps=2, frames=2)
    assert modes == ["warn", 0]
    assert len(others) == 2  # one a step, shown as before; the syncs were not
    assert waited == [("device", 0), ("event", "an event")] * 2  # the waits still ran
    assert torch.cuda.synchronize is device_wait and torch.cuda.Event.synchronize is event_wait
    assert [s.count for s in syncs] == [4, 2, 2, 2]
    (step_frame, loss_frame), (_, norm_frame) = syncs[0].frames, syncs[1].frames
    assert step_frame.startswith("tests/test_bench.py:") and step_frame.endswith(" in step")
    assert loss_frame.endswith(" in read_loss") and norm_frame.endswith(" in read_norm")
    # The two waits at their own lines of wait_for_timer, each once a step.
    waits = sorted(s.frames[-1] for s in syncs[2:])
    assert len(set(waits)) == 2 and all(frame.endswith(" in wait_for_timer") for frame in waits)
    text = format_host_syncs(syncs, steps=2)
    head = "Host syncs in the step (torch.cuda's sync debug mode and explicit waits, over 2 steps)"
    assert text.startswith(f"{head}: 5 a step, at:\n")
    assert f"  2 a step:\n      {step_frame}\n      {loss_frame}\n  1 a step:\n" in text
    assert format_host_syncs([], steps=3).endswith(": 0 a step, none\n")


def test_fft_benchmark_times_each_plan_with_each_transform_operand(monkeypatch):
    # Interpreter, stand-in timer: the default plan with the kernels' own choice (tf32 for this
    # 256-point transform), then forced to tf32 and to fp16 (the kernels launched with each
    # precision, the label naming it), the switch restored after.
    import m2dist.bench.kernels as bench
    from kernels.fftconv import triton_fftconv

    monkeypatch.setattr(bench, "_bench", lambda fn: (fn(), 2.0)[1])
    precisions = []
    launch = triton_fftconv.transform_precision
    monkeypatch.setattr(
        triton_fftconv, "transform_precision", lambda dtype, plan=None: precisions.append(launch(dtype, plan)) or precisions[-1]
    )
    rows = bench.bench_fftconv([40], 80, 16, [], copy_bw=1e9, toeplitz_max=0, operands=("default", "tf32", "fp16"), device="cpu")
    labels = [r[1] for r in rows]
    assert labels == [
        "FFT N=256 R=1 M=16x16 C=8 tf32", "FFT N=256 R=1 M=16x16 C=8 tf32", "FFT N=256 R=1 M=16x16 C=8 fp16",
        "cuFFT transforms, Triton gates",
    ]  # fmt: skip
    assert set(precisions) == {"tf32", "fp16"} and precisions[0] == "tf32" and precisions[-1] == "fp16"
    assert triton_fftconv.FP16_OPERANDS is None


def _tree_copy(into, changed: str | None = None, appended: str = ""):
    """The importable part of the repository (m2dist, kernels, configs) copied to `into`, with
    `appended` at the end of its file `changed` (a path under `into`)."""
    import shutil

    for name in ("m2dist", "kernels", "configs"):
        shutil.copytree(REPO_ROOT / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))
    if changed is not None:
        with open(into / changed, "a") as source:
            source.write(appended)
    return into


@pytest.mark.slow
def test_revisions_are_timed_in_turn_each_from_its_own_tree(tmp_path):
    # Two trees of the code, one whose fine-tuning step sleeps 0.5 s more: each worker imports its
    # own tree, the revisions take turns block by block with the first of each round rotating, and
    # the slow tree's step measures the longer one.
    from m2dist.bench.revisions import Revision, format_table, time_revisions

    slow = _tree_copy(
        tmp_path / "slow", "m2dist/glue/step.py",
        "\n\n_plain_call = FinetuneStep.__call__\n\n\ndef _slow_call(self, *args, **kwargs):\n"
        "    import time\n\n    time.sleep(0.5)\n    return _plain_call(self, *args, **kwargs)\n\n\n"
        "FinetuneStep.__call__ = _slow_call\n",
    )  # fmt: skip
    order = []
    timings = time_revisions(
        [Revision("plain", REPO_ROOT), Revision("slow", slow)], "debug", [2], "cpu", False,
        overrides=("model.num_layers=1",), seq_len=16, first_steps=1, block_steps=1, rounds=2, order_log=order,
    )  # fmt: skip
    assert order == [("slow", 2), ("plain", 2), ("plain", 2), ("slow", 2)]
    by_label = {t.label: t for t in timings}
    assert [len(t.blocks_ms) for t in timings] == [2, 2]
    assert by_label["slow"].step_ms - by_label["plain"].step_ms > 300, timings
    table = format_table(timings, "plain")
    assert table.splitlines()[0] == "| batch | plain ms/step | slow ms/step | slow / plain |"
    ratio = by_label["slow"].step_ms / by_label["plain"].step_ms
    assert table.splitlines()[2] == f"| 2 | {by_label['plain'].step_ms:.2f} | {by_label['slow'].step_ms:.2f} | {ratio:.3f}x |"
    # On a CPU the workers report no GPU memory; on a GPU each revision's peak gets a column.
    assert all(t.peak_gib is None for t in timings)
    on_gpu = [dataclasses.replace(t, peak_gib=peak) for t, peak in zip(timings, (1.25, 2.5), strict=True)]
    lines = format_table(on_gpu, "plain").splitlines()
    assert lines[0].endswith("| slow / plain | plain peak GiB | slow peak GiB |") and lines[2].endswith(f"| {ratio:.3f}x | 1.2 | 2.5 |")
    assert lines[1] == "|" + "---|" * 6


@pytest.mark.slow
def test_revisions_time_the_sequence_mixer_of_each_tree(tmp_path):
    # The mixer alone, forward and backward, at two batch sizes: a tree whose mixer's backward
    # sleeps 0.3 s a call measures that much more at each (its backward ran, once a step).
    from m2dist.bench.revisions import Revision, time_revisions

    slow = _tree_copy(
        tmp_path / "slow", "kernels/mixer/__init__.py",
        "\n\n_plain_implementation = implementation\n\n\n"
        "class _SlowBackward(torch.autograd.Function):\n"
        "    @staticmethod\n    def forward(ctx, y):\n        return y.view_as(y)\n\n"
        "    @staticmethod\n    def backward(ctx, grad):\n"
        "        import time\n\n        time.sleep(0.3)\n        return grad\n\n\n"
        "def implementation(backend, fused=False):\n"
        "    mixer = _plain_implementation(backend, fused)\n"
        "    return lambda *args, **kwargs: _SlowBackward.apply(mixer(*args, **kwargs))\n",
    )  # fmt: skip
    timings = time_revisions(
        [Revision("plain", REPO_ROOT), Revision("slow", slow)], "debug", [2, 4], "cpu", False, step="mixer",
        seq_len=16, first_steps=1, block_steps=1, rounds=2,
    )  # fmt: skip
    by_key = {(t.label, t.batch_size): t for t in timings}
    assert sorted(by_key) == [("plain", 2), ("plain", 4), ("slow", 2), ("slow", 4)]
    for batch in (2, 4):
        assert 250 < by_key["slow", batch].step_ms - by_key["plain", batch].step_ms < 1000, timings


def test_a_revision_whose_worker_fails_is_named(tmp_path):
    from m2dist.bench.revisions import Revision, time_revisions

    broken = _tree_copy(tmp_path / "broken", "m2dist/bench/finetune.py", "\nraise ImportError('this tree does not import')\n")
    with pytest.raises(RuntimeError, match=f"worker of revision broken \\({broken}\\) exited with code 1"):
        time_revisions([Revision("broken", broken)], "debug", [2], "cpu", False, seq_len=16, first_steps=1, block_steps=1, rounds=1)


def test_revisions_that_would_not_fit_in_gpu_memory_stop_before_the_next_worker(tmp_path):
    # Every worker stays resident: three of m2-bert-80M-8k's engine step at batch 4, L=8192 held
    # 28.6 GiB each on an 80 GiB H100, and the third ran out of memory minutes into its warm-up.
    from m2dist.bench.revisions import Revision, check_room_for_workers
    from m2dist.errors import ConfigError

    waiting = [Revision("tf32", tmp_path), Revision("cdt", tmp_path)]
    with pytest.raises(ConfigError, match=r"each holds up to 28.6 GiB .* 50.6 GiB is free after 1 of them, and "
                                          r"tf32, cdt would need about 60.1 GiB more; time at most 2 revisions"):
        check_room_for_workers([{"held_gib": 28.6, "free_gib": 50.6}], waiting)
    check_room_for_workers([{"held_gib": 28.6, "free_gib": 50.6}], waiting[:1])
    with pytest.raises(ConfigError, match="a smaller batch"):
        check_room_for_workers([{"held_gib": 60.0, "free_gib": 19.0}], waiting[:1])
    # The largest worker so far sets the estimate; a CPU's workers report nothing to check.
    with pytest.raises(ConfigError, match="each holds up to 30.0 GiB"):
        check_room_for_workers([{"held_gib": 30.0, "free_gib": 49.0}, {"held_gib": 10.0, "free_gib": 29.0}], waiting[1:])
    check_room_for_workers([{"held_gib": None, "free_gib": None}], waiting)
    check_room_for_workers([{"held_gib": 28.6, "free_gib": 50.6}], [])


@pytest.mark.skipif(not (REPO_ROOT / ".git").exists(), reason="needs the repository's git history")
def test_revisions_resolve_directories_and_git_revisions(tmp_path):
    from m2dist.bench.revisions import resolved
    from m2dist.errors import ConfigError

    with resolved([str(REPO_ROOT), "base=HEAD"]) as (here, base):
        assert (here.label, here.tree) == (str(REPO_ROOT), REPO_ROOT.resolve())
        assert base.label == "base" and (base.tree / "m2dist" / "bench" / "finetune.py").is_file()
        exported = base.tree
    assert not exported.exists()  # the export was temporary
    with pytest.raises(ConfigError, match="'no-such-revision' is neither a directory nor a git revision"), resolved(["no-such-revision"]):
        pass
    with pytest.raises(ConfigError, match="share a label"), resolved([str(REPO_ROOT), str(REPO_ROOT)]):
        pass
    with pytest.raises(ConfigError, match="not a tree of m2dist"), resolved([str(tmp_path)]):
        pass


@pytest.mark.slow
def test_revisions_time_the_training_engine_each_in_its_own_process_group(tmp_path):
    # Two workers of the engine step at once, each a process group of its own (its own port),
    # without a launcher's variables; one batch size a run.
    from m2dist.bench.revisions import Revision, time_revisions
    from m2dist.errors import ConfigError

    with pytest.raises(ConfigError, match="one batch size a run"):
        time_revisions([Revision("a", REPO_ROOT)], "debug", [2, 4], "cpu", False, step="engine")
    revisions = [Revision("a", REPO_ROOT), Revision("b", _tree_copy(tmp_path / "b"))]
    timings = time_revisions(
        revisions, "debug", [4], "cpu", False, step="engine", overrides=("data.num_workers=0",), seq_len=32,
        first_steps=1, block_steps=1, rounds=2,
    )  # fmt: skip
    assert [(t.label, t.batch_size, len(t.blocks_ms)) for t in timings] == [("a", 4, 2), ("b", 4, 2)]
    assert all(t.step_ms > 0 for t in timings)


def test_data_benchmark_reads_one_epoch_of_masked_batches(tmp_path):
    # tools/bench_data.py's measurement, tiny: the shards it makes hold the whole run in one epoch
    # (a new epoch would start new worker processes inside the timing), and it counts the tokens of
    # the batches it timed.
    from m2dist.bench.data import bench_data_path, gpu_tokens_per_s
    from m2dist.data.manifest import read_manifest

    # 43 batches of 256 at L=128: more than the embedded corpus's ~9,500 windows once.
    result = bench_data_path(128, tmp_path, tokens_per_batch=128 * 256, num_workers=0, num_batches=40)
    assert (result.micro_batch_size, result.batches) == (256, 40)
    (train,) = tmp_path.glob("embedded-concat-L128-x*/train")
    assert read_manifest(train).counts.samples >= (3 + 40) * 256
    assert result.tokens_per_s > 0 and result.tokens_per_s == result.tokens_per_s_per_worker
    assert result.ratio_to_gpu == result.tokens_per_s / gpu_tokens_per_s(128)


def test_conv_block_sweep_beyond_the_toeplitz_length_times_the_short_convolution(monkeypatch):
    import m2dist.bench.kernels as bench

    monkeypatch.setattr(
        bench, "_CONV_SWEEP",
        {**bench._CONV_SWEEP, "short conv forward": [{"rows_fwd": 32}], "short conv backward": [{"rows": 32, "cols": 16}]},
    )  # fmt: skip
    shapes = []
    backward = bench.triton_short_conv.launch_backward
    monkeypatch.setattr(
        bench.triton_short_conv, "launch_backward", lambda g, p, *a: (shapes.append(tuple(p.shape)), backward(g, p, *a))[1]
    )
    monkeypatch.setattr(bench, "_bench", lambda fn: (fn(), 1.0)[1])
    rows = bench.sweep_conv_blocks(2, 160, [3], device="cpu")
    assert [(r[1], r[2]) for r in rows] == [
        ("short conv forward", {"rows_fwd": 32}), ("short conv backward", {"rows": 32, "cols": 16}),
    ]  # fmt: skip
    assert set(shapes) == {(3, 160, 6)}
    with pytest.raises(ValueError, match="\\['forward'\\] run at L <= 128 only \\(L=160\\)"):
        bench.sweep_conv_blocks(2, 160, [3], device="cpu", kernels=["forward", "short conv backward"])
