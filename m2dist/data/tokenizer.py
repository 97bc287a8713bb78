"""One tokenizer interface, two backends: a BERT WordPiece `vocab.txt` and a sentencepiece model.

Both return token ids WITHOUT special tokens; the shard writer adds [CLS] and [SEP] itself, so the
two backends make identical sample layouts. Special ids are fixed per backend:

- WordPiece (bert-base-uncased vocab.txt): [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103, looked
  up by name in the file.
- sentencepiece (trained by `train_sentencepiece`): [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.

The model's embedding table is the vocabulary padded up to a multiple of 64 (30522 -> 30528).
"""

from __future__ import annotations

import hashlib
import os
import string
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from m2dist.data.readers import read_documents

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_VOCAB = ASSETS / "bert-base-uncased-vocab.txt"
VOCAB_MULTIPLE = 64
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the BERT special tokens in one vocabulary."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def as_tuple(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


SENTENCEPIECE_SPECIAL_IDS = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Embedding rows for `vocab_size` tokens: the next multiple of `multiple` (30522 -> 30528)."""
    if vocab_size < 1 or multiple < 1:
        raise ValueError(f"vocab_size and multiple must be >= 1, got {vocab_size}, {multiple}")
    return -(-vocab_size // multiple) * multiple


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes: what a shard manifest records of its tokenizer."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """A loaded tokenizer file. `encode_batch` gives ids without special tokens."""

    kind: str
    path: Path
    special: SpecialIds
    # Number of real tokens (ids are in [0, vocab_size)).
    vocab_size: int

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size)

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class WordPieceTokenizer(Tokenizer):
    """BERT WordPiece from a vocab.txt, with the `tokenizers` library (no hub access).

    Lowercases and strips accents (BERT uncased) unless the vocabulary holds capitalised ASCII words
    (a cased vocabulary has thousands, the uncased one none).
    """

    kind = "wordpiece"

    def __init__(self, vocab_path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers

        self.path = Path(vocab_path)
        vocab = _read_vocab(self.path)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"{self.path}: not a BERT vocab.txt: special tokens {missing} are missing")
        self.special = SpecialIds(*(vocab[t] for t in SPECIAL_TOKENS))
        self.vocab_size = len(vocab)
        cased = sum(token[:1] in string.ascii_uppercase for token in vocab if not token.startswith("[")) > 100
        self._hf = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        self._hf.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=not cased
        )
        self._hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._hf.decoder = decoders.WordPiece()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=False)


def _read_vocab(path: Path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            token = line.rstrip("\n")
            if token in vocab:
                raise ValueError(f"{path}:{index + 1}: token {token!r} repeats line {vocab[token] + 1}")
            vocab[token] = index
    if not vocab:
        raise ValueError(f"{path}: empty vocabulary file")
    return vocab


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model whose pieces include the five BERT special tokens."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{self.path}: not a sentencepiece model: {err}") from None
        ids = {}
        for token in SPECIAL_TOKENS:
            piece_id = self._sp.piece_to_id(token)
            if self._sp.id_to_piece(piece_id) != token:
                raise ValueError(
                    f"{self.path}: sentencepiece model lacks the piece {token}; train it with "
                    "tools/train_tokenizer.py, which adds the BERT special tokens"
                )
            ids[token] = piece_id
        self.special = SpecialIds(*(ids[t] for t in SPECIAL_TOKENS))
        self.vocab_size = self._sp.get_piece_size()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(list(ids))


def tokenizer_file(path: str | Path | None) -> Path:
    """The tokenizer file `path` names (`data.tokenizer`); None or "" = the bert-base-uncased
    vocab.txt shipped in m2dist/data/assets."""
    return Path(path) if path else DEFAULT_VOCAB


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """A `.txt` WordPiece vocabulary or a `.model` sentencepiece file; None or "" = the
    bert-base-uncased vocab.txt shipped in m2dist/data/assets."""
    path = tokenizer_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if path.suffix == ".txt":
        return WordPieceTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(f"{path}: expected a WordPiece vocab ending in .txt or a sentencepiece model ending in .model")


def train_sentencepiece(
    documents: Iterable[str],
    model_path: str | Path,
    vocab_size: int,
    model_type: Literal["unigram", "bpe"] = "unigram",
    character_coverage: float = 0.9995,
    lowercase: bool = True,
    num_threads: int | None = None,
    max_sentences: int = 2_000_000,
) -> SentencePieceTokenizer:
    """Train a sentencepiece model on `documents` (each split into its lines) and write
    `model_path` (must end in .model) and the matching `.vocab`. The BERT special tokens get the
    fixed ids of SENTENCEPIECE_SPECIAL_IDS."""
    import sentencepiece as spm

    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise ValueError(f"model_path must end in .model, got {model_path}")
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be >= 8 (5 special tokens and some pieces), got {vocab_size}")
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    model_path.parent.mkdir(parents=True, exist_ok=True)

    def sentences() -> Iterator[str]:
        for document in documents:
            for line in document.splitlines():
                if line.strip():
                    yield line

    ids = SENTENCEPIECE_SPECIAL_IDS
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_prefix=str(model_path.with_suffix("")),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        pad_id=ids.pad,
        unk_id=ids.unk,
        bos_id=ids.cls,
        eos_id=ids.sep,
        pad_piece="[PAD]",
        unk_piece="[UNK]",
        bos_piece="[CLS]",
        eos_piece="[SEP]",
        user_defined_symbols=["[MASK]"],
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    return SentencePieceTokenizer(model_path)


def train_tokenizer_from_files(
    inputs: Sequence[str | Path],
    model_path: str | Path,
    vocab_size: int,
    model_type: Literal["unigram", "bpe"] = "unigram",
    character_coverage: float = 0.9995,
    lowercase: bool = True,
    input_format: str = "auto",
    text_field: str = "text",
    num_threads: int | None = None,
    stats: dict[str, float] | None = None,
) -> SentencePieceTokenizer:
    """What tools/train_tokenizer.py runs: `train_sentencepiece` on the documents of text, JSONL
    or Parquet files (read as tools/prepare_mds.py reads them; unreadable lines are errors).

    If `stats` is given, it receives `documents` and `characters` read, and `seconds` taken."""
    if not inputs:
        raise ValueError("no input files given")
    for path in inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"input file not found: {path}")
    counts = {"documents": 0, "characters": 0}

    def documents() -> Iterator[str]:
        for path in inputs:
            for document in read_documents(path, input_format, text_field):  # type: ignore[arg-type]
                counts["documents"] += 1
                counts["characters"] += len(document.text)
                yield document.text

    started = time.perf_counter()
    tokenizer = train_sentencepiece(
        documents(), model_path, vocab_size, model_type, character_coverage, lowercase, num_threads
    )
    if stats is not None:
        stats.update(counts, seconds=time.perf_counter() - started)
    return tokenizer
