"""Pretraining runs side by side: validation loss against GPU-seconds and tokens seen, and a table.

  python tools/compare_runs.py outputs/bert-base outputs/m2-bert-80M --out compare.png
  python tools/compare_runs.py outputs/bert-base --mlflow-uri http://127.0.0.1:5000 --run-id 9df6309b...

Each RUN_DIR is a train.output_dir of m2dist/train.py (its metrics.jsonl and config.json); with
--mlflow-uri, each --run-id is a training run of that MLflow store. The first run is the baseline:
the last column is the GPU-time each run took to reach the baseline's final validation loss, as a
ratio to the baseline's. The figure has two panels (validation MLM loss vs GPU-seconds, vs tokens
seen); the markdown table goes to stdout. GPU-seconds are derived from the logged throughput (see
m2dist/bench/compare.py).
"""

import argparse

from m2dist.bench.compare import compare_runs
from m2dist.cli import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run folders of m2dist/train.py")
    parser.add_argument("--out", default="compare_runs.png", help="the figure to write (PNG)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI of the --run-id runs")
    parser.add_argument("--run-id", nargs="+", default=[], dest="run_ids", help="MLflow runs, after the folders")
    args = parser.parse_args()
    if not args.run_dirs and not args.run_ids:
        parser.error("give at least one RUN_DIR or --mlflow-uri URI --run-id ID")
    if args.run_ids and not args.mlflow_uri:
        parser.error("--run-id needs --mlflow-uri")
    _, table = compare_runs(args.run_dirs, args.out, args.mlflow_uri, args.run_ids)
    print(table)
    print(f"\nfigure: {args.out}")


if __name__ == "__main__":
    run_cli(main)
