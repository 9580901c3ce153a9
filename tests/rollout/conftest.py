"""Tiny HF models (peaked distributions, so top-p really truncates) and ``opd serve`` commands."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.rollout.hf_engine import HFEngine
from megatron_opd.rollout.server import OPDServer, ServerFlags, ServerState
from megatron_opd.rollout.sglang.launcher import ServerCommand, find_free_ports
from tests.tolerance import logit_magnitude, ulps

INIT_STD = 0.3  # HF's 0.02 gives near-uniform next-token distributions
PROMPTS = [[i % 100 + 1, (7 * i) % 100 + 2, 3] for i in range(12)]


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dense0")
    save_tiny_model(out, tiny_config(), seed=0, init_std=INIT_STD)
    return out


@pytest.fixture(scope="session")
def dense_dir_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture as ``dense_dir``, other weights."""
    out = tmp_path_factory.mktemp("dense1")
    save_tiny_model(out, tiny_config(), seed=1, init_std=INIT_STD)
    return out


def serve_commands(
    model_dir: Path, count: int, name: str = "opd", *, deterministic: bool = True, env: dict[str, str] | None = None
) -> list[ServerCommand]:
    """``opd serve`` command lines on free ports (``deterministic``: honouring the row seeds, as
    SGLang does with ``--enable-deterministic-inference``)."""
    ports = find_free_ports("127.0.0.1", 0, count)
    base = [sys.executable, "-m", "megatron_opd.cli", "serve", "--model-path", str(model_dir), "--batch-size", "4"]
    if deterministic:
        base.append("--enable-deterministic-inference")
    environ = {"OMP_NUM_THREADS": "1", **(env or {})}
    return [
        ServerCommand(f"http://127.0.0.1:{p}", [*base, "--port", str(p)], environ, f"{name}{i}")
        for i, p in enumerate(ports)
    ]


@contextlib.contextmanager
def serving(model_dir: Path, flags: ServerFlags | None = None) -> Iterator[OPDServer]:
    """``opd serve`` in this process on a free port (stopped on exit, also after a crash)."""
    engine = HFEngine(model_dir, batch_size=4, seed=0)
    srv = OPDServer(("127.0.0.1", 0), ServerState(engine, str(model_dir), 0, flags))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def tol(dense_dir: Path, dense_dir_b: Path) -> float:
    """Log-probs of the same tokens through other batch shapes and thread counts (the batch split over servers
    with one thread each, padded differently): the matmuls' reduction order differs, a few fp32 ulps of the
    logits per layer; 128 ulps of the largest |logit| of either model over the prompts."""
    return ulps(torch.float32, max(logit_magnitude(HFEngine(d).model, PROMPTS) for d in (dense_dir, dense_dir_b)), 128)
