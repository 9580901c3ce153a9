"""Request bodies and response parsing of SGLang's schema; weight-sync request construction."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.rollout.base import SamplingParams
from megatron_opd.rollout.sglang import protocol
from megatron_opd.rollout.sglang.weight_sync import DistributedWeightSync, LocalWeightSender, buckets

# field names of SGLang's request structs (managers/io_struct.py) the project sends
UPDATE_FROM_DISK_FIELDS = {"model_path", "load_format", "abort_all_requests", "weight_version"}
INIT_GROUP_FIELDS = {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
UPDATE_DISTRIBUTED_FIELDS = {
    "names",
    "dtypes",
    "shapes",
    "group_name",
    "flush_cache",
    "abort_all_requests",
    "weight_version",
}


def test_generate_body() -> None:
    sp = SamplingParams(temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=7, stop_token_ids=(2, 5))
    body = protocol.generate_body([[1, 2], [3]], sp, [10, 11])
    assert body == {
        "input_ids": [[1, 2], [3]],
        "sampling_params": [
            {
                "temperature": 0.6,
                "top_p": 0.9,
                "top_k": 20,
                "max_new_tokens": 7,
                "stop_token_ids": [2, 5],
                "sampling_seed": s,
            }
            for s in (10, 11)
        ],
        "return_logprob": True,
    }
    parsed = protocol.parse_generate_request(body, vocab_size=100)
    assert parsed.prompts == [[1, 2], [3]] and parsed.batched and parsed.seeds == [10, 11]
    assert parsed.sampling == [SamplingParams(**{**sp.__dict__, "seed": None})] * 2


def response(ids: list[int], kind: str = "length") -> dict:
    finish = {"type": "stop", "matched": ids[-1]} if kind == "stop" else {"type": kind, "length": len(ids)}
    return {
        "output_ids": ids,
        "meta_info": {"finish_reason": finish, "output_token_logprobs": [[-0.5, t, None] for t in ids]},
    }


def test_parse_generate_response() -> None:
    out = protocol.parse_generate_response([response([4, 5]), response([6], "stop")], [[1], [2, 3]])
    assert [(c.prompt_ids, c.token_ids, c.logprobs, c.finish_reason) for c in out] == [
        ([1], [4, 5], [-0.5, -0.5], "length"),
        ([2, 3], [6], [-0.5], "stop"),
    ]
    with pytest.raises(protocol.ProtocolError, match="a list of 1 for a batch of 2"):
        protocol.parse_generate_response([response([4])], [[1], [2]])
    bad = response([4, 5])
    bad["meta_info"]["output_token_logprobs"][1][1] = 9
    with pytest.raises(protocol.ProtocolError, match="do not match output_ids"):
        protocol.parse_generate_response([bad], [[1]])
    with pytest.raises(protocol.ProtocolError, match="lacks 'meta_info'"):
        protocol.parse_generate_response([{"output_ids": [1]}], [[1]])


def test_sampling_params_defaults_follow_sglang() -> None:
    sp, seed = protocol.parse_sampling_params({}, vocab_size=100)
    assert sp == SamplingParams(max_new_tokens=128) and seed is None  # SGLang's max_new_tokens default
    sp, _ = protocol.parse_sampling_params({"top_k": 1 << 30, "temperature": None, "n": 1, "stop": []}, 100)
    assert sp.top_k == -1 and sp.temperature == 1.0


def test_weight_update_bodies() -> None:
    assert set(protocol.update_weights_from_disk_body("/w", "3")) == UPDATE_FROM_DISK_FIELDS
    sync = DistributedWeightSync(["http://a:1", "http://b:2"], [2, 4], post=lambda *a: {}, sender=LocalWeightSender())
    bodies = sync.init_bodies("10.0.0.1", 29600)
    assert [b["rank_offset"] for b in bodies] == [1, 3] and {b["world_size"] for b in bodies} == {7}
    assert all(
        set(b) == INIT_GROUP_FIELDS and b["backend"] == "nccl" and b["group_name"] == "weight_update_group"
        for b in bodies
    )
    body = protocol.update_weights_from_distributed_body(["w"], ["bfloat16"], [[2, 3]], "g", "1")
    assert set(body) == UPDATE_DISTRIBUTED_FIELDS and getattr(torch, body["dtypes"][0]) is torch.bfloat16


def test_buckets() -> None:
    tensors = [(str(i), torch.zeros(n)) for i, n in enumerate([3, 3, 10, 1, 1])]  # float32: 4 bytes each
    assert [[n for n, _ in b] for b in buckets(tensors, 24)] == [["0", "1"], ["2"], ["3", "4"]]


def test_distributed_sync_needs_one_dp_replica_per_server() -> None:
    from megatron_opd.config.errors import ConfigError
    from megatron_opd.rollout.config import RolloutConfig

    cfg = RolloutConfig(engine="sglang")
    cfg.sglang.weight_sync, cfg.sglang.dp_size = "distributed", 2
    with pytest.raises(ConfigError, match=r"rollout.sglang.dp_size=2.*use dp_size=1 and more servers"):
        cfg.validate()


def test_max_restarts_is_not_negative() -> None:
    from megatron_opd.config.errors import ConfigError
    from megatron_opd.rollout.config import RolloutConfig

    cfg = RolloutConfig(engine="sglang")
    cfg.sglang.max_restarts = -1
    with pytest.raises(ConfigError, match=r"rollout.sglang.max_restarts=-1"):
        cfg.validate()
