"""The fine-tuning step (or the training engine's, or the sequence mixer's forward and backward
alone) of one config at two or more revisions of the code, timed in turn in one run
(`m2dist.bench.revisions`): what a change to a kernel or to the step is worth, measured side by
side with the code before it. The first revision is the baseline of the ratios. On a GPU the table
also gives each revision's peak of allocated memory.

  python tools/bench_revisions.py HEAD~1 HEAD --config m2-bert-80M --batch-sizes 16 48
  python tools/bench_revisions.py before=../m2dist-old after=. --config bert-base
  python tools/bench_revisions.py HEAD~1 HEAD --step engine --batch-sizes 256 --block-steps 10
  python tools/bench_revisions.py HEAD~1 HEAD --step mixer --batch-sizes 16 48 256 --block-steps 20

A revision is a directory holding a tree of the repository, or a git revision of this repository
(exported for the run), optionally named LABEL=.... Each revision's process stays on the GPU for the
whole run: the tool stops, naming what each holds, before starting one that would not fit.
"""

import argparse

import torch

from m2dist.bench.revisions import STEPS, format_table, resolved, time_revisions
from m2dist.cli import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revisions", nargs="+", help="PATH, REV or LABEL=PATH|REV; the first is the baseline")
    parser.add_argument("--config", default="m2-bert-80M")
    parser.add_argument("--step", choices=STEPS, default="finetune",
                        help="engine: m2dist/train.py's step (one batch size: sequences a step); mixer: the "
                             "sequence mixer after in_linear, forward and backward, inputs as under bf16 autocast")  # fmt: skip
    parser.add_argument("--override", action="append", default=[], help="key=value for the config (repeatable)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 48])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7, help="timed blocks per revision and batch size")
    parser.add_argument("--block-steps", type=int, default=40)
    parser.add_argument("--eager", action="store_true", help="time the eager step instead of the CUDA-graph step")
    args = parser.parse_args()
    if len(args.revisions) < 2:
        parser.error("name at least two revisions to compare")
    on_gpu = torch.cuda.is_available()
    with resolved(args.revisions) as revisions:
        timings = time_revisions(
            revisions, args.config, args.batch_sizes, "cuda" if on_gpu else "cpu", on_gpu and not args.eager,
            step=args.step, overrides=tuple(args.override), seq_len=args.seq_len, block_steps=args.block_steps,
            rounds=args.rounds,
        )  # fmt: skip
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    step = {
        "engine": "training engine's step",
        "mixer": "sequence mixer's forward and backward",
        "finetune": f"fine-tuning step ({'eager' if args.eager or not on_gpu else 'CUDA graph'})",
    }[args.step]
    print(f"\n{args.config}, {step}, L={args.seq_len}, on {device}, torch {torch.__version__}; "
          f"median of {args.rounds} blocks of {args.block_steps} steps")  # fmt: skip
    for revision in revisions:
        print(f"  {revision.label}: {revision.tree}")
    print(format_table(timings, revisions[0].label))


if __name__ == "__main__":
    run_cli(main)
