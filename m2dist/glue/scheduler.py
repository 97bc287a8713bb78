"""Run fine-tuning jobs over the GPUs of a node, one worker process per GPU, or in this process.

A job is ready when the jobs it depends on have finished (RTE/MRPC/STS-B wait for MNLI: the two
rounds of the protocol, without idling GPUs while other first-round jobs still run). Ready jobs
go out longest first, jobs others wait for before all. A job that fails (or whose worker dies)
is reported and fails its dependents; the other jobs go on.

Every job's life is reported to `on_event(kind, job_id, payload)` in the calling process, in
order: "start" {device}, then "progress" {fraction} and "epoch" {metrics}, then "done" {result}
or "failed" {error}. Tracking and progress display hang off these events, in one process.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from m2dist.glue.finetune import JobResult, JobSpec, run_job

logger = logging.getLogger(__name__)

OnEvent = Callable[[str, str, dict[str, Any]], None]
# Seconds between checks that the worker processes are alive.
_POLL_S = 1.0


def _priority(job: JobSpec, waited_on: set[str], cost: dict[str, float]) -> tuple[bool, float]:
    return (job.job_id in waited_on, cost.get(job.job_id, 0.0))


def run_jobs(
    jobs: Sequence[JobSpec],
    devices: Sequence[str],
    on_event: OnEvent,
    cost: dict[str, float] | None = None,
) -> dict[str, JobResult | str]:
    """Run every job; returns job_id -> JobResult, or the error text of a failed job.

    One device runs the jobs in this process; several start one spawned worker per device.
    `cost` (job_id -> estimated work) orders ready jobs, largest first.
    """
    ids = [job.job_id for job in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"job ids must be unique, got {ids}")
    missing = {dep for job in jobs for dep in job.depends_on if dep not in ids}
    if missing:
        raise ValueError(f"jobs depend on jobs that are not scheduled: {sorted(missing)}")
    if not devices:
        raise ValueError("expected at least one device")
    state = _State(jobs, cost or {})
    if len(devices) == 1:
        _run_in_process(state, devices[0], on_event)
    else:
        _run_in_workers(state, list(devices), on_event)
    return state.outcomes


class _State:
    def __init__(self, jobs: Sequence[JobSpec], cost: dict[str, float]) -> None:
        self.pending = list(jobs)
        self.waited_on = {dep for job in jobs for dep in job.depends_on}
        self.cost = cost
        self.outcomes: dict[str, JobResult | str] = {}

    def fail_orphans(self, on_event: OnEvent) -> None:
        """Fail pending jobs whose dependency failed."""
        for job in list(self.pending):
            failed = [d for d in job.depends_on if isinstance(self.outcomes.get(d), str)]
            if failed:
                self.pending.remove(job)
                self.finish(job.job_id, f"not run: {', '.join(failed)} failed", on_event)

    def next_ready(self) -> JobSpec | None:
        ready = [j for j in self.pending if all(isinstance(self.outcomes.get(d), JobResult) for d in j.depends_on)]
        if not ready:
            return None
        job = max(ready, key=lambda j: _priority(j, self.waited_on, self.cost))
        self.pending.remove(job)
        return job

    def finish(self, job_id: str, outcome: JobResult | str, on_event: OnEvent) -> None:
        self.outcomes[job_id] = outcome
        if isinstance(outcome, JobResult):
            on_event("done", job_id, {"result": outcome})
        else:
            on_event("failed", job_id, {"error": outcome})


def _run_in_process(state: _State, device: str, on_event: OnEvent) -> None:
    while True:
        state.fail_orphans(on_event)
        job = state.next_ready()
        if job is None:
            return
        on_event("start", job.job_id, {"device": device})
        try:
            result = run_job(job, device, lambda kind, payload, job_id=job.job_id: on_event(kind, job_id, payload))
        except KeyboardInterrupt:
            raise
        except Exception:
            logger.error("job %s failed:\n%s", job.job_id, traceback.format_exc())
            state.finish(job.job_id, traceback.format_exc(limit=-3).strip(), on_event)
        else:
            state.finish(job.job_id, result, on_event)
        gc.collect()


def _worker_main(device: str, threads: int, jobs: Any, events: Any) -> None:
    """A worker process: run the jobs sent to it on `device` until it receives None."""
    import torch

    torch.set_num_threads(threads)
    while True:
        job = jobs.get()
        if job is None:
            return
        events.put(("start", job.job_id, {"device": device}))
        try:
            result = run_job(job, device, lambda kind, payload, job_id=job.job_id: events.put((kind, job_id, payload)))
        except Exception:
            events.put(("failed", job.job_id, {"error": traceback.format_exc(limit=-3).strip()}))
        else:
            events.put(("done", job.job_id, {"result": result}))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _run_in_workers(state: _State, devices: list[str], on_event: OnEvent) -> None:
    context = mp.get_context("spawn")
    events = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    workers: list[tuple[Any, Any]] = []

    def start_worker(device: str) -> tuple[Any, Any]:
        inbox = context.Queue()
        process = context.Process(target=_worker_main, args=(device, threads, inbox, events), daemon=True)
        process.start()
        return process, inbox

    workers = [start_worker(device) for device in devices]
    running: dict[int, str] = {}
    try:
        while True:
            state.fail_orphans(on_event)
            for index in range(len(workers)):
                if index in running:
                    continue
                job = state.next_ready()
                if job is None:
                    break
                running[index] = job.job_id
                workers[index][1].put(job)
            if not running:
                return
            try:
                kind, job_id, payload = events.get(timeout=_POLL_S)
            except queue.Empty:
                for index, job_id in list(running.items()):
                    process = workers[index][0]
                    if not process.is_alive():
                        del running[index]
                        state.finish(job_id, f"worker on {devices[index]} died (exit code {process.exitcode})", on_event)
                        workers[index] = start_worker(devices[index])
                continue
            if kind in ("done", "failed"):
                index = next(i for i, j in running.items() if j == job_id)
                del running[index]
                outcome = payload["result"] if kind == "done" else payload["error"]
                if kind == "failed":
                    logger.error("job %s failed:\n%s", job_id, outcome)
                state.finish(job_id, outcome, on_event)
            else:
                on_event(kind, job_id, payload)
    finally:
        for process, inbox in workers:
            if process.is_alive():
                inbox.put(None)
        for process, _ in workers:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
