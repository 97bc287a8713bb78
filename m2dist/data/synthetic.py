"""Random-token MLM batches for the quickstart and tests: no files, fully determined by a seed."""

from collections.abc import Iterator

import torch

from m2dist.data.masking import mask_tokens

# bert-base-uncased's special token ids, which the released M2-BERT checkpoints use.
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
FIRST_WORD_ID = 104


def synthetic_corpus(num_sequences: int, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    """(num_sequences, seq_len) ids: [CLS] words [SEP], words drawn from a Zipf-like distribution
    so that a model has something to learn."""
    if vocab_size <= FIRST_WORD_ID or seq_len < 3:
        raise ValueError(f"need vocab_size > {FIRST_WORD_ID} and seq_len >= 3, got {vocab_size}, {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab_size - FIRST_WORD_ID + 1, dtype=torch.float64)
    words = torch.multinomial(1.0 / ranks, num_sequences * (seq_len - 2), replacement=True, generator=generator)
    body = words.view(num_sequences, seq_len - 2) + FIRST_WORD_ID
    cls = torch.full((num_sequences, 1), CLS_ID)
    sep = torch.full((num_sequences, 1), SEP_ID)
    return torch.cat([cls, body, sep], dim=1)


def synthetic_mlm_batches(
    corpus: torch.Tensor, batch_size: int, vocab_size: int, mlm_probability: float, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of the corpus with fresh masking: input_ids, attention_mask, labels."""
    generator = torch.Generator().manual_seed(seed)
    special = (PAD_ID, CLS_ID, SEP_ID)
    while True:
        order = torch.randperm(len(corpus), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            ids = corpus[order[start : start + batch_size]]
            corrupted, labels = mask_tokens(ids, MASK_ID, vocab_size, mlm_probability, generator, special)
            yield {"input_ids": corrupted, "attention_mask": torch.ones_like(ids), "labels": labels}
