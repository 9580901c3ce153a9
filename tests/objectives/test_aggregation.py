"""Aggregation over the global batch, rollout correction, metric reduction and the special-token set,
against plain float64 computations; micro-batch losses add up to the global loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_opd.objectives import aggregation as agg
from megatron_opd.objectives import rollout_correction as rc
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.inputs import TokenBatch
from megatron_opd.objectives.lsm import special_token_ids
from megatron_opd.objectives.metrics import merge_metrics, reduce_metrics
from megatron_opd.objectives.registry import build_objective
from tests.objectives import objective_cases as oc
from tests.tolerance import ulps


def _batch(seed: int, seqs: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token losses, masks and sequence ids of ``seqs`` sequences of random length (one fully masked)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (seqs,), generator=g).tolist()
    seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
    mask = (torch.rand(seq.numel(), generator=g) > 0.3).double()
    mask[seq == 2] = 0
    loss = torch.randn(seq.numel(), generator=g, dtype=torch.float64)
    loss[mask == 0] = math.nan  # never read
    return loss, mask, seq


def _plain_global(loss: torch.Tensor, mask: torch.Tensor, seq: torch.Tensor, mode: str) -> float:
    if mode == "token-mean":
        return sum(float(loss[i]) for i in range(len(loss)) if mask[i]) / float(mask.sum())
    means = []
    for s in seq.unique().tolist():
        idx = [i for i in range(len(loss)) if seq[i] == s and mask[i]]
        if idx:
            means.append(sum(float(loss[i]) for i in idx) / len(idx))
    return sum(means) / len(means)


@pytest.mark.parametrize("mode", agg.AGG_MODES)
@pytest.mark.parametrize("seed", range(4))
def test_micro_batch_losses_add_up_to_global(mode: str, seed: int) -> None:
    loss, mask, seq = _batch(seed)
    want = _plain_global(loss, mask, seq, mode)
    # Split into micro-batches on sequence boundaries (and "DP ranks" = more micro-batches).
    bounds = [0, *sorted({int((seq < s).sum()) for s in (2, 3, 5)}), len(seq)]
    parts = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    counts = agg.global_counts([agg.local_counts(mask[p], seq[p]) for p in parts])
    assert counts.tokens == float(mask.sum())
    assert counts.sequences == len({int(s) for s, m in zip(seq, mask) if m})
    total = sum(
        float(agg.aggregate(loss[p], agg.token_weights(mask[p], seq[p], counts, mode, torch.float64))) for p in parts
    )
    # float64 sums of the same terms in other groupings: 64 ulps of the largest |term| (they are O(1))
    assert abs(total - want) <= ulps(torch.float64, loss[mask > 0].abs().max(), 64)


def test_token_weights_unknown_mode() -> None:
    _, mask, seq = _batch(0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        agg.token_weights(mask, seq, agg.GlobalCounts(1.0, 1.0), "sum")


@pytest.mark.parametrize("name,mode", [("aopd", "token-mean"), ("lsm", "seq-mean-token-mean"), ("exopd", "token-mean")])
def test_objective_micro_batches_equal_one_batch(name: str, mode: str) -> None:
    """The production objective over two micro-batches (weights from global counts) gives the loss and
    gradient of one micro-batch holding everything."""
    cfg = ObjectiveConfig(name=name, top_k=4, loss_agg_mode=mode)
    case = oc.make_case(12, 33, 11, masked_rows=2)
    objective = build_objective(cfg, teacher_names=oc.TEACHERS)
    support = oc.support_of(cfg, case)
    lt = case.teacher_lp.gather(1, case.labels[:, None]).squeeze(1)
    logits = case.zs.float().requires_grad_(True)

    def batch(rows: slice, counts: agg.GlobalCounts) -> TokenBatch:
        m = objective.loss_mask(case.response_mask[rows], case.labels[rows])
        return TokenBatch(
            logits=logits[rows],
            labels=case.labels[rows],
            response_mask=case.response_mask[rows],
            token_weight=agg.token_weights(m, case.seq_index[rows], counts, mode),
            seq_index=case.seq_index[rows],
            teacher_logp=lt[rows].float(),
            ref_logp=case.ref_logp[rows].float(),
            rollout_logp=case.rollout_logp[rows].float(),
            support_ids=support[0][rows],
            support_teacher_logp=support[1][rows].float(),
            teacher_index=case.teacher_index[rows],
        )

    def run(parts: list[slice]) -> tuple[float, torch.Tensor, dict]:
        masks = [objective.loss_mask(case.response_mask[p], case.labels[p]) for p in parts]
        counts = agg.global_counts([agg.local_counts(m, case.seq_index[p]) for m, p in zip(masks, parts)])
        outs = [objective(batch(p, counts)) for p in parts]
        total = sum(o.loss for o in outs)
        (grad,) = torch.autograd.grad(total, logits)
        return float(total.detach()), grad, reduce_metrics(merge_metrics(o.metrics for o in outs))

    one = run([slice(0, 12)])
    two = run([slice(0, 6), slice(6, 12)])  # seq_index = row // 3: sequence boundaries
    scale = oc.logit_scale(case)  # the same fp32 terms, summed in other groupings
    assert abs(one[0] - two[0]) <= oc.fp32_tol(scale, one[0])
    torch.testing.assert_close(one[1], two[1], atol=oc.fp32_tol(scale, one[1].abs().max().item()), rtol=0)
    assert one[2].keys() == two[2].keys()
    for k in one[2]:
        assert abs(one[2][k] - two[2][k]) <= oc.fp32_tol(scale, one[2][k]), k


def test_is_weights_rejection_and_mismatch_metrics() -> None:
    g = torch.Generator().manual_seed(3)
    old = torch.randn(40, generator=g, dtype=torch.float64) - 2
    roll = old + torch.randn(40, generator=g, dtype=torch.float64)
    mask = (torch.rand(40, generator=g) > 0.2).double()
    seq = torch.arange(40) // 5
    w = rc.token_is_weights(old, roll, 1.5)
    want = [min(math.exp(float(o - r)), 1.5) for o, r in zip(old, roll)]
    assert torch.allclose(w, torch.tensor(want, dtype=torch.float64))
    keep = rc.rejection_keep(old, roll, mask, seq, "token", 0.5, 2.0)
    assert keep.tolist() == [0.5 <= math.exp(float(o - r)) <= 2.0 for o, r in zip(old, roll)]
    keep = rc.rejection_keep(old, roll, mask, seq, "sequence", 0.5, 2.0)
    for s in range(8):
        idx = [i for i in range(40) if seq[i] == s]
        ratio = math.exp(sum(float(old[i] - roll[i]) for i in idx if mask[i]))
        assert all(bool(keep[i]) == (0.5 <= ratio <= 2.0) for i in idx)
    metrics = reduce_metrics(rc.mismatch_metrics(old, roll, mask, 1.5))
    live = [i for i in range(40) if mask[i]]
    tol = ulps(torch.float64, (roll - old).abs().max(), 64)  # float64 means of the same terms, other orders
    assert abs(metrics["rollout/mismatch_kl"] - sum(float(roll[i] - old[i]) for i in live) / len(live)) <= tol
    clipped = sum(math.exp(float(old[i] - roll[i])) > 1.5 for i in live) / len(live)
    assert abs(metrics["rollout/is_clip_frac"] - clipped) <= tol


def test_merge_and_reduce_metrics() -> None:
    one = {"a": (torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))}
    two = {
        "a": (torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)),
        "b": (torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)),
    }
    assert reduce_metrics(merge_metrics([one, two])) == {"a": 1.0}


def test_special_token_ids_keep_eos() -> None:
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "<think>", "<tool_call>"]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<|endoftext|>"))
    core.add_special_tokens([AddedToken(t, special=True) for t in vocab[:3]])
    core.add_tokens([AddedToken(t, special=False) for t in vocab[5:]])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert special_token_ids(tok) == [0, 1, 5, 6]
    assert special_token_ids(tok, keep_ids=[0, 2]) == [1, 5, 6]
    objective = build_objective(ObjectiveConfig(name="lsm", special_token_mask=True), tokenizer=tok)
    mask = objective.loss_mask(torch.ones(7), torch.arange(7))
    assert mask.tolist() == [0, 0, 1, 1, 1, 0, 0]
