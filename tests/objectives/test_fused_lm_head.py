"""Every objective on the fused LM head (``TokenBatch.with_hidden``: the rows the output layer reads and its
weight, no logits tensor) equals the same objective on the logits ``hidden @ Wᵀ`` (``with_logits``): loss,
gradients w.r.t. the hidden rows and the weight, and metrics, to fp32 tolerance."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.metrics import reduce_metrics
from megatron_opd.objectives.registry import build_objective
from tests.objectives import objective_cases as oc
from tests.objectives.test_objectives import CONFIGS, _with_masked_ids

N, V, H = 10, 130, 16


def _run(cfg: ObjectiveConfig, case: oc.Case, build: dict, hidden: torch.Tensor, weight: torch.Tensor, fused: bool):
    """Loss, d/d hidden, d/d weight and metrics of the production objective on either path."""
    objective = build_objective(cfg, teacher_names=oc.TEACHERS, temperature=case.temperature, **build)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    batch = oc.case_batch(cfg, case)
    batch = batch.with_hidden(h, w) if fused else batch.with_logits(h @ w.t())
    out = objective(batch)
    out.loss.backward()
    return float(out.loss.detach()), h.grad.double(), w.grad.double(), reduce_metrics(out.metrics)


@pytest.mark.parametrize("config_id", list(CONFIGS))
def test_fused_lm_head_equals_logits(config_id: str) -> None:
    cfg_kwargs, build, case_kwargs = CONFIGS[config_id]
    g = torch.Generator().manual_seed(sum(map(ord, config_id)))
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    case = oc.make_case(N, V, seed=7, **case_kwargs)
    case = dataclasses.replace(case, zs=(hidden @ weight.t()).double())  # the student's logits are the head's
    cfg = _with_masked_ids(ObjectiveConfig(**cfg_kwargs), case)
    loss, d_hidden, d_weight, metrics = _run(cfg, case, build, hidden, weight, fused=False)
    f_loss, f_hidden, f_weight, f_metrics = _run(cfg, case, build, hidden, weight, fused=True)
    scale = oc.logit_scale(case)
    assert abs(f_loss - loss) <= oc.fp32_tol(scale, loss), (f_loss, loss)
    # a gradient entry sums H (d hidden) or N (d weight) products of a logit gradient and an input: its rounding
    # is that of the sum of the products' magnitudes
    for got, want, bound in (
        (f_hidden, d_hidden, (oc.fp32_tol(scale, 1.0) * weight.abs().sum(0).max()).item()),
        (f_weight, d_weight, (oc.fp32_tol(scale, 1.0) * hidden.abs().sum(0).max()).item()),
    ):
        torch.testing.assert_close(got, want, atol=bound * max(1.0, want.abs().max().item()), rtol=0)
    assert sorted(f_metrics) == sorted(metrics)
    for name, value in metrics.items():
        assert abs(f_metrics[name] - value) <= oc.fp32_tol(scale, value), (name, f_metrics[name], value)


def test_missing_weight_is_named() -> None:
    cfg = ObjectiveConfig(name="opd")
    case = oc.make_case(4, 11, seed=1)
    batch = dataclasses.replace(oc.case_batch(cfg, case), hidden=torch.randn(4, 3), token_weight=case.weights.float())
    with pytest.raises(ValueError, match=r"TokenBatch\.output_weight is required"):
        build_objective(cfg, teacher_names=oc.TEACHERS)(batch)
