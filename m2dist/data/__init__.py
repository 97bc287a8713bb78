"""Data for pretraining and evaluation.

- `tokenizer`: WordPiece (bert-base-uncased vocab.txt) and sentencepiece behind one interface.
- `readers`: the documents of text / JSONL / Parquet files, with the file and line of each.
- `prepare`: text / JSONL / Parquet -> tokenized MDS shards with a manifest (tools/prepare_mds.py).
- `manifest`: what a shard folder was made with, checked against the config before training.
- `loader`: `build_mlm_dataloader`, streaming MLM batches with exact resume (imports streaming).
- `masking`: MLM 80/10/10 masking, deterministic per (seed, epoch, sample index).
- `corpus`: the embedded English corpus and `prepare_default_dataset` for the debug run.

Import the submodules directly; this package imports nothing heavy.
"""
