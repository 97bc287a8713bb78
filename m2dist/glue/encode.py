"""Texts -> fixed-length model inputs: `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, padded.

m2dist's tokenizers return ids without special tokens (m2dist.data.tokenizer); the pair layout
and token types (0 for `[CLS] a [SEP]`, 1 for `b [SEP]`) are built here on top of those ids, with
BERT's longest-first truncation. Every input is padded to `seq_len`: M2's convolutions see the
pad tokens, so the protocol pads to the model's l_max (128) rather than to the batch's longest.

Shape legend: N examples, L seq_len.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m2dist.data.tokenizer import Tokenizer
from m2dist.glue.tasks import Examples


@dataclass
class EncodedSplit:
    """input_ids_NL (int32), token_type_ids_NL (int8), lengths_N (real tokens), labels_N."""

    input_ids_NL: np.ndarray
    token_type_ids_NL: np.ndarray
    lengths_N: np.ndarray
    labels_N: np.ndarray

    def __len__(self) -> int:
        return len(self.labels_N)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Model inputs for every example, in compact dtypes (`batch_to` widens them per batch):
        input_ids, token_type_ids, attention_mask (N, L), labels (N,)."""
        length = self.input_ids_NL.shape[1]
        attention_mask_NL = np.arange(length)[None, :] < self.lengths_N[:, None]
        return {
            "input_ids": torch.from_numpy(self.input_ids_NL),
            "token_type_ids": torch.from_numpy(self.token_type_ids_NL),
            "attention_mask": torch.from_numpy(attention_mask_NL),
            "labels": torch.from_numpy(self.labels_N),
        }


def batch_to(batch: dict[str, torch.Tensor], device: torch.device, widen: bool = True) -> dict[str, torch.Tensor]:
    """A batch of `EncodedSplit.tensors()` rows on `device`, ids and masks as int64 (`widen`) or
    in their compact dtypes."""
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v if k == "labels" or not widen else v.long() for k, v in moved.items()}


def truncate_pair(ids_a: list[int], ids_b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Cut tokens from the end of the longer text until both fit in `budget` (BERT's longest-first)."""
    if ids_b is None:
        return ids_a[:budget], None
    len_a, len_b = len(ids_a), len(ids_b)
    while len_a + len_b > budget:
        if len_a > len_b:
            len_a -= 1
        else:
            len_b -= 1
    return ids_a[:len_a], ids_b[:len_b]


def encode_examples(examples: Examples, tokenizer: Tokenizer, seq_len: int) -> EncodedSplit:
    """Tokenize, add the special tokens and token types, truncate and pad to `seq_len`."""
    pair = examples.text_b is not None
    if seq_len < (5 if pair else 3):
        raise ValueError(f"seq_len must leave room for the special tokens and text, got {seq_len}")
    special = tokenizer.special
    ids_a = tokenizer.encode_batch(examples.text_a)
    ids_b = tokenizer.encode_batch(examples.text_b) if pair else [None] * len(ids_a)
    count = len(ids_a)
    input_ids_NL = np.full((count, seq_len), special.pad, dtype=np.int32)
    token_type_ids_NL = np.zeros((count, seq_len), dtype=np.int8)
    lengths_N = np.zeros(count, dtype=np.int32)
    budget = seq_len - (3 if pair else 2)
    for row, (a, b) in enumerate(zip(ids_a, ids_b)):
        a, b = truncate_pair(a, b, budget)
        ids = [special.cls, *a, special.sep]
        first = len(ids)
        if b is not None:
            ids += [*b, special.sep]
        input_ids_NL[row, : len(ids)] = ids
        token_type_ids_NL[row, first : len(ids)] = 1
        lengths_N[row] = len(ids)
    return EncodedSplit(input_ids_NL, token_type_ids_NL, lengths_N, examples.labels.copy())


def save_encoded(splits: dict[str, EncodedSplit], path: str | Path) -> Path:
    """All splits of one task in one `.npz` (what the GPU worker processes load)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, split in splits.items():
        for field in ("input_ids_NL", "token_type_ids_NL", "lengths_N", "labels_N"):
            arrays[f"{name}/{field}"] = getattr(split, field)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_encoded(path: str | Path) -> dict[str, EncodedSplit]:
    with np.load(path) as data:
        names = sorted({key.split("/")[0] for key in data.files})
        fields = ("input_ids_NL", "token_type_ids_NL", "lengths_N", "labels_N")
        return {name: EncodedSplit(*(data[f"{name}/{f}"] for f in fields)) for name in names}
