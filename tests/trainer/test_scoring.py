"""Scoring by worker groups equals a float64 transformers computation: a dense model at TP=2, and
an MoE model at EP=2 x DP=2 whose DP ranks hold different numbers of samples (the micro-batch
alignment across expert-parallel ranks), with packed (THD) and right-padded micro-batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world
from megatron_opd.scoring.contract import ScoreRequest
from megatron_opd.trainer.batch import split_for_data_parallel
from tests.tolerance import forward_atol
from tests.trainer.conftest import VOCAB, hf_scores, make_samples, worker_spec

TOP_K = 5


def _score(spec, samples, top_k):
    from megatron_opd.trainer.worker import ModelWorker

    rank = torch.distributed.get_rank()
    worker = ModelWorker(spec, rank, torch.distributed.get_world_size())
    info = worker.setup("127.0.0.1", 0)
    parts = split_for_data_parallel(samples, info.dp_size)
    return info, worker.score(parts[info.dp_rank], ScoreRequest(top_k=top_k))


@pytest.mark.slow
@pytest.mark.parametrize(
    "moe, tp, ep, dp, packed",
    [(False, 2, 1, 1, True), (True, 1, 2, 2, True), (True, 1, 2, 2, False)],
    ids=["dense_tp2_packed", "moe_ep2_dp2_packed", "moe_ep2_dp2_padded"],
)
def test_scores_match_transformers_float64(tmp_path, moe: bool, tp: int, ep: int, dp: int, packed: bool) -> None:
    path = str(tmp_path / "m")
    save_tiny_model(path, tiny_config(moe=moe, vocab_size=VOCAB), seed=5)
    samples = make_samples(7, seed=3)  # 7 samples: DP ranks get 4 and 3, of different lengths
    ref = hf_scores(path, samples, TOP_K)
    spec = dataclasses.replace(worker_spec(path, tp=tp, ep=ep, dp=dp), sequence_packing=packed)
    results = spawn_world(_score, tp * dp, spec, samples, TOP_K)
    got: dict[int, dict[str, torch.Tensor]] = {}
    for info, scores in results:
        if info.is_output_rank:
            got.update(scores)
        else:
            assert scores is None
    assert sorted(got) == [s.uid for s in samples]
    for s in samples:
        g, r = got[s.uid], ref[s.uid]
        # Megatron against transformers, both fp32 forwards on the same weights (log-softmax in float64 on the
        # transformers side): a forward pass's rounding at the scale of the log-probs (this model's logits are far
        # smaller than log V)
        atol = forward_atol(torch.cat([r.logp, r.topk_logp.flatten()]))
        torch.testing.assert_close(g.logp.double(), r.logp, atol=atol, rtol=0)
        torch.testing.assert_close(g.topk_logp.double(), r.topk_logp, atol=atol, rtol=0)
        assert torch.equal(g.topk_ids, r.topk_ids)
