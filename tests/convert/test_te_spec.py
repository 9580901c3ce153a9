"""Megatron-core's Transformer Engine spec on CPU, its modules faked by ``tests/te_fakes.py`` (the real
classes' signatures, parameters, explicit devices and sharded state dicts; megatron's own spec
functions):

- its parameter names (dense; MoE with TE's grouped GEMM and with a loop of TE linears) are the
  tables below; each maps to one HF tensor group, together they cover the HF checkpoint, and the
  checkpoint keys are the local spec's (so either spec loads the other's checkpoints);
- with TE the model gets the grouped GEMM and the fusions (RoPE, SwiGLU; gradient accumulation
  where its kernel is installed);
- ``opd convert hf-to-mcore`` on a node where the spec ``auto`` means TE writes the HF weights,
  not the uninitialised tensors TE's modules allocate on their explicit device; and a save given a
  tensor source refuses any tensor that is not on the meta device.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.convert.hf_io import HFCheckpointReader
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world

ATTENTION = [
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.q_layernorm.weight",
    "decoder.layers.0.self_attention.k_layernorm.weight",
]
TOP = ["embedding.word_embeddings.weight"], ["decoder.final_layernorm.weight", "output_layer.weight"]
# named_parameters() of a one-layer model of the TE spec (4 experts for MoE)
TE_PARAMETERS = {
    "dense": [
        *TOP[0],
        *ATTENTION,
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.mlp.linear_fc2.weight",
        *TOP[1],
    ],
    "moe_grouped": [
        *TOP[0],
        *ATTENTION,
        "decoder.layers.0.pre_mlp_layernorm.weight",
        "decoder.layers.0.mlp.router.weight",
        *[f"decoder.layers.0.mlp.experts.linear_fc1.weight{e}" for e in range(4)],
        *[f"decoder.layers.0.mlp.experts.linear_fc2.weight{e}" for e in range(4)],
        *TOP[1],
    ],
    "moe_sequential": [
        *TOP[0],
        *ATTENTION,
        "decoder.layers.0.pre_mlp_layernorm.weight",
        "decoder.layers.0.mlp.router.weight",
        *[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc{i}.weight" for e in range(4) for i in (1, 2)],
        *TOP[1],
    ],
}
MOE = {"dense": False, "moe_grouped": True, "moe_sequential": True}


def _checkpoint_keys(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """(tensor keys, ``_extra_state`` keys) of the model's sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    keys = {v.key for v in nested_values(model.sharded_state_dict())}
    extra = {k for k in keys if k.endswith("_extra_state")}
    return keys - extra, extra


def _on_cpu(hf_dirs: dict[str, str], out: str) -> dict:
    """Everything that needs megatron's parallel state, in one world of one rank."""
    import megatron.core.tensor_parallel.layers as mcore_layers
    from torch.distributed.checkpoint import CheckpointException

    from megatron_opd.convert.export import iter_hf_tensors
    from megatron_opd.convert.hf_io import load_hf_config
    from megatron_opd.convert.hf_to_mcore import write_from_hf
    from megatron_opd.convert.load import param_mappings
    from megatron_opd.convert.mapping import expected_hf_names
    from megatron_opd.convert.mcore_io import load_model_checkpoint, save_model_checkpoint
    from megatron_opd.models import qwen3
    from megatron_opd.platform.distributed import ParallelSizes, init_model_parallel
    from tests import te_fakes

    init_model_parallel(ParallelSizes())
    te_fakes.install()
    result: dict = {"spec": {}}
    for name, moe in MOE.items():
        cfg = load_hf_config(hf_dirs["moe" if moe else "dense"])
        options = {} if name != "moe_sequential" else {"moe_grouped_gemm": False}
        with torch.device("meta"):  # as on a GPU: TE modules on the current device, here meta
            te = qwen3.build_gpt_model(
                cfg, spec="te", use_cpu_initialization=False, init_model_with_meta_device=True, **options
            )
            local = qwen3.build_gpt_model(cfg, spec="local")
        hf = {n for _, _, m in param_mappings(te, cfg) for n in m.hf}
        c = te.config
        result["spec"][name] = dict(
            parameters=[n for n, _ in te.named_parameters()],
            hf=sorted(hf),
            expected_hf=sorted(expected_hf_names(cfg)),
            te_keys=_checkpoint_keys(te),
            local_keys=_checkpoint_keys(local),
            experts=type(te.decoder.layers[0].mlp.experts).__name__ if moe else None,
            flags=(c.moe_grouped_gemm, c.apply_rope_fusion, c.bias_activation_fusion, c.gradient_accumulation_fusion),
        )
    mcore_layers._grad_accum_fusion_available = True  # APEX's fused_weight_gradient_mlp_cuda installed
    with torch.device("meta"):
        fused = qwen3.build_gpt_model(cfg, spec="te", use_cpu_initialization=False, init_model_with_meta_device=True)
    result["grad_accum_with_apex"] = fused.config.gradient_accumulation_fusion
    mcore_layers._grad_accum_fusion_available = False

    # a GPU node with TE: the spec `auto` resolves to TE there
    resolve = qwen3.resolve_spec_name
    qwen3.resolve_spec_name = lambda spec="auto": "te" if spec == "auto" else resolve(spec)
    write_from_hf(hf_dirs["moe"], f"{out}/moe", ParallelSizes(), None, 0, False)
    qwen3.resolve_spec_name = resolve
    cfg = load_hf_config(hf_dirs["moe"])
    model = qwen3.build_gpt_model(cfg, spec="local")
    load_model_checkpoint(model, f"{out}/moe")
    src = HFCheckpointReader(hf_dirs["moe"])
    converted = dict(iter_hf_tensors(model, cfg))
    result["converted"] = sorted(converted), [n for n, t in converted.items() if not torch.equal(t, src.get(n))]

    try:  # a source, but a model with real tensors
        save_model_checkpoint(model, f"{out}/refused", cfg, source=lambda key, offsets, sizes: torch.zeros(sizes))
    except CheckpointException as e:  # torch's wrapper of the writer's CheckpointError
        result["refused"] = str(e)
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("te_spec")
    hf_dirs = {}
    for name, moe in (("dense", False), ("moe", True)):
        save_tiny_model(root / name, tiny_config(moe=moe, num_hidden_layers=1), seed=3)
        hf_dirs[name] = str(root / name)
    (result,) = spawn_world(_on_cpu, 1, hf_dirs, str(root / "mcore"))
    return {**result, "hf": hf_dirs}


@pytest.mark.parametrize("name", list(TE_PARAMETERS))
def test_te_spec_names_map_to_hf_and_match_the_local_checkpoint_keys(run: dict, name: str) -> None:
    got = run["spec"][name]
    assert got["parameters"] == TE_PARAMETERS[name]
    assert got["hf"] == got["expected_hf"]  # every HF tensor, each from one Megatron parameter group
    te_keys, te_extra = got["te_keys"]
    local_keys, local_extra = got["local_keys"]
    assert te_keys == local_keys
    # TE's FP8 metadata: local-spec checkpoints lack it for the norms (megatron's own linears keep a None)
    # and for the experts' linears (GroupedExperts holds plain stacked weights, no per-linear extra state)
    absent = te_extra - local_extra
    assert local_extra < te_extra
    assert all("layernorm._extra_state" in k or k.startswith("decoder.layers.mlp.experts.experts.") for k in absent)
    assert got["experts"] == {"dense": None, "moe_grouped": "TEGroupedMLP", "moe_sequential": "SequentialMLP"}[name]


def test_te_speed_settings(run: dict) -> None:
    assert run["spec"]["dense"]["flags"] == (False, True, True, False)  # no experts, no APEX kernel here
    assert run["spec"]["moe_grouped"]["flags"] == (True, True, True, False)
    assert run["grad_accum_with_apex"] is True


def test_convert_on_a_te_node_writes_the_hf_weights(run: dict) -> None:
    names, different = run["converted"]
    assert names == HFCheckpointReader(run["hf"]["moe"]).keys()
    assert different == []


def test_a_source_with_a_materialized_model_is_refused(run: dict) -> None:
    assert "a source was given, but the model holds this tensor on cpu" in run["refused"]
    assert "spec='local'" in run["refused"]


def test_fake_transformer_engine_modules_take_their_device_explicitly() -> None:
    """What makes a TE model under ``torch.device("meta")`` hold real tensors (megatron's
    ``_get_extra_te_kwargs``: ``device="cpu"`` with ``use_cpu_initialization``)."""
    import types

    from tests.te_fakes import _RMSNorm

    config = types.SimpleNamespace(use_cpu_initialization=True, params_dtype=torch.float32)
    with torch.device("meta"):
        norm = _RMSNorm(config, 4)
    assert norm.weight.device == torch.device("cpu") and norm.get_extra_state().numel() == 0
