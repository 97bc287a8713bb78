"""MLM masking: rate and 80/10/10 split on 100k real tokens, specials untouched, deterministic per sample."""

import numpy as np
import pytest
import torch

from m2dist.data.corpus import EMBEDDED_CORPUS
from m2dist.data.masking import (
    IGNORE_INDEX,
    mask_sample,
    mask_samples,
    mask_tokens,
    sample_key,
    sample_keys,
)
from m2dist.data.readers import read_documents
from m2dist.data.tokenizer import load_tokenizer

L = 128


@pytest.fixture(scope="module")
def sequences():
    """(900, 128) real bert-base-uncased ids, > 100k of them not special: paragraphs joined by
    [SEP], cut into rows [CLS] ... [SEP], every fourth row ending in 20 [PAD]."""
    tokenizer = load_tokenizer()
    special = tokenizer.special
    texts = [d.text for _, d in zip(range(4000), read_documents(EMBEDDED_CORPUS, "lines"))]
    stream = np.array([i for ids in tokenizer.encode_batch(texts) for i in (*ids, special.sep)], dtype=np.int64)
    body = stream[: 900 * (L - 2)].reshape(900, L - 2)
    rows = np.concatenate([np.full((900, 1), special.cls), body, np.full((900, 1), special.sep)], axis=1)
    rows[::4, -20:] = special.pad
    assert (~np.isin(rows, special.as_tuple())).sum() > 100_000
    return rows, special, tokenizer.vocab_size


@pytest.mark.parametrize("rate", [0.15, 0.30])
def test_masking_statistics_on_100k_tokens(sequences, rate):
    rows, special, vocab_size = sequences
    specials = special.as_tuple()
    corrupted, labels = zip(
        *(
            mask_sample(row, mask_token_id=special.mask, vocab_size=vocab_size, probability=rate,
                        special_ids=specials, seed=3, epoch=0, sample_index=i)
            for i, row in enumerate(rows)
        )
    )  # fmt: skip
    corrupted, labels = np.stack(corrupted), np.stack(labels)
    is_special = np.isin(rows, specials)
    selected = labels != IGNORE_INDEX

    assert not (selected & is_special).any(), "a special or pad token was selected"
    assert np.array_equal(corrupted[is_special], rows[is_special])
    assert np.array_equal(corrupted[~selected], rows[~selected]), "an unselected token changed"
    assert np.array_equal(labels[selected], rows[selected])
    assert abs(selected.sum() / (~is_special).sum() - rate) < 0.005

    to_mask = corrupted[selected] == special.mask
    kept = corrupted[selected] == rows[selected]
    to_random = ~to_mask & ~kept
    assert abs(to_mask.mean() - 0.8) < 0.02
    assert abs(to_random.mean() - 0.1) < 0.02
    assert abs(kept.mean() - 0.1) < 0.02
    assert corrupted[selected][to_random].max() < vocab_size


def test_masks_depend_only_on_seed_epoch_and_sample_index(sequences):
    rows, special, vocab_size = sequences
    kwargs = dict(mask_token_id=special.mask, vocab_size=vocab_size, probability=0.3, special_ids=special.as_tuple())

    def masks(row, **where):
        return mask_sample(row, **kwargs, **where)

    first = masks(rows[0], seed=1, epoch=2, sample_index=7)
    masks(rows[1], seed=1, epoch=2, sample_index=8)
    again = masks(rows[0], seed=1, epoch=2, sample_index=7)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    for other in (dict(seed=2, epoch=2, sample_index=7), dict(seed=1, epoch=3, sample_index=7),
                  dict(seed=1, epoch=2, sample_index=8)):  # fmt: skip
        assert not np.array_equal(masks(rows[0], **other)[1], first[1]), other


def test_mask_tokens_keeps_its_torch_interface(sequences):
    rows, special, vocab_size = sequences
    ids = torch.from_numpy(rows[:4])
    a = mask_tokens(ids, special.mask, vocab_size, 0.3, torch.Generator().manual_seed(0), special.as_tuple())
    b = mask_tokens(ids, special.mask, vocab_size, 0.3, torch.Generator().manual_seed(0), special.as_tuple())
    assert a[0].dtype == torch.int64 and a[0].shape == ids.shape and a[1].shape == ids.shape
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[1] != IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(ids, special.mask, vocab_size, 1.5)


def test_a_batch_is_masked_row_by_row_as_each_sample_alone(sequences):
    # The loader masks a whole batch at once; each row must get exactly the masks of its own
    # (seed, epoch, sample index), so that batching changes nothing on resume or another layout.
    rows, special, vocab_size = sequences
    kwargs = dict(mask_token_id=special.mask, vocab_size=vocab_size, probability=0.3, special_ids=special.as_tuple(), seed=5)
    epochs, indices = [0, 3, 3, 1, 0, 7], [9, 2, 2**40, 0, 123456, 9]
    corrupted, labels = mask_samples(rows[:6], epochs_B=epochs, sample_indices_B=indices, **kwargs)
    assert corrupted.shape == labels.shape == (6, L) and corrupted.dtype == labels.dtype == np.int64
    for row, (epoch, index) in enumerate(zip(epochs, indices)):
        alone = mask_sample(rows[row], epoch=epoch, sample_index=index, **kwargs)
        assert np.array_equal(corrupted[row], alone[0]) and np.array_equal(labels[row], alone[1]), row
    with pytest.raises(ValueError, match="one epoch and sample index per row: 6 rows, 5 epochs"):
        mask_samples(rows[:6], epochs_B=epochs[:5], sample_indices_B=indices[:5], **kwargs)


def test_a_batch_of_sample_keys_is_each_samples_key():
    # The loader derives a batch's keys at once; each must be `sample_key`'s, also for seeds, epochs
    # and indices whose mixing sets the top bit (where an unsigned product must wrap).
    rng = np.random.default_rng(3)
    for seed in (0, 5, 2**62 + 17):
        epochs = rng.integers(0, 1000, 64).tolist() + [0, 2**40]
        indices = rng.integers(0, 2**50, 64).tolist() + [2**62, 0]
        keys = sample_keys(seed, epochs, indices)
        assert keys.dtype == np.uint64
        assert [int(k) for k in keys] == [sample_key(seed, e, i) for e, i in zip(epochs, indices)]
    with pytest.raises(ValueError, match=">= 0"):
        sample_keys(1, [0, -1], [0, 1])
