"""``sync_weights``: rank 0 of the student writes the HF files itself when the engine takes a
directory it can reach (same host, or a shared ``weight_sync_dir``); otherwise the tensors travel."""

from __future__ import annotations

import socket
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_opd.config.schema import OPDConfig
from megatron_opd.trainer.driver import sync_weights

WEIGHTS = [("model.norm.weight", torch.ones(2))]


class Student:
    """The student group's weight export, recorded."""

    def __init__(self, hostname: str, fail: bool = False) -> None:
        self.ranks = [types.SimpleNamespace(hostname=hostname)]
        self.fail, self.calls = fail, []

    def save_hf_weights(self, out_dir: str, tokenizer_dir: str) -> int:
        self.calls.append(("save_hf_weights", out_dir, tokenizer_dir))
        if self.fail:
            raise RuntimeError("disk full")
        (Path(out_dir) / "model.safetensors").write_bytes(b"x")
        return 1

    def export_hf_tensors(self) -> list[Any]:
        self.calls.append(("export_hf_tensors",))
        return WEIGHTS


class Engine:
    """Takes a directory under ``root`` (SGLang's disk sync); ``root=None``: tensors only."""

    def __init__(self, root: Path | None) -> None:
        self.root, self.got = root, []

    def weights_dir(self) -> str | None:
        if self.root is None:
            return None
        out = self.root / f"v{len(self.got) + 1}"
        out.mkdir()
        return str(out)

    def update_weights_from_dir(self, path: str) -> None:
        self.got.append(("dir", path, sorted(p.name for p in Path(path).iterdir())))

    def update_weights(self, named_tensors: Any) -> None:
        self.got.append(("tensors", list(named_tensors)))


def config(tmp_path: Path, weight_sync_dir: str | None = None) -> OPDConfig:
    cfg = OPDConfig()
    cfg.student.path = str(tmp_path / "student")
    cfg.rollout.sglang.weight_sync_dir = weight_sync_dir
    return cfg


def test_rank0_writes_on_the_same_host(tmp_path: Path) -> None:
    student, engine = Student(socket.gethostname()), Engine(tmp_path)
    sync_weights(config(tmp_path), student, engine)
    assert student.calls == [("save_hf_weights", str(tmp_path / "v1"), str(tmp_path / "student"))]
    assert engine.got == [("dir", str(tmp_path / "v1"), ["model.safetensors"])]


def test_remote_rank0_sends_tensors_unless_the_directory_is_shared(tmp_path: Path) -> None:
    student, engine = Student("another-node"), Engine(tmp_path)
    sync_weights(config(tmp_path), student, engine)
    assert student.calls == [("export_hf_tensors",)] and engine.got == [("tensors", WEIGHTS)]
    assert list(tmp_path.iterdir()) == []  # no directory was asked for
    sync_weights(config(tmp_path, weight_sync_dir="/shared/sync"), student, engine)
    assert student.calls[-1][0] == "save_hf_weights" and engine.got[-1][0] == "dir"


def test_engine_without_a_directory_gets_tensors(tmp_path: Path) -> None:
    student, engine = Student(socket.gethostname()), Engine(None)
    sync_weights(config(tmp_path), student, engine)
    assert student.calls == [("export_hf_tensors",)] and engine.got == [("tensors", WEIGHTS)]


def test_failed_write_leaves_no_directory(tmp_path: Path) -> None:
    student, engine = Student(socket.gethostname(), fail=True), Engine(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        sync_weights(config(tmp_path), student, engine)
    assert list(tmp_path.iterdir()) == [] and engine.got == []
