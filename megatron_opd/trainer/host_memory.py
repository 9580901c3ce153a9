"""Host memory per node at checkpoint time, estimated from a run config (printed by ``opd check``).

What a training checkpoint holds in host memory, per rank of the student (the distributed
optimizer's ``fully_reshardable`` format, memory-efficient: ``trainer.checkpoint``):

- save: DP rank 0 of each model-parallel group gathers the fp32 parameters and both Adam moments of
  its part of the model (12 bytes per parameter) and stages its model shard for writing (2 bytes per
  parameter in bf16); the other ranks hold a bucket at a time (not counted);
- resume: every rank allocates the same 12 bytes per parameter of its part, which the checkpoint is
  read into before each rank keeps its own shard;
- meanwhile the colocated groups with ``offload_when_idle`` (teachers, references) keep their weights
  in pinned host memory.

A rank's part of the model is its parameters outside the experts over TP x PP and its experts over
EP x ETP x PP (norms counted as split too: a slight underestimate). Ranks sit on GPUs as the trainer
places them: rank ``r`` of the student (and, colocated, of every group) on GPU ``r``, node
``r // gpus_per_node``; separate groups on consecutive GPUs. Ranks are ordered as megatron-core's
default (TP fastest, then DP, then PP; experts: ETP, EP, expert DP).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_opd.config.schema import ModelConfig, OPDConfig, ParallelConfig
from megatron_opd.objectives.registry import objective_class

OPTIMIZER_STATE_BYTES = 12  # fp32 parameter, Adam exp_avg and exp_avg_sq
DTYPE_BYTES = {"auto": 2, "bf16": 2, "fp32": 4}  # auto: bf16 on GPUs


def parameter_count(hf_config: Any) -> tuple[int, int]:
    """(all parameters, those in routed experts) of a Qwen3 / Qwen3-MoE model."""
    from megatron_opd.models.qwen3 import head_dim, moe_layer_pattern, num_experts

    h, v, d = hf_config.hidden_size, hf_config.vocab_size, head_dim(hf_config)
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    attention = h * d * (2 * heads + 2 * groups) + 2 * d + 2 * h  # q, o, k, v; q/k norms; the layer's two norms
    total = v * h * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2) + h
    experts = 0
    for moe in moe_layer_pattern(hf_config):
        total += attention
        if moe:
            layer_experts = num_experts(hf_config) * 3 * h * hf_config.moe_intermediate_size
            total += num_experts(hf_config) * h + layer_experts  # router, experts
            experts += layer_experts
        else:
            total += 3 * h * hf_config.intermediate_size
    return total, experts


@dataclasses.dataclass(frozen=True)
class _Group:
    """One worker group as placed: its model, layout, first GPU and whether it is offloaded at a checkpoint."""

    model: ModelConfig
    hf_config: Any
    first_gpu: int
    offloaded: bool


def _groups(cfg: OPDConfig, hf: dict[str, Any]) -> list[_Group]:
    """The worker groups of the run in the trainer's order (student, teachers, references)."""
    models = [(cfg.student, hf["student"])]
    models += [(t, hf[f"teachers[{t.name}]"]) for t in cfg.teachers]
    if objective_class(cfg.objective.name).needs_reference(cfg.objective):
        if cfg.objective.reference == "student_base":
            models.append((cfg.student, hf["student"]))
        else:
            models += [(t.base_model, hf[f"teachers[{t.name}]"]) for t in cfg.teachers]
    groups, nxt = [], 0
    for i, (model, hf_config) in enumerate(models):
        first = 0 if cfg.trainer.colocate else nxt
        nxt += model.parallel.world_size
        offloaded = i > 0 and cfg.trainer.colocate and model.offload_when_idle
        groups.append(_Group(model, hf_config, first, offloaded))
    return groups


def _rank_parts(par: ParallelConfig, hf_config: Any) -> tuple[int, int]:
    """(parameters outside the experts, expert parameters) of one rank's part of the model."""
    total, experts = parameter_count(hf_config)
    tp, pp, ep = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.expert_model_parallel_size
    etp = par.expert_tensor_parallel_size or tp
    return (total - experts) // (tp * pp), experts // (ep * etp * pp)


def _first_replicas(par: ParallelConfig, rank: int) -> tuple[bool, bool]:
    """Whether ``rank`` is DP rank 0 (of its non-expert part) and expert-DP rank 0 (of its experts)."""
    tp, ep = par.tensor_model_parallel_size, par.expert_model_parallel_size
    etp = par.expert_tensor_parallel_size or tp
    in_stage = rank % (tp * par.data_parallel_size)
    return in_stage < tp, in_stage < ep * etp


@dataclasses.dataclass(frozen=True)
class NodeHostMemory:
    """Bytes of host memory one node holds at a checkpoint save and at a resume (``offloaded``: the
    idle groups' weights, included in both)."""

    node: int
    save: int
    resume: int
    offloaded: int


def checkpoint_host_memory(cfg: OPDConfig, hf: dict[str, Any], gpus_per_node: int) -> list[NodeHostMemory]:
    """Per node holding a rank of the run (see the module docstring); ``hf``: ``OPDConfig.validate()``'s."""
    groups = _groups(cfg, hf)
    nodes = 1 + max(g.first_gpu + g.model.parallel.world_size - 1 for g in groups) // gpus_per_node
    save, resume, offloaded = [0] * nodes, [0] * nodes, [0] * nodes
    for i, g in enumerate(groups):
        dense, experts = _rank_parts(g.model.parallel, g.hf_config)
        weight = DTYPE_BYTES[g.model.dtype]
        for rank in range(g.model.parallel.world_size):
            node = (g.first_gpu + rank) // gpus_per_node
            if i == 0:  # the student
                dp0, edp0 = _first_replicas(g.model.parallel, rank)
                save[node] += (OPTIMIZER_STATE_BYTES + weight) * (dense * dp0 + experts * edp0)
                resume[node] += OPTIMIZER_STATE_BYTES * (dense + experts)
            elif g.offloaded:
                offloaded[node] += weight * (dense + experts)
    return [NodeHostMemory(n, save[n] + offloaded[n], resume[n] + offloaded[n], offloaded[n]) for n in range(nodes)]


def host_memory_report(cfg: OPDConfig, hf: dict[str, Any], gpus_per_node: int) -> str:
    """``opd check``'s lines (YAML comments): the most loaded node at a save and at a resume."""
    per_node = checkpoint_host_memory(cfg, hf, gpus_per_node)
    save, resume = max(per_node, key=lambda m: m.save), max(per_node, key=lambda m: m.resume)

    def gib(n: int) -> str:
        return f"{n / 2**30:.1f} GiB"

    return (
        f"# host memory per node at a checkpoint ({gpus_per_node} GPUs per node, {len(per_node)} node(s)):\n"
        f"#   save:   {gib(save.save)} on node {save.node} (idle groups offloaded: {gib(save.offloaded)})\n"
        f"#   resume: {gib(resume.resume)} on node {resume.node} (idle groups offloaded: {gib(resume.offloaded)})\n"
    )
