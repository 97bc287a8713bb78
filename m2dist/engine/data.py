"""The engine's view of the data: endless training micro-batches, validation passes, loader state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from m2dist.config import Config
from m2dist.data.masking import IGNORE_INDEX
from m2dist.engine.deepspeed_config import BatchLayout
from m2dist.engine.distributed import DistEnv


class TrainingData:
    """Training batches of one rank from `data.train`, validation batches from `data.val`.

    The training loader restarts at each epoch end; its state (epoch, samples seen) goes into
    checkpoints so that a resumed run sees the same samples, with the same masks, in the same order.
    """

    def __init__(self, config: Config, env: DistEnv, layout: BatchLayout):
        # Imported here: the loader imports streaming, seconds of start-up that only a run with data needs.
        from m2dist.data.loader import build_mlm_dataloader, has_validation_split
        from m2dist.data.tokenizer import tokenizer_file

        self.config = config
        self.layout = layout
        self.seq_len = config.seq_len
        self.train_loader = build_mlm_dataloader(config, layout.micro_batch_size, "train")
        self.has_validation = has_validation_split(config)
        # Built now, so that a wrong validation path or manifest stops the run before its first step.
        self._eval_loader = build_mlm_dataloader(config, layout.micro_batch_size, "val") if self.has_validation else None
        self._train_iter: Iterator[dict[str, torch.Tensor]] | None = None
        self.artifacts = [tokenizer_file(config.data.tokenizer)]

    def next_train_batch(self) -> dict[str, torch.Tensor]:
        """(micro_batch, L) tensors: input_ids, token_type_ids, labels, and attention_mask unless the
        streams hold full rows only (concat mode; `m2dist/data/loader.py`)."""
        while True:
            if self._train_iter is None:
                self._train_iter = iter(self.train_loader)
            try:
                return next(self._train_iter)
            except StopIteration:
                self._train_iter = None

    def eval_batches(self, max_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over the validation split (the first `max_batches` batches if > 0), every batch of
        micro-batch size: the split's short last batch comes filled up (`fill_batch`), since a
        compiled model would compile its graph again for a new batch size."""
        for index, batch in enumerate(self._eval_loader):
            if max_batches and index >= max_batches:
                break
            yield fill_batch(batch, self.layout.micro_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return self.train_loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_loader.load_state_dict(state)
        self._train_iter = None

    def close(self) -> None:
        self._train_iter = None


def fill_batch(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """`batch` with `rows` rows: a shorter one gets copies of its first row appended, their labels
    (if it has labels) all IGNORE_INDEX, so that the filler adds nothing to the loss or the accuracy."""
    count = next(iter(batch.values())).shape[0]
    if count >= rows:
        return batch
    filled = {}
    for key, value in batch.items():
        filler = value[:1].expand(rows - count, *value.shape[1:])
        if key == "labels":
            filler = torch.full_like(filler, IGNORE_INDEX)
        filled[key] = torch.cat([value, filler])
    return filled


def build_data(config: Config, env: DistEnv, layout: BatchLayout) -> TrainingData:
    return TrainingData(config, env, layout)
