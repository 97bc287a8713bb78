"""Two ranks (gloo, 2 processes): disjoint samples covering the epoch; a loader saved mid-epoch
and restored in new processes continues with the same samples and masks, on 2 ranks and on 1.

Each rank is a subprocess in its own session, under a timeout, killed as a group if it hangs
(DataLoader workers included). Run as `python -m tests.test_data_distributed ...` it is one rank.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2dist.data.corpus import EMBEDDED_CORPUS
from m2dist.data.prepare import prepare_mds
from m2dist.data.readers import read_documents

REPO = Path(__file__).resolve().parent.parent
SAMPLES = 640  # 2 ranks x 8 per batch x 40 batches: no padding, no dropped tail
MICRO_BATCH = 8
SAVE_AFTER = 13  # batches per rank before the state is saved
TIMEOUT_S = 150


def rank_main(job: dict) -> None:
    """One rank: read the epoch (saving the loader state after SAVE_AFTER batches), or restore a
    state and read the rest; write every batch to job['out']."""
    import torch.distributed as dist

    from m2dist.config import config_from_dict
    from m2dist.data.loader import build_mlm_dataloader

    dist.init_process_group("gloo")
    config = config_from_dict(
        {
            "model": {"l_max": 32},
            "train": {"seq_len": 32, "seed": 23},
            "data": {"train": job["shards"], "num_workers": 1, "cache_dir": job["cache"]},
        }
    )
    loader = build_mlm_dataloader(config, MICRO_BATCH)
    if job["state_in"]:
        loader.load_state_dict(json.loads(Path(job["state_in"]).read_text()))
    batches = []
    for batch in loader:
        batches.append({k: batch[k] for k in ("sample_index", "input_ids", "labels")})
        if job["state_out"] and len(batches) == SAVE_AFTER and dist.get_rank() == 0:
            Path(job["state_out"]).write_text(json.dumps(loader.state_dict()))
    torch.save(batches, job["out"])
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, job: dict, tmp: Path, tag: str) -> list[tuple[subprocess.Popen, Path]]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", TMPDIR=str(tmp / f"tmp-{tag}"))  # fmt: skip
        Path(env["TMPDIR"]).mkdir(exist_ok=True)
        rank_job = dict(job, out=str(tmp / f"{tag}-rank{rank}.pt"))
        log = tmp / f"{tag}-rank{rank}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_data_distributed", json.dumps(rank_job)],
            cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        procs.append((proc, log))
    return procs


def wait_all(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    try:
        failed = []
        for proc, log in procs:
            rc = proc.wait(timeout=TIMEOUT_S)
            if rc != 0:
                failed.append(f"{log.name} exited with {rc}:\n{log.read_text()[-3000:]}")
        # Every failed rank's log: the first to fail is often not the one that raised first.
        assert not failed, "\n\n".join(failed)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def flatten(batches: list[dict]) -> tuple[list[int], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    order = [int(i) for b in batches for i in b["sample_index"]]
    masks = {
        int(i): (ids, labels) for b in batches for i, ids, labels in zip(b["sample_index"], b["input_ids"], b["labels"])
    }
    return order, masks


@pytest.mark.slow
def test_two_ranks_split_the_epoch_and_resume_exactly(tmp_path):
    texts = [d.text for _, d in zip(range(SAMPLES), read_documents(EMBEDDED_CORPUS, "lines"))]
    (tmp_path / "docs.txt").write_text("".join(t + "\n" for t in texts))
    prepare_mds([tmp_path / "docs.txt"], tmp_path / "shards", None, 32, val_fraction=0.0, progress=False)
    job = {
        "shards": str(tmp_path / "shards" / "train"),
        "cache": str(tmp_path / "cache"),
        "state_in": "",
        "state_out": "",
    }
    state = tmp_path / "state.json"

    wait_all(launch(2, dict(job, state_out=str(state)), tmp_path, "full"))
    full = [torch.load(tmp_path / f"full-rank{r}.pt") for r in range(2)]
    orders = [flatten(batches)[0] for batches in full]
    assert len(orders[0]) == len(orders[1]) == SAMPLES // 2
    assert not set(orders[0]) & set(orders[1]), "ranks share samples"
    assert set(orders[0]) | set(orders[1]) == set(range(SAMPLES)), "the epoch is not covered"
    assert json.loads(state.read_text())["sample_in_epoch"] == 2 * SAVE_AFTER * MICRO_BATCH

    # The restores, in new processes: on 2 ranks, then on 1. One after the other: streaming takes
    # the first shared-memory prefix it finds free, and two jobs that start at the same moment on
    # one node can take the same one (FileExistsError: '/000000_locals').
    wait_all(launch(2, dict(job, state_in=str(state)), tmp_path, "resume2"))
    wait_all(launch(1, dict(job, state_in=str(state)), tmp_path, "resume1"))

    for rank in range(2):
        resumed = torch.load(tmp_path / f"resume2-rank{rank}.pt")
        expected = full[rank][SAVE_AFTER:]
        assert len(resumed) == len(expected)
        for a, b in zip(resumed, expected):
            assert all(torch.equal(a[k], b[k]) for k in ("sample_index", "input_ids", "labels"))

    # On 1 rank: the remaining samples in streaming's global order (the 2 ranks' sequences
    # interleaved sample by sample), with the same masks.
    rest_order, rest_masks = flatten(torch.load(tmp_path / "resume1-rank0.pt"))
    remaining = [flatten(batches[SAVE_AFTER:]) for batches in full]
    assert rest_order == [i for pair in zip(remaining[0][0], remaining[1][0]) for i in pair]
    for index in rest_order:
        expected = remaining[0][1].get(index) or remaining[1][1][index]
        assert torch.equal(rest_masks[index][0], expected[0]) and torch.equal(rest_masks[index][1], expected[1])


if __name__ == "__main__":
    rank_main(json.loads(sys.argv[1]))
