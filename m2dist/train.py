"""Pretraining entry point.

  deepspeed --num_gpus 8 m2dist/train.py --config configs/m2-bert-80M.yaml [key=value ...]
  torchrun --nproc_per_node 2 m2dist/train.py --config configs/debug.yaml
  python m2dist/train.py --config configs/debug.yaml
"""

import argparse
import sys
from pathlib import Path

# Run as a script, Python puts m2dist/ itself first on sys.path, where its submodules would
# shadow top-level packages of the same name; the installed package is what we want.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

# First, before the seconds of imports and start-up: a stop signal from here on is noted, not fatal.
from m2dist.engine.signals import install_stop_handlers  # noqa: E402

install_stop_handlers()

from m2dist.cli import run_cli  # noqa: E402
from m2dist.config import load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="debug", help="a YAML file, or the name of one in configs/")
    # The deepspeed launcher appends --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.duration=50")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    # Imported after the config: a config error is reported before the seconds of torch imports.
    import torch.distributed as dist

    from m2dist.engine.distributed import abandon_process_group, leave_process_group
    from m2dist.engine.trainer import train

    # A group this process joined before (a test calling main in-process) is not the run's to end.
    joined_before = dist.is_initialized()
    try:
        train(config)
    except BaseException:
        # An error (a refused run folder, bad data...): the group torn down before the exit status
        # is set, without the barrier, which ranks that failed elsewhere would never reach.
        if not joined_before:
            abandon_process_group()
        raise
    # Every rank together, before the interpreter's exit tears the group down in an order that can
    # abort a gloo rank whose peers have gone.
    leave_process_group()


if __name__ == "__main__":
    run_cli(main)
