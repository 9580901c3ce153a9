"""The worker builds a teacher or reference frozen (no recomputation, no router losses, eval mode, no gradients)
and the student for training, each with its model's ``fusion`` setting."""

from __future__ import annotations

import dataclasses

import torch

from megatron_opd.config.schema import ModelConfig
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world
from tests.trainer.conftest import worker_spec


def _build(path: str) -> dict[str, dict]:
    from megatron_opd.convert.hf_io import load_hf_config
    from megatron_opd.platform.distributed import ParallelSizes, init_model_parallel
    from megatron_opd.trainer.worker import build_worker_model

    init_model_parallel(ParallelSizes())
    out = {}
    for name, trainable, fusion in (("student", True, "false"), ("teacher", False, "true")):
        spec = worker_spec(path, trainable=trainable, name="opd")
        model_cfg = dataclasses.replace(spec.model, recompute_granularity="full", fusion=fusion)
        model = build_worker_model(dataclasses.replace(spec, model=model_cfg), load_hf_config(path), torch.float32)
        c = model.config
        norm = type(model.decoder.layers[0].input_layernorm).__name__
        out[name] = dict(
            recompute=c.recompute_granularity,
            z_loss=c.moe_z_loss_coeff,
            training=model.training,
            grads=any(p.requires_grad for p in model.parameters()),
            rope_fusion=c.apply_rope_fusion,
            swiglu_fusion=c.bias_activation_fusion,
            norm=norm,
        )
    return out


def test_teacher_is_frozen_and_fusion_follows_the_config(tmp_path) -> None:
    path = str(tmp_path / "m")
    save_tiny_model(path, tiny_config(moe=True))
    built = spawn_world(_build, 1, path)[0]
    student, teacher = built["student"], built["teacher"]
    assert student["recompute"] == "full" and student["training"] and student["grads"]
    assert teacher["recompute"] is None and teacher["z_loss"] is None
    assert not teacher["training"] and not teacher["grads"]
    assert not student["rope_fusion"] and not student["swiglu_fusion"] and student["norm"] == "RMSNorm"
    assert teacher["rope_fusion"] and teacher["swiglu_fusion"] and teacher["norm"] == "FusedRMSNorm"


def test_fusion_setting_reads_auto_true_false() -> None:
    assert [ModelConfig(fusion=f).fusion_enabled for f in ("auto", "True", "false")] == [None, True, False]
