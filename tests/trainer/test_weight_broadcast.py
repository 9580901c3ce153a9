"""SGLang's distributed weight sync in a training run: the student's rank 0 broadcasts, from its own
node, to the servers; the driver only announces the tensors over HTTP.

A TP=2 student (Ray actors, CPU, gloo) and an ``opd serve`` server that starts on other weights:
after ``sync_weights`` the server samples what the student's weights sample; the weight-update
group's TCP store is at the student rank 0's node address (Ray's, not a loopback address); the
driver never held the model (no ``export_hf_tensors``) nor joined a process group; a second sync
reuses the group, and the engine's shutdown tears it down on both sides. A loopback
``weight_sync_master_addr`` with servers on other nodes is refused by the config.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_opd.config.errors import ConfigError
from megatron_opd.config.schema import ModelConfig, OPDConfig, ParallelConfig
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.rollout import RolloutConfig
from megatron_opd.rollout.base import SamplingParams
from megatron_opd.rollout.config import is_loopback
from megatron_opd.rollout.hf_engine import HFEngine
from megatron_opd.rollout.sglang import client
from megatron_opd.rollout.sglang.launcher import ServerProcesses
from tests.rollout.conftest import serve_commands

PROMPTS = [[i % 100 + 1, (7 * i) % 100 + 2, 3] for i in range(6)]
SP = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=8, seed=100)


def rollout_config(urls: list[str], **sglang: Any) -> RolloutConfig:
    cfg = RolloutConfig(engine="sglang", batch_size=2, seed=9, request_timeout_s=120.0, weight_sync_bucket_mb=1)
    cfg.sglang.urls = list(urls)
    cfg.sglang.weight_sync = "distributed"
    for key, value in sglang.items():
        setattr(cfg.sglang, key, value)
    return cfg


def test_loopback_master_with_remote_servers_is_refused() -> None:
    cfg = rollout_config(["http://rollout-node-3:30000"], weight_sync_master_addr="127.0.0.1")
    with pytest.raises(ConfigError, match=r"rollout.sglang.weight_sync_master_addr='127.0.0.1': a loopback address"):
        cfg.validate()
    for fine in (
        rollout_config(["http://rollout-node-3:30000"]),  # default: the student rank 0's node address
        rollout_config(["http://127.0.0.1:30000"], weight_sync_master_addr="localhost"),
        rollout_config(["http://rollout-node-3:30000"], weight_sync_master_addr="10.1.2.3"),
    ):
        fine.validate()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("broadcast")
    config = tiny_config(hidden_size=256, head_dim=64, intermediate_size=512)  # 5 MiB in fp32: several buckets
    save_tiny_model(root / "student", config, seed=0, init_std=0.1)
    save_tiny_model(root / "other", config, seed=1, init_std=0.1)
    return root / "student", root / "other"


@pytest.fixture(scope="module")
def server(models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    procs = ServerProcesses(serve_commands(models[1], 1), tmp_path_factory.mktemp("logs"))
    with procs.start(timeout_s=180):
        yield procs.urls[0]


@pytest.fixture(scope="module")
def student(models: tuple[Path, Path]) -> Iterator[Any]:
    import ray

    from megatron_opd.trainer.worker import WorkerSpec
    from megatron_opd.trainer.worker_group import Placement, StudentGroup, ensure_ray

    ensure_ray()
    spec = WorkerSpec(
        group="student",
        model=ModelConfig(str(models[0]), ParallelConfig(tensor_model_parallel_size=2)),
        load_from=str(models[0]),
    )
    group = StudentGroup(spec, Placement(None), timeout_s=600)
    yield group
    group.shutdown()
    ray.shutdown()


def test_student_rank0_broadcasts_from_its_node(
    student: Any, server: str, models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from megatron_opd.trainer.driver import sync_weights

    posts: list[tuple[str, dict]] = []
    post = client.post_json
    monkeypatch.setattr(
        client, "post_json", lambda url, path, body, t: posts.append((path, body)) or post(url, path, body, t)
    )
    called: list[str] = []
    for method in ("export_hf_tensors", "save_hf_weights", "broadcast_weights"):
        original = getattr(type(student), method)
        monkeypatch.setattr(
            type(student),
            method,
            lambda self, *a, _m=method, _f=original, **k: called.append(_m) or _f(self, *a, **k),
        )

    cfg = OPDConfig()
    cfg.student.path = str(models[0])
    cfg.rollout = rollout_config([server], weight_sync_backend="gloo")
    engine = client.SGLangEngine(cfg.rollout, str(models[1]))
    want = HFEngine(models[0], seed=0).generate(PROMPTS, SP)
    try:
        assert [c.token_ids for c in engine.generate(PROMPTS, SP)] != [c.token_ids for c in want]
        sync_weights(cfg, student, engine)
        assert [c.token_ids for c in engine.generate(PROMPTS, SP)] == [c.token_ids for c in want]
        sync_weights(cfg, student, engine)  # the same group again
        assert [c.token_ids for c in engine.generate(PROMPTS, SP)] == [c.token_ids for c in want]
    finally:
        engine.shutdown()
    inits = [b for p, b in posts if p == "/init_weights_update_group"]
    assert len(inits) == 1 and inits[0]["master_address"] == ray.util.get_node_ip_address()
    assert not is_loopback(inits[0]["master_address"]), "this machine has no address other nodes could reach"
    assert sum(p == "/update_weights_from_distributed" for p, _ in posts) >= 2 * 5  # 1 MiB buckets, twice
    assert [p for p, _ in posts][-1] == "/destroy_weights_update_group"
    assert "export_hf_tensors" not in called and called.count("broadcast_weights") == 2
    assert not torch.distributed.is_initialized()  # the driver joined no process group
