"""Tokenize text into MDS shards for pretraining: OUT/train and OUT/val, each with a manifest.

    python tools/prepare_mds.py --out data/c4-128 --max-len 128 --mode pad --workers 8 c4/*.jsonl.gz
    python tools/prepare_mds.py --out s3://bucket/c4-8k --max-len 8192 --mode concat --tokenizer tok.model c4/*.parquet
"""

import argparse
import sys

from m2dist.cli import run_cli
from m2dist.errors import DataError
from m2dist.tracking import StageRun, add_tracking_arguments, tracked_prepare_mds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="text (.txt, .gz), JSONL (.jsonl[.gz]) or Parquet files")
    parser.add_argument("--out", required=True, help="local folder or s3:// URL (S3_ENDPOINT_URL for non-AWS servers)")
    parser.add_argument("--max-len", type=int, required=True, help="tokens per sample, [CLS] and [SEP] included")
    parser.add_argument(
        "--mode", choices=["pad", "concat"], default="pad",
        help="pad: a truncated document per sample; concat: documents joined by [SEP], cut in full windows",
    )  # fmt: skip
    parser.add_argument("--tokenizer", default=None, help="vocab.txt or .model (default: bert-base-uncased vocab.txt)")
    parser.add_argument("--input-format", choices=["auto", "lines", "paragraphs", "jsonl", "parquet"], default="auto",
                        help="auto: by extension; text is one document per line unless 'paragraphs'")  # fmt: skip
    parser.add_argument("--text-field", default="text", help="JSONL field or Parquet column holding the text")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents (by text hash) in val")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--compression", default="zstd", help="MDS shard compression ('' for none)")
    parser.add_argument("--size-limit", default="64mb", help="shard size limit before compression")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards in OUT/train and OUT/val")
    parser.add_argument("--skip-bad-lines", action="store_true", help="log and count unreadable lines, do not fail")
    parser.add_argument("--max-documents", type=int, default=None, help="stop after this many documents")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tracking_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = StageRun.from_args("shards", args)
    try:
        result = tracked_prepare_mds(
            run, args.inputs, args.out, args.tokenizer, args.max_len, args.mode,
            input_format=args.input_format, text_field=args.text_field, val_fraction=args.val_fraction,
            num_workers=args.workers, compression=args.compression, size_limit=args.size_limit,
            overwrite=args.overwrite, on_bad_line="skip" if args.skip_bad_lines else "error",
            max_documents=args.max_documents, progress=not args.quiet,
        )  # fmt: skip
    except DataError as err:
        sys.exit(f"error: {err}")
    for split, manifest in result.manifests.items():
        counts = manifest.counts
        where = result.locations[split]
        print(f"{where}: {counts.samples} samples, {counts.tokens} tokens from {counts.documents} documents")
    print(run.summary())


if __name__ == "__main__":
    run_cli(main)
