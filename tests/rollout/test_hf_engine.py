"""HFEngine: log-probs equal a teacher-forced forward, top-p, seeds, stops, in-place weight updates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_opd.convert.hf_io import HFCheckpointReader
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.rollout import RolloutConfig, build_engine
from megatron_opd.rollout.base import RolloutError, SamplingParams
from megatron_opd.rollout.hf_engine import HFEngine
from tests.rollout.conftest import INIT_STD
from tests.tolerance import logit_magnitude, ulps

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15], [3, 2]]


@pytest.fixture(scope="module")
def engine(dense_dir: Path) -> HFEngine:
    return HFEngine(dense_dir, batch_size=3, seed=0)


@pytest.fixture(scope="module")
def reference(dense_dir: Path) -> torch.nn.Module:
    """The same checkpoint loaded independently of the engine."""
    return AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()


def teacher_forced(model: torch.nn.Module, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) at every response position of one unpadded sequence: [len(tokens), V]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].double()
    return torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"), [(1.0, 1.0, -1), (0.7, 1.0, -1), (1.0, 0.6, -1), (0.7, 0.8, 5)]
)
def test_logprobs_equal_teacher_forced_forward(engine, reference, temperature, top_p, top_k) -> None:
    sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=12, seed=11)
    outs = engine.generate(PROMPTS, sp)
    for prompt, c in zip(PROMPTS, outs):
        assert c.prompt_ids == prompt and c.finish_reason == "length" and len(c.token_ids) == 12
        ref = teacher_forced(reference, prompt, c.token_ids, temperature)
        got = torch.tensor(c.logprobs, dtype=torch.float64)
        # fp32 decoding with a KV cache, batched and padded, against float64 log-softmax of one unpadded fp32
        # forward: other reduction orders in every matmul, a few ulps of the logits per layer; 64 ulps of the
        # largest |logit| (scaled by 1/T, as the log-softmax sees them)
        tol = ulps(torch.float32, logit_magnitude(reference, [prompt + c.token_ids]) / temperature, 64)
        torch.testing.assert_close(got, ref[torch.arange(12), c.token_ids], atol=tol, rtol=0)
        # every sampled token lies in its position's top-k / nucleus (computed here, independently): the mass before
        # it is at most top_p, up to the engine's probabilities being off by `tol` relative to these and its fp32
        # cumulative sum (an ulp of 1 per term)
        for pos, tok in enumerate(c.token_ids):
            probs = ref[pos].exp()
            ranked = probs.argsort(descending=True).tolist()
            rank = ranked.index(tok)
            assert top_k == -1 or rank < top_k
            assert probs[ranked[:rank]].sum() <= top_p + tol + ulps(torch.float32, 1.0, rank)


def test_top_p_actually_truncates(engine, reference) -> None:
    """With top_p=0.3 the sampled tokens are far more probable than under top_p=1 (the model is peaked)."""

    def mean_logprob(top_p: float) -> float:
        outs = engine.generate(PROMPTS * 4, SamplingParams(top_p=top_p, max_new_tokens=8, seed=3))
        return sum(sum(c.logprobs) for c in outs) / sum(len(c.logprobs) for c in outs)

    assert mean_logprob(0.3) > mean_logprob(1.0) + 0.5


def test_greedy(engine, reference) -> None:
    (c,) = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=6))
    seq = list(PROMPTS[1])
    for tok, lp in zip(c.token_ids, c.logprobs):
        ref = teacher_forced(reference, seq, [0], 1.0)[0]  # next-token distribution after seq
        tol = ulps(torch.float32, logit_magnitude(reference, [seq]), 64)  # as in the test above
        assert tok == int(ref.argmax()) and lp == pytest.approx(float(ref.max()), abs=tol)
        seq.append(tok)


def test_seeds_and_batching(engine, dense_dir: Path) -> None:
    sp = SamplingParams(max_new_tokens=10, seed=7)
    a = engine.generate(PROMPTS, sp)
    assert [c.token_ids for c in engine.generate(PROMPTS, sp)] == [c.token_ids for c in a]
    single = HFEngine(dense_dir, batch_size=1, seed=0).generate(PROMPTS, sp)
    assert [c.token_ids for c in single] == [c.token_ids for c in a]  # independent of batching
    # row i uses seed + i: the same prompt repeated gives different samples, and a shifted call matches
    rep = engine.generate([PROMPTS[0]] * 3, sp)
    assert len({tuple(c.token_ids) for c in rep}) > 1
    shifted = engine.generate(PROMPTS[1:], SamplingParams(max_new_tokens=10, seed=8))
    assert [c.token_ids for c in shifted] == [c.token_ids for c in a[1:]]
    # seed=None: drawn from the engine's generator, so two engines with the same seed agree
    free = SamplingParams(max_new_tokens=10)
    e1, e2 = HFEngine(dense_dir, seed=5), HFEngine(dense_dir, batch_size=2, seed=5)
    assert [c.token_ids for c in e1.generate(PROMPTS, free)] == [c.token_ids for c in e2.generate(PROMPTS, free)]
    assert [c.token_ids for c in e1.generate(PROMPTS, free)] != [c.token_ids for c in e2.generate(PROMPTS[::-1], free)][
        ::-1
    ]


def test_stops(engine, dense_dir: Path) -> None:
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    (ref,) = engine.generate([PROMPTS[0]], greedy)
    stop = next(t for i, t in enumerate(ref.token_ids) if i >= 1 and t not in ref.token_ids[:i])
    cut = ref.token_ids.index(stop) + 1
    (c,) = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(stop,)))
    assert c.finish_reason == "stop" and c.token_ids == ref.token_ids[:cut] and c.logprobs == ref.logprobs[:cut]
    eos_engine = HFEngine(dense_dir, seed=0, eos_token_ids=[stop])  # an EOS id stops the same way
    (e,) = eos_engine.generate([PROMPTS[0]], greedy)
    assert e.finish_reason == "stop" and e.token_ids == ref.token_ids[:cut]
    (z,) = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=0))
    assert z.token_ids == [] and z.finish_reason == "length"


def test_bad_prompts(engine) -> None:
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside \[0, 128\): \[128\]"):
        engine.generate([[1, 128]], SamplingParams())


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("moe", [False, True])
def test_update_weights_in_place(tmp_path: Path, moe: bool) -> None:
    cfg = tiny_config(moe=moe)
    save_tiny_model(tmp_path / "a", cfg, seed=0, init_std=INIT_STD)
    save_tiny_model(tmp_path / "b", cfg, seed=1, init_std=INIT_STD)
    engine = HFEngine(tmp_path / "a", seed=0)
    target = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"), dtype=torch.float32).eval()
    sp = SamplingParams(max_new_tokens=8, seed=1)
    before = engine.generate(PROMPTS, sp)
    engine.update_weights(HFCheckpointReader(tmp_path / "b").items())  # on-disk names (per-expert for MoE)
    got, want = _params(engine.model), _params(target)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    after = engine.generate(PROMPTS, sp)
    assert [c.token_ids for c in after] == [c.token_ids for c in HFEngine(tmp_path / "b", seed=0).generate(PROMPTS, sp)]
    assert [c.token_ids for c in after] != [c.token_ids for c in before]


def test_update_weights_tied_embeddings_and_errors(tmp_path: Path) -> None:
    cfg = tiny_config(tie_word_embeddings=True)
    save_tiny_model(tmp_path / "a", cfg, seed=0, init_std=INIT_STD)
    save_tiny_model(tmp_path / "b", cfg, seed=1, init_std=INIT_STD)
    assert "lm_head.weight" not in HFCheckpointReader(tmp_path / "b")
    engine = HFEngine(tmp_path / "a", seed=0)
    engine.update_weights(HFCheckpointReader(tmp_path / "b").items())
    emb = HFCheckpointReader(tmp_path / "b").get("model.embed_tokens.weight")
    assert torch.equal(engine.model.lm_head.weight, emb) and torch.equal(engine.model.model.embed_tokens.weight, emb)
    with pytest.raises(RolloutError, match=r"'model\.layers\.9\.mlp\.up_proj\.weight' names no tensor"):
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(96, 64))])
    with pytest.raises(RolloutError, match=r"model.norm.weight has shape \(3,\), the model expects \(64,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])


def test_build_engine_hf(dense_dir: Path) -> None:
    class Tok:
        eos_token_id = 9

    eng = build_engine(RolloutConfig(engine="hf", batch_size=2, seed=3), str(dense_dir), tokenizer=Tok())
    assert isinstance(eng, HFEngine) and eng.eos_token_ids == [9] and eng.batch_size == 2 and eng.health()
    eng.shutdown()
    assert not eng.health()
