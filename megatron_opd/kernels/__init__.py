"""Vocab-sized math for OPD objectives (docs/objectives.md §1-§5): sampled-token log-probs, entropy and log-probs at
given ids with autograd (also straight from hidden states and the LM-head shard, and as a loss whose gradient the
forward computes), global top-k across
tensor-parallel ranks (also fused with the LM head and the sampled-token log-prob), and the divergence family on a
top-K support.

One module per op, each with its autograd function (or forward-only function) and its float64 reference; the
vocab-sized passes come from a ``backend.VocabBackend``: the Triton kernels on CUDA, a chunked torch path elsewhere.
See ``docs/kernels.md``."""

from megatron_opd.kernels.divergence import support_divergence
from megatron_opd.kernels.linear import linear_token_logprobs
from megatron_opd.kernels.linear_loss import linear_logprob_loss
from megatron_opd.kernels.linear_topk import TopkLogprobs, linear_topk_logprobs
from megatron_opd.kernels.token_logprobs import TokenLogprobs, token_logprobs
from megatron_opd.kernels.topk import topk_logprobs

__all__ = [
    "TokenLogprobs",
    "TopkLogprobs",
    "linear_logprob_loss",
    "linear_token_logprobs",
    "linear_topk_logprobs",
    "support_divergence",
    "token_logprobs",
    "topk_logprobs",
]
