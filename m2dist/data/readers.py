"""Readers of the documents of input files: plain text (one document per line, or per blank-line
paragraph), JSONL with a named text field, Parquet with a named text column; `.gz` text and JSONL
are read transparently. Data preparation, tokenizer training and GLUE read their files here.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from m2dist.errors import InputError

log = logging.getLogger(__name__)

InputFormat = Literal["auto", "lines", "paragraphs", "jsonl", "parquet"]


@dataclass(frozen=True)
class Document:
    """One document and where it starts (`file:line`, or `file:row N` for Parquet)."""

    where: str
    text: str


def resolve_format(path: Path, input_format: InputFormat) -> InputFormat:
    if input_format != "auto":
        return input_format
    suffixes = [s for s in path.suffixes if s != ".gz"]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "lines"


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


class BadLines:
    """Raise InputError on an unreadable line, or log it and count it (`count`) when `on_bad_line`
    is "skip"; one instance can be shared by the readers of several files."""

    def __init__(self, on_bad_line: Literal["error", "skip"]) -> None:
        self.skip = on_bad_line == "skip"
        self.count = 0

    def __call__(self, where: str, reason: str) -> None:
        if not self.skip:
            raise InputError(f"{where}: {reason}")
        self.count += 1
        log.warning("skipped unreadable input %s: %s", where, reason)


def _decoded_lines(path: Path, bad: BadLines) -> Iterator[tuple[int, str | None]]:
    with _open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                bad(f"{path}:{number}", f"not valid UTF-8 ({err.reason} at byte {err.start})")
                yield number, None


def read_documents(
    path: str | Path,
    input_format: InputFormat = "auto",
    text_field: str = "text",
    on_bad_line: Literal["error", "skip"] = "error",
    bad_lines: BadLines | None = None,
) -> Iterator[Document]:
    """Each non-empty document of one input file, with where it starts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    bad = bad_lines or BadLines(on_bad_line)
    kind = resolve_format(path, input_format)
    if kind == "lines":
        for number, line in _decoded_lines(path, bad):
            if line and line.strip():
                yield Document(f"{path}:{number}", line.strip())
    elif kind == "paragraphs":
        start, lines = 0, []
        for number, line in _decoded_lines(path, bad):
            if line is None:
                continue
            if line.strip():
                start = start or number
                lines.append(line.strip())
            elif lines:
                yield Document(f"{path}:{start}", " ".join(lines))
                start, lines = 0, []
        if lines:
            yield Document(f"{path}:{start}", " ".join(lines))
    elif kind == "jsonl":
        for number, line in _decoded_lines(path, bad):
            if line is None or not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                bad(where, f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                bad(where, f"no text field {text_field!r} (found {keys})")
                continue
            text = record[text_field]
            if not isinstance(text, str):
                bad(where, f"field {text_field!r} is {type(text).__name__}, expected a string")
                continue
            if text.strip():
                yield Document(where, text.strip())
    elif kind == "parquet":
        yield from _read_parquet(path, text_field, bad)
    else:
        raise ValueError(f"input_format must be auto, lines, paragraphs, jsonl or parquet, got {input_format!r}")


def open_parquet(path: Path):
    """A pyarrow ParquetFile, or InputError naming the file when it is not one."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid for a non-Parquet file
        raise InputError(f"{path}: not a Parquet file: {err}") from None


def _read_parquet(path: Path, text_field: str, bad: BadLines) -> Iterator[Document]:
    parquet = open_parquet(path)
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise InputError(f"{path}: no column {text_field!r}; columns are {columns}")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            where = f"{path}:row {row}"
            if not isinstance(text, str):
                found = "null" if text is None else type(text).__name__
                bad(where, f"column {text_field!r} is {found}, expected a string")
                continue
            if text.strip():
                yield Document(where, text.strip())
