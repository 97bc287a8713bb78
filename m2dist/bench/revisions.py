"""The fine-tuning step, or the training engine's, at several revisions of the code, timed in turn in
one run.

A change to a kernel or to the step is worth a few percent of the step at most, less than what
separates two runs of the same code an hour apart, or the first and the second model of one run
(`benchmark_finetune_steps`). So each revision gets a process of its own (`revision_worker`,
which imports m2dist from that revision's tree), all of them on the same GPU, built and warmed up
one after the other; then they run blocks of steps in turn, one process at a time, the order
rotated every round, and each revision's step time is the median of its blocks.

A revision is a directory holding a tree of the repository (m2dist/, kernels/, configs/), or a
git revision of the repository this module belongs to, which is exported (`git archive`) into a
temporary directory for the run.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from m2dist.bench import revision_worker
from m2dist.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Revision:
    """A tree of the code to time, under a label for the table."""

    label: str
    tree: Path


def _export(revision: str, repo: Path, into: Path) -> Path:
    """The files of git revision `revision` of `repo`, extracted under `into`."""
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", revision], capture_output=True, check=False)
    if archive.returncode != 0:
        raise ConfigError(
            f"{revision!r} is neither a directory nor a git revision of {repo}: {archive.stderr.decode().strip()}"
        )
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


@contextmanager
def resolved(specs: list[str], repo: Path = REPO_ROOT) -> Iterator[list[Revision]]:
    """The revisions `specs` name, each `PATH`, `REV` or `LABEL=PATH|REV`, as trees on disk; git
    revisions are exported into a temporary directory that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="m2dist-revisions-") as scratch:
        revisions = []
        for index, spec in enumerate(specs):
            label, _, target = spec.rpartition("=")
            label = label or target
            if Path(target).is_dir():
                tree = Path(target).resolve()
            else:
                tree = _export(target, repo, Path(scratch).resolve() / f"{index}")
            if not (tree / "m2dist" / "bench" / "finetune.py").is_file():
                raise ConfigError(f"{tree} (revision {spec!r}) holds no m2dist/bench/finetune.py: not a tree of m2dist")
            revisions.append(Revision(label, tree))
        if len({r.label for r in revisions}) != len(revisions):
            raise ConfigError(f"two revisions share a label in {specs}: name them LABEL=PATH|REV")
        yield revisions


@dataclass
class Worker:
    """A running `revision_worker` process and the revision it times."""

    revision: Revision
    process: subprocess.Popen
    info: dict = field(default_factory=dict)

    def request(self, message: dict) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        return self.read_reply()

    def read_reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(revision_worker.REPLY):
                return json.loads(line[len(revision_worker.REPLY) :])
        code = self.process.wait()
        raise RuntimeError(f"the worker of revision {self.revision.label} ({self.revision.tree}) exited with code {code}; its errors are above")

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"quit": True}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()


def start_worker(revision: Revision, spec: dict) -> Worker:
    """The worker of `revision`, built and warmed up (its first steps and blocks until two agree)."""
    spec = {**spec, "tree": str(revision.tree)}
    launcher = (
        "import runpy, sys; sys.argv = [sys.argv[1], sys.argv[2]]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    # PYTHONPATH first: an editable install of another tree must not win over this revision's. A
    # worker is a process group of its own (the engine step): no launcher's rank or address.
    launcher_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_keys}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(revision.tree), os.environ.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [sys.executable, "-c", launcher, revision_worker.__file__, json.dumps(spec)],
        cwd=revision.tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    worker = Worker(revision, process)
    worker.info = worker.read_reply()
    if Path(worker.info["m2dist"]).resolve().parents[1] != revision.tree:
        worker.close()
        raise RuntimeError(f"revision {revision.label}'s worker imported m2dist from {worker.info['m2dist']}, not from {revision.tree}")
    return worker


def check_room_for_workers(started: list[dict], waiting: list[Revision], margin: float = 1.05) -> None:
    """Stop before a worker that would run out of GPU memory: every worker stays resident, so the
    ones still `waiting` need about what the largest of those `started` holds each (their ready
    replies' `held_gib`), and the GPU must have that free (`free_gib`, after the last one started).
    Without the figures (a CPU, a worker that does not report them) nothing is checked."""
    last = started[-1]
    held = [info.get("held_gib") for info in started]
    if not waiting or last.get("free_gib") is None or None in held:
        return
    needed = margin * max(held) * len(waiting)
    if last["free_gib"] < needed:
        fits = len(started) + int(last["free_gib"] // (margin * max(held)))
        advice = f"time at most {fits} revisions a run (the baseline in each)" if fits >= 2 else "a smaller batch"
        raise ConfigError(
            f"the revisions' workers would not fit in the GPU's memory: each holds up to {max(held):.1f} GiB "
            f"with this config and batch, {last['free_gib']:.1f} GiB is free after {len(started)} of them, and "
            f"{', '.join(r.label for r in waiting)} would need about {needed:.1f} GiB more; {advice}"
        )


@dataclass
class RevisionTiming:
    label: str
    batch_size: int
    step_ms: float
    blocks_ms: list[float]
    # The worker's peak of allocated GPU memory after its last block (None on a CPU).
    peak_gib: float | None = None


# The steps a revision's worker times: GLUE's fine-tuning step (`tools/eval_glue.py`), the training
# engine's (`m2dist/train.py`; one batch size a run), or the sequence mixer's forward and backward
# alone (the config's `kernels.mixer` path, bf16 projection).
STEPS = ("finetune", "engine", "mixer")


def time_revisions(
    revisions: list[Revision],
    config_name: str,
    batch_sizes: list[int],
    device: str,
    cuda_graph: bool,
    *,
    step: str = "finetune",
    overrides: tuple[str, ...] = (),
    seq_len: int = 128,
    first_steps: int = 20,
    block_steps: int = 40,
    rounds: int = 7,
    order_log: list[tuple[str, int]] | None = None,
) -> list[RevisionTiming]:
    """Each revision's `step` ("finetune", "engine" or "mixer") of `config_name` at each batch size
    (sequences a step), in ms: the median of `rounds` blocks of `block_steps` steps, the revisions
    taking turns block by block (one untimed round first, so that no revision starts timing after a
    long idle stretch), the first of each round rotating. `cuda_graph` is the fine-tuning step's
    (the engine's follows its config). `order_log`, given, records (label, batch) in the order
    blocks ran."""
    if step not in STEPS:
        raise ConfigError(f"step must be one of {STEPS}, got {step!r}")
    if step == "engine" and len(batch_sizes) != 1:
        raise ConfigError(f"the engine step is timed at one batch size a run (a process joins one process group), got {batch_sizes}")
    spec = {
        "step": step, "config": config_name, "overrides": list(overrides), "batch_sizes": list(batch_sizes),
        "device": device, "cuda_graph": cuda_graph, "seq_len": seq_len, "first_steps": first_steps,
        "block_steps": block_steps,
    }  # fmt: skip
    workers: list[Worker] = []
    try:
        for index, revision in enumerate(revisions):
            workers.append(start_worker(revision, spec))
            check_room_for_workers([w.info for w in workers], revisions[index + 1 :])
        blocks: dict[tuple[str, int], list[float]] = {(r.label, b): [] for r in revisions for b in batch_sizes}
        peaks: dict[tuple[str, int], float | None] = {}
        for round_index in range(rounds + 1):
            shift = round_index % len(workers)
            for batch in batch_sizes:
                for worker in workers[shift:] + workers[:shift]:
                    answer = worker.request({"batch": batch, "steps": block_steps})
                    seconds = answer["seconds"]
                    peaks[worker.revision.label, batch] = answer.get("peak_gib")
                    if round_index == 0:
                        continue
                    blocks[worker.revision.label, batch].append(1000 * seconds / block_steps)
                    if order_log is not None:
                        order_log.append((worker.revision.label, batch))
    finally:
        for worker in workers:
            worker.close()
    return [
        RevisionTiming(label, batch, statistics.median(times), times, peaks.get((label, batch)))
        for (label, batch), times in blocks.items()
    ]


def format_table(timings: list[RevisionTiming], baseline: str) -> str:
    """A markdown table: a row per batch size, ms/step per revision and each one's ratio to
    `baseline`'s, and where the workers ran on a GPU each one's peak of allocated memory."""
    labels = list(dict.fromkeys(t.label for t in timings))
    by_key = {(t.label, t.batch_size): t for t in timings}
    others = [label for label in labels if label != baseline]
    with_peaks = all(t.peak_gib is not None for t in timings)
    header = "| batch | " + " | ".join(f"{label} ms/step" for label in labels)
    header += "".join(f" | {label} / {baseline}" for label in others)
    header += "".join(f" | {label} peak GiB" for label in labels) if with_peaks else ""
    lines = [header + " |", "|" + "---|" * (1 + len(labels) + len(others) + (len(labels) if with_peaks else 0))]
    for batch in dict.fromkeys(t.batch_size for t in timings):
        base = by_key[baseline, batch].step_ms
        cells = [f"{by_key[label, batch].step_ms:.2f}" for label in labels]
        cells += [f"{by_key[label, batch].step_ms / base:.3f}x" for label in others]
        cells += [f"{by_key[label, batch].peak_gib:.1f}" for label in labels] if with_peaks else []
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
