"""The process group that carries weights from the trainer to rollout servers (SGLang's
``/init_weights_update_group`` + ``/update_weights_from_distributed``).

Both sides build it the way SGLang's ``init_custom_process_group`` does, so it can exist next to
(and independently of) the default group of either process: a TCP rendezvous at
``master_address:master_port``, a ``PrefixStore`` named after the group, and a process group of
``world_size`` ranks registered with identity rank mapping. The trainer is rank 0 and broadcasts;
server ``i`` with ``G_i`` GPUs holds ranks ``rank_offset .. rank_offset + G_i - 1``.
Tensors are sent one broadcast each, in the order of the request's ``names``.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def node_address() -> str:
    """The IP address other nodes reach this process's node at: Ray's node address (the one ``ray
    start --node-ip-address`` was given inside a Ray job, else that of the interface routing outward).
    Never what the host name resolves to, which common ``/etc/hosts`` layouts map to 127.0.1.1."""
    import ray

    return ray.util.get_node_ip_address()


def rendezvous_address(master_address: str | None, master_port: int) -> tuple[str, int]:
    """Where this process hosts a group's TCP store: ``master_address`` (default: :func:`node_address`)
    and ``master_port`` (0: a port free on that address now)."""
    address = master_address or node_address()
    if master_port:
        return address, master_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return address, int(s.getsockname()[1])


def init_weight_update_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "nccl",
    timeout_s: float = 600.0,
) -> dist.ProcessGroup:
    """Join the weight-update group as ``rank`` (blocks until all ``world_size`` ranks joined)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    made = c10d._new_process_group_helper(
        world_size,
        rank,
        [],
        c10d.Backend(backend),
        c10d.PrefixStore(group_name, store),
        group_name=group_name,
        timeout=timeout,
    )
    group = made[0] if isinstance(made, tuple) else made  # (group, store) in recent torch versions
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (SGLang resolves it with ``getattr(torch, name)``)."""
    return str(dtype).removeprefix("torch.")


def receive_weights(
    group: dist.ProcessGroup, names: list[str], dtypes: list[str], shapes: list[list[int]], device: torch.device
) -> list[tuple[str, torch.Tensor]]:
    """The receiving side of one update: every tensor broadcast from rank 0, in request order.

    All tensors are received before any is used, so a bad tensor never leaves the sender blocked."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)}).")
    targets = [getattr(torch, d, None) for d in dtypes]
    bad = [d for d, t in zip(dtypes, targets) if not isinstance(t, torch.dtype)]
    if bad:
        raise ValueError(f"unknown dtypes {bad}; use torch names such as bfloat16.")
    received = []
    for name, dtype, shape in zip(names, targets, shapes):
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=0, group=group)
        received.append((name, tensor))
    return received


def destroy_weight_update_group(group: dist.ProcessGroup) -> None:
    """Shut the group down and forget it (``destroy_process_group`` drops its rank mapping too)."""
    dist.destroy_process_group(group)
