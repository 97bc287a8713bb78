"""What a Triton kernel costs a GPU in registers, spills and shared memory, and the register-layout
passes its loops take, from a compile for a CUDA target on any machine (Triton's bundled ptxas and
cuobjdump; no GPU, no driver).

The interpreter that runs the kernels in the CPU tests does not compile them: this is how a
machine without a GPU checks that they compile for one, and whether a block choice fits the
register file (`kernels.mixer.triton_mixer.compile_report` uses it, and a test runs that).
Needs the kernels compiled, not interpreted (TRITON_INTERPRET unset).
"""

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _compile(kernel, constexprs, dtypes, num_warps, num_stages, arch, unit_args, aligned_args):
    """`kernel` compiled for sm_`arch` (see `resources` for the arguments); `aligned_args`:
    pointer and integer arguments compiled as multiples of 16, as Triton specializes a launch
    whose tensors are 16-byte aligned and whose sizes divide by 16 (which lets it vectorize)."""
    signature, values, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        arg = kernel.arg_names[index]
        if param.is_constexpr or arg in unit_args:
            signature[arg] = "constexpr"
            values[(index,)] = constexprs[arg] if param.is_constexpr else 1
        else:
            signature[arg] = "*" + dtypes.get(arg, "fp32") if arg.endswith("_ptr") else dtypes.get(arg, "i32")
            if arg in aligned_args:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=values, attrs=attrs),
        target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages},
    )  # fmt: skip


def resources(
    kernel, constexprs: dict, dtypes: dict[str, str], num_warps: int, num_stages: int = 3, arch: int = 90,
    unit_args: tuple[str, ...] = (), aligned_args: tuple[str, ...] = (),
) -> dict[str, int]:
    """{"registers", "spill_bytes" (the stack frame a thread spills registers to), "shared_bytes"} of
    `kernel` (a `triton.jit` function) compiled for sm_`arch` with the values `constexprs` (every
    constexpr parameter), pointer arguments of the element types `dtypes` by argument name ("bf16",
    "fp32", ...; fp32 when not named) and the other arguments of the types `dtypes` names (i32 when
    not named). `unit_args`: integer arguments that are 1 at launch (unit strides), which Triton
    compiles as constants; left as variables, their address arithmetic takes registers the
    launched kernel does not spend. `aligned_args`: see `_compile`."""
    compiled = _compile(kernel, constexprs, dtypes, num_warps, num_stages, arch, unit_args, aligned_args)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    return {"registers": registers, "spill_bytes": stack, "shared_bytes": compiled.metadata.shared}


def loop_layout_conversions(
    kernel, constexprs: dict, dtypes: dict[str, str], num_warps: int, num_stages: int = 3, arch: int = 90,
    unit_args: tuple[str, ...] = (), aligned_args: tuple[str, ...] = (),
) -> list[list[str]]:
    """Per loop of `kernel` (outermost `scf.for`s, in order), the register-layout conversions the
    compiler left in its body, each as the converted tensor's type ("16x32xf32"): each a pass
    through shared memory with barriers, every iteration. Arguments as `resources`'."""
    ttgir = _compile(kernel, constexprs, dtypes, num_warps, num_stages, arch, unit_args, aligned_args).asm["ttgir"]
    loops, indent = [], None  # the indentation of the open loop's line; its region closes there
    for line in ttgir.splitlines():
        depth = len(line) - len(line.lstrip())
        if indent is None:
            if "scf.for" in line:
                loops.append([])
                indent = depth
        elif depth == indent and line.lstrip().startswith("}"):
            indent = None
        elif "ttg.convert_layout" in line:
            loops[-1].append(re.search(r": tensor<([^,>]+)", line).group(1))
    return loops


def loop_memory_order(
    kernel, constexprs: dict, dtypes: dict[str, str], num_warps: int, num_stages: int = 3, arch: int = 90,
    unit_args: tuple[str, ...] = (), aligned_args: tuple[str, ...] = (),
) -> list[str]:
    """Per loop of `kernel`'s sm_`arch` code (each loop header in order; an outer loop's string
    includes its inner loops'), its global loads, barriers and global stores in program order, as
    a string of "L", "|" and "S": whether the loads an iteration waits for are issued before its
    barriers (a barrier that follows a load of the tile it exchanges waits for memory) or between
    them. Loads that Triton's pipeliner turned into asynchronous copies (`cp.async`) are not
    counted. Arguments as `resources`'."""
    ptx = _compile(kernel, constexprs, dtypes, num_warps, num_stages, arch, unit_args, aligned_args).asm["ptx"]
    lines = ptx.splitlines()
    orders = []
    for start, line in enumerate(lines):
        if "Loop Header" not in line:
            continue
        label = line.split(":")[0].strip()
        events = []
        for body in lines[start + 1 :]:
            if re.search(rf"\bbra(\.uni)?\s+{re.escape(label)};", body):
                break
            if "ld.global" in body:
                events.append("L")
            elif "bar.sync" in body:
                events.append("|")
            elif "st.global" in body:
                events.append("S")
        orders.append("".join(events))
    return orders
