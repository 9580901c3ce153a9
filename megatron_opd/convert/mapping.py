"""Name and shape mapping between Hugging Face Qwen3 / Qwen3-MoE tensors and Megatron-Core
parameters, and the tensor transforms that go with it.

A Megatron parameter name is resolved to a :class:`ParamMapping`: which HF tensors make it, and
how they are laid out (``kind``). For each kind, :func:`hf_to_shard` builds one TP rank's shard
from the HF tensors and :func:`shards_to_hf` rebuilds the HF tensors from all TP shards; the two
are exact inverses. Layer and expert indices in Megatron names are local to a PP stage / EP rank;
the caller passes the global ones (see :func:`resolve`).

Kinds:
- ``replicated``: the same tensor on every TP rank (norms, router).
- ``column``: split on dim 0 (vocab-parallel embedding / output layer too).
- ``row``: split on dim 1.
- ``qkv``: HF ``q_proj``, ``k_proj``, ``v_proj`` -> Megatron ``linear_qkv``, interleaved per
  query group: for each group ``[q heads of the group; k; v]``, split on groups.
- ``gated``: HF ``gate_proj``, ``up_proj`` -> ``linear_fc1``; rank r holds ``[gate_r; up_r]``.

Checkpoint keys of Megatron's sharded state dict (``dist_checkpointing``) name *global* tensors:
layers are stacked along a prepended axis (``decoder.layers.self_attention.linear_qkv.weight`` is
``[num_layers, ...]``) or, for models with mixed layer types, keyed per layer
(``decoder.layers.3.…``); experts are stacked along a further prepended axis
(``decoder.layers.mlp.experts.experts.linear_fc1.weight`` is ``[num_layers, num_experts, ...]``).
The global tensor of one layer / expert is the TP=1 shard (``hf_to_shard(kind, hf, 0, 1)``), so
:func:`parse_sharded_key` plus the kinds above convert checkpoints without building a model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import torch
from torch import Tensor

Kind = Literal["replicated", "column", "row", "qkv", "gated"]


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    mcore: str  # Megatron parameter name (with local layer / expert indices)
    hf: tuple[str, ...]  # HF tensor names, in the order the kind expects
    kind: Kind
    tp_axis: Literal["tp", "etp"] = "tp"  # expert linears split over expert-tensor-parallel ranks
    expert: int | None = None  # global expert index for expert parameters


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_query_groups: int
    head_dim: int

    @classmethod
    def of(cls, hf_config: object) -> AttentionShape:
        from megatron_opd.models.qwen3 import head_dim

        return cls(hf_config.num_attention_heads, hf_config.num_key_value_heads, head_dim(hf_config))


# (regex over the Megatron name after the layer prefix, HF suffixes, kind)
_LAYER_RULES: list[tuple[str, tuple[str, ...], Kind]] = [
    (
        r"input_layernorm\.weight|self_attention\.linear_qkv\.layer_norm_weight",
        ("input_layernorm.weight",),
        "replicated",
    ),
    (
        r"self_attention\.linear_qkv\.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    (r"self_attention\.q_layernorm\.weight", ("self_attn.q_norm.weight",), "replicated"),
    (r"self_attention\.k_layernorm\.weight", ("self_attn.k_norm.weight",), "replicated"),
    (r"self_attention\.linear_proj\.weight", ("self_attn.o_proj.weight",), "row"),
    (
        r"pre_mlp_layernorm\.weight|mlp\.linear_fc1\.layer_norm_weight",
        ("post_attention_layernorm.weight",),
        "replicated",
    ),
    (r"mlp\.linear_fc1\.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gated"),
    (r"mlp\.linear_fc2\.weight", ("mlp.down_proj.weight",), "row"),
    (r"mlp\.router\.weight", ("mlp.gate.weight",), "replicated"),
]
# SequentialMLP: experts.local_experts.{e}.linear_fcX.weight ; TEGroupedMLP: experts.linear_fcX.weight{e}
_EXPERT_RE = re.compile(
    r"mlp\.experts\.(?:local_experts\.(?P<e1>\d+)\.linear_fc(?P<f1>[12])\.weight"
    r"|linear_fc(?P<f2>[12])\.weight(?P<e2>\d+))$"
)
# GroupedExperts (the local spec's): experts.linear_fcX.weight stacks the local experts on dim 0; expert e is
# TEGroupedMLP's experts.linear_fcX.weight{e}
_STACKED_EXPERTS_RE = re.compile(r"\.mlp\.experts\.linear_fc[12]\.weight$")
_LAYER_RE = re.compile(r"^decoder\.layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
_TOP_RULES: dict[str, tuple[str, Kind]] = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", "column"),
    "output_layer.weight": ("lm_head.weight", "column"),
    "decoder.final_layernorm.weight": ("model.norm.weight", "replicated"),
}


class UnmappedParameterError(KeyError):
    pass


def stacked_expert_names(mcore_name: str, local_experts: int) -> list[str] | None:
    """The per-expert names (``…weight0``, ``…weight1``, …) of a parameter that stacks the local experts
    on its first dimension, or None for any other parameter."""
    if not _STACKED_EXPERTS_RE.search(mcore_name):
        return None
    return [f"{mcore_name}{e}" for e in range(local_experts)]


def resolve(
    mcore_name: str,
    *,
    layer_offset: int = 0,
    expert_offset: int = 0,
    tie_word_embeddings: bool = False,
) -> ParamMapping:
    """The mapping of one Megatron parameter of this rank.

    ``layer_offset``: global index of this stage's first layer. ``expert_offset``: global index
    of this EP rank's first local expert. A tied ``output_layer`` (a PP>1 last stage keeps its own
    copy) maps to ``model.embed_tokens.weight``.
    """
    if mcore_name in _TOP_RULES:
        hf, kind = _TOP_RULES[mcore_name]
        if mcore_name == "output_layer.weight" and tie_word_embeddings:
            hf = "model.embed_tokens.weight"
        return ParamMapping(mcore_name, (hf,), kind)
    m = _LAYER_RE.match(mcore_name)
    if not m:
        raise UnmappedParameterError(f"no HF mapping for Megatron parameter {mcore_name!r}")
    layer = int(m["layer"]) + layer_offset
    rest = m["rest"]
    prefix = f"model.layers.{layer}."
    em = _EXPERT_RE.match(rest)
    if em:
        local = int(em["e1"] if em["e1"] is not None else em["e2"])
        fc = em["f1"] or em["f2"]
        expert = local + expert_offset
        ep = f"{prefix}mlp.experts.{expert}."
        if fc == "1":
            return ParamMapping(mcore_name, (ep + "gate_proj.weight", ep + "up_proj.weight"), "gated", "etp", expert)
        return ParamMapping(mcore_name, (ep + "down_proj.weight",), "row", "etp", expert)
    for pattern, hf_suffixes, kind in _LAYER_RULES:
        if re.fullmatch(pattern, rest):
            return ParamMapping(mcore_name, tuple(prefix + s for s in hf_suffixes), kind)
    raise UnmappedParameterError(f"no HF mapping for Megatron parameter {mcore_name!r}")


def _split(t: Tensor, dim: int, rank: int, size: int) -> Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of shape {tuple(t.shape)} is not divisible by {size}")
    return t.chunk(size, dim=dim)[rank]


def hf_to_shard(kind: Kind, hf: list[Tensor], rank: int, size: int, attn: AttentionShape | None = None) -> Tensor:
    """TP rank ``rank`` of ``size``'s shard of the Megatron parameter made from ``hf``."""
    if kind == "replicated":
        return hf[0]
    if kind == "column":
        return _split(hf[0], 0, rank, size)
    if kind == "row":
        return _split(hf[0], 1, rank, size)
    if kind == "gated":
        return torch.cat([_split(hf[0], 0, rank, size), _split(hf[1], 0, rank, size)], dim=0)
    if kind == "qkv":
        assert attn is not None
        q, k, v = hf
        ng, hd = attn.num_query_groups, attn.head_dim
        qpg = attn.num_heads // ng
        h = q.shape[-1]
        full = torch.cat(
            [q.reshape(ng, qpg * hd, h), k.reshape(ng, hd, h), v.reshape(ng, hd, h)], dim=1
        )  # [ng, (qpg + 2) * hd, h]
        return _split(full, 0, rank, size).reshape(-1, h)
    raise ValueError(f"unknown kind {kind!r}")


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    """``torch.cat``, without the copy when there is one tensor (TP=1: a view of it)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def shards_to_hf(kind: Kind, shards: list[Tensor], attn: AttentionShape | None = None) -> list[Tensor]:
    """The HF tensors of a Megatron parameter from its TP shards (rank order); inverse of
    :func:`hf_to_shard`. With one shard the results may be views of it."""
    if kind == "replicated":
        return [shards[0]]
    if kind == "column":
        return [_cat(shards, 0)]
    if kind == "row":
        return [_cat(shards, 1)]
    if kind == "gated":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [_cat([g for g, _ in halves], 0), _cat([u for _, u in halves], 0)]
    if kind == "qkv":
        assert attn is not None
        ng, hd = attn.num_query_groups, attn.head_dim
        qpg = attn.num_heads // ng
        h = shards[0].shape[-1]
        full = _cat([s.reshape(-1, (qpg + 2) * hd, h) for s in shards], 0)
        q, k, v = full.split([qpg * hd, hd, hd], dim=1)
        return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]
    raise ValueError(f"unknown kind {kind!r}")


_SHARDED_LAYER_RE = re.compile(r"^decoder\.layers\.(?:(?P<layer>\d+)\.)?(?P<rest>.+)$")
_SHARDED_EXPERT_RE = re.compile(r"^mlp\.experts\.experts\.(?P<fc>linear_fc[12]\.weight)$")


@dataclasses.dataclass(frozen=True)
class ShardedKey:
    """A tensor key of a Megatron ``dist_checkpointing`` checkpoint, split into its parts.

    ``prepended`` leading axes of the global tensor index layers (when ``layer`` is None and the key
    is a layer key) and then experts; :meth:`mapping` takes those indices.
    """

    key: str
    rest: str  # the name inside a layer (``self_attention.linear_qkv.weight``), or the whole key
    layer: int | None  # the layer of a per-layer key ``decoder.layers.<layer>.…``
    stacked_layers: bool
    stacked_experts: bool

    @property
    def prepended(self) -> int:
        return int(self.stacked_layers) + int(self.stacked_experts)

    def mapping(self, index: tuple[int, ...] = (), *, tie_word_embeddings: bool = False) -> ParamMapping:
        """The mapping of the layer / expert at ``index`` (global indices along the prepended axes)."""
        if len(index) != self.prepended:
            raise ValueError(f"{self.key}: expected {self.prepended} prepended indices, got {index}")
        if self.layer is None and not self.stacked_layers:
            return resolve(self.key, tie_word_embeddings=tie_word_embeddings)
        layer = index[0] if self.stacked_layers else self.layer
        expert = _SHARDED_EXPERT_RE.match(self.rest)
        if expert:
            name = f"decoder.layers.{layer}.mlp.experts.local_experts.{index[-1]}.{expert['fc']}"
        else:
            name = f"decoder.layers.{layer}.{self.rest}"
        return resolve(name, tie_word_embeddings=tie_word_embeddings)


def parse_sharded_key(key: str) -> ShardedKey:
    """Split a checkpoint key; raises :class:`UnmappedParameterError` for keys with no HF tensor."""
    m = _SHARDED_LAYER_RE.match(key)
    if m is None:
        if key not in _TOP_RULES:
            raise UnmappedParameterError(f"no HF mapping for checkpoint key {key!r}")
        return ShardedKey(key, key, None, False, False)
    layer = None if m["layer"] is None else int(m["layer"])
    rest = m["rest"]
    if not (_SHARDED_EXPERT_RE.match(rest) or any(re.fullmatch(p, rest) for p, _, _ in _LAYER_RULES)):
        raise UnmappedParameterError(f"no HF mapping for checkpoint key {key!r}")
    return ShardedKey(key, rest, layer, layer is None, bool(_SHARDED_EXPERT_RE.match(rest)))


def hf_shapes(kind: Kind, shard_shape: tuple[int, ...], size: int, attn: AttentionShape | None = None) -> list[tuple]:
    """Shapes of the HF tensors of a parameter whose ``size`` TP shards have ``shard_shape``."""
    shards = [torch.empty(shard_shape, device="meta")] * size
    return [tuple(t.shape) for t in shards_to_hf(kind, shards, attn)]


def hf_order_key(name: str) -> tuple:
    """Sort key giving an HF checkpoint's natural order: embeddings, layers (numerically), final
    norm, LM head."""
    section = 0 if name.startswith("model.embed_tokens") else 3 if name.startswith("lm_head") else 1
    if name.startswith("model.norm"):
        section = 2
    return (section, *(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)))


def expected_hf_names(hf_config: object) -> list[str]:
    """The tensor names of an HF Qwen3 / Qwen3-MoE checkpoint of ``hf_config``, in HF order (no
    ``lm_head.weight`` when the embeddings are tied; per-expert MoE keys)."""
    from megatron_opd.models.qwen3 import moe_layer_pattern, num_experts

    names = ["model.embed_tokens.weight"]
    attn = [suffix for _, hf, _ in _LAYER_RULES for suffix in hf if not suffix.startswith("mlp.")]
    for layer, moe in enumerate(moe_layer_pattern(hf_config)):
        prefix = f"model.layers.{layer}."
        names += [prefix + suffix for suffix in attn]
        if moe:
            names.append(prefix + "mlp.gate.weight")
            for e in range(num_experts(hf_config)):
                names += [f"{prefix}mlp.experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down")]
        else:
            names += [prefix + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    names.append("model.norm.weight")
    if not getattr(hf_config, "tie_word_embeddings", False):
        names.append("lm_head.weight")
    return names
