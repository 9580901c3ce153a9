"""Megatron-Core Qwen3 / Qwen3-MoE models give the logits of ``transformers`` on the same weights,
at TP=1, TP=2, PP=2, EP=2, TP=2xEP=2 and TP=2xPP=2 (gloo, multi-process), and TP=2 gradients
equal TP=1 gradients."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world
from tests.tolerance import FORWARD_ULPS, forward_atol, ulps

# name -> (config overrides, moe, TP, PP, EP)
CASES: dict[str, tuple[dict, bool, int, int, int]] = {
    "dense_tp1_gqa2": (dict(num_attention_heads=4, num_key_value_heads=2), False, 1, 1, 1),
    "dense_tp1_mqa_tied": (
        dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
        False,
        1,
        1,
        1,
    ),
    "dense_tp2_gqa4_tied": (
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
        False,
        2,
        1,
        1,
    ),
    "dense_tp2_mha": (dict(num_attention_heads=4, num_key_value_heads=4), False, 2, 1, 1),
    "dense_pp2": (dict(num_hidden_layers=4), False, 1, 2, 1),
    "dense_pp2_tied": (dict(num_hidden_layers=4, tie_word_embeddings=True), False, 1, 2, 1),
    "moe_ep2": (dict(), True, 1, 1, 2),
    "moe_tp2_tied": (dict(tie_word_embeddings=True), True, 2, 1, 1),
    "moe_tp2_ep2": (dict(num_experts=8), True, 2, 1, 2),
    "dense_tp2_pp2": (dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2), False, 2, 2, 1),
    "moe_sparse_step_norm_off": (
        dict(num_hidden_layers=4, decoder_sparse_step=2, intermediate_size=80, norm_topk_prob=False),
        True,
        1,
        1,
        2,
    ),
}
SEQ, BATCH = 12, 2


def _world_of(name: str) -> int:
    _, _, tp, pp, ep = CASES[name]
    # Expert ranks live inside TP x DP: the world is the smallest TP x PP x DP with EP x ETP | TP x DP
    # (expert tensor parallel size defaults to TP).
    dp = 1
    while (tp * dp) % (ep * tp):
        dp += 1
    return tp * pp * dp


def _run_cases(model_dirs: dict[str, str], ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    from megatron.core import parallel_state as ps

    from megatron_opd.convert.hf_io import load_hf_config
    from megatron_opd.convert.load import load_hf_weights
    from megatron_opd.models.forward import forward_logits
    from megatron_opd.models.qwen3 import build_gpt_model
    from megatron_opd.platform.distributed import ParallelSizes, init_model_parallel

    out: dict[str, torch.Tensor | None] = {}
    for name, path in model_dirs.items():
        _, _, tp, pp, ep = CASES[name]
        init_model_parallel(ParallelSizes(tp, pp, ep))
        model = build_gpt_model(load_hf_config(path))
        load_hf_weights(model, path)
        model.eval()
        logits = forward_logits(model, ids)
        if logits is None:
            out[name] = None
            continue
        shards = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        out[name] = torch.cat(shards, dim=-1)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    root = tmp_path_factory.mktemp("models")
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    refs, dirs_by_world = {}, {}
    for i, (name, (overrides, moe, *_)) in enumerate(CASES.items()):
        path = root / name
        hf = save_tiny_model(path, tiny_config(moe=moe, **overrides), seed=i)
        with torch.no_grad():
            refs[name] = hf(ids).logits
        dirs_by_world.setdefault(_world_of(name), {})[name] = str(path)
    got: dict[str, torch.Tensor] = {}
    for world, dirs in sorted(dirs_by_world.items()):
        per_rank = spawn_world(_run_cases, world, dirs, ids)
        for name in dirs:
            outs = [r[name] for r in per_rank if r[name] is not None]
            assert outs, f"{name}: no rank returned logits"
            for o in outs[1:]:  # every last-stage rank agrees (DP replicas' tokens meet in other expert batches)
                torch.testing.assert_close(o, outs[0], rtol=0, atol=forward_atol(outs[0]))
            got[name] = outs[0]
    return {n: (got[n], refs[n]) for n in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(results: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str) -> None:
    ours, ref = results[name]
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= forward_atol(ref), f"{name}: max |megatron - transformers| = {diff:.3e}"


def _grads(path: str, ids: torch.Tensor, tp: int, recompute: str | None = None) -> dict[str, torch.Tensor]:
    """Gradients of sum(log_softmax(logits)[labels]) w.r.t. all parameters, gathered to full HF
    layout via the conversion tables (so TP=1 and TP=2 compare tensor by tensor)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_opd.convert.hf_io import load_hf_config
    from megatron_opd.convert.load import load_hf_weights, param_mappings
    from megatron_opd.convert.mapping import AttentionShape, shards_to_hf
    from megatron_opd.models.forward import model_forward
    from megatron_opd.models.qwen3 import build_gpt_model
    from megatron_opd.platform.distributed import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes(tp, 1, 1))
    cfg = load_hf_config(path)
    model = build_gpt_model(cfg, recompute_granularity=recompute)
    load_hf_weights(model, path)
    logits = model_forward(model, {"input_ids": ids[:, :-1]})  # [b, s, V/tp]
    loss = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), ids[:, 1:].t().contiguous()).sum()
    loss.backward()
    group = ps.get_tensor_model_parallel_group()
    out = {}
    for name, p, mapping in param_mappings(model, cfg):
        g = p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
        if tp > 1 and ("q_layernorm" in name or "k_layernorm" in name):
            # Each TP rank holds different heads, so q/k-norm gradients are partial sums; megatron's
            # finalize_model_grads all-reduces them the same way.
            torch.distributed.all_reduce(g, group=group)
        shards = [torch.empty_like(g) for _ in range(tp)]
        torch.distributed.all_gather(shards, g.contiguous(), group=group)
        for hf_name, t in zip(mapping.hf, shards_to_hf(mapping.kind, shards, AttentionShape.of(cfg))):
            out[hf_name] = t
    return out


@pytest.fixture(scope="module")
def grads_tp1(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.Tensor, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("grads") / "m"
    save_tiny_model(path, tiny_config(num_attention_heads=4, num_key_value_heads=2), seed=3)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    (g1,) = spawn_world(_grads, 1, str(path), ids, 1)
    return str(path), ids, g1


@pytest.mark.slow
@pytest.mark.parametrize("recompute", [None, "full", "selective"])
def test_tp2_gradients_equal_tp1(grads_tp1: tuple, recompute: str | None) -> None:
    """TP=2 (with activation recomputation as the paper configs use it) against TP=1 without."""
    path, ids, g1 = grads_tp1
    g2 = spawn_world(_grads, 2, path, ids, 2, recompute)[0]
    assert g1.keys() == g2.keys()
    for name in g1:
        # a forward and a backward pass in another layout: 2 × FORWARD_ULPS of the largest |entry|
        atol = ulps(torch.float32, g1[name].abs().max(), 2 * FORWARD_ULPS)
        torch.testing.assert_close(g2[name], g1[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
