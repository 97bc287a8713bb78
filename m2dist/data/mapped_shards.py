"""A sample's bytes from a local MDS shard file through a memory map kept open by the process.

streaming's MDS reader opens the shard file for every sample it reads (a seek and read of the
sample's offsets, a seek and read of its bytes, a close): at L=128 that was over half of a loader
worker's time per sample. streaming writes each shard file into the job's cache folder once (a
temporary file renamed into place, for downloads and decompression alike) and never changes it, so a
map of one serves the same bytes for as long as it is open. A process keeps the maps of the
MAX_OPEN shards it read last; a shard that streaming evicts from its cache (`cache_limit`) frees
its disk space once its map is dropped too.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import OrderedDict

from streaming.base.format.mds.reader import MDSReader

MAX_OPEN = 8
# The raw MDS file: uint32 sample count, then count + 1 uint32 offsets (of each sample's start and
# of the end), then the samples; offsets are in the writer's (native) byte order, as streaming reads them.
_OFFSETS = struct.Struct("=2I")
_maps: OrderedDict[str, mmap.mmap] = OrderedDict()


def raw_path(reader: MDSReader) -> str:
    """The local file of an MDS shard's samples (its raw file, also for compressed shards)."""
    return os.path.join(reader.dirname, reader.split, reader.raw_data.basename)


def sample_bytes(reader: MDSReader, idx: int) -> bytes:
    """The stored bytes of sample `idx` of the shard, as `reader.get_sample_data(idx)` returns them.
    Raises FileNotFoundError while the shard is not on local disk (streaming then downloads it)."""
    path = raw_path(reader)
    mapped = _maps.get(path)
    if mapped is None:
        with open(path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        _maps[path] = mapped
        if len(_maps) > MAX_OPEN:
            _maps.popitem(last=False)[1].close()
    else:
        _maps.move_to_end(path)
    begin, end = _OFFSETS.unpack_from(mapped, (1 + idx) * 4)
    if not begin < end <= len(mapped):
        raise IndexError(f"{path}: sample {idx} has offsets {begin}..{end}, outside the file's {len(mapped)} bytes")
    return mapped[begin:end]


def close_all() -> None:
    """Drop every map this process holds."""
    while _maps:
        _maps.popitem()[1].close()
