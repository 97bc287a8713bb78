"""Heavy ops of M2-BERT, one folder per op: a plain-PyTorch reference and the dispatch that picks a path."""
