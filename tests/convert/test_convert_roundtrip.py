"""HF -> Megatron checkpoint (TP=PP=EP=1 and TP=2,PP=2[,EP=2]) -> HF is bitwise identical, dense and
MoE, tied and untied; a checkpoint written at one layout loads at the other with transformers'
logits; the HF output loads in transformers; ``iter_hf_tensors`` of live sharded models gives the
source tensors; the local spec writes Transformer Engine checkpoint keys.

One world of 4 ranks writes and loads everything, one world of 1 converts back (spawns are the
expensive part on 2 cores)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_opd.convert.hf_io import HFCheckpointReader
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.distributed import ParallelSizes
from megatron_opd.platform.spawn import spawn_world
from tests.tolerance import forward_atol

pytestmark = pytest.mark.slow

# name -> (moe, config overrides)
CASES: dict[str, tuple[bool, dict]] = {
    "dense_tied": (False, dict(tie_word_embeddings=True)),
    "dense": (False, dict(num_key_value_heads=4)),
    "moe_tied": (True, dict(tie_word_embeddings=True)),
    "moe": (True, dict()),
    "moe_mixed": (True, dict(decoder_sparse_step=2, intermediate_size=64)),  # dense and MoE layers
}
LAYOUTS = {
    "A": {False: ParallelSizes(), True: ParallelSizes()},
    "B": {False: ParallelSizes(2, 2, 1), True: ParallelSizes(2, 2, 2, 1)},
}
OTHER = {"A": "B", "B": "A"}
SEQ, BATCH = 8, 2

# What megatron's Transformer Engine spec names these tensors (get_gpt_layer_with_transformer_engine_spec:
# input norm fused into linear_qkv, a dense MLP's norm fused into linear_fc1, an MoE layer's kept as
# pre_mlp_layernorm; TEGroupedMLP and SequentialMLP both write experts.experts.linear_fcN).
TE_ATTENTION = [
    "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv.weight",
    "self_attention.q_layernorm.weight",
    "self_attention.k_layernorm.weight",
    "self_attention.linear_proj.weight",
]
TE_DENSE_MLP = ["mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
TE_MOE_MLP = [
    "pre_mlp_layernorm.weight",
    "mlp.router.weight",
    "mlp.experts.experts.linear_fc1.weight",
    "mlp.experts.experts.linear_fc2.weight",
]
TOP = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]


def _gather_tp(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    shards = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def _world4(hf_dirs: dict[str, str], root: str, ids: torch.Tensor) -> dict:
    """Write every model at both layouts, then load each checkpoint at the other layout."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from megatron_opd.convert.export import iter_hf_tensors
    from megatron_opd.convert.hf_io import load_hf_config
    from megatron_opd.convert.hf_to_mcore import write_from_hf
    from megatron_opd.convert.mcore_io import load_model_checkpoint
    from megatron_opd.models.forward import forward_logits
    from megatron_opd.models.qwen3 import build_gpt_model
    from megatron_opd.platform.distributed import init_model_parallel

    rank = torch.distributed.get_rank()
    out: dict = {"logits": {}, "tensors": {}, "keys": {}, "dst": {}, "dst0": 0}
    for name, path in hf_dirs.items():
        moe = CASES[name][0]
        for tag, sizes in LAYOUTS.items():
            write_from_hf(path, f"{root}/{name}/{tag}", sizes[moe], None, 0, False)
    for name, path in hf_dirs.items():
        moe, cfg = CASES[name][0], load_hf_config(path)
        for tag in LAYOUTS:
            init_model_parallel(LAYOUTS[OTHER[tag]][moe])
            model = build_gpt_model(cfg).eval()
            load_model_checkpoint(model, f"{root}/{name}/{tag}")
            logits = forward_logits(model, ids)
            gathered = _gather_tp(logits) if logits is not None else None
            # every rank answers; the parent keeps a last-stage one
            out["logits"][(name, tag)] = gathered
            if tag == "A":  # live model at layout B (TP=2, PP=2[, EP=2])
                tensors = {n: t.clone() for n, t in iter_hf_tensors(model, cfg, dst=None)}
                out["tensors"][name] = tensors if rank == 0 else len(tensors)
                if name == "moe":
                    out["dst"] = {n: t.clone() for n, t in iter_hf_tensors(model, cfg, dst=1)}
                    out["dst0"] = len(list(iter_hf_tensors(model, cfg)))
            else:  # layout A: TP=PP=EP=1
                keys = {v.key for v in nested_values(model.sharded_state_dict()) if not v.key.endswith("_extra_state")}
                out["keys"][name] = sorted(keys)
    return out


def _world1(pairs: list[tuple[str, str, str]], broken: tuple[str, str, str]) -> str:
    """Convert each checkpoint back to HF; then one with a truncated data file, which must fail cleanly."""
    from megatron_opd.convert.hf_io import CheckpointError
    from megatron_opd.convert.mcore_to_hf import export_checkpoint

    for ckpt, hf_dir, out in pairs:
        export_checkpoint(ckpt, hf_dir, out, False, 4096, False)  # tiny shards: several files
    try:
        export_checkpoint(*broken, False, 4096, False)
    except CheckpointError as e:
        return str(e)
    return ""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("convert")
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    hf_dirs, refs = {}, {}
    for i, (name, (moe, overrides)) in enumerate(CASES.items()):
        path = root / "hf" / name
        model = save_tiny_model(path, tiny_config(moe=moe, num_hidden_layers=4, **overrides), seed=i)
        with torch.no_grad():
            refs[name] = model(ids).logits
        hf_dirs[name] = str(path)
    per_rank = spawn_world(_world4, 4, hf_dirs, str(root / "mcore"), ids)

    pairs = [
        (str(root / "mcore" / name / tag), str(root / "mcore" / name / tag / "hf"), str(root / "back" / name / tag))
        for name in CASES
        for tag in LAYOUTS
    ]
    broken = root / "broken"
    shutil.copytree(root / "mcore" / "moe" / "B", broken)
    data = sorted((broken / "iter_0000000").glob("*.distcp"))[0]
    os.truncate(data, data.stat().st_size // 2)
    (error,) = spawn_world(_world1, 1, pairs, (str(broken), str(broken / "hf"), str(root / "back" / "broken")))
    return dict(root=root, hf=hf_dirs, refs=refs, ids=ids, ranks=per_rank, error=error)


def _assert_same_tensors(got: dict[str, torch.Tensor], src: HFCheckpointReader, what: str) -> None:
    assert sorted(got) == src.keys(), f"{what}: names differ: {set(got) ^ set(src.keys())}"
    for name in src.keys():
        want = src.get(name)
        assert got[name].dtype == want.dtype and torch.equal(got[name].cpu(), want), f"{what}: {name} differs"


@pytest.mark.parametrize("tag", list(LAYOUTS))
@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bitwise(run: dict, name: str, tag: str) -> None:
    back = HFCheckpointReader(run["root"] / "back" / name / tag)
    _assert_same_tensors({n: back.get(n) for n in back.keys()}, HFCheckpointReader(run["hf"][name]), f"{name}@{tag}")
    assert len(set(back.weight_map.values())) > 1  # sharded output with an index


@pytest.mark.parametrize("name", list(CASES))
def test_back_converted_loads_in_transformers(run: dict, name: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run["root"] / "back" / name / "B").eval()
    with torch.no_grad():
        logits = model(run["ids"]).logits
    # bitwise: the same weights (test_round_trip_is_bitwise), class, inputs and process as the reference
    torch.testing.assert_close(logits, run["refs"][name], rtol=0, atol=0)


@pytest.mark.parametrize("tag", list(LAYOUTS))
@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_loads_at_another_layout(run: dict, name: str, tag: str) -> None:
    outs = [r["logits"][(name, tag)] for r in run["ranks"] if r["logits"][(name, tag)] is not None]
    assert outs, "no rank returned logits"
    for got in outs:
        diff = (got - run["refs"][name]).abs().max().item()
        assert diff <= forward_atol(run["refs"][name]), (
            f"{name}: written at {tag}, loaded at {OTHER[tag]}: max |megatron - transformers| = {diff}"
        )


@pytest.mark.parametrize("name", list(CASES))
def test_iter_hf_tensors_of_live_sharded_model(run: dict, name: str) -> None:
    src = HFCheckpointReader(run["hf"][name])
    _assert_same_tensors(run["ranks"][0]["tensors"][name], src, name)
    assert [r["tensors"][name] for r in run["ranks"][1:]] == [len(src.keys())] * 3  # every rank received all


def test_iter_hf_tensors_to_one_rank(run: dict) -> None:
    assert [bool(r["dst"]) for r in run["ranks"]] == [False, True, False, False]
    assert [r["dst0"] for r in run["ranks"]] == [len(HFCheckpointReader(run["hf"]["moe"]).keys()), 0, 0, 0]
    _assert_same_tensors(run["ranks"][1]["dst"], HFCheckpointReader(run["hf"]["moe"]), "moe to rank 1")


@pytest.mark.parametrize("name", ["dense_tied", "dense", "moe"])
def test_local_spec_writes_transformer_engine_keys(run: dict, name: str) -> None:
    moe, overrides = CASES[name]
    layer = TE_ATTENTION + (TE_MOE_MLP if moe else TE_DENSE_MLP)
    expected = TOP + [f"decoder.layers.{k}" for k in layer]
    if not overrides.get("tie_word_embeddings"):
        expected.append("output_layer.weight")
    assert run["ranks"][0]["keys"][name] == sorted(expected)


def test_truncated_checkpoint_is_a_clear_error(run: dict) -> None:
    assert "truncated or incomplete" in run["error"]
    assert not (run["root"] / "back" / "broken").exists()
    assert not [p for p in (run["root"] / "back").iterdir() if p.name.startswith(".")]  # no temp dir left


def test_checkpoint_layout(run: dict) -> None:
    from megatron_opd.convert.mcore_io import allow_checkpoint_args

    ckpt = Path(run["root"] / "mcore" / "moe" / "B")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert {p.name for p in (ckpt / "hf").iterdir()} >= {"config.json", "generation_config.json"}
    allow_checkpoint_args()
    common = torch.load(ckpt / "iter_0000000" / "common.pt", weights_only=True)
    args = common["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert (args.expert_model_parallel_size, args.num_experts) == (2, 4)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
