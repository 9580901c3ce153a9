"""``opd serve`` speaks SGLang's /generate schema (server run in-process on a free port)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from megatron_opd.convert.hf_io import HFCheckpointReader
from megatron_opd.rollout.base import SamplingParams
from megatron_opd.rollout.hf_engine import HFEngine
from megatron_opd.rollout.server import OPDServer, ServerState
from tests.tolerance import logit_magnitude, ulps


@pytest.fixture(scope="module")
def server(dense_dir: Path) -> Iterator[OPDServer]:
    engine = HFEngine(dense_dir, batch_size=4, seed=0)
    srv = OPDServer(("127.0.0.1", 0), ServerState(engine, str(dense_dir), seed=0))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_batch_generate_schema(server: OPDServer) -> None:
    body = {
        "input_ids": [[1, 2, 3], [4, 5]],
        "sampling_params": [
            {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5, "sampling_seed": 3},
            {"temperature": 0.0, "max_new_tokens": 4, "stop_token_ids": [], "top_k": 1 << 30},
        ],
        "return_logprob": True,
        "rid": ["a", "b"],
    }
    out = requests.post(server.url + "/generate", json=body, timeout=30).json()
    assert isinstance(out, list) and len(out) == 2
    engine = server.state.engine
    want = [
        engine.generate([[1, 2, 3]], SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, seed=3))[0],
        engine.generate([[4, 5]], SamplingParams(temperature=0.0, max_new_tokens=4))[0],
    ]
    for item, rid, c in zip(out, ["a", "b"], want):
        assert set(item) == {"output_ids", "meta_info"}  # no tokenizer in the model directory: no text
        meta = item["meta_info"]
        assert item["output_ids"] == c.token_ids
        assert meta["id"] == rid and meta["weight_version"] == "default"
        assert meta["finish_reason"] == {"type": "length", "length": len(c.token_ids)}
        assert meta["prompt_tokens"] == len(c.prompt_ids) and meta["completion_tokens"] == len(c.token_ids)
        assert [t[1] for t in meta["output_token_logprobs"]] == c.token_ids
        # the same tokens' fp32 log-probs through other batch shapes (the server batched both prompts, padded):
        # the matmuls' reduction order differs, a few ulps of the logits per layer; 64 ulps of the largest |logit|
        tol = ulps(torch.float32, logit_magnitude(engine.model, [c.prompt_ids + c.token_ids]), 64)
        assert [t[0] for t in meta["output_token_logprobs"]] == pytest.approx(c.logprobs, abs=tol)
        assert all(t[2] is None for t in meta["output_token_logprobs"])
        assert meta["input_token_logprobs"][0][1] == c.prompt_ids[-1]
        assert {"cached_tokens", "e2e_latency"} <= set(meta)


def test_single_prompt_and_stop(server: OPDServer) -> None:
    greedy = {"temperature": 0, "max_new_tokens": 6}
    first = requests.post(server.url + "/generate", json={"input_ids": [7, 8], "sampling_params": greedy}).json()
    assert isinstance(first, dict) and "output_token_logprobs" not in first["meta_info"]  # return_logprob off
    stop = first["output_ids"][1]
    cut = first["output_ids"].index(stop) + 1
    body = {"input_ids": [7, 8], "sampling_params": {**greedy, "stop_token_ids": [stop]}, "return_logprob": True}
    out = requests.post(server.url + "/generate", json=body).json()
    assert out["output_ids"] == first["output_ids"][:cut]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"input_ids": [1], "sampling_params": {"min_p": 0.2}}, "min_p=0.2 is not supported"),
        ({"input_ids": [1], "sampling_params": {"typical_p": 0.2}}, "['typical_p'] are not supported"),
        ({"input_ids": [1], "sampling_params": {"top_p": 0}}, "top_p=0.0 must lie in (0, 1]"),
        ({"input_ids": [1], "stream": True}, "stream=true is not supported"),
        ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "sampling_params has 1 entries for a batch of 2"),
        ({"input_ids": [1, 500]}, "outside [0, 128)"),
        ({"text": "hello"}, "no tokenizer; send input_ids"),
        ({"sampling_params": {}}, "exactly one of input_ids and text"),
    ],
)
def test_bad_requests_are_400_with_sglang_error_shape(server: OPDServer, body: dict, message: str) -> None:
    r = requests.post(server.url + "/generate", json=body, timeout=30)
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]


def test_info_health_and_update_from_disk(server: OPDServer, dense_dir: Path, dense_dir_b: Path) -> None:
    info = requests.get(server.url + "/get_model_info").json()
    assert info == {
        "model_path": str(dense_dir),
        "tokenizer_path": None,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
    }
    assert requests.get(server.url + "/health").status_code == 200
    assert requests.get(server.url + "/health_generate").status_code == 200
    assert requests.get(server.url + "/nope").status_code == 404
    body = {
        "input_ids": [[1, 2, 3]],
        "sampling_params": {"max_new_tokens": 6, "sampling_seed": 1},
        "return_logprob": True,
    }
    before = requests.post(server.url + "/generate", json=body).json()
    try:
        r = requests.post(
            server.url + "/update_weights_from_disk", json={"model_path": str(dense_dir_b), "weight_version": "7"}
        )
        assert r.status_code == 200 and r.json()["success"] is True and "7" in r.json()["message"]
        after = requests.post(server.url + "/generate", json=body).json()
        assert after[0]["meta_info"]["weight_version"] == "7"
        want = HFEngine(dense_dir_b, seed=0).generate([[1, 2, 3]], SamplingParams(max_new_tokens=6, seed=1))[0]
        assert after[0]["output_ids"] == want.token_ids != before[0]["output_ids"]
        bad = requests.post(server.url + "/update_weights_from_disk", json={"model_path": "/nonexistent"})
        assert bad.status_code == 400 and bad.json()["success"] is False and "/nonexistent" in bad.json()["message"]
    finally:
        server.state.engine.update_weights(HFCheckpointReader(dense_dir).items())
        server.state.weight_version = "default"


def test_cli_reports_a_bad_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_opd.rollout.server import main

    assert main(["--model", str(tmp_path), "--port", "0"]) == 2
    assert "no config.json" in capsys.readouterr().err
