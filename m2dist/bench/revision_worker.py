"""One revision's side of `m2dist.bench.revisions`: a process that imports m2dist from that
revision's tree, builds and warms up its fine-tuning steps, then times blocks of steps on request.

Run by path (`runpy`), not imported: the tree under test owns the `m2dist` package in this
process. It uses only `m2dist.bench.finetune`'s `_finetune_runner`, `_settle` and
`glue_config_for`, which every revision since the fine-tuning benchmark has. Replies go to stdout
as lines that start with `REPLY`, so that whatever else the libraries print there is skipped.
Requests come on stdin, one JSON object a line: {"batch": B, "steps": N} times N steps at batch B
and replies {"seconds": s}; {"quit": true} ends the process.
"""

import json
import sys

REPLY = "@@revision-worker "


def reply(message: dict) -> None:
    print(REPLY + json.dumps(message), flush=True)


def main(spec: dict) -> None:
    sys.path.insert(0, spec["tree"])
    import torch

    import m2dist
    from m2dist.bench.finetune import _finetune_runner, _settle, glue_config_for

    device = torch.device(spec["device"])
    glue = glue_config_for(spec["config"])
    runners = {}
    for batch in spec["batch_sizes"]:
        run, _, _ = _finetune_runner(
            spec["config"], glue, batch, spec["cuda_graph"], device, spec["seq_len"], tuple(spec["overrides"])
        )
        run(spec["first_steps"])
        _settle(run, spec["block_steps"])
        runners[batch] = run
    reply({"ready": True, "m2dist": m2dist.__file__})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        reply({"seconds": runners[request["batch"]](request["steps"])})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
