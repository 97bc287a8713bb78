"""Benchmark the Triton kernels against the torch references on one GPU (bf16, forward + backward).

Prints one table per op: reference ms, Triton ms, speedup, and the achieved rate against the
measured ceiling (HBM traffic floor / copy bandwidth for the FFT convolution and the sequence mixer,
useful FLOPs / bf16 GEMM rate for the GLU MLP).

    python tools/bench_kernels.py                      # every op at the sizes of the goals
    python tools/bench_kernels.py --ops fftconv --lengths 128,2048 --variants 4096:2048:8,1024:2048:8
    python tools/bench_kernels.py --ops fftconv --lengths 512,2048,8192,32768 --fft-operands tf32,fp16
    python tools/bench_kernels.py --ops mixer --mixer-lengths 128 --mixer-variants 16:16:8:8,16:32:8:8,16:16:4:4
    python tools/bench_kernels.py --ops gemms --dims 768 --gemm-tokens 32768,2048   # Triton or cuBLAS, per GEMM
    python tools/bench_kernels.py --ops glu --dims 768 --glu-sweep                  # the GLU kernels' tiles
    python tools/bench_kernels.py --ops none --conv-sweep 16,48,256                 # the L=128 convolution kernels' blocks
    python tools/bench_kernels.py --ops none --conv-sweep 256 --conv-kernels "short conv backward"
    python tools/bench_kernels.py --ops none --conv-sweep 4 --conv-sweep-length 8192   # the short convolution's at L=8192
    python tools/bench_kernels.py --ops none --dims 768 --act-sweep                  # the GLU activation kernels' tiles

A variant `max_onchip:tile:num_warps` overrides the FFT kernels' plan, a mixer variant
`BD:BF:BPP:num_warps` the fused mixer's blocks (sweeps for tuning).
"""

import argparse

from m2dist.bench.kernels import CONV_SWEEP_KERNELS, run_kernel_benchmarks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="fftconv,mixer,glu")
    parser.add_argument("--lengths", default="128,512,2048,8192,32768")
    parser.add_argument("--fft-tokens", type=int, default=65536, help="batch x L of the FFT benchmark")
    parser.add_argument("--fft-dim", type=int, default=768)
    parser.add_argument("--variants", default="", help="comma list of max_onchip:tile:num_warps")
    parser.add_argument("--fft-operands", default="default",
                        help="comma list of the FFT transforms' tensor-core operands to time each plan with: "
                        "default (the kernels' choice per plan), tf32, fp16")  # fmt: skip
    parser.add_argument("--toeplitz-max", type=int, default=8192, help="longest L to time the Toeplitz path at (it takes L <= 128)")
    parser.add_argument("--dims", default="768,960,1536,1792")
    parser.add_argument("--glu-tokens", type=int, default=32768)
    parser.add_argument("--mixer-lengths", default="128,512,2048,8192,16384,32768",
                        help="L of the sequence-mixer benchmark (--fft-tokens per step; the fused operator where it applies)")  # fmt: skip
    parser.add_argument("--mixer-dims", default="768,960")
    parser.add_argument("--mixer-variants", default="", help="comma list of BD:BF:BPP:num_warps for the fused mixer")
    parser.add_argument("--glu-compiled-reference", action="store_true",
                        help="also time the torch.compile'd reference GLU MLP (a cuBLAS GEMM per block, GELU * n fused; compiles per size)")  # fmt: skip
    parser.add_argument("--gemm-tokens", default="32768,2048", help="token counts of the plain-GEMM comparison (--ops gemms)")
    parser.add_argument("--glu-sweep", action="store_true", help="also time the GLU kernels at each tile of a sweep (first of --dims)")
    parser.add_argument("--conv-sweep", default="", help="comma list of batch sizes: time the blocks of the "
                        "Toeplitz kernels and the short convolution's kernels at L=128")  # fmt: skip
    parser.add_argument("--conv-sweep-length", type=int, default=None,
                        help="L of --conv-sweep (default 128); beyond 128 it times the short convolution's kernels only")  # fmt: skip
    parser.add_argument("--conv-kernels", default="",
                        help="comma list of the kernels --conv-sweep times (default all): "
                        f"{', '.join(CONV_SWEEP_KERNELS)}")  # fmt: skip
    parser.add_argument("--act-sweep", action="store_true",
                        help="also time the GLU activation kernels at each tile of a sweep (first of --dims, --glu-tokens rows)")  # fmt: skip
    args = parser.parse_args(argv)
    run_kernel_benchmarks(
        ops=args.ops.split(","),
        lengths=[int(x) for x in args.lengths.split(",")],
        fft_tokens=args.fft_tokens,
        fft_dim=args.fft_dim,
        variants=[tuple(int(x) for x in v.split(":")) for v in args.variants.split(",") if v],
        toeplitz_max=args.toeplitz_max,
        dims=[int(x) for x in args.dims.split(",")],
        glu_tokens=args.glu_tokens,
        mixer_lengths=[int(x) for x in args.mixer_lengths.split(",")],
        mixer_dims=[int(x) for x in args.mixer_dims.split(",")],
        mixer_variants=[tuple(int(x) for x in v.split(":")) for v in args.mixer_variants.split(",") if v],
        glu_compiled_reference=args.glu_compiled_reference,
        gemm_tokens=[int(x) for x in args.gemm_tokens.split(",")],
        glu_sweep=args.glu_sweep,
        conv_sweep=[int(x) for x in args.conv_sweep.split(",") if x],
        fft_operands=_choices(args.fft_operands, ("default", "tf32", "fp16"), "--fft-operands"),
        act_sweep=args.act_sweep,
        conv_kernels=_choices(args.conv_kernels, CONV_SWEEP_KERNELS, "--conv-kernels") if args.conv_kernels else None,
        conv_sweep_length=args.conv_sweep_length,
    )


def _choices(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [x for x in value.split(",") if x]
    unknown = [x for x in chosen if x not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"{flag}: expected a comma list of {', '.join(allowed)}, got {value!r}")
    return chosen


if __name__ == "__main__":
    main()
