"""``objective:`` section of the run config (OBJECTIVES.md §1-§6); every key is documented in docs/objectives.md."""

from __future__ import annotations

import dataclasses

from megatron_opd.config.errors import ConfigError, check_choice, check_positive

OBJECTIVE_NAMES = ("opd", "gopd", "exopd", "aopd", "lsm", "gkd", "sft")
# §2: the reward scale λ matters only for these; ExOPD's paper default is 1.25.
LAMBDA_OBJECTIVES = ("opd", "gopd", "exopd")
DEFAULT_LAMBDA = {"exopd": 1.25}
# Objectives that compare the student to the teacher on a top-K support (§3-§5).
SUPPORT_OBJECTIVES = ("aopd", "lsm", "gkd")
SUPPORTS = ("teacher_topk", "student_topk", "teacher_topk+sampled")


@dataclasses.dataclass
class ObjectiveConfig:
    """Which objective, and its parameters. YAML key ``lambda`` is the field ``lambda_``."""

    name: str = "opd"
    # §2 G-OPD / ExOPD: reward scale λ (None: 1.25 for exopd, else 1.0) and the reference model.
    lambda_: float | None = None
    reference: str = "student_base"  # student_base | teacher_base (reward correction)
    # §3 AOPD / §4 LSM / §5 GKD: the top-K support and the divergence on it.
    top_k: int = 32
    tau: float = 0.0
    beta: float | None = None  # None: 0 (forward KL) for aopd and gkd; lsm is always 1 (reverse KL)
    aopd_variant: str = "default"  # default | zero | accuracy_filtered
    aopd_zero_tolerance: float = 1e-3
    support: str = "teacher_topk"  # teacher_topk | student_topk | teacher_topk+sampled (lsm)
    renormalize: bool = True
    tail_bucket: bool = False  # renormalize=false only: add the mass outside the support as one entry
    # §4 special-token masking; masked_token_ids None = the tokenizer's special/added tokens except the EOS.
    special_token_mask: bool = False
    masked_token_ids: list[int] | None = None
    # §6 rollout correction: token-level IS weights (policy-gradient terms) and optional rejection.
    rollout_is: str = "token"  # token | none
    rollout_is_threshold: float = 5.0
    rollout_rs: str = "none"  # none | token | sequence
    rollout_rs_threshold: float | None = None  # None: rollout_is_threshold
    rollout_rs_threshold_lower: float | None = None  # None: 1 / upper threshold
    # §1 policy-gradient form: auto = PPO-clip when trainer.mini_batches_per_step > 1, else REINFORCE.
    policy_loss: str = "auto"  # auto | reinforce | ppo_clip
    clip_ratio: float = 0.2
    clip_ratio_c: float | None = 3.0  # dual clip (verl): PPO loss of tokens with A < 0 capped at −A·c; None: off
    advantage_logp: str = "student"  # student | old (ℓ_old inside the advantage, the G-OPD reference code)
    # Aggregation over the global batch.
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-mean

    @property
    def lam(self) -> float:
        """λ of §2 with its per-objective default."""
        return self.lambda_ if self.lambda_ is not None else DEFAULT_LAMBDA.get(self.name, 1.0)

    @property
    def divergence_beta(self) -> float:
        """β of §5: LSM is the reverse KL (β = 1); AOPD and GKD default to forward KL (β = 0)."""
        if self.name == "lsm":
            return 1.0
        return self.beta if self.beta is not None else 0.0

    @property
    def rs_bounds(self) -> tuple[float, float]:
        """(lower, upper) ratio bounds of ``rollout_rs`` (§6)."""
        upper = self.rollout_rs_threshold if self.rollout_rs_threshold is not None else self.rollout_is_threshold
        lower = self.rollout_rs_threshold_lower if self.rollout_rs_threshold_lower is not None else 1.0 / upper
        return lower, upper

    def needs_reference(self) -> bool:
        """The reference model is computed only where it does not cancel (§2: λ ≠ 1)."""
        return self.name in LAMBDA_OBJECTIVES and self.lam != 1.0

    def validate(self, has_teacher_base: bool = True) -> None:
        """Raise :class:`ConfigError` (naming the key and the fix) on the first bad value."""
        check_choice("objective.name", self.name, OBJECTIVE_NAMES)
        self._validate_lambda(has_teacher_base)
        check_positive("objective.top_k", self.top_k)
        if not -1.0 <= self.tau <= 1.0:
            raise ConfigError(
                "objective.tau", self.tau, "must lie in [-1, 1].", "0 is AOPD's default; -1 = OPD, 1 = top-K GKD."
            )
        if self.beta is not None:
            if not 0.0 <= self.beta <= 1.0:
                raise ConfigError("objective.beta", self.beta, "must lie in [0, 1].", "0 = forward KL, 1 = reverse KL.")
            if self.name == "lsm" and self.beta != 1.0:
                raise ConfigError(
                    "objective.beta",
                    self.beta,
                    "LSM is the truncated reverse KL (β = 1, OBJECTIVES §4).",
                    "drop objective.beta, or use objective.name=gkd for another β on the teacher top-K.",
                )
        check_choice("objective.aopd_variant", self.aopd_variant, ("default", "zero", "accuracy_filtered"))
        check_positive("objective.aopd_zero_tolerance", self.aopd_zero_tolerance, allow_zero=True)
        check_choice("objective.support", self.support, SUPPORTS)
        if self.support != "teacher_topk" and self.name != "lsm":
            raise ConfigError(
                "objective.support",
                self.support,
                f"only lsm chooses its support; {self.name} uses the teacher top-K.",
                "set objective.support=teacher_topk, or objective.name=lsm.",
            )
        if self.name == "lsm" and not self.renormalize:
            raise ConfigError(
                "objective.renormalize",
                self.renormalize,
                "LSM requires renormalization on the support (OBJECTIVES §4: training collapses without it).",
                "set objective.renormalize=true; for the unrenormalized ablation use objective.name=gkd beta=1.",
            )
        if self.tail_bucket and self.renormalize:
            raise ConfigError(
                "objective.tail_bucket",
                self.tail_bucket,
                "the tail bucket is the mass outside the support, which renormalization removes.",
                "set objective.renormalize=false to use the tail bucket, or tail_bucket=false.",
            )
        self._validate_rollout()
        check_choice("objective.loss_agg_mode", self.loss_agg_mode, ("token-mean", "seq-mean-token-mean"))
        if self.masked_token_ids is not None and any(int(i) < 0 for i in self.masked_token_ids):
            raise ConfigError(
                "objective.masked_token_ids", self.masked_token_ids, "token ids must be >= 0.", "list vocabulary ids."
            )

    def _validate_lambda(self, has_teacher_base: bool) -> None:
        if self.lambda_ is not None and self.name not in LAMBDA_OBJECTIVES:
            raise ConfigError(
                "objective.lambda",
                self.lambda_,
                f"λ is the G-OPD reward scale; objective {self.name!r} does not use it.",
                "drop objective.lambda, or use objective.name=gopd|exopd.",
            )
        if self.lam <= 0:
            raise ConfigError("objective.lambda", self.lam, "must be > 0.", "λ=1 is OPD, λ>1 ExOPD (paper: 1.25).")
        if self.name == "opd" and self.lam != 1.0:
            raise ConfigError(
                "objective.lambda",
                self.lam,
                "sampled-token OPD is λ = 1.",
                "use objective.name=gopd (any λ > 0) or exopd (λ > 1, default 1.25).",
            )
        check_choice("objective.reference", self.reference, ("student_base", "teacher_base"))
        if self.reference == "teacher_base" and not has_teacher_base:
            raise ConfigError(
                "objective.reference",
                self.reference,
                "reward correction needs the teacher's pre-RL base model.",
                "set teachers[i].base_path for every teacher, or use reference=student_base.",
            )

    def _validate_rollout(self) -> None:
        check_choice("objective.rollout_is", self.rollout_is, ("token", "none"))
        check_positive("objective.rollout_is_threshold", self.rollout_is_threshold)
        check_choice("objective.rollout_rs", self.rollout_rs, ("none", "token", "sequence"))
        if self.rollout_rs_threshold is not None:
            check_positive("objective.rollout_rs_threshold", self.rollout_rs_threshold)
        if self.rollout_rs_threshold_lower is not None:
            check_positive("objective.rollout_rs_threshold_lower", self.rollout_rs_threshold_lower)
        lower, upper = self.rs_bounds
        if lower >= upper:
            raise ConfigError(
                "objective.rollout_rs_threshold_lower",
                lower,
                f"must be below the upper threshold {upper}.",
                "leave it unset (1 / upper) or lower it.",
            )
        check_choice("objective.policy_loss", self.policy_loss, ("auto", "reinforce", "ppo_clip"))
        if not 0.0 < self.clip_ratio < 1.0:
            raise ConfigError("objective.clip_ratio", self.clip_ratio, "must lie in (0, 1).", "PPO's usual is 0.2.")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1.0:
            raise ConfigError(
                "objective.clip_ratio_c",
                self.clip_ratio_c,
                "the dual-clip bound on the ratio of tokens with A < 0 must be > 1.",
                "verl's default is 3.0; null turns the dual clip off.",
            )
        check_choice("objective.advantage_logp", self.advantage_logp, ("student", "old"))

    def validate_vocab(self, vocab_size: int) -> None:
        """``top_k`` must fit in the vocabulary; masked ids must be vocabulary ids."""
        if self.top_k > vocab_size:
            raise ConfigError(
                "objective.top_k",
                self.top_k,
                f"exceeds the vocabulary size {vocab_size}.",
                "use top_k <= vocab size (paper: 32).",
            )
        bad = [i for i in self.masked_token_ids or () if int(i) >= vocab_size]
        if bad:
            raise ConfigError(
                "objective.masked_token_ids", bad, f"are not ids of the {vocab_size}-token vocabulary.", "remove them."
            )
