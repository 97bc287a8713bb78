"""Weak scaling of pretraining on the GPUs of one node, and a resume across GPU counts.

  # tokens/s and scaling efficiency for every config x L x ZeRO stage x GPU count (one run each)
  python tools/bench_scaling.py --configs m2-bert-80M,bert-base --gpus 1,2,4,8 --zero-stages 1,2,3 --seq-lens 128
  # 8 GPUs stopped at step 50 and resumed on 4 (universal checkpoint) against 8 GPUs uninterrupted
  python tools/bench_scaling.py --configs m2-bert-80M --resume-from-gpus 8 --resume-to-gpus 4 --resume-at-step 50 --steps 100

Lists are comma-separated. Each run is `deepspeed --num_gpus N m2dist/train.py` with
NCCL_NVLS_ENABLE=0 (unless set), a fixed micro-batch of --tokens-per-gpu / L sequences per GPU, and
the key=value overrides given after the options (e.g. data.train=... data.val=...). Tables are
printed and written as Markdown and JSON in --work-dir (default: a new temporary folder), beside
each run's log.
"""

import argparse
import sys

from m2dist.bench.scaling import RunFailed, format_resume_report, run_resume_check, run_scaling


def _names(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def _integers(text: str) -> list[int]:
    try:
        return [int(item) for item in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=_names, default=["m2-bert-80M"], help="config names or YAML files, a,b")
    parser.add_argument("--gpus", type=_integers, default=[1, 2, 4, 8], help="GPU counts of the sweep")
    parser.add_argument("--zero-stages", type=_integers, default=None, help="sweep: 1,2,3; resume check: the config's")
    parser.add_argument("--seq-lens", type=_integers, default=None, help="sweep: 128,8192; resume check: the config's")
    parser.add_argument("--tokens-per-gpu", type=int, default=16384, help="micro-batch per GPU = this // L (at least 1)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--log-every", type=int, default=10, help="steps per log window (the first is warm-up)")
    parser.add_argument("--work-dir", default=None, help="run folders, logs and tables (default: a new temporary folder)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is stopped as failed")
    parser.add_argument("--resume-from-gpus", type=int, default=None, help="resume check: GPUs before the stop")
    parser.add_argument("--resume-to-gpus", type=int, default=None, help="resume check: GPUs after it")
    parser.add_argument("--resume-at-step", type=int, default=None, help="resume check: the step of the stop")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. data.train=/data/c4/train")
    return parser.parse_args(argv)


def _single(values: list[int] | None, option: str) -> int | None:
    if values is not None and len(values) != 1:
        raise ValueError(f"{option}: the resume check takes one value, got {values}")
    return values[0] if values else None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common = dict(overrides=args.overrides, work_dir=args.work_dir, timeout=args.timeout, tokens_per_gpu=args.tokens_per_gpu)
    resume = (args.resume_from_gpus, args.resume_to_gpus, args.resume_at_step)
    if any(value is not None for value in resume):
        if None in resume or len(args.configs) != 1:
            raise ValueError("the resume check needs --resume-from-gpus, --resume-to-gpus, --resume-at-step and one config")
        check, root = run_resume_check(
            args.configs[0], *resume, steps=args.steps, zero_stage=_single(args.zero_stages, "--zero-stages"),
            seq_len=_single(args.seq_lens, "--seq-lens"), **common,
        )  # fmt: skip
        print(format_resume_report(check))
        print(f"written: {root / 'resume.md'}, {root / 'resume.json'}")
        return
    _, root = run_scaling(
        args.configs, args.gpus, args.zero_stages or [1, 2, 3], args.seq_lens or [128, 8192],
        steps=args.steps, log_every=args.log_every, **common,
    )  # fmt: skip
    print(f"written: {root / 'scaling.md'}, {root / 'scaling.json'}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RunFailed) as err:
        sys.exit(f"error: {err}")
