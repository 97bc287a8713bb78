"""Data for pretraining and evaluation: MLM masking (and, with the data issue, MDS streaming)."""
