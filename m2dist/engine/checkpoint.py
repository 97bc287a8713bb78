"""Training checkpoints: DeepSpeed's sharded state plus our client state, counted only when complete.

Layout under `<output_dir>/checkpoints/`:
  step_00000100/            DeepSpeed's files for that step (one writer per rank)
  step_00000100/rng_rank<r>.pt   each rank's RNG states
  step_00000100/client_state.pt  step, data loader state, losses, MLflow run id (rank 0)
  step_00000100/COMPLETE    written by rank 0 after every rank finished, last: {step, world_size}
  step_00000100_universal/  DeepSpeed's universal form, made when resuming on another world size
  latest                    the newest complete tag, replaced atomically
A folder without COMPLETE (a run killed while saving) is never loaded; the newest K complete ones
are kept.
"""

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2dist.engine.distributed import DistEnv, barrier

COMPLETE = "COMPLETE"
CLIENT_STATE = "client_state.pt"
UNIVERSAL_SUFFIX = "_universal"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d{8})$")


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
    return json.loads((folder / COMPLETE).read_text())


def find_resume_tag(root: Path) -> str | None:
    """The tag named by `latest` if complete, else the newest complete one, else None."""
    latest = root / LATEST
    if latest.exists():
        tag = latest.read_text().strip()
        if (root / tag / COMPLETE).exists():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


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
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        torch.save(rng_state(), folder / f"rng_rank{self.env.rank}.pt")
        if self.env.is_main:
            torch.save(client_state, folder / CLIENT_STATE)
        barrier()
        if self.env.is_main:
            marker = {"step": step, "world_size": self.env.world_size, "time": time.time()}
            _write_atomic(folder / COMPLETE, json.dumps(marker) + "\n")
            _write_atomic(self.root / LATEST, tag + "\n")
            for old in complete_tags(self.root)[: -self.keep_last]:
                shutil.rmtree(self.root / old, ignore_errors=True)
                shutil.rmtree(self.root / (old + UNIVERSAL_SUFFIX), ignore_errors=True)
        barrier()
        return tag

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
            set_rng_state(torch.load(rng_file, weights_only=True))
        return torch.load(self.root / tag / CLIENT_STATE, weights_only=True)
