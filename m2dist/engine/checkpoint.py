"""Training checkpoints: DeepSpeed's sharded state plus our client state, counted only when complete
and verified before they are loaded.

Layout under `<output_dir>/checkpoints/`:
  step_00000100/            DeepSpeed's files for that step (one writer per rank)
  step_00000100/rng_rank<r>.pt   each rank's RNG states
  step_00000100/client_state.pt  step, data loader state, losses, resolved config, MLflow run id (rank 0)
  step_00000100/manifest.json    size and SHA-256 of every file above, written once all are written
  step_00000100/COMPLETE    written last by rank 0: {format, step, world_size, manifest's SHA-256}
  step_00000100_universal/  DeepSpeed's universal form, made when resuming on another world size
  step_00000100.damaged/    a checkpoint that failed verification, set aside when an older one resumed
  latest                    the newest complete tag, replaced atomically
A folder without COMPLETE (a run killed while saving) is never loaded. A resume verifies the newest
complete checkpoint against its manifest (the ranks share the hashing) and scans its pickles (only
tensors, plain containers and DeepSpeed's few classes); a damaged one is named in a warning and the
next older one is tried. The newest K complete ones are kept.
"""

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2dist.checkpoint.io import check_torch_globals, safe_torch_load
from m2dist.engine.distributed import DistEnv, barrier, broadcast_object, gather_objects
from m2dist.errors import CheckpointError

log = logging.getLogger("m2dist")

COMPLETE = "COMPLETE"
CLIENT_STATE = "client_state.pt"
MANIFEST = "manifest.json"
UNIVERSAL_SUFFIX = "_universal"
DAMAGED_SUFFIX = ".damaged"
LATEST = "latest"
# The `format` of the COMPLETE marker: what makes a folder a training checkpoint of m2dist.
CHECKPOINT_FORMAT = "m2dist-training-checkpoint"
_TAG = re.compile(r"^step_(\d{8})$")
_CHUNK = 8 << 20


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_tags(root: Path) -> list[str]:
    """Tags with a completion marker, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG.match(p.name) and (p / COMPLETE).exists()]
    return sorted(tags)


def read_marker(folder: Path) -> dict[str, Any]:
    path = folder / COMPLETE
    try:
        marker = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not an m2dist completion marker (expected JSON): {err}") from None
    if not isinstance(marker, dict) or "step" not in marker or "world_size" not in marker:
        raise CheckpointError(f"{path}: not an m2dist completion marker: expected step and world_size, got {marker!r}")
    return marker


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """The files a save wrote into a tag folder (not the manifest, the marker or temporaries)."""
    return sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.name not in (COMPLETE, MANIFEST) and not p.name.startswith(".")
    )


def _share(items: list[Any], env: DistEnv | None) -> list[Any]:
    return items if env is None else items[env.rank :: env.world_size]


def _check_file(folder: Path, name: str, expected: dict[str, Any] | None) -> str | None:
    """What is wrong with one file of a tag, or None."""
    path = folder / name
    if not path.is_file():
        return f"{path}: missing"
    if expected is not None:
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path}: {size} bytes, the manifest says {expected['size']} (truncated or overwritten)"
        if file_sha256(path) != expected["sha256"]:
            return f"{path}: SHA-256 differs from the manifest's (its bytes changed after the save)"
    if name.endswith(".pt"):
        try:
            check_torch_globals(path)
        except CheckpointError as err:
            return str(err)
    return None


def verify_tag(folder: Path, env: DistEnv | None = None) -> list[str]:
    """Problems of a complete tag's files, each naming the file and what was expected; [] when
    intact. Collective when `env` is given: the ranks share the files. With a manifest, every file
    has its size and checksum; without one (a checkpoint of an older m2dist), every torch file must
    be a whole archive. Every torch file's pickle may hold tensors, plain containers and DeepSpeed's
    own classes only."""
    problems: list[str] = []
    manifest_entries: dict[str, Any] | None = None
    if env is None or env.is_main:
        try:
            marker = read_marker(folder)
            manifest_entries = _read_manifest(folder, marker)
        except CheckpointError as err:
            problems.append(str(err))
    problems, manifest_entries = broadcast_object((problems, manifest_entries), env)
    if problems:
        return problems
    if manifest_entries is None:
        names = sorted(p.name for p in folder.glob("*.pt"))
        checks = [(name, None) for name in names]
    else:
        unlisted = sorted(p.name for p in folder.glob("*.pt") if p.name not in manifest_entries)
        problems += [f"{folder / name}: not in the checkpoint's {MANIFEST}" for name in unlisted]
        checks = sorted(manifest_entries.items())
    mine = [problem for name, entry in _share(checks, env) if (problem := _check_file(folder, name, entry))]
    return problems + sorted(p for ps in gather_objects(mine, env) for p in ps)


def _read_manifest(folder: Path, marker: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's {file: {size, sha256}}, checked against the marker; None for a checkpoint
    written before manifests existed."""
    path = folder / MANIFEST
    if "manifest_sha256" not in marker:
        return None
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the {COMPLETE} marker names a manifest")
    if file_sha256(path) != marker["manifest_sha256"]:
        raise CheckpointError(f"{path}: SHA-256 differs from the one recorded in {folder / COMPLETE}")
    return json.loads(path.read_text())["files"]


def resume_candidates(root: Path) -> list[str]:
    """Complete tags, most preferred first: the one named by `latest`, then newest to oldest."""
    tags = complete_tags(root)[::-1]
    latest = root / LATEST
    if latest.exists():
        named = latest.read_text().strip()
        if named in tags:
            tags.remove(named)
            tags.insert(0, named)
    return tags


def find_resume_tag(root: Path, env: DistEnv | None = None, set_aside: bool = True) -> str | None:
    """Collective when `env` is given. The most preferred complete tag that verifies (see
    `verify_tag`), None when there is no complete tag. Each damaged tag tried is named in a warning
    and, once an intact one is found, set aside as `<tag>.damaged`, so that it is neither loaded
    nor counted among the newest kept ones (unless not `set_aside`: a folder only read). When every complete tag is damaged: CheckpointError
    listing the problems, nothing moved."""
    candidates = broadcast_object(resume_candidates(root), env)
    damaged: list[tuple[str, list[str]]] = []
    for tag in candidates:
        problems = verify_tag(root / tag, env)
        if not problems:
            if env is None or env.is_main:
                for bad, bad_problems in damaged:
                    moved = f"set aside as {_set_aside(root / bad).name}, " if set_aside else ""
                    log.warning("checkpoint %s is damaged: %s; %susing %s", root / bad, "; ".join(bad_problems[:3]), moved, tag)
            barrier()
            return tag
        damaged.append((tag, problems))
    if damaged:
        listing = "\n  ".join(f"{tag}: " + "; ".join(problems[:3]) for tag, problems in damaged)
        raise CheckpointError(
            f"{root}: no intact checkpoint to resume from:\n  {listing}\nmove the folder aside to start afresh"
        )
    return None


def _set_aside(folder: Path) -> Path:
    aside = folder.with_name(folder.name + DAMAGED_SUFFIX)
    index = 1
    while aside.exists():
        aside = folder.with_name(f"{folder.name}{DAMAGED_SUFFIX}{index}")
        index += 1
    folder.rename(aside)
    return aside


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
            torch_save(rng_state(), folder / f"rng_rank{self.env.rank}.pt")
            if self.env.is_main:
                torch_save(client_state, folder / CLIENT_STATE)
        except (OSError, RuntimeError) as err:
            raise _write_error(folder, err) from err
        barrier()
        manifest = self._manifest(folder)
        if self.env.is_main:
            try:
                _write_atomic(folder / MANIFEST, json.dumps({"algorithm": "sha256", "files": manifest}, indent=1) + "\n")
                marker = {
                    "format": CHECKPOINT_FORMAT, "step": step, "world_size": self.env.world_size, "time": time.time(),
                    "manifest_sha256": file_sha256(folder / MANIFEST),
                }  # fmt: skip
                _write_atomic(folder / COMPLETE, json.dumps(marker) + "\n")
            except OSError as err:
                raise _write_error(folder, err) from err
            _write_atomic(self.root / LATEST, tag + "\n")
            for old in complete_tags(self.root)[: -self.keep_last]:
                shutil.rmtree(self.root / old, ignore_errors=True)
                shutil.rmtree(self.root / (old + UNIVERSAL_SUFFIX), ignore_errors=True)
        barrier()
        return tag

    def _manifest(self, folder: Path) -> dict[str, dict[str, Any]]:
        """Collective: size and SHA-256 of every file of the tag, the ranks hashing a share each."""
        names = broadcast_object(checkpoint_files(folder) if self.env.is_main else None, self.env)
        mine = {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
                for name in _share(names, self.env)}  # fmt: skip
        return {name: entry for part in gather_objects(mine, self.env) for name, entry in part.items()}

    def needs_universal(self, tag: str) -> bool:
        """True when `tag` was saved by another number of ranks than this run has."""
        return int(read_marker(self.root / tag)["world_size"]) != self.env.world_size

    def prepare_universal(self, tag: str) -> str:
        """Collective: convert `tag` to DeepSpeed's universal checkpoint once (rank 0); returns its tag."""
        universal_tag = tag + UNIVERSAL_SUFFIX
        folder = self.root / universal_tag
        if self.env.is_main and not (folder / COMPLETE).exists():
            from argparse import Namespace

            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(folder, ignore_errors=True)
            ds_to_universal(
                Namespace(
                    input_folder=str(self.root / tag), output_folder=str(folder), num_extract_workers=2,
                    num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
                )
            )  # fmt: skip
            shutil.copy(self.root / tag / CLIENT_STATE, folder / CLIENT_STATE)
            shutil.copy(self.root / tag / COMPLETE, folder / COMPLETE)
        barrier()
        return universal_tag

    def load(self, engine, tag: str) -> dict[str, Any]:
        """Collective: restore engine state and, when the world size is unchanged, this rank's RNG;
        returns the client state."""
        path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{self.root / tag}: DeepSpeed could not load this checkpoint")
        rng_file = self.root / tag / f"rng_rank{self.env.rank}.pt"
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
