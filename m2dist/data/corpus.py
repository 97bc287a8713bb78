"""The embedded corpus and the one call that turns it into train/val shards for the debug run.

The corpus is the prose of the Python 3.11 documentation (5.3 MB, ~865k words, PSF License;
`assets/README.md` says how it was made). `prepare_default_dataset` tokenizes it with the shipped
bert-base-uncased vocab.txt (or a sentencepiece model it trains on the corpus) into MDS shards in a
few seconds, and reuses them when they are already there with the same settings.
"""

from __future__ import annotations

import itertools
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from m2dist.config import load_config
from m2dist.data.manifest import MANIFEST_NAME, read_manifest
from m2dist.data.prepare import prepare_mds
from m2dist.data.readers import read_documents
from m2dist.data.tokenizer import ASSETS, file_sha256, tokenizer_file, train_sentencepiece
from m2dist.errors import DataError, OutputExistsError

EMBEDDED_CORPUS = ASSETS / "python-docs-3.11.txt.gz"
# Share of the corpus' paragraphs held out for validation.
DEFAULT_VAL_FRACTION = 0.02


@dataclass(frozen=True)
class PreparedDataset:
    """Shard folders of both splits and the tokenizer they were made with."""

    train: Path
    val: Path
    tokenizer: Path

    def __getitem__(self, split: str) -> Path:
        if split not in ("train", "val"):
            raise KeyError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val


def default_prepared_dir(max_len: int, tokenizer_path: str | Path | None = None, mode: str = "pad") -> Path:
    """~/.cache/m2dist/embedded-L{max_len}-{tokenizer hash}, embedded-concat-... in concat mode
    (XDG_CACHE_HOME respected)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = file_sha256(tokenizer_file(tokenizer_path))[:12]
    kind = "embedded" if mode == "pad" else f"embedded-{mode}"
    return cache / "m2dist" / f"{kind}-L{max_len}-{digest}"


def _debug_seq_len() -> int:
    return load_config("debug").seq_len


@dataclass(frozen=True)
class _Settings:
    max_len: int
    mode: str
    max_documents: int | None
    # The tokenizer file's hash, or for a sentencepiece model trained here, its vocabulary size.
    tokenizer_sha256: str | None
    sentencepiece_vocab_size: int | None


def _is_prepared(out_dir: Path, settings: _Settings) -> bool:
    """True when out_dir holds both splits of the embedded corpus made with these settings."""
    for split in ("train", "val"):
        if not (out_dir / split / MANIFEST_NAME).is_file():
            return False
        manifest = read_manifest(out_dir / split)
        made_from_corpus = [Path(p).name for p in manifest.inputs] == [EMBEDDED_CORPUS.name]
        if not made_from_corpus:
            raise OutputExistsError(f"{out_dir}: holds shards of {manifest.inputs}, not of the embedded corpus")
        if settings.sentencepiece_vocab_size:
            same_tokenizer = manifest.vocab_size == settings.sentencepiece_vocab_size
        else:
            same_tokenizer = manifest.tokenizer_sha256 == settings.tokenizer_sha256
        made = (manifest.max_len, manifest.mode, manifest.max_documents)
        if made != (settings.max_len, settings.mode, settings.max_documents) or not same_tokenizer:
            return False
    return True


def _check_only_preparations(out_dir: Path) -> None:
    """Raise unless out_dir holds nothing but what prepare_default_dataset writes."""
    ours = {"train", "val", "tokenizer.model", "tokenizer.vocab"}
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
    if others:
        raise OutputExistsError(f"{out_dir}: holds {others}; give an empty or new folder for the embedded corpus")


def _remove_previous_preparation(out_dir: Path) -> None:
    """Delete an embedded-corpus folder made with other settings, and nothing else."""
    _check_only_preparations(out_dir)
    shutil.rmtree(out_dir)


def prepare_default_dataset(
    out_dir: str | Path,
    max_len: int | None = None,
    tokenizer_path: str | Path | None = None,
    mode: Literal["pad", "concat"] = "pad",
    sentencepiece_vocab_size: int | None = None,
    max_documents: int | None = None,
    num_workers: int = 1,
    progress: bool = False,
) -> PreparedDataset:
    """Tokenize the embedded corpus into `out_dir/train` and `out_dir/val` (MDS + manifests).

    max_len: tokens per sample; None = configs/debug.yaml's sequence length.
    tokenizer_path: a vocab.txt or .model; None = the shipped bert-base-uncased vocab.txt.
    sentencepiece_vocab_size: instead train a unigram sentencepiece model of this size on the
        corpus (written to out_dir/tokenizer.model) and tokenize with it; the model's
        vocab_size must then be its padded size (e.g. 8000 -> 8000, 30000 -> 30016).
    max_documents: use only the first documents (paragraphs) of the corpus (tests).

    Shards already in `out_dir` with the same settings are reused; otherwise they are built in a
    sibling folder and renamed into place, so concurrent callers (one per node) do not collide.
    """
    if tokenizer_path and sentencepiece_vocab_size:
        raise ValueError("give tokenizer_path or sentencepiece_vocab_size, not both")
    out_dir = Path(out_dir)
    max_len = max_len or _debug_seq_len()
    if sentencepiece_vocab_size:
        tokenizer_path = out_dir / "tokenizer.model"
        expected_sha = None
    else:
        tokenizer_path = tokenizer_file(tokenizer_path)
        expected_sha = file_sha256(tokenizer_path)
    settings = _Settings(max_len, mode, max_documents, expected_sha, sentencepiece_vocab_size)
    if out_dir.exists():
        if _is_prepared(out_dir, settings):
            return PreparedDataset(out_dir / "train", out_dir / "val", tokenizer_path)
        _check_only_preparations(out_dir)

    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir(parents=True)
    try:
        staged_tokenizer = tokenizer_path
        if sentencepiece_vocab_size:
            staged_tokenizer = staging / "tokenizer.model"
            documents = (d.text for d in itertools.islice(read_documents(EMBEDDED_CORPUS, "lines"), max_documents))
            train_sentencepiece(documents, staged_tokenizer, sentencepiece_vocab_size, model_type="unigram")
        prepare_mds(
            [EMBEDDED_CORPUS],
            staging,
            staged_tokenizer,
            max_len,
            mode,
            input_format="lines",
            val_fraction=DEFAULT_VAL_FRACTION,
            num_workers=num_workers,
            max_documents=max_documents,
            progress=progress,
        )
        if out_dir.exists():
            if _is_prepared(out_dir, settings):
                # Another process (node) finished first.
                return PreparedDataset(out_dir / "train", out_dir / "val", tokenizer_path)
            _remove_previous_preparation(out_dir)
        try:
            os.rename(staging, out_dir)
        except OSError:
            if not _is_prepared(out_dir, settings):
                raise DataError(f"{out_dir}: could not move the new shards into place") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreparedDataset(out_dir / "train", out_dir / "val", tokenizer_path)
