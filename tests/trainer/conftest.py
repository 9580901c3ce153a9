"""Shared pieces of the trainer tests: tiny models, samples with random responses, float64 HF scores."""

from __future__ import annotations

import dataclasses

import torch

from megatron_opd.config.schema import ModelConfig, OptimConfig, ParallelConfig
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.registry import build_objective
from megatron_opd.scoring.contract import TokenScores
from megatron_opd.trainer.batch import Sample
from megatron_opd.trainer.worker import WorkerSpec

VOCAB = 64


def make_samples(n: int, seed: int, vocab: int = VOCAB, teachers: tuple[str, ...] = ("default",)) -> list[Sample]:
    """``n`` prompt+response pairs of varied lengths (token ids only)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for uid in range(n):
        p = int(torch.randint(2, 7, (1,), generator=g))
        r = int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(1, vocab, (p + r,), generator=g).tolist()
        out.append(
            Sample(
                uid=uid,
                prompt_ids=ids[:p],
                response_ids=ids[p:],
                rollout_logp=(-torch.rand(r, generator=g) - 0.5).tolist(),
                teacher=teachers[uid % len(teachers)],
            )
        )
    return out


@torch.no_grad()
def hf_scores(model_dir: str, samples: list[Sample], top_k: int = 0) -> dict[int, TokenScores]:
    """Per response token log-probs (and top-K) of the HF model: fp32 forward (HF MoE has no fp64
    kernels), log-softmax in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        p = len(s.prompt_ids)
        rows = logp[p - 1 : p - 1 + s.response_len]
        scores = TokenScores(logp=rows.gather(1, torch.tensor(s.response_ids)[:, None])[:, 0])
        if top_k:
            scores.topk_logp, scores.topk_ids = rows.topk(top_k, dim=-1)
        out[s.uid] = scores
    return out


def worker_spec(
    path: str, *, tp: int = 1, ep: int = 1, dp: int = 1, trainable: bool = False, **objective
) -> WorkerSpec:
    model = ModelConfig(
        path, ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, data_parallel_size=dp)
    )
    spec = WorkerSpec(group="test", model=model, load_from=path, max_tokens_per_microbatch=24, pad_id=0)
    if trainable:
        spec = dataclasses.replace(
            spec,
            trainable=True,
            optim=OptimConfig(lr=3e-3, clip_grad=1.0),
            objective=build_objective(ObjectiveConfig(**objective)),
            total_steps=10,
        )
    return spec
