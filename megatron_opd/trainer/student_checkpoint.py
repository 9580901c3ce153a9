"""The student's training state in a checkpoint, the workers' side: every student rank writes and reads its
shards of model + optimizer through ``megatron.core.dist_checkpointing`` (``torch_dist``, reshardable to any
TP/PP/EP/DP layout), its RNG states, and rank 0 the LR schedule. The driver's bookkeeping around it (temporary
directory, completion marker, tracker file, pruning) is ``trainer.checkpoint``.

Under expert parallelism megatron builds two optimizers (``ChainedOptimizer``: the dense and the expert-parallel
parameters), without it one. The distributed optimizers' state is written as that of a single optimizer over all
parameters (:func:`_as_one`), so a checkpoint moves between EP = 1 and EP > 1; megatron's non-distributed
optimizers keep their own format, which cannot (a resume across that boundary is refused, naming the fix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_opd.config.errors import ConfigError
from megatron_opd.convert.mcore_io import (
    CHECKPOINT_VERSION,
    load_sharded,
    load_state_into,
    megatron_args,
    model_sharded_state_dict,
)

# Optimizer state in model space (one tensor per parameter): loadable at any TP/PP/EP/DP layout.
# Memory-efficient: only DP rank 0 of each model-parallel group gathers (over Gloo, in host memory) the
# fp32 parameters and Adam moments of its part of the model; without it every DP rank would allocate
# them, 12 bytes per parameter of its TP/PP/EP part (about 48 GB for an 8B model at TP=2), at every save.
OPTIMIZER_SHARDING = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


def _optimizers(optimizer: Any) -> list[Any]:
    """Megatron's optimizers inside ``optimizer``: one, or those of the dense and the expert-parallel parameters."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _distributed(optimizer: Any) -> bool:
    return all(isinstance(o, DistributedOptimizer) for o in _optimizers(optimizer))


def _optimizer_states(optimizer: Any, model_sd: dict[str, Any], is_loading: bool) -> list[dict[str, Any]]:
    """Each distributed optimizer's sharded state, per-parameter tensors keyed by the model's own keys."""
    if len(_optimizers(optimizer)) > 1:
        optimizer._synchronize_steps()  # what ChainedOptimizer.sharded_state_dict does before its parts'
    return [
        o.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_SHARDING)
        for o in _optimizers(optimizer)
    ]


def _as_one(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Distributed optimizers' sharded states as a single optimizer's over all their parameters: their param groups
    in one list, their per-parameter states numbered on (ranks that hold none of an optimizer's: ``None``)."""
    if len(states) == 1:
        return states[0]
    held = [s["param_state"] for s in states if s["param_state"] is not None]
    return {
        **states[0],
        "optimizer": {
            **states[0]["optimizer"],
            "param_groups": [g for s in states for g in s["optimizer"]["param_groups"]],
        },
        "param_state": dict(enumerate(e for p in held for e in p.values())) if held else None,
    }


def _groups_for(optimizer: Any, saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The saved param groups for one distributed optimizer, which finds its groups' by (``wd_mult``, ``lr_mult``,
    ``is_expert_parallel``, ``is_decoupled_lr``): groups saved under the other ``is_expert_parallel`` (the expert
    parameters are expert-parallel only when EP > 1) are offered under this optimizer's too, its own last (they
    win)."""
    own = {g["is_expert_parallel"] for g in optimizer.optimizer.param_groups}
    relabeled = [{**g, "is_expert_parallel": e} for g in saved if g["is_expert_parallel"] not in own for e in own]
    return relabeled + [g for g in saved if g["is_expert_parallel"] in own]


def _split(loaded: dict[str, Any], requests: list[dict[str, Any]], optimizer: Any) -> list[dict[str, Any]]:
    """Each optimizer's own state from the single-optimizer state loaded for ``requests`` (:func:`_as_one` of them)."""
    out, offset = [], 0
    for part, request in zip(_optimizers(optimizer), requests):
        count = len(request["param_state"])
        groups = _groups_for(part, loaded["optimizer"]["param_groups"])
        param_state = {i: loaded["param_state"][offset + i] for i in range(count)}
        out.append({**loaded, "optimizer": {**loaded["optimizer"], "param_groups": groups}, "param_state": param_state})
        offset += count
    return out


def _check_same_optimizers(optimizer: Any, path: str) -> None:
    """megatron's non-distributed optimizers keep one state per optimizer: refuse a checkpoint of another count."""
    saved = dist_checkpointing.load_common_state_dict(path)["optimizer"]
    count = len(saved) if isinstance(saved, dict) and saved and all(isinstance(k, int) for k in saved) else 1
    if count != len(_optimizers(optimizer)):
        ep = "> 1" if count > 1 else "= 1"
        raise ConfigError(
            "resume",
            path,
            f"the checkpoint holds the state of {count} optimizer(s) and this layout has "
            f"{len(_optimizers(optimizer))} (megatron keeps the expert-parallel parameters' optimizer apart when "
            "student.parallel.expert_model_parallel_size > 1); without the distributed optimizer that state "
            "cannot move between the two.",
            f"resume with student.parallel.expert_model_parallel_size {ep}, as the checkpoint was written (the "
            "distributed optimizer, optim.use_distributed_optimizer=true, writes checkpoints that move).",
        )


def _sharded_state(module: torch.nn.Module, optimizer: Any, is_loading: bool) -> dict[str, Any]:
    model_sd = model_sharded_state_dict(module)
    if _distributed(optimizer):
        optimizer_sd = _as_one(_optimizer_states(optimizer, model_sd, is_loading))
    else:
        optimizer_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_SHARDING)
    return {"model": model_sd, "optimizer": optimizer_sd}


def _common_state(module: torch.nn.Module, hf_config: Any, iteration: int) -> dict[str, Any]:
    """What Megatron-LM's loader reads besides the model (its checkpoint version, iteration, args)."""
    return {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "args": megatron_args(module, hf_config),
    }


def _rng_state() -> dict[str, Any]:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def save_training_state(
    path: str, iteration: int, *, module: torch.nn.Module, optimizer: Any, scheduler: Any, hf_config: Any, rank: int
) -> None:
    """Every student rank: its shards of model (the unwrapped ``module``) + ``optimizer``, its RNG, and (rank 0)
    the LR ``scheduler``."""
    _fill_empty_adam_state(optimizer)  # no update yet (every step so far skipped): a fresh Adam's state
    state = {**_sharded_state(module, optimizer, is_loading=False), **_common_state(module, hf_config, iteration)}
    dist_checkpointing.save(state, path)
    rng_dir = Path(path) / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save(_rng_state(), rng_dir / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict()}, Path(path) / "scheduler.pt")
    torch.distributed.barrier()


def _prepare_optimizer_for_load(optimizer: Any) -> None:
    """Work around megatron-core 0.16's distributed optimizer on torch's Adam (no Apex/TE):

    - building the state dict to load into reads ``step`` from every parameter's existing state,
      which a fresh optimizer does not have: give each parameter an all-zero Adam state first;
    - the parameter-state loaders copy every key of a parameter's state from the checkpoint, whose
      per-parameter entries have no ``step`` (it is restored from the param groups): keep ``step``
      aside while a parameter's tensors are copied.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_set_main_param_and_optimizer_states") and not getattr(opt, "_opd_step_aside", False):
            original = opt._set_main_param_and_optimizer_states

            def set_states(model_param: Any, tensors: dict, opt: Any = opt, original: Any = original) -> None:
                group_index, group_order = opt.model_param_group_index_map[model_param]
                state = opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]
                step = state.pop("step", None) if "step" not in tensors else None
                try:
                    original(model_param, tensors)
                finally:
                    if step is not None:
                        state["step"] = step

            opt._set_main_param_and_optimizer_states = set_states
            opt._opd_step_aside = True
    _fill_empty_adam_state(optimizer)


def _own_steps(optimizer: Any) -> None:
    """After a load, give every parameter a ``step`` tensor of its own: megatron-core's distributed optimizer on
    torch's Adam restores one tensor into every parameter's state, which torch's Adam then increments once per
    parameter at each update (the bias corrections of the resumed run would not be the uninterrupted run's)."""
    for opt in _optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _fill_empty_adam_state(optimizer: Any) -> None:
    """Give every parameter without Adam state the state its optimizer starts from: zero moments, and
    for torch's Adam a zero ``step`` of its own. Transformer Engine's (and Apex's) ``FusedAdam`` keep
    the step in the param group; TE's ``state_dict()`` maps every per-parameter key through its
    ``name_to_dtype_map`` (``exp_avg``, ``exp_avg_sq``, ``master_param``), so a ``step`` there fails."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        step_per_param = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
        for group in inner.param_groups:
            for p in group["params"]:
                if p not in inner.state or not inner.state[p]:
                    state = {
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }
                    if step_per_param:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                    inner.state[p] = state


def load_training_state(path: str, *, module: torch.nn.Module, optimizer: Any, scheduler: Any, rank: int) -> None:
    """Restore what :func:`save_training_state` wrote; the checkpoint may have been written at
    another TP/PP/EP layout (dist_checkpointing reshards) and with the other spec (local or TE)."""
    _prepare_optimizer_for_load(optimizer)
    if _distributed(optimizer):
        model_sd = model_sharded_state_dict(module)
        requests = _optimizer_states(optimizer, model_sd, is_loading=True)
        request = {"model": model_sd, "optimizer": _as_one(requests)}
    else:
        _check_same_optimizers(optimizer, path)
        requests, request = [], _sharded_state(module, optimizer, is_loading=True)
    # A checkpoint of the other spec: Transformer Engine's `_extra_state` (of the norms) may be absent
    state = load_sharded(request, path)
    load_state_into(module, state["model"], path)
    if requests and len(requests) > 1:
        optimizer.load_state_dict(_split(state["optimizer"], requests, optimizer))
    elif requests:
        optimizer.load_state_dict(_split(state["optimizer"], requests, optimizer)[0])
    else:
        optimizer.load_state_dict(state["optimizer"])
    _own_steps(optimizer)
    scheduler.load_state_dict(torch.load(Path(path) / "scheduler.pt", weights_only=False)["scheduler"])
    rng_file = Path(path) / "rng" / f"rank_{rank:05d}.pt"
    if rng_file.is_file():  # same world size: restore this rank's generators exactly
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
