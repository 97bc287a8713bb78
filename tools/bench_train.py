"""Training throughput on one GPU, m2dist models beside Hugging Face's BERT in one run.

  python tools/bench_train.py --configs m2-bert-80M bert-base --seq-lens 128 512 2048 8192
  python tools/bench_train.py --configs m2-bert-80M --kernels reference triton fused --seq-lens 128
  python tools/bench_train.py --configs m2-bert-80M bert-base --seq-lens 128 8192 --engine
  python tools/bench_train.py --configs m2-bert-80M bert-base --seq-lens 128 --engine \
      --engine-compile-modes auto eager
  python tools/bench_train.py --configs m2-bert-80M m2-bert-80M:model.kernels.fused_mixer=true bert-base \
      --seq-lens 128 --engine

The default times the model's step alone (forward, backward, fused AdamW under bf16 autocast);
`--engine` times `m2dist/train.py`'s step for each config as it trains (DeepSpeed, data loader,
schedule), with the same tokens per step, and the speedup column is against bert-base's engine step;
there a config may carry overrides of its own, `name:key=value,key=value`.
"""

import argparse

from m2dist.bench.train import HEADER, HF_NAME, format_row, run_benchmark, run_engine_benchmark, speedups_over


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["m2-bert-80M", "bert-base"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[128, 512, 2048, 8192])
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="batch = tokens-per-step / L")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face's BertForMaskedLM")
    parser.add_argument("--kernels", nargs="+", default=["triton"], help="M2 kernel backends to run (triton, reference, auto; fused: triton with the fused sequence mixer)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument(
        "--engine-compile-modes", nargs="+", default=["auto"], metavar="MODE",
        help="with --engine: run each config once per mode: 'auto' (the config's train.compile, as "
        "training runs it), 'eager' (train.compile=false) or a torch.compile mode (default, "
        "reduce-overhead, max-autotune-no-cudagraphs) set as train.compile_mode",
    )  # fmt: skip
    parser.add_argument("--engine", action="store_true", help="time the training engine's step instead of the model's")
    args = parser.parse_args()
    if args.engine:
        results = run_engine_benchmark(
            args.configs, args.seq_lens, args.tokens_per_step, args.steps, tuple(args.engine_compile_modes)
        )
        baseline = speedups_over(results, "bert-base")
        header = HEADER.replace("vs HF BERT", "vs bert-base")
    else:
        results = run_benchmark(
            args.configs, args.seq_lens, args.tokens_per_step, not args.no_hf, args.steps, tuple(args.kernels), args.compile
        )
        baseline = speedups_over(results, HF_NAME)
        header = HEADER
    print("\n" + header)
    for result in results:
        print(format_row(result, baseline.get((result.seq_len, result.variant))))


if __name__ == "__main__":
    main()
