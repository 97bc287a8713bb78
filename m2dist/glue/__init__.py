"""GLUE evaluation (M2_SPEC 4): fine-tune a pretrained M2-BERT or BERT checkpoint on the 8 GLUE
tasks, or on a generic labeled-text task, with the published protocol.

- `config`: the protocol as a typed config from configs/glue/*.yaml (`load_glue_config`).
- `tasks`: GLUE readers (official TSV layout, JSONL, Parquet), the labeled-text task, Rotten Tomatoes.
- `encode`: `[CLS] a [SEP] b [SEP]` inputs with token types, padded to l_max.
- `metrics`: accuracy, F1, MCC, Pearson/Spearman and each task's score.
- `finetune`: one (task, seed) job on one device.
- `scheduler`: jobs over the GPUs of a node, MNLI before RTE/MRPC/STS-B.
- `runner`: `evaluate_glue`, the whole evaluation (tools/eval_glue.py).

Import the submodules directly; this package imports nothing heavy.
"""
