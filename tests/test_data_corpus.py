"""The embedded corpus: shards for the debug run from files the package ships, made once and reused."""

import time

import pytest

from m2dist.config import load_config
from m2dist.data.corpus import EMBEDDED_CORPUS, prepare_default_dataset
from m2dist.data.manifest import read_manifest
from m2dist.data.tokenizer import DEFAULT_VOCAB, file_sha256


def test_embedded_corpus_gives_debug_shards(embedded_dataset):
    config = load_config("debug")
    assert config.data.train == "", "the debug run reads the embedded corpus"
    train, val = read_manifest(embedded_dataset.train), read_manifest(embedded_dataset.val)
    for manifest in (train, val):
        assert manifest.inputs == [str(EMBEDDED_CORPUS)]
        assert (manifest.max_len, manifest.mode, manifest.padded_vocab_size) == (64, "pad", config.model.vocab_size)
        assert manifest.tokenizer_sha256 == file_sha256(DEFAULT_VOCAB)
    assert train.counts.samples > 25_000 and train.counts.tokens > 1_000_000
    assert 300 < val.counts.samples < 0.05 * train.counts.samples
    assert embedded_dataset.tokenizer == DEFAULT_VOCAB


def test_prepared_shards_are_reused(embedded_dataset):
    index = embedded_dataset.train / "index.json"
    before = index.stat().st_mtime_ns
    started = time.perf_counter()
    again = prepare_default_dataset(embedded_dataset.train.parent, max_len=64)
    assert time.perf_counter() - started < 1.0
    assert again == embedded_dataset and index.stat().st_mtime_ns == before


def test_a_folder_with_other_content_is_not_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds \['notes.txt'\]"):
        prepare_default_dataset(tmp_path, max_len=32, max_documents=50)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_sentencepiece_variant_builds_its_tokenizer(tmp_path):
    prepared = prepare_default_dataset(tmp_path / "sp", max_len=32, sentencepiece_vocab_size=600, max_documents=1500)
    manifest = read_manifest(prepared.train)
    assert prepared.tokenizer == tmp_path / "sp" / "tokenizer.model" and prepared.tokenizer.is_file()
    assert (manifest.tokenizer_kind, manifest.vocab_size, manifest.padded_vocab_size) == ("sentencepiece", 600, 640)
    assert manifest.special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert manifest.tokenizer_sha256 == file_sha256(prepared.tokenizer)
    assert manifest.max_documents == 1500
    assert (
        prepare_default_dataset(tmp_path / "sp", max_len=32, sentencepiece_vocab_size=600, max_documents=1500)
        == prepared
    )
