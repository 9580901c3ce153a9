"""Distributed bootstrap: torchrun, Slurm and single-process environments; spec selection; CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_opd.models import qwen3
from megatron_opd.platform.distributed import detect_env, expand_slurm_nodelist


def test_expand_slurm_nodelist() -> None:
    assert expand_slurm_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_slurm_nodelist("a1") == ["a1"]
    assert expand_slurm_nodelist("h[9-11]") == ["h9", "h10", "h11"]


def test_detect_env_torchrun_slurm_single() -> None:
    e = detect_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    )
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.source) == (
        3,
        8,
        3,
        "10.0.0.1",
        1234,
        "torchrun",
    )
    e = detect_env(
        {
            "SLURM_PROCID": "9",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[10-11]",
            "SLURM_JOB_ID": "42",
        }
    )
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.source) == (
        9,
        16,
        1,
        "gpu10",
        20042,
        "slurm",
    )
    e = detect_env(
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "x", "MASTER_ADDR": "y", "MASTER_PORT": "5"}
    )
    assert (e.master_addr, e.master_port) == ("y", 5)
    assert detect_env({}).source == "single"


def test_spec_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qwen3, "has_transformer_engine", lambda: False)
    assert qwen3.resolve_spec_name("auto") == "local"
    with pytest.raises(qwen3.ModelConfigError, match="Transformer Engine"):
        qwen3.resolve_spec_name("te")
    monkeypatch.setattr(qwen3, "has_transformer_engine", lambda: True)
    monkeypatch.setattr(qwen3.torch.cuda, "is_available", lambda: True)
    assert qwen3.resolve_spec_name("auto") == "te"
    assert qwen3.resolve_spec_name("te") == "te"
    with pytest.raises(qwen3.ModelConfigError, match="spec='fast'"):
        qwen3.resolve_spec_name("fast")  # type: ignore[arg-type]


def test_unsupported_hf_configs() -> None:
    from transformers import LlamaConfig

    from megatron_opd.models.tiny import tiny_config

    with pytest.raises(qwen3.ModelConfigError, match="model_type='llama'"):
        qwen3.check_supported(LlamaConfig())
    cfg = tiny_config()
    cfg.rope_parameters = {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}
    with pytest.raises(qwen3.ModelConfigError, match="yarn"):
        qwen3.check_supported(cfg)
    assert qwen3.moe_layer_pattern(
        tiny_config(moe=True, num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    ) == [0, 1, 0, 0]


def test_cli_lists_every_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "megatron_opd", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("train", "convert", "eval", "serve", "bench", "plot", "check"):
        assert f"  {name}" in out
    bad = subprocess.run([sys.executable, "-m", "megatron_opd", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
