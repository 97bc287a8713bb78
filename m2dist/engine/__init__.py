"""The DeepSpeed training engine: distributed set-up, generated DeepSpeed config, checkpoints,
metrics and the training loop."""
