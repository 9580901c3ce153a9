"""SGLang's native HTTP schema, as the project speaks it (client) and serves it (``opd serve``).

Field names and shapes follow SGLang's ``GenerateReqInput``, ``SamplingParams`` and the
``/generate`` response built by its ``TokenizerManager``, and the weight-update request structs of
``managers/io_struct.py``:

- ``POST /generate`` body: ``input_ids`` (one list of ids, or a list of them for a batch),
  ``sampling_params`` (one dict for all, or one per prompt), ``return_logprob``.
  Response: one object per prompt (a list for a batch) ``{"text"?, "output_ids", "meta_info"}``;
  ``meta_info`` has ``id``, ``finish_reason`` (``{"type": "stop", "matched": id}`` |
  ``{"type": "length", "length": n}`` | ``{"type": "abort", "message": ...}``), ``prompt_tokens``,
  ``completion_tokens``, ``cached_tokens``, ``weight_version``, ``e2e_latency`` and, with
  ``return_logprob``, ``input_token_logprobs`` / ``output_token_logprobs`` as
  ``[logprob, token_id, text-or-null]`` triples.
- Errors: ``{"error": {"message": ...}}`` with status 400 (bad request) or 5xx.
- ``POST /update_weights_from_disk`` ``{model_path, load_format, abort_all_requests, weight_version}``
  -> ``{success, message, num_paused_requests}``.
- ``POST /init_weights_update_group`` ``{master_address, master_port, rank_offset, world_size,
  group_name, backend}`` and ``POST /update_weights_from_distributed`` ``{names, dtypes, shapes,
  group_name, flush_cache, abort_all_requests, weight_version}`` -> ``{success, message}``; SGLang
  0.5.23 loads a distributed update only inside a session, ``POST /begin_weight_update``
  ``{selector}`` ... ``POST /end_weight_update`` ``{}``.
- ``POST /release_memory_occupation`` / ``/resume_memory_occupation`` ``{tags}``: ``null`` (or
  ``[]``) means every region of :data:`~megatron_opd.rollout.base.MEMORY_TAGS`, on resume as well;
  resuming a region that is not released crashes SGLang's scheduler, so the client always names
  the regions it resumes.
- ``GET /server_info`` (``/get_server_info``): the server's resolved arguments, e.g.
  ``enable_deterministic_inference``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_opd.rollout.base import Completion, SamplingParams

DEFAULT_GROUP_NAME = "weight_update_group"
SGLANG_TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary" top-k

# sampling_params keys opd serve implements, and the keys it accepts only at SGLang's no-op default
SUPPORTED_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "sampling_seed")
NEUTRAL_SAMPLING_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "ignore_eos": False,
    "stop": None,
    "stop_regex": None,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "logit_bias": None,
    "custom_params": None,
    "stream_interval": None,
}
TEXT_ONLY_SAMPLING_KEYS = ("skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")


class ProtocolError(ValueError):
    """A request or response that does not follow the schema."""


# -- client side -------------------------------------------------------------------------------
def sampling_params_json(sampling: SamplingParams, seed: int) -> dict[str, Any]:
    """SGLang ``sampling_params`` of one row (``sampling_seed``: the row's seed)."""
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_new_tokens": sampling.max_new_tokens,
        "stop_token_ids": list(sampling.stop_token_ids),
        "sampling_seed": seed,
    }


def generate_body(prompts: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> dict[str, Any]:
    """A batched ``/generate`` request by token ids, one ``sampling_params`` per prompt."""
    return {
        "input_ids": [list(p) for p in prompts],
        "sampling_params": [sampling_params_json(sampling, s) for s in seeds],
        "return_logprob": True,
    }


def parse_generate_response(body: Any, prompts: list[list[int]]) -> list[Completion]:
    """Completions from a batched ``/generate`` response (validated against the request)."""
    if not isinstance(body, list) or len(body) != len(prompts):
        got = f"a list of {len(body)}" if isinstance(body, list) else type(body).__name__
        raise ProtocolError(f"/generate answered {got} for a batch of {len(prompts)} prompts.")
    out = []
    for i, (item, prompt) in enumerate(zip(body, prompts)):
        try:
            ids = [int(t) for t in item["output_ids"]]
            meta = item["meta_info"]
            triples = meta["output_token_logprobs"]
            reason = meta["finish_reason"]
        except (KeyError, TypeError) as e:
            raise ProtocolError(f"/generate item {i} lacks {e} (needs output_ids and meta_info with logprobs).") from e
        if len(triples) != len(ids) or any(int(t[1]) != tok for t, tok in zip(triples, ids)):
            raise ProtocolError(f"/generate item {i}: output_token_logprobs do not match output_ids.")
        kind = reason.get("type") if isinstance(reason, dict) else reason
        if kind not in ("stop", "length", "abort"):
            raise ProtocolError(f"/generate item {i}: unknown finish_reason {reason!r}.")
        out.append(Completion(list(prompt), ids, [float(t[0]) for t in triples], kind))
    return out


def update_weights_from_disk_body(model_path: str, weight_version: str | None) -> dict[str, Any]:
    return {
        "model_path": model_path,
        "load_format": None,
        "abort_all_requests": False,
        "weight_version": weight_version,
    }


def init_weights_update_group_body(
    master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str, backend: str
) -> dict[str, Any]:
    return {
        "master_address": master_address,
        "master_port": master_port,
        "rank_offset": rank_offset,
        "world_size": world_size,
        "group_name": group_name,
        "backend": backend,
    }


def update_weights_from_distributed_body(
    names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str, weight_version: str | None
) -> dict[str, Any]:
    """``dtypes`` are torch dtype names without the ``torch.`` prefix (``bfloat16``), as SGLang reads them."""
    return {
        "names": names,
        "dtypes": dtypes,
        "shapes": shapes,
        "group_name": group_name,
        "flush_cache": True,
        "abort_all_requests": False,
        "weight_version": weight_version,
    }


def memory_occupation_body(tags: list[str]) -> dict[str, Any]:
    """``/release_memory_occupation`` and ``/resume_memory_occupation`` of the regions ``tags``
    (always named: ``null`` would resume regions that are not released)."""
    return {"tags": list(tags)}


def begin_weight_update_body() -> dict[str, Any]:
    return {"selector": "all"}


def server_arg(info: Any, key: str) -> Any:
    """``key`` of a ``/server_info`` answer (resolved server arguments, flat or grouped by
    namespace); ``None`` when absent."""
    if not isinstance(info, dict):
        return None
    if key in info:
        return info[key]
    nested = [v[key] for v in info.values() if isinstance(v, dict) and key in v]
    return nested[0] if nested else None


# -- server side -------------------------------------------------------------------------------
@dataclasses.dataclass
class GenerateRequest:
    """A parsed ``/generate`` request: one entry per prompt."""

    prompts: list[list[int]] | None  # None when the request gave ``text``
    texts: list[str] | None
    sampling: list[SamplingParams]
    seeds: list[int | None]
    return_logprob: list[bool]
    rids: list[str | None]
    batched: bool


def _per_item(value: Any, n: int, key: str, batched: bool) -> list[Any]:
    if batched and isinstance(value, list):
        if len(value) != n:
            raise ProtocolError(f"{key} has {len(value)} entries for a batch of {n} prompts.")
        return value
    return [value] * n


def parse_sampling_params(d: Any, vocab_size: int) -> tuple[SamplingParams, int | None]:
    """SGLang ``sampling_params`` -> (SamplingParams, seed). Unsupported options are an error."""
    d = dict(d or {})
    if not all(isinstance(k, str) for k in d):
        raise ProtocolError("sampling_params keys must be strings.")
    unknown = sorted(
        set(d) - set(SUPPORTED_SAMPLING_KEYS) - set(NEUTRAL_SAMPLING_DEFAULTS) - set(TEXT_ONLY_SAMPLING_KEYS)
    )
    if unknown:
        raise ProtocolError(f"sampling_params {unknown} are not supported by opd serve.")
    for key, neutral in NEUTRAL_SAMPLING_DEFAULTS.items():
        if key in d and d[key] not in (neutral, None) and not (key == "stop" and d[key] == []):
            raise ProtocolError(f"sampling_params.{key}={d[key]!r} is not supported by opd serve (only {neutral!r}).")
    temperature = d.get("temperature")
    try:
        top_k = -1 if d.get("top_k") is None else int(d["top_k"])
        sampling = SamplingParams(
            temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if d.get("top_p") is None else float(d["top_p"]),
            top_k=-1 if top_k >= min(vocab_size, SGLANG_TOP_K_ALL) else top_k,  # "all tokens"
            max_new_tokens=128 if d.get("max_new_tokens") is None else int(d["max_new_tokens"]),  # SGLang's default
            stop_token_ids=tuple(int(t) for t in d.get("stop_token_ids") or ()),
        )
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"sampling_params: {e}") from e
    seed = d.get("sampling_seed")
    return sampling, None if seed is None else int(seed)


def parse_generate_request(body: Any, vocab_size: int) -> GenerateRequest:
    if not isinstance(body, dict):
        raise ProtocolError("the /generate body must be a JSON object.")
    if body.get("stream"):
        raise ProtocolError("stream=true is not supported by opd serve; send stream=false.")
    if body.get("logprob_start_len") not in (None, -1) or body.get("top_logprobs_num") not in (None, 0):
        raise ProtocolError("opd serve returns output-token log-probs only (logprob_start_len=-1, top_logprobs_num=0).")
    ids, text = body.get("input_ids"), body.get("text")
    if (ids is None) == (text is None):
        raise ProtocolError("give exactly one of input_ids and text.")
    if ids is not None:
        if not isinstance(ids, list) or not ids:
            raise ProtocolError("input_ids must be a non-empty list of token ids (or a list of such lists).")
        batched = isinstance(ids[0], list)
        prompts = ids if batched else [ids]
        if not all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompts):
            raise ProtocolError("input_ids must hold integers only.")
        texts = None
    else:
        batched = isinstance(text, list)
        texts = text if batched else [text]
        if not all(isinstance(t, str) for t in texts):
            raise ProtocolError("text must be a string or a list of strings.")
        prompts = None
    n = len(prompts if prompts is not None else texts)
    parsed = [
        parse_sampling_params(d, vocab_size)
        for d in _per_item(body.get("sampling_params"), n, "sampling_params", batched)
    ]
    rid = body.get("rid")
    rids = [f"{rid}_{i}" for i in range(n)] if batched and isinstance(rid, str) else _per_item(rid, n, "rid", batched)
    return GenerateRequest(
        prompts=prompts,
        texts=texts,
        sampling=[p[0] for p in parsed],
        seeds=[p[1] for p in parsed],
        return_logprob=[bool(x) for x in _per_item(body.get("return_logprob"), n, "return_logprob", batched)],
        rids=rids,
        batched=batched,
    )


def finish_reason_json(completion: Completion, matched: int | None) -> dict[str, Any]:
    if completion.finish_reason == "stop":
        return {"type": "stop", "matched": matched}
    if completion.finish_reason == "length":
        return {"type": "length", "length": len(completion.token_ids)}
    return {"type": "abort", "message": "aborted"}


def generate_response_item(
    completion: Completion,
    *,
    rid: str,
    matched: int | None,
    last_prompt_logprob: float | None,
    return_logprob: bool,
    weight_version: str,
    latency_s: float,
    text: str | None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": finish_reason_json(completion, matched),
        "prompt_tokens": len(completion.prompt_ids),
        "weight_version": weight_version,
    }
    if return_logprob:
        meta["input_token_logprobs"] = [[last_prompt_logprob, completion.prompt_ids[-1], None]]
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(completion.logprobs, completion.token_ids)]
    meta.update(completion_tokens=len(completion.token_ids), cached_tokens=0, e2e_latency=latency_s)
    item: dict[str, Any] = {"output_ids": completion.token_ids, "meta_info": meta}
    return {"text": text, **item} if text is not None else item
