"""The Triton scan's kernels compiled for a GPU that need not be here (default sm_90, H100/H200): what each costs
before it runs. Per kernel and mode: registers per thread (with one warp per program they bound the warps an SM
holds: 65536 / (32 x registers)), local-memory stack, the layout conversions Triton inserted (`convert_layout`:
data moved between lanes through shared memory, with barriers) in all and inside the token loop, and the SASS
instruction mix (MUFU: exp/log/sigmoid, LDG/STG: global memory, SHFL: lane shuffles, STS/LDS/BAR: shared memory).

    python3 benchmarks/scan_static.py [--arch 90] [--dtype bf16]     (any machine with triton; no GPU needed)

The kernels are compiled as `triton_scan.py` launches them on (batch, dim, L) tensors: token strides 1 (Triton
specializes an integer argument equal to 1), pointers and sizes divisible by 16.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nnunet_segmamba.mamba import triton_scan
from nnunet_segmamba.mamba.triton_scan_backward import _backward_kernel
from nnunet_segmamba.mamba.triton_scan_forward import _forward_kernel

SIZES = ("dim", "groups", "per_group", "length", "d_state", "n_blocks", "seg_blocks", "channel_stride",
         "state_stride", "n_chunks")
DIVISIBLE = ("dim", "per_group", "length", "channel_stride", "state_stride")
UNIT_STRIDES = ("token_stride", "bc_token_stride")
INPUT_DTYPE = ("u", "delta", "B", "C", "z", "out", "dout", "du", "ddelta", "dz")
"""Pointers in the inputs' dtype; the others (A, D, bias, states, partial sums) are fp32."""
FUNCTION_BODY_INDENT = 4
REGISTERS_PER_SM, MAX_PROGRAMS_PER_SM, MAX_WARPS_PER_SM = 65536, 32, 64
TOOLS = Path(triton.backends.nvidia.__path__[0]) / "bin"
GROUPS = {"MUFU": ("MUFU",), "LDG": ("LDG",), "STG": ("STG",), "RED": ("RED", "ATOM"), "SHFL": ("SHFL",),
          "STS+LDS": ("STS", "LDS"), "BAR": ("BAR",), "LDL+STL": ("LDL", "STL")}


def compile_for(kernel, constants: dict, arch: int, dtype: str, max_registers: int | None = None,
                num_warps: int | None = None):
    """`kernel` compiled for sm_`arch` with `constants` (its constexprs), as triton_scan launches it (with
    `max_registers`: Triton's maxnreg; `num_warps`: default triton_scan's)."""
    signature, attrs, constexprs = {}, {}, dict(constants)
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in UNIT_STRIDES:
            signature[name], constexprs[name] = "constexpr", 1
        elif name in SIZES:
            signature[name] = "i32"
            if name in DIVISIBLE:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "*" + (dtype if name in INPUT_DTYPE else "fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps or triton_scan.NUM_WARPS, **({"maxnreg": max_registers} if max_registers else {})}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def conversions(ttgir: str) -> tuple[int, int]:
    """convert_layout ops of a TTGIR module in all and inside regions (the token loops, and branches in them):
    indented deeper than the function body."""
    lines = [line for line in ttgir.splitlines() if "ttg.convert_layout" in line]
    return len(lines), sum(len(line) - len(line.lstrip()) > FUNCTION_BODY_INDENT for line in lines)


def resident_warps(registers: int, warps: int = 1) -> int:
    """Warps an SM of sm_90 holds in programs of `warps` warps at `registers` per thread: 64 K registers, allocated
    8 per thread at a time, at most 32 programs (thread blocks) and 64 warps per SM."""
    programs = min(MAX_PROGRAMS_PER_SM, REGISTERS_PER_SM // (32 * warps * (-(-registers // 8) * 8)))
    return min(MAX_WARPS_PER_SM, programs * warps)


def describe(compiled) -> dict:
    """Registers, stack, conversions and SASS instruction groups of a compiled kernel."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([TOOLS / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
        usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
    opcodes = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M))
    registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    total, in_loops = conversions(compiled.asm["ttgir"])
    row = {"regs": registers, "warps/SM": resident_warps(registers, compiled.metadata.num_warps), "stack": stack,
           "convert": total, "in-loop": in_loops, "SASS": sum(opcodes.values())}
    for group, prefixes in GROUPS.items():
        row[group] = sum(count for opcode, count in opcodes.items() if opcode.startswith(prefixes))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--max-registers", type=int, nargs=2, metavar=("FORWARD", "BACKWARD"), default=(0, 0),
                        help="register caps (Triton's maxnreg) of the forward's and backward's final pass (default "
                             "0 0: none, as triton_scan launches them; caps were measured slower, BENCHMARKS.md)")
    args = parser.parse_args()
    shared = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, TILE=triton_scan.TILE,
                  TILES=triton_scan.TILES, BLOCK_D=triton_scan.BLOCK_D, BLOCK_N=16)
    kernels = (("forward", _forward_kernel, {"STARTS": True}, args.max_registers[0]),  # a training step's
               ("backward", _backward_kernel, {}, args.max_registers[1]))
    rows = {f"{name} {mode}": describe(compile_for(kernel, {**shared, **own, "SUMMARY": mode == "summary"},
                                                    args.arch, args.dtype, cap if mode == "final" else None))
            for name, kernel, own, cap in kernels for mode in ("summary", "final")}
    columns = list(next(iter(rows.values())))
    print(f"Triton scan kernels for sm_{args.arch}, {args.dtype} inputs, TILE {triton_scan.TILE}, BLOCK_D "
          f"{triton_scan.BLOCK_D}, d_state 16, {triton_scan.NUM_WARPS} warp(s) per program, register caps "
          f"{' / '.join(str(cap or 'none') for cap in args.max_registers)} (static counts)")
    print(f"{'kernel':<18}" + "".join(f"{column:>10}" for column in columns))
    for name, row in rows.items():
        print(f"{name:<18}" + "".join(f"{row[column]:>10}" for column in columns))


if __name__ == "__main__":
    main()
