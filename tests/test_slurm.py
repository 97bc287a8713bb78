"""slurm/: the real pretrain_64gpu.sh on a real SLURM cluster of two emulated nodes, scaled down to
2 nodes x 1 CPU rank (debug config, gloo): an uninterrupted job, a preempted and requeued one
that resumes exactly, and a cancelled one that checkpoints and stays cancelled.

The cluster (tests/slurm_cluster.py) is Debian's slurmctld + two slurmd + munged, installed with
apt-get when missing; the tests are skipped only when that cannot be done here.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.slurm_cluster import LocalSlurmCluster, SlurmUnavailable, ensure_slurm_installed

pytestmark = pytest.mark.slow

SLURM_DIR = REPO_ROOT / "slurm"
SCRIPT = SLURM_DIR / "pretrain_64gpu.sh"
STEPS = 40
# Each option overrides the #SBATCH line of the same name in the 64-GPU script.
SCALED_DOWN = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem-per-cpu=1G",
               "--time=00:30:00"]  # fmt: skip
# Everything the test relies on is explicit, whatever configs/debug.yaml says. Dropout is off so
# that the resumed run can be compared bit for bit: the data loader (iterator creation, first
# fetch) draws from the global torch RNG that dropout uses, and a resumed run does so at another
# step than an uninterrupted one.
OVERRIDES = [f"train.duration={STEPS}", "train.duration_unit=steps", "train.global_batch_size=8", "train.seq_len=64",
             "train.precision=fp32", "train.device=cpu", "train.log_every=1", "train.checkpoint_every=10",
             "train.keep_last=5", "train.eval_every=0", "train.eval_batches=2", "data.num_workers=0",
             "model.hidden_dropout=0.0", "model.attention_dropout=0.0"]  # fmt: skip
JOB_TIMEOUT = 240
STEP_LINE = re.compile(rf"^step\s+(\d+)/{STEPS}\s+loss\s+(\S+)", re.MULTILINE)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the emulated SLURM nodes need root (slurmd, a tmpfs mount per node)")
    try:
        ensure_slurm_installed()
    except SlurmUnavailable as err:
        pytest.skip(f"no SLURM: {err}")
    slurm = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    slurm.start()
    try:
        yield slurm
    finally:
        slurm.stop()


def submit(
    cluster: LocalSlurmCluster, root: Path, name: str, prepared_dir: Path, extra: tuple[str, ...] = ()
) -> tuple[str, Path, Path]:
    """sbatch the 64-GPU script scaled down; returns (job id, its log, its run folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHON=sys.executable,
        CONFIG="debug", RUNS_DIR=str(root / "runs"), TMPDIR=str(cluster.node_tmp), OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
    )  # fmt: skip
    args = [*SCALED_DOWN, f"--job-name={name}", f"--output={root}/%x-%j.out", str(SCRIPT),
            *OVERRIDES, f"data.prepared_dir={prepared_dir}", *extra]  # fmt: skip
    job_id = cluster.sbatch(args, env=env, cwd=REPO_ROOT)
    # The default run folder is new for each submission.
    return job_id, root / f"{name}-{job_id}.out", root / "runs" / f"{name}-{job_id}"


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def last_step(log_text: str) -> int:
    return max((int(step) for step, _ in STEP_LINE.findall(log_text)), default=0)


def requeued_and_completed(cluster, job_id: str, log: Path) -> dict[str, str]:
    """Wait for a signalled job to be requeued once and then to complete; its final scontrol info."""

    def back_in_queue(info: dict[str, str]) -> bool:
        return info.get("Restarts") == "1" and info.get("JobState") in ("PENDING", "RUNNING")

    requeued = cluster.wait_until(job_id, back_in_queue, 120, log, "get requeued")
    if requeued["JobState"] == "PENDING":
        # slurmctld holds a requeued job for 120 s (BeginTime); release it sooner, but not within the
        # second its old credential was revoked in (slurmd would refuse the new one).
        cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3", check=False)
    return cluster.wait_for_state(job_id, {"COMPLETED"}, JOB_TIMEOUT, log)


def checkpointed_losses(output_dir: Path) -> list[tuple[int, float]]:
    latest = (output_dir / "checkpoints" / "latest").read_text().strip()
    assert (output_dir / "checkpoints" / latest / "COMPLETE").exists()
    state = torch.load(output_dir / "checkpoints" / latest / "client_state.pt", weights_only=True)
    return [tuple(x) for x in state["losses"]]


def mlflow_runs(output_dir: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def full_run(cluster, tmp_path_factory, embedded_dataset):
    """An uninterrupted job; returns (job info, log text, run folder)."""
    root = tmp_path_factory.mktemp("full")
    job_id, log, output_dir = submit(cluster, root, "slurm-full", embedded_dataset.train.parent)
    info = cluster.wait_for_state(job_id, {"COMPLETED"}, JOB_TIMEOUT, log)
    return info, read_log(log), output_dir


def test_scripts_pass_bash_n_and_shellcheck():
    scripts = sorted(SLURM_DIR.glob("*.sh"))
    assert {p.name for p in scripts} >= {"train.sh", "pretrain_64gpu.sh"}
    for script in scripts:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    try:
        ensure_slurm_installed()  # shellcheck comes with the SLURM packages
    except SlurmUnavailable as err:
        pytest.skip(f"shellcheck cannot be installed here ({err}); bash -n passed")
    done = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_two_nodes_train_one_job(full_run):
    info, log, output_dir = full_run
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2", info
    assert "2 rank(s) on cpu" in log and "rendezvous 127.0.0.1:" in log, log[-3000:]
    losses = checkpointed_losses(output_dir)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    first, last = [sum(v for _, v in part) / 5 for part in (losses[:5], losses[-5:])]
    assert last < first - 1.0, losses
    assert (output_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists()
    runs = mlflow_runs(output_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    assert "train/loss" in runs[0].data.metrics


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(cluster, tmp_path, embedded_dataset, full_run):
    job_id, log, output_dir = submit(cluster, tmp_path, "slurm-preempt", embedded_dataset.train.parent)
    # Preempt after the periodic checkpoint of step 10: the resume must take the newer one.
    cluster.wait_until(job_id, lambda _: last_step(read_log(log)) >= 12, JOB_TIMEOUT, log, "reach step 12")
    # What --signal=B:USR1@600 does before the time limit: signal the batch shell only.
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    info = requeued_and_completed(cluster, job_id, log)

    text = read_log(log)
    assert info["Restarts"] == "1", info
    stopped = re.search(r"signal 10: checkpointing at step (\d+)", text)
    assert "got SIGUSR1: forwarding it to the training tasks" in text and stopped, text[-4000:]
    stop_step = int(stopped.group(1))
    assert 12 <= stop_step < STEPS
    assert f"requeueing job {job_id}" in text and f"job {job_id} 'slurm-preempt' restart 1" in text
    resume_tag = output_dir / "checkpoints" / f"step_{stop_step:08d}"
    assert f"resumed from {resume_tag} at step {stop_step}" in text
    # The resumed incarnation logs steps stop_step+1 .. STEPS, appended to the same log file.
    after_resume = text[text.index("resumed from") :]
    assert [int(s) for s, _ in STEP_LINE.findall(after_resume)] == list(range(stop_step + 1, STEPS + 1))

    resumed = checkpointed_losses(output_dir)
    assert [step for step, _ in resumed] == list(range(1, STEPS + 1))
    # Same samples, masks, weights and optimizer state: fp32 losses equal the uninterrupted run's.
    assert resumed == checkpointed_losses(full_run[2])
    runs = mlflow_runs(output_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs  # the requeued job continued the run


def test_cancelled_job_checkpoints_and_is_not_requeued(cluster, tmp_path, embedded_dataset):
    job_id, log, output_dir = submit(cluster, tmp_path, "slurm-cancel", embedded_dataset.train.parent)
    cluster.wait_until(job_id, lambda _: last_step(read_log(log)) >= 3, JOB_TIMEOUT, log, "reach step 3")
    cluster.run("scancel", job_id)
    info = cluster.wait_for_state(job_id, {"CANCELLED"}, 90, log)
    text = read_log(log)
    stopped = re.search(r"signal 15: checkpointing at step (\d+)", text)
    assert stopped and "while the job is COMPLETING: not requeueing" in text, text[-4000:]
    assert info["Restarts"] == "0" and cluster.job(job_id)["JobState"] == "CANCELLED"
    assert (output_dir / "checkpoints" / f"step_{int(stopped.group(1)):08d}" / "COMPLETE").exists()


def test_signal_during_start_up_requeues_and_the_job_completes(cluster, tmp_path, embedded_dataset):
    import psutil

    from tests.test_engine import _catches

    job_id, log, output_dir = submit(cluster, tmp_path, "slurm-startup", embedded_dataset.train.parent, ("train.duration=4",))

    def ranks_catch_usr1(_: dict[str, str]) -> bool:
        ranks = []
        for process in psutil.process_iter(["cmdline"]):
            command = process.info["cmdline"] or []
            # The ranks themselves, not srun (whose command line names the same script).
            if command[:1] == [sys.executable] and any(str(output_dir) in arg for arg in command):
                ranks.append(process)
        return len(ranks) == 2 and all(_catches(p, 10) for p in ranks)

    cluster.wait_until(job_id, ranks_catch_usr1, JOB_TIMEOUT, log, "start its ranks")
    # The ranks are importing torch: no step trained, no checkpoint, yet the job must come back.
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    info = requeued_and_completed(cluster, job_id, log)
    text = read_log(log)
    assert info["Restarts"] == "1", info
    assert "signal 10 during start-up" in text and "nothing to checkpoint" in text, text[-4000:]
    assert f"requeueing job {job_id}" in text and f"output {output_dir}" in text
    assert [step for step, _ in checkpointed_losses(output_dir)] == [1, 2, 3, 4]
