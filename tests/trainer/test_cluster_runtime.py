"""What a worker process does differently on GPU nodes, checked on CPU with the GPU branch taken:

- rendezvous: rank 0 offers its node's address (Ray's), not what the host name resolves to
  (``127.0.1.1`` on Debian-style ``/etc/hosts``: remote ranks would wait on their own loopback);
- ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is the trainer worker's own setting (the job environment of
  ``launch/common.sh`` no longer carries it to the rollout servers);
- offload with ``offload_when_idle``: with and without the distributed optimizer every parameter of
  the student leaves its device memory, and comes back with the same values (the update after it
  is the update without it); fp32 with the distributed optimizer is refused by the config.

"CUDA" here: ``torch.cuda.is_available()`` answers True around ``offload``/``onload``, pinning makes a
host copy, ``Tensor.cuda`` is the CPU compatibility layer's (a copy on CPU). Device memory that was
freed shows as a storage resized to 0 or a parameter whose data now lives in another storage.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_opd.config.errors import ConfigError
from megatron_opd.config.schema import OPDConfig, TeacherConfig
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world
from megatron_opd.rollout.config import is_loopback
from megatron_opd.trainer.worker import ModelWorker
from tests.trainer.conftest import VOCAB, make_samples, worker_spec

REPO = Path(__file__).resolve().parents[2]
SAMPLES = make_samples(4, seed=7)


def test_rendezvous_is_the_node_address_not_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    node = ray.util.get_node_ip_address()
    if is_loopback(node):
        pytest.skip("this machine has no address other nodes could reach")
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "127.0.1.1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    address, port = ModelWorker(worker_spec("unused"), 0, 2).rendezvous()
    assert address == node and port > 0


def test_cuda_device_max_connections_is_set_by_the_workers_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'PATH="{venv}/bin:$PATH"\n')
    (venv / "bin" / "opd").write_text("#!/bin/sh\n")
    (venv / "bin" / "opd").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    script = f"source {REPO}/launch/common.sh && opd_activate_env && env"
    out = subprocess.run(["bash", "-c", script], env={**env, "OPD_VENV": str(venv)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    job_env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert job_env["NCCL_DEBUG"] == "WARN" and "CUDA_DEVICE_MAX_CONNECTIONS" not in job_env

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    ModelWorker(worker_spec("unused"), 0, 1)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")  # the user's own choice stays
    ModelWorker(worker_spec("unused"), 0, 1)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"


def _worker(student: str, distributed_optimizer: bool) -> Any:
    spec = worker_spec(student, trainable=True, name="sft")
    spec = dataclasses.replace(
        spec,
        model=dataclasses.replace(spec.model, dtype="bf16"),
        optim=dataclasses.replace(spec.optim, use_distributed_optimizer=distributed_optimizer),
    )
    worker = ModelWorker(spec, 0, 1)
    worker.setup("127.0.0.1", 0)
    return worker


def _params(worker: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in worker.student.module.named_parameters()}


def _offload_world(student: str, distributed_optimizer: bool) -> dict:
    worker = _worker(student, distributed_optimizer)
    before = _params(worker)
    storages = {n: p.untyped_storage().data_ptr() for n, p in worker.student.module.named_parameters()}
    fake = {
        (torch.cuda, "is_available"): lambda: True,
        (torch.cuda, "empty_cache"): lambda: None,
        (torch.Tensor, "pin_memory"): lambda self, *a, **k: self.clone(),
    }
    saved = {key: getattr(*key) for key in fake}
    for (owner, name), value in fake.items():
        setattr(owner, name, value)
    try:
        worker.offload()
        left = [
            n
            for n, p in worker.student.module.named_parameters()
            if p.untyped_storage().size() and p.untyped_storage().data_ptr() == storages[n]
        ]
        worker.onload()
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)
    after = _params(worker)
    worker.train_step(SAMPLES)
    offloaded = _params(worker)
    plain = _worker(student, distributed_optimizer)
    plain.train_step(SAMPLES)
    return {
        "left_on_device": left,
        "restored": all(torch.equal(before[n], after[n]) for n in before),
        "same_update": all(torch.equal(offloaded[n], p) for n, p in _params(plain).items()),
    }


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("offload") / "student"
    save_tiny_model(path, tiny_config(vocab_size=VOCAB), seed=1)
    return str(path)


@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_offload_frees_every_parameter(student: str, distributed_optimizer: bool) -> None:
    (result,) = spawn_world(_offload_world, 1, student, distributed_optimizer)
    assert result == {"left_on_device": [], "restored": True, "same_update": True}


def test_fp32_offload_with_the_distributed_optimizer_is_refused(student: str) -> None:
    cfg = OPDConfig()
    cfg.student.path = student
    cfg.objective.name = "sft"
    cfg.teachers = [TeacherConfig(name="t", path=student)]
    cfg.student.dtype, cfg.student.offload_when_idle = "fp32", True
    with pytest.raises(ConfigError, match=r"student.offload_when_idle=True: fp32 parameters with the distributed"):
        cfg.validate()
    cfg.optim.use_distributed_optimizer = False  # FP32Optimizer's parameters are the model's: they move
    with pytest.raises(ConfigError) as other:  # the config is incomplete, but not for this reason
        cfg.validate()
    assert "offload_when_idle" not in str(other.value)
