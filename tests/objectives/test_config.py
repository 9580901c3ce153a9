"""Bad ``objective:`` settings raise a ConfigError naming the key, the problem and the fix."""

from __future__ import annotations

import pytest

from megatron_opd.config.errors import ConfigError
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.registry import build_objective, objective_class, validate_objective


def _error(cfg: ObjectiveConfig, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        validate_objective(cfg, **kwargs)
    return str(info.value)


def test_reference_teacher_base_needs_base_model() -> None:
    msg = _error(ObjectiveConfig(name="exopd", reference="teacher_base"), has_teacher_base=False)
    assert msg.startswith("objective.reference='teacher_base'") and "base_path" in msg
    validate_objective(ObjectiveConfig(name="exopd", reference="teacher_base"), has_teacher_base=True)


@pytest.mark.parametrize("lam", [0.0, -1.0])
def test_lambda_must_be_positive(lam: float) -> None:
    msg = _error(ObjectiveConfig(name="gopd", lambda_=lam))
    assert msg.startswith(f"objective.lambda={lam!r}: must be > 0.") and "Fix:" in msg


def test_lambda_only_for_gopd_family() -> None:
    assert "does not use it" in _error(ObjectiveConfig(name="aopd", lambda_=1.25))
    assert "sampled-token OPD is λ = 1" in _error(ObjectiveConfig(name="opd", lambda_=1.25))
    assert objective_class("exopd").lam(ObjectiveConfig(name="exopd")) == 1.25
    assert objective_class("gopd").lam(ObjectiveConfig(name="gopd")) == 1.0


def test_top_k_larger_than_vocab() -> None:
    with pytest.raises(ConfigError, match=r"objective.top_k=64: exceeds the vocabulary size 50\. Fix: use top_k"):
        ObjectiveConfig(top_k=64).validate_vocab(50)
    ObjectiveConfig(top_k=50).validate_vocab(50)
    assert "must be > 0" in _error(ObjectiveConfig(top_k=0))


@pytest.mark.parametrize("tau", [-1.5, 1.01])
def test_tau_outside_unit_interval(tau: float) -> None:
    msg = _error(ObjectiveConfig(name="aopd", tau=tau))
    assert msg.startswith(f"objective.tau={tau!r}: must lie in [-1, 1].")


@pytest.mark.parametrize(
    "kwargs,key,text",
    [
        (dict(name="distill"), "objective.name", "not a valid choice"),
        (dict(name="gkd", beta=1.5), "objective.beta", "[0, 1]"),
        (dict(name="lsm", beta=0.0), "objective.beta", "reverse KL"),
        (dict(name="lsm", renormalize=False), "objective.renormalize", "collapses"),
        (dict(name="gkd", tail_bucket=True), "objective.tail_bucket", "renormalize=false"),
        (dict(name="aopd", support="student_topk"), "objective.support", "only lsm"),
        (dict(aopd_variant="both"), "objective.aopd_variant", "not a valid choice"),
        (dict(rollout_is="sequence"), "objective.rollout_is", "not a valid choice"),
        (dict(rollout_is_threshold=0.0), "objective.rollout_is_threshold", "> 0"),
        (
            dict(rollout_rs="token", rollout_rs_threshold=2.0, rollout_rs_threshold_lower=3.0),
            "objective.rollout_rs_threshold_lower",
            "below",
        ),
        (dict(policy_loss="ppo"), "objective.policy_loss", "not a valid choice"),
        (dict(clip_ratio=1.5), "objective.clip_ratio", "(0, 1)"),
        (dict(advantage_logp="rollout"), "objective.advantage_logp", "not a valid choice"),
        (dict(loss_agg_mode="seq-mean"), "objective.loss_agg_mode", "not a valid choice"),
        (dict(masked_token_ids=[3, -1]), "objective.masked_token_ids", ">= 0"),
    ],
)
def test_other_bad_values(kwargs: dict, key: str, text: str) -> None:
    msg = _error(ObjectiveConfig(**kwargs))
    assert msg.startswith(key) and text in msg and "Fix:" in msg


def test_masked_ids_must_be_in_vocab_and_resolvable() -> None:
    with pytest.raises(ConfigError, match=r"objective\.masked_token_ids"):
        ObjectiveConfig(masked_token_ids=[3, 99]).validate_vocab(50)
    with pytest.raises(ConfigError, match=r"objective\.masked_token_ids: special_token_mask is on"):
        build_objective(ObjectiveConfig(special_token_mask=True))


def test_defaults_validate_for_every_objective() -> None:
    for name in ("opd", "gopd", "exopd", "aopd", "lsm", "gkd", "sft"):
        cfg = ObjectiveConfig(name=name)
        validate_objective(cfg)
        assert build_objective(cfg).name == name
    assert objective_class("lsm").divergence_beta(ObjectiveConfig(name="lsm")) == 1.0
    assert objective_class("aopd").divergence_beta(ObjectiveConfig(name="aopd")) == 0.0
    assert ObjectiveConfig(rollout_is_threshold=4.0).rs_bounds == (0.25, 4.0)
