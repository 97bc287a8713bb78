"""Tokens/s of the data path (MDS shards -> masked MLM batches) per loader worker process.

    python tools/bench_data.py --seq-len 128 8192 --workers 1

Shards are made from the embedded corpus (concat mode, full windows, the corpus repeated for long
lengths) under --work-dir. The goal is a ratio >= 10: each worker delivers 10x what one GPU
consumes training M2-BERT-80M through the engine (a rank runs data.num_workers of them, 2 by default).
"""

import argparse
import json
import tempfile

from m2dist.bench.data import GOAL_RATIO, bench_data_path, gpu_tokens_per_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128, 8192])
    parser.add_argument("--tokens-per-batch", type=int, default=32768, help="micro-batch = this // seq-len")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (0 = in process)")
    parser.add_argument("--batches", type=int, default=50, help="timed batches (after 2 per worker of warm-up)")
    parser.add_argument("--work-dir", default=None, help="where shards are made (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per length")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="m2dist-bench-") as scratch:
        for seq_len in args.seq_len:
            work_dir = args.work_dir or scratch
            result = bench_data_path(seq_len, work_dir, args.tokens_per_batch, args.workers, args.batches)
            if args.json:
                print(json.dumps(result.to_dict()))
                continue
            print(
                f"L={seq_len:>6} B={result.micro_batch_size:>4} workers={args.workers}: "
                f"{result.tokens_per_s:,.0f} tokens/s, {result.tokens_per_s_per_worker:,.0f} per worker = "
                f"{result.ratio_to_gpu:.1f}x one H200 training M2-BERT-80M "
                f"({gpu_tokens_per_s(seq_len):,} tokens/s; goal {GOAL_RATIO:.0f}x)"
            )


if __name__ == "__main__":
    main()
