"""The training engine end to end: real DeepSpeed ZeRO runs of 2 processes over gloo on real MDS shards."""

import gzip
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m2dist.data.prepare import prepare_mds
from m2dist.engine.metrics import METRICS_FILE, read_metrics
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

EMBEDDED_TEXT = REPO_ROOT / "m2dist" / "data" / "assets" / "python-docs-3.11.txt.gz"
# Small and fast: 2 layers of d=128, L=64; dropout off where runs on different world sizes are compared.
BASE = ["train.seq_len=64", "train.log_every=1", "train.global_batch_size=8", "data.num_workers=1"]
# MLflow costs a launch about 10 s of its ~40 on 2 cores (its database made at the start, the final
# model logged and registered at the end); the runs that do not test tracking leave it off. The
# user's path (the deepspeed launcher) and the server test keep it.
NO_TRACKING = "tracking.enabled=false"


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """~60 training samples of real English (7 steps of 8 per epoch) and a validation split."""
    root = tmp_path_factory.mktemp("shards")
    text = root / "docs.txt"
    with gzip.open(EMBEDDED_TEXT, "rt") as source:
        lines = [line for line in source.read().splitlines() if len(line.split()) > 8][:80]
    text.write_text("\n".join(lines) + "\n")
    prepare_mds([text], root / "mds", None, max_len=64, val_fraction=0.2, progress=False)
    return root / "mds"


def _data_args(shards: Path) -> list[str]:
    return [f"data.train={shards / 'train'}", f"data.val={shards / 'val'}"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def launch(
    tmp_path: Path, args: list[str], nproc: int = 2, launcher: str = "torchrun", timeout: int = 400,
    script: Path = REPO_ROOT / "m2dist" / "train.py", config: str = "debug", master_port: int | None = None,
):  # fmt: skip
    """Run m2dist/train.py (or a script that takes its arguments) under a launcher in its own process
    group; kill the group on timeout."""
    script = str(script)
    bin_dir = Path(sys.executable).parent
    port = str(master_port or _free_port())
    if launcher == "torchrun":
        command = [str(bin_dir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, script]
    elif launcher == "deepspeed":
        command = [str(bin_dir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, script]
    else:
        command = [sys.executable, script]
    process = subprocess.Popen(
        command + ["--config", config, *args], cwd=tmp_path, env=_env(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"run timed out after {timeout}s:\n{output[-4000:]}")
    return process.returncode, output


def start_background(tmp_path: Path, args: list[str]) -> subprocess.Popen:
    """A 2-rank torchrun of m2dist/train.py left running, in its own process group."""
    script = str(REPO_ROOT / "m2dist" / "train.py")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return subprocess.Popen(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), script, "--config", "debug", *args],
        cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def wait_for_checkpoint(process: subprocess.Popen, output_dir: Path, step: int, timeout: float = 300) -> None:
    marker = output_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE"
    deadline = time.time() + timeout
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, f"run ended or stalled before step {step}"
        time.sleep(0.2)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def final_losses(output_dir: Path) -> list[tuple[int, float]]:
    latest = (output_dir / "checkpoints" / "latest").read_text().strip()
    state = torch.load(output_dir / "checkpoints" / latest / "client_state.pt", weights_only=True)
    return [tuple(x) for x in state["losses"]]


def _assert_ok(returncode: int, output: str) -> None:
    assert returncode == 0, output[-5000:]


@pytest.mark.parametrize("zero_stage, launcher", [(1, "torchrun"), (2, "deepspeed"), (3, "torchrun")])
def test_zero_stages_train_and_loss_falls(tmp_path, tiny_shards, zero_stage, launcher):
    out = tmp_path / "run"
    port = _free_port()
    returncode, output = launch(
        tmp_path,
        [*BASE, *_data_args(tiny_shards), f"train.zero_stage={zero_stage}", "train.duration=24",
         f"train.output_dir={out}", "train.eval_every=12", f"tracking.enabled={launcher == 'deepspeed'}"],
        launcher=launcher, master_port=port,
    )  # fmt: skip
    _assert_ok(returncode, output)
    # DeepSpeed's CPU all-reduce buffers (66 MiB per rank, made under the deepspeed launcher) are gone.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    losses = [loss for _, loss in final_losses(out)]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0, losses
    assert f"ZeRO-{zero_stage}" in output and "2 rank(s)" in output
    assert "eval/mlm_accuracy" in output and "ETA" in output and "tokens/s" in output
    # The deepspeed launcher's run tracks to MLflow, as a user's run does by default.
    assert ("registered as models:/debug/1" in output) == (launcher == "deepspeed")
    # metrics.jsonl: one record per log step, as the scaling tool reads it.
    records = read_metrics(out / METRICS_FILE)
    assert [(r["step"], r["world_size"], r["zero_stage"]) for r in records] == [(s, 2, zero_stage) for s in range(1, 25)]
    assert all(r["throughput/tokens_per_s"] > 0 and r["memory/peak_gib"] > 0 for r in records)


@pytest.mark.slow
def test_bf16_autocast_reaches_the_engines_forward(tmp_path, tiny_shards):
    # DeepSpeed switches off an autocast opened around its forward unless its config enables one.
    returncode, output = launch(
        tmp_path,
        [*_data_args(tiny_shards), *BASE, "train.precision=bf16", "tracking.enabled=false", "train.global_batch_size=2",
         "data.num_workers=0", f"train.output_dir={tmp_path / 'run'}"],
        launcher="python", script=REPO_ROOT / "tests" / "probe_autocast.py",
    )  # fmt: skip
    _assert_ok(returncode, output)
    assert "linear output dtype: torch.bfloat16" in output


def test_bert_baseline_trains(tmp_path, tiny_shards):
    out = tmp_path / "run"
    returncode, output = launch(
        tmp_path,
        [*BASE, *_data_args(tiny_shards), NO_TRACKING, "model.architecture=bert", "model.num_attention_heads=4",
         "train.duration=20", f"train.output_dir={out}"],
    )  # fmt: skip
    _assert_ok(returncode, output)
    losses = [loss for _, loss in final_losses(out)]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0, losses


def test_resume_is_exact_across_an_epoch_boundary(tmp_path, tiny_shards):
    """Stop after 5 steps, resume: steps 6-12 (past the epoch end at step 7) equal an uninterrupted run."""
    common = [*BASE, *_data_args(tiny_shards), NO_TRACKING, "train.precision=fp32", "train.duration=12"]
    _assert_ok(*launch(tmp_path, [*common, f"train.output_dir={tmp_path / 'full'}"]))
    first = launch(tmp_path, [*common, f"train.output_dir={tmp_path / 'cut'}", "train.stop_after=5"])
    _assert_ok(*first)
    assert "checkpointing at step 5" in first[1]
    second = launch(tmp_path, [*common, f"train.output_dir={tmp_path / 'cut'}"])
    _assert_ok(*second)
    assert "resumed from" in second[1] and "step_00000005" in second[1]
    full, resumed = final_losses(tmp_path / "full"), final_losses(tmp_path / "cut")
    assert [s for s, _ in resumed] == list(range(1, 13))
    assert resumed == full  # bit-identical fp32 losses, before and after the resume


def _train_ranks(launcher_pid: int) -> list:
    """The launcher's descendants that run train.py; a helper process that ends while the list is
    read (a zombie, or gone) is not one of them."""
    import psutil

    ranks = []
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "train.py" in " ".join(child.cmdline()):
                ranks.append(child)
        except psutil.NoSuchProcess:  # ZombieProcess included
            continue
    return ranks


def test_killed_rank_resumes_from_last_complete_checkpoint(tmp_path, tiny_shards):
    out = tmp_path / "run"
    args = [*BASE, *_data_args(tiny_shards), NO_TRACKING, "train.duration=40", "train.checkpoint_every=2", "train.keep_last=5",
            f"train.output_dir={out}", "model.num_layers=4"]  # fmt: skip
    process = start_background(tmp_path, args)
    try:
        wait_for_checkpoint(process, out, 4)
        rank1 = next(p for p in _train_ranks(process.pid) if "LOCAL_RANK" in p.environ() and p.environ()["LOCAL_RANK"] == "1")
        rank1.send_signal(signal.SIGKILL)
        process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode != 0
    complete = sorted(p.parent.name for p in (out / "checkpoints").glob("step_*/COMPLETE"))
    newest = complete[-1]
    # A save cut short by a crash leaves a folder without COMPLETE, newer than the last good one.
    cut_short = out / "checkpoints" / "step_00000039"
    cut_short.mkdir(exist_ok=True)
    (cut_short / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    (out / "checkpoints" / "latest").write_text("step_00000039\n")
    returncode, output = launch(tmp_path, args)
    _assert_ok(returncode, output)
    assert f"resumed from {out / 'checkpoints' / newest}" in output
    assert [s for s, _ in final_losses(out)] == list(range(1, 41))


def _catches(process, signum: int) -> bool:
    """Whether `process` has a handler installed for `signum` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


def test_signal_during_start_up_leaves_cleanly_for_a_requeue(tmp_path, tiny_shards):
    out = tmp_path / "run"
    args = [*BASE, *_data_args(tiny_shards), "train.duration=4", "data.num_workers=0", NO_TRACKING,
            f"train.output_dir={out}"]  # fmt: skip
    process = start_background(tmp_path, args)
    try:
        deadline = time.time() + 120
        while True:
            ranks = _train_ranks(process.pid)
            if len(ranks) == 2 and all(_catches(p, signal.SIGUSR1) for p in ranks):
                break
            assert process.poll() is None and time.time() < deadline, "the ranks did not start"
            time.sleep(0.02)
        # As srun delivers SLURM's warning: to every rank, here while Python still imports torch.
        for rank in ranks:
            rank.send_signal(signal.SIGUSR1)
        output, _ = process.communicate(timeout=200)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert "signal 10 during start-up (joining the process group): leaving before step 1, nothing to checkpoint" in output, output[-3000:]
    assert re.search(r"exitcode\s*:\s*85", output) and "step      1/" not in output
    assert not (out / ".m2dist.lock").exists() and not list(out.glob("checkpoints/*/COMPLETE"))


def test_resume_on_one_rank_through_universal_checkpoint(tmp_path, tiny_shards):
    """2 ranks -> 1 rank: same global batch, same samples and masks. The loss is each rank's mean over
    its masked tokens, averaged over ranks (as upstream): on one rank the 8 samples' tokens are
    weighted slightly differently, so losses agree to ~0.1%, not bit for bit. The epoch ends after
    step 7; from step 8 on, the next epoch's samples are dealt to one rank instead of two, so there
    only the mean loss is compared (within 2%)."""
    common = [*BASE, *_data_args(tiny_shards), NO_TRACKING, "train.precision=fp32", "train.duration=10", "model.hidden_dropout=0.0",
              "train.zero_stage=2"]  # fmt: skip
    _assert_ok(*launch(tmp_path, [*common, f"train.output_dir={tmp_path / 'full'}"]))
    _assert_ok(*launch(tmp_path, [*common, f"train.output_dir={tmp_path / 'cut'}", "train.stop_after=5"]))
    returncode, output = launch(tmp_path, [*common, f"train.output_dir={tmp_path / 'cut'}"], nproc=1)
    _assert_ok(returncode, output)
    assert "step_00000005_universal" in output
    full, resumed = dict(final_losses(tmp_path / "full")), dict(final_losses(tmp_path / "cut"))
    for step in (6, 7):
        assert resumed[step] == pytest.approx(full[step], rel=5e-3), (step, resumed[step], full[step])
    mean_resumed = sum(resumed[s] for s in range(8, 11)) / 3
    mean_full = sum(full[s] for s in range(8, 11)) / 3
    assert mean_resumed == pytest.approx(mean_full, rel=2e-2)
    # Steps before the resume come from the checkpoint, unchanged.
    assert [resumed[s] for s in range(1, 6)] == [full[s] for s in range(1, 6)]


@pytest.mark.parametrize(
    "args, nproc, needle",
    [
        (["model.hidden_sise=3"], 1, "model.hidden_sise: unknown key"),
        (["train.zero_stage=4"], 1, "train.zero_stage: expected 0, 1, 2 or 3, got 4"),
        (["data.train=/nonexistent/shards", "data.val=/nonexistent/val"], 1, "/nonexistent/shards"),
        # Checked at start, not at the first evaluation after training.
        (["data.val=/nonexistent/val"], 1, "/nonexistent/val"),
        (["model.vocab_size=30592"], 1, "30592"),
        (["train.global_batch_size=7"], 2, "train.global_batch_size: expected a multiple of the world size 2, got 7"),
    ],
)
def test_bad_inputs_fail_before_the_first_step(tmp_path, tiny_shards, args, nproc, needle):
    overridden = {arg.partition("=")[0] for arg in args}
    data = [arg for arg in _data_args(tiny_shards) if arg.partition("=")[0] not in overridden]
    returncode, output = launch(
        tmp_path, [*BASE, *data, *args, f"train.output_dir={tmp_path / 'run'}"], nproc=nproc,
        launcher="torchrun" if nproc > 1 else "python", timeout=200,
    )  # fmt: skip
    assert returncode != 0
    assert needle in output, output[-3000:]
    assert "step      1/" not in output


def test_mlflow_server_gets_one_run_and_its_death_does_not_stop_training(tmp_path, tiny_shards):
    from mlflow import MlflowClient

    from tests.test_tracking import MlflowServer, free_loopback_port

    server = MlflowServer(tmp_path / "server", free_loopback_port())
    try:
        server.start()
        out = tmp_path / "run"
        args = [*BASE, *_data_args(tiny_shards), "train.duration=30", "train.checkpoint_every=10",
                f"train.output_dir={out}", f"tracking.tracking_uri={server.uri}", "tracking.flush_every_seconds=0.5",
                "tracking.close_timeout_seconds=5"]  # fmt: skip
        process = start_background(tmp_path, args)
        try:
            wait_for_checkpoint(process, out, 10)
            time.sleep(1.0)  # let a flush reach the server
            server.stop()
            output, _ = process.communicate(timeout=300)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
        assert process.returncode == 0, output[-5000:]
        assert [s for s, _ in final_losses(out)] == list(range(1, 31))
        server.start()
        client = MlflowClient(server.uri)
        runs = [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]
        assert len(runs) == 1  # rank 0 only
        run = runs[0]
        assert run.data.params["runtime.world_size"] == "2" and run.data.params["model.hidden_size"] == "128"
        logged_steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
        assert set(range(1, 11)) <= logged_steps
        assert {"config.json", "deepspeed.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        server.stop()  # stop() is idempotent: the server is restarted above


@pytest.mark.gpu
# micro_batch_size 8: four micro-batches per step, whose gradients the replayed backward graphs
# produce in the same memory and the engine accumulates.
# L=1024: the long convolution on the cuFFT path (the default there), and on the FFT kernels (the
# cuFFT path switched off), whose DFT tables are cached on the device from the graph's warm-up run
# (kept in the graph's memory pool, they failed its check).
@pytest.mark.parametrize(
    "zero_stage,micro_batch_size,seq_len,cufft",
    [(1, 32, 128, True), (1, 8, 128, True), (2, 8, 128, True), (1, 8, 1024, True), (1, 8, 1024, False)],
)
def test_compiled_step_with_cuda_graphs_trains_as_the_eager_one_on_gpu(
    tmp_path, in_process_rank, monkeypatch, zero_stage, micro_batch_size, seq_len, cufft
):
    """train.compile_mode=reduce-overhead (the forward and backward replayed as CUDA graphs, with
    the fixed-size masked gather) gives eager training's losses, in bf16 on one GPU, also with
    gradient accumulation and at a length past the Toeplitz path, on the cuFFT path or the FFT kernels."""
    import kernels.fftconv
    from m2dist.config import load_config
    from m2dist.engine.trainer import Trainer

    if not cufft:
        monkeypatch.setattr(kernels.fftconv, "CUFFT_MIN_LEN", None)

    losses = {}
    for mode in ("eager", "reduce-overhead"):
        overrides = [
            "train.device=cuda", "train.precision=bf16", f"train.zero_stage={zero_stage}", "train.duration=8",
            f"train.seq_len={seq_len}", f"model.l_max={seq_len}", "train.global_batch_size=32",
            f"train.micro_batch_size={micro_batch_size}",
            "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=1",
            "model.hidden_dropout=0.0", "tracking.enabled=false", "data.num_workers=0",
            f"train.output_dir={tmp_path / mode}", f"train.compile={mode != 'eager'}",
        ]  # fmt: skip
        if mode != "eager":
            overrides.append(f"train.compile_mode={mode}")
        trainer = Trainer(load_config("debug", overrides))
        losses[mode] = [loss for _, loss in trainer.fit()]
        trainer.close()
    assert len(losses["reduce-overhead"]) == 8 and all(math.isfinite(x) for x in losses["reduce-overhead"])
    assert losses["reduce-overhead"] == pytest.approx(losses["eager"], rel=2e-2)
    # The first step's gradient (same weights, same batches) is the sum over all its micro-batches:
    # a replay that overwrote an earlier micro-batch's gradients would change its norm.
    norms = {mode: read_metrics(tmp_path / mode / METRICS_FILE)[0]["train/grad_norm"] for mode in losses}
    assert norms["reduce-overhead"] == pytest.approx(norms["eager"], rel=1e-2)


@pytest.mark.gpu
def test_cuda_graph_run_evaluates_checkpoints_and_resumes_on_gpu(tmp_path, in_process_rank):
    """A whole run with CUDA graphs: evaluations (the fixed-size gather, eval mode), a checkpoint,
    a stop and a resume in a fresh engine, with 2 micro-batches a step; its losses and evaluations
    are the eager run's."""
    from m2dist.config import load_config
    from m2dist.engine.trainer import Trainer

    def run(mode: str, *extra: str) -> list[tuple[int, float]]:
        overrides = [
            "train.device=cuda", "train.precision=bf16", "train.zero_stage=1", "train.duration=8",
            "train.seq_len=128", "train.global_batch_size=32", "train.micro_batch_size=16",
            "train.eval_every=4", "train.eval_batches=2", "train.log_every=1", "model.hidden_dropout=0.0",
            "tracking.enabled=false", "data.num_workers=0", f"train.output_dir={tmp_path / mode}",
            f"train.compile={mode != 'eager'}", "train.compile_mode=reduce-overhead", *extra,
        ]  # fmt: skip
        trainer = Trainer(load_config("debug", overrides))
        try:
            return trainer.fit()
        finally:
            trainer.close()

    eager = run("eager")
    assert len(run("graphs", "train.stop_after=4")) == 4
    graphs = run("graphs")  # resumes from step 4 in a new engine
    assert [s for s, _ in graphs] == list(range(1, 9))
    assert [loss for _, loss in graphs] == pytest.approx([loss for _, loss in eager], rel=2e-2)
    evals = {
        mode: [r["eval/mlm_loss"] for r in read_metrics(tmp_path / mode / METRICS_FILE) if "eval/mlm_loss" in r]
        for mode in ("eager", "graphs")
    }
    assert len(evals["graphs"]) == 2 and evals["graphs"] == pytest.approx(evals["eager"], rel=2e-2)


def test_compiled_model_trains_as_the_eager_one(tmp_path, tiny_shards):
    """train.compile: the engine's compiled model gives the eager model's losses (fp32, dropout off)
    and writes checkpoints with the same parameter names (a release loads from them); on 2 ranks
    with ZeRO-2, so with DeepSpeed's per-parameter reduction hooks (overlap_comm) around the
    compiled backward."""
    from m2dist.checkpoint.convert import load_any

    args = [*BASE, *_data_args(tiny_shards), NO_TRACKING, "train.zero_stage=2", "train.duration=4", "train.eval_batches=1",
            "model.hidden_dropout=0.0", "model.num_layers=1"]  # fmt: skip
    runs = {}
    for compiled in (False, True):
        runs[compiled] = out = tmp_path / f"compile-{compiled}"
        returncode, output = launch(tmp_path, [*args, f"train.compile={compiled}", f"train.output_dir={out}"], nproc=2)
        _assert_ok(returncode, output)
    eager, compiled = final_losses(runs[False]), final_losses(runs[True])
    assert [step for step, _ in compiled] == [1, 2, 3, 4]
    assert [loss for _, loss in compiled] == pytest.approx([loss for _, loss in eager], rel=1e-4)
    tag = (runs[True] / "checkpoints" / "latest").read_text().strip()
    model = load_any(runs[True] / "checkpoints" / tag)
    assert not any("_orig_mod" in key for key in model.state_dict())


def test_evaluation_gathers_a_fixed_size_and_matches_the_exact_gather(tmp_path, in_process_rank):
    """`Trainer.evaluate` runs the model with the training step's fixed-size masked-token gather
    (on a GPU or compiled) and one batch size (the split's short last batch filled up: a compiled
    model would compile again for a new size) and sums on the device; its loss and accuracy over
    the whole validation split are those of the exact gather over the split's own batches."""
    from m2dist.config import load_config
    from m2dist.engine.trainer import MODEL_INPUTS, Trainer

    config = load_config(
        "debug",
        ["train.duration=2", "train.global_batch_size=64", "train.seq_len=32", "train.eval_batches=0",
         "tracking.enabled=false", "data.num_workers=0", f"train.output_dir={tmp_path}"],
    )  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = True
    trainer = Trainer(config)
    # The debug config's fp32 run keeps its matmuls in fp32 (train.tf32=auto).
    assert torch.backends.cuda.matmul.allow_tf32 is False
    # The fixed-size gather, as on a GPU or compiled (an eager CPU run takes the exact one).
    assert not trainer.fixed_masked_gather
    trainer.fixed_masked_gather = True
    try:
        trainer.train_step()
        seen = []
        model = trainer.engine.module
        forward = model.forward

        def recording(*args, **kwargs):
            seen.append((kwargs["input_ids"].shape, kwargs.get("max_masked")))
            return forward(*args, **kwargs)

        model.forward = recording
        metrics = trainer.evaluate()
        model.forward = forward
        model.eval()
        loss_sum = correct = masked = 0.0
        sizes = []
        with torch.no_grad():
            for batch in trainer.data._eval_loader:
                sizes.append(batch["input_ids"].shape[0])
                batch = {k: batch[k] for k in MODEL_INPUTS if k in batch}
                out = model(**batch)
                loss_sum += out.loss.item() * out.num_masked
                correct += (out.logits.argmax(-1) == out.targets).sum().item()
                masked += out.num_masked
    finally:
        trainer.close()
    assert sizes[-1] < 64 and len(sizes) > 1, f"the split should end in a short batch: {sizes}"
    assert len(seen) == len(sizes) and set(seen) == {seen[0]} and seen[0][0][0] == 64, seen
    assert isinstance(seen[0][1], int)
    assert masked > 0
    assert metrics["eval/mlm_loss"] == pytest.approx(loss_sum / masked, rel=1e-6)
    assert metrics["eval/mlm_accuracy"] == pytest.approx(correct / masked, abs=1e-12)
