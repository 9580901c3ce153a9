"""Rollout samples and how they become model inputs.

A :class:`Sample` is one prompt + sampled response with everything the step learns about it
(rollout log-probs, teacher/reference scores, the loss mask). Worker groups receive lists of
samples for their data-parallel rank and cut them into :class:`MicroBatch`es under a token budget,
either
- packed (default): all sequences back to back in one row ``[1, T]`` with per-sequence positions
  and ``PackedSeqParams`` (THD), so attention and RoPE restart at every sequence and no compute is
  spent on padding; or
- padded: right-padded ``[b, L]`` rows (causal attention makes right padding invisible to real
  tokens, so no attention mask is needed);
plus the flat positions whose logits predict response tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor


@dataclasses.dataclass
class Sample:
    uid: int  # position in the global batch
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    finish_reason: str = "stop"
    teacher: str = "default"
    data_source: str = ""
    ground_truth: Any = None
    reward: float = 0.0  # outcome reward (rule-based), for metrics and accuracy-filtered AOPD
    loss_mask: Tensor | None = None  # [R] float; None = all response tokens
    # Per response token, filled in by scoring:
    old_logp: Tensor | None = None  # [R] student under the rollout weights (ℓ_old)
    student_topk_ids: Tensor | None = None  # [R, K] student top-K (LSM student_topk support)
    teacher_logp: Tensor | None = None  # [R] ℓ_T
    teacher_topk_ids: Tensor | None = None  # [R, K]
    teacher_topk_logp: Tensor | None = None  # [R, K]
    teacher_ids_logp: Tensor | None = None  # [R, K] teacher log-probs at student_topk_ids
    ref_logp: Tensor | None = None  # [R] ℓ_R

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def response_len(self) -> int:
        return len(self.response_ids)

    def mask(self) -> Tensor:
        if self.loss_mask is None:
            return torch.ones(self.response_len)
        return self.loss_mask


@dataclasses.dataclass
class MicroBatch:
    samples: list[Sample]
    input_ids: Tensor  # [b, L] right-padded, or [1, T] packed
    positions: Tensor  # [N] flat indices into [b * L] of logits predicting response tokens
    labels: Tensor  # [N] the response tokens
    seq_index: Tensor  # [N] index into ``samples`` of each token
    position_ids: Tensor | None = None  # [1, T] restarting at every packed sequence
    cu_seqlens: Tensor | None = None  # [S + 1] int32 sequence boundaries of a packed row

    @property
    def num_tokens(self) -> int:
        return int(self.labels.numel())

    def model_inputs(self, device: str | torch.device) -> dict[str, Any]:
        """Keyword inputs of :func:`megatron_opd.models.forward.model_forward`."""
        inputs: dict[str, Any] = {"input_ids": self.input_ids.to(device)}
        if self.cu_seqlens is not None:
            from megatron.core.packed_seq_params import PackedSeqParams

            cu = self.cu_seqlens.to(device)
            longest = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
            inputs["position_ids"] = self.position_ids.to(device)
            inputs["packed_seq_params"] = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
            )
        return inputs

    def per_token(self, field: str) -> Tensor | None:
        """Concatenate a per-response-token field of the samples, in token order (None if absent)."""
        parts = [getattr(s, field) for s in self.samples]
        if not parts or any(p is None for p in parts):
            return None
        return torch.cat([torch.as_tensor(p) for p in parts], dim=0)

    def split_per_sample(self, tokens: Tensor) -> list[Tensor]:
        """Inverse of :meth:`per_token`: one [R_i, ...] slice per sample."""
        return list(tokens.split([s.response_len for s in self.samples], dim=0))


def build_microbatch(
    samples: list[Sample], pad_id: int, multiple_of: int = 1, shape: tuple[int, int] | None = None
) -> MicroBatch:
    """Right-pad the samples to the longest one (rounded up to ``multiple_of``, e.g. the TP size
    under sequence parallelism), or to ``shape`` = (rows, length) when given (extra rows are all
    padding; a micro-batch may then have no samples at all)."""
    length = max((s.num_tokens for s in samples), default=1)
    length = -(-length // multiple_of) * multiple_of
    rows = len(samples)
    if shape is not None:
        if shape[0] < rows or shape[1] < length:
            raise ValueError(f"shape {shape} is smaller than the samples need ({rows}, {length})")
        rows, length = shape
    ids = torch.full((rows, length), pad_id, dtype=torch.long)
    positions, labels, seq_index = [], [], []
    for i, s in enumerate(samples):
        tokens = s.prompt_ids + s.response_ids
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        p = len(s.prompt_ids)
        # logits at position t predict token t + 1
        positions.append(torch.arange(p - 1, p - 1 + s.response_len) + i * length)
        labels.append(torch.tensor(s.response_ids, dtype=torch.long))
        seq_index.append(torch.full((s.response_len,), i, dtype=torch.long))
    empty = torch.zeros(0, dtype=torch.long)
    return MicroBatch(
        samples, ids, torch.cat([empty, *positions]), torch.cat([empty, *labels]), torch.cat([empty, *seq_index])
    )


def build_packed_microbatch(
    samples: list[Sample], pad_id: int, multiple_of: int = 1, length: int | None = None
) -> MicroBatch:
    """All samples back to back in one row ``[1, T]``, ``T`` = their total length rounded up to
    ``multiple_of`` (or ``length``); the padding tail is one more sequence of its own."""
    total = sum(s.num_tokens for s in samples)
    padded = max(-(-max(total, 1) // multiple_of) * multiple_of, length or 0)
    ids = torch.full((1, padded), pad_id, dtype=torch.long)
    pos = torch.zeros((1, padded), dtype=torch.long)
    bounds = [0]
    positions, labels, seq_index = [], [], []
    for i, s in enumerate(samples):
        start = bounds[-1]
        tokens = s.prompt_ids + s.response_ids
        ids[0, start : start + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        pos[0, start : start + len(tokens)] = torch.arange(len(tokens))
        p = start + len(s.prompt_ids)
        positions.append(torch.arange(p - 1, p - 1 + s.response_len))
        labels.append(torch.tensor(s.response_ids, dtype=torch.long))
        seq_index.append(torch.full((s.response_len,), i, dtype=torch.long))
        bounds.append(start + len(tokens))
    if bounds[-1] < padded:
        pos[0, bounds[-1] :] = torch.arange(padded - bounds[-1])
        bounds.append(padded)
    empty = torch.zeros(0, dtype=torch.long)
    return MicroBatch(
        samples,
        ids,
        torch.cat([empty, *positions]),
        torch.cat([empty, *labels]),
        torch.cat([empty, *seq_index]),
        position_ids=pos,
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
    )


def common_shapes(shapes_per_rank: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Micro-batch shapes every rank can use: as many micro-batches as the rank with the most, each
    as large as the largest i-th micro-batch of any rank. Ranks that exchange tokens inside every
    forward (MoE expert parallelism) must run identical schedules."""
    count = max(len(s) for s in shapes_per_rank)
    out = []
    for i in range(count):
        have = [s[i] for s in shapes_per_rank if i < len(s)]
        out.append((max(r for r, _ in have), max(length for _, length in have)))
    return out


def split_by_token_budget(
    samples: list[Sample], max_tokens: int, multiple_of: int = 1, packed: bool = False
) -> list[list[Sample]]:
    """Greedy micro-batching, longest first. Packed: first fit while the summed length stays within
    ``max_tokens``; padded: a micro-batch grows while ``b x L_padded <= max_tokens``. A sample longer
    than the budget gets a micro-batch of its own."""
    order = sorted(samples, key=lambda s: s.num_tokens, reverse=True)
    groups: list[list[Sample]] = []
    if packed:
        loads: list[int] = []
        for s in order:
            fit = next((i for i, load in enumerate(loads) if load + s.num_tokens <= max_tokens), None)
            if fit is None:
                groups.append([s])
                loads.append(s.num_tokens)
            else:
                groups[fit].append(s)
                loads[fit] += s.num_tokens
        return groups
    for s in order:
        if groups:
            cur = groups[-1]
            length = -(-max(cur[0].num_tokens, s.num_tokens) // multiple_of) * multiple_of
            if length * (len(cur) + 1) <= max_tokens:
                cur.append(s)
                continue
        groups.append([s])
    return groups


def split_for_data_parallel(samples: list[Sample], dp_size: int) -> list[list[Sample]]:
    """Balance samples over DP ranks by token count (longest-processing-time greedy), keeping
    each rank's samples in uid order so results are reproducible."""
    loads = [0] * dp_size
    parts: list[list[Sample]] = [[] for _ in range(dp_size)]
    for s in sorted(samples, key=lambda s: (-s.num_tokens, s.uid)):
        r = min(range(dp_size), key=lambda i: (loads[i], len(parts[i]), i))
        parts[r].append(s)
        loads[r] += s.num_tokens
    return [sorted(p, key=lambda s: s.uid) for p in parts]
