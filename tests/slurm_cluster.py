"""A real SLURM cluster on one machine, for tests: munged, slurmctld and two emulated nodes.

Debian's slurm 22.05 daemons are started by hand (no systemd) with a minimal slurm.conf under a
temporary folder. The nodes n1 and n2 both live on 127.0.0.1 with their own slurmd port; each
slurmd runs in its own mount namespace with a private tmpfs on /dev/shm, so that the shared memory
of mosaicml-streaming does not collide across "nodes", and one on `node_tmp`, a node-local TMPDIR
for jobs (streaming keeps file locks and shard copies there). Everything started here, and every
process of a job left in those namespaces, is stopped by PID in `stop()`.

  cluster = LocalSlurmCluster(tmp_dir); cluster.start()
  job_id = cluster.sbatch(["--nodes=2", "slurm/pretrain_64gpu.sh"], env=...)
  cluster.wait_for_state(job_id, {"COMPLETED"}, timeout=300)
  cluster.stop()
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "shellcheck")
SLURM_PROGRAMS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "munged", "shellcheck")
NODES = ("n1", "n2")
# States after which a job will not run again by itself.
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"})


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed here (no apt, not root, or apt unreachable)."""


def program(name: str) -> str | None:
    """The path of a SLURM or munge program; the daemons live in /usr/sbin, often not on PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def ensure_slurm_installed(timeout: float = 900) -> None:
    """Install Debian's SLURM and munge packages with apt-get if a program is missing.

    Raises SlurmUnavailable when that cannot be done here, RuntimeError when apt fails otherwise.
    """
    if all(program(p) for p in SLURM_PROGRAMS):
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and apt-get is not available")
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it with apt-get needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    update = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=timeout)
    if update.returncode != 0 or "Err:" in update.stdout:
        output = update.stdout[-800:] + update.stderr[-800:]
        raise SlurmUnavailable(f"apt-get update failed (repositories unreachable?): {output}")
    install = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *SLURM_PACKAGES],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if install.returncode != 0:
        output = install.stdout[-2000:] + install.stderr[-2000:]
        raise RuntimeError(f"apt-get install {' '.join(SLURM_PACKAGES)} failed:\n{output}")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


class LocalSlurmCluster:
    """munged + slurmctld + one slurmd per node in NODES, all under `root` (see module doc)."""

    def __init__(
        self, root: Path, cpus_per_node: int = 1, memory_mb: int = 4000, shm_size: str = "1g", tmp_size: str = "2g"
    ):
        self.root = Path(root)
        self.cpus_per_node = cpus_per_node
        self.memory_mb = memory_mb
        self.shm_size = shm_size
        self.tmp_size = tmp_size
        self.conf = self.root / "slurm.conf"
        # The same path on every node, a different tmpfs behind it on each (as a node-local /tmp is):
        # give it to jobs as TMPDIR, where streaming keeps its file locks and local shard copies.
        self.node_tmp = self.root / "node-tmp"
        self.hostname = socket.gethostname()
        # munged runs as the munge user, which cannot enter pytest's 0700 folders: its own folder.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="m2dist-munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self.processes: dict[str, subprocess.Popen] = {}
        # The nodes' mount namespaces, kept in case a slurmd dies before stop().
        self.namespaces: set[str] = set()
        self._logs: list = []

    @property
    def env(self) -> dict[str, str]:
        """os.environ with SLURM_CONF pointing at this cluster (for sbatch, squeue, scontrol ...)."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_config(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        state = self.root / "state"
        state.mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(
            f"NodeName={name} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus_per_node} RealMemory={self.memory_mb} State=UNKNOWN"
            for name, port in zip(NODES, node_ports)
        )
        self.conf.write_text(
            f"""ClusterName=m2dist-test
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={state}
SlurmdSpoolDir={self.root}/spool-%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self.munge_dir.chmod(0o755)
        self._spawn(
            "munged",
            [program("munged"), "--foreground", f"--key-file={key}", f"--socket={self.munge_socket}",
             f"--pid-file={self.munge_dir / 'munged.pid'}", f"--log-file={self.munge_dir / 'munged.log'}",
             f"--seed-file={self.munge_dir / 'munged.seed'}"],
            user=munge.pw_uid, group=munge.pw_gid,
        )  # fmt: skip
        self._wait(lambda: self.munge_socket.exists(), 20, "munged did not create its socket")

    def _spawn(self, name: str, command: list[str], **kwargs) -> None:
        log = open(self.root / f"{name}.stderr", "wb")
        self._logs.append(log)
        self.processes[name] = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env, **kwargs
        )

    def _wait(self, ready, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"{message}: {dead} exited\n{self.diagnostics()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{message} within {timeout:.0f}s\n{self.diagnostics()}")
            time.sleep(0.2)

    def start(self, timeout: float = 60) -> None:
        """Start every daemon and wait until sinfo shows both nodes idle; stops them on failure."""
        try:
            self.node_tmp.mkdir(parents=True, exist_ok=True)
            self._write_config()
            self._start_munge()
            self._spawn("slurmctld", [program("slurmctld"), "-D", "-f", str(self.conf)])
            for name in NODES:
                # A private /dev/shm and node_tmp per node; slurmstepd and the job's tasks inherit
                # the namespace.
                node_command = (
                    f"mount -t tmpfs -o size={self.shm_size} tmpfs /dev/shm && "
                    f"mount -t tmpfs -o size={self.tmp_size} tmpfs {self.node_tmp} && "
                    f"exec {program('slurmd')} -D -N {name} -f {self.conf}"
                )
                unshare = ["unshare", "--mount", "--propagation", "private"]
                self._spawn(f"slurmd-{name}", [*unshare, "sh", "-c", node_command])
            all_idle = {n: "idle" for n in NODES}
            self._wait(lambda: self.node_states() == all_idle, timeout, "the nodes did not become idle")
            ours = _mount_namespace(os.getpid())
            nodes = [p.pid for n, p in self.processes.items() if n.startswith("slurmd-")]
            self.namespaces = {_mount_namespace(pid) for pid in nodes} - {None, ours}
        except BaseException:
            self.stop()
            raise

    def run(self, *command: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster; returns stdout."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "--noheader", "--Node", "--format=%N %T", check=False)
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit a batch job (`sbatch --parsable ARGS`); returns its id."""
        job_env = dict(env if env is not None else os.environ, SLURM_CONF=str(self.conf))
        done = subprocess.run(
            ["sbatch", "--parsable", *args], env=job_env, cwd=cwd, capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, NodeList, Restarts, ExitCode, ...); {} once forgotten."""
        out = self.run("scontrol", "--oneliner", "show", "job", job_id, check=False)
        fields = {}
        for item in out.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_for_state(self, job_id: str, states: set[str], timeout: float, log: Path | None = None) -> dict[str, str]:
        """Wait until the job is in one of `states` (see `wait_until`)."""

        def in_state(info: dict[str, str]) -> bool:
            return info.get("JobState") in states

        return self.wait_until(job_id, in_state, timeout, log, f"reach {sorted(states)}")

    def wait_until(
        self,
        job_id: str,
        ready: Callable[[dict[str, str]], bool],
        timeout: float,
        log: Path | None = None,
        what: str = "",
    ) -> dict[str, str]:
        """Poll `scontrol show job` until `ready(info)`; returns info. If the job ends first or the
        time runs out, cancel it (also a job pending forever) and raise with its state and log tail."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if ready(info):
                return info
            ended = info.get("JobState") in FINAL_STATES
            if ended or time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
                why = "ended" if ended else f"timed out after {timeout:.0f}s and was cancelled"
                raise AssertionError(
                    f"job {job_id} did not {what}: it {why} in state {info.get('JobState')} "
                    f"(reason {info.get('Reason')})\n{tail}"
                )
            time.sleep(0.3)

    def diagnostics(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stderr")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def _job_processes(self) -> list[int]:
        """PIDs in the nodes' mount namespaces other than slurmd itself: slurmstepd and job tasks
        (slurmstepd is reparented away from slurmd, so the namespace is how to find them)."""
        daemons = {p.pid for n, p in self.processes.items() if n.startswith("slurmd-")}
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in daemons and _mount_namespace(int(entry)) in self.namespaces:
                pids.append(int(entry))
        return pids

    def stop(self) -> None:
        """Cancel every job, stop job processes and daemons by PID; idempotent."""
        if self.processes.get("slurmctld") is not None and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", pwd.getpwuid(os.getuid()).pw_name, check=False)
            deadline = time.monotonic() + 20
            while self.run("squeue", "--noheader", check=False).strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for pid in self._job_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in [n for n in self.processes if n.startswith("slurmd-")] + ["slurmctld", "munged"]:
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()
        shutil.rmtree(self.munge_dir, ignore_errors=True)
