"""The ``sglang`` engine against ``opd serve`` over real HTTP: batching over two servers, a server
killed mid-batch, a hanging server, retries running out, weight sync (disk and a gloo process group
inside a begin/end session), memory release in a colocated step's order, servers that must honour
the row seeds, health checks that take SGLang's time."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import requests

from megatron_opd.convert.hf_io import HFCheckpointReader
from megatron_opd.rollout import RolloutConfig, build_engine
from megatron_opd.rollout.base import Completion, RolloutError, SamplingParams
from megatron_opd.rollout.hf_engine import HFEngine
from megatron_opd.rollout.offload import OffloadedEngine
from megatron_opd.rollout.server import ServerFlags
from megatron_opd.rollout.sglang.client import SGLangEngine, healthy
from megatron_opd.rollout.sglang.launcher import ServerProcesses, find_free_ports
from tests.rollout.conftest import PROMPTS, serve_commands, serving

pytestmark = pytest.mark.slow
SP = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=8, seed=100)


@pytest.fixture(scope="module")
def all_servers(dense_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcesses]:
    """Three servers started together; the third is the one test_server_killed_mid_batch kills."""
    procs = ServerProcesses(serve_commands(dense_dir, 3), tmp_path_factory.mktemp("logs"))
    with procs.start(timeout_s=120):
        yield procs


@pytest.fixture(scope="module")
def servers(all_servers: ServerProcesses) -> list[str]:
    """The URLs of the two servers that stay up."""
    return all_servers.urls[:2]


@pytest.fixture(scope="module")
def reference(dense_dir: Path) -> HFEngine:
    return HFEngine(dense_dir, batch_size=16, seed=0)


def config(urls: list[str], **kw) -> RolloutConfig:
    fields = dict(engine="sglang", batch_size=2, seed=9, retry_backoff_s=0.05, request_timeout_s=30.0)
    cfg = RolloutConfig(**{**fields, **kw})
    cfg.sglang.urls = list(urls)
    cfg.sglang.concurrency_per_server = 2
    return cfg


def same(got: list[Completion], want: list[Completion], tol: float) -> None:
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    for g, w in zip(got, want):
        assert g.prompt_ids == w.prompt_ids and g.logprobs == pytest.approx(w.logprobs, abs=tol)


def test_batches_spread_over_two_servers(tol: float, servers: list[str], reference: HFEngine) -> None:
    engine = build_engine(config(servers), "unused-model-dir")
    assert isinstance(engine, SGLangEngine) and engine.health()
    same(engine.generate(PROMPTS, SP), reference.generate(PROMPTS, SP), tol)
    assert sum(sv.completed for sv in engine.servers) == 6 and all(sv.completed for sv in engine.servers)
    a, b = engine.servers  # the next request goes to the server with the fewest in flight, then fewest given
    a.inflight, b.inflight, a.assigned, b.assigned = 1, 0, 0, 5
    assert engine._pick() is b
    b.inflight = 1
    assert engine._pick() is a
    a.inflight = b.inflight = 2  # both at concurrency_per_server
    assert engine._pick() is None
    a.inflight = b.inflight = 0
    # seed=None: per-row seeds from the engine's generator (rollout.seed), like an HFEngine with that seed
    free = SamplingParams(max_new_tokens=5)
    same(engine.generate(PROMPTS, free), HFEngine(reference.model_dir, seed=9).generate(PROMPTS, free), tol)
    assert engine.failures == []


def test_server_killed_mid_batch(
    tol: float, all_servers: ServerProcesses, dense_dir: Path, reference: HFEngine
) -> None:
    sp = SamplingParams(temperature=1.0, max_new_tokens=40, seed=5)
    victim = all_servers.urls[2]
    cfg = config([all_servers.urls[0], victim], batch_size=1)
    cfg.sglang.concurrency_per_server = 1
    engine = SGLangEngine(cfg, str(dense_dir))
    dead = engine.servers[1]

    def kill_when_busy() -> None:
        while dead.inflight == 0 or dead.completed == 0:  # mid-batch: it has answered and is working again
            time.sleep(0.005)
        all_servers.kill(2)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    got = engine.generate(PROMPTS[:6], sp)
    killer.join(timeout=5)
    same(got, reference.generate(PROMPTS[:6], sp), tol)
    assert not dead.up and {f.url for f in engine.failures} == {victim}
    assert "Connection" in engine.failures[0].error
    assert engine.servers[0].completed + dead.completed == 6 and dead.completed >= 1


class _Hanging(BaseHTTPRequestHandler):
    """Healthy on GET /health, never answers /generate (until the test releases it)."""

    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self.release.wait(60)


@pytest.fixture
def hanging_url() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hanging)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    _Hanging.release.set()
    srv.shutdown()
    srv.server_close()
    _Hanging.release.clear()


def test_hanging_server_times_out_and_requests_move(
    tol: float, servers: list[str], hanging_url: str, reference: HFEngine
) -> None:
    cfg = config([hanging_url, servers[0]], request_timeout_s=1.0)
    engine = SGLangEngine(cfg, "unused")
    start = time.monotonic()
    got = engine.generate(PROMPTS[:6], SP)
    same(got, reference.generate(PROMPTS[:6], SP), tol)
    assert time.monotonic() - start < 20
    assert engine.failures and {f.url for f in engine.failures} == {hanging_url}
    assert "Timeout" in engine.failures[0].error and engine.servers[1].completed == 3


def test_retries_run_out_with_a_clear_error(hanging_url: str) -> None:
    engine = SGLangEngine(config([hanging_url], request_timeout_s=0.5, max_retries=1), "unused")
    start = time.monotonic()
    with pytest.raises(RolloutError, match=rf"failed 2 times; server failures: {hanging_url}: ReadTimeout"):
        engine.generate(PROMPTS[:2], SP)
    assert time.monotonic() - start < 15


def test_unreachable_and_refused(servers: list[str]) -> None:
    dead = f"http://127.0.0.1:{find_free_ports('127.0.0.1', 0, 1)[0]}"
    with pytest.raises(RolloutError, match="no SGLang server answers GET /health"):
        SGLangEngine(config([dead]), "unused")
    engine = SGLangEngine(config([dead, servers[0]]), "unused")
    assert [sv.up for sv in engine.servers] == [False, True]
    assert len(engine.generate(PROMPTS[:3], SP)) == 3
    with pytest.raises(RolloutError, match=r"refused a /generate request: HTTP 400.*outside \[0, 128\)"):
        engine.generate([[1, 999]], SP)


def _restore(servers: list[str], model_dir: Path) -> None:
    engine = SGLangEngine(config(servers), str(model_dir))
    engine.update_weights(HFCheckpointReader(model_dir).items())


def test_weight_update_from_disk(
    tol: float, servers: list[str], dense_dir: Path, dense_dir_b: Path, tmp_path: Path
) -> None:
    cfg = config(servers)
    cfg.sglang.weight_sync_dir = str(tmp_path / "sync")
    engine = SGLangEngine(cfg, str(dense_dir))
    before = engine.generate(PROMPTS, SP)
    try:
        engine.update_weights(HFCheckpointReader(dense_dir_b).items())
        after = engine.generate(PROMPTS, SP)
        same(after, HFEngine(dense_dir_b, seed=0).generate(PROMPTS, SP), tol)
        assert [c.token_ids for c in after] != [c.token_ids for c in before]
        assert [requests.get(u + "/get_model_info").json()["weight_version"] for u in servers] == ["1", "1"]
        assert list((tmp_path / "sync").iterdir()) == []  # the written checkpoint is removed after loading
    finally:
        _restore(servers, dense_dir)
    same(engine.generate(PROMPTS, SP), before, tol)


def test_weight_update_over_a_process_group(
    tol: float, servers: list[str], dense_dir: Path, dense_dir_b: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(servers)
    cfg.sglang.weight_sync = "distributed"
    cfg.sglang.weight_sync_backend = "gloo"
    cfg.weight_sync_bucket_mb = 1  # several /update_weights_from_distributed calls
    engine = SGLangEngine(cfg, str(dense_dir))
    try:
        engine.update_weights(HFCheckpointReader(dense_dir_b).items())
        same(engine.generate(PROMPTS, SP), HFEngine(dense_dir_b, seed=0).generate(PROMPTS, SP), tol)
        engine.update_weights(HFCheckpointReader(dense_dir).items())  # the same group, a second time
        same(engine.generate(PROMPTS, SP), HFEngine(dense_dir, seed=0).generate(PROMPTS, SP), tol)
    finally:
        engine.shutdown()  # destroys the group on both sides
        _restore(servers, dense_dir)
    assert "destroying the weight update group" not in caplog.text  # both sides tore it down cleanly
    for url in servers:
        gone = requests.post(url + "/destroy_weights_update_group", json={"group_name": "weight_update_group"})
        assert gone.status_code == 400 and "no weight update group" in gone.text


def test_memory_release_and_resume(
    all_servers: ServerProcesses, tol: float, servers: list[str], dense_dir: Path, dense_dir_b: Path
) -> None:
    """A colocated step against SGLang's memory semantics (no CPU backup; released weights come back
    without their values; resuming a region not released kills the server): release everything,
    resume ``weights`` for the sync, then exactly the regions still released before generating."""
    engine = SGLangEngine(config(servers), str(dense_dir))
    want, want_b = (HFEngine(d, seed=0).generate(PROMPTS, SP) for d in (dense_dir, dense_dir_b))
    try:
        engine.release_memory()
        assert all(sv.released == {"kv_cache", "weights", "cuda_graph"} for sv in engine.servers)
        with pytest.raises(RolloutError, match=r"HTTP 400.*memory \['cuda_graph', 'kv_cache', 'weights'\] is released"):
            engine.generate(PROMPTS[:2], SP)
        engine.resume_memory(("weights",))
        assert all(sv.released == {"kv_cache", "cuda_graph"} for sv in engine.servers)
        engine.update_weights(HFCheckpointReader(dense_dir).items())
        engine.resume_memory()  # null here would resume "weights" again: SGLang's scheduler dies
        assert all(sv.released == set() for sv in engine.servers)
        same(engine.generate(PROMPTS, SP), want, tol)
        engine.resume_memory()  # nothing released: nothing sent
        engine.release_memory()
        engine.resume_memory()  # no update: the weights are gone (zeros), the samples change
        assert [c.token_ids for c in engine.generate(PROMPTS, SP)] != [c.token_ids for c in want]

        offloaded = OffloadedEngine(engine, lambda e: e.update_weights(HFCheckpointReader(dense_dir_b).items()))
        for _ in range(2):  # the driver's order, twice: rollout, release, sync, rollout
            offloaded.release_memory()
            same(offloaded.generate(PROMPTS, SP), want_b, tol)  # weights pulled from the source first
        offloaded.release_memory()
        offloaded.update_weights(HFCheckpointReader(dense_dir).items())  # the trainer's sync
        same(offloaded.generate(PROMPTS, SP), want, tol)
        assert engine.failures == [] and [p.poll() for p in all_servers.procs[:2]] == [None, None]
    finally:
        engine.resume_memory()
        _restore(servers, dense_dir)


def test_a_crashed_server_exits(dense_dir: Path, tmp_path: Path) -> None:
    """``opd serve`` exits (code 1) where SGLang's scheduler dies, as the whole SGLang server does."""
    with ServerProcesses(serve_commands(dense_dir, 1), tmp_path).start(timeout_s=120) as procs:
        url = procs.urls[0]
        assert requests.post(url + "/release_memory_occupation", json={"tags": ["kv_cache"]}).status_code == 200
        r = requests.post(url + "/resume_memory_occupation", json={"tags": ["weights"]})
        assert r.status_code == 500 and "KeyError: 'weights'" in r.text
        assert procs.procs[0].wait(timeout=60) == 1
        assert "the scheduler crashed" in procs.log_tail(0)


def test_servers_must_honour_the_seeds_the_config_relies_on(tol: float, dense_dir: Path) -> None:
    """SGLang ignores ``sampling_seed`` without ``--enable-deterministic-inference``: with
    ``rollout.sglang.deterministic_inference`` the engine refuses a server whose /server_info lacks it."""
    with serving(dense_dir) as plain, serving(dense_dir, ServerFlags(deterministic_inference=True)) as seeded:
        cfg = config([plain.url])
        cfg.sglang.deterministic_inference = True
        with pytest.raises(
            RolloutError, match=r"does not report enable_deterministic_inference.*--enable-deterministic-inference"
        ):
            SGLangEngine(cfg, str(dense_dir))
        cfg.sglang.urls = [seeded.url]
        engine = SGLangEngine(cfg, str(dense_dir))
        same(engine.generate(PROMPTS, SP), HFEngine(dense_dir, seed=0).generate(PROMPTS, SP), tol)
        cfg.sglang.deterministic_inference, cfg.sglang.urls = False, [plain.url]
        assert len(SGLangEngine(cfg, str(dense_dir)).generate(PROMPTS, SP)) == len(PROMPTS)  # no seeds relied on


def test_health_probes_wait_for_sglangs_health_check(dense_dir: Path) -> None:
    """SGLang's ``/health`` generates a token and may take up to its 20 s timeout (a weight update
    holds the engine): a 5 s probe would mark a healthy server down."""
    with serving(dense_dir) as srv:
        srv.state._work.acquire()  # busy for 8 s
        timer = threading.Timer(8.0, srv.state._work.release)
        timer.start()
        short: list[bool] = []
        impatient = threading.Thread(target=lambda: short.append(healthy(srv.url, 5.0)))
        impatient.start()
        try:
            start = time.monotonic()
            engine = SGLangEngine(config([srv.url]), str(dense_dir))  # probes wait rollout.sglang.health_timeout_s
            assert time.monotonic() - start >= 7.0
            assert engine.servers[0].up and engine.failures == [] and engine.health()
        finally:
            timer.join()
            impatient.join()
        assert short == [False]


class _InfoServer(BaseHTTPRequestHandler):
    """A server whose ``GET /server_info`` is ``info`` (404 when None) and ``GET /get_server_info`` is
    ``deprecated_info``; ``/generate`` answers the log-prob probe as SGLang does: ``log_softmax(z / T)``, so the
    greedy row's values differ from the tempered row's."""

    info: dict | None = None
    deprecated_info: dict | None = None
    asked: ClassVar[list[str]] = []  # the paths asked, in order

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200 if payload is not None else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.asked.append(self.path)
        self._json({"/server_info": self.info, "/get_server_info": self.deprecated_info}.get(self.path, {}))

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        lp = -1.0 if body["sampling_params"]["temperature"] == 0.0 else -0.25
        n = body["sampling_params"]["max_new_tokens"]
        meta = {"output_token_logprobs": [[lp, 5, None]] * n, "finish_reason": {"type": "length", "length": n}}
        self._json({"output_ids": [5] * n, "meta_info": meta})


def test_deterministic_inference_is_read_where_each_release_reports_it() -> None:
    """SGLang 0.5.23's ``/server_info`` (``utils/common.py`` ``build_server_info``: the resolved arguments flat,
    ``launch_command``, the scheduler's info, ``kv_events``, per-DP ``internal_states``, ``version``); a release
    without ``/server_info`` (404) answers the deprecated ``/get_server_info``."""
    resolved = {"model_path": "/m", "enable_deterministic_inference": True, "random_seed": 1}
    current = {**resolved, "launch_command": "python -m sglang.launch_server", "max_req_input_len": 4096}
    current |= {"kv_events": None, "internal_states": [{"last_gen_throughput": 0.0}], "version": "0.5.23"}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _InfoServer)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    cfg = config([f"http://127.0.0.1:{srv.server_address[1]}"])
    cfg.sglang.deterministic_inference = True
    try:
        for info, deprecated, asked in (
            (current, current, ["/health", "/server_info"]),
            (None, resolved, ["/health", "/server_info", "/get_server_info"]),
            (None, {**resolved, "enable_deterministic_inference": False}, None),
        ):
            _InfoServer.info, _InfoServer.deprecated_info, _InfoServer.asked = info, deprecated, []
            if asked is None:
                with pytest.raises(RolloutError, match="does not report enable_deterministic_inference"):
                    SGLangEngine(cfg, "unused")
                continue
            engine = SGLangEngine(cfg, "unused")
            assert engine.servers[0].up and _InfoServer.asked == asked
    finally:
        srv.shutdown()
        srv.server_close()
