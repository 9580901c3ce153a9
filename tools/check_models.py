"""Build tiny random Qwen3 and Qwen3-MoE models, load them into Megatron-Core at several
layouts (TP=1, TP=2, EP=2) on CPU over gloo, and print the max logit difference to transformers."""

from __future__ import annotations

import sys
import tempfile

import torch

from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world


def _logits(path: str, ids: torch.Tensor, tp: int, ep: int) -> torch.Tensor | None:
    from megatron.core import parallel_state as ps

    from megatron_opd.convert.hf_io import load_hf_config
    from megatron_opd.convert.load import load_hf_weights
    from megatron_opd.models.forward import forward_logits
    from megatron_opd.models.qwen3 import build_gpt_model
    from megatron_opd.platform.distributed import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes(tp, 1, ep))
    model = build_gpt_model(load_hf_config(path))
    load_hf_weights(model, path)
    logits = forward_logits(model.eval(), ids)
    shards = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, -1)


def main() -> int:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for moe, tp, ep in [(False, 1, 1), (False, 2, 1), (True, 1, 2), (True, 2, 1)]:
            path = f"{tmp}/{'moe' if moe else 'dense'}"
            hf = save_tiny_model(path, tiny_config(moe=moe), seed=0)
            with torch.no_grad():
                ref = hf(ids).logits
            ours = spawn_world(_logits, max(tp, ep), path, ids, tp, ep)[0]
            diff = (ours - ref).abs().max().item()
            worst = max(worst, diff)
            print(f"{'Qwen3-MoE' if moe else 'Qwen3    '} TP={tp} EP={ep}: max |megatron - transformers| = {diff:.2e}")
    ok = worst <= 1e-4
    print("OK: Megatron-Core matches transformers" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
