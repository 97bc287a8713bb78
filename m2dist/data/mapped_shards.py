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

import numpy as np
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
    return sample_bytes_at(raw_path(reader), idx)


def sample_bytes_at(path: str, idx: int) -> bytes:
    """`sample_bytes` of the shard whose raw file is `path` (`raw_path`)."""
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


# A sample of one variable-size column: its uint32 size, then the MDS ndarray value without a fixed
# shape: one byte (ndim << 2 | the shape's dtype code), the shape in that dtype, then the values
# (streaming's `NDArray` encoding); native byte order, as streaming reads them.
_SIZE_AND_HEADER = struct.Struct("=IB")
_SHAPE_FORMATS = {code: struct.Struct("=" + fmt) for code, fmt in enumerate("BHIQ")}


def single_array_dtype(reader: MDSReader) -> np.dtype | None:
    """The value dtype when the shard's samples are one column of 1-D ndarrays of a fixed dtype and
    no fixed shape (what tools/prepare_mds.py writes: `ndarray:uint16` or `ndarray:uint32`), else
    None."""
    if len(reader.column_encodings) != 1 or reader.column_sizes[0] is not None:
        return None
    kind, _, dtype = reader.column_encodings[0].partition(":")
    if kind != "ndarray" or not dtype or ":" in dtype:
        return None
    return np.dtype(dtype)


def decode_single_array(data: bytes, dtype: np.dtype) -> np.ndarray:
    """The 1-D array of a sample of a `single_array_dtype` shard (its 4-byte column size, the
    encoding's header, the values), as `reader.decode_sample(data)` returns it, without streaming's
    per-sample parsing of the column layout. Raises ValueError for bytes not of that layout."""
    if len(data) < 6:
        raise ValueError(f"{len(data)} bytes, too short for an MDS ndarray sample")
    size, header = _SIZE_AND_HEADER.unpack_from(data)
    shape = _SHAPE_FORMATS[header & 3]
    offset = 5 + shape.size
    if header >> 2 != 1 or size != len(data) - 4 or len(data) < offset:
        raise ValueError(f"expected one 1-D array of {len(data) - 4} bytes, got {header >> 2} dimensions in {size} bytes")
    (count,) = shape.unpack_from(data, 5)
    if offset + count * dtype.itemsize != len(data):
        raise ValueError(f"{count} values of {dtype} do not fill its {len(data) - offset} bytes")
    return np.frombuffer(data, dtype, count, offset)


def close_all() -> None:
    """Drop every map this process holds."""
    while _maps:
        _maps.popitem()[1].close()
