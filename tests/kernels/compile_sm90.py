"""Compile the Triton kernels for Hopper (sm_90) without a GPU and report what ptxas made of them.

Run as a script with ``TRITON_INTERPRET=0`` (the kernel tests set it to 1): prints one JSON object per kernel with
its register count, local (spill) bytes and the global load/store widths in its PTX. Integer arguments are
specialized as the JIT does at launch for realistic shapes (16-byte aligned pointers, strides and V divisible by 16).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megatron_opd.kernels import triton_backend as tb

DIV16 = {"stride_z", "stride_g", "stride_gz", "stride_ids", "V"}
COMMON = {"logits_ptr": "*bf16", "stride_z": "i64"}
KERNELS = {
    "row_stats": (
        tb._row_stats_kernel,
        COMMON
        | {
            "labels_ptr": "*i64",
            "ids_ptr": "*i64",
            "stride_ids": "i64",
            "stats_ptr": "*fp32",
            "ids_x_ptr": "*fp32",
            "gmax_ptr": "*fp32",
            "stride_g": "i64",
            "V": "i32",
            "K": "i32",
            "n_groups": "i32",
            "inv_temp": "fp32",
        },
        {"BLOCK_V": tb.BLOCK_V, "BLOCK_K": 64, "GROUP": 64, "HAS_IDS": True, "WRITE_GROUP_MAX": True},
    ),
    "topk_candidates": (
        tb._topk_candidates_kernel,
        COMMON
        | {
            "groups_ptr": "*i64",
            "out_x_ptr": "*fp32",
            "out_col_ptr": "*i64",
            "V": "i32",
            "k": "i32",
            "inv_temp": "fp32",
        },
        {"K_POW": 64, "GROUP": 64},
    ),
    "grad": (
        tb._grad_kernel,
        COMMON
        | {
            "grad_ptr": "*bf16",
            "stride_gz": "i64",
            "labels_ptr": "*i64",
            "ids_ptr": "*i64",
            "stride_ids": "i64",
            "row_vals_ptr": "*fp32",
            "g_ids_ptr": "*fp32",
            "V": "i32",
            "K": "i32",
            "inv_temp": "fp32",
        },
        {"BLOCK_V": tb.BLOCK_V, "BLOCK_K": 64, "HAS_IDS": True},
    ),
}


def compile_one(fn, signature: dict[str, str], constexprs: dict) -> dict:
    sig = signature | dict.fromkeys(constexprs, "constexpr")
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, ty) in enumerate(sig.items())
        if ty.startswith("*") or name in DIV16
    }
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": tb.NUM_WARPS})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    ptx = kernel.asm["ptx"]
    return {
        "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
        "local_bytes": int(re.search(r"LOCAL:(\d+)", usage).group(1)),
        "loads": sorted(set(re.findall(r"ld\.global[.\w]*", ptx))),
        "stores": sorted(set(re.findall(r"st\.global[.\w]*", ptx))),
    }


# variants: the same kernels on fp32 logits without ids / top-k (other constexpr branches)
KERNELS["row_stats_fp32_plain"] = (
    tb._row_stats_kernel,
    KERNELS["row_stats"][1] | {"logits_ptr": "*fp32"},
    KERNELS["row_stats"][2] | {"BLOCK_K": 1, "GROUP": 1, "HAS_IDS": False, "WRITE_GROUP_MAX": False},
)
KERNELS["grad_fp32_noids"] = (
    tb._grad_kernel,
    KERNELS["grad"][1] | {"logits_ptr": "*fp32", "grad_ptr": "*fp32"},
    KERNELS["grad"][2] | {"BLOCK_K": 1, "HAS_IDS": False},
)

if __name__ == "__main__":
    name = sys.argv[1]
    fn, signature, constexprs = KERNELS[name]
    print(json.dumps(compile_one(fn, signature, constexprs)))
