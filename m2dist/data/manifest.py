"""The manifest beside each split's MDS shards, and the check that training runs on it.

`tools/prepare_mds.py` writes `m2dist_manifest.json` next to `index.json` in every split folder. It
records how the tokens were made (tokenizer file hash, vocabulary, max_len, mode) and counts. Before
a loader is built, `check_manifest` compares it with what the run expects, so shards made with
another tokenizer or length fail with the file, key, expected and found values instead of training
on wrong ids.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from m2dist.config import REMOTE_SCHEMES
from m2dist.errors import DataError, ManifestMismatchError

MANIFEST_NAME = "m2dist_manifest.json"
MANIFEST_FORMAT = "m2dist-mlm-mds/1"


@dataclass
class ManifestCounts:
    # Non-empty documents read into this split.
    documents: int = 0
    # Samples (sequences) written.
    samples: int = 0
    # Tokens written, [CLS]/[SEP] included, padding excluded.
    tokens: int = 0
    # Documents longer than max_len, cut (pad mode).
    truncated_documents: int = 0
    # Tokens not written: cut from long documents (pad) or the last partial window (concat).
    dropped_tokens: int = 0
    # Documents that tokenized to nothing.
    empty_documents: int = 0
    # Unreadable input lines or rows skipped with on_bad_line="skip" (all splits together).
    bad_lines: int = 0


@dataclass
class Manifest:
    # "train" or "val".
    split: str
    # "pad" (one document per sample, truncated) or "concat" (full windows of max_len tokens).
    mode: str
    # Tokens per sample, [CLS] and [SEP] included; pad samples may be shorter.
    max_len: int
    # "wordpiece" or "sentencepiece".
    tokenizer_kind: str
    # File name of the tokenizer (informative) and the SHA-256 of its bytes (checked).
    tokenizer_file: str
    tokenizer_sha256: str
    # Real tokens in the vocabulary, and the model's embedding rows (next multiple of 64).
    vocab_size: int
    padded_vocab_size: int
    # Ids of [PAD] [UNK] [CLS] [SEP] [MASK].
    special_ids: dict[str, int]
    # numpy dtype of the stored ids: "uint16" or "uint32".
    dtype: str
    # Share of documents sent to validation (by a hash of their text).
    val_fraction: float
    counts: ManifestCounts = field(default_factory=ManifestCounts)
    # The input files, as given.
    inputs: list[str] = field(default_factory=list)
    # Documents read at most (None = all): a truncated preparation says so.
    max_documents: int | None = None
    # The largest token id written (None in manifests of older versions): checked against the
    # model's embedding rows before the first step.
    max_token_id: int | None = None
    format: str = MANIFEST_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> Manifest:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{source}: not valid JSON: {err}") from None
        if not isinstance(values, dict) or values.get("format") != MANIFEST_FORMAT:
            found = values.get("format") if isinstance(values, dict) else type(values).__name__
            raise DataError(f"{source}: key 'format': expected {MANIFEST_FORMAT!r}, found {found!r}")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(values) - {"counts", "inputs", "format", "max_documents", "max_token_id"})
        if missing:
            raise DataError(f"{source}: missing keys {missing}")
        unknown = sorted(set(values) - names)
        if unknown:
            raise DataError(f"{source}: unknown keys {unknown}")
        counts = ManifestCounts(**values.pop("counts", {}))
        return cls(**values, counts=counts)


def manifest_location(shard_dir: str) -> str:
    return shard_dir.rstrip("/") + "/" + MANIFEST_NAME


def read_manifest(shard_dir: str | Path, download_dir: str | Path | None = None) -> Manifest:
    """The manifest of a local shard folder or of an s3:// prefix (downloaded into
    `download_dir`, a temporary folder if None)."""
    location = manifest_location(str(shard_dir))
    if str(shard_dir).startswith(REMOTE_SCHEMES):
        local = Path(download_dir or tempfile.mkdtemp(prefix="m2dist-manifest-")) / MANIFEST_NAME
        local.unlink(missing_ok=True)
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            _download(location, str(local))
        except Exception as err:  # botocore's ClientError for a missing object, network errors
            hint = "make shards with tools/prepare_mds.py"
            raise DataError(f"{location}: could not download the manifest ({err}); {hint}") from err
        text = local.read_text()
    else:
        path = Path(location)
        if not path.is_file():
            raise DataError(f"{path}: no manifest; make shards with tools/prepare_mds.py")
        text = path.read_text()
    return Manifest.from_json(text, location)


def _download(remote: str, local: str, timeout_s: float = 60) -> None:
    try:
        from streaming.base.storage import CloudDownloader
    except ImportError:  # mosaicml-streaming 0.12
        from streaming.base.storage import download_file

        download_file(remote, local, timeout_s)
        return
    CloudDownloader.direct_download(remote, local, timeout_s)


@dataclass(frozen=True)
class Expected:
    """What a run needs of its shards, and the config key each value comes from."""

    # Embedding rows of the model (model.vocab_size); must equal the manifest's padded_vocab_size.
    padded_vocab_size: int
    # Sequence length of the run (train.seq_len, or model.l_max when 0).
    max_len: int
    # SHA-256 of the run's tokenizer file (data.tokenizer).
    tokenizer_sha256: str
    # Config keys named in errors.
    sources: dict[str, str] = field(
        default_factory=lambda: {
            "padded_vocab_size": "model.vocab_size",
            "max_len": "train.seq_len",
            "tokenizer_sha256": "data.tokenizer",
        }
    )


def check_manifest(manifest: Manifest, expected: Expected, location: str) -> None:
    """Raise ManifestMismatchError naming the manifest file, each key that differs, the value the
    config expects (and its key) and the value found."""
    problems = []
    for key in ("padded_vocab_size", "max_len", "tokenizer_sha256"):
        want: Any = getattr(expected, key)
        found: Any = getattr(manifest, key)
        if want != found:
            problems.append(f"key {key!r}: expected {want!r} ({expected.sources[key]}), found {found!r}")
    if manifest.max_token_id is not None and manifest.max_token_id >= expected.padded_vocab_size:
        source = expected.sources["padded_vocab_size"]
        problems.append(
            f"key 'max_token_id': expected below {expected.padded_vocab_size} ({source}, the embedding rows), "
            f"found {manifest.max_token_id}"
        )
    if manifest.counts.samples == 0:
        problems.append("key 'counts.samples': expected at least one sample, found 0")
    if problems:
        hint = "; make the shards again with the run's tokenizer and length, or change the config"
        raise ManifestMismatchError(f"{location}: " + "; ".join(problems) + hint)
