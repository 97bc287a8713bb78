"""Training checkpoints saved and loaded by all ranks at once around DeepSpeed's engine: DeepSpeed's
sharded state plus each rank's RNG states and rank 0's client state, hashed by the ranks into the
tag's manifest and marked complete last. The layout on disk (names, tags, markers, verification,
the universal form) is `m2dist.checkpoint.layout`'s.
"""

import errno
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2dist.checkpoint.io import safe_torch_load
from m2dist.checkpoint.layout import (
    CLIENT_STATE, COMPLETE, hash_files, make_universal, mark_complete, read_marker, remove_old_tags, rng_state_file,
    set_latest, tag_for_step, universal_tag,
)  # fmt: skip
from m2dist.engine.distributed import DistEnv, barrier
from m2dist.errors import CheckpointError


def rng_state() -> dict[str, Any]:
    """This process's RNG states in plain types, loadable with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": (has_gauss, cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy_state["kind"], keys, numpy_state["pos"], *numpy_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def torch_save(obj: Any, path: str | Path, **kwargs: Any) -> None:
    """torch.save through a Python file: a failed write then raises the OSError (with its errno,
    e.g. "No space left on device") and the file's name, where torch's own writer reports a bare
    "file write failed"."""
    try:
        with open(path, "wb") as file:
            torch.save(obj, file, **kwargs)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
    except RuntimeError as err:
        cause = _os_error_in(err)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from err


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError an exception was raised from or while handling, if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def name_failed_writes(engine) -> None:
    """Make DeepSpeed's torch checkpoint writer save through `torch_save`, so that a failed write
    names the file and the OS error (its other writers are left as they are)."""
    writer = getattr(engine, "checkpoint_engine", None)
    if type(writer).__name__ != "TorchCheckpointEngine" or getattr(writer, "_m2dist_named", False):
        return

    def save(state_dict, path: str) -> None:
        torch_save(state_dict, path, _use_new_zipfile_serialization=getattr(writer, "zipfile_serialization", True))

    writer.save = save
    writer._m2dist_named = True


class CheckpointManager:
    def __init__(self, root: Path, env: DistEnv, keep_last: int):
        self.root = root
        self.env = env
        self.keep_last = keep_last

    def save(self, engine, step: int, client_state: dict[str, Any]) -> str:
        """Collective: every rank calls it. Returns the tag."""
        tag = tag_for_step(step)
        folder = self.root / tag
        if self.env.is_main and folder.exists():
            # A leftover of a save that was cut short: it has no COMPLETE marker, start clean.
            shutil.rmtree(folder)
        barrier()
        name_failed_writes(engine)
        try:
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
            torch_save(rng_state(), folder / rng_state_file(self.env.rank))
            if self.env.is_main:
                torch_save(client_state, folder / CLIENT_STATE)
        except (OSError, RuntimeError) as err:
            raise _write_error(folder, err) from err
        barrier()
        files = hash_files(folder, self.env)
        if self.env.is_main:
            try:
                mark_complete(folder, step, self.env.world_size, files)
            except OSError as err:
                raise _write_error(folder, err) from err
            set_latest(self.root, tag)
            remove_old_tags(self.root, self.keep_last)
        barrier()
        return tag

    def needs_universal(self, tag: str) -> bool:
        """True when `tag` was saved by another number of ranks than this run has."""
        return int(read_marker(self.root / tag)["world_size"]) != self.env.world_size

    def prepare_universal(self, tag: str) -> str:
        """Collective: convert `tag` to DeepSpeed's universal checkpoint once (rank 0); returns its tag."""
        if self.env.is_main:
            make_universal(self.root, tag)
        barrier()
        return universal_tag(tag)

    def load(self, engine, tag: str) -> dict[str, Any]:
        """Collective: restore engine state and, when the world size is unchanged, this rank's RNG;
        returns the client state."""
        path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{self.root / tag}: DeepSpeed could not load this checkpoint")
        rng_file = self.root / tag / rng_state_file(self.env.rank)
        if rng_file.exists():
            set_rng_state(safe_torch_load(rng_file))
        return safe_torch_load(self.root / tag / CLIENT_STATE)


def _write_error(folder: Path, err: BaseException) -> CheckpointError:
    """A failed save, with the file (the folder when unknown), the OS error and the free space there."""
    os_error = _os_error_in(err)
    if os_error is not None and os_error.strerror:
        first_line = f"{os_error.strerror} (errno {os_error.errno}, {errno.errorcode.get(os_error.errno, '?')})"
    else:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    try:
        free = f"{shutil.disk_usage(folder if folder.exists() else folder.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    path = (os_error is not None and os_error.filename) or folder
    return CheckpointError(
        f"{path}: writing the checkpoint failed: {first_line} ({free}); it has no {COMPLETE} marker, "
        "so the previous complete checkpoint is still the one a relaunch resumes from"
    )
