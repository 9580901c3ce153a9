"""The vLLM engine on machines without vLLM: the clear import error, argument construction, and
against a stand-in with vLLM 0.34's signatures and sampler: log-probs in the trainer's convention
whatever ``logprobs_mode`` is needed, weight updates by worker method name, sleep / wake-up."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_opd.config.errors import ConfigError
from megatron_opd.convert.hf_io import HFCheckpointReader
from megatron_opd.rollout import RolloutConfig, build_engine
from megatron_opd.rollout.base import RolloutError, SamplingParams
from megatron_opd.rollout.disk_sync import write_hf_weights
from megatron_opd.rollout.hf_engine import HFEngine
from megatron_opd.rollout.vllm_engine import completion_from_output, exact_logprobs, llm_kwargs, sampling_kwargs
from tests.rollout import fake_vllm
from tests.tolerance import logit_magnitude, ulps


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_missing_vllm_is_a_clear_error() -> None:
    with pytest.raises(RolloutError, match=r"needs vLLM, which is not installed.*rollout.engine=sglang or hf"):
        build_engine(RolloutConfig(engine="vllm"), "/models/x")


def test_arguments() -> None:
    cfg = RolloutConfig(engine="vllm", seed=4, dtype="bf16")
    cfg.vllm.tensor_parallel_size, cfg.vllm.max_model_len = 2, 4096
    kw = llm_kwargs(cfg, "/m")
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["dtype"] == "bfloat16" and kw["seed"] == 4
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 4096 and kw["model"] == "/m"
    assert kw["enable_sleep_mode"] is False
    cfg.offload_when_idle = True  # LLM.sleep / wake_up between rollouts
    assert llm_kwargs(cfg, "/m")["enable_sleep_mode"] is True
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=-1, max_new_tokens=16, stop_token_ids=(3,))
    assert sampling_kwargs(sp, 123, stop_token_ids=[7]) == dict(
        n=1,
        temperature=0.7,
        top_p=0.9,
        top_k=-1,
        max_tokens=16,
        stop_token_ids=[3, 7],
        logprobs=0,
        seed=123,
        detokenize=False,
    )


def test_completion_from_output() -> None:
    lp = SimpleNamespace
    sample = SimpleNamespace(
        token_ids=[5, 9],
        logprobs=[{5: lp(logprob=-0.1)}, {9: lp(logprob=-2.0), 4: lp(logprob=-0.3)}],
        finish_reason="stop",
    )
    c = completion_from_output([1, 2], SimpleNamespace(outputs=[sample]))
    assert (c.prompt_ids, c.token_ids, c.logprobs, c.finish_reason) == ([1, 2], [5, 9], [-0.1, -2.0], "stop")
    with pytest.raises(RolloutError, match="no log-prob per sampled token"):
        completion_from_output(
            [1], SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5], logprobs=None, finish_reason="length")])
        )


# -- against a stand-in with vLLM 0.34's signatures and sampler (tests/rollout/fake_vllm.py) --------
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [11], [3, 2]]


@pytest.fixture
def vllm_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm.module())


@pytest.fixture(scope="module")
def reference(dense_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()


def trainer_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)[token]`` over the whole vocabulary at every response position (ℓ_old)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].double()[len(prompt) - 1 : -1]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k", "mode"),
    [
        (0.7, 1.0, -1, "processed_logprobs"),  # tempered, untruncated: after temperature, nothing masked
        (1.0, 0.6, 5, "raw_logprobs"),  # truncated at T=1: before top-k/top-p
        (0.0, 0.6, -1, "raw_logprobs"),  # greedy
    ],
)
def test_logprobs_are_the_trainers_in_either_mode(
    vllm_fake: None,
    dense_dir: Path,
    reference: torch.nn.Module,
    temperature: float,
    top_p: float,
    top_k: int,
    mode: str,
) -> None:
    cfg = RolloutConfig(engine="vllm", temperature=temperature, top_p=top_p, top_k=top_k, seed=3)
    engine = build_engine(cfg, str(dense_dir))
    assert engine.llm.logprobs_mode == mode
    sp = SamplingParams.from_config(cfg, seed=11, max_new_tokens=10)
    outs = engine.generate(PROMPTS, sp)
    scale = max(logit_magnitude(reference, [prompt + c.token_ids]) for prompt, c in zip(PROMPTS, outs))
    for prompt, c in zip(PROMPTS, outs):
        want = trainer_logprobs(reference, prompt, c.token_ids, temperature or 1.0)
        # the fake's fp32 forward of each prefix against one forward of the whole sequence: other shapes in every
        # matmul, a few ulps of the logits per layer; 64 ulps of the largest |logit| / T
        tol = ulps(torch.float32, scale / (temperature or 1.0), 64)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), want, atol=tol, rtol=0)
    if top_p < 1.0 and temperature > 0:  # the other mode reports the truncated distribution's values
        engine.llm.logprobs_mode = "processed_logprobs"
        other = engine.generate(PROMPTS, sp)
        assert [c.token_ids for c in other] == [c.token_ids for c in outs]
        gaps = [g - w for c, o in zip(outs, other) for w, g in zip(c.logprobs, o.logprobs)]
        # -log(kept mass) >= 0 (both values from the same logits, in float64: up to a few ulps of their scale below),
        # and > 0 where truncated
        assert min(gaps) >= -ulps(torch.float64, scale / temperature, 16) and max(gaps) > 1e-2


def test_logprobs_vllm_cannot_report_are_nan(vllm_fake: None, dense_dir: Path) -> None:
    """E.g. an evaluation at another temperature with top-p: NaN, never another distribution's values."""
    raw = build_engine(RolloutConfig(engine="vllm", top_p=0.6), str(dense_dir))  # raw_logprobs
    tempered = build_engine(RolloutConfig(engine="vllm", temperature=0.7), str(dense_dir))  # processed_logprobs
    evaluation = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=4, seed=1)
    for engine in (raw, tempered):
        (c,) = engine.generate([[1, 2]], evaluation)
        assert len(c.token_ids) == 4 and all(math.isnan(x) for x in c.logprobs)
    assert not any(
        math.isnan(x) for x in tempered.generate([[1, 2]], SamplingParams(max_new_tokens=4, seed=1))[0].logprobs
    )
    assert exact_logprobs("raw_logprobs", SamplingParams(temperature=0.0, top_p=0.5))


def test_config_refuses_rollouts_an_engine_cannot_report() -> None:
    with pytest.raises(ConfigError, match=r"rollout.engine='vllm'.*Fix: set rollout.top_p=1 and rollout.top_k=-1"):
        RolloutConfig(engine="vllm", temperature=0.7, top_p=0.9).validate()
    with pytest.raises(ConfigError, match=r"rollout.top_k=1: SGLang treats top_k=1 as greedy"):
        RolloutConfig(engine="sglang", temperature=0.7, top_k=1).validate()
    for ok in (
        RolloutConfig(engine="vllm", temperature=1.0, top_p=0.9),
        RolloutConfig(engine="vllm", temperature=0.7, top_p=1.0),
        RolloutConfig(engine="sglang", temperature=0.7, top_p=0.9, top_k=20),
        RolloutConfig(engine="hf", temperature=0.7, top_p=0.9, top_k=1),
    ):
        ok.validate()


def test_weights_load_through_a_worker_method(
    vllm_fake: None, dense_dir: Path, dense_dir_b: Path, tmp_path: Path
) -> None:
    """``collective_rpc("reload_weights", ...)`` by name with JSON arguments: no function or tensor
    goes through vLLM's serializer (it refuses functions under its defaults)."""
    cfg = RolloutConfig(engine="vllm", temperature=0.0)
    cfg.vllm.weight_sync_dir = str(tmp_path / "sync")
    engine = build_engine(cfg, str(dense_dir))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    with pytest.raises(TypeError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        engine.llm.collective_rpc(lambda worker: None)
    engine.update_weights(HFCheckpointReader(dense_dir_b).items())
    (method, kwargs), (reset, _) = engine.llm.calls
    assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True and reset == "reset_prefix_cache"
    assert kwargs["weights_path"].startswith(str(tmp_path / "sync")) and list((tmp_path / "sync").iterdir()) == []
    want_b = HFEngine(dense_dir_b, seed=0).generate(PROMPTS, greedy)
    assert [c.token_ids for c in engine.generate(PROMPTS, greedy)] == [c.token_ids for c in want_b]
    out = engine.weights_dir()  # the trainer's disk path: rank 0 of the student writes the files itself
    write_hf_weights(HFCheckpointReader(dense_dir).items(), out, str(dense_dir))
    engine.update_weights_from_dir(out)
    want = HFEngine(dense_dir, seed=0).generate(PROMPTS, greedy)
    assert [c.token_ids for c in engine.generate(PROMPTS, greedy)] == [c.token_ids for c in want]
    assert not Path(out).exists()


def test_memory_is_discarded_and_woken_by_tag(vllm_fake: None, dense_dir: Path) -> None:
    engine = build_engine(RolloutConfig(engine="vllm", offload_when_idle=True), str(dense_dir))
    engine.release_memory()
    engine.resume_memory(("weights",))
    engine.resume_memory()
    assert engine.llm.calls == [
        ("sleep", {"level": 2}),
        ("wake_up", {"tags": ["weights"]}),
        ("wake_up", {"tags": None}),
    ]
