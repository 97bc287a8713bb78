"""Build the English prose corpus from Debian 12 `main` packages (dictionaries and manuals):
OUT/train.jsonl, OUT/val.jsonl, OUT/SOURCES.md and OUT/sources.json. Downloads with `apt-get
download` into the cache (default OUT/cache) and reuses what is there on a re-run.

    python tools/make_english_corpus.py --out /data/english-corpus
    python tools/make_english_corpus.py --out /data/english-corpus --packages dict-gcide perl-doc --overwrite
"""

import argparse

from m2dist.cli import run_cli
from m2dist.data.english_corpus import PACKAGES, build_english_corpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (outside the repository)")
    parser.add_argument("--cache-dir", default=None, help="downloaded and unpacked packages (default OUT/cache)")
    names = [p.name for p in PACKAGES]
    parser.add_argument("--packages", nargs="+", choices=names, default=None, help="a subset of the packages (default: all)")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents (by id hash) in val")
    parser.add_argument("--passage-words", type=int, default=90, help="most words per passage (~128 tokens at 90)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/train.jsonl and OUT/val.jsonl")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    packages = tuple(p for p in PACKAGES if args.packages is None or p.name in args.packages)
    report = build_english_corpus(
        args.out, packages, cache_dir=args.cache_dir, val_fraction=args.val_fraction,
        passage_words=args.passage_words, overwrite=args.overwrite, progress=not args.quiet,
    )  # fmt: skip
    print(report.summary())


if __name__ == "__main__":
    run_cli(main)
