"""Run by tests/test_engine.py with train.py's arguments (--config NAME key=value ...): one training
step of the engine; prints the dtype of the output of the first Linear layer outside the filter
MLPs, inside the engine's forward."""

import argparse

import torch

from m2dist.config import load_config
from m2dist.engine.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    trainer = Trainer(load_config(args.config, args.overrides))
    dtypes = []
    # The M2 filter MLPs run in fp32 by design (HyenaFilter.kernel); any other Linear must see bf16.
    modules = trainer.engine.module.named_modules()
    linear = next(m for name, m in modules if isinstance(m, torch.nn.Linear) and "filter_fn" not in name)
    linear.register_forward_hook(lambda _module, _inputs, output: dtypes.append(output.dtype))
    trainer.train_step()
    trainer.close()
    print(f"linear output dtype: {dtypes[0]}")


if __name__ == "__main__":
    main()
