"""A stand-in for the ``vllm`` package (0.34) on a transformers model, for testing ``VLLMEngine``
without CUDA. It keeps the signatures the engine calls and the behaviour it depends on, read from
vLLM's source:

- ``SamplingParams`` (``sampling_params.py``): greedy (``temperature < 1e-5``) resets ``top_p=1``,
  ``top_k=0``; ``top_k`` 0 or -1 is every token.
- ``LLM(model, *, ..., **engine_args)`` (``entrypoints/llm.py``): the engine arguments the project
  passes (``engine/arg_utils.py`` ``EngineArgs`` fields) are accepted, any other is an error.
- ``LLM.generate``: the sampler of ``v1/worker/gpu/sample/sampler.py``: temperature, then
  ``apply_top_k_top_p`` (``v1/sample/ops/topk_topp_sampler.py``: top-k, then top-p over the
  top-k-renormalized probabilities, ascending cumulative mass ``<= 1 - p`` masked, the top token
  always kept), then a draw; ``logprobs_mode`` ``raw_logprobs`` reports ``log_softmax(logits)``,
  ``processed_logprobs`` the log-softmax of the processed (scaled, masked) logits.
- ``LLM.collective_rpc``: a method *name* runs on the worker; a function is refused, as vLLM's
  msgpack encoder refuses it without ``VLLM_ALLOW_INSECURE_SERIALIZATION`` (``v1/serial_utils.py``).
  The worker method used is ``reload_weights(weights_path=..., is_checkpoint_format=...)``.
- ``sleep(level)`` / ``wake_up(tags)`` are recorded.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch

ENGINE_ARGS = {"max_model_len", "logprobs_mode", "enable_sleep_mode"}  # EngineArgs fields the project passes
LOGPROBS_MODES = ("raw_logits", "raw_logprobs", "processed_logits", "processed_logprobs")


class SamplingParams:
    def __init__(
        self,
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
        max_tokens: int | None = 16,
        logprobs: int | None = None,
        detokenize: bool = True,
    ) -> None:
        self.n, self.temperature, self.top_p, self.top_k = n, temperature, top_p, top_k
        self.seed, self.stop_token_ids, self.max_tokens = seed, list(stop_token_ids or []), max_tokens
        self.logprobs, self.detokenize = logprobs, detokenize
        if self.temperature < 1e-5:
            self.top_p, self.top_k = 1.0, 0


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None


@dataclasses.dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


def apply_top_k_top_p(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """vLLM's ``apply_top_k_top_p_pytorch`` for one row ``[V]``."""
    logits_sort, logits_idx = logits.sort(descending=False)
    if 0 < k < logits.numel():
        logits_sort = logits_sort.masked_fill(logits_sort < logits_sort[logits.numel() - k], -float("inf"))
    if p < 1.0:
        probs_sum = logits_sort.softmax(-1).cumsum(-1)
        mask = probs_sum <= 1 - p
        mask[-1] = False
        logits_sort = logits_sort.masked_fill(mask, -float("inf"))
    return torch.empty_like(logits).scatter(0, logits_idx, logits_sort)


class LLM:
    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool = False,
        **kwargs: Any,
    ) -> None:
        from transformers import AutoModelForCausalLM

        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got unexpected keyword arguments {sorted(unknown)}")
        self.logprobs_mode = kwargs.get("logprobs_mode", "raw_logprobs")
        assert self.logprobs_mode in LOGPROBS_MODES
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.calls: list[tuple[str, Any]] = []

    @torch.no_grad()
    def generate(self, prompts: list[dict], sampling_params: list[SamplingParams], *, use_tqdm: bool = True) -> list:
        return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, sampling_params)]

    def _one(self, prompt: list[int], sp: SamplingParams) -> RequestOutput:
        gen = torch.Generator().manual_seed(sp.seed if sp.seed is not None else 0)
        ids, tokens, logprobs, reason = list(prompt), [], [], "length"
        while len(tokens) < (sp.max_tokens or 16):
            raw = self.model(torch.tensor([ids])).logits[0, -1].double()
            if sp.temperature < 1e-5:
                processed = raw
                token = int(raw.argmax())
            else:
                processed = apply_top_k_top_p(raw / sp.temperature, sp.top_k, sp.top_p)
                token = int(torch.multinomial(processed.softmax(-1), 1, generator=gen))
            value = torch.log_softmax(raw if self.logprobs_mode == "raw_logprobs" else processed, -1)[token]
            tokens.append(token)
            logprobs.append({token: Logprob(float(value))})
            ids.append(token)
            if token in sp.stop_token_ids:
                reason = "stop"
                break
        return RequestOutput(list(prompt), [CompletionOutput(0, "", tokens, None, logprobs, reason)])

    def collective_rpc(
        self, method: Any, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None
    ) -> list[Any]:
        if not isinstance(method, str):
            raise TypeError(
                f"Object of type {type(method)} is not serializableSet VLLM_ALLOW_INSECURE_SERIALIZATION=1 to allow "
                "fallback to pickle-based serialization."
            )
        kwargs = kwargs or {}
        self.calls.append((method, dict(kwargs)))
        if method != "reload_weights":
            raise AttributeError(f"Worker has no method {method!r}")
        from megatron_opd.convert.hf_io import HFCheckpointReader

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in HFCheckpointReader(kwargs["weights_path"]).items():
                params[name].copy_(tensor)
        return [None]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset_prefix_cache", {}))
        return True

    def sleep(self, level: int = 1, mode: str = "abort", reset_connector: bool = True) -> None:
        self.calls.append(("sleep", {"level": level}))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", {"tags": tags}))
        return True


def module() -> types.ModuleType:
    """The fake as an importable ``vllm`` module."""
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, SamplingParams  # type: ignore[attr-defined]
    return fake
