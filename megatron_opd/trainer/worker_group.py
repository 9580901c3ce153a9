"""Worker groups: one Ray actor per rank, one torch.distributed world per group.

The student, each teacher and each reference model is a :class:`WorkerGroup`. Its actors are
placed on GPUs from a shared placement group (colocated groups share bundles and GPUs through
fractional GPU requests; separate groups take their own bundles) or, without GPUs, as plain CPU
actors. Calls fan out to every rank and wait with a deadline: a dead or hung rank becomes a
:class:`WorkerGroupError` naming the group and the rank, never an eternal wait.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from megatron_opd.trainer.worker import ModelWorker, RankInfo, WorkerSpec


class WorkerGroupError(RuntimeError):
    """A rank of a worker group died, raised, or did not answer in time."""


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster ``RAY_ADDRESS`` names (e.g. the Slurm script's) or, without it, start a
    private local one: never the cluster a stale ``/tmp/ray/ray_current_cluster`` or another local Ray names."""
    if ray.is_initialized():
        return
    env = {"PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env}, log_to_driver=True)
        return
    ray.init(  # "local": a private cluster, never one named by a stale /tmp/ray/ray_current_cluster
        address="local",
        num_cpus=num_cpus or max(os.cpu_count() or 1, 8),
        include_dashboard=False,
        runtime_env={"env_vars": env},
        log_to_driver=True,
        logging_level="warning",
    )


@dataclasses.dataclass
class Placement:
    """Where a group's ranks go: bundle ``offset + r`` of ``pg`` (GPU), sharing the GPU with
    ``share`` colocated groups; ``pg is None`` on CPU-only clusters."""

    pg: PlacementGroup | None
    offset: int = 0
    share: int = 1


def make_placement_group(num_gpus: int, cpus_per_gpu: int = 2, timeout_s: float = 600.0) -> PlacementGroup | None:
    """One bundle per GPU, spread over nodes as the cluster allows; None without GPUs."""
    if num_gpus == 0 or ray.cluster_resources().get("GPU", 0) == 0:
        return None
    available = int(ray.cluster_resources().get("GPU", 0))
    if available < num_gpus:
        raise WorkerGroupError(f"the layout needs {num_gpus} GPUs, the Ray cluster has {available}")
    pg = placement_group([{"GPU": 1, "CPU": cpus_per_gpu}] * num_gpus, strategy="PACK")
    ray.get(pg.ready(), timeout=timeout_s)
    return pg


class Residency:
    """Which colocated groups hold their state on the GPUs. Before a group runs its model, the
    other groups configured with ``offload_when_idle`` move theirs to CPU (and back when their turn
    comes), so a 30B-A3B teacher, the student with its optimizer and the reference take turns on the
    same GPUs. Groups without ``offload_when_idle`` always stay resident."""

    def __init__(self) -> None:
        self.groups: list[WorkerGroup] = []
        self.resident: set[str] = set()

    def register(self, group: WorkerGroup) -> None:
        """A group whose setup just put its model on the GPUs; an offloadable one leaves at once."""
        self.groups.append(group)
        self.resident.add(group.name)
        if group.offload_when_idle:
            self._move(group, "offload")

    def use(self, group: WorkerGroup) -> None:
        for other in self.groups:
            if other is not group and other.offload_when_idle and other.name in self.resident:
                self._move(other, "offload")
        if group.name not in self.resident:
            self._move(group, "onload")

    def _move(self, group: WorkerGroup, method: str) -> None:
        group.call_now(method)
        (self.resident.discard if method == "offload" else self.resident.add)(group.name)


# Worker methods that need the model's state on the device.
MODEL_METHODS = frozenset(
    {
        "score",
        "train_step",
        "export_hf_tensors",
        "save_hf_weights",
        "broadcast_weights",
        "save_checkpoint",
        "load_checkpoint",
    }
)


class WorkerGroup:
    """``world_size`` ranks of one model, each a :class:`ModelWorker` actor."""

    def __init__(
        self, spec: WorkerSpec, placement: Placement, timeout_s: float, residency: Residency | None = None
    ) -> None:
        self.spec, self.name, self.timeout_s = spec, spec.group, timeout_s
        self.offload_when_idle = spec.model.offload_when_idle
        self.residency = residency
        world = spec.model.parallel.world_size
        remote = ray.remote(ModelWorker)
        self.actors = []
        for rank in range(world):
            if placement.pg is None:
                options: dict[str, Any] = {"num_cpus": 0}
            else:
                options = {
                    "num_gpus": 1.0 / placement.share,
                    "num_cpus": 0,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(
                        placement_group=placement.pg, placement_group_bundle_index=placement.offset + rank
                    ),
                }
            self.actors.append(remote.options(name=None, **options).remote(spec, rank, world))
        addr, port = self._get([self.actors[0].rendezvous.remote()], "rendezvous")[0]
        self.ranks: list[RankInfo] = self.call_now("setup", addr, port)
        self.dp_size = self.ranks[0].dp_size
        # The rank that reports results for each DP rank: TP rank 0 of the last pipeline stage.
        self.output_rank = {i.dp_rank: i.rank for i in self.ranks if i.is_output_rank}
        if residency is not None:
            residency.register(self)

    def _get(self, refs: list[Any], method: str) -> list[Any]:
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except GetTimeoutError as e:
            pending = [r for r, ref in enumerate(refs) if not ray.wait([ref], timeout=0)[0]]
            raise WorkerGroupError(
                f"group {self.name!r}: {method} did not finish within {self.timeout_s:.0f}s on ranks {pending} "
                "(a peer may have died; raise trainer.group_timeout_s for slow steps)"
            ) from e
        except RayActorError as e:
            rank = next((r for r, a in enumerate(self.actors) if a._actor_id.hex() in str(e)), "?")
            raise WorkerGroupError(f"group {self.name!r}: rank {rank} died during {method}: {e}") from e
        except RayTaskError as e:
            rank = next((r for r, ref in enumerate(refs) if _failed(ref)), "?")
            raise WorkerGroupError(f"group {self.name!r}: rank {rank} raised in {method}:\n{e}") from e

    def _prepare(self, method: str) -> None:
        if self.residency is not None and method in MODEL_METHODS:
            self.residency.use(self)

    def call_now(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``method(*args, **kwargs)`` on every rank as is; results in rank order."""
        return self._get([getattr(a, method).remote(*args, **kwargs) for a in self.actors], method)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Like :meth:`call_now`, after bringing this group's state onto the GPUs if it was offloaded."""
        self._prepare(method)
        return self.call_now(method, *args, **kwargs)

    def call_per_dp(self, method: str, per_dp: list[Any], **kwargs: Any) -> list[Any]:
        """Run ``method(per_dp[dp_rank], **kwargs)`` on every rank; returns the output rank's result
        for each DP rank, in DP order."""
        self._prepare(method)
        refs = [getattr(a, method).remote(per_dp[info.dp_rank], **kwargs) for a, info in zip(self.actors, self.ranks)]
        results = self._get(refs, method)
        return [results[self.output_rank[d]] for d in range(self.dp_size)]

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass


def _failed(ref: Any) -> bool:
    try:
        ray.get(ref, timeout=0)
    except RayTaskError:
        return True
    except Exception:
        return False
    return False
