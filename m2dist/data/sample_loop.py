"""streaming's per-sample loops, stepped a run of samples at a time.

`StreamingDataset.__iter__` runs three loops over a worker's sample ids, each in its own thread:
the prepare loop (`_prepare_thread`: download or decompress each sample's shard, ahead), the ready
loop (`_ready_thread`: wait until each sample's shard is local) and the yield loop
(`_each_sample_id`). Each of them takes a lock per sample (the iterator's `should_exit`), maps the
sample to its shard by a Python search (`Spanner.__getitem__`), and the prepare loop takes the cache's
file lock and stats the shard file for every sample, also for shards that are long on disk. On 2
cores that was most of a loader worker's time at L=128: with samples that cost nothing to read, the
loops alone delivered about 90 us a sample.

`ChunkedSampleLoop` keeps their order and their contract (the same ids yielded in the same order,
`prepare_index <= ...`, `ready_index` never past a sample whose shard is not local, `yield_index`
advanced after each yield, the same exits) and steps over runs of up to `CHUNK` samples: the shards
of a worker's ids are found once per epoch by a vectorised search of the shard bounds, the prepare
loop calls `prepare_shard` for each shard of a run that this epoch has not prepared yet or that is
no longer local (another worker may have evicted it), the ready loop advances past every sample of
a run whose shard is local in one step and waits per sample only where one is not, and the yield
loop checks for an exit once per run. A shard's access time, which orders evictions under a cache
limit, is still set where a sample is read (`MLMStreamingDataset._stored_ids`).

This depends on the private loop state of mosaicml-streaming 0.13 (`_Iterator`, `_event`,
`_shard_states`, `spanner.shard_bounds`), which pyproject.toml pins.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from time import sleep

import numpy as np
from streaming.base.constant import TICK
from streaming.base.dataset import _ShardState

# Samples a loop steps over at once (at most; the predownload limit can shorten a run).
CHUNK = 256


def shards_of(shard_bounds: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """The shard of each sample id (-1 for the padding id -1): `Spanner.__getitem__`'s shard, for
    many ids at once. shard_bounds: the first sample of each shard, then the number of samples."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    shards = np.searchsorted(shard_bounds, ids, side="right") - 1
    return np.where(ids < 0, -1, shards)


class ChunkedSampleLoop:
    """Mixin for a `StreamingDataset` subclass (before it in the bases): the prepare, ready and
    yield loops of `__iter__`, a run of samples at a time (see the module docstring)."""

    def shard_and_index(self, sample_id: int) -> tuple[int, int]:
        """(shard, index in the shard) of a sample: `self.spanner[sample_id]` by a bisection of a
        list of the shards' first samples."""
        starts = self.__dict__.get("_shard_starts")
        if starts is None:
            starts = self._shard_starts = self.spanner.shard_bounds.tolist()
        sample_id = int(sample_id)
        if not 0 <= sample_id < starts[-1]:
            raise IndexError(f"Invalid sample index `{sample_id}`: 0 <= {sample_id} < {starts[-1]}")
        shard = bisect.bisect_right(starts, sample_id) - 1
        return shard, sample_id - starts[shard]

    def _shards_of_work(self, it) -> np.ndarray:
        """The shard of each of the iterator's sample ids (computed once per epoch and iterator)."""
        shards = getattr(it, "m2dist_shards", None)
        if shards is None:
            shards = it.m2dist_shards = shards_of(self.spanner.shard_bounds, it.sample_ids)
        return shards

    def _run_end(self, it, start: int) -> int:
        """The end of the run of samples a loop at `start` takes: CHUNK samples, at most the end of
        the epoch's samples and at most `predownload` ahead of the yield loop."""
        end = min(it.total, start + CHUNK)
        if self.predownload is not None:
            end = min(end, it.yield_index + self.predownload + 1)
        return max(end, start + 1)

    def _prepare_thread(self, it) -> None:
        shards = self._shards_of_work(it)
        prepared: set[int] = set()
        while True:
            if it.should_exit():
                break
            if it.prepare_index == it.total or it.ready_index == it.total:
                it.prepare_index = it.total
                break
            if self._event.is_set():
                break
            if self.predownload is not None and self.predownload < it.prepare_index - it.yield_index:
                sleep(TICK)
                continue
            start = it.prepare_index
            end = self._run_end(it, start)
            run = shards[start:end]
            # The run's shards in the order of their first sample, as streaming prepares them.
            unique, first = np.unique(run[run >= 0], return_index=True)
            states = self._shard_states.numpy()
            for shard_id in unique[np.argsort(first)].tolist():
                if shard_id not in prepared or states[shard_id] != _ShardState.LOCAL:
                    self.prepare_shard(shard_id, False)
                    prepared.add(shard_id)
            it.prepare_index = end
        it.on_exit()

    def _ready_thread(self, it) -> None:
        shards = self._shards_of_work(it)
        while True:
            if it.should_exit():
                break
            if it.ready_index == it.total:
                break
            if self._event.is_set():
                break
            if self.predownload is not None and self.predownload < it.ready_index - it.yield_index:
                sleep(TICK)
                continue
            start = it.ready_index
            run = shards[start : self._run_end(it, start)]
            states = self._shard_states.numpy()
            waiting = (run >= 0) & (states[np.maximum(run, 0)] != _ShardState.LOCAL)
            if not waiting.any():
                it.ready_index = start + len(run)
                continue
            # Every sample before the first whose shard is not local is ready; wait for that one as
            # streaming does (downloading it again if it was evicted).
            first = int(np.argmax(waiting))
            it.ready_index = start + first
            shard_id = int(run[first])
            if self._shard_states[shard_id] == _ShardState.REMOTE:
                self.prepare_shard(shard_id, False)
            while self._shard_states[shard_id] != _ShardState.LOCAL:
                if self._event.is_set():
                    break
                sleep(TICK)
            it.ready_index += 1
        it.on_exit()

    def _each_sample_id(self, it) -> Iterator[int]:
        while True:
            if it.should_exit():
                break
            if it.yield_index == it.total:
                break
            if hasattr(self, "_event") and self._event.is_set():
                break
            ready = it.ready_index
            if ready <= it.yield_index:
                sleep(TICK)
                continue
            start = it.yield_index
            for index, sample_id in enumerate(it.sample_ids[start : min(ready, start + CHUNK)].tolist(), start):
                if sample_id != -1:
                    yield sample_id
                it.yield_index = index + 1
        it.on_exit()
