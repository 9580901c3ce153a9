"""Rollout log-probs are what token-level rollout correction compares them with: the trainer's
``ℓ_old`` (and the teachers' scores), ``log_softmax(logits / T)`` over the whole vocabulary at the
rollout temperature. Through ``opd serve`` answering both ways SGLang can (its default, and
``SGLANG_RETURN_ORIGINAL_LOGPROB``), and in the driver's worker specs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM

from megatron_opd.kernels import token_logprobs
from megatron_opd.rollout.base import RolloutError, SamplingParams
from megatron_opd.rollout.server import ServerFlags
from megatron_opd.rollout.sglang.client import SGLangEngine
from tests.rollout.conftest import serving
from tests.rollout.test_sglang_client import config
from tests.tolerance import logit_magnitude, ulps

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [11], [3, 2]]
SAMPLING = SamplingParams(temperature=0.7, top_p=0.8, top_k=5, max_new_tokens=10, seed=21)


@pytest.fixture(scope="module")
def reference(dense_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()


def trainer_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """``ℓ_old``: the trainer's kernel (``kernels.token_logprobs``, as the student's and the teachers'
    scoring call it) on the unpadded sequence at ``temperature``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    return token_logprobs(logits, torch.tensor(tokens), temperature=temperature).label_logprob.double()


def logprob_tol(model: torch.nn.Module, prompt: list[int], tokens: list[int], temperature: float) -> float:
    """The server's fp32 log-probs (decoding with a KV cache, batched and padded) against the trainer's kernel on one
    unpadded fp32 forward: other reduction orders in every matmul, a few ulps of the logits per layer; 64 ulps of
    the largest |logit| scaled by 1/T, as the log-softmax sees them."""
    return ulps(torch.float32, logit_magnitude(model, [prompt + tokens]) / temperature, 64)


def test_sglang_rollout_logprobs_are_the_trainers(dense_dir: Path, reference: torch.nn.Module) -> None:
    """SGLang's default (sampler.py: the log of ``softmax(logits / T)`` before top-k/top-p), with
    truncation on: the ratio ``exp(ℓ_old − ℓ_roll)`` is 1 up to numerics."""
    with serving(dense_dir, ServerFlags(deterministic_inference=True)) as srv:
        outs = SGLangEngine(config([srv.url]), str(dense_dir)).generate(PROMPTS, SAMPLING)
    for prompt, c in zip(PROMPTS, outs):
        want = trainer_logprobs(reference, prompt, c.token_ids, SAMPLING.temperature)
        tol = logprob_tol(reference, prompt, c.token_ids, SAMPLING.temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), want, atol=tol, rtol=0)


def test_a_server_reporting_temperature_one_logprobs_is_refused(dense_dir: Path, reference: torch.nn.Module) -> None:
    """Under ``SGLANG_RETURN_ORIGINAL_LOGPROB`` SGLang reports ``log_softmax(logits)`` for sampled
    rows too; the engine finds out when it connects and refuses the server, naming the fix."""
    body = {
        "input_ids": PROMPTS[0],
        "sampling_params": {"temperature": 0.7, "max_new_tokens": 8, "sampling_seed": 3},
        "return_logprob": True,
    }
    with serving(dense_dir, ServerFlags(deterministic_inference=True, original_logprobs=True)) as srv:
        meta = requests.post(srv.url + "/generate", json=body, timeout=60).json()["meta_info"]
        tokens = [t for _, t, _ in meta["output_token_logprobs"]]
        got = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]], dtype=torch.float64)
        tol = logprob_tol(reference, PROMPTS[0], tokens, 1.0)
        torch.testing.assert_close(got, trainer_logprobs(reference, PROMPTS[0], tokens, 1.0), atol=tol, rtol=0)
        assert (got - trainer_logprobs(reference, PROMPTS[0], tokens, 0.7)).abs().max() > 1e-2
        with pytest.raises(
            RolloutError, match=r"reports log-probs at temperature 1.*unset SGLANG_RETURN_ORIGINAL_LOGPROB"
        ):
            SGLangEngine(config([srv.url]), str(dense_dir))


def test_teachers_and_references_score_at_the_rollout_temperature(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker group (student ``ℓ_old``, teachers ``ℓ_T``, reference ``ℓ_R``) gets the rollout
    temperature its scoring runs at (``WorkerSpec.temperature`` -> ``score_microbatches``)."""
    from megatron_opd.config.schema import ModelConfig, OPDConfig, TeacherConfig
    from megatron_opd.trainer import driver

    made: list = []

    class Recording:
        def __init__(self, spec, placement, timeout_s, residency) -> None:
            self.spec, self.name = spec, spec.group
            made.append(spec)

    monkeypatch.setattr(driver, "StudentGroup", Recording)
    monkeypatch.setattr(driver, "ScoringGroup", Recording)
    monkeypatch.setattr(driver, "place", lambda cfg, specs: [None] * len(specs))
    cfg = OPDConfig(student=ModelConfig("student"))
    cfg.rollout.temperature = 0.7
    cfg.teachers = [TeacherConfig(n, name=n, base_path=f"{n}_base") for n in ("math", "code")]
    for reference in ("student_base", "teacher_base"):
        made.clear()
        tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
        objective = SimpleNamespace(requirements=SimpleNamespace(reference=reference))
        driver.build_groups(cfg, tokenizer, objective)
        assert len(made) == 1 + len(cfg.teachers) + (1 if reference == "student_base" else len(cfg.teachers))
        assert {spec.temperature for spec in made} == {0.7}
