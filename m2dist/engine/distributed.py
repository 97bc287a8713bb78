"""Rank and world from the launcher's environment: deepspeed, torchrun or SLURM srun."""

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Where POSIX shared memory objects live on Linux.
SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value):
        """Rank 0's picklable `value`, on every rank."""
        return broadcast_object(value, self)

    def gather(self, value) -> list:
        """Every rank's picklable `value`, on every rank."""
        return gather_objects(value, self)

    def barrier(self) -> None:
        barrier()


def free_port() -> int:
    """A TCP port free on this host now (bound to port 0 and released), for a rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_tasks_on_this_node() -> int | None:
    """Tasks of this job step on this node, from e.g. SLURM_STEP_TASKS_PER_NODE="8(x2),4"."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts.extend([int(count)] * (int(repeat.rstrip(")")) if repeat else 1))
    return counts[int(os.environ.get("SLURM_NODEID", "0"))]


def _local_world_size() -> str:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE, or
    SLURM's tasks per node. mosaicml-streaming reads LOCAL_WORLD_SIZE to share one copy of each
    shard per node; without it every rank would take itself for a node leader."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if key in os.environ:
            return os.environ[key]
    slurm = _slurm_tasks_on_this_node()
    if slurm is not None:
        return str(slurm)
    if os.environ["WORLD_SIZE"] == "1":
        return "1"
    raise RuntimeError("LOCAL_WORLD_SIZE is not set: launch with deepspeed, torchrun or srun, or export it")


def read_env() -> DistEnv:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK (and a loopback rendezvous for a single process) in the
    environment from whichever launcher started us, and return them.

    - deepspeed and torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
    - `srun` sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the batch script sets MASTER_ADDR/PORT;
    - LOCAL_WORLD_SIZE (ranks on this node) is filled in for every launcher;
    - a plain `python m2dist/train.py` is rank 0 of 1 on 127.0.0.1.
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"under srun, {key} must be set by the batch script (see slurm/train.sh)")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if os.environ["WORLD_SIZE"] == "1":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ["LOCAL_WORLD_SIZE"] = _local_world_size()
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and pin this rank's GPU."""
    env = read_env()
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return env


def unlink_deepspeed_shm(env: DistEnv) -> None:
    """Collective. Remove the name of this rank's 66 MiB buffer that DeepSpeed's CPU communication
    op (shm_comm, used when all ranks share one host) creates in /dev/shm and never removes.
    Every rank maps every rank's buffer inside `deepspeed.initialize`, so once all have returned
    from it the names can go: the mappings stay valid, and nothing is left behind at exit, even
    after a SIGKILL."""
    barrier()
    # DeepSpeed's name: deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>.
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{env.rank}"
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass  # another launcher, several hosts or a GPU run: DeepSpeed made no buffer


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def leave_process_group() -> None:
    """Collective, just before a rank exits: wait for every rank, then tear the process group down.
    Left to the interpreter's exit, a gloo rank whose peer (and the rendezvous store it hosts on
    rank 0) has already gone can abort in the group's destructor ("terminate called without an
    active exception", status 134) instead of exiting with the status it chose."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abandon_process_group() -> None:
    """Tear a gloo process group down without waiting for the other ranks, on a rank that leaves on
    an error, where its peers need not reach a collective: now rather than in the interpreter's exit,
    where the group's destructor can abort the rank (`leave_process_group`) and replace the error's
    exit status with 134. NCCL groups are left to the exit: their teardown can wait on a collective
    that a peer never joins."""
    if dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()


def gather_objects(value, env: DistEnv | None = None) -> list:
    """Every rank's picklable `value`, on every rank (`[value]` when not distributed)."""
    if env is None or env.world_size == 1 or not dist.is_initialized():
        return [value]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value, env: DistEnv | None = None):
    """Rank 0's picklable `value`, on every rank."""
    if env is None or env.world_size == 1 or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (one collective)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()
