"""Top-k / top-p truncation and sampling against brute-force and statistical references."""

from __future__ import annotations

import torch

from megatron_opd.rollout.sampling import sample_next, truncate_probs
from tests.tolerance import ulps


def brute_force_keep(probs: list[float], top_k: int, top_p: float) -> set[int]:
    """Tokens kept: among the top-k by probability, those whose preceding mass is <= top_p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if top_k >= 1:
        order = order[:top_k]
    kept, mass = set(), 0.0
    for i in order:
        if top_p < 1.0 and mass > top_p:
            break
        kept.add(i)
        mass += probs[i]
    return kept


def test_truncation_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(40, 17, generator=g, dtype=torch.float64) * 2, dim=-1)
    top_k = torch.tensor([-1, 1, 3, 17, 5] * 8)
    top_p = torch.tensor([1.0, 0.5, 0.9, 0.3, 0.99, 0.7, 1.0, 0.05] * 5, dtype=torch.float64)
    out = truncate_probs(probs, top_k, top_p)
    for b in range(probs.shape[0]):
        kept = brute_force_keep(probs[b].tolist(), int(top_k[b]), float(top_p[b]))
        assert set(torch.nonzero(out[b]).flatten().tolist()) == kept
        assert torch.equal(out[b][list(kept)], probs[b][list(kept)])


def test_sampling_distribution_and_logprobs() -> None:
    """Empirical frequencies = the renormalized nucleus of softmax(logits / T); log-probs pre-truncation."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
    temperature, top_p, n = 0.7, 0.8, 4000
    probs = torch.softmax(logits / temperature, dim=-1)
    nucleus = sorted(brute_force_keep(probs.tolist(), -1, top_p))
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    counts = torch.zeros_like(probs)
    for rep in range(5):
        gens = [torch.Generator().manual_seed(rep * n + i) for i in range(n)]
        tokens, lps = sample_next(
            logits.expand(n, -1), torch.full((n,), temperature), torch.full((n,), -1), torch.full((n,), top_p), gens
        )
        counts += torch.bincount(tokens, minlength=len(logits))
        # fp32 z / T and log-softmax at another batch shape (and T as a tensor): a few ulps at max |z / T|
        tol = ulps(torch.float32, logits.abs().max() / temperature, 8)
        torch.testing.assert_close(lps, torch.log_softmax(logits / temperature, -1)[tokens], atol=tol, rtol=0)
    freq = counts / counts.sum()
    assert set(torch.nonzero(counts).flatten().tolist()) == set(nucleus)
    assert (freq - expected).abs().max() < 0.015, (freq, expected)


def test_greedy_and_generator_determinism() -> None:
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(1))
    ones = torch.ones(3)
    tok, lp = sample_next(logits, torch.zeros(3), torch.full((3,), -1), ones, [torch.Generator() for _ in range(3)])
    assert torch.equal(tok, logits.argmax(-1))
    # bitwise: the same log-softmax of the same numbers (greedy divides by 1, exactly)
    assert torch.equal(lp, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0])

    def draw(seeds: list[int]) -> list[int]:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sample_next(
            logits[: len(seeds)], ones[: len(seeds)], torch.full((len(seeds),), -1), ones[: len(seeds)], gens
        )[0].tolist()

    assert draw([5, 6, 7]) == draw([5, 6, 7])
    assert draw([5, 6, 7])[:2] == draw([5, 6])  # a row's draw does not depend on the others
