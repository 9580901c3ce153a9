"""Trainer -> rollout-server weight sync, SGLang's two ways.

- Disk (``/update_weights_from_disk``): the (HF name, tensor) stream is written as an HF model
  directory (:func:`megatron_opd.convert.export.save_hf_checkpoint`: safetensors shards, index,
  the model's config and tokenizer); every server then loads that directory in place.
- Distributed (:class:`DistributedWeightSync`): the trainer (rank 0) and every server GPU form one
  process group (:mod:`megatron_opd.rollout.weight_group`); each bucket of tensors is announced to
  all servers with ``/update_weights_from_distributed`` (names, dtypes, shapes) and then broadcast,
  tensor by tensor, while the servers' HTTP calls are pending. NCCL on GPUs; gloo works on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from megatron_opd.rollout.base import RolloutError
from megatron_opd.rollout.sglang import protocol


def buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of tensors of at most ``bucket_bytes`` each (a larger tensor goes alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


class DistributedWeightSync:
    """The trainer side of SGLang's distributed weight update (it is rank 0 of the group).

    ``post(url, path, body, timeout_s) -> dict`` sends one request and raises on failure; the HTTP
    calls that must wait for the broadcast run in threads while this process broadcasts.
    """

    def __init__(
        self,
        urls: list[str],
        gpus_per_server: list[int],
        post: Callable[[str, str, dict[str, Any], float], dict[str, Any]],
        *,
        master_address: str,
        master_port: int,
        backend: str = "nccl",
        group_name: str = protocol.DEFAULT_GROUP_NAME,
        bucket_mb: int = 1024,
        timeout_s: float = 600.0,
    ) -> None:
        if len(urls) != len(gpus_per_server):
            raise ValueError("one GPU count per server URL is needed.")
        self.urls, self.gpus = urls, gpus_per_server
        self.post = post
        self.master_address, self.master_port, self.backend = master_address, master_port, backend
        self.group_name, self.bucket_bytes, self.timeout_s = group_name, bucket_mb * 2**20, timeout_s
        self.world_size = 1 + sum(gpus_per_server)
        self.group: Any = None

    @property
    def device(self) -> torch.device:
        """Where broadcast tensors must live: the current GPU for NCCL, CPU otherwise."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def rank_offsets(self) -> list[int]:
        """Server i's first rank in the group (rank 0 is the trainer)."""
        offsets, nxt = [], 1
        for g in self.gpus:
            offsets.append(nxt)
            nxt += g
        return offsets

    def init_bodies(self) -> list[dict[str, Any]]:
        return [
            protocol.init_weights_update_group_body(
                self.master_address, self.master_port, off, self.world_size, self.group_name, self.backend
            )
            for off in self.rank_offsets()
        ]

    def _all_servers(self, pool: ThreadPoolExecutor, path: str, bodies: list[dict[str, Any]]) -> list[Future]:
        return [pool.submit(self.post, url, path, body, self.timeout_s) for url, body in zip(self.urls, bodies)]

    @staticmethod
    def _results(futures: list[Future], what: str, urls: list[str]) -> None:
        errors = []
        for url, f in zip(urls, futures):
            try:
                f.result()
            except Exception as e:
                errors.append(f"{url}: {e}")
        if errors:
            raise RolloutError(f"{what} failed on {len(errors)} server(s): " + "; ".join(errors))

    def init_group(self) -> None:
        """Create the group: servers join through HTTP while this process joins as rank 0."""
        from megatron_opd.rollout.weight_group import init_weight_update_group

        with ThreadPoolExecutor(len(self.urls)) as pool:
            futures = self._all_servers(pool, "/init_weights_update_group", self.init_bodies())
            try:
                self.group = init_weight_update_group(
                    self.master_address,
                    self.master_port,
                    0,
                    self.world_size,
                    self.group_name,
                    self.backend,
                    self.timeout_s,
                )
            finally:
                self._results(futures, "/init_weights_update_group", self.urls)

    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None) -> int:
        """Broadcast every tensor to all servers, bucket by bucket; returns the number of tensors sent."""
        import torch.distributed as dist

        from megatron_opd.rollout.weight_group import dtype_name

        if self.group is None:
            self.init_group()
        sent = 0
        with ThreadPoolExecutor(len(self.urls)) as pool:
            for bucket in buckets(named_tensors, self.bucket_bytes):
                tensors = [(n, t.detach().to(self.device).contiguous()) for n, t in bucket]
                body = protocol.update_weights_from_distributed_body(
                    [n for n, _ in tensors],
                    [dtype_name(t.dtype) for _, t in tensors],
                    [list(t.shape) for _, t in tensors],
                    self.group_name,
                    weight_version,
                )
                futures = self._all_servers(pool, "/update_weights_from_distributed", [body] * len(self.urls))
                try:
                    for _, t in tensors:
                        dist.broadcast(t, src=0, group=self.group)
                finally:
                    self._results(futures, "/update_weights_from_distributed", self.urls)
                sent += len(tensors)
        return sent

    def destroy(self) -> None:
        """Tear the group down on both sides."""
        from megatron_opd.rollout.weight_group import destroy_weight_update_group

        if self.group is None:
            return
        try:
            with ThreadPoolExecutor(len(self.urls)) as pool:
                futures = self._all_servers(
                    pool, "/destroy_weights_update_group", [{"group_name": self.group_name}] * len(self.urls)
                )
                self._results(futures, "/destroy_weights_update_group", self.urls)
        finally:  # this side's group goes even when a server (dead, restarted) cannot answer
            destroy_weight_update_group(self.group)
            self.group = None
