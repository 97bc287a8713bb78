"""BERT masked-language-model corruption with 80/10/10 replacement.

One implementation (`mask_array`, numpy) behind two entry points:
- `mask_sample`: one sequence, with a generator keyed by (seed, epoch, sample index), so a sample is
  masked the same way whichever rank, worker or batch loads it, and after a resume;
- `mask_tokens`: a batch of torch tensors with a torch generator (synthetic data).
"""

import threading
from functools import lru_cache

import numpy as np
import torch

IGNORE_INDEX = -100
# Of the selected tokens: below 0.8 -> [MASK], below 0.9 -> a random token, else kept.
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1


def mask_array(
    ids: np.ndarray,
    rng: np.random.Generator,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    special_ids: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Select `probability` of the non-special tokens of `ids` (any shape, integer); of those 80%
    become [MASK], 10% a random id in [0, vocab_size), 10% stay. Returns (corrupted ids, labels)
    as int64 arrays of the same shape; labels are IGNORE_INDEX where not selected."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    ids = ids.astype(np.int64, copy=False)
    special = _special_table(special_ids, vocab_size)
    if ids.size and (ids.min() < 0 or ids.max() >= len(special)):
        raise ValueError(f"token ids must be in [0, {len(special)}), got {ids.min()}..{ids.max()}")
    # One uniform u per token: u < p selects it; within the selection, u < 0.8p -> [MASK],
    # 0.8p <= u < 0.9p -> random token, else kept (u / p is uniform on [0, 1) given selection).
    draw = rng.random(ids.shape, dtype=np.float32)
    selected = (draw < probability) & ~special[ids]
    labels = np.where(selected, ids, IGNORE_INDEX)
    corrupted = np.where(selected & (draw < MASK_SHARE * probability), mask_token_id, ids)
    to_random = selected & (draw >= MASK_SHARE * probability) & (draw < (MASK_SHARE + RANDOM_SHARE) * probability)
    corrupted[to_random] = rng.integers(0, vocab_size, int(to_random.sum()))
    return corrupted, labels


@lru_cache(maxsize=16)
def _special_table(special_ids: tuple[int, ...], vocab_size: int) -> np.ndarray:
    """(max(vocab_size, largest special id + 1),) bool: True at the special ids."""
    table = np.zeros(max(vocab_size, max(special_ids, default=-1) + 1), dtype=bool)
    table[list(special_ids)] = True
    table.setflags(write=False)
    return table


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
    device of `input_ids`; the draws come from `generator` (the default torch generator if None)."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    rng = np.random.Generator(np.random.Philox(seed))
    corrupted, labels = mask_array(input_ids.cpu().numpy(), rng, mask_token_id, vocab_size, probability, special_ids)
    device = input_ids.device
    return torch.from_numpy(corrupted).to(device), torch.from_numpy(labels).to(device)


def sample_key(seed: int, epoch: int, sample_index: int) -> int:
    """The 128-bit Philox key of one sample: (seed, epoch, global sample index) packed, so every
    sample of every epoch has its own independent random stream."""
    if min(seed, epoch, sample_index) < 0:
        raise ValueError(f"seed, epoch and sample_index must be >= 0, got {seed}, {epoch}, {sample_index}")
    if seed >= 1 << 64 or epoch >= 1 << 24 or sample_index >= 1 << 40:
        raise ValueError(f"need seed < 2**64, epoch < 2**24, sample_index < 2**40; got {seed}, {epoch}, {sample_index}")
    return (seed << 64) | (epoch << 40) | sample_index


_per_thread = threading.local()


def _keyed_generator(key: int) -> np.random.Generator:
    """A Philox generator at counter 0 with `key`. Reuses one bit generator per thread: setting
    its state costs ~7 us, while Philox(key=...) reads the OS entropy pool first (~35 us)."""
    if not hasattr(_per_thread, "bit_generator"):
        _per_thread.bit_generator = np.random.Philox(0)
        _per_thread.generator = np.random.Generator(_per_thread.bit_generator)
    _per_thread.bit_generator.state = {
        "bit_generator": "Philox",
        "state": {"counter": np.zeros(4, np.uint64), "key": np.array([key & (2**64 - 1), key >> 64], np.uint64)},
        "buffer": np.zeros(4, np.uint64),
        "buffer_pos": 4,
        "has_uint32": 0,
        "uinteger": 0,
    }
    return _per_thread.generator


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
    """`mask_array` on one sequence ids_L (L,) with a generator keyed by (seed, epoch,
    sample_index): a resumed run, or one with another number of ranks or workers, masks every
    sample identically. Returns corrupted ids (L,) and labels (L,), int64."""
    rng = _keyed_generator(sample_key(seed, epoch, sample_index))
    return mask_array(ids_L, rng, mask_token_id, vocab_size, probability, special_ids)
