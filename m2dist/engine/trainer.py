"""The pretraining loop: DeepSpeed ZeRO 0-3, bf16 autocast, the M2 recipe, exact resume.

`Trainer(config).fit()` builds everything, resumes from the newest complete checkpoint in the run
folder if there is one, trains, evaluates, checkpoints and closes. It runs under the `deepspeed`
launcher, `torchrun`, SLURM `srun`, or as a single plain process.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from m2dist.checkpoint.extend import warm_start
from m2dist.checkpoint.io import safe_torch_load
from m2dist.checkpoint.layout import CHECKPOINTS_DIR, CLIENT_STATE, find_resume_tag
from m2dist.config import Config, TrainConfig, check_training_data
from m2dist.engine.checkpoint import CheckpointManager
from m2dist.engine.data import build_data
from m2dist.engine.deepspeed_config import (
    batch_layout,
    build_deepspeed_config,
    check_deepspeed_precision,
    uses_tf32,
)
from m2dist.engine.distributed import (
    all_reduce_sum, broadcast_object, init_distributed, leave_process_group, unlink_deepspeed_shm,
)  # fmt: skip
from m2dist.engine.device_overflow import install_device_overflow_check
from m2dist.engine.grad_norm import install_foreach_grad_norm
from m2dist.engine.guards import NonFiniteCounter, RunLock, check_resume_config
from m2dist.engine.metrics import (
    METRICS_FILE,
    ThroughputMeter,
    append_metrics,
    console_line,
    peak_flops,
    training_flops_per_token,
)
from m2dist.engine.signals import install_stop_handlers, stop_signal
from m2dist.engine.zero_flatten import install_foreach_flatten
from m2dist.engine.zero_reduction import skip_single_rank_reduction
from m2dist.errors import NonFiniteTraining, RunFolderLocked
from m2dist.models import MaskedLM, build_masked_lm, count_parameters, masked_capacity
from m2dist.optim import build_optimizer, warmup_linear_decay
from m2dist.tracking import (
    build_tracker,
    collect_run_params,
    final_model_summary,
    log_final_model,
    log_training_inputs,
    plot_loss_curve,
    training_run_name,
)

log = logging.getLogger("m2dist")

# Batch entries the model takes; loaders may add others (e.g. sample indices).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")

# Exit status after a checkpoint taken on SIGUSR1/SIGTERM: the SLURM script requeues the job on it.
REQUEUE_EXIT_CODE = 85


def leave_for_requeue() -> NoReturn:
    """Collective: every rank leaves the process group together, then exits with REQUEUE_EXIT_CODE."""
    leave_process_group()
    raise SystemExit(REQUEUE_EXIT_CODE)


class WarmupLinearDecay:
    """Per-group lr = peak x `warmup_linear_decay(step)`; stepped by DeepSpeed at optimizer steps."""

    def __init__(self, optimizer, total_steps: int, warmup_fraction: float, final_fraction: float):
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_fraction = warmup_fraction
        self.final_fraction = final_fraction
        self.peak_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        scale = warmup_linear_decay(self.step_count, self.total_steps, self.warmup_fraction, self.final_fraction)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * scale

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "peak_lrs": self.peak_lrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = state["step_count"]
        self.peak_lrs = state["peak_lrs"]
        self._apply()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def initialize_from(model: MaskedLM, source: str, resume_tag: str | None) -> str:
    """`train.init_from`: a fresh run starts from the weights of `source`, extended to the model's
    l_max; a run with a checkpoint of its own (`resume_tag`) ignores it. Returns the log line."""
    if resume_tag is not None:
        return f"train.init_from={source} not used: the run continues from its own checkpoint {resume_tag}"
    return warm_start(model, source)


def resume_config_changes(config: Config, checkpoint: Path) -> list[str]:
    """The settings of `config` that differ from those stored in a checkpoint folder and are allowed
    (train.resume_allow_changes), one line each; ConfigDrift listing the others. Called before the
    model is built, so a changed architecture is named by key, not by a tensor size mismatch."""
    state_file = checkpoint / CLIENT_STATE
    saved = safe_torch_load(state_file).get("config")
    if saved is None:
        return []
    current = config.to_dict()
    # Where the run lives and what it starts from may differ; a resume ignores init_from.
    for key in ("output_dir", "init_from"):
        current["train"][key] = saved.get("train", {}).get(key, current["train"][key])
    return check_resume_config(saved, current, config.train.resume_allow_changes, str(state_file))


def resolve_compile_mode(train: TrainConfig, device: torch.device, world_size: int) -> str | None:
    """The torch.compile mode of the engine's model, None for eager: train.compile=true ->
    train.compile_mode; "auto" -> "reduce-overhead" (CUDA graphs) on one GPU with ZeRO 0-2, where
    it is measured and tested (several GPUs have not been: they stay eager unless train.compile=true)."""
    if train.compile == "auto":
        one_gpu = device.type == "cuda" and world_size == 1
        return "reduce-overhead" if one_gpu and train.zero_stage <= 2 else None
    return train.compile_mode if train.compile else None


class Trainer:
    def __init__(self, config: Config):
        import deepspeed

        install_stop_handlers()
        # Before any work: a recipe without data, a bf16 run that DeepSpeed would run in fp32.
        check_training_data(config)
        check_deepspeed_precision(config.train.precision)
        self.config = config
        train = config.train
        self.device = resolve_device(train.device)
        self.lock: RunLock | None = None
        self.data = None
        self.last_tag: str | None = None
        self.step = 0
        self.env = init_distributed(self.device)
        self._leave_if_stopped("joining the process group")
        self.layout = batch_layout(config, self.env.world_size)
        self.output_dir = Path(train.output_dir.format(name=config.name)).resolve()
        self.lock = self._lock_run_folder()
        self.data = build_data(config, self.env, self.layout)
        self.seq_len = self.data.seq_len
        self.total_steps = self._steps_from_duration()
        self._leave_if_stopped("checking the data")

        self.checkpoints = CheckpointManager(self.output_dir / CHECKPOINTS_DIR, self.env, train.keep_last)
        resume_tag = self.last_tag = find_resume_tag(self.checkpoints.root, self.env)
        if resume_tag is not None:
            self._check_config_drift(resume_tag)
        self._leave_if_stopped("verifying the checkpoints")
        self.ds_config = build_deepspeed_config(config, self.layout)
        if resume_tag is not None and self.checkpoints.needs_universal(resume_tag):
            resume_tag = self.checkpoints.prepare_universal(resume_tag)
            self.ds_config["checkpoint"] = {"load_universal": True}

        # Same seed on every rank: identical initial weights (DeepSpeed also broadcasts them).
        torch.manual_seed(train.seed)
        model = build_masked_lm(config.model)
        if train.init_from:
            self._log(initialize_from(model, train.init_from, resume_tag))
        optimizer = build_optimizer(model, train.optimizer)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: WarmupLinearDecay(
                opt, self.total_steps, train.warmup_fraction, train.final_lr_fraction
            ),
            config=self.ds_config,
            dist_init_required=False,
        )
        unlink_deepspeed_shm(self.env)
        install_foreach_grad_norm(self.engine.optimizer)
        install_device_overflow_check(self.engine.optimizer)
        skip_single_rank_reduction(self.engine.optimizer)
        install_foreach_flatten(self.engine.optimizer)
        torch.backends.cuda.matmul.allow_tf32 = uses_tf32(train)
        compile_mode = resolve_compile_mode(train, self.device, self.env.world_size)
        if compile_mode is not None:
            # Compiled in place: the module's parameter names, and so the checkpoints, do not change.
            # "reduce-overhead" also replays the forward and backward as CUDA graphs.
            self._log(f"train.compile={train.compile}: torch.compile, mode {compile_mode!r}; the first steps compile")
            self.engine.compile(compile_kwargs={"mode": compile_mode})
        self.cuda_graphs = compile_mode == "reduce-overhead" and self.device.type == "cuda"
        # The MLM head's fixed-size gather (`masked_capacity` rows) keeps every shape static and the
        # host from waiting for the device: on a GPU, and for a compiled model. It reserves rows for
        # every token of the batch at the masking rate, and padding is never masked: on the debug
        # model's short, padded documents 4x the rows the exact gather takes, which doubled its CPU
        # step. An eager model on the CPU, where the host is the device, takes the exact gather.
        self.fixed_masked_gather = self.device.type == "cuda" or compile_mode is not None
        self.num_parameters = count_parameters(model)
        # True once this job trained to the end and saved the last checkpoint.
        self.completed = False
        self.losses: list[tuple[int, float]] = []
        # Steps since the last log step: (step, mean loss, gradient norm), still on the device.
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._meter: ThroughputMeter | None = None
        self.nonfinite = NonFiniteCounter(train.max_nonfinite_steps)
        self.last_tag = resume_tag
        client_state = self._resume(resume_tag) if resume_tag is not None else {}

        self.tracker = build_tracker(config.tracking, self.env.rank, self.output_dir)
        params = collect_run_params(config.to_dict(), self.env.world_size)
        params["model.num_parameters"] = str(self.num_parameters)
        self.tracker.start(training_run_name(config, self.num_parameters), params, client_state.get("mlflow_run_id"))
        log_training_inputs(self.tracker, config)
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
            (self.output_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=1) + "\n")
            self.tracker.log_artifact(self.output_dir / "config.json")
            self.tracker.log_artifact(self.output_dir / "deepspeed.json")
            for path in self.data.artifacts:
                self.tracker.log_artifact(path)

    def _stop_message(self, phase: str) -> str:
        start = f"the checkpoint {self.checkpoints.root / self.last_tag}" if self.last_tag else "the start"
        return (
            f"signal {stop_signal() or 'on another rank'} during start-up ({phase}): leaving before step "
            f"{self.step + 1}, nothing to checkpoint; a relaunch continues from {start}"
        )

    def _leave_if_stopped(self, phase: str) -> None:
        """Collective, during start-up: once any rank got a stop signal, every rank releases what it
        holds and leaves with REQUEUE_EXIT_CODE (no step was trained, so nothing is saved)."""
        if not self._stop_requested():
            return
        self._log(self._stop_message(phase))
        if self.data is not None:
            self.data.close()
        if self.lock is not None:
            self.lock.release()
        leave_for_requeue()

    def _steps_from_duration(self) -> int:
        train = self.config.train
        per_step = {"steps": 1, "samples": train.global_batch_size, "tokens": train.global_batch_size * self.seq_len}
        return math.ceil(train.duration / per_step[train.duration_unit])

    def _lock_run_folder(self) -> RunLock:
        """Rank 0 takes the run folder's lock for the job's life; every rank fails if it cannot."""
        lock = RunLock(self.output_dir)
        error = None
        if self.env.is_main:
            try:
                note = lock.acquire()
                if note:
                    log.warning(note)
            except RunFolderLocked as err:
                error = str(err)
        error = broadcast_object(error, self.env)
        if error is not None:
            raise RunFolderLocked(error if self.env.is_main else f"rank 0: {error}")
        return lock

    def _check_config_drift(self, tag: str) -> None:
        """Compare this config with the one stored in the checkpoint (same result on every rank)."""
        changes = resume_config_changes(self.config, self.checkpoints.root / tag)
        if changes:
            self._log("resuming with settings changed since the checkpoint:\n  " + "\n  ".join(changes))

    def _resume(self, tag: str) -> dict[str, Any]:
        client_state = self.checkpoints.load(self.engine, tag)
        self.step = int(client_state["step"])
        self.losses = [tuple(x) for x in client_state.get("losses", [])]
        self.data.load_state_dict(client_state["data"])
        self._log(f"resumed from {self.checkpoints.root / tag} at step {self.step}")
        return client_state

    def _log(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got SIGUSR1/SIGTERM (one tiny collective)."""
        flag = torch.tensor([0.0 if stop_signal() is None else 1.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train_step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step over `grad_accumulation` micro-batches; returns (mean loss tensor,
        seconds spent waiting for data)."""
        self.engine.train()
        total = torch.zeros((), device=self.device)
        data_wait = 0.0
        for micro_batch in range(self.layout.grad_accumulation):
            if self.cuda_graphs:
                self._before_graph_replay(first_micro_batch=micro_batch == 0)
            start = time.perf_counter()
            # The loader draws from the global torch RNG at moments that differ between a fresh and a
            # resumed run; forking keeps dropout's random stream identical across a resume.
            with torch.random.fork_rng(devices=[]):
                batch = self.data.next_train_batch()
            data_wait += time.perf_counter() - start
            batch = {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
            # bf16 autocast, when configured, is applied by the engine's forward (deepspeed_config).
            # The MLM head's rows (`_masked_rows`): a fixed number on a GPU or compiled, so no host
            # sync and the same shapes every step.
            max_masked = self._masked_rows(batch["labels"], self.config.train.mlm_probability)
            loss = self.engine(**batch, max_masked=max_masked).loss
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        return total / self.layout.grad_accumulation, data_wait

    def _masked_rows(self, labels: torch.Tensor, mlm_probability: float) -> int | None:
        """The MLM head's rows for a batch: `masked_capacity` under `fixed_masked_gather`, else None
        (the exact gather)."""
        return masked_capacity(labels.numel(), mlm_probability) if self.fixed_masked_gather else None

    def _before_graph_replay(self, first_micro_batch: bool) -> None:
        """With CUDA graphs, each replay of the forward and backward reuses the memory of the last
        replay's outputs, so a micro-batch begins a new graph step. Autograd would keep the first
        micro-batch's gradients in that memory (a parameter without a gradient takes the output
        tensor itself), and the next replay would overwrite them: with gradient accumulation, every
        parameter gets a zero gradient first, into which autograd adds each micro-batch's (memory
        for a full set of gradients from the step's start, also under ZeRO-2)."""
        torch.compiler.cudagraph_mark_step_begin()
        if first_micro_batch and self.layout.grad_accumulation > 1:
            for param in self.engine.module.parameters():
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)

    def _grad_norm(self) -> torch.Tensor:
        """The last step's global gradient norm as a device scalar (no host sync); 0 when unknown."""
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            return norm.detach().float().reshape(()).to(self.device)
        return torch.tensor(0.0 if norm is None else float(norm), device=self.device)

    def _weights_finite(self) -> bool:
        """Collective: whether every rank's share of the weights is finite (ZeRO-3 holds a partition
        in `ds_tensor`)."""
        finite = True
        for param in self.engine.module.parameters():
            local = getattr(param, "ds_tensor", param)
            finite = finite and bool(torch.isfinite(local).all())
        flag = torch.tensor([1.0 if finite else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """MLM loss and accuracy on the validation split at the evaluation masking rate."""
        if not self.data.has_validation:
            return {}
        self.engine.eval()
        # Sums on the device (fp64), read once at the end: no host sync per batch.
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss x masked, correct, masked
        for batch in self.data.eval_batches(self.config.train.eval_batches):
            batch = {k: batch[k].to(self.device) for k in MODEL_INPUTS if k in batch}
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            # The training step's gather: a fixed size gives one shape per batch size, as a compiled
            # model with CUDA graphs needs (the exact gather's varying row count would make a graph
            # per count).
            max_masked = self._masked_rows(batch["labels"], self.config.data.eval_mlm_probability)
            out = self.engine(**batch, max_masked=max_masked)
            num_masked = torch.as_tensor(out.num_masked, dtype=torch.float64, device=self.device)
            counted = out.targets != MaskedLM.IGNORE_INDEX
            sums += torch.stack([
                torch.where(num_masked > 0, out.loss.double() * num_masked, 0.0),
                ((out.logits.argmax(-1) == out.targets) & counted).sum().double(),
                num_masked,
            ])  # fmt: skip
        loss_sum, correct, masked = all_reduce_sum(sums.tolist(), self.device)
        self.engine.train()
        return {"eval/mlm_loss": loss_sum / max(masked, 1), "eval/mlm_accuracy": correct / max(masked, 1)}

    def save(self) -> None:
        """Checkpoint, after checking the steps since the last log step and the weights: a
        non-finite model is never saved (NonFiniteTraining instead)."""
        self._flush_losses()
        if not self._weights_finite():
            raise NonFiniteTraining(
                f"step {self.step}: the weights hold NaN or infinity; not saving them (last checkpoint: "
                f"{self.last_tag or 'none'}). Lower train.optimizer.lr, raise train.warmup_fraction or set train.grad_clip"
            )
        client_state = {
            "step": self.step,
            "samples_seen": self.step * self.layout.global_batch_size,
            "tokens_seen": self.step * self.layout.global_batch_size * self.seq_len,
            "data": self.data.state_dict(),
            "losses": self.losses,
            # The tracker's current id: None while the server was never reached.
            "mlflow_run_id": self.tracker.run_id,
            "config": self.config.to_dict(),
        }
        tag = self.checkpoints.save(self.engine, self.step, client_state)
        self.last_tag = tag
        self._log(f"saved checkpoint {self.checkpoints.root / tag}")

    def fit(self) -> list[tuple[int, float]]:
        """Train to the configured duration; returns [(step, loss)] of the whole run (resumed included)."""
        train = self.config.train
        tokens_per_step = self.layout.global_batch_size * self.seq_len
        flops = training_flops_per_token(self.config.model, self.seq_len, train.mlm_probability)
        self._meter = meter = ThroughputMeter(
            tokens_per_step, self.env.world_size, flops, peak_flops(self.device, train.precision), self.device
        )
        self._log(
            f"{self.config.name}: {self.config.model.architecture} model, {self.num_parameters:,} parameters; "
            f"{self.env.world_size} rank(s) on {self.device.type}, ZeRO-{train.zero_stage}, {train.precision}; "
            f"global batch {self.layout.global_batch_size} = {self.layout.micro_batch_size} x "
            f"{self.layout.grad_accumulation} accumulation x {self.env.world_size} ranks, L={self.seq_len}; "
            f"steps {self.step} -> {self.total_steps}; output {self.output_dir}"
        )
        if self.step >= self.total_steps:
            self._log(f"training is complete at step {self.step}; nothing to do (a new output_dir starts afresh)")
            return self.losses
        if self._stop_requested():
            # A signal during the resume or the engine's set-up: nothing trained since the checkpoint.
            self._log(self._stop_message("setting up the engine"))
            self.close(status="KILLED")
            leave_for_requeue()
        stop_at = self.step + train.stop_after if train.stop_after else self.total_steps
        while self.step < self.total_steps:
            loss, data_wait = self.train_step()
            self.step += 1
            self._pending.append((self.step, loss, self._grad_norm()))
            meter.record_step(data_wait)
            last = self.step == self.total_steps
            log_step = self.step % train.log_every == 0 or last
            if log_step:
                self._flush_losses()
            if train.eval_every and self.step % train.eval_every == 0 and not last:
                self._log_eval()
            if train.checkpoint_every and self.step % train.checkpoint_every == 0 and not last:
                self.save()
            if self.step == stop_at and not last:
                self._flush_losses()
                self._log(f"train.stop_after={train.stop_after}: checkpointing at step {self.step} and leaving")
                self.save()
                return self.losses
            # Only at log steps, which sync with the host anyway: a check every step would stall
            # the CPU's run-ahead of GPU work.
            if log_step and not last and self._stop_requested():
                self._flush_losses()
                self._log(f"signal {stop_signal() or 'on another rank'}: checkpointing at step {self.step}")
                self.save()
                self.close(status="KILLED")
                leave_for_requeue()
        self._log_eval()
        self.save()
        self.completed = True
        return self.losses

    def _flush_losses(self) -> None:
        """Log the steps since the last log step; NonFiniteTraining (on every rank alike) when more
        than train.max_nonfinite_steps of them in a row were not finite."""
        pending, meter = self._pending, self._meter
        if not pending:
            return
        # One host sync per log step: the losses of all steps since the last one (and their gradient
        # norms, global already: averaging over ranks leaves them as they are).
        values = torch.stack([torch.stack([loss.float(), norm]) for _, loss, norm in pending])
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= self.env.world_size
        steps = [step for step, _, _ in pending]
        losses, norms = values[:, 0].tolist(), values[:, 1].tolist()
        pending.clear()
        for step, loss, norm in zip(steps, losses, norms):
            self.nonfinite.record(step, loss, norm, self.last_tag and str(self.checkpoints.root / self.last_tag))
        self.losses.extend(zip(steps, losses))
        values = values[:, 0]
        scalars = meter.summary(self.total_steps - self.step)
        scalars.update(
            {
                "train/loss": self.losses[-1][1],
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/grad_norm": norms[-1],
                "train/tokens_seen": float(self.step * self.layout.global_batch_size * self.seq_len),
            }
        )
        self._log(console_line(self.step, self.total_steps, scalars))
        if self.env.is_main:
            fields = {"world_size": self.env.world_size, "zero_stage": self.config.train.zero_stage}
            append_metrics(self.output_dir / METRICS_FILE, self.step, scalars, **fields)
        self.tracker.log_metrics({k: v for k, v in scalars.items()}, step=self.step)
        for step, value in zip(steps[:-1], values.tolist()[:-1]):
            self.tracker.log_metrics({"train/loss": value}, step=step)

    def _log_eval(self) -> None:
        # The step's train record first, so that the evaluation record joins it in metrics.jsonl.
        self._flush_losses()
        start = time.perf_counter()
        metrics = self.evaluate()
        if metrics:
            # The evaluation reads its sums on the host at its end: its wall time, compilation included.
            seconds = time.perf_counter() - start
            scalars = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self._log(f"eval at step {self.step}: {scalars}  ({seconds:.1f} s)")
            metrics["eval/seconds"] = seconds
            if self.env.is_main:
                append_metrics(self.output_dir / METRICS_FILE, self.step, metrics)
            self.tracker.log_metrics(metrics, step=self.step)

    def close(self, status: str = "FINISHED") -> None:
        if self.env.is_main and self.losses:
            plot = self.output_dir / "loss.png"
            steps, losses = zip(*self.losses)
            plot_loss_curve(list(steps), list(losses), plot)
            self.tracker.log_artifact(plot)
        if self.env.is_main and self.completed and status == "FINISHED":
            release = log_final_model(self.tracker, self.config, self.output_dir)
            if release is not None:
                self._log(final_model_summary(release))
        self.tracker.close(status=status)
        self.data.close()
        self.lock.release()
        uri = getattr(self.tracker, "tracking_uri", None)
        if self.env.is_main and self.tracker.failure:
            self._log(f"MLflow tracking failed ({self.tracker.failure}); training is complete, see {self.output_dir}")
        elif self.env.is_main and uri:
            self._log(f"MLflow run {self.tracker.run_id}; open the UI with: mlflow ui --backend-store-uri {uri}")


def train(config: Config) -> list[tuple[int, float]]:
    trainer = Trainer(config)
    try:
        losses = trainer.fit()
    except SystemExit:
        raise  # a checkpointed stop on a signal: fit() closed the run as KILLED
    except BaseException:
        trainer.tracker.close(status="FAILED")
        trainer.lock.release()
        raise
    trainer.close()
    return losses


