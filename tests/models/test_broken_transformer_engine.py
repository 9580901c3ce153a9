"""A Transformer Engine that is installed but does not import (built for another torch or CUDA, a
missing library) must not pass for a working one: ``spec=auto`` falls back to the local spec with a
warning naming the import error, ``spec=te`` is refused with it.

The broken install: a ``transformer_engine`` package (with its metadata) first on the path of a fresh
interpreter on a (pretended) GPU node, whose import fails with ``ModuleNotFoundError`` (TE's core
library or its torch extension missing). megatron-core 0.16.1 then imports without it
(``HAVE_TE = False`` in ``gpt_layer_specs``, ``extensions.transformer_engine``,
``tensor_parallel.random``) and its TE spec fails with ``NameError: name 'TENorm' is not defined``.
(Any other ``ImportError`` of ``transformer_engine``, or a package that imports while
``transformer_engine.pytorch`` does not, ends megatron-core's own import, before the project runs.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# TE's torch extension (the transformer-engine-torch package) missing or built for another torch
ERROR = "No module named 'transformer_engine_torch'"

PACKAGE = {
    "transformer_engine-2.9.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: transformer-engine\nVersion: 2.9.0\n",
    "transformer_engine/__init__.py": f"raise ModuleNotFoundError({ERROR!r})\n",
}

PROBE = """
import json, warnings
import torch
from megatron.core.transformer import TransformerConfig
from megatron_opd.models import qwen3
from megatron_opd.platform.distributed import DistEnv, ParallelSizes, init_distributed, init_model_parallel

init_distributed(DistEnv(0, 1, 0, "127.0.0.1", 0, "single"))
init_model_parallel(ParallelSizes())
config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                           qk_layernorm=True, use_cpu_initialization=True)
torch.cuda.is_available = lambda: True  # a GPU node
out = {"problem": qwen3.transformer_engine_problem()}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out["auto"] = qwen3.resolve_spec_name("auto")
    block = qwen3.layer_block_spec(config, "auto")
out["warnings"] = [str(w.message) for w in caught if "spec=auto" in str(w.message)]
out["norm"] = block.layer_norm.__name__
try:
    qwen3.resolve_spec_name("te")
except qwen3.ModelConfigError as e:
    out["te"] = str(e)
print(json.dumps(out))
"""


def test_broken_install_falls_back_to_the_local_spec(tmp_path: Path) -> None:
    for name, text in PACKAGE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["problem"] == f"Transformer Engine is installed but does not import (ModuleNotFoundError: {ERROR})"
    assert out["auto"] == "local" and out["norm"] == "RMSNorm"
    assert set(out["warnings"]) == {f"spec=auto: {out['problem']}; building the local spec (SDPA attention) instead."}
    assert out["te"].startswith(f"spec='te' needs a working Transformer Engine: {out['problem']}. Fix:")
