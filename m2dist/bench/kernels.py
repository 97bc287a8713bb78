"""The Triton kernels against the torch references on one GPU (bf16, forward + backward), what
tools/bench_kernels.py runs.

One table per op: reference ms, Triton ms, speedup, and the achieved rate against the measured
ceiling (HBM traffic floor / copy bandwidth for the FFT convolution and the whole sequence mixer,
useful FLOPs / bf16 GEMM rate for the GLU MLP).
"""

import contextlib
import functools
import itertools

import torch
import triton
import triton.testing

import kernels.fftconv
import kernels.mixer
from kernels.blockdiag import reference as blockdiag_reference
from kernels.blockdiag import triton_blockdiag
from kernels.fftconv import reference as fftconv_reference
from kernels.fftconv import triton_cufft, triton_fftconv, triton_toeplitz
from kernels.mixer import implementation as mixer_implementation
from kernels.mixer import triton_mixer, triton_short_conv


def _bench(fn) -> float:
    """Median ms of fn over ~200 ms of repeats after warm-up (CUDA events)."""
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def measure_ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 GEMM FLOP/s) on random data."""
    x = torch.randn(512 * 2**20, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    copy_ms = _bench(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_ms = _bench(lambda: a @ b)
    del x, y, a, b
    return 2 * 2 * 512 * 2**20 / (copy_ms * 1e-3), 2 * 8192**3 / (gemm_ms * 1e-3)


def _fwd_bwd(fn, inputs, upstream):
    def step():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(upstream)

    return step


def bench_fftconv(lengths, tokens, dim, variants, copy_bw, toeplitz_max, operands=("default",), device="cuda"):
    """Rows of the FFT table; each plan (`variants`, else the default) is timed with the transforms'
    tensor-core operands of each of `operands` ("default": the kernels' choice for the plan; "tf32",
    "fp16": forced through `triton_fftconv.FP16_OPERANDS`). The label names the operands used. The
    cuFFT path (`triton_cufft`) has a row of its own at every length, the Toeplitz kernels theirs up
    to `toeplitz_max`."""
    rows = []
    for length in lengths:
        batch = max(1, tokens // length)
        gen = torch.Generator(device=device).manual_seed(0)

        def act():
            return torch.randn(batch, dim, length, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()

        def filt(*shape, scale=0.1):
            return (torch.randn(*shape, device=device, generator=gen) * scale).requires_grad_()

        u, x1, x2, v = act(), act(), act(), act()
        k1, k2 = filt(dim, 2 * length), filt(dim, 2 * length)
        d1, d2 = filt(dim, scale=1.0), filt(dim, scale=1.0)
        inputs = [u, x1, x2, v, k1, d1, k2, d2]
        upstream = torch.randn(batch, dim, length, device=device, dtype=torch.bfloat16, generator=gen)
        # HBM floor: forward reads u, x1, x2, v and writes y; backward reads those and dy and
        # writes four input gradients; the filters are O(D L) and left out.
        floor_bytes = 14 * batch * dim * length * 2
        ref_ms = _bench(_fwd_bwd(fftconv_reference.gated_long_conv, inputs, upstream))
        ref_fwd_ms = _bench(lambda: fftconv_reference.gated_long_conv(*inputs))

        def measure(algorithm, fn, args=inputs):
            try:
                tri_ms = _bench(_fwd_bwd(fn, args, upstream))
                tri_fwd_ms = _bench(lambda: fn(*args))
            except Exception as exc:  # a variant that does not compile or fit is reported, not fatal
                print(f"fftconv L={length} {algorithm}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                return
            gbs = floor_bytes / (tri_ms * 1e-3)
            rows.append(
                (
                    f"L={length} B={batch} D={dim}", algorithm, ref_ms, tri_ms, ref_ms / tri_ms, ref_fwd_ms / tri_fwd_ms,
                    gbs / 1e9, gbs / copy_bw, tri_ms / (floor_bytes / copy_bw * 1e3),
                )
            )  # fmt: skip
            print(_fmt_fft(rows[-1]), flush=True)

        for variant, operand in itertools.product(variants or [None], operands):
            saved = (triton_fftconv.TILE, triton_fftconv.NUM_WARPS, triton_fftconv.FP16_OPERANDS)
            if variant is not None:
                triton_fftconv.TILE, triton_fftconv.NUM_WARPS = variant[1], variant[2]
            triton_fftconv.FP16_OPERANDS = None if operand == "default" else operand == "fp16"
            max_onchip = variant[0] if variant is not None else triton_fftconv.MAX_ONCHIP
            plan = triton_fftconv.fft_plan(length, max_onchip, triton_fftconv.TILE)
            if plan[1] <= 64:  # the outer combine unrolls R rows
                used = triton_fftconv.transform_precision(torch.bfloat16, plan)
                label = "FFT N={} R={} M={}x{} C={} {}".format(plan[0], plan[1], plan[2], plan[3], plan[6], used)
                label += f" w={variant[2]}" if variant else ""
                measure(label, functools.partial(triton_fftconv.gated_long_conv, max_onchip=max_onchip))
            triton_fftconv.TILE, triton_fftconv.NUM_WARPS, triton_fftconv.FP16_OPERANDS = saved
        # The gated inputs packed as the sequence mixer passes them (one (B, 3D, L) tensor).
        x = torch.cat([x1, x2, v], dim=1).detach().requires_grad_()
        measure("cuFFT transforms, Triton gates", triton_cufft.packed_gated_long_conv, [u, x, k1, d1, k2, d2])
        if length <= min(toeplitz_max, triton_toeplitz.MAX_LEN):
            for mode in triton_toeplitz.OPERAND_MODES:
                fn = functools.partial(triton_toeplitz.packed_gated_long_conv, operands=mode)
                measure(f"Toeplitz GEMM, {mode} operands", fn, [u, x, k1, d1, k2, d2])
        del x
        del inputs, u, x1, x2, v, upstream
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _fmt_fft(r):
    return f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.2f}x | {r[5]:.2f}x | {r[6]:.0f} | {r[7]:.1%} | {r[8]:.1f}x |"


def bench_mixer(lengths, tokens, dims, variants, copy_bw, device="cuda"):
    """The sequence mixer after in_linear (short conv, gates, both long convolutions) as the model
    calls it under bf16 autocast: a bf16 projection (B, L, 3D), the fp32 layer input u (B, L, D),
    fp32 filters. Paths: reference (torch.fft), per op (the Triton backend's long convolution with
    the short convolution's kernels and the transposes around them: the model's path, except beyond
    `kernels.fftconv.AUTO_TRITON_MAX_LEN` where the cuFFT path does not take the input and the
    model's path takes torch.fft for the long convolution, a row of its own), the same with the
    long convolution's other transforms (the DFT-matmul kernels where the default takes cuFFT's,
    cuFFT's elsewhere), the same with the `torch.compile`d reference short convolution instead, and
    fused (`triton_mixer`, once per block `variant` (BD, BF, BPP, num_warps), where it applies). The
    floor is `triton_mixer.mixer_traffic_bytes` at the copy bandwidth."""
    rows = []
    for length in lengths:
        batch = max(1, tokens // length)
        for dim in dims:
            gen = torch.Generator(device=device).manual_seed(0)
            p = torch.randn(batch, length, 3 * dim, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
            w = (torch.randn(3 * dim, 1, 3, device=device, generator=gen) * 0.5).requires_grad_()
            b = (torch.randn(3 * dim, device=device, generator=gen) * 0.1).requires_grad_()
            u = torch.randn(batch, length, dim, device=device, generator=gen).requires_grad_()
            k1, k2 = ((torch.randn(dim, 2 * length, device=device, generator=gen) * 0.1).requires_grad_() for _ in range(2))
            d1, d2 = (torch.randn(dim, device=device, generator=gen).requires_grad_() for _ in range(2))
            inputs = [p, w, b, u, k1, d1, k2, d2]
            upstream = torch.randn(batch, length, dim, device=device, dtype=torch.bfloat16, generator=gen)
            floor = triton_mixer.mixer_traffic_bytes(batch * length, dim)
            floor_ms = {k: v / copy_bw * 1e3 for k, v in floor.items()}
            size = f"L={length} B={batch} D={dim}"

            # the reference and per-op paths return fp32 (u is fp32), the fused one bf16
            upstreams = {torch.bfloat16: upstream, torch.float32: upstream.float()}

            def measure(path, fn, per_op_ms=None):
                def step():
                    for t in inputs:
                        t.grad = None
                    y = fn(*inputs)
                    y.backward(upstreams[y.dtype])

                try:
                    fwd_ms = _bench(lambda: fn(*inputs))
                    both_ms = _bench(step)
                except Exception as exc:  # a variant that does not compile or fit is reported, not fatal
                    print(f"mixer {size} {path}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    return None
                rows.append((size, path, fwd_ms, both_ms, fwd_ms / floor_ms["forward"],
                             both_ms / floor_ms["forward_backward"], None if per_op_ms is None else per_op_ms / both_ms))  # fmt: skip
                print(_fmt_mixer(rows[-1]), flush=True)
                return both_ms

            measure("reference", mixer_implementation("reference"))
            per_op_ms = measure("per op", mixer_implementation("triton"))
            takes_cufft = kernels.fftconv.takes_cufft(u.transpose(1, 2))
            if length > kernels.fftconv.AUTO_TRITON_MAX_LEN and not takes_cufft:
                # the default there: the short convolution's kernels, the long convolution on torch.fft
                measure("per op, torch.fft (default)", mixer_implementation("auto"), per_op_ms)
            # the other algorithm of the long convolution's transforms (`kernels.fftconv.CUFFT_MIN_LEN`)
            if takes_cufft:
                with _setting(kernels.fftconv, "CUFFT_MIN_LEN", None):
                    measure("per op, DFT-matmul kernels", mixer_implementation("triton"), per_op_ms)
            else:
                with _setting(kernels.fftconv, "CUFFT_MIN_LEN", length):
                    measure("per op, cuFFT transforms", mixer_implementation("triton"), per_op_ms)
            # the compiled reference short convolution instead of its kernels
            with _setting(kernels.mixer, "TRITON_SHORT_CONV", False):
                measure("per op, compiled short conv", mixer_implementation("triton"), per_op_ms)
            if triton_mixer.supports(p):
                for variant in variants or [None]:
                    saved = triton_mixer.BLOCKS
                    if variant is not None:
                        triton_mixer.BLOCKS = dict(zip(("BD", "BF", "BPP", "num_warps"), variant))
                    label = "fused" + ("" if variant is None else " BD={} BF={} BPP={} w={}".format(*variant))
                    measure(label, mixer_implementation("triton", fused=True), per_op_ms)
                    triton_mixer.BLOCKS = saved
            del inputs, p, u, upstream, upstreams
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _fmt_mixer(r):
    speedup = "" if r[6] is None else f"{r[6]:.2f}x"
    return f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.1f}x | {r[5]:.1f}x | {speedup} |"


def bench_glu_mlp(dims, tokens, gemm_rate, compiled_reference=False):
    rows = []
    for dim in dims:
        inner, nblocks = 4 * dim, 4
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        w1 = (torch.randn(nblocks, 2 * inner // nblocks, dim // nblocks, device="cuda", generator=gen) * 0.05).to(torch.bfloat16)
        w2 = (torch.randn(nblocks, dim // nblocks, inner // nblocks, device="cuda", generator=gen) * 0.05).to(torch.bfloat16)
        b2 = torch.zeros(dim, device="cuda", dtype=torch.bfloat16)
        params = [w1.requires_grad_(), w2.requires_grad_(), b2.requires_grad_()]
        upstream = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, generator=gen)

        def ref(x, w1, w2, b2, dropout_p=0.0):
            return blockdiag_reference.blockdiag_matmul(blockdiag_reference.blockdiag_glu(x, w1, dropout_p), w2) + b2

        def tri(x, w1, w2, b2, dropout_p=0.0):
            return triton_blockdiag.blockdiag_matmul(triton_blockdiag.blockdiag_glu(x, w1, dropout_p), w2, b2)

        # Useful FLOPs: forward d -> 2I and I -> d block-diagonal GEMMs, backward twice that.
        flops = 3 * (2 * tokens * dim * 2 * inner + 2 * tokens * inner * dim) / nblocks
        ref_ms = _bench(_fwd_bwd(ref, [x, *params], upstream))
        tri_ms = _bench(_fwd_bwd(tri, [x, *params], upstream))
        # The reference is a cuBLAS GEMM per block on strided views; compiled, Inductor fuses the
        # GELU * n and the concatenations around them (a compilation per size: off unless asked for).
        compiled_ms = _bench(_fwd_bwd(torch.compile(ref), [x, *params], upstream)) if compiled_reference else None
        ref_fwd = _bench(lambda: ref(x, *params))
        tri_fwd = _bench(lambda: tri(x, *params))
        # With the MLP's hidden dropout as trained (0.1): torch's after the reference GLU, the
        # Triton path's drawn in its activation kernels (in the fused kernels' epilogues below).
        ref_drop_ms = _bench(_fwd_bwd(lambda *a: ref(*a, dropout_p=0.1), [x, *params], upstream))
        tri_drop_ms = _bench(_fwd_bwd(lambda *a: tri(*a, dropout_p=0.1), [x, *params], upstream))
        # The plain block-diagonal GEMMs (the output projection, the GLU's input and weight
        # gradients) on the Triton kernel instead of cuBLAS (`triton_blockdiag.cublas_gemms`).
        with _setting(triton_blockdiag, "cublas_gemms", lambda t: False):
            tri_bmm_ms = _bench(_fwd_bwd(tri, [x, *params], upstream))
        # The GLU path not taken by default (`triton_blockdiag.glu_via_gemms`): without dropout the
        # up-projection on the plain GEMMs and the activation kernels, with it the fused GLU kernels.
        with _setting(triton_blockdiag, "GLU_VIA_GEMMS", True):
            via_ms = _bench(_fwd_bwd(tri, [x, *params], upstream))
        with _setting(triton_blockdiag, "GLU_VIA_GEMMS", False):
            fused_drop_ms = _bench(_fwd_bwd(lambda *a: tri(*a, dropout_p=0.1), [x, *params], upstream))
        # With dropout on the plain GEMMs, the backward recomputing the pre-activation instead of
        # given the forward's (the default, `triton_blockdiag.GLU_KEEPS_PRE_ACTIVATION`).
        with _setting(triton_blockdiag, "GLU_VIA_GEMMS", True), _setting(triton_blockdiag, "GLU_KEEPS_PRE_ACTIVATION", False):
            recomputed_drop_ms = _bench(_fwd_bwd(lambda *a: tri(*a, dropout_p=0.1), [x, *params], upstream))
        rate = flops / (tri_ms * 1e-3)
        rows.append((f"d={dim} I={inner} M={tokens}", ref_ms, tri_ms, ref_ms / tri_ms, ref_fwd / tri_fwd, rate / 1e12,
                     rate / gemm_rate, compiled_ms, compiled_ms and flops / (compiled_ms * 1e-3) / gemm_rate,
                     ref_drop_ms, tri_drop_ms, tri_bmm_ms, via_ms, fused_drop_ms, recomputed_drop_ms))  # fmt: skip
        print(_fmt_glu(rows[-1]), flush=True)
        print(f"  GLU configs at d={dim}: {glu_config_summary()}", flush=True)
    return rows


def bench_blockdiag_gemms(dims, token_counts, gemm_rate, device="cuda"):
    """Each plain block-diagonal GEMM of the GLU MLP (4 blocks) on the Triton kernel and on cuBLAS
    (`triton_blockdiag.GEMMS`), and the fused GLU forward beside cuBLAS's up-projection alone (which
    writes the (M, 2I) pre-activation that the fused kernel keeps on chip)."""
    rows = []
    for dim, tokens in itertools.product(dims, token_counts):
        inner, nb = 4 * dim, 4
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, device=device, generator=gen) * scale).to(torch.bfloat16)

        x, a, dy, dpre = rand(tokens, dim), rand(tokens, inner), rand(tokens, dim), rand(tokens, 2 * inner)
        w1, w2 = rand(nb, 2 * inner // nb, dim // nb, scale=0.05), rand(nb, dim // nb, inner // nb, scale=0.05)
        b2 = rand(dim)
        out_flops, up_flops = 2 * tokens * inner * dim / nb, 2 * tokens * dim * 2 * inner / nb
        cases = [
            ("output projection, forward", out_flops, lambda g: g.fwd(a, w2, b2)),
            ("output projection, input gradient", out_flops, lambda g: g.dx(dy, w2)),
            ("output projection, weight gradient", out_flops, lambda g: g.dw(dy, a, w2)),
            ("GLU, input gradient", up_flops, lambda g: g.dx(dpre, w1)),
            ("GLU, weight gradient", up_flops, lambda g: g.dw(dpre, x, w1)),
        ]
        for name, flops, gemm in cases:
            tri_ms = _bench(functools.partial(gemm, triton_blockdiag.GEMMS["triton"]))
            cub_ms = _bench(functools.partial(gemm, triton_blockdiag.GEMMS["cublas"]))
            rows.append((f"d={dim} M={tokens}", name, tri_ms, cub_ms, flops, gemm_rate))
            print(_fmt_gemm(rows[-1]), flush=True)
        fused_ms = _bench(lambda: triton_blockdiag.glu_fwd(x, w1))
        up_ms = _bench(lambda: triton_blockdiag.GEMMS["cublas"].fwd(x, w1, None))
        name = "GLU forward: fused (Triton) / up-projection alone (cuBLAS)"
        rows.append((f"d={dim} M={tokens}", name, fused_ms, up_ms, up_flops, gemm_rate))
        print(_fmt_gemm(rows[-1]), flush=True)
    return rows


def _fmt_gemm(r):
    size, name, tri_ms, cub_ms, flops, gemm_rate = r
    tri, cub = flops / (tri_ms * 1e-3), flops / (cub_ms * 1e-3)
    return (f"| {size} | {name} | {tri_ms:.3f} | {cub_ms:.3f} | {tri / 1e12:.0f} | {cub / 1e12:.0f} | {cub / gemm_rate:.1%}"
            f" | {tri_ms / cub_ms:.2f}x |")  # fmt: skip


# The GLU kernels' tile sweep: (BM, BN, num_warps) x BK x num_stages; a tile that does not fit the
# GPU (shared memory, registers) raises one of these at its launch and is left out.
_TILE_ERRORS = tuple(
    getattr(triton.runtime.errors, name) for name in ("OutOfResources", "PTXASError") if hasattr(triton.runtime.errors, name)
)
_SWEEP_TILES = [(128, 128, 8), (128, 64, 4), (128, 64, 8), (64, 128, 4), (64, 256, 8)]


def sweep_glu_tiles(dim, tokens, top=10, device="cuda"):
    """Time both GLU kernels (no dropout) at every tile of the sweep, each launched directly with
    its config (no autotuning); rows (config, forward ms, backward ms), fastest forward + backward
    first. Tiles that do not fit (out of shared memory) are left out."""
    inner, nb = 4 * dim, 4
    p, q = dim // nb, 2 * inner // nb
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(nb, q, p, device=device, generator=gen) * 0.05).to(torch.bfloat16)
    da = torch.randn(tokens, inner, device=device, dtype=torch.bfloat16, generator=gen)
    out, dpre = torch.empty_like(da), torch.empty(tokens, 2 * inner, device=device, dtype=torch.bfloat16)
    pa, pb = triton_blockdiag.resident_split(p)
    rows = []
    for (bm, bn, warps), bk, stages in itertools.product(_SWEEP_TILES, (32, 64), (2, 3)):
        grid = (triton.cdiv(tokens, bm) * triton.cdiv(q, bn) * (nb // 2),)
        meta = dict(
            M=tokens, P=p, Q=q, s_xm=x.stride(0), HALF=nb // 2, PREC="tf32", UPCAST=False, PA=pa, PB=pb, GROUP_M=8,
            THRESHOLD=0, SCALE=1.0, DROPOUT=False, BM=bm, BN=bn, BK=bk, NSUB=1, RESIDENT=False,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
        try:
            fwd_ms = _bench(lambda: triton_blockdiag._glu_fwd_kernel[grid](x, w, out, x, s_om=out.stride(0), **meta))
            bwd_ms = _bench(
                lambda: triton_blockdiag._glu_bwd_kernel[grid](x, w, da, dpre, x, s_dam=da.stride(0), s_dpm=dpre.stride(0), **meta)
            )
        except _TILE_ERRORS:
            continue
        rows.append(((bm, bn, bk, warps, stages), fwd_ms, bwd_ms))
    rows.sort(key=lambda r: r[1] + r[2])
    return rows[:top]


def _fmt_sweep(r, candidates):
    config, fwd_ms, bwd_ms = r
    mark = "yes" if config in candidates else ""
    return f"| {' x '.join(map(str, config[:3]))} | {config[3]} | {config[4]} | {fwd_ms:.3f} | {bwd_ms:.3f} | {fwd_ms + bwd_ms:.3f} | {mark} |"


# The GLU activation kernels' tiles (`triton_blockdiag._act_grid`): rows x columns x warps.
_ACT_SWEEP = [
    dict(rows=rows, cols=cols, warps=warps) for rows, cols, warps in itertools.product((8, 16, 32, 64), (64, 128, 256), (4, 8))
]


def sweep_glu_act_tiles(dim, tokens, copy_bw, top=5, dropout_p=0.1, device="cuda"):
    """Time the GLU's activation kernels (the MLP on the plain GEMMs: GELU(g) * n and its gradient,
    with dropout as in training) at every tile of `_ACT_SWEEP`, launched directly, for I = 4 dim
    and `tokens` rows; rows (overrides, forward ms, backward ms, their shares of the copy bandwidth
    `copy_bw`), the `top` fastest forward + backward first and the default tile last (overrides {})."""
    inner, gen = 4 * dim, torch.Generator(device=device).manual_seed(0)
    pre = torch.randn(tokens, 2 * inner, device=device, dtype=torch.bfloat16, generator=gen)
    da = torch.randn(tokens, inner, device=device, dtype=torch.bfloat16, generator=gen)
    out, dpre = torch.empty_like(da), torch.empty_like(pre)
    seed = torch.tensor([1234], device=device, dtype=torch.int64)
    dropout = triton_blockdiag._dropout_args(seed, dropout_p, 2 * inner // 4, out)
    # bytes: forward reads [g, n] and writes the output; backward reads [g, n] and da, writes d[g, n]
    fwd_bytes, bwd_bytes = 3 * tokens * inner * 2, 5 * tokens * inner * 2

    def time(overrides):
        fwd_ms = _bench(lambda: triton_blockdiag.launch_act_forward(pre, out, dropout, **overrides))
        bwd_ms = _bench(lambda: triton_blockdiag.launch_act_backward(pre, da, dpre, dropout, **overrides))
        return overrides, fwd_ms, bwd_ms, fwd_bytes / (fwd_ms * 1e-3) / copy_bw, bwd_bytes / (bwd_ms * 1e-3) / copy_bw

    rows = []
    for overrides in _ACT_SWEEP:
        try:
            rows.append(time(overrides))
        except _TILE_ERRORS:
            continue
    rows.sort(key=lambda r: r[1] + r[2])
    return rows[:top] + [time({})]


def _fmt_act_sweep(r):
    overrides, fwd_ms, bwd_ms, fwd_share, bwd_share = r
    tile = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "default"
    return f"| {tile} | {fwd_ms * 1000:.1f} | {bwd_ms * 1000:.1f} | {fwd_share:.0%} | {bwd_share:.0%} |"


# The L=128 convolution kernels' block sweep, per kernel: keyword overrides of
# `triton_toeplitz._blocks` (the Toeplitz kernels) or `triton_short_conv._blocks` (the short
# convolution's kernels).
# Grids of about 256 programs give each channel's filter tiles one group of sequences up to batch
# 256 at d=768 (the tiles built once per channel and output block instead of twice or more).
_CONV_SWEEP = {
    "forward": [
        dict(rows_fwd=rows, cols_fwd=cols, warps=warps, target_programs=target)
        for rows, cols, warps, target in itertools.product((16, 32), (32, 64, 128), (4, 8), (256, 1024, 4096))
    ],
    "input gradients": [
        dict(rows_bwd=rows, cols_bwd=cols, warps_bwd=warps, target_programs=target)
        for rows, cols, warps, target in itertools.product((16, 32), (32, 64, 128), (4, 8), (256, 1024, 4096))
    ],
    "filter gradients": [
        dict(rows_filter=rows, blk_filter=blk, warps_filter=warps)
        for rows, blk, warps in itertools.product((16, 64), (32, 64), (4, 8))
    ],
    "short conv forward": [
        dict(rows_fwd=rows, cols_fwd=cols, warps_fwd=warps)
        for rows, cols, warps in itertools.product((16, 32, 64), (32, 64, 128), (4, 8))
    ],
    "short conv backward": [
        dict(rows=rows, cols=cols, warps_bwd=warps, target_programs=target)
        for rows, cols, warps, target in itertools.product((16, 32, 64), (32, 64, 128), (4, 8), (512, 2048, 8192, 65536))
    ]
    # the taps' gradients from the shifted inputs, at the tiles that were fastest in the first form
    + [
        dict(rows=rows, cols=32, warps_bwd=warps, target_programs=target, pair_shifted_inputs=True)
        for rows, warps, target in itertools.product((16, 32, 64), (4, 8), (2048, 8192))
    ]
    # each sequence's tiles loaded an iteration ahead, in both pairings
    + [
        dict(rows=rows, cols=32, warps_bwd=warps, target_programs=target, pair_shifted_inputs=pair, prefetch=True)
        for rows, warps, target, pair in itertools.product((16, 32), (4, 8), (2048, 8192), (False, True))
    ],
}


CONV_SWEEP_KERNELS = tuple(_CONV_SWEEP)
# The kernels the sweep can time beyond the Toeplitz kernels' longest L.
SHORT_CONV_SWEEP_KERNELS = ("short conv forward", "short conv backward")


def sweep_conv_blocks(dim, length, batches, top=3, device="cuda", kernels=None):
    """Time each convolution kernel of the L <= 128 path (the Toeplitz kernels with bf16
    activations, fp32 u as the model passes it and the residual branch on; the short convolution's
    forward, with in_linear's bias and u's layout, and backward), or those named in `kernels` (keys
    of `_CONV_SWEEP`), at every block choice of `_CONV_SWEEP` for each batch size, launched
    directly; rows (batch, kernel, overrides, ms, default ms), the `top` fastest per batch and
    kernel. Beyond the Toeplitz kernels' longest L only the short convolution's kernels run (the
    default there)."""
    short_only = length > triton_toeplitz.MAX_LEN
    unknown = set(kernels or ()) - set(_CONV_SWEEP)
    if unknown:
        raise ValueError(f"unknown convolution kernels {sorted(unknown)}; expected some of {list(_CONV_SWEEP)}")
    if short_only:
        toeplitz = sorted(set(kernels or ()) - set(SHORT_CONV_SWEEP_KERNELS))
        if toeplitz:
            raise ValueError(
                f"{toeplitz} run at L <= {triton_toeplitz.MAX_LEN} only (L={length}); beyond it the sweep "
                f"times {list(SHORT_CONV_SWEEP_KERNELS)}"
            )
        kernels = kernels or list(SHORT_CONV_SWEEP_KERNELS)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for batch in batches:

        def rand(*shape, dtype=torch.bfloat16, scale=1.0):
            return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

        x = rand(batch, 3 * dim, length)
        # the short convolution: in_linear's output p (B, L, 3D), its output's gradient in x's layout
        p, taps = rand(batch, length, 3 * dim), rand(3 * dim, 1, 3, dtype=torch.float32)
        dp = torch.empty_like(p)
        # its forward as the model launches it: with in_linear's bias and u (B, L, D) laid out too
        bias, in_bias = rand(3 * dim, dtype=torch.float32), rand(3 * dim, dtype=torch.float32)
        u_BLD = rand(batch, length, dim, dtype=torch.float32)
        ut = u_BLD.new_empty(batch, dim, length)
        short_conv_blocks = functools.partial(triton_short_conv._blocks, batch, length, 3 * dim)
        launches = {
            "short conv forward": (
                short_conv_blocks,
                lambda blk: triton_short_conv.launch_forward(p, taps, bias, x, blk, u_BLD, ut, in_bias),
            ),
            "short conv backward": (short_conv_blocks, lambda blk: triton_short_conv.launch_backward(x, p, taps, dp, blk)),
        }
        if not short_only:
            u = rand(batch, dim, length, dtype=torch.float32)
            k1, k2 = rand(dim, 2 * length, dtype=torch.float32, scale=0.1), rand(dim, 2 * length, dtype=torch.float32, scale=0.1)
            d1, d2 = rand(dim, dtype=torch.float32), rand(dim, dtype=torch.float32)
            dy, z1, y = rand(batch, dim, length), rand(batch, dim, length), rand(batch, dim, length)
            dx, du = torch.empty_like(x), torch.empty_like(u)
            tile_rows, row_scales = triton_toeplitz.filter_rows(k1, k2, x.dtype, triton_toeplitz.OPERANDS)
            toeplitz_blocks = functools.partial(triton_toeplitz._blocks, batch, dim, length)
            launches = {
                "forward": (
                    toeplitz_blocks,
                    lambda blk: triton_toeplitz.launch_forward(u, x, tile_rows, row_scales, d1, d2, y, z1, True, True, blk),
                ),
                "input gradients": (
                    toeplitz_blocks,
                    lambda blk: triton_toeplitz.launch_backward_inputs(dy, u, x, z1, tile_rows, row_scales, d1, d2, du, dx, True, blk),
                ),
                "filter gradients": (toeplitz_blocks, lambda blk: triton_toeplitz.launch_backward_filters(dy, u, x, True, blk)),
                **launches,
            }  # fmt: skip
        for kernel, (blocks, launch) in launches.items():
            if kernels and kernel not in kernels:
                continue
            default_ms = _bench(lambda: launch(blocks()))
            timed = []
            for overrides in _CONV_SWEEP[kernel]:
                blk = blocks(**overrides)
                try:
                    timed.append((overrides, _bench(lambda: launch(blk))))
                except _TILE_ERRORS:
                    continue
            timed.sort(key=lambda r: r[1])
            rows += [(batch, kernel, overrides, ms, default_ms) for overrides, ms in timed[:top]]
    return rows


def _fmt_conv_sweep(r):
    batch, kernel, overrides, ms, default_ms = r
    blocks = ", ".join(f"{k}={v}" for k, v in overrides.items())
    return f"| {batch} | {kernel} | {blocks} | {ms * 1000:.1f} | {default_ms * 1000:.1f} | {default_ms / ms:.2f}x |"


@contextlib.contextmanager
def _setting(module, name: str, value):
    """`module.name` set to `value` while inside (a path the benchmark times beside the default)."""
    chosen = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, chosen)


def glu_config_summary() -> str:
    """The GLU kernels' autotuned configs, the last ones chosen (streamed or resident x, tiles)."""
    parts = []
    for name, kernel in (("forward", triton_blockdiag._glu_fwd), ("backward", triton_blockdiag._glu_bwd)):
        config = getattr(kernel, "best_config", None)
        parts.append(f"{name} {'-' if config is None else config}")
    return "; ".join(parts)


def _fmt_glu(r):
    compiled = "- | -" if r[7] is None else f"{r[7]:.3f} | {r[8]:.1%}"
    dropout = f"{r[9]:.3f} | {r[10]:.3f} | {r[9] / r[10]:.2f}x"
    return (f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.2f}x | {r[4]:.2f}x | {r[5]:.0f} | {r[6]:.1%} | {compiled} | {dropout}"
            f" | {r[11]:.3f} | {r[12]:.3f} | {r[13]:.3f} | {r[14]:.3f} |")  # fmt: skip


def run_kernel_benchmarks(
    ops: list[str],
    lengths: list[int],
    fft_tokens: int,
    fft_dim: int,
    variants: list[tuple[int, int, int]],
    toeplitz_max: int,
    dims: list[int],
    glu_tokens: int,
    mixer_lengths: list[int] = (128, 512, 2048, 8192, 16384, 32768),
    mixer_dims: list[int] = (768, 960),
    mixer_variants: list[tuple[int, int, int, int]] = (),
    glu_compiled_reference: bool = False,
    gemm_tokens: list[int] = (32768, 2048),
    glu_sweep: bool = False,
    conv_sweep: list[int] = (),
    fft_operands: list[str] = ("default",),
    act_sweep: bool = False,
    conv_kernels: list[str] | None = None,
    conv_sweep_length: int | None = None,
) -> None:
    """Measure the ceilings, time the ops named in `ops` ("fftconv", "mixer", "glu") and print one
    Markdown table per op. A variant `(max_onchip, tile, num_warps)` overrides the FFT kernels' plan,
    a mixer variant `(BD, BF, BPP, num_warps)` the fused mixer's blocks. "gemms" times the MLP's
    plain block-diagonal GEMMs on both engines at `gemm_tokens`; `glu_sweep` the GLU kernels' tiles
    at the first of `dims` and `glu_tokens`; `conv_sweep` the blocks of the Toeplitz kernels and the
    short convolution's at these batch sizes (L = `conv_sweep_length`, by default the Toeplitz
    kernels' longest, 128; d = `fft_dim`; only `conv_kernels` where given); `act_sweep` the GLU
    activation kernels' tiles at the first of `dims` and `glu_tokens`. `fft_operands`: the FFT
    kernels' transform operands to time each plan with ("default", "tf32", "fp16")."""
    copy_bw, gemm_rate = measure_ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {copy_bw / 1e12:.2f} TB/s (read + write), bf16 GEMM {gemm_rate / 1e12:.0f} TFLOP/s")
    fft_rows, mixer_rows, glu_rows = [], [], []
    if "fftconv" in ops:
        fft_rows = bench_fftconv(lengths, fft_tokens, fft_dim, variants, copy_bw, toeplitz_max, fft_operands)
    if "mixer" in ops:
        mixer_rows = bench_mixer(mixer_lengths, fft_tokens, mixer_dims, mixer_variants, copy_bw)
    if "glu" in ops:
        glu_rows = bench_glu_mlp(dims, glu_tokens, gemm_rate, glu_compiled_reference)
    gemm_rows = bench_blockdiag_gemms(dims, gemm_tokens, gemm_rate) if "gemms" in ops else []
    sweep_rows = sweep_glu_tiles(dims[0], glu_tokens) if glu_sweep else []
    conv_length = conv_sweep_length or triton_toeplitz.MAX_LEN
    conv_rows = sweep_conv_blocks(fft_dim, conv_length, conv_sweep, kernels=conv_kernels) if conv_sweep else []
    act_rows = sweep_glu_act_tiles(dims[0], glu_tokens, copy_bw) if act_sweep else []
    _print_table(
        "Gated FFT long conv (steps 4-7 with residual), bf16, forward + backward",
        "size | algorithm | reference ms | Triton ms | speedup | fwd speedup | GB/s (floor bytes) | of copy BW | x floor",
        [_fmt_fft(r) for r in fft_rows],
    )  # fmt: skip
    _print_table(
        "Sequence mixer after in_linear (short conv, gates, both long convolutions), bf16 projection, fp32 u",
        "size | path | fwd ms | fwd + bwd ms | fwd x floor | fwd + bwd x floor | fwd + bwd speedup over per op",
        [_fmt_mixer(r) for r in mixer_rows],
    )  # fmt: skip
    _print_table(
        "Block-diagonal GLU MLP (d -> 2I GLU, I -> d + bias, 4 blocks), bf16, forward + backward",
        "size | reference ms | Triton ms | speedup | fwd speedup | TFLOP/s (useful) | of GEMM rate | compiled reference ms | its share of GEMM rate"
        " | reference + dropout ms | Triton + dropout ms | speedup with dropout | Triton, plain GEMMs on Triton too ms"
        " | GLU as GEMMs + activation kernel ms | fused GLU kernels + dropout ms | GLU as GEMMs + dropout, pre-activation recomputed ms",
        [_fmt_glu(r) for r in glu_rows],
    )  # fmt: skip
    _print_table(
        "Plain block-diagonal GEMMs of the GLU MLP (4 blocks), bf16: Triton kernel against cuBLAS batched on strided views",
        "size | GEMM | Triton ms | cuBLAS ms | Triton TFLOP/s | cuBLAS TFLOP/s | cuBLAS of GEMM rate | cuBLAS speedup",
        [_fmt_gemm(r) for r in gemm_rows],
    )  # fmt: skip
    candidates = {tuple(shape) for shape in triton_blockdiag._GLU_SHAPES}
    _print_table(
        f"GLU kernel tiles, d={dims[0]}, {glu_tokens} tokens, bf16, no dropout (fastest forward + backward first)",
        "BM x BN x BK | warps | stages | forward ms | backward ms | forward + backward ms | autotuning candidate",
        [_fmt_sweep(r, candidates) for r in sweep_rows],
    )  # fmt: skip
    _print_table(
        f"Convolution kernel blocks, d={fft_dim}, L={conv_length}, bf16 (fastest first per batch and kernel)",
        "batch | kernel | blocks | us | default blocks us | speedup over the default",
        [_fmt_conv_sweep(r) for r in conv_rows],
    )  # fmt: skip
    _print_table(
        f"GLU activation kernel tiles, d={dims[0]}, {glu_tokens} tokens, bf16, dropout 0.1 (fastest forward + backward first, the default last)",
        "tile | forward us | backward us | forward of copy BW | backward of copy BW",
        [_fmt_act_sweep(r) for r in act_rows],
    )  # fmt: skip


def _print_table(title: str, columns: str, lines: list[str]) -> None:
    """A Markdown table under its title; nothing when there are no rows."""
    if lines:
        print(f"\n{title}\n| {columns} |\n|{'---|' * (columns.count('|') + 1)}")
        print("\n".join(lines))

