"""Profile the engine's training step (torch.profiler): top operators by device and host time, and
on a GPU where the device waits between kernels, what the host does meanwhile, and the host syncs
inside the step with the Python frames that made them.

  python tools/profile_train.py --config m2-bert-80M --output tools/profiles/engine-m2-bert-80M-L128.txt \
      train.seq_len=128 train.global_batch_size=128 train.micro_batch_size=128 tracking.enabled=false
"""

import argparse
from pathlib import Path

from m2dist.cli import run_cli
from m2dist.config import load_config
from m2dist.bench.profile import profile_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a name in configs/ or a YAML path")
    parser.add_argument("--output", required=True, type=Path, help="text file for the report")
    parser.add_argument("--warmup", type=int, default=5,
                        help="steps before the timed windows, which run on until the step time is steady")
    parser.add_argument("--steps", type=int, default=3, help="steps profiled (and timed per window, up to 5)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    print(profile_training(config, args.warmup, args.steps, args.output), end="")
    print(f"report: {args.output}")


if __name__ == "__main__":
    run_cli(main)
