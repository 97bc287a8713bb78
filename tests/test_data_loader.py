"""Streaming MLM batches in one process: layout, manifest check before training, stream mixing,
masks independent of the worker count, stale shared memory, jobs starting together, config checks."""

import json
import multiprocessing
import os
import shutil
import time
from multiprocessing import shared_memory

import numpy as np
import pytest
import torch

from m2dist.config import config_from_dict
from m2dist.data.loader import (
    build_mlm_dataloader,
    clean_stale_shared_memory,
    close_mlm_dataloader,
    has_validation_split,
    streaming_registration_lock,
)
from m2dist.data.manifest import read_manifest
from m2dist.data.masking import IGNORE_INDEX
from m2dist.data.tokenizer import DEFAULT_VOCAB
from m2dist.errors import ConfigError, DataError, ManifestMismatchError

SPECIAL_IDS = (0, 100, 101, 102, 103)


def debug_config(embedded_dataset, tmp_path, **data):
    """configs/debug.yaml's model and length (L=64) reading the session's embedded shards."""
    values = {
        "model": {"hidden_size": 128, "intermediate_size": 512, "num_layers": 2, "l_max": 128},
        "train": {"seq_len": 64, "seed": 11},
        "data": {"prepared_dir": str(embedded_dataset.train.parent), "num_workers": 0, "cache_dir": str(tmp_path)},
    }
    values["data"].update(data)
    return config_from_dict(values, source="test")


def take(loader, count):
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    close_mlm_dataloader(loader)
    return batches


def test_batches_have_the_documented_layout(embedded_dataset, tmp_path):
    loader = build_mlm_dataloader(debug_config(embedded_dataset, tmp_path), micro_batch_size=16)
    raw = loader.dataset
    batches = take(loader, 5)
    # The resumable state counts samples, not the rows of the packed form the batches travel in.
    assert loader.num_samples_yielded == 5 * 16
    for batch in batches:
        assert list(batch) == ["input_ids", "attention_mask", "token_type_ids", "labels", "sample_index"]
        for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
            assert batch[key].shape == (16, 64) and batch[key].dtype == torch.int64, key
        assert batch["sample_index"].shape == (16,)
        ids, labels = batch["input_ids"], batch["labels"]
        # Put the selected tokens back: that must give exactly the stored sample.
        original = torch.where(labels != IGNORE_INDEX, labels, ids)
        for row, index in enumerate(batch["sample_index"].tolist()):
            stored = torch.from_numpy(super(type(raw), raw).get_item(index)["input_ids"].astype(np.int64))
            assert torch.equal(original[row, : len(stored)], stored)
            assert (original[row, len(stored) :] == 0).all()
            assert batch["attention_mask"][row].sum() == len(stored)
        assert (batch["attention_mask"] == (original != 0)).all()
        assert (labels[torch.isin(original, torch.tensor(SPECIAL_IDS))] == IGNORE_INDEX).all()
        assert (batch["token_type_ids"] == 0).all()
    selected = torch.cat([b["labels"] != IGNORE_INDEX for b in take(loader, 5)])
    real = torch.cat([b["attention_mask"] for b in take(loader, 5)]).sum()
    assert 0.2 < selected.sum() / real < 0.4  # train.mlm_probability 0.30 ([CLS]/[SEP] excluded)


def test_validation_masks_at_the_eval_rate_and_identically_every_pass(embedded_dataset, tmp_path):
    loader = build_mlm_dataloader(debug_config(embedded_dataset, tmp_path), micro_batch_size=32, split="val")
    first = list(loader)
    second = list(loader)
    assert sum(len(b["sample_index"]) for b in first) == read_manifest(embedded_dataset.val).counts.samples
    for a, b in zip(first, second):
        assert torch.equal(a["sample_index"], b["sample_index"]) and torch.equal(a["labels"], b["labels"])
    selected = sum((b["labels"] != IGNORE_INDEX).sum() for b in first)
    tokens = sum(b["attention_mask"].sum() for b in first)
    assert 0.10 < selected / tokens < 0.15  # 0.15 of the tokens that are not [CLS]/[SEP]


def test_token_ids_beyond_the_vocabulary_are_caught_before_step_one(embedded_dataset, tmp_path):
    from streaming import MDSWriter

    shards = tmp_path / "shards"
    ids = np.arange(101, 101 + 64, dtype=np.uint16)
    with MDSWriter(out=str(shards), columns={"input_ids": "ndarray:uint16"}, compression="zstd") as writer:
        for index in range(16):
            sample = ids.copy()
            if index == 5:
                sample[7] = 30525  # in the padded embedding table, but no token of the vocabulary
            writer.write({"input_ids": sample})
    values = json.loads((embedded_dataset.train / "m2dist_manifest.json").read_text())
    values["counts"]["samples"] = 16
    # A manifest of an older version, without max_token_id, still loads; the sample is caught when read.
    values.pop("max_token_id", None)
    (shards / "m2dist_manifest.json").write_text(json.dumps(values))
    cfg = debug_config(embedded_dataset, tmp_path, train=str(shards), shuffle=False)
    with pytest.raises(DataError, match=rf"{shards}/shard.00000.mds.zstd: sample 5 holds token id 30525, not below .* 30522"):
        take(build_mlm_dataloader(cfg, 8), 1)
    # The manifest's largest id is compared with model.vocab_size before anything is read.
    values["max_token_id"] = 30600
    (shards / "m2dist_manifest.json").write_text(json.dumps(values))
    with pytest.raises(ManifestMismatchError, match=r"key 'max_token_id': expected below 30528 \(model.vocab_size"):
        build_mlm_dataloader(cfg, 8)


def test_manifest_mismatch_is_an_error_before_loading(embedded_dataset, tmp_path):
    manifest = f"{embedded_dataset.train}/m2dist_manifest.json"
    cfg = debug_config(embedded_dataset, tmp_path, train=str(embedded_dataset.train))
    cfg.model.vocab_size = 30592
    with pytest.raises(
        ManifestMismatchError,
        match=rf"^{manifest}: key 'padded_vocab_size': expected 30592 \(model.vocab_size\), found 30528",
    ):
        build_mlm_dataloader(cfg, 8)
    cfg = debug_config(embedded_dataset, tmp_path, train=str(embedded_dataset.train))
    cfg.train.seq_len = 0
    with pytest.raises(
        ManifestMismatchError, match=r"key 'max_len': expected 128 \(model.l_max \(train.seq_len is 0\)\), found 64"
    ):
        build_mlm_dataloader(cfg, 8)
    other_vocab = tmp_path / "vocab.txt"
    shutil.copy(DEFAULT_VOCAB, other_vocab)
    with open(other_vocab, "a") as f:
        f.write("newtoken\n")
    cfg = debug_config(embedded_dataset, tmp_path, train=str(embedded_dataset.train), tokenizer=str(other_vocab))
    with pytest.raises(
        ManifestMismatchError, match=r"key 'tokenizer_sha256': expected '[0-9a-f]{64}' \(sha256 of data.tokenizer="
    ):
        build_mlm_dataloader(cfg, 8)


def test_streams_mix_in_the_given_proportions(embedded_dataset, tmp_path):
    from m2dist.data.corpus import prepare_default_dataset

    first = prepare_default_dataset(tmp_path / "first", max_len=64, mode="pad", max_documents=1000)
    second = prepare_default_dataset(tmp_path / "second", max_len=64, mode="concat", max_documents=600)
    n_first, n_second = (read_manifest(d.train).counts.samples for d in (first, second))
    assert n_first > 2 * n_second
    spec = f"{first.train}@0.25,{second.train}@0.75"
    loader = build_mlm_dataloader(debug_config(embedded_dataset, tmp_path, train=spec), micro_batch_size=50)
    # An epoch has as many samples as the streams together, drawn 1:3 (the small stream repeats).
    indices = torch.cat([b["sample_index"] for b in loader])
    assert abs(len(indices) - (n_first + n_second)) < 50
    share_second = (indices >= n_first).float().mean().item()
    assert abs(share_second - 0.75) < 0.03


def test_concat_mode_batches_are_full_rows_without_an_attention_mask(embedded_dataset, tmp_path):
    # Every sample of concat-mode shards fills its L positions, so the batches leave the mask out
    # (the models then take none, and BERT's SDPA may run its flash kernel); a stream in pad mode
    # among them brings it back.
    cfg = debug_config(embedded_dataset, tmp_path, embedded_mode="concat", prepared_dir=str(tmp_path / "concat"))
    loader = build_mlm_dataloader(cfg, micro_batch_size=8)
    assert loader.full_rows
    manifest = read_manifest(tmp_path / "concat" / "train")
    assert manifest.mode == "concat" and manifest.counts.samples >= 16
    for batch in take(loader, 2):
        assert list(batch) == ["input_ids", "token_type_ids", "labels", "sample_index"]
        original = torch.where(batch["labels"] == IGNORE_INDEX, batch["input_ids"], batch["labels"])
        assert batch["input_ids"].shape == (8, 64) and (original != 0).all()
    mixed = f"{tmp_path / 'concat' / 'train'},{embedded_dataset.train}"
    loader = build_mlm_dataloader(debug_config(embedded_dataset, tmp_path, train=mixed, val=""), micro_batch_size=8)
    assert not loader.full_rows
    assert "attention_mask" in take(loader, 1)[0]


def test_an_embedded_validation_split_without_samples_means_no_validation(embedded_dataset, tmp_path, monkeypatch, caplog):
    import m2dist.data.loader as loader_module
    from m2dist.config import StreamSpec
    from m2dist.data.corpus import prepare_default_dataset

    # At long L in concat mode the embedded corpus' validation text fills no window: the run trains
    # without validation (and says so) instead of stopping at the empty split's manifest.
    assert has_validation_split(debug_config(embedded_dataset, tmp_path))
    small = prepare_default_dataset(tmp_path / "small", max_len=64, mode="concat", max_documents=100)
    assert read_manifest(small.val).counts.samples == 0 < read_manifest(small.train).counts.samples
    monkeypatch.setattr(loader_module, "resolve_streams", lambda cfg, split, *_: [StreamSpec(str(getattr(small, split)))])
    assert not has_validation_split(debug_config(embedded_dataset, tmp_path, embedded_mode="concat"))
    assert "validation split has no sample of 64 tokens; no validation" in caplog.text
    # with data.train set, data.val alone decides
    assert not has_validation_split(debug_config(embedded_dataset, tmp_path, train=str(small.train)))


def test_masks_do_not_depend_on_the_number_of_workers(embedded_dataset, tmp_path):
    by_workers = {}
    for workers in (0, 2):
        loader = build_mlm_dataloader(
            debug_config(embedded_dataset, tmp_path, num_workers=workers), micro_batch_size=32
        )
        by_workers[workers] = {
            int(i): (ids, labels)
            for b in take(loader, 12)
            for i, ids, labels in zip(b["sample_index"], b["input_ids"], b["labels"])
        }
    common = set(by_workers[0]) & set(by_workers[2])
    assert len(common) > 20
    for index in common:
        assert all(torch.equal(a, b) for a, b in zip(by_workers[0][index], by_workers[2][index])), index


def test_stale_shared_memory_is_removed_and_live_segments_kept():
    stale = shared_memory.SharedMemory(name="999990_resume", create=True, size=64)
    stale.close()  # unmapped, never unlinked: what a SIGKILLed run leaves behind
    live = shared_memory.SharedMemory(name="999991_resume", create=True, size=64)
    try:
        removed = clean_stale_shared_memory()
        assert "999990_resume" in removed
        assert not os.path.exists("/dev/shm/999990_resume")
        assert os.path.exists("/dev/shm/999991_resume")
    finally:
        live.close()
        live.unlink()
        if os.path.exists("/dev/shm/999990_resume"):
            os.unlink("/dev/shm/999990_resume")


def _job_building_a_loader(prepared_dir, cache_dir, events, results):
    """One job's local rank 0 (another process): reports "ready", builds its loader on "go", reports
    ("ok", time) or ("error", message), and keeps the loader (and its shared memory) until "finish"."""
    go, finish = events
    cfg = config_from_dict(
        {"train": {"seq_len": 64}, "data": {"prepared_dir": prepared_dir, "num_workers": 0, "cache_dir": cache_dir}}
    )
    results.put(("ready", os.getpid()))
    go.wait(timeout=300)
    try:
        loader = build_mlm_dataloader(cfg, micro_batch_size=4)
    except Exception as err:  # noqa: BLE001 - reported to the test process
        results.put(("error", repr(err)))
        return
    results.put(("ok", time.time()))
    finish.wait(timeout=300)
    close_mlm_dataloader(loader)


def _start_jobs(count, embedded_dataset, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    go, finish, results = ctx.Event(), ctx.Event(), ctx.Queue()
    jobs = [
        ctx.Process(
            target=_job_building_a_loader,
            args=(str(embedded_dataset.train.parent), str(tmp_path / f"job{i}"), (go, finish), results),
        )
        for i in range(count)
    ]
    for job in jobs:
        job.start()
    for _ in jobs:
        assert results.get(timeout=300)[0] == "ready"
    return jobs, go, finish, results


def _stop_jobs(jobs, finish):
    finish.set()
    for job in jobs:
        job.join(timeout=120)
        if job.is_alive():
            job.kill()


def test_a_job_registers_its_shared_memory_only_under_the_node_lock(embedded_dataset, tmp_path):
    with streaming_registration_lock():
        jobs, go, finish, results = _start_jobs(1, embedded_dataset, tmp_path)
        go.set()
        time.sleep(3.0)  # building takes well under a second when nothing holds the lock
        released = time.time()
    try:
        status, value = results.get(timeout=300)
        assert status == "ok", value
        assert value >= released, "the loader was built while another job held the registration lock"
    finally:
        _stop_jobs(jobs, finish)


def test_jobs_starting_together_on_one_node_all_get_their_loaders(embedded_dataset, tmp_path):
    # Without the lock two of them can pick the same shared-memory prefix and one dies in streaming
    # (FileExistsError on '<prefix>_locals').
    jobs, go, finish, results = _start_jobs(4, embedded_dataset, tmp_path)
    try:
        go.set()
        outcomes = [results.get(timeout=300) for _ in jobs]
        assert [status for status, _ in outcomes] == ["ok"] * 4, outcomes
    finally:
        _stop_jobs(jobs, finish)


def test_data_config_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"data.train: stream '/d@x': expected PATH@PROPORTION"):
        config_from_dict({"data": {"train": "/d@x"}})
    with pytest.raises(ConfigError, match="data.train: .*give a @PROPORTION to every stream or to none"):
        config_from_dict({"data": {"train": "/a@0.5,/b"}})
    with pytest.raises(ConfigError, match=r"data.val: expected streams without @PROPORTION"):
        config_from_dict({"data": {"train": "/a", "val": "/b@1"}})
    with pytest.raises(ConfigError, match=r"data.num_workers: expected an integer >= 0, got -1"):
        config_from_dict({"data": {"num_workers": -1}})
    with pytest.raises(ConfigError, match=r"data.tokenizer: expected a WordPiece vocab"):
        config_from_dict({"data": {"tokenizer": "tok.json"}})
    streams = config_from_dict({"data": {"train": "s3://b/c4/train@0.8, /d/books/train@0.2"}}).data.train
    assert streams == "s3://b/c4/train@0.8, /d/books/train@0.2"


def test_mapped_shard_reads_give_streamings_bytes_and_keep_few_files_open(tmp_path, monkeypatch):
    # Every sample read through the memory map is the bytes streaming's reader returns; a process
    # keeps at most MAX_OPEN shards mapped; a shard not on disk raises FileNotFoundError, on which
    # the dataset lets streaming fetch it.
    from streaming import MDSWriter
    from streaming.base.format import reader_from_json

    from m2dist.data import mapped_shards

    out = tmp_path / "shards"
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(out), columns={"input_ids": "ndarray:uint16"}, size_limit=4096) as writer:
        for _ in range(300):
            writer.write({"input_ids": rng.integers(0, 30000, rng.integers(1, 128), dtype=np.uint16)})
    index = json.loads((out / "index.json").read_text())
    readers = [reader_from_json(str(out), None, shard) for shard in index["shards"]]
    assert len(readers) > 4
    monkeypatch.setattr(mapped_shards, "MAX_OPEN", 3)
    mapped_shards.close_all()
    try:
        for reader in readers:
            for i in range(reader.samples):
                assert mapped_shards.sample_bytes(reader, i) == reader.get_sample_data(i)
            assert len(mapped_shards._maps) <= 3
        missing = reader_from_json(str(tmp_path / "elsewhere"), None, index["shards"][0])
        with pytest.raises(FileNotFoundError):
            mapped_shards.sample_bytes(missing, 0)
    finally:
        mapped_shards.close_all()


def _write_shards(out, dtype, count=300, size_limit=4096, seed=0):
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    with MDSWriter(out=str(out), columns={"input_ids": f"ndarray:{dtype}"}, size_limit=size_limit) as writer:
        for _ in range(count):
            writer.write({"input_ids": rng.integers(0, 70000 if dtype == "uint32" else 30000, rng.integers(1, 300), dtype=dtype)})
    return json.loads((out / "index.json").read_text())


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_single_array_samples_decode_as_streaming_decodes_them(tmp_path, dtype):
    # The loader's decoder of a one-column ndarray shard (what tools/prepare_mds.py writes) gives
    # streaming's array for every sample, lengths past 255 (a two-byte shape) included; bytes of
    # another layout are refused, not misread.
    from streaming.base.format import reader_from_json

    from m2dist.data import mapped_shards

    index = _write_shards(tmp_path / "shards", dtype)
    for shard in index["shards"]:
        reader = reader_from_json(str(tmp_path / "shards"), None, shard)
        assert mapped_shards.single_array_dtype(reader) == np.dtype(dtype)
        for i in range(reader.samples):
            data = reader.get_sample_data(i)
            ours, theirs = mapped_shards.decode_single_array(data, np.dtype(dtype)), reader.decode_sample(data)["input_ids"]
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    with pytest.raises(ValueError, match="1-D"):
        mapped_shards.decode_single_array(data[:4] + bytes([2 << 2]) + data[5:], np.dtype(dtype))
    with pytest.raises(ValueError, match="do not fill"):
        mapped_shards.decode_single_array(data, np.dtype("uint64"))
    with pytest.raises(ValueError, match="too short"):
        mapped_shards.decode_single_array(data[:5], np.dtype(dtype))


def test_single_array_layout_only_for_one_unshaped_ndarray_column(tmp_path):
    from streaming import MDSWriter
    from streaming.base.format import reader_from_json

    from m2dist.data import mapped_shards

    layouts = {"a": {"input_ids": "ndarray:uint16:4"}, "b": {"input_ids": "ndarray"}, "c": {"input_ids": "ndarray:uint16", "x": "int"}}
    for name, columns in layouts.items():
        with MDSWriter(out=str(tmp_path / name), columns=columns) as writer:
            writer.write({"input_ids": np.arange(4, dtype=np.uint16), "x": 1} if "x" in columns else {"input_ids": np.arange(4, dtype=np.uint16)})
        shard = json.loads((tmp_path / name / "index.json").read_text())["shards"][0]
        assert mapped_shards.single_array_dtype(reader_from_json(str(tmp_path / name), None, shard)) is None, name


def _sample_order(dataset_class, remote, local, **kwargs):
    """The sample ids a StreamingDataset subclass yields in one epoch over `remote` (one process)."""
    dataset = dataset_class(remote=str(remote), local=str(local), **kwargs)
    try:
        return list(dataset)
    finally:
        iterator = getattr(dataset, "_iterator", None)
        if iterator is not None:
            iterator.exit()


@pytest.mark.parametrize("chunk, predownload", [(3, 5), (256, None), (7, 1000)])
def test_chunked_sample_loops_yield_streamings_order(tmp_path, monkeypatch, chunk, predownload):
    # The prepare, ready and yield loops stepped a run of samples at a time yield the ids that
    # streaming's own per-sample loops yield, in the same order, over many shards (compressed, so the
    # prepare loop decompresses each), shuffled, with runs cut by the predownload limit.
    from streaming import StreamingDataset

    from m2dist.data import sample_loop

    class StreamingIds(StreamingDataset):
        def get_item(self, sample_id, retry=7):
            return int(sample_id)

    class ChunkedIds(sample_loop.ChunkedSampleLoop, StreamingIds):
        pass

    from streaming import MDSWriter

    rng = np.random.default_rng(1)
    with MDSWriter(out=str(tmp_path / "shards"), columns={"input_ids": "ndarray:uint16"}, size_limit=2048, compression="zstd") as writer:
        for _ in range(500):
            writer.write({"input_ids": rng.integers(0, 30000, rng.integers(1, 60), dtype=np.uint16)})
    monkeypatch.setattr(sample_loop, "CHUNK", chunk)
    options = {"shuffle": True, "shuffle_seed": 5, "batch_size": 4, "predownload": predownload}
    theirs = _sample_order(StreamingIds, tmp_path / "shards", tmp_path / "a", **options)
    ours = _sample_order(ChunkedIds, tmp_path / "shards", tmp_path / "b", **options)
    assert len(theirs) == 500 and sorted(theirs) == list(range(500)) and theirs != sorted(theirs)
    assert ours == theirs
    # Every shard was decompressed into the chunked dataset's cache.
    assert len(list((tmp_path / "b").glob("shard.*.mds"))) == len(list((tmp_path / "a").glob("shard.*.mds"))) > 5


def test_sample_shards_are_found_as_streamings_spanner_finds_them():
    from streaming.base.spanner import Spanner

    from m2dist.data import sample_loop

    sizes = np.array([5, 1, 7, 3, 1024, 2], dtype=np.int64)
    spanner = Spanner(sizes.copy(), span_size=8)
    ids = np.arange(sizes.sum())
    expected = [spanner[i] for i in ids]
    assert sample_loop.shards_of(spanner.shard_bounds, np.append(ids, -1)).tolist() == [s for s, _ in expected] + [-1]

    class Holder(sample_loop.ChunkedSampleLoop):
        pass

    holder = Holder()
    holder.spanner = spanner
    assert [holder.shard_and_index(i) for i in ids] == expected
    for outside in (-1, int(sizes.sum())):
        with pytest.raises(IndexError, match="Invalid sample index"):
            holder.shard_and_index(outside)
