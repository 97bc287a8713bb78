"""prepare_mds: exact read-back in both modes, manifests, splits, input formats and bad input."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from m2dist.data.corpus import EMBEDDED_CORPUS
from m2dist.data.manifest import Expected, check_manifest, read_manifest
from m2dist.data.prepare import prepare_mds, token_dtype, val_split_of
from m2dist.data.readers import read_documents
from m2dist.data.tokenizer import load_tokenizer
from m2dist.errors import DataError, InputError, ManifestMismatchError

MAX_LEN = 24


@pytest.fixture(scope="module")
def texts():
    """300 real paragraphs, some longer than MAX_LEN tokens, plus 5 long joined ones."""
    paragraphs = [d.text for _, d in zip(range(300), read_documents(EMBEDDED_CORPUS, "lines"))]
    return paragraphs + [" ".join(paragraphs[i : i + 4]) for i in range(0, 20, 4)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def write_lines(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(t + "\n" for t in texts))
    return path


def read_back(split_dir: Path) -> list[list[int]]:
    """Every sample of an MDS folder, in the order written."""
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(split_dir), shuffle=False, batch_size=1)
    samples = [dataset[i]["input_ids"] for i in range(dataset.num_samples)]
    assert all(s.dtype == np.uint16 for s in samples)
    return [s.tolist() for s in samples]


def expected_splits(texts, tokenizer, val_fraction):
    splits = {"train": [], "val": []}
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        splits["val" if val_split_of(text, val_fraction) else "train"].append(ids)
    return splits


def test_pad_mode_reads_back_exactly(tmp_path, texts, tokenizer):
    source = write_lines(tmp_path / "docs.txt", texts)
    result = prepare_mds([source], tmp_path / "out", None, MAX_LEN, "pad", val_fraction=0.1, progress=False)
    expected = expected_splits(texts, tokenizer, 0.1)
    assert len(expected["val"]) > 10 and len(expected["train"]) > 200
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == [
        "index.json", "m2dist_manifest.json", "shard.00000.mds.zstd"
    ]  # fmt: skip
    cls, sep = tokenizer.special.cls, tokenizer.special.sep
    for split in ("train", "val"):
        want = [[cls, *ids[: MAX_LEN - 2], sep] for ids in expected[split]]
        assert read_back(tmp_path / "out" / split) == want
        manifest = read_manifest(tmp_path / "out" / split)
        assert manifest == result.manifests[split]
        assert (manifest.mode, manifest.max_len, manifest.dtype, manifest.split) == ("pad", MAX_LEN, "uint16", split)
        assert (manifest.vocab_size, manifest.padded_vocab_size) == (30522, 30528)
        assert manifest.tokenizer_sha256 == tokenizer.sha256
        assert manifest.special_ids == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
        counts = manifest.counts
        assert counts.samples == counts.documents == len(want)
        assert counts.tokens == sum(map(len, want))
        assert counts.truncated_documents == sum(len(ids) > MAX_LEN - 2 for ids in expected[split]) > 0


def test_concat_mode_reads_back_exactly_with_two_workers(tmp_path, texts, tokenizer):
    source = write_lines(tmp_path / "docs.txt", texts)
    result = prepare_mds([source], tmp_path / "out", None, MAX_LEN, "concat", val_fraction=0.1, num_workers=2,
                         progress=False)  # fmt: skip
    cls, sep = tokenizer.special.cls, tokenizer.special.sep
    for split, documents in expected_splits(texts, tokenizer, 0.1).items():
        stream = [i for ids in documents for i in (*ids, sep)]
        window = MAX_LEN - 1
        full = len(stream) // window
        want = [[cls, *stream[k * window : (k + 1) * window]] for k in range(full)]
        assert read_back(tmp_path / "out" / split) == want
        counts = result.manifests[split].counts
        assert counts.samples == full and counts.dropped_tokens == len(stream) - full * window


def test_jsonl_gzip_and_parquet_inputs_give_the_same_shards(tmp_path, texts):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    lines = write_lines(tmp_path / "docs.txt", texts[:50])
    jsonl = tmp_path / "docs.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.writelines(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts[:50]))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": texts[:50]}), parquet)
    samples = {}
    for name, path in (("lines", lines), ("jsonl", jsonl), ("parquet", parquet)):
        prepare_mds([path], tmp_path / name, None, MAX_LEN, text_field="body", val_fraction=0.0, progress=False)
        samples[name] = read_back(tmp_path / name / "train")
    assert len(samples["lines"]) == 50
    assert samples["lines"] == samples["jsonl"] == samples["parquet"]


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(30522) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_paragraphs_are_documents(tmp_path):
    path = tmp_path / "paragraphs.txt"
    path.write_text("first line\nof one document\n\n\nsecond document\n")
    documents = list(read_documents(path, "paragraphs"))
    assert [(d.where, d.text) for d in documents] == [
        (f"{path}:1", "first line of one document"), (f"{path}:5", "second document")
    ]  # fmt: skip


def test_unreadable_lines_are_errors_naming_file_and_line(tmp_path):
    text = tmp_path / "bad.txt"
    text.write_bytes(b"good line one\ngood line two\nbad \xff\xfe bytes\ngood line four\n")
    with pytest.raises(InputError, match=rf"{text}:3: not valid UTF-8"):
        prepare_mds([text], tmp_path / "a", None, MAX_LEN, progress=False)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": broken\n{"title": "no text"}\n{"text": 3}\n')
    with pytest.raises(InputError, match=rf"{jsonl}:2: not valid JSON"):
        prepare_mds([jsonl], tmp_path / "b", None, MAX_LEN, progress=False)
    result = prepare_mds([text], tmp_path / "c", None, MAX_LEN, on_bad_line="skip", val_fraction=0.0, progress=False)
    assert result.manifests["train"].counts.bad_lines == 1
    assert result.manifests["train"].counts.documents == 3


def test_jsonl_without_a_text_field_names_line_and_keys(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(InputError, match=r"docs.jsonl:2: no text field 'text' \(found \['title'\]\)"):
        prepare_mds([jsonl], tmp_path / "out", None, MAX_LEN, progress=False)
    jsonl.write_text('{"text": "fine"}\n\n{"text": 3}\n')
    with pytest.raises(InputError, match=r"docs.jsonl:3: field 'text' is int, expected a string"):
        list(read_documents(jsonl))


def test_refuses_to_overwrite_shards_unless_told(tmp_path, texts):
    source = write_lines(tmp_path / "docs.txt", texts[:20])
    prepare_mds([source], tmp_path / "out", None, MAX_LEN, progress=False)
    with pytest.raises(FileExistsError, match=r"out/train is not empty; pass overwrite=True"):
        prepare_mds([source], tmp_path / "out", None, MAX_LEN, progress=False)
    result = prepare_mds([source], tmp_path / "out", None, MAX_LEN, mode="concat", overwrite=True, progress=False)
    assert read_manifest(tmp_path / "out" / "train").mode == "concat" == result.manifests["train"].mode


def test_manifest_mismatch_names_file_key_expected_and_found(tmp_path, texts, tokenizer):
    source = write_lines(tmp_path / "docs.txt", texts[:20])
    prepare_mds([source], tmp_path / "out", None, MAX_LEN, progress=False)
    manifest = read_manifest(tmp_path / "out" / "train")
    location = str(tmp_path / "out" / "train" / "m2dist_manifest.json")
    check_manifest(manifest, Expected(30528, MAX_LEN, tokenizer.sha256), location)
    cases = [
        (Expected(30592, MAX_LEN, tokenizer.sha256), r"key 'padded_vocab_size': expected 30592 \(model.vocab_size\), found 30528"),
        (Expected(30528, 128, tokenizer.sha256), rf"key 'max_len': expected 128 \(train.seq_len\), found {MAX_LEN}"),
        (Expected(30528, MAX_LEN, "0" * 64), rf"key 'tokenizer_sha256': expected '0+' \(data.tokenizer\), found '{tokenizer.sha256}'"),
    ]  # fmt: skip
    for expected, message in cases:
        with pytest.raises(ManifestMismatchError, match=message) as err:
            check_manifest(manifest, expected, location)
        assert str(err.value).startswith(location)


def test_empty_input_is_an_error_and_writes_nothing(tmp_path, texts):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=rf"{empty}: no document to tokenize \(empty, or blank lines only\)"):
        prepare_mds([empty], tmp_path / "out", None, MAX_LEN, progress=False)
    assert not (tmp_path / "out" / "train").exists()  # a rerun needs no --overwrite
    short = write_lines(tmp_path / "short.txt", texts[:2])
    with pytest.raises(DataError, match=r"short.txt: 2 training documents gave no sample of 4096 tokens \(concat"):
        prepare_mds([short], tmp_path / "out", None, 4096, mode="concat", val_fraction=0.0, progress=False)
    with pytest.raises(SystemExit, match=rf"error: {empty}: no document"):
        from tools.prepare_mds import main

        main([str(empty), "--out", str(tmp_path / "cli"), "--max-len", "24", "--quiet", "--no-tracking"])


def test_manifest_records_the_largest_token_id(tmp_path, texts, tokenizer):
    source = write_lines(tmp_path / "docs.txt", texts[:40])
    result = prepare_mds([source], tmp_path / "out", None, MAX_LEN, val_fraction=0.2, progress=False)
    for split in ("train", "val"):
        written = max(max(sample) for sample in read_back(tmp_path / "out" / split))
        assert result.manifests[split].max_token_id == written == read_manifest(tmp_path / "out" / split).max_token_id
    manifest = read_manifest(tmp_path / "out" / "train")
    location = str(tmp_path / "out" / "train" / "m2dist_manifest.json")
    manifest.max_token_id = 30528
    with pytest.raises(ManifestMismatchError, match=r"key 'max_token_id': expected below 30528 \(model.vocab_size"):
        check_manifest(manifest, Expected(30528, MAX_LEN, tokenizer.sha256), location)


def test_an_empty_split_is_refused_before_training(tmp_path, texts, tokenizer):
    # Few documents and a small validation share: the validation split gets none.
    source = write_lines(tmp_path / "docs.txt", texts[:3])
    result = prepare_mds([source], tmp_path / "out", None, MAX_LEN, val_fraction=0.001, progress=False)
    assert result.manifests["val"].counts.samples == 0 and result.manifests["train"].counts.samples == 3
    location = str(tmp_path / "out" / "val" / "m2dist_manifest.json")
    with pytest.raises(ManifestMismatchError, match=r"key 'counts.samples': expected at least one sample, found 0"):
        check_manifest(read_manifest(tmp_path / "out" / "val"), Expected(30528, MAX_LEN, tokenizer.sha256), location)


def test_val_split_is_a_stable_hash():
    texts = [f"document number {i}" for i in range(20000)]
    share = np.mean([val_split_of(t, 0.05) for t in texts])
    assert abs(share - 0.05) < 0.01
    assert [val_split_of(t, 0.05) for t in texts[:100]] == [val_split_of(t, 0.05) for t in texts[:100]]
    assert not any(val_split_of(t, 0.0) for t in texts[:100])
