"""Tokenizers: the WordPiece backend reproduces bert-base-uncased, sentencepiece gets the BERT specials."""

import re

import pytest

from m2dist.data.corpus import EMBEDDED_CORPUS
from m2dist.data.readers import read_documents
from m2dist.data.tokenizer import (
    DEFAULT_VOCAB,
    SENTENCEPIECE_SPECIAL_IDS,
    SpecialIds,
    load_tokenizer,
    padded_vocab_size,
    train_sentencepiece,
)
from tests.conftest import REPO_ROOT

BERT_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


def test_wordpiece_reproduces_bert_base_uncased_ids():
    tokenizer = load_tokenizer(DEFAULT_VOCAB)
    assert tokenizer.sha256 == BERT_VOCAB_SHA256
    assert tokenizer.special == SpecialIds(pad=0, unk=100, cls=101, sep=102, mask=103)
    assert (tokenizer.vocab_size, tokenizer.padded_vocab_size) == (30522, 30528)
    # bert-base-uncased: lower-cased, accents stripped, punctuation split, ids without [CLS]/[SEP].
    assert tokenizer.encode("Hello World!") == [7592, 2088, 999]
    assert tokenizer.encode("HÉLLO, world") == [7592, 1010, 2088]
    assert tokenizer.decode([7592, 2088]) == "hello world"


def test_sentencepiece_training_gives_the_bert_special_ids(tmp_path):
    documents = [d.text for _, d in zip(range(1500), read_documents(EMBEDDED_CORPUS, "lines"))]
    tokenizer = train_sentencepiece(documents, tmp_path / "sp.model", vocab_size=400, model_type="bpe", num_threads=1)
    assert tokenizer.special == SENTENCEPIECE_SPECIAL_IDS == SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
    assert (tokenizer.vocab_size, tokenizer.padded_vocab_size) == (400, 448)
    ids = tokenizer.encode("The tutorial explains how functions are defined.")
    assert ids and all(5 <= i < 400 for i in ids)
    # Case-folded by default, like BERT uncased.
    assert tokenizer.encode("FUNCTIONS") == tokenizer.encode("functions")
    assert load_tokenizer(tmp_path / "sp.model").special == SENTENCEPIECE_SPECIAL_IDS


def test_docs_give_the_sentencepiece_special_ids():
    page = (REPO_ROOT / "docs" / "data.md").read_text()
    stated = re.search(r"trained with\s+`tools/train_tokenizer.py` \((.+?)\)", page, re.S)
    assert stated, "docs/data.md no longer describes the sentencepiece tokenizer's special ids"
    ids = {name.lower(): int(value) for name, value in re.findall(r"`\[(\w+)\]`=(\d+)", stated.group(1))}
    assert ids == SENTENCEPIECE_SPECIAL_IDS.to_dict()


def test_padded_vocab_size():
    assert [padded_vocab_size(n) for n in (1, 64, 65, 30522, 32000)] == [64, 64, 128, 30528, 32000]
    with pytest.raises(ValueError, match="vocab_size"):
        padded_vocab_size(0)


def test_bad_tokenizer_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_tokenizer(tmp_path / "missing.txt")
    json_file = tmp_path / "tokenizer.json"
    json_file.write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer.json: expected a WordPiece vocab ending in \.txt"):
        load_tokenizer(json_file)
    no_specials = tmp_path / "vocab.txt"
    no_specials.write_text("[PAD]\nhello\nworld\n")
    with pytest.raises(ValueError, match=r"vocab.txt: not a BERT vocab.txt: special tokens \['\[UNK\]'"):
        load_tokenizer(no_specials)
    not_a_model = tmp_path / "bad.model"
    not_a_model.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model: not a sentencepiece model"):
        load_tokenizer(not_a_model)
