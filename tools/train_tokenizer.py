"""Train a sentencepiece tokenizer with the BERT special tokens ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4).

    python tools/train_tokenizer.py --out tok/c4.model --vocab-size 32000 --model-type unigram data/*.txt
"""

import argparse
import sys

from m2dist.cli import run_cli
from m2dist.errors import DataError
from m2dist.tracking import StageRun, add_tracking_arguments, tracked_tokenizer_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="text (.txt, .gz), JSONL or Parquet files")
    parser.add_argument("--out", required=True, help="model file to write, ending in .model (and a .vocab beside)")
    parser.add_argument("--vocab-size", type=int, required=True, help="pieces, special tokens included")
    parser.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--cased", action="store_true", help="keep case (default: case-folded, like BERT uncased)")
    parser.add_argument("--input-format", choices=["auto", "lines", "paragraphs", "jsonl", "parquet"], default="auto")
    parser.add_argument("--text-field", default="text", help="JSONL field or Parquet column holding the text")
    parser.add_argument("--threads", type=int, default=None, help="training threads (default: all cores)")
    add_tracking_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = StageRun.from_args("tokenizer", args)
    try:
        tokenizer = tracked_tokenizer_training(
            run, args.inputs, args.out, args.vocab_size, args.model_type, args.character_coverage,
            lowercase=not args.cased, input_format=args.input_format, text_field=args.text_field,
            num_threads=args.threads,
        )  # fmt: skip
    except DataError as err:
        sys.exit(f"error: {err}")
    print(
        f"wrote {tokenizer.path}: {tokenizer.vocab_size} pieces (model vocab_size {tokenizer.padded_vocab_size}), "
        f"special ids {tokenizer.special}"
    )
    print(run.summary())


if __name__ == "__main__":
    run_cli(main)
