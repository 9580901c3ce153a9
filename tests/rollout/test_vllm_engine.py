"""The vLLM engine as far as a machine without vLLM allows: clear import error, argument construction."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from megatron_opd.rollout import RolloutConfig, build_engine
from megatron_opd.rollout.base import RolloutError, SamplingParams
from megatron_opd.rollout.vllm_engine import completion_from_output, llm_kwargs, sampling_kwargs


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
