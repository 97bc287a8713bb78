"""All-reduce bus bandwidth between the GPUs of one node (fp32, NCCL; gloo between CPU processes).

  torchrun --nproc_per_node 8 tools/bench_allreduce.py                      # 1 MiB .. 1 GiB
  torchrun --nproc_per_node 2 tools/bench_allreduce.py --min-bytes 64K --max-bytes 4M --factor 4

Rank 0 prints size, median time, algbw and busbw (nccl-tests' definitions, GB/s = 1e9 bytes/s).
NCCL_NVLS_ENABLE=0 unless set otherwise.
"""

import argparse

from m2dist.bench.allreduce import benchmark_all_reduce, parse_size, size_range


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-bytes", default="1M", help="smallest tensor (bytes, or with K/M/G)")
    parser.add_argument("--max-bytes", default="1G", help="largest tensor")
    parser.add_argument("--factor", type=int, default=2, help="each size is the previous one times this")
    parser.add_argument("--repeats", type=int, default=20, help="timed all-reduces per size (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed all-reduces per size before timing")
    args = parser.parse_args()
    sizes = size_range(parse_size(args.min_bytes), parse_size(args.max_bytes), args.factor)
    benchmark_all_reduce(sizes, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
