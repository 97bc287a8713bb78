"""One revision's side of `m2dist.bench.revisions`: a process that imports m2dist from that
revision's tree, builds and warms up its steps, then times blocks of steps on request.

Run by path (`runpy`), not imported: the tree under test owns the `m2dist` package in this
process. The steps are `m2dist.bench.finetune`'s fine-tuning step (`_finetune_runner`, one per
batch size) or the training engine's (`m2dist.bench.train.engine_config` and the `Trainer`, one
batch size: a process joins one process group), warmed up by `m2dist.bench.finetune._settle`:
names that every revision since those benchmarks has. Replies go to stdout as lines that start
with `REPLY`, so that whatever else the libraries print there is skipped. Requests come on stdin,
one JSON object a line: {"batch": B, "steps": N} times N steps at batch B and replies
{"seconds": s, "peak_gib": the process's peak of allocated GPU memory so far (null on a CPU)};
{"quit": true} ends the process. The first reply, once warmed up, says what the worker holds of the
GPU's memory (the drop in its free memory since the worker began) and what is left free.
"""

import json
import sys
import tempfile
import time

REPLY = "@@revision-worker "


def reply(message: dict) -> None:
    print(REPLY + json.dumps(message), flush=True)


def _finetune_runners(spec: dict, device) -> dict:
    from m2dist.bench.finetune import _finetune_runner, glue_config_for

    glue = glue_config_for(spec["config"])
    runners = {}
    for batch in spec["batch_sizes"]:
        run, _, _ = _finetune_runner(
            spec["config"], glue, batch, spec["cuda_graph"], device, spec["seq_len"], tuple(spec["overrides"])
        )
        runners[batch] = run
    return runners


def _engine_runners(spec: dict, device, closers: list) -> dict:
    from m2dist.bench.finetune import _synchronize
    from m2dist.bench.train import engine_config
    from m2dist.engine.trainer import Trainer

    (batch,) = spec["batch_sizes"]
    output = tempfile.TemporaryDirectory(prefix="m2dist-revision-engine-")
    trainer = Trainer(engine_config(spec["config"], spec["seq_len"], batch, output.name, tuple(spec["overrides"])))
    closers += [output.cleanup, trainer.close]

    def run(steps: int) -> float:
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        _synchronize(device)
        return time.perf_counter() - started

    return {batch: run}


def _free_gib(device) -> float | None:
    """The GPU's free memory in GiB, all processes counted (None on a CPU)."""
    import torch

    return torch.cuda.mem_get_info(device)[0] / 2**30 if device.type == "cuda" else None


def main(spec: dict) -> None:
    sys.path.insert(0, spec["tree"])
    import torch

    import m2dist
    from m2dist.bench.finetune import _settle

    device = torch.device(spec["device"])
    free_at_start = _free_gib(device)
    closers: list = []
    try:
        if spec["step"] == "engine":
            runners = _engine_runners(spec, device, closers)
        else:
            runners = _finetune_runners(spec, device)
        for run in runners.values():
            run(spec["first_steps"])
            _settle(run, spec["block_steps"])
        free = _free_gib(device)
        held = None if free is None else free_at_start - free
        reply({"ready": True, "m2dist": m2dist.__file__, "held_gib": held, "free_gib": free})
        for line in sys.stdin:
            request = json.loads(line)
            if request.get("quit"):
                break
            seconds = runners[request["batch"]](request["steps"])
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            reply({"seconds": seconds, "peak_gib": peak})
    finally:
        for close in reversed(closers):
            close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
