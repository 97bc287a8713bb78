"""One revision's side of `m2dist.bench.revisions`: a process that imports m2dist from that
revision's tree, builds and warms up its steps, then times blocks of steps on request.

Run by path (`runpy`), not imported: the tree under test owns the `m2dist` package in this
process. The steps are `m2dist.bench.finetune`'s fine-tuning step (`_finetune_runner`, one per
batch size), the training engine's (`m2dist.bench.train.engine_config` and the `Trainer`, one
batch size: a process joins one process group) or the sequence mixer's forward and backward alone
(`kernels.mixer.implementation`), warmed up by `m2dist.bench.finetune._settle`: names that every
revision since those benchmarks has. Replies go to stdout as lines that start
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


# The short convolution's taps (M2's `short_filter`).
SHORT_TAPS = 3


def _mixer_runners(spec: dict, device) -> dict:
    """The config's sequence mixer after `in_linear` (short convolution, gates, both long
    convolutions) forward and backward, one per batch size, with inputs as the model passes them
    under bf16 autocast: the projection (B, L, 3D) in bf16, the layer input u (B, L, D), the filters
    and skip weights in fp32 (as `m2dist.bench.kernels.bench_mixer` makes them, built here rather
    than by a helper of that module, which the older trees compared would not have; no in_linear
    bias, which their mixers do not take). What a change to the mixer's kernels is worth, without
    the rest of the step."""
    import torch

    from kernels.mixer import implementation
    from m2dist.bench.finetune import _synchronize
    from m2dist.config import load_config

    model = load_config(spec["config"], list(spec["overrides"])).model
    mixer = implementation(model.kernels.fftconv, model.kernels.fused_mixer)
    dim, length = model.hidden_size, spec["seq_len"]
    runners = {}
    for batch in spec["batch_sizes"]:
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape, scale=1.0, dtype=torch.float32, gen=gen):
            return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype).requires_grad_()

        inputs = [
            rand(batch, length, 3 * dim, dtype=torch.bfloat16), rand(3 * dim, 1, SHORT_TAPS, scale=0.5),
            rand(3 * dim, scale=0.1), rand(batch, length, dim), rand(dim, 2 * length, scale=0.1), rand(dim),
            rand(dim, 2 * length, scale=0.1), rand(dim),
        ]  # fmt: skip
        # The output's gradient in the output's dtype (fp32 per op, where u is fp32; bf16 fused).
        upstream = {dtype: torch.randn(batch, length, dim, device=device, generator=gen).to(dtype)
                    for dtype in (torch.float32, torch.bfloat16)}  # fmt: skip

        def run(steps: int, inputs=inputs, upstream=upstream) -> float:
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(steps):
                for tensor in inputs:
                    tensor.grad = None
                y = mixer(*inputs)
                y.backward(upstream[y.dtype])
            _synchronize(device)
            return time.perf_counter() - started

        runners[batch] = run
    return runners


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
        elif spec["step"] == "mixer":
            runners = _mixer_runners(spec, device)
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
