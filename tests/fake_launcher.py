"""A stand-in for the `deepspeed` launcher in tests of the scaling tool's orchestration: takes
`--num_gpus N --master_port P SCRIPT --config NAME key=value ...` and, instead of training, appends
to `<train.output_dir>/metrics.jsonl` one record per step from the last one there (a resume) to
train.stop_after or train.duration, with a loss that depends on the step and the global batch only
and a throughput sub-linear in the GPU count."""

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_gpus", type=int, required=True)
    parser.add_argument("--master_port", type=int, required=True)
    parser.add_argument("script")
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args()
    values = dict(item.split("=", 1) for item in overrides)
    metrics = Path(values["train.output_dir"]) / "metrics.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    last = min(int(values["train.duration"]), done + int(values.get("train.stop_after", 10**9)))
    batch = int(values["train.global_batch_size"])
    with open(metrics, "a") as out:
        for step in range(done + 1, last + 1):
            record = {"step": step, "world_size": args.num_gpus, "zero_stage": int(values["train.zero_stage"])}
            record["train/loss"] = 10.0 / step + 1.0 / batch
            # Sub-linear in the GPU count, and slower in the first (start-up) window.
            record["throughput/tokens_per_s"] = 1000.0 * args.num_gpus**0.9 / (2 if step == 1 else 1)
            record["memory/peak_gib"] = 1.0 + 0.1 * step
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
