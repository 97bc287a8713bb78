"""Train as m2dist/train.py does, then write from rank 0 what the training engine holds after its
last step: every parameter's full fp32 master weight (DeepSpeed's `safe_get_full_fp32_param`, any
ZeRO stage), the buffers, and the logits of `probe_input` through the engine's model.

  torchrun --nproc_per_node 2 tests/train_and_dump.py --dump live.pt --config debug [key=value ...]

The checkpoint conversion tests compare the release folders they make with this file.
"""

import argparse
from pathlib import Path
from typing import Any

import torch

from m2dist.config import load_config
from m2dist.engine.distributed import leave_process_group
from m2dist.engine.trainer import Trainer
from m2dist.train import parse_args


def probe_input(vocab_size: int) -> torch.Tensor:
    """(2, 32) token ids, the same in every process."""
    return torch.randint(vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def live_state(trainer: Trainer) -> dict[str, Any]:
    """Collective: every rank calls it (ZeRO gathers the ranks' partitions of each weight, and ZeRO-3
    those of each layer in the forward)."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = trainer.engine.module
    weights = {name: safe_get_full_fp32_param(p).cpu().clone() for name, p in module.named_parameters()}
    buffers = {name: b.cpu().clone() for name, b in module.named_buffers()}
    trainer.engine.eval()
    input_ids = probe_input(trainer.config.model.vocab_size).to(trainer.device)
    logits = trainer.engine(input_ids=input_ids).logits.cpu()
    return {"step": trainer.step, "weights": weights, "buffers": buffers, "logits": logits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dump", type=Path, required=True, help="file to write (rank 0)")
    args, train_args = parser.parse_known_args()
    options = parse_args(train_args)
    trainer = Trainer(load_config(options.config, options.overrides))
    trainer.fit()
    state = live_state(trainer)
    if trainer.env.is_main:
        torch.save(state, args.dump)
    trainer.close()
    leave_process_group()


if __name__ == "__main__":
    main()
