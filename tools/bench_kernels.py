"""Triton kernels against the torch references on one GPU; see kernels/bench.py for the options.

  python tools/bench_kernels.py
  python tools/bench_kernels.py --ops fftconv --lengths 128,2048
"""

from kernels.bench import main

if __name__ == "__main__":
    main()
