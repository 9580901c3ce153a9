"""``GroupedExperts`` (the local spec's MoE experts): equal to megatron's ``SequentialMLP`` forward and backward
(fp32, eager and fused SwiGLU), its grouped-GEMM branch (PyTorch's ``grouped_mm``, real on CPU and a fake with
the CUDA contract of torch 2.11) equal to the loop, EP=2 equal to EP=1 (logits and every gradient), and
``torch_dist`` checkpoints that load across the two modules and layouts."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_opd.models import experts
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world
from tests.tolerance import FORWARD_ULPS, forward_atol, ulps

SEQ = 10
TOKENS_PER_EXPERT = [5, 0, 3, 4]  # an expert without tokens must still get a (zero) gradient


def fake_grouped_mm(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    *,
    offs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.grouped_mm`` with the checks torch 2.11 makes for CUDA (``_meta_grouped_mm_common``
    in ``torch/_meta_registrations.py``: bf16 operands, 2-D x 3-D with ``offs``, matching contraction dim, each
    operand row- or column-major with a 16-byte aligned leading stride; int32 ``offs`` on the same device),
    computed group by group. Differentiable."""
    assert mat_a.dtype == mat_b.dtype == torch.bfloat16, "Expected inputs of BF16 type"
    assert mat_a.dim() == 2 and mat_b.dim() == 3 and offs is not None and bias is None and out_dtype is None
    assert mat_a.shape[1] == mat_b.shape[1], "contraction dimension of mat_a and mat_b must match"
    for mat in (mat_a, mat_b):
        rows, cols = mat.stride()[-2:]
        row_major = cols == 1 and rows >= max(1, mat.shape[-1])
        col_major = rows == 1 and cols >= max(1, mat.shape[-2])
        assert row_major or col_major, f"Invalid strides/sizes, got {mat.stride()}"
        assert (rows if row_major else cols) % (16 // mat.element_size()) == 0, "stride not a multiple of 16 bytes"
    assert offs.dtype == torch.int32 and offs.dim() == 1 and offs.device == mat_a.device
    assert offs.shape[0] == mat_b.shape[0], "matrix batch sizes have to match"
    ends = offs.tolist()
    assert ends[-1] == mat_a.shape[0], "rows after offs[-1] would be left undefined"
    starts = [0, *ends[:-1]]
    return torch.cat([mat_a[s:e] @ mat_b[g] for g, (s, e) in enumerate(zip(starts, ends))])


def test_fake_has_the_real_signature() -> None:
    """Both callables the module may pick take ``(a, b, offs=...)`` as the fake does (``torch._grouped_mm``, a
    builtin without a Python signature, by a call)."""
    real = inspect.signature(F.grouped_mm)
    assert list(real.parameters) == list(inspect.signature(fake_grouped_mm).parameters)
    assert real.parameters["offs"].kind is inspect.Parameter.KEYWORD_ONLY
    a, b = torch.randn(4, 8), torch.randn(2, 8, 8)
    offs = torch.tensor([1, 4], dtype=torch.int32)
    torch.testing.assert_close(torch._grouped_mm(a, b, offs=offs), F.grouped_mm(a, b, offs=offs), rtol=0, atol=0)


def test_kernel_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    assert experts.grouped_mm_kernel(torch.device("cpu"), torch.bfloat16, 64, 64) is None
    assert experts.grouped_mm_kernel(cuda, torch.float32, 64, 64) is None
    assert experts.grouped_mm_kernel(cuda, torch.bfloat16, 60, 64) is None  # rows not 16-byte aligned
    assert experts.grouped_mm_kernel(cuda, torch.bfloat16, 64, 64) is F.grouped_mm
    monkeypatch.delattr(F, "grouped_mm")  # torch 2.8 / 2.9: only torch._grouped_mm, Hopper in 2.8
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert experts.grouped_mm_kernel(cuda, torch.bfloat16, 64, 64) is torch._grouped_mm
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert experts.grouped_mm_kernel(cuda, torch.bfloat16, 64, 64) is None


def _modules(dtype: torch.dtype, fused_swiglu: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A ``GroupedExperts`` and a ``SequentialMLP`` with the same random experts (tiny Qwen3-MoE shapes)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_opd.models.qwen3 import transformer_config_from_hf

    config = transformer_config_from_hf(tiny_config(moe=True), params_dtype=dtype, bias_activation_fusion=fused_swiglu)
    pgs = get_default_pg_collection()
    n = len(TOKENS_PER_EXPERT)
    grouped = experts.GroupedExperts(n, config, pg_collection=pgs)
    sequential = SequentialMLP(
        n, config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear), pg_collection=pgs
    )
    with torch.no_grad():
        for e, mlp in enumerate(sequential.local_experts):
            mlp.linear_fc1.weight.copy_(grouped.linear_fc1.weight[e])
            mlp.linear_fc2.weight.copy_(grouped.linear_fc2.weight[e])
    return grouped, sequential


def _fwd_bwd(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Output and gradients (input, router probs, experts' weights stacked as [E, ...]) of one pass."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(TOKENS_PER_EXPERT), 64, generator=g).to(dtype).requires_grad_()
    probs = torch.rand(x.shape[0], generator=g).requires_grad_()
    out, bias = module(x, torch.tensor(TOKENS_PER_EXPERT), probs)
    assert bias is None
    out.backward(torch.randn(out.shape, generator=g).to(dtype))
    if isinstance(module, experts.GroupedExperts):
        w1, w2 = module.linear_fc1.weight.grad, module.linear_fc2.weight.grad
    else:
        w1 = torch.stack([m.linear_fc1.weight.grad for m in module.local_experts])
        w2 = torch.stack([m.linear_fc2.weight.grad for m in module.local_experts])
    return {"out": out.detach(), "x": x.grad, "probs": probs.grad, "fc1": w1, "fc2": w2}


def _grouped_vs_sequential() -> dict[str, tuple[dict, dict]]:
    """Pairs of passes to compare: (GroupedExperts, reference) per case."""
    from megatron_opd.platform.distributed import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes())
    out = {}
    for fused in (False, True):
        grouped, sequential = _modules(torch.float32, fused)
        out[f"fp32_fused{fused}"] = (_fwd_bwd(grouped, torch.float32), _fwd_bwd(sequential, torch.float32))
    # the grouped-GEMM branch (what a GPU takes) against the loop, in bf16 and in fp32
    for name, kernel, dtype in (
        ("fake_bf16", fake_grouped_mm, torch.bfloat16),
        ("cpu_fp32", F.grouped_mm, torch.float32),
    ):
        grouped, _ = _modules(dtype, False)
        loop = _fwd_bwd(grouped, dtype)
        grouped.zero_grad()
        original = experts.grouped_mm_kernel
        experts.grouped_mm_kernel = lambda *_, k=kernel: k
        try:
            out[f"kernel_{name}"] = (_fwd_bwd(grouped, dtype), loop)
        finally:
            experts.grouped_mm_kernel = original
    out["gpu_init"] = _gpu_initialized()
    return out


def _gpu_initialized() -> dict:
    """Weights as a GPU builds them (megatron's expert RNG stream; CPU stands in for the device here)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_opd.models.qwen3 import transformer_config_from_hf

    config = transformer_config_from_hf(tiny_config(moe=True), use_cpu_initialization=False)
    module = experts.GroupedExperts(len(TOKENS_PER_EXPERT), config, pg_collection=get_default_pg_collection())
    return {
        name: (w.std().item(), w.tensor_model_parallel, w.partition_dim, w.allreduce)
        for name, w in (("fc1", module.linear_fc1.weight), ("fc2", module.linear_fc2.weight))
    }


@pytest.fixture(scope="module")
def grouped_vs_sequential() -> dict[str, tuple[dict, dict]]:
    (result,) = spawn_world(_grouped_vs_sequential, 1)
    return result


# One expert layer in fp32 computed another way (megatron's linears take the weight gradient as grad_outᵀ x, the loop
# as (xᵀ grad_out)ᵀ; PyTorch's grouped GEMM has its own kernel): each of the two GEMMs and SwiGLU, forward and
# backward, may sum in another order, a few ulps of the largest |entry| each.
LAYER_ULPS = 32


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fp32_fusedFalse", "fp32_fusedTrue", "kernel_fake_bf16", "kernel_cpu_fp32"])
def test_grouped_experts_equal_the_reference(grouped_vs_sequential: dict, case: str) -> None:
    ours, ref = grouped_vs_sequential[case]
    assert ours["fc1"][1].abs().max() == 0 and ours["fc2"][1].abs().max() == 0  # expert 1 had no tokens
    for key in ("out", "x", "probs", "fc1", "fc2"):
        assert ours[key].shape == ref[key].shape, key
        # bitwise for the fake: it multiplies each group's rows by the same weight view as the loop, in the same
        # dtype, forward and backward
        atol = 0.0 if case == "kernel_fake_bf16" else ulps(ref[key].dtype, ref[key].abs().max(), LAYER_ULPS)
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=atol, msg=lambda m, k=key: f"{case} {k}: {m}")


@pytest.mark.slow
def test_gpu_initialization(grouped_vs_sequential: dict) -> None:
    """N(0, init_method_std) under megatron's expert RNG stream, split over expert-TP on the output (fc1) /
    input (fc2) dimension, gradients reduced over all data-parallel ranks at EP = 1."""
    fc1, fc2 = grouped_vs_sequential["gpu_init"]["fc1"], grouped_vs_sequential["gpu_init"]["fc2"]
    assert fc1[1:] == (True, 1, True) and fc2[1:] == (True, 2, True)
    init_std = tiny_config(moe=True).initializer_range
    assert fc1[0] == pytest.approx(init_std, rel=0.05)
    # megatron scales the output projection's init by 1/sqrt(2 * layers)
    assert fc2[0] == pytest.approx(init_std / (2 * tiny_config(moe=True).num_hidden_layers) ** 0.5, rel=0.05)


# ---- the whole model: EP=2 against EP=1, checkpoints across modules and layouts ----


def _build(path: str, sequential: bool = False) -> torch.nn.Module:
    """The model of ``path`` (local spec, unfused); ``sequential``: with megatron's SequentialMLP as the experts."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_opd.convert.hf_io import load_hf_config
    from megatron_opd.models import qwen3

    class SequentialExperts(SequentialMLP):
        def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None) -> None:  # type: ignore[no-untyped-def]
            submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
            super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)

    original = qwen3.GroupedExperts
    qwen3.GroupedExperts = SequentialExperts if sequential else original
    try:
        return qwen3.build_gpt_model(load_hf_config(path), fusion=False)
    finally:
        qwen3.GroupedExperts = original


def _step(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` [b, s] and the gradients of sum log p(next token) (the loss works in place on its
    input: a copy of the logits, a view of them at b = 1)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_opd.models.forward import model_forward

    logits = model_forward(model, {"input_ids": ids})
    loss = vocab_parallel_cross_entropy(
        logits[:, :-1].transpose(0, 1).clone(memory_format=torch.contiguous_format), ids[:, 1:].t().contiguous()
    )
    loss.sum().backward()
    return logits.detach()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient as at EP=1: expert weights gathered over EP (stacked on dim 0), the rest summed over
    the data-parallel ranks (each fed its own sequence), as the data-parallel reduction would."""
    from megatron.core import parallel_state as ps

    out = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if ".experts." in name:
            parts = [torch.empty_like(g) for _ in range(ps.get_expert_model_parallel_world_size())]
            torch.distributed.all_gather(parts, g, group=ps.get_expert_model_parallel_group())
            g = torch.cat(parts)
        else:
            torch.distributed.all_reduce(g, group=ps.get_data_parallel_group())
        out[name] = g
    return out


def _frozen(path: str, ids: torch.Tensor) -> dict:
    """A teacher built ``frozen`` with selective recomputation of the MoE layers and norms asked for (which
    megatron runs even in eval mode; its norm recomputation fails without Transformer Engine, so only the
    frozen build can run): what each build keeps of that, and the frozen build's logits."""
    from megatron_opd.convert.hf_io import load_hf_config
    from megatron_opd.convert.load import load_hf_weights
    from megatron_opd.models.forward import forward_logits
    from megatron_opd.models.qwen3 import build_gpt_model

    recompute = dict(recompute_granularity="selective", recompute_modules=["moe", "layernorm"])
    out = {}
    for frozen in (False, True):
        model = build_gpt_model(load_hf_config(path), fusion=False, frozen=frozen, **recompute)
        load_hf_weights(model, path)
        layer = model.decoder.layers[0]
        out[frozen] = {
            "recompute": (
                model.config.recompute_granularity,
                layer.mlp.moe_layer_recompute,
                layer.recompute_input_layernorm,
            ),
            "training": model.training,
            "trainable": sum(p.requires_grad for p in model.parameters()),
        }
        if frozen:
            out[frozen]["logits"] = forward_logits(model, ids)
    return out


def _world(ep: int, path: str, ids: torch.Tensor, ckpt: str) -> dict:
    from megatron_opd.convert.hf_io import load_hf_config
    from megatron_opd.convert.load import load_hf_weights
    from megatron_opd.convert.mcore_io import load_model_checkpoint, save_model_checkpoint
    from megatron_opd.models.forward import forward_logits
    from megatron_opd.platform.distributed import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes(1, 1, ep))
    rank = torch.distributed.get_rank()
    mine = ids if ep == 1 else ids[rank : rank + 1]
    model = _build(path)
    load_hf_weights(model, path)
    out = {"logits": _step(model, mine), "grads": _grads(model)}
    if ep == 1:  # a frozen build of the same weights; then a checkpoint written with each module
        out["frozen"] = _frozen(path, ids)
        save_model_checkpoint(model, f"{ckpt}/grouped", load_hf_config(path))
        sequential = _build(path, sequential=True)
        load_hf_weights(sequential, path)
        save_model_checkpoint(sequential, f"{ckpt}/sequential", load_hf_config(path))
    else:  # read each with the other module, at EP=2; then through expert-TP = 2 (gate/up halves split)
        for written, sequential in (("grouped", True), ("sequential", False)):
            other = _build(path, sequential=sequential).eval()
            load_model_checkpoint(other, f"{ckpt}/{written}")
            out[f"from_{written}"] = forward_logits(other, mine)
        init_model_parallel(ParallelSizes(2, 1, 1))
        tp2 = _build(path).eval()
        load_model_checkpoint(tp2, f"{ckpt}/sequential")
        out["tp2_from_sequential"] = _gather_vocab(forward_logits(tp2, ids))
        save_model_checkpoint(tp2, f"{ckpt}/grouped_tp2", load_hf_config(path))
        init_model_parallel(ParallelSizes(1, 1, 2))
        sequential = _build(path, sequential=True).eval()
        load_model_checkpoint(sequential, f"{ckpt}/grouped_tp2")
        out["from_grouped_tp2"] = forward_logits(sequential, mine)
    return out


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    shards = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict], torch.Tensor]:
    root = tmp_path_factory.mktemp("grouped_experts")
    hf = save_tiny_model(root / "hf", tiny_config(moe=True), seed=5)
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
    ep1 = spawn_world(_world, 1, 1, str(root / "hf"), ids, str(Path(root / "ckpt")))
    ep2 = spawn_world(_world, 2, 2, str(root / "hf"), ids, str(Path(root / "ckpt")))
    return ep1, ep2, ref


@pytest.mark.slow
def test_ep2_equals_ep1(layouts: tuple) -> None:
    (ep1,), ep2, ref = layouts
    torch.testing.assert_close(ep1["logits"], ref, rtol=0, atol=forward_atol(ref))  # megatron vs transformers
    for rank, out in enumerate(ep2):  # one sequence per rank, its tokens' experts on either rank
        torch.testing.assert_close(out["logits"], ep1["logits"][rank : rank + 1], rtol=0, atol=forward_atol(ref))
    expert_names = [n for n in ep1["grads"] if ".experts." in n]
    assert expert_names == [f"decoder.layers.{i}.mlp.experts.linear_fc{f}.weight" for i in (0, 1) for f in (1, 2)]
    assert ep1["grads"].keys() == ep2[0]["grads"].keys()
    for name, g in ep1["grads"].items():
        assert g.abs().max() > 0, name
        # a forward and a backward pass in another layout: 2 × FORWARD_ULPS of the largest |entry|
        atol = ulps(torch.float32, g.abs().max(), 2 * FORWARD_ULPS)
        for out in ep2:
            torch.testing.assert_close(out["grads"][name], g, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_checkpoints_load_across_modules_and_layouts(layouts: tuple) -> None:
    """Written at EP=1 by GroupedExperts / SequentialMLP, read at EP=2 by the other; SequentialMLP's read by
    GroupedExperts at expert-TP = 2 and written again there, read by SequentialMLP at EP=2: the same logits."""
    (ep1,), ep2, _ = layouts
    atol = forward_atol(ep1["logits"])  # the same weights in another module and layout
    for rank, out in enumerate(ep2):
        for written in ("grouped", "sequential", "grouped_tp2"):
            torch.testing.assert_close(out[f"from_{written}"], ep1["logits"][rank : rank + 1], rtol=0, atol=atol)
        torch.testing.assert_close(out["tp2_from_sequential"], ep1["logits"], rtol=0, atol=atol)


@pytest.mark.slow
def test_frozen_build_drops_training_only_work(layouts: tuple) -> None:
    (ep1,), _, _ = layouts
    trainable, frozen = ep1["frozen"][False], ep1["frozen"][True]
    assert trainable["recompute"] == ("selective", True, True) and trainable["training"] and trainable["trainable"] > 0
    assert frozen["recompute"] == (None, False, False) and not frozen["training"] and frozen["trainable"] == 0
    # the same weights and layout, without autograd (which may pick other CPU kernels)
    torch.testing.assert_close(frozen["logits"], ep1["logits"], rtol=0, atol=forward_atol(ep1["logits"]))
