"""BERT masked-language-model corruption with 80/10/10 replacement.

One implementation (`_corrupt`, numpy, draws from counter-based streams given by keys) behind
three entry points:
- `mask_sample`: one sequence, keyed by (seed, epoch, sample index), so a sample is masked the same
  way whichever rank, worker or batch loads it, and after a resume;
- `mask_samples`: a batch of such sequences at once, each row exactly as `mask_sample` masks it
  (what the loader does: one vectorised pass per batch instead of a dozen small ones per sample);
- `mask_tokens`: a batch of torch tensors, drawn from a torch generator.
"""

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

IGNORE_INDEX = -100
# Of the selected tokens: below 0.8 -> [MASK], below 0.9 -> a random token, else kept.
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1

# splitmix64 (Steele, Lea & Flood 2014): output i of the stream with state `key` is
# finalize(key + (i + 1) * golden ratio). Counter-based, so one sample's draws need no generator
# object, and computed with plain numpy integer ops, which keep the GIL on short arrays (numpy's
# Generator releases it on every call; with streaming's helper threads beside the loop, getting
# it back made masking in the loader several times slower than alone at L=128).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_U64 = (1 << 64) - 1


def splitmix64_stream(key: int, count: int) -> np.ndarray:
    """(count,) uint64: the first `count` outputs of splitmix64 started at state `key`."""
    return splitmix64_streams(np.array([key & _U64], dtype=np.uint64), count)[0]


def splitmix64_streams(keys_B: np.ndarray, count: int) -> np.ndarray:
    """(B, count) uint64: row b holds the first `count` outputs of splitmix64 started at keys_B[b]."""
    z = np.arange(1, count + 1, dtype=np.uint64)[None, :] * _GOLDEN
    z = z + keys_B.astype(np.uint64)[:, None]
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def _mix64(value: int) -> int:
    """splitmix64's finalizer on a Python int: spreads nearby integers over all 64 bits."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _U64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _U64
    return value ^ (value >> 31)


@lru_cache(maxsize=16)
def _special_table(special_ids: tuple[int, ...], vocab_size: int) -> np.ndarray:
    """(max(vocab_size, largest special id + 1),) bool: True at the special ids."""
    table = np.zeros(max(vocab_size, max(special_ids, default=-1) + 1), dtype=bool)
    table[list(special_ids)] = True
    table.setflags(write=False)
    return table


def mask_array(
    ids: np.ndarray,
    key: int,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    special_ids: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Select `probability` of the non-special tokens of `ids` (any shape, integer ids in
    [0, vocab_size)); of those 80% become [MASK], 10% a random id in [0, vocab_size), 10% stay.
    The draws are the splitmix64 stream of `key`, one 64-bit number per token. Returns
    (corrupted ids, labels) as int64 arrays of the shape of `ids`; labels are IGNORE_INDEX where
    not selected."""
    bits = splitmix64_stream(key, ids.size).reshape(ids.shape)
    return _corrupt(ids, bits, mask_token_id, vocab_size, probability, special_ids)


def _corrupt(ids, bits, mask_token_id, vocab_size, probability, special_ids):
    """`mask_array` with the draws `bits` (uint64, the shape of ids)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    ids = ids.astype(np.int64, copy=False)
    special = _special_table(tuple(special_ids), vocab_size)
    if ids.size and (ids.min() < 0 or ids.max() >= len(special)):
        raise ValueError(f"token ids must be in [0, {len(special)}), got {ids.min()}..{ids.max()}")
    # The top 24 bits give u, uniform on [0, 1): u < p selects a token; within the selection
    # u < 0.8p -> [MASK], 0.8p <= u < 0.9p -> random token, else kept. The low 32 bits give the
    # random token (modulo bias < vocab_size / 2**32).
    draw = (bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
    selected = (draw < probability) & ~special[ids]
    labels = np.where(selected, ids, IGNORE_INDEX)
    corrupted = np.where(selected & (draw < MASK_SHARE * probability), mask_token_id, ids)
    to_random = selected & (draw >= MASK_SHARE * probability) & (draw < (MASK_SHARE + RANDOM_SHARE) * probability)
    corrupted[to_random] = (bits[to_random] & np.uint64(0xFFFFFFFF)) % np.uint64(vocab_size)
    return corrupted, labels


def mask_tokens(
    input_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    generator: torch.Generator | None = None,
    special_ids: tuple[int, ...] = (0,),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select `probability` of the non-special tokens; of those 80% become [MASK], 10% a random
    token, 10% stay. Returns (corrupted ids, labels with IGNORE_INDEX where not selected), on the
    device of `input_ids`; the key of the draws comes from `generator` (torch's default if None)."""
    key = int(torch.randint(0, 2**62, (), generator=generator))
    corrupted, labels = mask_array(input_ids.cpu().numpy(), key, mask_token_id, vocab_size, probability, special_ids)
    device = input_ids.device
    return torch.from_numpy(corrupted).to(device), torch.from_numpy(labels).to(device)


def sample_key(seed: int, epoch: int, sample_index: int) -> int:
    """The 64-bit key of one sample's draws: (seed, epoch, global sample index) mixed, so every
    sample of every epoch has its own stream, whatever rank or worker loads it."""
    seed, epoch, sample_index = int(seed), int(epoch), int(sample_index)
    if min(seed, epoch, sample_index) < 0:
        raise ValueError(f"seed, epoch and sample_index must be >= 0, got {seed}, {epoch}, {sample_index}")
    return _mix64(_mix64(_mix64(seed & _U64) ^ epoch) ^ sample_index)


def _mix64_array(values: np.ndarray) -> np.ndarray:
    """`_mix64` of each element of a uint64 array (numpy's uint64 products wrap modulo 2**64 as
    `_mix64`'s masked products do)."""
    values = values ^ (values >> np.uint64(30))
    values *= _MIX1
    values ^= values >> np.uint64(27)
    values *= _MIX2
    return values ^ (values >> np.uint64(31))


def sample_keys(seed: int, epochs_B: Sequence[int], sample_indices_B: Sequence[int]) -> np.ndarray:
    """(B,) uint64: `sample_key(seed, epochs_B[b], sample_indices_B[b])` of each b, computed at once."""
    epochs = np.asarray(epochs_B, dtype=np.int64)
    indices = np.asarray(sample_indices_B, dtype=np.int64)
    if int(seed) < 0 or (epochs.size and epochs.min() < 0) or (indices.size and indices.min() < 0):
        raise ValueError(f"seed, epochs and sample indices must be >= 0, got {seed}, {epochs_B}, {sample_indices_B}")
    seed_key = np.uint64(_mix64(int(seed) & _U64))
    return _mix64_array(_mix64_array(seed_key ^ epochs.astype(np.uint64)) ^ indices.astype(np.uint64))


def mask_sample(
    ids_L: np.ndarray,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    special_ids: tuple[int, ...],
    seed: int,
    epoch: int,
    sample_index: int,
) -> tuple[np.ndarray, np.ndarray]:
    """`mask_array` on one sequence ids_L (L,) with the key of (seed, epoch, sample_index): a
    resumed run, or one with another number of ranks or workers, masks every sample identically.
    Returns corrupted ids (L,) and labels (L,), int64."""
    return mask_array(ids_L, sample_key(seed, epoch, sample_index), mask_token_id, vocab_size, probability, special_ids)


def mask_samples(
    ids_BL: np.ndarray,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    special_ids: tuple[int, ...],
    seed: int,
    epochs_B: Sequence[int],
    sample_indices_B: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """`mask_sample` of every row of ids_BL (B, L) at once: row b is masked as sample
    sample_indices_B[b] of epoch epochs_B[b]. Returns corrupted ids (B, L) and labels (B, L), int64."""
    if not len(epochs_B) == len(sample_indices_B) == len(ids_BL):
        raise ValueError(
            f"one epoch and sample index per row: {len(ids_BL)} rows, {len(epochs_B)} epochs, "
            f"{len(sample_indices_B)} indices"
        )
    keys_B = sample_keys(seed, epochs_B, sample_indices_B)
    bits_BL = splitmix64_streams(keys_B, ids_BL.shape[1])
    return _corrupt(ids_BL, bits_BL, mask_token_id, vocab_size, probability, special_ids)
