"""Rollout samples and how they become model inputs.

A :class:`Sample` is one prompt + sampled response with everything the step learns about it: the rollout
log-probs, the outcome reward, the response mask, and what each model scored (its
:class:`~megatron_opd.scoring.contract.SampleScores`). Worker groups receive lists of samples for their
data-parallel rank and cut them into :class:`MicroBatch`es under a token budget (:class:`MicroBatching`),
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
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_opd.scoring.contract import SampleScores

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection


@dataclasses.dataclass
class Sample:
    """One prompt and its sampled response. The per-response-token fields the objective reads are named as in
    its ``TokenBatch`` (``rollout_logp``, ``response_mask``, ``outcome_reward``)."""

    uid: int  # position in the global batch
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logp: list[float]  # [R] ℓ_roll, the rollout engine's log-probs
    finish_reason: str = "stop"
    teacher: str = "default"
    data_source: str = ""
    ground_truth: Any = None
    outcome_reward: float = 0.0  # rule-based, for metrics and accuracy-filtered AOPD
    response_mask: Tensor | None = None  # [R] float; None = all response tokens
    weight_versions: list[int] | None = None  # [R] the student version (optimizer steps) that sampled each token
    scores: SampleScores = dataclasses.field(default_factory=SampleScores)  # per source, filled in by scoring

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def response_len(self) -> int:
        return len(self.response_ids)


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

    @property
    def response_lens(self) -> list[int]:
        """Response tokens per sample, in the order of ``samples`` (their tokens are consecutive)."""
        return [s.response_len for s in self.samples]


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


@dataclasses.dataclass(frozen=True)
class MicroBatching:
    """How a model's rank cuts its samples into micro-batches: at most ``max_tokens`` per micro-batch (packed
    or padded), rows and packed lengths multiples of ``multiple_of`` (the TP size under sequence parallelism)."""

    max_tokens: int
    packed: bool = True
    pad_id: int = 0
    multiple_of: int = 1

    def build(self, samples: list[Sample], shape: tuple[int, int] | None = None) -> MicroBatch:
        """One micro-batch of ``samples``, at ``shape`` = (rows, length) when given."""
        if self.packed:
            return build_packed_microbatch(samples, self.pad_id, self.multiple_of, None if shape is None else shape[1])
        return build_microbatch(samples, self.pad_id, self.multiple_of, shape)

    def split(
        self, samples: list[Sample], groups: ProcessGroupCollection, at_least_one: bool = False
    ) -> list[MicroBatch]:
        """This DP rank's micro-batches. Under expert parallelism every DP rank runs the same number of
        micro-batches of the same shapes (MoE layers exchange tokens across them in each forward), padded with
        rows that hold no response tokens. ``at_least_one``: a rank without samples still runs one padding
        micro-batch (training: every DP rank must join the gradient reduction)."""
        parts = split_by_token_budget(samples, self.max_tokens, self.multiple_of, self.packed)
        if not parts and at_least_one:
            parts = [[]]
        mbs = [self.build(part) for part in parts]
        dp_size = dist.get_world_size(groups.dp)
        if dist.get_world_size(groups.ep) == 1 or dp_size == 1:
            return mbs
        mine = [tuple(mb.input_ids.shape) for mb in mbs]
        everyone: list[list[tuple[int, int]]] = [[] for _ in range(dp_size)]
        dist.all_gather_object(everyone, mine, group=groups.dp_cp)
        shapes = common_shapes(everyone)
        return [self.build(parts[i] if i < len(parts) else [], shape) for i, shape in enumerate(shapes)]


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
