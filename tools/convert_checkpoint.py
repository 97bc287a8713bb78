"""Convert checkpoints: upstream M2-BERT <-> m2dist release folders.

  python tools/convert_checkpoint.py m2-bert-80M/ out/m2-80M --to release
  python tools/convert_checkpoint.py out/m2-80M exported/ --to upstream [--safetensors]
  python tools/convert_checkpoint.py out/m2-80M composer.pt --to upstream
"""

import argparse

from m2dist.checkpoint.convert import TARGETS, convert_checkpoint
from m2dist.cli import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="release folder, upstream folder, or upstream .pt/.bin file")
    parser.add_argument("destination", help="folder to write (a .pt file for a Composer-style upstream file)")
    parser.add_argument("--to", required=True, choices=TARGETS, help="layout to write")
    parser.add_argument("--safetensors", action="store_true", help="upstream folder with model.safetensors")
    parser.add_argument("--bf16", action="store_true", help="release weights in bf16 (default fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = parser.parse_args()
    written = convert_checkpoint(
        args.source, args.destination, args.to, safetensors=args.safetensors, bf16=args.bf16, overwrite=args.overwrite
    )
    print(f"wrote {written} (reloaded and checked against the source)")


if __name__ == "__main__":
    run_cli(main)
