"""The on-disk layout of the training engine's checkpoints: their names, tags and completion
markers, how a folder is recognised as one, verification, atomic writes and the conversion to
DeepSpeed's universal form.

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

The engine (`m2dist.engine.checkpoint`) saves and loads through DeepSpeed on all ranks at once; the
functions here that take `ranks` share their work between the processes of a run when given them
(the engine's `DistEnv`), and run in this process alone otherwise.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Protocol, TypeVar

from m2dist.checkpoint.io import check_torch_globals
from m2dist.errors import CheckpointError

log = logging.getLogger("m2dist")

# A training run's checkpoints folder, inside its output folder.
CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "COMPLETE"
CLIENT_STATE = "client_state.pt"
MANIFEST = "manifest.json"
UNIVERSAL_SUFFIX = "_universal"
DAMAGED_SUFFIX = ".damaged"
LATEST = "latest"
# ZeRO-0/1/2 write mp_rank_00_model_states.pt; ZeRO-3 one zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank.
MODEL_STATES = "mp_rank_00_model_states.pt"
# The `format` of the COMPLETE marker: what makes a folder a training checkpoint of m2dist.
CHECKPOINT_FORMAT = "m2dist-training-checkpoint"
# Names that only the training engine (m2dist or DeepSpeed) puts in a checkpoints folder or a tag folder.
CHECKPOINT_NAMES = (COMPLETE, CLIENT_STATE, MANIFEST, LATEST)
CHECKPOINT_PATTERNS = ("*model_states.pt", "*optim_states.pt", "step_*")
_TAG = re.compile(r"^step_(\d{8})$")
_CHUNK = 8 << 20

T = TypeVar("T")


class Ranks(Protocol):
    """The processes of a run that share one call's work (the engine's `DistEnv`)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def broadcast(self, value: T) -> T:
        """Rank 0's picklable `value`, on every rank."""

    def gather(self, value: Any) -> list[Any]:
        """Every rank's picklable `value`, on every rank."""

    def barrier(self) -> None: ...


class _ThisProcess:
    """This process alone: nothing to share or wait for."""

    rank = 0
    world_size = 1
    is_main = True

    def broadcast(self, value: T) -> T:
        return value

    def gather(self, value: Any) -> list[Any]:
        return [value]

    def barrier(self) -> None:
        pass


THIS_PROCESS: Ranks = _ThisProcess()


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def universal_tag(tag: str) -> str:
    """The tag of `tag`'s universal form, beside it in the checkpoints folder."""
    return tag + UNIVERSAL_SUFFIX


def rng_state_file(rank: int) -> str:
    """The file of a tag that holds rank `rank`'s RNG states."""
    return f"rng_rank{rank}.pt"


def checkpoint_markers(path: Path) -> list[str]:
    """The names in folder `path` that mark the training engine's checkpoints folder or a tag folder."""
    found = {name for name in CHECKPOINT_NAMES if (path / name).exists()}
    for pattern in CHECKPOINT_PATTERNS:
        found.update(p.name for p in path.glob(pattern))
    return sorted(found)


def run_markers(path: Path) -> list[str]:
    """The names in folder `path` that mark a training run, its checkpoints folder or a tag folder."""
    found = checkpoint_markers(path)
    if (path / CHECKPOINTS_DIR).exists():
        found = sorted([*found, CHECKPOINTS_DIR])
    return found


def is_training_checkpoint(path: str | Path) -> bool:
    """True for a run folder, a checkpoints folder or a tag folder of the training engine."""
    path = Path(path)
    return path.is_dir() and bool(run_markers(path))


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never part of it."""
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


def _share(items: list[T], ranks: Ranks) -> list[T]:
    return items[ranks.rank :: ranks.world_size]


def hash_files(folder: Path, ranks: Ranks = THIS_PROCESS) -> dict[str, dict[str, Any]]:
    """Collective when `ranks` are given: size and SHA-256 of every file of the tag, the ranks
    hashing a share each."""
    names = ranks.broadcast(checkpoint_files(folder) if ranks.is_main else None)
    mine = {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
            for name in _share(names, ranks)}  # fmt: skip
    return {name: entry for part in ranks.gather(mine) for name, entry in part.items()}


def mark_complete(folder: Path, step: int, world_size: int, files: dict[str, dict[str, Any]]) -> None:
    """Write the tag's manifest of `files` (see `hash_files`), then its COMPLETE marker, each atomically."""
    write_atomic(folder / MANIFEST, json.dumps({"algorithm": "sha256", "files": files}, indent=1) + "\n")
    marker = {
        "format": CHECKPOINT_FORMAT, "step": step, "world_size": world_size, "time": time.time(),
        "manifest_sha256": file_sha256(folder / MANIFEST),
    }  # fmt: skip
    write_atomic(folder / COMPLETE, json.dumps(marker) + "\n")


def set_latest(root: Path, tag: str) -> None:
    write_atomic(root / LATEST, tag + "\n")


def remove_old_tags(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete tags, with their universal forms."""
    for old in complete_tags(root)[:-keep_last]:
        shutil.rmtree(root / old, ignore_errors=True)
        shutil.rmtree(root / universal_tag(old), ignore_errors=True)


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


def verify_tag(folder: Path, ranks: Ranks = THIS_PROCESS) -> list[str]:
    """Problems of a complete tag's files, each naming the file and what was expected; [] when
    intact. Collective when `ranks` are given: the ranks share the files. With a manifest, every
    file has its size and checksum; without one (a checkpoint of an older m2dist), every torch file
    must be a whole archive. Every torch file's pickle may hold tensors, plain containers and
    DeepSpeed's own classes only."""
    problems: list[str] = []
    manifest_entries: dict[str, Any] | None = None
    if ranks.is_main:
        try:
            marker = read_marker(folder)
            manifest_entries = _read_manifest(folder, marker)
        except CheckpointError as err:
            problems.append(str(err))
    problems, manifest_entries = ranks.broadcast((problems, manifest_entries))
    if problems:
        return problems
    if manifest_entries is None:
        names = sorted(p.name for p in folder.glob("*.pt"))
        checks = [(name, None) for name in names]
    else:
        unlisted = sorted(p.name for p in folder.glob("*.pt") if p.name not in manifest_entries)
        problems += [f"{folder / name}: not in the checkpoint's {MANIFEST}" for name in unlisted]
        checks = sorted(manifest_entries.items())
    mine = [problem for name, entry in _share(checks, ranks) if (problem := _check_file(folder, name, entry))]
    return problems + sorted(p for ps in ranks.gather(mine) for p in ps)


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


def find_resume_tag(root: Path, ranks: Ranks = THIS_PROCESS, set_aside: bool = True) -> str | None:
    """Collective when `ranks` are given. The most preferred complete tag that verifies (see
    `verify_tag`), None when there is no complete tag. Each damaged tag tried is named in a warning
    and, once an intact one is found, set aside as `<tag>.damaged`, so that it is neither loaded
    nor counted among the newest kept ones (unless not `set_aside`: a folder only read). When every
    complete tag is damaged: CheckpointError listing the problems, nothing moved."""
    candidates = ranks.broadcast(resume_candidates(root))
    damaged: list[tuple[str, list[str]]] = []
    for tag in candidates:
        problems = verify_tag(root / tag, ranks)
        if not problems:
            if ranks.is_main:
                for bad, bad_problems in damaged:
                    moved = f"set aside as {_set_aside(root / bad).name}, " if set_aside else ""
                    log.warning("checkpoint %s is damaged: %s; %susing %s", root / bad, "; ".join(bad_problems[:3]), moved, tag)
            ranks.barrier()
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


def make_universal(root: Path, tag: str) -> str:
    """Convert the tag `root/tag` to DeepSpeed's universal checkpoint at `root/<tag>_universal`
    (ds_to_universal with the missing ZeRO-1/2 state injected, then the tag's client state and
    COMPLETE marker), unless a complete one is there already; returns its tag. DeepSpeed also
    writes `root/latest_universal`."""
    made = universal_tag(tag)
    folder = root / made
    if not (folder / COMPLETE).exists():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(folder, ignore_errors=True)
        ds_to_universal(
            Namespace(
                input_folder=str(root / tag), output_folder=str(folder), num_extract_workers=2,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
            )
        )  # fmt: skip
        shutil.copy(root / tag / CLIENT_STATE, folder / CLIENT_STATE)
        shutil.copy(root / tag / COMPLETE, folder / COMPLETE)
    return made
