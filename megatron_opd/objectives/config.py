"""``objective:`` section of the run config (OBJECTIVES.md §1-§6)."""

from __future__ import annotations

import dataclasses

from megatron_opd.config.errors import ConfigError, check_choice, check_positive

OBJECTIVE_NAMES = ("opd", "gopd", "exopd", "aopd", "lsm", "gkd", "sft")
DEFAULT_LAMBDA = {"exopd": 1.25}


@dataclasses.dataclass
class ObjectiveConfig:
    """Which objective, and its parameters. YAML key ``lambda`` is the field ``lambda_``."""

    name: str = "opd"
    # §2 G-OPD / ExOPD: reward scale λ (None: 1.25 for exopd, else 1.0) and the reference model.
    lambda_: float | None = None
    reference: str = "student_base"  # student_base | teacher_base
    # §3 AOPD / §4 LSM / §5 GKD: teacher top-K support and divergence.
    top_k: int = 32
    tau: float = 0.0
    beta: float = 0.0
    aopd_variant: str = "default"  # default | zero | accuracy_filtered
    aopd_zero_tolerance: float = 1e-3
    support: str = "teacher_topk"  # teacher_topk | student_topk | teacher_topk+sampled
    renormalize: bool = True
    tail_bucket: bool = False
    # §4 special-token masking: None = the tokenizer's special/added tokens except the EOS.
    special_token_mask: bool = False
    masked_token_ids: list[int] | None = None
    # §6 token-level rollout correction.
    rollout_is: str = "token"  # token | none
    rollout_is_threshold: float = 5.0
    rollout_rs: str = "none"  # none | token | sequence
    rollout_rs_low: float = 0.0
    rollout_rs_high: float = 5.0
    # PPO-clip form when a step is split into several mini-batches (off-policy updates).
    clip_ratio: float = 0.2
    # Aggregation over the global batch.
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-mean

    @property
    def lam(self) -> float:
        return self.lambda_ if self.lambda_ is not None else DEFAULT_LAMBDA.get(self.name, 1.0)

    def needs_reference(self) -> bool:
        """The reference model is computed only where it does not cancel (§2: λ ≠ 1)."""
        return self.name in ("gopd", "exopd", "opd") and self.lam != 1.0

    def validate(self, has_teacher_base: bool = True) -> None:
        check_choice("objective.name", self.name, OBJECTIVE_NAMES)
        if self.lam <= 0:
            raise ConfigError("objective.lambda", self.lam, "must be > 0.", "λ=1 is OPD, λ>1 ExOPD (paper: 1.25).")
        check_choice("objective.reference", self.reference, ("student_base", "teacher_base"))
        if self.reference == "teacher_base" and not has_teacher_base:
            raise ConfigError(
                "objective.reference",
                self.reference,
                "reward correction needs the teacher's pre-RL base model.",
                "set teachers[i].base_path for every teacher, or use reference=student_base.",
            )
        check_positive("objective.top_k", self.top_k)
        if not -1.0 <= self.tau <= 1.0:
            raise ConfigError(
                "objective.tau", self.tau, "must lie in [-1, 1].", "0 is AOPD's default; -1 = OPD, 1 = top-K GKD."
            )
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError("objective.beta", self.beta, "must lie in [0, 1].", "0 = forward KL, 1 = reverse KL.")
        check_choice("objective.aopd_variant", self.aopd_variant, ("default", "zero", "accuracy_filtered"))
        check_choice("objective.support", self.support, ("teacher_topk", "student_topk", "teacher_topk+sampled"))
        check_choice("objective.rollout_is", self.rollout_is, ("token", "none"))
        check_positive("objective.rollout_is_threshold", self.rollout_is_threshold)
        check_choice("objective.rollout_rs", self.rollout_rs, ("none", "token", "sequence"))
        check_choice("objective.loss_agg_mode", self.loss_agg_mode, ("token-mean", "seq-mean-token-mean"))

    def validate_vocab(self, vocab_size: int) -> None:
        if self.top_k > vocab_size:
            raise ConfigError(
                "objective.top_k",
                self.top_k,
                f"exceeds the vocabulary size {vocab_size}.",
                "use top_k <= vocab size (paper: 32).",
            )
