"""Convert checkpoints: training runs (DeepSpeed ZeRO 0-3), m2dist release folders, upstream M2-BERT.

  python tools/convert_checkpoint.py runs/debug out/m2-debug --to release [--tag step_00000200] [--bf16]
  python tools/convert_checkpoint.py runs/debug/checkpoints runs/debug/checkpoints/step_00000200_universal --to universal
  python tools/convert_checkpoint.py m2-bert-80M/ out/m2-80M --to release
  python tools/convert_checkpoint.py out/m2-80M exported/ --to upstream [--safetensors]
  python tools/convert_checkpoint.py out/m2-80M composer.pt --to upstream
  python tools/convert_checkpoint.py runs/debug out/m2-debug --to release --register m2-debug

A training run (its output folder, its checkpoints/ folder or one step_XXXXXXXX folder) is read at
`latest` unless --tag names another complete checkpoint. A release made from a run also holds the
tokenizer and a model_card.md. The universal checkpoint resumes a run on another number of ranks when
it sits at <output_dir>/checkpoints/<tag>_universal beside <tag>: the engine loads it as written.
Every result is reloaded and checked (keys, shapes, dtypes, logits on a fixed input); the peak
resident memory of the conversion is printed.

Each conversion is an MLflow run tagged with its source (the training run id, or the source path);
--register NAME also logs the release as the run's MLflow model and registers it as a new version.
The run goes to --tracking-uri, else $MLFLOW_TRACKING_URI, else the store of the source training run,
else sqlite:///mlflow.db in the working directory.
"""

import argparse

from m2dist.checkpoint.convert import TARGETS
from m2dist.cli import run_cli
from m2dist.tracking import StageRun, add_tracking_arguments, source_lineage, tracked_convert


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "source", help="training run / checkpoints / tag folder, release folder, upstream folder, or upstream .pt/.bin file"
    )
    parser.add_argument("destination", help="folder to write (a .pt file for a Composer-style upstream file)")
    parser.add_argument("--to", required=True, choices=TARGETS, help="layout to write")
    parser.add_argument("--tag", help="checkpoint of a training run to read (default: the one named by `latest`)")
    parser.add_argument("--safetensors", action="store_true", help="upstream folder with model.safetensors")
    parser.add_argument("--bf16", action="store_true", help="release weights in bf16 (default fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--register", default="", metavar="NAME", help="register the release as a new version of NAME")
    add_tracking_arguments(parser)
    args = parser.parse_args(argv)
    if args.register and args.to != "release":
        parser.error("--register needs --to release")
    run = StageRun.from_args("convert", args, fallback_uri=source_lineage(args.source, args.tag).get("tracking_uri"))
    stats: dict[str, float] = {}
    written = tracked_convert(
        run, args.source, args.destination, args.to, register=args.register, tag=args.tag,
        safetensors=args.safetensors, bf16=args.bf16, overwrite=args.overwrite, stats=stats,
    )  # fmt: skip
    print(f"wrote {written} (reloaded and checked against the source)")
    print(f"peak RSS {stats['peak_rss_mib']:.1f} MiB ({stats['rss_before_mib']:.1f} MiB before converting)")
    print(run.summary())


if __name__ == "__main__":
    run_cli(main)
