"""``objective:`` section of the run config (docs/objectives.md §1–§6); every key is documented in docs/objectives.md.

This is the section's schema and the domain of each key. Which objective reads which key, its defaults
(λ, β, the support) and the constraints one objective puts on the others' keys are facts of the objective
classes (``objectives/registry.py`` checks them: ``validate_objective``).
"""

from __future__ import annotations

import dataclasses

from megatron_opd.config.errors import ConfigError, check_choice, check_positive

SUPPORTS = ("teacher_topk", "student_topk", "teacher_topk+sampled")


@dataclasses.dataclass
class ObjectiveConfig:
    """Which objective, and its parameters. YAML key ``lambda`` is the field ``lambda_``."""

    name: str = "opd"
    # §2 G-OPD / ExOPD: reward scale λ (None: the objective's default) and the reference model.
    lambda_: float | None = None
    reference: str = "student_base"  # student_base | teacher_base (reward correction)
    # §3 AOPD / §4 LSM / §5 GKD: the top-K support and the divergence on it.
    top_k: int = 32
    tau: float = 0.0
    beta: float | None = None  # None: the objective's default (forward KL, or LSM's fixed reverse KL)
    aopd_variant: str = "default"  # default | zero | accuracy_filtered
    aopd_zero_tolerance: float = 1e-3
    support: str = "teacher_topk"  # teacher_topk | student_topk | teacher_topk+sampled (objectives that choose)
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
    def rs_bounds(self) -> tuple[float, float]:
        """(lower, upper) ratio bounds of ``rollout_rs`` (§6)."""
        upper = self.rollout_rs_threshold if self.rollout_rs_threshold is not None else self.rollout_is_threshold
        lower = self.rollout_rs_threshold_lower if self.rollout_rs_threshold_lower is not None else 1.0 / upper
        return lower, upper

    def validate(self, has_teacher_base: bool = True) -> None:
        """Raise :class:`ConfigError` (naming the key and the fix) on the first value outside its key's domain.
        ``has_teacher_base``: every teacher has a ``base_path`` (``reference: teacher_base`` needs one)."""
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
        if self.beta is not None and not 0.0 <= self.beta <= 1.0:
            raise ConfigError("objective.beta", self.beta, "must lie in [0, 1].", "0 = forward KL, 1 = reverse KL.")
        check_choice("objective.aopd_variant", self.aopd_variant, ("default", "zero", "accuracy_filtered"))
        check_positive("objective.aopd_zero_tolerance", self.aopd_zero_tolerance, allow_zero=True)
        check_choice("objective.support", self.support, SUPPORTS)
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
