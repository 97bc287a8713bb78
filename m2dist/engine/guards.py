"""What keeps a run from harming itself: an exclusive lock on its folder, the non-finite step limit,
and the comparison of a resumed config with its checkpoint's."""

from __future__ import annotations

import atexit
import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from m2dist.errors import ConfigDrift, NonFiniteTraining, RunFolderLocked

LOCK_FILE = ".m2dist.lock"
# The holder refreshes the lock file's mtime this often; a lock left unrefreshed for STALE_AFTER_S
# belongs to a job that died on another machine.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID", ""),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`<folder>/.m2dist.lock`, created exclusively and naming its holder (host, pid, SLURM job),
    refreshed by a heartbeat thread and removed on release or at exit.

    A lock is stale, and taken over with a note, when its holder ran on this host and its process
    is gone, when it belongs to an earlier run of this same SLURM job (a requeue), or when its
    heartbeat stopped more than STALE_AFTER_S ago (a job that died on another node). A plain file
    rather than flock(): the locks of network file systems are unreliable where run folders live.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.me = _holder()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise RunFolderLocked; returns a note when a stale lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, stale_because = self._inspect()
                if stale_because is None:
                    raise RunFolderLocked(self._in_use_message(holder)) from None
                # Renaming is atomic: of two jobs taking over the same stale lock, one wins.
                try:
                    os.replace(self.path, self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}"))
                    os.unlink(self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}"))
                except FileNotFoundError:
                    pass
                note = f"took over the stale lock {self.path} of {_describe(holder)}: {stale_because}"
                continue
            with os.fdopen(fd, "w") as file:
                json.dump(self.me, file)
            self._thread = threading.Thread(target=self._heartbeat, daemon=True)
            self._thread.start()
            atexit.register(self.release)
            return note
        raise RunFolderLocked(f"{self.path}: could not take the lock; another job keeps taking it")

    def _inspect(self) -> tuple[dict[str, Any], str | None]:
        """(holder, why the lock is stale or None while it is live)."""
        try:
            holder = json.loads(self.path.read_text() or "{}")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return {}, "it was released meanwhile"
        except (json.JSONDecodeError, UnicodeDecodeError):
            holder, age = {}, time.time() - self.path.stat().st_mtime
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
            return holder, f"process {holder['pid']} is no longer running"
        if holder.get("job") and holder.get("job") == self.me["job"]:
            return holder, f"an earlier run of this SLURM job {holder['job']} (requeued)"
        if age > STALE_AFTER_S:
            return holder, f"its heartbeat stopped {age:.0f} s ago"
        return holder, None

    def _in_use_message(self, holder: dict[str, Any]) -> str:
        return (
            f"{self.path.parent}: this run folder is in use by {_describe(holder)} (lock {self.path}); two jobs "
            "on one folder would overwrite each other's checkpoints and metrics. Wait for that job, or give "
            "this one another train.output_dir"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        self._stop.set()
        try:
            if json.loads(self.path.read_text()) == self.me:
                self.path.unlink()
        except (FileNotFoundError, json.JSONDecodeError):
            pass


def _describe(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "an unknown job (unreadable lock file)"
    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
    return f"process {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


class NonFiniteCounter:
    """Counts optimizer steps in a row whose loss or gradient norm is not finite; more than `limit`
    of them raise NonFiniteTraining (under ZeRO-1/2, DeepSpeed discards the update of a step whose
    gradient norm is not finite, so up to `limit` such steps are ridden out)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.run: list[int] = []

    def record(self, step: int, loss: float, grad_norm: float, last_checkpoint: str | None) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.run = []
            return
        self.run.append(step)
        if len(self.run) > self.limit:
            steps = f"step {step}" if len(self.run) == 1 else f"steps {self.run[0]}-{step}"
            raise NonFiniteTraining(
                f"{steps}: loss {loss}, gradient norm {grad_norm}: {len(self.run)} optimizer step(s) in a row with a "
                f"non-finite loss or gradient norm, more than train.max_nonfinite_steps={self.limit}. Training has "
                f"diverged; nothing was saved after it (last checkpoint: {last_checkpoint or 'none'}). Lower "
                "train.optimizer.lr, raise train.warmup_fraction or set train.grad_clip"
            )


# Settings a resume may not change unless `train.resume_allow_changes` names them (or their section):
# they change the model, or which samples come in which order with which masks. Everything else
# (duration, cadences, tracking, loader workers, ...) may change and is listed in the log.
RESUME_FIXED = (
    "model", "data.train", "data.tokenizer", "data.shuffle", "data.shuffle_block_size", "train.global_batch_size",
    "train.seq_len", "train.mlm_probability", "train.seed", "train.zero_stage",
)  # fmt: skip
# Implementation choices that compute the same model.
RESUME_FREE = ("model.kernels",)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _under(key: str, sections: Iterable[str]) -> bool:
    return any(key == s or key.startswith(s + ".") for s in sections)


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, current value) for every key that differs, sorted."""
    old, new = flatten(saved), flatten(current)
    missing = object()
    changes = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after:
            changes.append((key, None if before is missing else before, None if after is missing else after))
    return changes


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str], source: str) -> list[str]:
    """Raise ConfigDrift listing the changes to fixed settings that `allowed` does not name; return
    the other changes as `key: old -> new` lines for the log."""
    allowed = tuple(allowed)
    fixed, free = [], []
    for key, before, after in config_changes(saved, current):
        if key == "train.resume_allow_changes":
            continue
        line = f"{key}: {before!r} in the checkpoint, {after!r} now"
        if _under(key, RESUME_FIXED) and not _under(key, RESUME_FREE) and not _under(key, allowed):
            fixed.append(line)
        else:
            free.append(line)
    if fixed:
        raise ConfigDrift(
            f"{source}: the config differs from the checkpoint's in settings that change the model or the data "
            "order:\n  " + "\n  ".join(fixed) + "\nresume with the checkpoint's values, start a new train.output_dir, "
            "or allow the change explicitly, e.g. train.resume_allow_changes=[" + fixed[0].split(":")[0] + "]"
        )
    return free
