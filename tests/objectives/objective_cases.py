"""Random token batches, the production objectives run on them (any TP rank), and the expected loss,
gradient and metrics from the independent float64 formulas of ``objective_plain`` (imported by the
spawned TP ranks too)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.inputs import TokenBatch
from megatron_opd.objectives.metrics import reduce_metrics
from megatron_opd.objectives.registry import build_objective, objective_class
from tests.objectives import objective_plain as plain
from tests.tolerance import ulps

TEACHERS = ("math", "code")


@dataclasses.dataclass
class Case:
    """One micro-batch of ``n`` tokens over a ``v``-token vocabulary, in float64 (fp32-exact logits)."""

    zs: Tensor  # [N, V] student logits
    zt: Tensor  # [N, V] teacher logits
    labels: Tensor
    response_mask: Tensor
    seq_index: Tensor
    weights: Tensor  # token weights w_t (random, positive)
    ref_logp: Tensor
    old_logp: Tensor | None
    rollout_logp: Tensor
    reward: Tensor
    teacher_index: Tensor
    masked_ids: list[int]
    temperature: float = 1.0

    @property
    def teacher_lp(self) -> Tensor:
        return torch.stack([plain.log_softmax_row(r / self.temperature) for r in self.zt])


def logit_scale(case: Case) -> float:
    """max |z| over the case's finite student and teacher logits."""
    z = torch.cat([case.zs.flatten(), case.zt.flatten()])
    return z[torch.isfinite(z)].abs().max().item()


def fp32_tol(scale: float, value: float) -> float:
    """Tolerance of a loss, gradient entry or metric of the production objective (fp32) against another way of
    computing it (the float64 formulas, other micro-batches, other branches): every log-prob rounds at the logits'
    ``scale`` (32 ulps, as the kernels) and the value multiplies such numbers by factors of its own size:
    32 fp32 ulps of scale × max(1, |value|)."""
    return ulps(torch.float32, scale * max(1.0, abs(value)), 32)


def make_case(
    n: int,
    v: int,
    seed: int,
    *,
    neg_inf: bool = False,
    masked_rows: int = 1,
    give_old: bool = False,
    old_spread: float = 0.05,
    rollout_spread: float = 0.4,
    temperature: float = 1.0,
    all_masked: bool = False,
) -> Case:
    """Random logits and scores; ``old_spread`` / ``rollout_spread``: standard deviations of ℓ_old − ℓ_S and
    ℓ_roll − ℓ_old (large values put PPO ratios beyond the dual clip and log-ratios beyond ±20)."""
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).float().double()
    zt = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2 + 0.6 * zs).float().double()
    finite = v - 2 if neg_inf and v > 4 else v
    zs[:, finite:] = -math.inf
    zt[:, finite:] = -math.inf
    labels = torch.randint(0, finite, (n,), generator=g)
    if n > 2:
        labels[1] = int(zt[1].argmax())  # a sampled token inside the teacher top-K
    response = torch.ones(n)
    response[:masked_rows] = 0
    if all_masked:
        response[:] = 0
    seq_index = torch.arange(n) // 3
    lp_s = torch.stack([plain.log_softmax_row(r / temperature) for r in zs]).gather(1, labels[:, None]).squeeze(1)
    old = lp_s + old_spread * torch.randn(n, generator=g, dtype=torch.float64) if give_old else None
    base = lp_s if old is None else old
    rollout = base + rollout_spread * torch.randn(n, generator=g, dtype=torch.float64)
    rollout[response == 0] = math.nan  # never read on masked tokens
    return Case(
        zs=zs,
        zt=zt,
        labels=labels,
        response_mask=response,
        seq_index=seq_index,
        weights=torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
        ref_logp=torch.randn(n, generator=g, dtype=torch.float64) - 4.0,
        old_logp=old,
        rollout_logp=rollout,
        reward=(torch.arange(n) % 2).double(),
        teacher_index=torch.randint(0, len(TEACHERS), (n,), generator=g),
        masked_ids=sorted({int(labels[min(2, n - 1)]), finite - 1}),
        temperature=temperature,
    )


def teacher_topk(case: Case, k: int) -> Tensor:
    """The teacher's top-``k`` ids [N, k] at the case's temperature."""
    return torch.tensor([plain.topk_list(r / case.temperature, k) for r in case.zt], dtype=torch.int64)


def support_of(cfg: ObjectiveConfig, case: Case) -> tuple[Tensor, Tensor] | None:
    """What scoring would deliver: the support ids [N, K] and the teacher's log-probs there."""
    if cfg.name == "sft":
        return None
    t = case.temperature
    source = case.zs if cfg.name == "lsm" and cfg.support == "student_topk" else case.zt
    ids = torch.tensor([plain.topk_list(r / t, cfg.top_k) for r in source], dtype=torch.int64)
    return ids, case.teacher_lp.gather(1, ids)


def run_objective(
    cfg: ObjectiveConfig,
    case: Case,
    build: dict[str, Any],
    tp_group: Any = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, Tensor, dict[str, float]]:
    """Loss, d loss / d (this rank's logits shard) and reduced metrics of the production objective."""
    objective = build_objective(cfg, teacher_names=TEACHERS, temperature=case.temperature, **build)
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    v_local = case.zs.shape[1] // world
    logits = case.zs[:, rank * v_local : (rank + 1) * v_local].to(dtype).requires_grad_(True)
    out = objective(case_batch(cfg, case, tp_group).with_logits(logits))
    out.loss.backward()
    return float(out.loss.detach()), logits.grad.double(), reduce_metrics(out.metrics)


def case_batch(cfg: ObjectiveConfig, case: Case, tp_group: Any = None) -> TokenBatch:
    """The case's token batch as the trainer builds it, without the student's outputs (logits or hidden rows)."""
    support = support_of(cfg, case)
    nan_on_masked = torch.where(case.response_mask > 0, 0.0, math.nan)
    teacher_logp = case.teacher_lp.gather(1, case.labels[:, None]).squeeze(1) + nan_on_masked
    return TokenBatch(
        labels=case.labels,
        response_mask=case.response_mask,
        token_weight=case.weights.float(),
        seq_index=case.seq_index,
        teacher_logp=teacher_logp.float(),
        ref_logp=case.ref_logp.float(),
        old_logp=None if case.old_logp is None else case.old_logp.float(),
        rollout_logp=case.rollout_logp.float(),
        support_ids=None if support is None else support[0],
        support_teacher_logp=None if support is None else support[1].float(),
        teacher_topk_ids=teacher_topk(case, cfg.top_k) if cfg.support == "student_topk" else None,
        teacher_index=case.teacher_index,
        outcome_reward=case.reward.float(),
        tp_group=tp_group,
    )


def expected(cfg: ObjectiveConfig, case: Case, *, ppo: bool = False) -> tuple[float, Tensor, dict[str, float]]:
    """The same loss, its gradient w.r.t. the full student logits and the main metrics, row by row."""
    t = case.temperature
    n = case.zs.shape[0]
    lt = case.teacher_lp.gather(1, case.labels[:, None]).squeeze(1)
    keep = (case.response_mask > 0).tolist()
    special = [int(y) in case.masked_ids for y in case.labels.tolist()] if cfg.special_token_mask else [False] * n
    response_keep = list(keep)
    keep = [k and not s for k, s in zip(keep, special)]
    unspecial = list(keep)
    zs = case.zs.clone().requires_grad_(True)
    lp_s = [plain.log_softmax_row(zs[i] / t)[case.labels[i]] for i in range(n)]
    old = [float(lp_s[i]) if case.old_logp is None else float(case.old_logp[i]) for i in range(n)]
    log_ratio = [old[i] - float(case.rollout_logp[i]) for i in range(n)]
    if cfg.rollout_rs != "none":
        lower, upper = cfg.rs_bounds
        if cfg.rollout_rs == "token":
            ratio = log_ratio
        else:
            seq_sum: dict[int, float] = {}
            for i in range(n):
                if keep[i]:
                    seq_sum[int(case.seq_index[i])] = seq_sum.get(int(case.seq_index[i]), 0.0) + log_ratio[i]
            ratio = [seq_sum.get(int(case.seq_index[i]), 0.0) for i in range(n)]
        keep = [k and math.log(lower) <= r <= math.log(upper) for k, r in zip(keep, ratio)]
    loss = torch.zeros((), dtype=torch.float64)
    sums: dict[str, list[float]] = {}

    def add(name: str, value: float, i: int) -> None:
        sums.setdefault(name, []).append(value)
        if cfg.name != "sft":
            sums.setdefault(f"{name}/{TEACHERS[int(case.teacher_index[i])]}", []).append(value)

    for i in range(n):
        if not keep[i]:
            continue
        z, zt, y = zs[i] / t, case.zt[i] / t, int(case.labels[i])
        ls = lp_s[i]
        w_is = plain.rollout_weight(log_ratio[i], cfg.rollout_is_threshold) if cfg.rollout_is == "token" else 1.0
        s_adv = old[i] if cfg.advantage_logp == "old" else float(ls)
        adv = float(lt[i]) - s_adv
        if cfg.name in ("opd", "gopd", "exopd"):
            adv += (objective_class(cfg.name).lam(cfg) - 1.0) * (float(lt[i]) - float(case.ref_logp[i]))
            row = w_is * plain.pg_loss(ls, adv, old[i] if ppo else None, cfg.clip_ratio, cfg.clip_ratio_c)
            add("opd/advantage", adv, i)
        elif cfg.name == "aopd":
            row, m = plain.aopd_row(
                z,
                zt,
                y,
                cfg.top_k,
                cfg.tau,
                objective_class(cfg.name).divergence_beta(cfg),
                variant=cfg.aopd_variant,
                reward=float(case.reward[i]),
                tol=cfg.aopd_zero_tolerance,
                is_weight=w_is,
                old=old[i] if ppo else None,
                clip=cfg.clip_ratio,
                clip_c=cfg.clip_ratio_c,
                adv_logp=old[i] if cfg.advantage_logp == "old" else None,
                renormalize=cfg.renormalize,
                tail=cfg.tail_bucket,
            )
            add("aopd/intervention_ratio", float(m), i)
        elif cfg.name == "lsm":
            row = plain.lsm_row(z, zt, y, cfg.top_k, cfg.support)
        elif cfg.name == "gkd":
            row = plain.gjsd_row(
                z, zt, objective_class(cfg.name).divergence_beta(cfg), cfg.top_k, cfg.renormalize, cfg.tail_bucket
            )
        else:
            row = -ls
        loss = loss + case.weights[i] * row
        if cfg.name in ("aopd", "lsm", "gkd"):
            for name, value in support_metrics(cfg, case, i).items():
                sums.setdefault(name, []).append(value)
        sums.setdefault("student/entropy", []).append(float(plain.entropy_row(z)))
        if cfg.name != "sft":
            add("teacher/reverse_kl", float(ls) - float(lt[i]), i)
            sums.setdefault("rollout/mismatch_kl", []).append(-log_ratio[i])
    if cfg.special_token_mask:
        sums["mask/special_token_ratio"] = [float(s) for s, r in zip(special, response_keep) if r]
    if cfg.rollout_rs != "none":
        sums["rollout/rs_reject_frac"] = [float(not k) for k, u in zip(keep, unspecial) if u]
    if loss.requires_grad:
        loss.backward()
    grad = zs.grad if zs.grad is not None else torch.zeros_like(case.zs)
    metrics = {k: sum(v) / len(v) for k, v in sums.items() if v}
    return float(loss), grad, metrics


def support_metrics(cfg: ObjectiveConfig, case: Case, i: int) -> dict[str, float]:
    """Row ``i``'s probability mass of teacher and student on the objective's support K_t and the share of
    the teacher top-K inside the student top-K (left out where -inf logits make the top-K ambiguous)."""
    t, y, k = case.temperature, int(case.labels[i]), cfg.top_k
    zs, zt = case.zs[i] / t, case.zt[i] / t
    teacher_top, student_top = plain.topk_list(zt, k), plain.topk_list(zs, k)
    ids = student_top if cfg.name == "lsm" and cfg.support == "student_topk" else list(teacher_top)
    if cfg.name == "lsm" and cfg.support == "teacher_topk+sampled" and y not in ids:
        ids.append(y)
    ps, pt = plain.log_softmax_row(zs), plain.log_softmax_row(zt)
    out = {
        "support/teacher_mass": sum(math.exp(float(pt[v])) for v in ids),
        "support/student_mass": sum(math.exp(float(ps[v])) for v in ids),
    }
    finite = min(int(torch.isfinite(zs).sum()), int(torch.isfinite(zt).sum()))
    if k <= finite:
        out["support/topk_overlap"] = len(set(teacher_top) & set(student_top)) / k
    return out


def tp_rank_run(jobs: list[tuple[dict, Case, dict]]) -> list[tuple[float, list, dict[str, float]]]:
    """Spawned rank: run every job with the world as the TP group; return each full gathered gradient."""
    group = dist.group.WORLD
    out = []
    for cfg_kwargs, case, build in jobs:
        loss, grad, metrics = run_objective(ObjectiveConfig(**cfg_kwargs), case, build, tp_group=group)
        shards = [torch.empty_like(grad) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, grad.contiguous())
        # plain lists: tensors would travel through shared-memory handles that die with the rank
        out.append((loss, torch.cat(shards, dim=1).tolist(), metrics))
    return out


def dp_rank_run(loss: Tensor, mask: Tensor, seq: Tensor, mode: str) -> tuple[float, dict[str, float]]:
    """Spawned rank as a DP rank: its share of the sequences, global counts and metrics over the world."""
    from megatron_opd.objectives import aggregation as agg
    from megatron_opd.objectives.metrics import masked_metric

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = seq % world == rank
    loss, mask, seq = loss[mine], mask[mine], seq[mine]
    counts = agg.global_counts([agg.local_counts(mask, seq)], group=dist.group.WORLD)
    local = agg.aggregate(loss, agg.token_weights(mask, seq, counts, mode, torch.float64))
    return float(local), reduce_metrics({"loss/mean": masked_metric(loss, mask)}, group=dist.group.WORLD)


def rank_main(jobs: list[tuple[dict, Case, dict]], dp_args: tuple) -> tuple[list, tuple[float, dict[str, float]]]:
    """One spawned world checks both the TP objectives and DP aggregation."""
    return tp_rank_run(jobs), dp_rank_run(*dp_args)
