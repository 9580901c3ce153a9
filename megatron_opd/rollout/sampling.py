"""Next-token sampling with per-row temperature, top-k and top-p, and the log-probs rollouts report.

Order of operations (SGLang's sampler): logits / temperature -> softmax -> keep the top-k tokens
-> keep the smallest prefix of the sorted distribution whose mass reaches top-p (a token is kept
when the mass before it is <= top_p) -> sample from the renormalized remainder. The log-prob
returned for the sampled token is ``log_softmax(logits / temperature)`` before the truncation, as
SGLang returns it. Temperature 0 is greedy (argmax) with the temperature-1 log-prob. With
``original_logprobs`` (SGLang's ``SGLANG_RETURN_ORIGINAL_LOGPROB``) every row reports the
temperature-1 log-prob ``log_softmax(logits)`` instead (sampling is unchanged).

Each row draws from its own ``torch.Generator`` so a row's samples do not depend on the batch.
"""

from __future__ import annotations

import torch

NO_TOP_K = -1


def truncate_probs(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``probs`` [B, V] with the tokens outside each row's top-k / top-p set to 0 (not renormalized).

    ``top_k`` [B] (``-1``: all tokens), ``top_p`` [B] in (0, 1]."""
    vocab = probs.shape[-1]
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    ranks = torch.arange(vocab, device=probs.device)
    k = torch.where(top_k < 1, vocab, top_k)
    drop = (ranks[None, :] >= k[:, None]) | ((mass_before > top_p[:, None]) & (top_p[:, None] < 1.0))
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator],
    *,
    original_logprobs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` [B, V]; returns (token ids [B], their log-probs [B])."""
    logits = logits.float()
    greedy = temperature <= 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    logprobs = torch.log_softmax(logits / scale[:, None], dim=-1)
    probs = logprobs.exp()
    if original_logprobs:
        logprobs = torch.log_softmax(logits, dim=-1)
    if bool(((top_k >= 1) | (top_p < 1.0)).any()):
        probs = truncate_probs(probs, top_k, top_p)
    tokens = logits.argmax(dim=-1)
    for i, gen in enumerate(generators):
        if not greedy[i]:
            tokens[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]
