"""Compile the Triton kernels for Hopper (sm_90) without a GPU and report what ptxas made of them.

Run as a script with ``TRITON_INTERPRET=0`` (the kernel tests set it to 1) and a variant name: prints one JSON object
per config of that kernel's autotune space with its register count, local (spill) bytes and the global load/store
widths in its PTX. Arguments are specialized as the JIT does at launch for realistic shapes (16-byte aligned pointers,
strides and V divisible by 16).
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
FORWARD = {
    "logits_ptr": "*bf16",
    "stride_z": "i64",
    "labels_ptr": "*i64",
    "ids_ptr": "*i64",
    "stride_ids": "i64",
    "stats_ptr": "*fp32",
    "ids_x_ptr": "*fp32",
    "gmax_ptr": "*bf16",
    "stride_g": "i64",
    "top_x_ptr": "*fp32",
    "top_col_ptr": "*i64",
    "N": "i32",
    "V": "i32",
    "K": "i32",
    "k": "i32",
    "n_groups": "i32",
    "inv_temp": "fp32",
}
GRAD = {
    "logits_ptr": "*bf16",
    "stride_z": "i64",
    "grad_ptr": "*bf16",
    "stride_gz": "i64",
    "labels_ptr": "*i64",
    "ids_ptr": "*i64",
    "stride_ids": "i64",
    "row_vals_ptr": "*fp32",
    "g_ids_ptr": "*fp32",
    "N": "i32",
    "V": "i32",
    "K": "i32",
    "inv_temp": "fp32",
}


def fp32(signature: dict[str, str]) -> dict[str, str]:
    """The same kernel on fp32 logits."""
    return signature | {name: "*fp32" for name in ("logits_ptr", "gmax_ptr", "grad_ptr") if name in signature}


NO_TOPK = {"K_POW": 0, "GROUP": 1, "SUB": 1, "NG_POW": 1, "KEY_BITS": 16}


def topk_constants(v: int, k: int, key_bits: int = 16) -> dict:
    sizes = tb.topk_sizes(v, k)
    return {name: sizes[name] for name in ("K_POW", "GROUP", "SUB", "NG_POW")} | {"KEY_BITS": key_bits}


# variant -> (kernel, signature, constexprs besides the config's); each is compiled for every config of CONFIGS
VARIANTS = {
    # sampled-token log-prob + entropy + a K = 64 support (the student's top-K objectives), bf16
    "forward_ids": (tb._forward_kernel, FORWARD, {"BLOCK_K": 64, "HAS_IDS": True} | NO_TOPK),
    # teacher scoring at TP = 1: label + top-32 in the same pass, bf16
    "forward_topk32": (tb._forward_kernel, FORWARD, {"BLOCK_K": 1, "HAS_IDS": False} | topk_constants(151936, 32)),
    # TP = 4 shard, top-64
    "forward_topk64_tp4": (tb._forward_kernel, FORWARD, {"BLOCK_K": 1, "HAS_IDS": False} | topk_constants(37984, 64)),
    # fp32 logits, no ids (the other dtype path)
    "forward_fp32": (tb._forward_kernel, fp32(FORWARD), {"BLOCK_K": 1, "HAS_IDS": False} | NO_TOPK),
    "grad_ids": (tb._grad_kernel, GRAD, {"BLOCK_K": 64}),
    "grad_fp32": (tb._grad_kernel, fp32(GRAD), {"BLOCK_K": 1}),
}


def compile_one(fn, signature: dict[str, str], constexprs: dict, num_warps: int) -> dict:
    sig = signature | dict.fromkeys(constexprs, "constexpr")
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, ty) in enumerate(sig.items())
        if ty.startswith("*") or name in DIV16
    }
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
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


if __name__ == "__main__":
    name = sys.argv[1]
    fn, signature, constexprs = VARIANTS[name]
    for config in tb.CONFIGS:
        if constexprs.get("K_POW") and (config.kwargs["BLOCK_V"] < constexprs["GROUP"] or config.kwargs["ROWS"] > 1):
            continue  # never launched (``triton_backend._prune``): top-k tiles hold whole groups, one row per program
        info = compile_one(fn.fn, signature, constexprs | config.kwargs, config.num_warps)
        print(
            json.dumps(
                {"block_v": config.kwargs["BLOCK_V"], "rows": config.kwargs["ROWS"], "num_warps": config.num_warps}
                | info
            ),
            flush=True,
        )
