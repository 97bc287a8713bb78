"""Text -> tokenized MDS shards (train and val splits) with a manifest: what tools/prepare_mds.py runs.

Inputs: plain text (one document per line, or per blank-line paragraph), JSONL with a named text
field, or Parquet with a named text column; `.gz` text and JSONL are read transparently. Every
document goes to `val` when a hash of its text falls below `val_fraction`, so the split does not
depend on file order or worker count.

Samples are `{"input_ids": ndarray}` (uint16 when the vocabulary fits, else uint32):
- `pad`: [CLS] + the document's first max_len-2 tokens + [SEP] (stored unpadded);
- `concat`: the documents joined as `d1 [SEP] d2 [SEP] ...` and cut into windows of max_len-1
  tokens, each stored as [CLS] + window (exactly max_len ids); the last partial window is dropped.

Output: `OUT/train/` and `OUT/val/`, each with MDS shards (zstd, size limit), `index.json` and
`m2dist_manifest.json`. OUT is a local folder or an s3:// URL (S3_ENDPOINT_URL for other servers).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from m2dist.config import REMOTE_SCHEMES
from m2dist.data.manifest import MANIFEST_NAME, Manifest, ManifestCounts
from m2dist.data.readers import BadLines, Document, InputFormat, read_documents
from m2dist.data.tokenizer import Tokenizer, load_tokenizer
from m2dist.errors import DataError, OutputExistsError

log = logging.getLogger(__name__)

Mode = Literal["pad", "concat"]
SPLITS = ("train", "val")
# Documents handed to a tokenizer worker at once.
CHUNK_DOCUMENTS = 256


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def val_split_of(text: str, val_fraction: float) -> bool:
    """True when the document belongs to validation: a stable 64-bit hash of its UTF-8 text,
    as a fraction of 2**64, is below `val_fraction`."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _tokenize_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """In a worker process: `_tokenize_texts` with the worker's tokenizer."""
    assert _worker_tokenizer is not None, "worker started without _init_worker"
    return _tokenize_texts(_worker_tokenizer, texts)


def _tokenize_texts(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Flat uint32 ids of all texts and their lengths (one array each: cheap to send back)."""
    encoded = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter((i for ids in encoded for i in ids), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


class _SplitWriter:
    """Turns one split's token lists into samples and writes them with MDSWriter."""

    def __init__(self, out: str | tuple[str, str], mode: Mode, max_len: int, tokenizer: Tokenizer, **writer_args):
        from streaming import MDSWriter

        self.mode = mode
        self.max_len = max_len
        self.cls = tokenizer.special.cls
        self.sep = tokenizer.special.sep
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.counts = ManifestCounts()
        self.max_token_id: int | None = None
        self.pending = np.empty(0, dtype=self.dtype)
        self.writer = MDSWriter(out=out, columns={"input_ids": f"ndarray:{self.dtype.name}"}, **writer_args)
        self.local = self.writer.local

    def add(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            self.counts.empty_documents += 1
            return
        self.counts.documents += 1
        if self.mode == "pad":
            body = ids[: self.max_len - 2]
            if len(body) < len(ids):
                self.counts.truncated_documents += 1
                self.counts.dropped_tokens += len(ids) - len(body)
            self._write(np.concatenate([[self.cls], body, [self.sep]]).astype(self.dtype))
            return
        self.pending = np.concatenate([self.pending, ids.astype(self.dtype), [self.sep]]).astype(self.dtype)
        window = self.max_len - 1
        full = len(self.pending) // window
        for k in range(full):
            self._write(np.concatenate([[self.cls], self.pending[k * window : (k + 1) * window]]).astype(self.dtype))
        self.pending = self.pending[full * window :]

    def _write(self, sample: np.ndarray) -> None:
        self.writer.write({"input_ids": sample})
        top = int(sample.max())
        self.max_token_id = top if self.max_token_id is None else max(self.max_token_id, top)
        self.counts.samples += 1
        self.counts.tokens += len(sample)

    def finish(self) -> None:
        self.counts.dropped_tokens += len(self.pending)
        self.writer.finish()


def _check_output_free(out: str, overwrite: bool) -> None:
    if out.startswith(REMOTE_SCHEMES):
        from streaming.base.storage import CloudUploader

        for split in SPLITS:
            existing = CloudUploader.get(f"{out.rstrip('/')}/{split}", exist_ok=True).list_objects()
            if existing and not overwrite:
                raise OutputExistsError(
                    f"{out}/{split} already holds {len(existing)} objects; "
                    "pass overwrite=True (--overwrite) to replace them"
                )
        return
    for split in SPLITS:
        folder = Path(out) / split
        if folder.exists() and any(folder.iterdir()):
            if not overwrite:
                raise OutputExistsError(f"{folder} is not empty; pass overwrite=True (--overwrite) to replace its shards")
            shutil.rmtree(folder)


@dataclass
class PrepareResult:
    """The manifests written, by split, and where the splits are."""

    manifests: dict[str, Manifest]
    locations: dict[str, str]


def prepare_mds(
    inputs: Sequence[str | Path],
    out: str | Path,
    tokenizer_path: str | Path | None,
    max_len: int,
    mode: Mode = "pad",
    *,
    input_format: InputFormat = "auto",
    text_field: str = "text",
    val_fraction: float = 0.01,
    num_workers: int = 1,
    compression: str = "zstd",
    size_limit: int | str = "64mb",
    overwrite: bool = False,
    on_bad_line: Literal["error", "skip"] = "error",
    max_documents: int | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize `inputs` with the tokenizer file (None = bert-base-uncased vocab.txt) and write
    `out/train` and `out/val` as MDS shards with manifests. `num_workers` processes tokenize
    (1 = in this process); the output does not depend on it. `max_documents` stops early (tests,
    quick runs). Refuses to write into non-empty split folders unless `overwrite`.

    With num_workers > 1 the workers are spawned: a script that calls this must guard its entry
    point with `if __name__ == "__main__":`, as multiprocessing requires."""
    if mode not in ("pad", "concat"):
        raise ValueError(f"mode must be 'pad' or 'concat', got {mode!r}")
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 ([CLS], a token, [SEP]), got {max_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    if not inputs:
        raise ValueError("no input files given")
    for path in inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"input file not found: {path}")
    tokenizer = load_tokenizer(tokenizer_path)
    out = str(out)
    _check_output_free(out, overwrite)
    bad = BadLines(on_bad_line)

    def documents() -> Iterator[Document]:
        count = 0
        for path in inputs:
            for document in read_documents(path, input_format, text_field, bad_lines=bad):
                if max_documents is not None and count >= max_documents:
                    return
                count += 1
                yield document

    def chunks() -> Iterator[tuple[list[bool], list[str]]]:
        is_val: list[bool] = []
        texts: list[str] = []
        for document in documents():
            is_val.append(val_split_of(document.text, val_fraction))
            texts.append(document.text)
            if len(texts) == CHUNK_DOCUMENTS:
                yield is_val, texts
                is_val, texts = [], []
        if texts:
            yield is_val, texts

    writers: dict[str, _SplitWriter] = {}
    for split in SPLITS:
        target = f"{out.rstrip('/')}/{split}"
        writers[split] = _SplitWriter(
            target, mode, max_len, tokenizer, compression=compression or None, size_limit=size_limit, exist_ok=True
        )
    _tokenize_and_write(chunks(), writers, tokenizer, num_workers, progress)
    for writer in writers.values():
        writer.finish()
    _check_not_empty(inputs, out, writers, bad.count, max_len, mode)
    manifests = {}
    for split, writer in writers.items():
        writer.counts.bad_lines = bad.count
        manifests[split] = Manifest(
            split=split,
            mode=mode,
            max_len=max_len,
            tokenizer_kind=tokenizer.kind,
            tokenizer_file=tokenizer.path.name,
            tokenizer_sha256=tokenizer.sha256,
            vocab_size=tokenizer.vocab_size,
            padded_vocab_size=tokenizer.padded_vocab_size,
            special_ids=tokenizer.special.to_dict(),
            dtype=writer.dtype.name,
            val_fraction=val_fraction,
            counts=writer.counts,
            max_token_id=writer.max_token_id,
            inputs=[str(p) for p in inputs],
            max_documents=max_documents,
        )
    _write_manifests(out, manifests)
    locations = {split: f"{out.rstrip('/')}/{split}" for split in SPLITS}
    return PrepareResult(manifests, locations)


def _check_not_empty(
    inputs: Sequence[str | Path], out: str, writers: dict[str, _SplitWriter], bad_lines: int, max_len: int, mode: Mode
) -> None:
    """DataError when the training split got no sample (its empty split folders removed, when
    local); a warning for an empty validation split."""
    train, val = writers["train"].counts, writers["val"].counts
    if train.samples > 0:
        if val.samples == 0:
            log.warning("%s/val: no sample (%d documents went to validation); data.val cannot use it", out, val.documents)
        return
    if not out.startswith(REMOTE_SCHEMES):
        for split in SPLITS:
            shutil.rmtree(Path(out) / split, ignore_errors=True)
    names = ", ".join(str(p) for p in inputs)
    skipped = f", {bad_lines} unreadable lines skipped" if bad_lines else ""
    if train.documents + val.documents == 0:
        why = f"no document to tokenize (empty, or blank lines only{skipped})"
    elif mode == "concat" and train.documents:
        why = (
            f"{train.documents} training documents gave no sample of {max_len} tokens (concat mode keeps only "
            "full windows); give more text or a smaller --max-len"
        )
    else:
        why = f"no training document ({val.documents} went to validation); give more text"
    raise DataError(f"{names}: {why}; nothing written to {out}")


def _tokenize_and_write(
    chunks: Iterator[tuple[list[bool], list[str]]],
    writers: dict[str, _SplitWriter],
    tokenizer: Tokenizer,
    num_workers: int,
    progress: bool,
) -> None:
    from tqdm import tqdm

    bar = tqdm(unit=" docs", disable=not progress, desc="tokenizing", smoothing=0.1)
    started, tokens = time.perf_counter(), 0

    def consume(is_val: list[bool], flat: np.ndarray, lengths: np.ndarray) -> None:
        nonlocal tokens
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for k, val in enumerate(is_val):
            writers["val" if val else "train"].add(flat[offsets[k] : offsets[k + 1]])
        tokens += int(lengths.sum())
        bar.update(len(is_val))
        bar.set_postfix(tokens_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}", refresh=False)

    try:
        if num_workers == 1:
            for is_val, texts in chunks:
                consume(is_val, *_tokenize_texts(tokenizer, texts))
            return
        # spawn, not fork: the parent may already hold the tokenizers thread pool.
        context = multiprocessing.get_context("spawn")
        with context.Pool(num_workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool:
            pending = []
            split_flags = []
            for is_val, texts in chunks:
                pending.append(pool.apply_async(_tokenize_chunk, (texts,)))
                split_flags.append(is_val)
                # Keep a bounded window in flight; results are consumed in input order.
                while len(pending) > 4 * num_workers:
                    consume(split_flags.pop(0), *pending.pop(0).get())
            while pending:
                consume(split_flags.pop(0), *pending.pop(0).get())
    finally:
        bar.close()


def _write_manifests(out: str, manifests: dict[str, Manifest]) -> None:
    """Write each split's manifest next to its index.json (uploaded when `out` is remote)."""
    if not out.startswith(REMOTE_SCHEMES):
        for split, manifest in manifests.items():
            (Path(out) / split / MANIFEST_NAME).write_text(manifest.to_json())
        return
    from streaming.base.storage import CloudUploader

    with tempfile.TemporaryDirectory(prefix="m2dist-manifest-") as staging:
        for split, manifest in manifests.items():
            local = Path(staging) / split
            uploader = CloudUploader.get((str(local), f"{out.rstrip('/')}/{split}"), keep_local=True)
            (local / MANIFEST_NAME).write_text(manifest.to_json())
            uploader.upload_file(MANIFEST_NAME)
