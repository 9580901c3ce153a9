"""``VLLMEngine``: rollouts from an in-process ``vllm.LLM`` on the trainer's GPUs (GPU only).

The G-OPD reference code rolls out with vLLM; this engine gives the same on this project's
protocol. Prompts go in as token ids (``{"prompt_token_ids": ...}``), one ``vllm.SamplingParams``
per prompt with its own seed and ``logprobs=0`` (the sampled token's log-prob only).

Log-prob semantics differ from SGLang's: the engine is built with
``logprobs_mode="processed_logprobs"``, so vLLM reports log-probs after temperature AND its top-k /
top-p processing (the truncated, renormalized distribution it sampled from). With ``top_p=1`` and
``top_k=-1`` this equals SGLang's ``log_softmax(logits / T)``; with truncation it is larger by the
log of the kept mass. vLLM's default (``raw_logprobs``) would ignore the temperature, which
rollout correction must not.

Weights are reloaded in place with ``LLM.collective_rpc``: every worker runs its model's
``load_weights`` on buckets of (HF name, tensor) pairs, which vLLM maps itself (fused QKV, MoE
experts). ``vllm`` is imported when the engine is built; without it the error says what to do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from megatron_opd.rollout.base import Completion, RolloutError, SamplingParams, row_seeds
from megatron_opd.rollout.config import RolloutConfig
from megatron_opd.rollout.sglang.weight_sync import buckets

_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise RolloutError(
            "rollout.engine=vllm needs vLLM, which is not installed (it needs CUDA GPUs). Fix: "
            "pip install 'megatron_opd[vllm]' on a GPU machine, or use rollout.engine=sglang or hf."
        ) from e
    return vllm


def llm_kwargs(cfg: RolloutConfig, model_dir: str) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for the rollout config."""
    v = cfg.vllm
    kwargs: dict[str, Any] = dict(
        model=model_dir,
        tensor_parallel_size=v.tensor_parallel_size,
        gpu_memory_utilization=v.gpu_memory_utilization,
        enforce_eager=v.enforce_eager,
        dtype=_DTYPES[cfg.dtype],
        seed=cfg.seed,
        logprobs_mode="processed_logprobs",
        enable_sleep_mode=cfg.offload_when_idle,
    )
    if v.max_model_len is not None:
        kwargs["max_model_len"] = v.max_model_len
    return kwargs


def sampling_kwargs(sampling: SamplingParams, seed: int, stop_token_ids: Iterable[int] = ()) -> dict[str, Any]:
    """Keyword arguments of one prompt's ``vllm.SamplingParams``."""
    return dict(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,  # -1: all tokens
        max_tokens=sampling.max_new_tokens,
        stop_token_ids=sorted(set(sampling.stop_token_ids) | set(stop_token_ids)),
        logprobs=0,  # the sampled token's log-prob only
        seed=seed,
        detokenize=False,
    )


def completion_from_output(prompt: list[int], output: Any) -> Completion:
    """A Completion from one ``vllm.RequestOutput`` (its first and only sample)."""
    sample = output.outputs[0]
    tokens = list(sample.token_ids)
    if sample.logprobs is None or len(sample.logprobs) != len(tokens):
        raise RolloutError("vLLM returned no log-prob per sampled token; the engine must ask for logprobs=0.")
    logprobs = [float(step[t].logprob) for step, t in zip(sample.logprobs, tokens)]
    reason = sample.finish_reason if sample.finish_reason in ("stop", "length") else "abort"
    return Completion(list(prompt), tokens, logprobs, reason)


def _load_weights_on_worker(worker: Any, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside each vLLM worker (``collective_rpc``): load one bucket of HF-named tensors."""
    loaded = worker.model_runner.model.load_weights(weights=named_tensors)
    return len(loaded) if loaded is not None else len(named_tensors)


class VLLMEngine:
    """A :class:`~megatron_opd.rollout.base.RolloutEngine` on an in-process ``vllm.LLM``."""

    def __init__(self, cfg: RolloutConfig, model_dir: str, *, eos_token_ids: Iterable[int] = ()) -> None:
        self._vllm = import_vllm()
        self.cfg = cfg
        self.stop_token_ids = list(eos_token_ids)
        self.llm = self._vllm.LLM(**llm_kwargs(cfg, str(model_dir)))
        self._rng = np.random.default_rng(cfg.seed)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        seeds = row_seeds(sampling, len(prompts), self._rng)
        params = [self._vllm.SamplingParams(**sampling_kwargs(sampling, s, self.stop_token_ids)) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [completion_from_output(p, o) for p, o in zip(prompts, outputs)]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for bucket in buckets(named_tensors, self.cfg.weight_sync_bucket_mb * 2**20):
            self.llm.collective_rpc(_load_weights_on_worker, args=([(n, t.detach()) for n, t in bucket],))
        self.llm.reset_prefix_cache()

    def health(self) -> bool:
        return self.llm is not None

    def weights_dir(self) -> str | None:
        return None  # in process: the tensors are handed over directly

    def update_weights_from_dir(self, path: str) -> None:
        from megatron_opd.convert.hf_io import HFCheckpointReader

        self.update_weights(HFCheckpointReader(path).items())

    def release_memory(self) -> None:
        """``LLM.sleep(level=1)``: weights to host memory, KV cache discarded."""
        self.llm.sleep(level=1)

    def resume_memory(self, tags: tuple[str, ...] | None = None) -> None:
        self.llm.wake_up(tags=None if tags is None else list(tags))

    def server_stats(self) -> dict[str, float]:
        return {}  # in-process: no servers to fail

    def shutdown(self) -> None:
        self.llm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
