"""``opd serve`` speaks SGLang's /generate schema and behaves as SGLang 0.5.23 where the project
depends on it: memory regions, idle-only release, health checks that generate, seeds only under
``--enable-deterministic-inference``, weight-update sessions (servers run in-process on free ports)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from megatron_opd.convert.hf_io import HFCheckpointReader
from megatron_opd.rollout.base import MEMORY_TAGS, SamplingParams
from megatron_opd.rollout.hf_engine import HFEngine
from megatron_opd.rollout.server import OPDServer, ServerFlags
from tests.rollout.conftest import serving
from tests.tolerance import logit_magnitude, ulps


@pytest.fixture(scope="module")
def server(dense_dir: Path) -> Iterator[OPDServer]:
    with serving(dense_dir, ServerFlags(deterministic_inference=True)) as srv:
        yield srv


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
    assert (
        info
        == requests.get(server.url + "/model_info").json()
        == {
            "model_path": str(dense_dir),
            "tokenizer_path": None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
        }
    )
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


def _post(srv: OPDServer, path: str, body: dict) -> requests.Response:
    return requests.post(srv.url + path, json=body, timeout=60)


def _gone(srv: OPDServer) -> bool:
    """The server stopped serving (SGLang's process dies with its scheduler)."""
    for _ in range(100):
        try:
            requests.get(srv.url + "/get_weight_version", timeout=1)
        except requests.ConnectionError:
            return True
        time.sleep(0.05)
    return False


def test_resuming_a_region_that_is_not_released_crashes_the_server(dense_dir: Path) -> None:
    """The colocated sequence the driver sent before (release all; resume weights for the sync;
    resume null before generating): SGLang expands null to every region and its scheduler dies
    on ``offload_tags.remove("weights")`` (scheduler_components/weight_updater.py)."""
    with serving(dense_dir) as srv:
        assert _post(srv, "/release_memory_occupation", {"tags": None}).status_code == 200
        assert srv.state.released == set(MEMORY_TAGS) == {"kv_cache", "weights", "cuda_graph"}
        assert _post(srv, "/resume_memory_occupation", {"tags": ["weights"]}).status_code == 200
        r = _post(srv, "/resume_memory_occupation", {"tags": None})
        assert r.status_code == 500 and "KeyError: 'weights'" in r.json()["error"]["message"]
        assert srv.crashed is not None and _gone(srv)
    with serving(dense_dir) as srv:  # naming the regions still released is fine
        assert _post(srv, "/release_memory_occupation", {"tags": []}).status_code == 200  # [] = all, like null
        assert _post(srv, "/resume_memory_occupation", {"tags": ["weights"]}).status_code == 200
        assert _post(srv, "/resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]}).status_code == 200
        assert srv.state.released == set() and srv.crashed is None
        r = _post(srv, "/resume_memory_occupation", {"tags": ["kv_cache"]})  # not released (any more)
        assert r.status_code == 500 and srv.crashed is not None


def test_release_while_a_generation_runs_crashes_the_server(dense_dir: Path) -> None:
    """SGLang asserts an idle server before releasing memory."""
    with serving(dense_dir) as srv:
        entered, go = threading.Event(), threading.Event()
        real = srv.state.engine.generate_rows

        def slow(*args, **kwargs):
            entered.set()
            go.wait(30)
            return real(*args, **kwargs)

        srv.state.engine.generate_rows = slow  # type: ignore[method-assign]
        answers: list[int] = []
        body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}
        worker = threading.Thread(target=lambda: answers.append(_post(srv, "/generate", body).status_code))
        worker.start()
        assert entered.wait(30)
        r = _post(srv, "/release_memory_occupation", {"tags": None})
        go.set()
        worker.join(30)
        assert r.status_code == 500 and "only when server is idle" in r.json()["error"]["message"]
        assert answers == [200] and srv.crashed is not None and srv.state.released == set()


def test_health_generates_a_token_within_the_health_timeout(dense_dir: Path) -> None:
    """``/health`` is ``/health_generate`` (http_server.py): one token from ``input_ids=[0]``; a
    server busy with a weight update for longer than the timeout is unhealthy (503); one busy
    generating is healthy at once."""
    with serving(dense_dir, ServerFlags(health_timeout_s=1.0)) as srv:
        calls: list[list[int]] = []
        real = srv.state.engine.generate_rows

        def recording(rows, **kwargs):
            calls.append(rows[0].prompt_ids)
            return real(rows, **kwargs)

        srv.state.engine.generate_rows = recording  # type: ignore[method-assign]
        assert requests.get(srv.url + "/health", timeout=30).status_code == 200 and calls == [[0]]
        srv.state._work.acquire()  # a weight update in progress
        try:
            start = time.monotonic()
            assert requests.get(srv.url + "/health", timeout=30).status_code == 503
            assert time.monotonic() - start >= 1.0
            srv.state._generations += 1  # ... or a generation: its running requests answer for it
            assert requests.get(srv.url + "/health_generate", timeout=30).status_code == 200
            srv.state._generations -= 1
        finally:
            srv.state._work.release()
        assert requests.get(srv.url + "/health", timeout=30).status_code == 200 and len(calls) == 2
    with serving(dense_dir, ServerFlags(health_generation=False, health_timeout_s=0.5)) as srv:
        srv.state._work.acquire()  # SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false: /health only
        try:
            assert requests.get(srv.url + "/health", timeout=30).status_code == 200
            assert requests.get(srv.url + "/health_generate", timeout=30).status_code == 503
        finally:
            srv.state._work.release()


def test_flags_from_the_environment() -> None:
    flags = ServerFlags.from_env(
        True,
        {
            "SGLANG_RETURN_ORIGINAL_LOGPROB": "True",
            "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0",
            "SGLANG_HEALTH_CHECK_TIMEOUT": "7",
        },
    )
    assert flags == ServerFlags(True, original_logprobs=True, health_generation=False, health_timeout_s=7.0)
    assert ServerFlags.from_env(False, {}) == ServerFlags()


def test_seeds_only_under_deterministic_inference(dense_dir: Path) -> None:
    """SGLang uses ``sampling_seed`` only with ``--enable-deterministic-inference`` (rows without
    one then get 42, sampling_batch_info.py); otherwise it samples from its own generator."""
    body = {"input_ids": [[1, 2, 3]] * 4, "sampling_params": {"max_new_tokens": 12, "sampling_seed": 5}}
    unseeded = {**body, "sampling_params": {"max_new_tokens": 12}}
    with serving(dense_dir) as srv:
        rows = [item["output_ids"] for item in _post(srv, "/generate", body).json()]
        again = [item["output_ids"] for item in _post(srv, "/generate", body).json()]
        assert len({tuple(r) for r in rows + again}) > 1  # the seed did not fix the samples
    with serving(dense_dir, ServerFlags(deterministic_inference=True)) as srv:
        ref = HFEngine(dense_dir, seed=0)
        rows = [item["output_ids"] for item in _post(srv, "/generate", body).json()]
        assert rows == [ref.generate([[1, 2, 3]], SamplingParams(max_new_tokens=12, seed=5))[0].token_ids] * 4
        rows = [item["output_ids"] for item in _post(srv, "/generate", unseeded).json()]
        assert rows == [ref.generate([[1, 2, 3]], SamplingParams(max_new_tokens=12, seed=42))[0].token_ids] * 4
        info = requests.get(srv.url + "/server_info", timeout=30).json()
        assert info["enable_deterministic_inference"] is True


def test_distributed_updates_need_a_session(server: OPDServer) -> None:
    """SGLang 0.5.23 loads ``/update_weights_from_distributed`` only between ``/begin_weight_update``
    and ``/end_weight_update`` (it checks the session before receiving anything)."""
    body = {"names": ["w"], "dtypes": ["float32"], "shapes": [[1]]}
    r = _post(server, "/update_weights_from_distributed", body)
    assert r.status_code == 400 and r.json()["success"] is False
    assert "must run between begin_weight_update() and end_weight_update()" in r.json()["message"]
    assert _post(server, "/begin_weight_update", {"selector": "all"}).json() == {"success": True, "message": "Success"}
    again = _post(server, "/begin_weight_update", {})
    assert again.status_code == 400 and "already open" in again.json()["message"]
    assert _post(server, "/end_weight_update", {}).status_code == 200
    closed = _post(server, "/end_weight_update", {})
    assert closed.status_code == 400 and "no weight-update session is open" in closed.json()["message"]
