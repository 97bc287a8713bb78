"""Benchmarks and experiments, each what one tool in tools/ runs.

- `train`: training-step throughput on one GPU, m2dist models beside Hugging Face's BERT (bench_train.py).
- `kernels`: the Triton kernels against the torch references (bench_kernels.py).
- `data`: tokens/s of the data path per loader worker (bench_data.py).
- `allreduce`: all-reduce bus bandwidth between the GPUs of a node (bench_allreduce.py).
- `scaling`: weak scaling over GPU counts and a resume across GPU counts (bench_scaling.py).
- `profile`: torch.profiler's top operators of the engine's training step (profile_train.py).
"""
