"""The embedded rollout engine on Hugging Face ``transformers``: CPU runs, small GPU runs, and the
model behind ``opd serve``.

Prompts are sorted by length and decoded in batches of ``batch_size`` with left padding and a KV
cache (``DynamicCache``); every row carries its own sampling parameters and random generator
(:mod:`megatron_opd.rollout.sampling`), so a row's output does not depend on its batch.

``update_weights`` takes tensors named as in the HF checkpoint on disk and copies them into the
live model in place, including transformers' fused MoE expert tensors (``mlp.experts.gate_up_proj``
[E, 2F, H] holds expert e's ``gate_proj`` in rows ``:F`` and ``up_proj`` in rows ``F:``;
``mlp.experts.down_proj`` [E, H, F] its ``down_proj``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_opd.rollout.base import Completion, RolloutError, SamplingParams, row_seeds
from megatron_opd.rollout.sampling import sample_next

logger = logging.getLogger(__name__)

_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class RowRequest:
    """One sequence to generate, with its own sampling parameters and seed."""

    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int


@dataclasses.dataclass
class RowOutput:
    completion: Completion
    matched_stop: int | None  # the stop/EOS id that ended the row (finish_reason "stop")
    last_prompt_logprob: float | None  # log p(last prompt token | the rest of the prompt), temperature 1


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of auto, {', '.join(_DTYPES)}.")
    return _DTYPES[dtype]


def model_eos_ids(model_dir: str | Path, config: Any) -> list[int]:
    """EOS ids from ``generation_config.json`` (preferred, as SGLang) or ``config.json``."""
    from transformers import GenerationConfig

    eos = None
    if (Path(model_dir) / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True).eos_token_id
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]


class HFEngine:
    """A :class:`~megatron_opd.rollout.base.RolloutEngine` running a ``transformers`` causal LM in process."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        batch_size: int = 64,
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 1,
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        from megatron_opd.convert.hf_io import load_hf_config

        self.model_dir = str(model_dir)
        config = load_hf_config(model_dir)
        self.device = resolve_device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=resolve_dtype(dtype, self.device), local_files_only=True
        ).to(self.device)
        self.model.eval()
        self.config = self.model.config
        self.vocab_size = int(config.vocab_size)
        self.context_length = int(getattr(config, "max_position_embeddings", 1 << 30))
        self.eos_token_ids = sorted(set(eos_token_ids or []) | set(model_eos_ids(model_dir, config)))
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._abort = threading.Event()  # set by ``abort``: the running ``generate_rows`` returns its partial rows

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        seeds = row_seeds(sampling, len(prompts), self._rng)
        rows = [RowRequest(list(p), sampling, s) for p, s in zip(prompts, seeds)]
        return [out.completion for out in self.generate_rows(rows)]

    def generate_rows(self, rows: list[RowRequest], *, original_logprobs: bool = False) -> list[RowOutput]:
        """Generate every row (each with its own parameters and seed); outputs in input order.
        ``original_logprobs``: report temperature-1 log-probs (``opd serve`` under SGLang's
        ``SGLANG_RETURN_ORIGINAL_LOGPROB``; never what the trainer needs)."""
        for i, r in enumerate(rows):
            self._check_prompt(i, r.prompt_ids)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids))
        outputs: list[RowOutput | None] = [None] * len(rows)
        with self._lock, torch.inference_mode():
            try:
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start : start + self.batch_size]
                    for i, out in zip(chunk, self._generate_batch([rows[i] for i in chunk], original_logprobs)):
                        outputs[i] = out
            finally:
                self._abort.clear()  # an abort stops the generation running when it arrives, not the next one
        return outputs  # type: ignore[return-value]

    def abort(self) -> None:
        """Stop the running generation after its current decoding step (SGLang's ``abort_all``): unfinished
        rows, and rows not started yet, return their tokens so far with ``finish_reason="abort"``."""
        self._abort.set()

    def _check_prompt(self, i: int, ids: list[int]) -> None:
        if not ids:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token.")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {self.vocab_size}): {bad[:5]}.")
        if len(ids) >= self.context_length:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens, the model's context is {self.context_length}; "
                "shorten it (data.max_prompt_length)."
            )

    def _generate_batch(self, rows: list[RowRequest], original_logprobs: bool) -> list[RowOutput]:
        from transformers import DynamicCache

        dev, n = self.device, len(rows)
        lengths = [len(r.prompt_ids) for r in rows]
        width = max(lengths)
        ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - lengths[i] :] = torch.tensor(r.prompt_ids)
            mask[i, width - lengths[i] :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        temperature = torch.tensor([r.sampling.temperature for r in rows], device=dev, dtype=torch.float32)
        top_k = torch.tensor([r.sampling.top_k for r in rows], device=dev)
        top_p = torch.tensor([r.sampling.top_p for r in rows], device=dev, dtype=torch.float32)
        generators = [torch.Generator(device=dev).manual_seed(r.seed) for r in rows]
        stops = [set(self.eos_token_ids) | set(r.sampling.stop_token_ids) for r in rows]
        budget = [min(r.sampling.max_new_tokens, self.context_length - lengths[i]) for i, r in enumerate(rows)]

        cache = DynamicCache(config=self.config)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=2
        )
        prompt_lp = torch.log_softmax(out.logits[:, 0].float(), dim=-1).gather(-1, ids[:, -1:])[:, 0].tolist()
        logits = out.logits[:, -1]
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        finish: list[str | None] = ["length" if b <= 0 else None for b in budget]
        matched: list[int | None] = [None] * n
        for _ in range(max(budget)):
            if self._abort.is_set():
                finish = [f or "abort" for f in finish]
                break
            next_ids, next_lp = sample_next(
                logits, temperature, top_k, top_p, generators, original_logprobs=original_logprobs
            )
            for i, (t, lp) in enumerate(zip(next_ids.tolist(), next_lp.tolist())):
                if finish[i] is not None:
                    continue
                tokens[i].append(t)
                logprobs[i].append(lp)
                if t in stops[i]:
                    finish[i], matched[i] = "stop", t
                elif len(tokens[i]) >= budget[i]:
                    finish[i] = "length"
            if all(f is not None for f in finish):
                break
            mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache
            )
            logits = out.logits[:, -1]
        return [
            RowOutput(
                completion=Completion(list(r.prompt_ids), tokens[i], logprobs[i], finish[i] or "length"),
                matched_stop=matched[i],
                last_prompt_logprob=prompt_lp[i] if lengths[i] > 1 else None,
            )
            for i, r in enumerate(rows)
        ]

    # -- weights --------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (HF checkpoint name, tensor) pairs into the live model; unknown names are an error."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        touched: set[str] = set()
        with self._lock, torch.no_grad():
            for name, tensor in named_tensors:
                key, target = self._target(params, name)
                if tuple(target.shape) != tuple(tensor.shape):
                    raise RolloutError(
                        f"update_weights: {name} has shape {tuple(tensor.shape)}, the model expects "
                        f"{tuple(target.shape)}; the weights belong to another architecture."
                    )
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                touched.add(key)
        untouched = sorted(set(dict(self.model.named_parameters())) - touched)
        if untouched:
            logger.warning("update_weights left %d tensors unchanged, e.g. %s", len(untouched), untouched[:3])

    @staticmethod
    def _target(params: dict[str, torch.nn.Parameter], name: str) -> tuple[str, torch.Tensor]:
        """The live tensor (or slice of a fused tensor) an on-disk HF name maps to."""
        if name in params:
            return name, params[name]
        m = _EXPERT.match(name)
        if m:
            expert, proj = int(m["expert"]), m["proj"]
            key = f"{m['prefix']}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
            if key in params and expert < params[key].shape[0]:
                target = params[key][expert]
                if proj == "down_proj":
                    return key, target
                half = target.shape[0] // 2
                return key, target[:half] if proj == "gate_proj" else target[half:]
        raise RolloutError(
            f"update_weights: {name!r} names no tensor of the served model; send the HF checkpoint names "
            "of the same architecture (e.g. model.layers.0.self_attn.q_proj.weight)."
        )

    def weights_dir(self) -> str | None:
        return None  # in process: the tensors are handed over directly

    def update_weights_from_dir(self, path: str | Path) -> None:
        """``update_weights`` from an HF safetensors directory (``/update_weights_from_disk``)."""
        from megatron_opd.convert.hf_io import HFCheckpointReader

        self.update_weights(HFCheckpointReader(path).items())

    def health(self) -> bool:
        return self.model is not None

    def release_memory(self) -> None:
        """On a GPU: the weights go to host memory (kept); on CPU there is nothing to free."""
        if self.device.type == "cuda":
            with self._lock:
                self.model.to("cpu")
                torch.cuda.empty_cache()

    def resume_memory(self, tags: tuple[str, ...] | None = None) -> None:
        if self.device.type == "cuda" and (tags is None or "weights" in tags):
            with self._lock:
                self.model.to(self.device)  # no KV cache is kept between calls

    def server_stats(self) -> dict[str, float]:
        return {}  # in-process: no servers to fail

    def shutdown(self) -> None:
        """Release the model (the engine cannot generate afterwards)."""
        with self._lock:
            self.model = None  # type: ignore[assignment]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
