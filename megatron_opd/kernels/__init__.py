"""Vocab-sized math for OPD objectives (OBJECTIVES.md §1-§5): sampled-token log-probs, entropy and log-probs at
given ids with autograd (also straight from hidden states and the LM-head shard), global top-k across
tensor-parallel ranks, and the divergence family on a top-K support.
Triton kernels on CUDA, a chunked torch path elsewhere (``dispatch``); see ``docs/kernels.md``."""

from megatron_opd.kernels.divergence import support_divergence
from megatron_opd.kernels.linear import linear_token_logprobs
from megatron_opd.kernels.logprobs import TokenLogprobs, token_logprobs
from megatron_opd.kernels.topk import topk_logprobs

__all__ = ["TokenLogprobs", "linear_token_logprobs", "support_divergence", "token_logprobs", "topk_logprobs"]
