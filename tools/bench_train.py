"""Training throughput on one GPU, m2dist models beside Hugging Face's BERT in one run.

  python tools/bench_train.py --configs m2-bert-80M bert-base --seq-lens 128 512 2048 8192
  python tools/bench_train.py --configs m2-bert-80M --kernels reference triton --seq-lens 128
"""

import argparse

from m2dist.engine.bench import HEADER, format_row, run_benchmark, hf_tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["m2-bert-80M", "bert-base"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[128, 512, 2048, 8192])
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="batch = tokens-per-step / L")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face's BertForMaskedLM")
    parser.add_argument("--kernels", nargs="+", default=["triton"], help="M2 kernel backends to run (triton, reference, auto)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    args = parser.parse_args()
    results = run_benchmark(
        args.configs, args.seq_lens, args.tokens_per_step, not args.no_hf, args.steps, tuple(args.kernels), args.compile
    )
    hf = hf_tokens_per_s(results)
    print("\n" + HEADER)
    for result in results:
        print(format_row(result, hf.get(result.seq_len)))


if __name__ == "__main__":
    main()
