"""The fine-tuning step (forward, backward, optimizer), on a GPU replayed as one CUDA graph.

At GLUE's batch sizes (16-48 sequences of 128 tokens) a step is a few milliseconds of kernels
behind hundreds of kernel launches and the optimizer's per-tensor work, so the host, not the GPU,
sets its pace. Replaying a CUDA graph launches the whole step at once:

- The first `EAGER_STEPS` steps run eagerly: they compile the Triton kernels and the
  `torch.compile`d parts of the model for this batch shape and create the optimizer's state.
- The next full-size step is captured (`torch.cuda.graph`) and replayed; every later full-size
  batch replays it. The batch is gathered inside the graph from the training split, which lives on
  the GPU, by a static index buffer: the host copies the next indices in and replays.
- A short batch (an epoch's last) is filled up to the batch size with copies of its first row
  whose labels the loss ignores (`SequenceClassifier`), and replays the graph too: the loss and
  the gradients are those of its own rows, and no kernel is compiled or autotuned for a second
  shape. (Off a GPU the short batch runs as it is; `fill_short_batches` switches this.)

The captured step is the eager step: the same operators on the same tensors; dropout draws from
the same generator (PyTorch advances its offset per replay); the learning rate is a tensor on the
device that the schedule fills before each step. The optimizer must be built `capturable`
(`finetune.build_optimizer(..., device=...)` does so on a GPU).
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from m2dist.models import SequenceClassifier

# Eager steps before the capture: compilation, autotuning and the optimizer's lazy state happen here.
EAGER_STEPS = 3


def gather_batch(split: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows `index` of a split's tensors (`EncodedSplit.tensors()`, on the index's device), ids and
    masks widened to int64 as the model takes them."""
    return {k: v[index] if k == "labels" else v[index].long() for k, v in split.items()}


def ignore_rows_from(labels_B: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """labels_B with every row at or past `rows` (a device scalar: the batch's own rows come first)
    set to what the classifier's loss leaves out: IGNORE_INDEX for classes, NaN for regression."""
    fill = float("nan") if labels_B.is_floating_point() else SequenceClassifier.IGNORE_INDEX
    kept_B = torch.arange(labels_B.shape[0], device=labels_B.device) < rows
    return torch.where(kept_B, labels_B, torch.full_like(labels_B, fill))


class FinetuneStep:
    """`step(index)` trains on the rows `index` of `split` and returns the loss (a device scalar,
    not synchronised). `cuda_graph` asks for the captured step of `batch_size` rows; it is used on
    a CUDA device only."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        split: dict[str, torch.Tensor],
        batch_size: int,
        bf16: bool,
        cuda_graph: bool,
    ):
        self.model = model
        self.optimizer = optimizer
        self.split = split
        self.bf16 = bf16
        device = next(model.parameters()).device
        self.device_type = device.type
        self.use_graph = cuda_graph and device.type == "cuda"
        self.batch_size = batch_size
        # A short batch is filled up to `batch_size` (one shape for every step) on a GPU.
        self.fill_short_batches = device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self._index: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None
        # Eager steps taken before the capture.
        self.warmup_steps = 0
        # Seconds spent capturing the graph (reported apart from the steady-state step time).
        self.capture_seconds = 0.0
        if self.use_graph:
            _learning_rates_as_tensors(optimizer, device)

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        rows = index.numel()
        if rows < self.batch_size and self.fill_short_batches:
            index = torch.cat([index, index[:1].expand(self.batch_size - rows)])
        full = index.numel() == self.batch_size
        if self.graph is not None:
            if not full:
                return self._eager(index)
            self._index.copy_(index, non_blocking=True)
            self._rows.fill_(rows)
            self.graph.replay()
            return self._loss.clone()
        if self.use_graph and full and self.warmup_steps >= EAGER_STEPS:
            return self._capture(index, rows)
        self.warmup_steps += 1
        return self._eager(index, rows)

    def _forward_backward(self, index: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """rows: the batch's own rows, the rest filled in (`ignore_rows_from`); None: all its own."""
        batch = gather_batch(self.split, index)
        if rows is not None:
            batch["labels"] = ignore_rows_from(batch["labels"], rows)
        # No autocast weight cache: cached casts would outlive the graph's memory pool.
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            loss = self.model(**batch).loss
        loss.backward()
        return loss.detach()

    def _eager(self, index: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        if self.graph is not None:
            # The captured step owns the gradient tensors: zero them in place, never replace them.
            self.optimizer.zero_grad(set_to_none=False)
        filled = rows is not None and rows < index.numel()
        loss = self._forward_backward(index, torch.tensor(rows, device=index.device) if filled else None)
        self.optimizer.step()
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _capture(self, index: torch.Tensor, rows: int) -> torch.Tensor:
        started = time.perf_counter()
        torch.cuda.synchronize()
        self._index = index.clone()
        self._rows = torch.tensor(rows, device=index.device)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                # The backward writes fresh gradient tensors (none exist now) that every replay refills.
                self._loss = self._forward_backward(self._index, self._rows)
                self.optimizer.step()
        except RuntimeError as err:
            raise RuntimeError(
                f"capturing the fine-tuning step as a CUDA graph failed ({err}); the GLUE config's "
                "cuda_graphs=false trains eagerly"
            ) from err
        self.graph = graph
        # Capturing records the step without running it: run it for this batch.
        graph.replay()
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started
        return self._loss.clone()


def _learning_rates_as_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Each group's lr as a device tensor, which a captured optimizer step reads at replay time
    (torch's schedulers fill a tensor lr in place)."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
