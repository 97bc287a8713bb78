"""Fine-tuning step throughput at GLUE's batch sizes, M2 beside BERT in one run, with and without
the CUDA-graph step (and with the classifier compiled, `glue.compile`), and the whole-GLUE training
time estimated from it. At each batch size and mode the configs are timed side by side, in turn
(`m2dist.bench.finetune.benchmark_finetune_steps`).

  python tools/bench_finetune.py --configs m2-bert-80M bert-base --batch-sizes 16 32 48
  python tools/bench_finetune.py --configs m2-bert-80M bert-base --modes graph compiled
  python tools/bench_finetune.py --configs m2-bert-80M m2-bert-80M:model.kernels.fused_mixer=true bert-base
  python tools/bench_finetune.py --batch-sizes 16 --modes graph --profile-dir tools/profiles   # where a step's time goes
  python tools/bench_finetune.py --batch-sizes 16 32 48 --modes graph --jobs-per-device 2 3     # several jobs on one GPU

A config may carry overrides of its own, `name:key=value,key=value`.
"""

import argparse
import dataclasses
from pathlib import Path

import torch

from m2dist.bench.finetune import (
    HEADER,
    MODE_LABELS,
    FinetuneCase,
    benchmark_finetune_steps,
    concurrent_step_ms,
    format_concurrent,
    format_row,
    glue_config_for,
    glue_wall_time,
)
from m2dist.bench.train import split_config_spec
from m2dist.cli import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["m2-bert-80M", "bert-base"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 48])
    parser.add_argument("--modes", nargs="+", choices=["graph", "compiled", "eager"], default=["graph", "eager"],
                        help="compiled: the CUDA-graph step of the torch.compile'd classifier (glue.compile=true)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gpus", type=int, default=8, help="also estimate the whole GLUE run on this many GPUs")
    parser.add_argument("--profile-dir", type=Path,
                        help="also profile each row's step: DIR/finetune-<config>-b<batch>-<mode>.txt")  # fmt: skip
    parser.add_argument("--jobs-per-device", nargs="*", type=int, default=[],
                        help="also time this many jobs fine-tuning on the GPU at once (eval_glue's --jobs-per-device)")  # fmt: skip
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results, concurrent = [], []
    for mode in args.modes:
        for batch in args.batch_sizes:
            cases = []
            for spec in args.configs:
                name, overrides = split_config_spec(spec)
                glue = dataclasses.replace(glue_config_for(name), compile=mode == "compiled")
                profile_to = args.profile_dir and args.profile_dir / f"finetune-{spec.replace(':', '-')}-b{batch}-{mode}.txt"
                cases.append(FinetuneCase(name, glue, overrides, profile_to))
            timed = benchmark_finetune_steps(cases, batch, mode != "eager", device, args.seq_len)
            for spec, case, result in zip(args.configs, cases, timed):
                print(format_row(result), flush=True)
                results.append((spec, mode, result))
                for jobs in args.jobs_per_device:
                    shared_ms = concurrent_step_ms(
                        case.config_name, case.glue, batch, mode != "eager", device, jobs, args.seq_len, overrides=case.overrides
                    )
                    concurrent.append((spec, mode, batch, jobs, shared_ms, result.step_ms))
                    print(format_concurrent(*concurrent[-1]), flush=True)
    # the table by model, as the whole-GLUE estimates below
    results.sort(key=lambda row: (args.configs.index(row[0]), args.modes.index(row[1])))
    print(f"\nOn {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(HEADER)
    for _, _, result in results:
        print(format_row(result))
    if concurrent:
        print("\n| model | step | batch | jobs at once | ms per step of the GPU | throughput against one job |\n|---|---|---|---|---|---|")
        print("\n".join(format_concurrent(*row) for row in concurrent))
    print("\n| model | step | whole GLUE, 1 GPU | whole GLUE, %d GPUs |\n|---|---|---|---|" % args.gpus)
    for spec in args.configs:
        for mode in args.modes:
            rows = [r for n, m, r in results if n == spec and m == mode]
            step_ms = {r.batch_size: r.step_ms for r in rows}
            overhead = {r.batch_size: max(0.0, r.first_overhead_s) for r in rows}
            glue = glue_config_for(split_config_spec(spec)[0])
            needed = {getattr(glue.tasks, t).batch_size for t in ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte")}
            if not needed <= step_ms.keys():
                continue
            one, many = (glue_wall_time(glue, step_ms, overhead, n) / 3600 for n in (1, args.gpus))
            print(f"| {spec} | {MODE_LABELS[mode]} | {one:.2f} h | {many:.2f} h |")


if __name__ == "__main__":
    run_cli(main)
