"""``VersionedEngine``: requests and weight updates take turns, tokens carry the version that sampled them, and
``partial`` aborts the requests in flight (the embedded engine, and ``opd serve``'s ``/abort_request`` through the
SGLang client) and resumes them under the new weights exactly as a fresh request of prompt + partial response."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from megatron_opd.config.errors import ConfigError
from megatron_opd.rollout import RolloutConfig
from megatron_opd.rollout.base import Completion, SamplingParams
from megatron_opd.rollout.hf_engine import HFEngine
from megatron_opd.rollout.server import ServerFlags
from megatron_opd.rollout.sglang.client import SGLangEngine
from megatron_opd.rollout.versioned import RESUME_SEED_STRIDE, VersionedEngine
from tests.rollout.conftest import PROMPTS, serving

SP = SamplingParams(temperature=1.0, max_new_tokens=24, seed=7)
ABORT_AFTER = 3  # tokens sampled before the test's weight update arrives


def test_requests_of_a_batch_sample_what_one_request_samples(dense_dir: Path, tol: float) -> None:
    """One request per batch (a synchronous run) is the engine's own call; requests of 5 rows sample the same
    tokens (each row keeps its seed), their log-probs through other batch shapes."""
    want = HFEngine(dense_dir, batch_size=16).generate(PROMPTS, SP)
    for rows, atol in ((None, 0.0), (5, tol)):
        got = VersionedEngine(HFEngine(dense_dir, batch_size=16), request_rows=rows).generate(PROMPTS, SP)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        for c, w in zip(got, want):
            assert c.logprobs == pytest.approx(w.logprobs, rel=0, abs=atol)
            assert c.weight_versions == [0] * len(c.token_ids)


class BlockingEngine:
    """Generates one token per row once ``release`` is set; counts what it was asked."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.weights = 0

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        self.started.set()
        assert self.release.wait(10)
        return [Completion(p, [self.weights], [0.0], "length") for p in prompts]

    def update_weights(self, named_tensors: object) -> None:
        self.weights += 1


def test_update_waits_for_the_request_in_flight_and_later_requests_see_the_new_version() -> None:
    inner = BlockingEngine()
    engine = VersionedEngine(inner, request_rows=2)
    out: list[list[Completion]] = []
    gen = threading.Thread(target=lambda: out.append(engine.generate([[1], [2], [3]], SP)))
    gen.start()
    assert inner.started.wait(10)
    upd = threading.Thread(target=lambda: engine.update(lambda e: e.update_weights([])))
    upd.start()
    upd.join(0.3)
    assert upd.is_alive() and inner.weights == 0  # the first request (rows 0, 1) is still in flight
    inner.release.set()
    upd.join(10)
    gen.join(10)
    (got,) = out
    assert engine.version == 1
    # rows 0, 1 sampled under version 0; the update then ran before the request of row 2 started
    assert [c.token_ids for c in got] == [[0], [0], [1]]
    assert [c.weight_versions for c in got] == [[0], [0], [1]]


@pytest.fixture
def abort_after_steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, list]]:
    """Decoding in the embedded engine pauses after ``ABORT_AFTER`` steps of the first generation until an
    abort arrives (``reached`` is set then), so the test's weight update lands mid-generation."""
    from megatron_opd.rollout import hf_engine

    real = hf_engine.sample_next
    reached, engines = threading.Event(), []
    calls = [0]

    def paused(logits, *args, **kw):
        calls[0] += logits.shape[0] == len(PROMPTS)  # the test's generation, not a health check's (one row)
        if calls[0] == ABORT_AFTER and not reached.is_set():
            reached.set()
            assert any(e._abort.wait(10) for e in engines)
        return real(logits, *args, **kw)

    monkeypatch.setattr(hf_engine, "sample_next", paused)
    yield reached, engines


def check_resumed(
    got: list[Completion], resumed_by: Callable[[list[list[int]], SamplingParams], list[Completion]]
) -> None:
    """Rows unfinished at the abort hold ``ABORT_AFTER`` version-0 tokens and then, under version 1, what a
    fresh request of prompt + those tokens samples with the remaining budget and the resumed seed."""
    unfinished = [c for c in got if len(c.weight_versions) > ABORT_AFTER]
    assert unfinished, "no row outlived the abort; lengthen SP.max_new_tokens"
    prompts = [c.prompt_ids + c.token_ids[:ABORT_AFTER] for c in unfinished]
    rest = SamplingParams(
        temperature=SP.temperature, max_new_tokens=SP.max_new_tokens - ABORT_AFTER, seed=SP.seed + RESUME_SEED_STRIDE
    )
    want = resumed_by(prompts, rest)
    for c, w in zip(unfinished, want):
        assert c.weight_versions == [0] * ABORT_AFTER + [1] * len(w.token_ids)
        assert c.token_ids[ABORT_AFTER:] == w.token_ids
        assert len(c.token_ids) <= SP.max_new_tokens
    for c in got:
        if c not in unfinished:
            assert set(c.weight_versions) == {0} and c.finish_reason == "stop"


def run_with_update(engine: VersionedEngine, reached: threading.Event, new_weights: Callable) -> list[Completion]:
    out: list[list[Completion]] = []
    gen = threading.Thread(target=lambda: out.append(engine.generate(PROMPTS, SP)))
    gen.start()
    assert reached.wait(60)
    engine.update(new_weights)
    gen.join(60)
    assert engine.version == 1 and engine.stats.aborted_requests == 1
    return out[0]


def test_partial_resumes_the_embedded_engine_under_the_new_weights(
    dense_dir: Path, dense_dir_b: Path, abort_after_steps: tuple[threading.Event, list]
) -> None:
    reached, engines = abort_after_steps
    inner = HFEngine(dense_dir, batch_size=16)
    engines.append(inner)
    b = HFEngine(dense_dir_b, batch_size=16)
    engine = VersionedEngine(inner, partial=True)
    got = run_with_update(engine, reached, lambda e: e.update_weights(b.model.named_parameters()))
    check_resumed(got, HFEngine(dense_dir_b, batch_size=16).generate)


def test_partial_resumes_through_abort_request_of_opd_serve(
    dense_dir: Path, dense_dir_b: Path, tmp_path: Path, abort_after_steps: tuple[threading.Event, list]
) -> None:
    reached, engines = abort_after_steps
    with serving(dense_dir, ServerFlags(deterministic_inference=True)) as srv:
        srv.state.engine.batch_size = len(PROMPTS)  # one decoding batch, as in the embedded test
        engines.append(srv.state.engine)
        cfg = RolloutConfig(engine="sglang", batch_size=len(PROMPTS), request_timeout_s=60.0)
        cfg.sglang.urls = [srv.url]
        engine = VersionedEngine(SGLangEngine(cfg, str(dense_dir)), partial=True)
        weights = tmp_path / "b"
        shutil.copytree(dense_dir_b, weights)  # the client owns (and removes) what it loads
        got = run_with_update(engine, reached, lambda e: e.update_weights_from_dir(str(weights)))
        assert srv.state.weight_version == "1"
    check_resumed(got, HFEngine(dense_dir_b, batch_size=16).generate)


def test_partial_needs_an_engine_that_aborts() -> None:
    with pytest.raises(ConfigError, match=r"rollout\.partial"):
        VersionedEngine(BlockingEngine(), partial=True)
