"""Streaming MLM batches from MDS shards, with exact resume: what the training engine consumes.

Shapes: B = micro-batch size (per rank), L = sequence length (the shards' max_len).

`build_mlm_dataloader(cfg, micro_batch_size)` returns a `StreamingDataLoader` (`MLMDataLoader`) whose
batches are dicts of CPU tensors:
    input_ids       (B, L) int64  ids after MLM corruption ([MASK] / random / kept)
    attention_mask  (B, L) int64  1 on tokens, 0 on padding; left out where every stream was made in
                                  concat mode, whose samples are all full windows (`full_rows`):
                                  the models then take no mask, and BERT's attention runs SDPA's
                                  flash kernel, which a mask, even one of all ones, rules out
    token_type_ids  (B, L) int64  zeros (one segment)
    labels          (B, L) int64  the original id where selected for prediction, -100 elsewhere
    sample_index    (B,)   int64  global index of the sample in the dataset (logging, tests)
Its `state_dict()` / `load_state_dict()` go into checkpoints: a restored loader continues with the
same samples, and, since masks depend only on (seed, epoch, sample index), the same masks, also
on another number of ranks. Rank and world come from the launcher's environment (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); initialise torch.distributed before building.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.format.mds.reader import MDSReader

from m2dist.config import Config, StreamSpec, parse_streams
from m2dist.data import mapped_shards
from m2dist.data.corpus import default_prepared_dir, prepare_default_dataset
from m2dist.data.manifest import Expected, Manifest, check_manifest, read_manifest
from m2dist.data.masking import mask_samples
from m2dist.data.sample_loop import ChunkedSampleLoop
from m2dist.data.tokenizer import SpecialIds, file_sha256, tokenizer_file
from m2dist.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Names of streaming's shared-memory segments: a 6-digit prefix and one of its SHM_TO_CLEAN names.
STREAMING_SHM = re.compile(
    r"^\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume|epoch_shape|epoch_data)$"
)


def clean_stale_shared_memory(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink streaming's shared-memory segments that no live process maps; returns their names.

    A run killed with SIGKILL leaves them behind and a later run fails (`FileExistsError`,
    `Reused local directory`). Unlike `streaming.base.util.clean_stale_shared_memory`, which
    unlinks every segment it finds (and stops at the first free prefix), this keeps those of other
    jobs that are still running on the node, so it is safe on a shared machine.
    """
    if not os.path.isdir(shm_dir):
        return []
    candidates = {name for name in os.listdir(shm_dir) if STREAMING_SHM.match(name)}
    if not candidates:
        return []
    in_use = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    if shm_dir in line:
                        in_use.add(os.path.basename(line.split()[-1]))
        except (FileNotFoundError, ProcessLookupError):
            continue
        except PermissionError:
            # Another user's process: its segments are not ours to remove either.
            continue
    removed = []
    for name in sorted(candidates - in_use):
        path = os.path.join(shm_dir, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            os.unlink(path)
            removed.append(name)
        except (FileNotFoundError, PermissionError):
            continue
    if removed:
        log.warning("removed %d stale streaming shared-memory segments: %s", len(removed), ", ".join(removed))
    return removed


@contextlib.contextmanager
def streaming_registration_lock():
    """Held by each job's local rank 0 while it builds a StreamingDataset: one job of the node at a
    time registers its shared memory.

    streaming gives each dataset a numeric prefix for its shared-memory segments: the local leader
    looks for the first prefix without segments, then creates `<prefix>_locals`. Two jobs that start
    on one node at the same moment can pick the same prefix, and the second one then dies inside
    streaming with `FileExistsError: '/000384_locals'`. Under this lock the second job looks after
    the first has registered, and finds the next prefix. An exclusive `flock` on a file in the
    temporary folder (where streaming keeps its own locks), released by the kernel if the holder
    dies; other ranks of the job wait for their leader inside streaming and do not take it.
    """
    if _local_rank() != 0:
        yield
        return
    folder = Path(tempfile.gettempdir())
    path = folder / "m2dist-streaming-register.lock"
    try:
        handle = open(path, "a")
    except PermissionError:
        # Another user's lock file in a sticky folder: serialise at least this user's jobs.
        handle = open(folder / f"m2dist-streaming-register-{os.getuid()}.lock", "a")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job on this node to build its data loader (lock %s)", handle.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def job_cache_dir(root: str = "") -> Path:
    """A folder for streaming's local copies of the shards, new for each job: the same path on
    every rank of the job (rank 0 picks it), under `root` or the system temporary folder."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but torch.distributed is not initialised: "
            "initialise it before building a data loader, so that all ranks share one cache folder"
        )
    job = os.environ.get("SLURM_JOB_ID", "local")
    name = [f"m2dist-cache-{job}-{uuid.uuid4().hex[:12]}"]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    return Path(root or tempfile.gettempdir()) / name[0]


@dataclass(frozen=True)
class MaskingSpec:
    """How samples are corrupted: rate, special ids (never masked), id range of random tokens."""

    probability: float
    special: SpecialIds
    # Random replacements are drawn from [0, vocab_size): the tokenizer's real tokens.
    vocab_size: int
    seed: int
    # True for validation: every pass masks as epoch 0, so evaluations are comparable.
    same_masks_every_epoch: bool = False


# How often a process sets the access time of a shard it reads (streaming's cache evicts the shard
# read longest ago first, where a cache limit is set).
ACCESS_TIME_STEP_NS = 100_000_000


class MLMStreamingDataset(ChunkedSampleLoop, StreamingDataset):
    """StreamingDataset of MLM examples of length L, padded; `MLMCollator` masks them into the
    batches of the module docstring. Its sample loops step over runs of samples
    (`ChunkedSampleLoop`)."""

    def __init__(self, *, seq_len: int, masking: MaskingSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seq_len = seq_len
        self.masking = masking
        self.epoch_of_work = 0
        # Per shard read through its memory map: (raw file, value dtype of `single_array_dtype`).
        self._shard_layouts: dict[int, tuple[str, np.dtype | None]] = {}
        # When this process last set each shard's access time.
        self._access_times_set: dict[int, int] = {}

    def _get_work(self, epoch: int, sample_in_epoch: int) -> np.ndarray:
        # __iter__ calls this once per epoch in each worker, before any sample is read: the one
        # place where the epoch is known for sure (the shared next_epoch counter is bumped by
        # the local leader at a moment other workers do not see).
        self.epoch_of_work = epoch
        return super()._get_work(epoch, sample_in_epoch)

    def _shard_of(self, sample_id: int) -> str:
        """The shard file holding a sample, as `<stream>/<file>`."""
        shard_id, _ = self.spanner[sample_id]
        shard = self.shards[shard_id]
        stream = self.streams[self.stream_per_shard[shard_id]]
        info = getattr(shard, "zip_data", None) or getattr(shard, "raw_data", None)
        name = getattr(info, "basename", f"shard {shard_id}")
        return f"{(stream.remote or stream.local).rstrip('/')}/{name}"

    def _stored_ids(self, sample_id: int, retry: int) -> np.ndarray:
        """A sample's stored token ids: read through the shard's memory map (`mapped_shards`) when
        the shard is an MDS file on local disk, else by streaming, which downloads it first."""
        shard_id, index_in_shard = self.shard_and_index(sample_id)
        shard = self.shards[shard_id]
        if isinstance(shard, MDSReader) and not (hasattr(self, "_event") and self._event.is_set()):
            layout = self._shard_layouts.get(shard_id)
            if layout is None:
                layout = self._shard_layouts[shard_id] = (mapped_shards.raw_path(shard), mapped_shards.single_array_dtype(shard))
            path, dtype = layout
            try:
                data = mapped_shards.sample_bytes_at(path, index_in_shard)
            except FileNotFoundError:
                pass
            else:
                # As streaming's own read does: the access time orders its cache evictions (set at
                # most every ACCESS_TIME_STEP_NS a shard: a write to shared memory costs microseconds).
                now = time.time_ns()
                if now - self._access_times_set.get(shard_id, 0) > ACCESS_TIME_STEP_NS:
                    self._shard_access_times[shard_id] = now
                    self._access_times_set[shard_id] = now
                if dtype is not None:
                    try:
                        return mapped_shards.decode_single_array(data, dtype)
                    except ValueError as exc:
                        raise DataError(f"{self._shard_of(sample_id)}: sample {sample_id}: {exc}") from exc
                return shard.decode_sample(data)["input_ids"]
        return super().get_item(sample_id, retry)["input_ids"]

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, np.ndarray | int]:
        """One sample as numpy, not yet masked (`MLMCollator` masks and makes the tensors a batch at
        a time): input_ids (L,) int64 padded, length (tokens before padding), sample_index, and the
        epoch whose masks it takes."""
        stored = self._stored_ids(sample_id, retry)
        length = len(stored)
        if length > self.seq_len:
            raise DataError(f"sample {sample_id} has {length} tokens, more than the loader's {self.seq_len}")
        if length and int(stored.max()) >= self.masking.vocab_size:
            raise DataError(
                f"{self._shard_of(sample_id)}: sample {sample_id} holds token id {int(stored.max())}, not below the "
                f"vocabulary size {self.masking.vocab_size} of its manifest; make the shards again with tools/prepare_mds.py"
            )
        ids_L = np.full(self.seq_len, self.masking.special.pad, dtype=np.int64)
        ids_L[:length] = stored
        epoch = 0 if self.masking.same_masks_every_epoch else self.epoch_of_work
        return {"input_ids": ids_L, "length": length, "sample_index": int(sample_id), "epoch": epoch}


# GIL switch interval of loader worker processes. Each worker runs streaming's two helper threads
# (shard prepare/ready, which take a lock per sample) beside the sample loop; whenever the loop
# releases the GIL (file reads, numpy's generator) it waited up to Python's default 5 ms for it
# back. 0.5 ms gave 1.3x the tokens/s of one worker at L=128 on an H200 node's CPU.
WORKER_SWITCH_INTERVAL_S = 0.0005


def _init_worker(worker_id: int) -> None:
    sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)


# The rows of a collated batch's "packed" tensor (3, B, L), in order.
PACKED_ROWS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class MLMCollator:
    """Masks a list of MLMStreamingDataset samples (each row as `mask_sample` would, keyed by its
    seed, epoch and sample index) and packs them for the passage from a loader worker:
    {"sample_index": (B,), "packed": (3, B, L)} with the rows of PACKED_ROWS, int64. `unpack_batch`
    makes the batch of the module docstring of it. (Each tensor a worker passes costs a shared-memory
    segment of its own: five of them took half a worker's time at L=128 on 2 cores.)"""

    masking: MaskingSpec

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        stored_BL = np.stack([s["input_ids"] for s in samples])
        sample_index_B = [s["sample_index"] for s in samples]
        corrupted_BL, labels_BL = mask_samples(
            stored_BL,
            mask_token_id=self.masking.special.mask,
            vocab_size=self.masking.vocab_size,
            probability=self.masking.probability,
            special_ids=self.masking.special.as_tuple(),
            seed=self.masking.seed,
            epochs_B=[s["epoch"] for s in samples],
            sample_indices_B=sample_index_B,
        )
        lengths_B = np.array([s["length"] for s in samples])
        packed = np.empty((len(PACKED_ROWS), *stored_BL.shape), dtype=np.int64)
        packed[0] = corrupted_BL
        packed[1] = np.arange(stored_BL.shape[1])[None, :] < lengths_B[:, None]
        packed[2] = labels_BL
        return {"sample_index": torch.tensor(sample_index_B, dtype=torch.int64), "packed": torch.from_numpy(packed)}


def unpack_batch(collated: dict[str, torch.Tensor], full_rows: bool = False) -> dict[str, torch.Tensor]:
    """The batch of the module docstring from `MLMCollator`'s packed form (views of its tensor, and
    the token types, all zeros, made here, in pinned memory where the loader pinned the batch, so
    that its copy to the GPU does not wait either); without the attention mask if `full_rows`."""
    input_ids, attention_mask, labels = collated["packed"].unbind(0)
    batch = {"input_ids": input_ids}
    if not full_rows:
        batch["attention_mask"] = attention_mask
    batch["token_type_ids"] = torch.zeros(input_ids.shape, dtype=input_ids.dtype, pin_memory=input_ids.is_pinned())
    batch["labels"] = labels
    batch["sample_index"] = collated["sample_index"]
    return batch


class MLMDataLoader(StreamingDataLoader):
    """A StreamingDataLoader of `MLMCollator`'s packed batches that yields them unpacked
    (`unpack_batch`); its resumable state counts samples as streaming's does. `full_rows`: every
    sample fills its L positions (all streams made in concat mode), so batches carry no attention
    mask."""

    def __init__(self, *args: Any, full_rows: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.full_rows = full_rows

    def _get_batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["sample_index"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for collated in super().__iter__():
            yield unpack_batch(collated, self.full_rows)


def close_mlm_dataloader(loader: StreamingDataLoader) -> None:
    """Stop the shard-prefetch threads a loader with num_workers=0 leaves running when its epoch
    is not read to the end; call before deleting its cache. (Worker processes stop by themselves
    when the loop over the loader is left.)"""
    iterator = getattr(loader.dataset, "_iterator", None)
    if iterator is not None:
        iterator.exit()


def checked_manifests(streams: Sequence[StreamSpec], expected: Expected, download_dir: Path) -> list[Manifest]:
    """Each stream's manifest, checked against `expected`; all streams must agree on the layout."""
    manifests = []
    for index, stream in enumerate(streams):
        location = f"{stream.path.rstrip('/')}/m2dist_manifest.json"
        manifest = read_manifest(stream.path, download_dir / f"manifest-{index}")
        check_manifest(manifest, expected, location)
        manifests.append(manifest)
    first = manifests[0]
    for stream, manifest in zip(streams[1:], manifests[1:]):
        if (manifest.special_ids, manifest.vocab_size) != (first.special_ids, first.vocab_size):
            raise DataError(f"{stream.path}: special ids or vocab size differ from {streams[0].path}")
    return manifests


def build_mlm_dataset(
    streams: Sequence[StreamSpec],
    *,
    manifest: Manifest,
    seq_len: int,
    micro_batch_size: int,
    mlm_probability: float,
    seed: int,
    shuffle: bool,
    cache_dir: Path,
    shuffle_block_size: int = 0,
    same_masks_every_epoch: bool = False,
) -> Any:
    """An MLMStreamingDataset over `streams` (already checked; `manifest` gives the special ids
    and vocab). Shards are copied and decompressed under `cache_dir`, which must be the same on
    all ranks of a node and used by no other job (see `job_cache_dir`)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not streams:
        raise ValueError("no streams given")
    stream_objects = []
    for index, spec in enumerate(streams):
        if not spec.is_remote and not (Path(spec.path) / "index.json").is_file():
            raise DataError(f"{spec.path}: no index.json; not an MDS shard folder")
        # Local folders are read like remote ones, through this job's cache: streaming writes the
        # decompressed shards there, never into the source folder, which may be read-only or
        # shared with another job decompressing the same files.
        remote = spec.path if spec.is_remote else str(Path(spec.path).resolve())
        digest = hashlib.sha1(remote.encode()).hexdigest()[:8]
        local = str(cache_dir / f"stream-{index}-{digest}")
        stream_objects.append(Stream(remote=remote, local=local, proportion=spec.proportion))
    masking = MaskingSpec(
        probability=mlm_probability,
        special=SpecialIds(**manifest.special_ids),
        vocab_size=manifest.vocab_size,
        seed=seed,
        same_masks_every_epoch=same_masks_every_epoch,
    )
    with streaming_registration_lock():
        return MLMStreamingDataset(
            streams=stream_objects,
            seq_len=seq_len,
            masking=masking,
            batch_size=micro_batch_size,
            shuffle=shuffle,
            shuffle_seed=seed,
            shuffle_block_size=shuffle_block_size or None,
        )


def resolve_streams(
    cfg: Config, split: Literal["train", "val"], seq_len: int, tokenizer_path: Path
) -> list[StreamSpec]:
    """The streams of `data.train` / `data.val`; the embedded corpus (prepared once per node,
    local rank 0 first) when `data.train` is empty."""
    data = cfg.data
    if data.train:
        streams = parse_streams(data.train if split == "train" else data.val)
        if not streams:
            raise ConfigError(f"data.{split}: no validation streams given (data.train is set, data.val is empty)")
        return streams
    if data.val:
        raise ConfigError(f"data.val: expected empty when data.train is empty (the embedded corpus), got {data.val!r}")

    mode = data.embedded_mode
    out_dir = Path(data.prepared_dir) if data.prepared_dir else default_prepared_dir(seq_len, tokenizer_path, mode)
    if _local_rank() == 0:
        prepare_default_dataset(out_dir, max_len=seq_len, tokenizer_path=tokenizer_path, mode=mode)
    _barrier()
    # Other ranks find it made (a shared file system with several nodes: whoever renames first wins).
    prepared = prepare_default_dataset(out_dir, max_len=seq_len, tokenizer_path=tokenizer_path, mode=mode)
    return [StreamSpec(str(prepared[split]))]


def has_validation_split(cfg: Config) -> bool:
    """Whether the run validates: on `data.val` when `data.train` is set; on the embedded corpus'
    own split otherwise, unless that split holds no sample (in concat mode at long L its ~24k
    tokens of validation text fill no window of 32,768; the corpus is prepared here if needed)."""
    data = cfg.data
    if data.train:
        return bool(data.val)
    tokenizer_path = tokenizer_file(data.tokenizer)
    (stream,) = resolve_streams(cfg, "val", cfg.seq_len, tokenizer_path)
    if read_manifest(stream.path).counts.samples > 0:
        return True
    log.warning("%s: the embedded corpus' validation split has no sample of %d tokens; no validation", stream.path, cfg.seq_len)
    return False


def build_mlm_dataloader(
    cfg: Config,
    micro_batch_size: int,
    split: Literal["train", "val"] = "train",
) -> MLMDataLoader:
    """The loader of one rank for `split`, from the config tree:

    - streams: `data.train` / `data.val` (the embedded corpus when empty), each manifest checked
      against model.vocab_size, the sequence length (train.seq_len or model.l_max) and the SHA-256
      of `data.tokenizer` before anything else happens;
    - masking: train.mlm_probability for train, data.eval_mlm_probability for val, seeded by
      train.seed; train is shuffled and drops the last partial batch, val is neither;
    - stale streaming shared memory of dead jobs is removed first (local rank 0), and remote
      shards are cached in a folder of this job only (under data.cache_dir).

    Batches are as described in the module docstring, (B, L) with B = micro_batch_size.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data = cfg.data
    seq_len = cfg.seq_len
    tokenizer_path = tokenizer_file(data.tokenizer)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"data.tokenizer: file not found: {tokenizer_path}")
    expected = Expected(
        padded_vocab_size=cfg.model.vocab_size,
        max_len=seq_len,
        tokenizer_sha256=file_sha256(tokenizer_path),
        sources={
            "padded_vocab_size": "model.vocab_size",
            "max_len": "train.seq_len" if cfg.train.seq_len else "model.l_max (train.seq_len is 0)",
            "tokenizer_sha256": f"sha256 of data.tokenizer={str(tokenizer_path)!r}",
        },
    )
    streams = resolve_streams(cfg, split, seq_len, tokenizer_path)
    cache_dir = job_cache_dir(data.cache_dir) / split
    manifests = checked_manifests(streams, expected, cache_dir)
    if _local_rank() == 0:
        clean_stale_shared_memory()
    _barrier()
    is_train = split == "train"
    dataset = build_mlm_dataset(
        streams,
        manifest=manifests[0],
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        mlm_probability=cfg.train.mlm_probability if is_train else data.eval_mlm_probability,
        seed=cfg.train.seed,
        shuffle=data.shuffle and is_train,
        cache_dir=cache_dir,
        shuffle_block_size=data.shuffle_block_size,
        same_masks_every_epoch=not is_train,
    )
    return MLMDataLoader(
        dataset,
        batch_size=micro_batch_size,
        collate_fn=MLMCollator(dataset.masking),
        num_workers=data.num_workers,
        worker_init_fn=_init_worker,
        prefetch_factor=data.prefetch_factor if data.num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        drop_last=is_train,
        persistent_workers=False,
        full_rows=all(manifest.mode == "concat" for manifest in manifests),
    )
