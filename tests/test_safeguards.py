"""A run that cannot harm itself or its user: no pickled code from user-supplied folders, no
non-finite checkpoint, damaged checkpoints detected with a fallback to an intact one, one job per
run folder, a resumed config compared with its checkpoint's, and a failed checkpoint write that
names its file and cause. Real DeepSpeed runs on CPU."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from m2dist.checkpoint.convert import convert_checkpoint
from m2dist.checkpoint.extend import warm_start
from m2dist.checkpoint.release import save_release
from m2dist.config import load_config
from m2dist.engine.checkpoint import CheckpointManager, torch_save
from m2dist.engine.distributed import DistEnv
from m2dist.engine.guards import NonFiniteCounter, check_resume_config
from m2dist.engine.metrics import METRICS_FILE, read_metrics
from m2dist.engine.trainer import resume_config_changes
from m2dist.errors import CheckpointError, ConfigDrift, NonFiniteTraining
from m2dist.models import MaskedLM
from tests.test_engine import BASE, _assert_ok, _data_args, final_losses, launch, start_background, tiny_shards  # noqa: F401

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "l_max": 32, "vocab_size": 128, "filter_order": 8}


class Payload:
    """Unpickled with weights_only=False, it runs a shell command: it creates `sentinel`."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _tiny_model() -> MaskedLM:
    config = load_config("debug", [f"model.{k}={v}" for k, v in TINY.items()])
    return MaskedLM(config.model)


def _fake_tag(folder: Path, sentinel: Path) -> None:
    """A tag folder as the engine writes it, whose model state file carries a code payload."""
    folder.mkdir(parents=True)
    torch.save({"module": Payload(sentinel), "ds_config": {}}, folder / "mp_rank_00_model_states.pt")
    config = load_config("debug", [f"model.{k}={v}" for k, v in TINY.items()]).to_dict()
    torch.save({"step": 1, "config": config}, folder / "client_state.pt")
    (folder / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": 1}) + "\n")


def test_pickle_payloads_in_user_folders_never_run(tmp_path):
    sentinel = tmp_path / "payload_ran"
    # An "upstream checkpoint" download that also holds DeepSpeed's files.
    upstream = tmp_path / "upstream"
    _fake_tag(upstream, sentinel)
    (upstream / "config.json").write_text(json.dumps({"hidden_size": 32}))
    torch.save(_tiny_model().state_dict(), upstream / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refused: it holds both a training run's files .*pytorch_model.bin"):
        convert_checkpoint(upstream, tmp_path / "out", "release")
    with pytest.raises(CheckpointError, match="ambiguous"):
        warm_start(_tiny_model(), upstream)
    # A release folder with a checkpoints/ subfolder, as tools/eval_glue.py --checkpoint gets it.
    from m2dist.glue.finetune import load_pretrained

    release = save_release(_tiny_model(), tmp_path / "release")
    _fake_tag(release / "checkpoints" / "step_00000001", sentinel)
    with pytest.raises(CheckpointError, match="refused"):
        load_pretrained(release)
    # A run folder of nothing but engine files: its pickles are scanned before DeepSpeed reads them.
    run = tmp_path / "run"
    _fake_tag(run / "checkpoints" / "step_00000001", sentinel)
    (run / "checkpoints" / "latest").write_text("step_00000001\n")
    for read in (lambda: convert_checkpoint(run, tmp_path / "out", "release"), lambda: warm_start(_tiny_model(), run)):
        with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: refused: it pickles posix.system"):
            read()
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()


def test_converter_refuses_a_non_finite_model(tmp_path):
    model = _tiny_model()
    name, param = next((n, p) for n, p in model.named_parameters() if "position" in n)
    with torch.no_grad():
        param.view(-1)[3] = float("nan")
    release = save_release(model, tmp_path / "nan")
    with pytest.raises(CheckpointError, match=rf"hold NaN or infinity \({name}"):
        convert_checkpoint(release, tmp_path / "up", "upstream")
    assert not (tmp_path / "up").exists()


def test_a_failed_checkpoint_write_names_the_file_and_the_os_error(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    # /dev/full: every write fails with ENOSPC, as on a full disk.
    with pytest.raises(OSError, match="No space left on device") as err:
        torch_save({"x": torch.zeros(4096)}, "/dev/full")
    assert err.value.filename == "/dev/full"

    class Engine:
        """Saves as DeepSpeed's engine does, through its torch writer, onto a full disk."""

        checkpoint_engine = TorchCheckpointEngine()

        def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
            target = Path(root) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
            target.parent.mkdir(parents=True)
            target.symlink_to("/dev/full")
            self.checkpoint_engine.save({"x": torch.zeros(4096)}, str(target))

    manager = CheckpointManager(tmp_path / "checkpoints", DistEnv(rank=0, world_size=1, local_rank=0), keep_last=2)
    with pytest.raises(CheckpointError) as err:
        manager.save(Engine(), 3, {"step": 3})
    target = tmp_path / "checkpoints" / "step_00000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert str(err.value).startswith(f"{target}: writing the checkpoint failed: No space left on device"), str(err.value)
    assert "MiB free there" in str(err.value) and not (target.parent / "COMPLETE").exists()


def test_non_finite_steps_counted_in_a_row():
    counter = NonFiniteCounter(limit=2)
    for step, loss in enumerate([1.0, float("nan"), float("inf"), 2.0, float("nan"), float("nan")], start=1):
        counter.record(step, loss, 1.0, None)
    with pytest.raises(NonFiniteTraining, match=r"steps 5-7: .* 3 optimizer step\(s\) in a row .* train.max_nonfinite_steps=2"):
        counter.record(7, 3.0, float("inf"), "runs/x/checkpoints/step_00000004")


def test_resume_config_changes_listed_by_key():
    saved = load_config("debug").to_dict()
    current = load_config("debug", ["model.layer_norm_eps=1e-5", "train.global_batch_size=4", "train.duration=400",
                                     "model.kernels.fftconv=reference"]).to_dict()  # fmt: skip
    with pytest.raises(ConfigDrift, match=r"model.layer_norm_eps: 1e-12 in the checkpoint, 1e-05 now\n  train.global_batch_size"):
        check_resume_config(saved, current, [], "ckpt")
    free = check_resume_config(saved, current, ["model.layer_norm_eps", "train"], "ckpt")
    assert [line.split(":")[0] for line in free] == [
        "model.kernels.fftconv", "model.layer_norm_eps", "train.duration", "train.global_batch_size",
    ]  # fmt: skip


@pytest.mark.slow
def test_diverging_run_stops_without_a_non_finite_checkpoint(tmp_path, tiny_shards):  # noqa: F811
    out = tmp_path / "run"
    returncode, output = launch(
        tmp_path,
        [*BASE, *_data_args(tiny_shards), "train.duration=6", "train.checkpoint_every=1", "train.optimizer.lr=1e4",
         "train.warmup_fraction=0", "train.grad_clip=0", "tracking.enabled=false", "data.num_workers=0",
         f"train.output_dir={out}"],
        nproc=1, launcher="python",
    )  # fmt: skip
    assert returncode == 2, output[-3000:]
    diverged = re.search(r"error: step (\d+): loss nan, .* more than train.max_nonfinite_steps=0", output)
    assert diverged, output[-3000:]
    # The step before (finite loss) is the last checkpoint; its diverged weights give non-finite
    # logits, and the converter says so instead of "checked".
    last = f"step_{int(diverged.group(1)) - 1:08d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == last
    assert sorted(p.parent.name for p in out.glob("checkpoints/*/COMPLETE"))[-1] == last
    with pytest.raises(CheckpointError, match="logits on the check input are not: the training diverged"):
        convert_checkpoint(out, tmp_path / "release", "release")
    assert not (tmp_path / "release").exists()


@pytest.mark.slow
def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(tmp_path, tiny_shards):  # noqa: F811
    out = tmp_path / "run"
    args = [*BASE, *_data_args(tiny_shards), "train.precision=fp32", "train.duration=3", "train.checkpoint_every=1",
            "train.keep_last=3", "tracking.enabled=false", "data.num_workers=0", f"train.output_dir={out}"]  # fmt: skip
    _assert_ok(*launch(tmp_path, args))
    expected = final_losses(out)
    root = out / "checkpoints"
    # A resume that changes the model or the data order is refused by key, before the model is built.
    changed = load_config("debug", [*args, "model.hidden_size=64", "train.global_batch_size=4"])
    with pytest.raises(ConfigDrift) as drift:
        resume_config_changes(changed, root / "step_00000003")
    assert "model.hidden_size: 128 in the checkpoint, 64 now" in str(drift.value)
    assert "train.global_batch_size: 8 in the checkpoint, 4 now" in str(drift.value)
    # Step 3: an optimizer shard cut short. Step 2: bytes overwritten inside a shard, size unchanged.
    truncated = root / "step_00000003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    overwritten = root / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(overwritten.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    overwritten.write_bytes(bytes(data))
    # The converter reads the same folder without changing it: named tag refused, default falls back.
    with pytest.raises(CheckpointError, match=rf"{truncated}: \d+ bytes, the manifest says \d+"):
        convert_checkpoint(out, tmp_path / "a", "release", tag="step_00000003")
    convert_checkpoint(out, tmp_path / "b", "release")
    assert "step_00000001" in (tmp_path / "b" / "model_card.md").read_text()
    # A stale lock of a job that died on this host does not block the relaunch.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".m2dist.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "job": ""}))

    returncode, output = launch(tmp_path, args)
    _assert_ok(returncode, output)
    assert f"took over the stale lock {out / '.m2dist.lock'}" in output
    assert f"{truncated}: " in output and "the manifest says" in output
    assert f"{overwritten}: SHA-256 differs from the manifest's" in output
    assert f"resumed from {root / 'step_00000001'} at step 1" in output
    assert {"step_00000002.damaged", "step_00000003.damaged"} <= {p.name for p in root.iterdir()}
    assert final_losses(out) == expected  # trained on the intact state, not on garbage
    assert not (out / ".m2dist.lock").exists()


REFUSED_JOB = """
import sys

import torch.distributed as dist

from m2dist.errors import RunFolderLocked
from m2dist.train import main

try:
    main(sys.argv[1:])
except RunFolderLocked:
    print("process group after the refusal:", "joined" if dist.is_initialized() else "torn down")
"""


@pytest.mark.slow
def test_a_refused_job_tears_its_process_group_down_before_it_exits(tmp_path, tiny_shards):  # noqa: F811
    # The refusal comes after the process group is joined. Left to the interpreter's exit, the gloo
    # group's destructor once aborted such a job ("terminate called without an active exception",
    # status -6 where 2 was due, on a loaded CPU); the entry point tears it down on the error.
    from m2dist.engine.guards import RunLock

    out = tmp_path / "run"
    lock = RunLock(out)
    lock.acquire()
    script = tmp_path / "refused_job.py"
    script.write_text(REFUSED_JOB)
    try:
        args = [*BASE, *_data_args(tiny_shards), "tracking.enabled=false", "data.num_workers=0", f"train.output_dir={out}"]
        returncode, output = launch(tmp_path, args, nproc=1, launcher="python", script=script, timeout=200)
    finally:
        lock.release()
    assert returncode == 0 and "process group after the refusal: torn down" in output, output[-3000:]


def test_an_error_leaves_a_process_group_that_was_joined_before_the_run(tmp_path, in_process_rank):
    # The entry point tears down only the group its run joined: in a process that had joined one
    # before (the in-process engine tests), DeepSpeed's cached groups refer to it, and every later
    # engine in the process failed once a failing run in between had destroyed it.
    import torch.distributed as dist

    from m2dist.engine.distributed import init_distributed
    from m2dist.errors import ConfigError
    from m2dist.train import main

    init_distributed(torch.device("cpu"))
    with pytest.raises(ConfigError, match="data.train: empty"):
        main(["--config", "m2-bert-80M", f"train.output_dir={tmp_path / 'run'}", "train.device=cpu"])
    assert dist.is_initialized()


@pytest.mark.slow
def test_second_job_on_a_run_folder_is_refused(tmp_path, tiny_shards):  # noqa: F811
    out = tmp_path / "run"
    args = [*BASE, *_data_args(tiny_shards), "train.duration=5000", "train.log_every=2", "tracking.enabled=false",
            "data.num_workers=0", f"train.output_dir={out}"]  # fmt: skip
    first = start_background(tmp_path, args)
    ranks = []
    try:
        deadline = time.time() + 300
        while not (out / METRICS_FILE).exists():
            assert first.poll() is None and time.time() < deadline, "the first job ended or stalled"
            time.sleep(0.2)
        ranks = [p for p in psutil.Process(first.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
        # Paused (its lock held) while the second job starts, so that the two do not share the CPU.
        for rank in ranks:
            rank.suspend()
        returncode, output = launch(tmp_path, args, nproc=1, launcher="python")
        for rank in ranks:
            rank.resume()
        assert returncode == 2, output[-3000:]
        assert f"{out}: this run folder is in use by process" in output and "another train.output_dir" in output
        # As SLURM signals the tasks before the time limit: both ranks checkpoint and leave.
        for rank in ranks:
            rank.send_signal(signal.SIGUSR1)
        first_output, _ = first.communicate(timeout=200)
    finally:
        # The ranks too: torchrun starts them in sessions of their own, beyond its process group.
        for rank in ranks:
            with contextlib.suppress(psutil.NoSuchProcess):
                rank.kill()
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
    assert "checkpointing at step" in first_output, first_output[-3000:]
    steps = [record["step"] for record in read_metrics(out / METRICS_FILE)]
    assert steps == sorted(set(steps)) and steps
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert int(latest.removeprefix("step_")) == steps[-1]
    assert not (out / ".m2dist.lock").exists()
