"""Vocab-parallel objectives at TP = 2 and TP = 4 (gloo, one process per rank) equal the float64 row
formulas, values and gradients; global counts and metrics all-reduced over a DP group give the global
aggregate."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.platform.spawn import spawn_world
from tests.objectives import objective_cases as oc
from tests.objectives.test_aggregation import _batch, _plain_global
from tests.objectives.test_objectives import CONFIGS, _check, _expected
from tests.tolerance import ulps

TP_CONFIGS = [
    "opd",
    "opd_special_mask",
    "opd_temperature",
    "exopd",
    "exopd_ppo",
    "opd_rs_sequence",
    "aopd",
    "aopd_tau_half_beta_half",
    "aopd_accuracy",
    "aopd_tail_ppo",
    "lsm_teacher",
    "lsm_student",
    "lsm_sampled",
    "gkd_jsd",
    "gkd_tail",
    "sft",
]


def _jobs(v: int, n: int) -> list[tuple[dict, oc.Case, dict]]:
    jobs = []
    for i, config_id in enumerate(TP_CONFIGS):
        cfg_kwargs, build, case_kwargs = CONFIGS[config_id]
        case = oc.make_case(n, v, seed=100 + i, neg_inf=True, masked_rows=2, **case_kwargs)
        cfg = dict(cfg_kwargs)
        if cfg.get("special_token_mask"):
            cfg["masked_token_ids"] = case.masked_ids
        jobs.append((cfg, case, build))
    # K = V across the ranks, and a batch whose rows are all masked
    jobs.append((dict(name="lsm", top_k=v), oc.make_case(n, v, 7, neg_inf=True), {}))
    jobs.append((dict(name="aopd", top_k=3), oc.make_case(n, v, 8, all_masked=True), {}))
    return jobs


@pytest.mark.parametrize("tp,v", [(2, 38), (4, 1000)])
def test_vocab_parallel_equals_plain(tp: int, v: int) -> None:
    jobs = _jobs(v, 9)
    loss, mask, seq = _batch(5, seqs=9)
    results = spawn_world(oc.rank_main, tp, jobs, (loss, mask, seq, "seq-mean-token-mean"))
    for j, (cfg_kwargs, case, build) in enumerate(jobs):
        want = _expected(ObjectiveConfig(**cfg_kwargs), case, build)
        for rank_result in results:
            loss_value, grad, metrics = rank_result[0][j]
            _check((loss_value, torch.tensor(grad, dtype=torch.float64), metrics), want, oc.logit_scale(case))
    # DP: per-rank losses add up to the global aggregate; metrics reduce to the global mean.
    total = sum(r[1][0] for r in results)
    want_total = _plain_global(loss, mask, seq, "seq-mean-token-mean")
    # float64 sums of the same terms in other groupings: 64 ulps of the largest |term| (they are O(1))
    assert abs(total - want_total) <= ulps(torch.float64, loss[mask > 0].abs().max(), 64)
    live = [float(x) for x, m in zip(loss, mask) if m]
    assert all(math.isclose(r[1][1]["loss/mean"], sum(live) / len(live), rel_tol=1e-12) for r in results)
    # every rank holds the same loss
    assert len({round(r[0][0][0], 10) for r in results}) == 1
    assert results[0][0][0][1] == results[-1][0][0][1]
