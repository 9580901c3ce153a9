"""``VLLMEngine``: rollouts from an in-process ``vllm.LLM`` on the trainer's GPUs (GPU only).

The G-OPD reference code rolls out with vLLM; this engine gives the same on this project's
protocol. Prompts go in as token ids (``{"prompt_token_ids": ...}``), one ``vllm.SamplingParams``
per prompt with its own seed and ``logprobs=0`` (the sampled token's log-prob only). Checked
against vLLM 0.34 (docs/rollout.md).

Log-probs. vLLM reports a sampled token's log-prob in the ``logprobs_mode`` fixed when the
``LLM`` is built (``config/model.py``; ``v1/worker/gpu/sample/sampler.py``): ``raw_logprobs`` is
``log_softmax(logits)`` at temperature 1, ``processed_logprobs`` the log-prob after temperature
AND top-k/top-p, under the renormalized truncated distribution. The project's convention
(``base.py``) is ``log_softmax(logits / T)`` over the whole vocabulary: ``processed_logprobs``
gives it whenever nothing is truncated, ``raw_logprobs`` whenever ``T`` is 0 or 1. The engine takes
the mode that is exact for the rollout sampling of its config (:func:`logprobs_mode`; config
validation refuses a rollout sampling neither mode reports) and returns NaN log-probs for a call
whose sampling its mode cannot report (:func:`exact_logprobs`, e.g. an evaluation at another
temperature with top-p), never another distribution's values.

Weights. vLLM's workers run only their own methods under vLLM's default settings (a Python
function sent through ``collective_rpc`` needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, and tensor
arguments are copied to host memory and msgpacked on the way). The engine calls each worker's
``reload_weights(weights_path=DIR)`` (``v1/worker/gpu_worker.py``) on an HF safetensors
directory: :meth:`weights_dir` hands the trainer a fresh one (rank 0 of the student writes it
itself when on this host, streaming from its gathers) and :meth:`update_weights_from_dir` loads and
removes it; :meth:`update_weights` writes given tensors there first. Then the prefix cache is reset.

Memory (``rollout.offload_when_idle``). ``LLM.sleep(level=2)`` discards weights and KV cache (the
trainer re-sends the weights after every release, ``rollout/offload.py``, so nothing is backed up
to host memory); ``LLM.wake_up(tags)``.

``vllm`` is imported when the engine is built; without it the error says what to do.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from megatron_opd.rollout.base import Completion, RolloutError, SamplingParams, row_seeds
from megatron_opd.rollout.config import RolloutConfig
from megatron_opd.rollout.disk_sync import new_weights_dir, write_hf_weights

logger = logging.getLogger(__name__)

_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SLEEP_LEVEL = 2  # weights and KV cache discarded: the weights are re-sent after every release


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise RolloutError(
            "rollout.engine=vllm needs vLLM, which is not installed (it needs CUDA GPUs). Fix: "
            "pip install 'megatron_opd[vllm]' on a GPU machine, or use rollout.engine=sglang or hf."
        ) from e
    return vllm


def logprobs_mode(cfg: RolloutConfig) -> str:
    """The vLLM ``logprobs_mode`` whose values are ``log_softmax(logits / T)`` over the whole
    vocabulary for the rollout sampling of ``cfg`` (``RolloutConfig.validate`` refuses the rest)."""
    truncated = cfg.top_p < 1.0 or cfg.top_k != -1
    return "raw_logprobs" if truncated else "processed_logprobs"


def exact_logprobs(mode: str, sampling: SamplingParams) -> bool:
    """Whether vLLM in ``mode`` reports ``log_softmax(logits / T)`` for ``sampling``. Greedy rows
    are exact in both modes (vLLM sets their top_p=1, top_k=0 and skips the temperature)."""
    if sampling.temperature == 0.0:
        return True
    if mode == "raw_logprobs":
        return sampling.temperature == 1.0
    return sampling.top_p == 1.0 and sampling.top_k == -1


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
        logprobs_mode=logprobs_mode(cfg),
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


def completion_from_output(prompt: list[int], output: Any, exact: bool = True) -> Completion:
    """A Completion from one ``vllm.RequestOutput`` (its first and only sample); ``exact=False``:
    the engine's ``logprobs_mode`` cannot report this sampling's log-probs, they are NaN."""
    sample = output.outputs[0]
    tokens = list(sample.token_ids)
    if sample.logprobs is None or len(sample.logprobs) != len(tokens):
        raise RolloutError("vLLM returned no log-prob per sampled token; the engine must ask for logprobs=0.")
    logprobs = [float(step[t].logprob) if exact else math.nan for step, t in zip(sample.logprobs, tokens)]
    reason = sample.finish_reason if sample.finish_reason in ("stop", "length") else "abort"
    return Completion(list(prompt), tokens, logprobs, reason)


class VLLMEngine:
    """A :class:`~megatron_opd.rollout.base.RolloutEngine` on an in-process ``vllm.LLM``."""

    def __init__(self, cfg: RolloutConfig, model_dir: str, *, eos_token_ids: Iterable[int] = ()) -> None:
        self._vllm = import_vllm()
        self.cfg, self.model_dir = cfg, str(model_dir)
        self.stop_token_ids = list(eos_token_ids)
        kwargs = llm_kwargs(cfg, self.model_dir)
        self.logprobs_mode = kwargs["logprobs_mode"]
        self.llm = self._vllm.LLM(**kwargs)
        self._rng = np.random.default_rng(cfg.seed)
        self._warned_inexact = False

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        exact = exact_logprobs(self.logprobs_mode, sampling)
        if not exact and not self._warned_inexact:
            self._warned_inexact = True
            logger.warning(
                "vLLM (logprobs_mode=%s) cannot report log_softmax(logits / %s) with top_p=%s, top_k=%s: "
                "these completions carry NaN log-probs",
                self.logprobs_mode,
                sampling.temperature,
                sampling.top_p,
                sampling.top_k,
            )
        seeds = row_seeds(sampling, len(prompts), self._rng)
        params = [self._vllm.SamplingParams(**sampling_kwargs(sampling, s, self.stop_token_ids)) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [completion_from_output(p, o, exact) for p, o in zip(prompts, outputs)]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        out = self.weights_dir()
        write_hf_weights(named_tensors, out, self.model_dir)
        self.update_weights_from_dir(out)

    def weights_dir(self) -> str:
        """A fresh directory under ``rollout.vllm.weight_sync_dir`` for the next weights."""
        return new_weights_dir(self.cfg.vllm.weight_sync_dir, "opd_vllm_weights_")

    def update_weights_from_dir(self, path: str) -> None:
        """Every worker's ``reload_weights`` from the HF directory ``path`` (removed afterwards)."""
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path), "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def health(self) -> bool:
        return self.llm is not None

    def release_memory(self) -> None:
        """``LLM.sleep(level=2)``: weights and KV cache discarded until the next weight sync."""
        self.llm.sleep(level=SLEEP_LEVEL)

    def resume_memory(self, tags: tuple[str, ...] | None = None) -> None:
        """``LLM.wake_up`` of ``tags`` (vLLM's ``weights`` / ``kv_cache``; ``None``: everything asleep)."""
        self.llm.wake_up(tags=None if tags is None else [t for t in tags if t in ("weights", "kv_cache")])

    def server_stats(self) -> dict[str, float]:
        return {}  # in-process: no servers to fail

    def shutdown(self) -> None:
        self.llm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
