"""Trainer -> rollout-server weight sync, SGLang's two ways.

- Disk (``/update_weights_from_disk``): the (HF name, tensor) stream is written as an HF model
  directory (:func:`megatron_opd.convert.export.save_hf_checkpoint`: safetensors shards, index,
  the model's config and tokenizer); every server then loads that directory in place.
- Distributed (:class:`DistributedWeightSync`): a :class:`WeightSender` (rank 0 of the group: in a
  training run the student's rank 0, on its own node) and every server GPU form one process group
  (:mod:`megatron_opd.rollout.weight_group`) whose TCP store the sender hosts. The engine announces
  each bucket of tensors to all servers with ``/update_weights_from_distributed`` (names, dtypes,
  shapes) while the sender broadcasts them, tensor by tensor, in the same order. NCCL on GPUs; gloo
  works on CPU. The tensors never pass through the engine's process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import torch

from megatron_opd.rollout.base import RolloutError
from megatron_opd.rollout.sglang import protocol

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of an update as the servers are told of it (``dtype``: torch's name, e.g. ``bfloat16``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * getattr(torch, self.dtype).itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        from megatron_opd.rollout.weight_group import dtype_name

        return cls(name, dtype_name(tensor.dtype), tuple(tensor.shape))


def _tensor_bytes(named_tensor: Any) -> int:
    return named_tensor[1].numel() * named_tensor[1].element_size()


def buckets(items: Iterable[T], bucket_bytes: int, nbytes: Callable[[T], int] = _tensor_bytes) -> Iterator[list[T]]:
    """Consecutive groups of ``items`` ((name, tensor) pairs unless ``nbytes`` sizes them) of at most
    ``bucket_bytes`` each (a larger item goes alone)."""
    bucket: list[T] = []
    size = 0
    for item in items:
        n = nbytes(item)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += n
    if bucket:
        yield bucket


def broadcast_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], group: Any, device: torch.device, bucket_bytes: int
) -> int:
    """The sender's side of updates: every tensor broadcast from rank 0 of ``group`` in order,
    waiting for each bucket (as :func:`buckets` cuts them) to be received before the next is
    gathered, so at most one bucket is in flight. Returns the number of tensors sent."""
    import torch.distributed as dist

    sent = 0
    for bucket in buckets(named_tensors, bucket_bytes):
        works = [
            dist.broadcast(t.detach().to(device).contiguous(), src=0, group=group, async_op=True) for _, t in bucket
        ]
        for work in works:
            work.wait()
        sent += len(bucket)
    return sent


def group_device(backend: str) -> torch.device:
    """Where broadcast tensors must live: the current GPU for NCCL, CPU otherwise."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class WeightSender(Protocol):
    """Rank 0 of the weight-update group: hosts its TCP store and broadcasts the weights."""

    def rendezvous(self, master_address: str | None, master_port: int) -> tuple[str, int]:
        """The address and port the sender will host the group's TCP store at (defaults: its node's
        address, a free port there)."""
        ...

    def join(self, address: str, port: int, world_size: int, group_name: str, backend: str, timeout_s: float) -> None:
        """Join as rank 0; returns once every server joined."""
        ...

    def tensor_specs(self) -> list[TensorSpec]:
        """The tensors of the next :meth:`send`, in its order."""
        ...

    def send(self, group_name: str, bucket_bytes: int) -> int:
        """:func:`broadcast_tensors` of every tensor of :meth:`tensor_specs` over the group."""
        ...

    def leave(self, group_name: str) -> None:
        """Destroy this side of the group."""
        ...


class LocalWeightSender:
    """This process as the sender, of the tensors last given to :meth:`set_tensors` (held in memory)."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.groups: dict[str, Any] = {}
        self.backend = "nccl"

    def set_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.tensors = list(named_tensors)

    def rendezvous(self, master_address: str | None, master_port: int) -> tuple[str, int]:
        from megatron_opd.rollout.weight_group import rendezvous_address

        return rendezvous_address(master_address, master_port)

    def join(self, address: str, port: int, world_size: int, group_name: str, backend: str, timeout_s: float) -> None:
        from megatron_opd.rollout.weight_group import init_weight_update_group

        self.groups[group_name] = init_weight_update_group(address, port, 0, world_size, group_name, backend, timeout_s)
        self.backend = backend

    def tensor_specs(self) -> list[TensorSpec]:
        return [TensorSpec.of(n, t) for n, t in self.tensors]

    def send(self, group_name: str, bucket_bytes: int) -> int:
        return broadcast_tensors(self.tensors, self.groups[group_name], group_device(self.backend), bucket_bytes)

    def leave(self, group_name: str) -> None:
        from megatron_opd.rollout.weight_group import destroy_weight_update_group

        group = self.groups.pop(group_name, None)
        if group is not None:
            destroy_weight_update_group(group)


class DistributedWeightSync:
    """The engine's side of SGLang's distributed weight update over one group: ``sender`` (rank 0)
    and the servers at ``urls`` (server ``i`` holds ``gpus_per_server[i]`` ranks).

    ``post(url, path, body, timeout_s) -> dict`` sends one request and raises on failure; HTTP calls
    that must wait for the sender run in threads while the sender joins or broadcasts in another.
    ``master_address`` / ``master_port``: where the sender hosts the group's TCP store (``None`` / 0:
    its node's address, a free port there).
    """

    def __init__(
        self,
        urls: list[str],
        gpus_per_server: list[int],
        post: Callable[[str, str, dict[str, Any], float], dict[str, Any]],
        sender: WeightSender,
        *,
        master_address: str | None = None,
        master_port: int = 0,
        backend: str = "nccl",
        group_name: str = protocol.DEFAULT_GROUP_NAME,
        bucket_mb: int = 1024,
        timeout_s: float = 600.0,
    ) -> None:
        if len(urls) != len(gpus_per_server):
            raise ValueError("one GPU count per server URL is needed.")
        self.urls, self.gpus, self.post, self.sender = urls, gpus_per_server, post, sender
        self.master_address, self.master_port, self.backend = master_address, master_port, backend
        self.group_name, self.bucket_bytes, self.timeout_s = group_name, bucket_mb * 2**20, timeout_s
        self.world_size = 1 + sum(gpus_per_server)
        self.joined = False

    def rank_offsets(self) -> list[int]:
        """Server i's first rank in the group (rank 0 is the sender)."""
        offsets, nxt = [], 1
        for g in self.gpus:
            offsets.append(nxt)
            nxt += g
        return offsets

    def init_bodies(self, address: str, port: int) -> list[dict[str, Any]]:
        return [
            protocol.init_weights_update_group_body(address, port, off, self.world_size, self.group_name, self.backend)
            for off in self.rank_offsets()
        ]

    def _all_servers(self, pool: ThreadPoolExecutor, path: str, bodies: list[dict[str, Any]]) -> list[Future]:
        return [pool.submit(self.post, url, path, body, self.timeout_s) for url, body in zip(self.urls, bodies)]

    def _results(self, futures: list[Future], what: str, sender: Future | None = None) -> None:
        errors = []
        for url, f in zip(self.urls, futures):
            try:
                f.result()
            except Exception as e:
                errors.append(f"{url}: {e}")
        if sender is not None:
            try:
                sender.result()
            except Exception as e:
                errors.append(f"the sender: {e}")
        if errors:
            raise RolloutError(f"{what} failed on {len(errors)} member(s) of the group: " + "; ".join(errors))

    def init_group(self) -> None:
        """Create the group: the servers join through HTTP while the sender joins as rank 0."""
        address, port = self.sender.rendezvous(self.master_address, self.master_port)
        with ThreadPoolExecutor(len(self.urls) + 1) as pool:
            futures = self._all_servers(pool, "/init_weights_update_group", self.init_bodies(address, port))
            joined = pool.submit(
                self.sender.join, address, port, self.world_size, self.group_name, self.backend, self.timeout_s
            )
            self._results(futures, "/init_weights_update_group", joined)
        self.joined = True

    def update(self, weight_version: str | None) -> int:
        """Every tensor of the sender to all servers, bucket by bucket; returns the number sent."""
        if not self.joined:
            self.init_group()
        specs = self.sender.tensor_specs()
        with ThreadPoolExecutor(len(self.urls) + 1) as pool:
            sending = pool.submit(self.sender.send, self.group_name, self.bucket_bytes)
            for bucket in buckets(specs, self.bucket_bytes, lambda spec: spec.nbytes):
                body = protocol.update_weights_from_distributed_body(
                    [s.name for s in bucket],
                    [s.dtype for s in bucket],
                    [list(s.shape) for s in bucket],
                    self.group_name,
                    weight_version,
                )
                futures = self._all_servers(pool, "/update_weights_from_distributed", [body] * len(self.urls))
                try:
                    self._results(futures, "/update_weights_from_distributed")
                except RolloutError as e:  # the sender waits for the missing receivers until the group's timeout
                    failed = e
                    break
            else:
                failed = None
            try:
                self._results([], "/update_weights_from_distributed", sending)
            except RolloutError as e:
                raise RolloutError(f"{failed}; {e}" if failed else str(e)) from e
        if failed is not None:
            raise failed
        return len(specs)

    def destroy(self) -> None:
        """Tear the group down on both sides."""
        if not self.joined:
            return
        try:
            with ThreadPoolExecutor(len(self.urls)) as pool:
                futures = self._all_servers(
                    pool, "/destroy_weights_update_group", [{"group_name": self.group_name}] * len(self.urls)
                )
                self._results(futures, "/destroy_weights_update_group")
        finally:  # the sender's side goes even when a server (dead, restarted) cannot answer
            self.sender.leave(self.group_name)
            self.joined = False
