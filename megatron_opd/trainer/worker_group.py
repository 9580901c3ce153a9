"""Worker groups: one Ray actor per rank, one torch.distributed world per group.

Each teacher and each reference model is a :class:`ScoringGroup`, the student a :class:`StudentGroup`; their
methods are what the driver asks of a group, typed (``StudentGroup.train_step(samples) -> TrainMetrics``,
``ScoringGroup.score(samples, request) -> {uid: TokenScores}``). A method that runs the model brings the
group's state onto its GPUs first (:meth:`WorkerGroup.use_device`, when colocated groups take turns); the
others leave it where it is. The actors are placed on GPUs from a shared placement group (colocated groups
share bundles and GPUs through fractional GPU requests; separate groups take their own bundles) or, without
GPUs, as plain CPU actors. Calls fan out to every rank and wait with a deadline: a dead or hung rank becomes a
:class:`WorkerGroupError` naming the group and the rank, never an eternal wait.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor

from megatron_opd.scoring.contract import ScoreRequest, TokenScores
from megatron_opd.trainer.batch import Sample, split_for_data_parallel
from megatron_opd.trainer.train_step import TrainMetrics
from megatron_opd.trainer.worker import ModelWorker, RankInfo, WorkerSpec

# A method call on one actor: ``lambda actor: actor.method.remote(...)``, an object reference.
Call = Callable[[Any], Any]


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
            self._offload(group)

    def use(self, group: WorkerGroup) -> None:
        for other in self.groups:
            if other is not group and other.offload_when_idle and other.name in self.resident:
                self._offload(other)
        if group.name not in self.resident:
            group.onload()
            self.resident.add(group.name)

    def _offload(self, group: WorkerGroup) -> None:
        group.offload()
        self.resident.discard(group.name)


class WorkerGroup:
    """``world_size`` ranks of one model, each a :class:`ModelWorker` actor: what every group does."""

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
        self.ranks: list[RankInfo] = self._on_every_rank(lambda a: a.setup.remote(addr, port), "setup")
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

    def _on_every_rank(self, call: Call, method: str) -> list[Any]:
        """``call`` on every rank's actor; the results in rank order (``method`` names it in errors)."""
        return self._get([call(a) for a in self.actors], method)

    def _on_output_ranks(self, call: Callable[[Any, Any], Any], per_dp: list[Any], method: str) -> list[Any]:
        """``call(actor, per_dp[dp_rank])`` on every rank; the output rank's result for each DP rank, in DP order."""
        results = self._get([call(a, per_dp[info.dp_rank]) for a, info in zip(self.actors, self.ranks)], method)
        return [results[self.output_rank[d]] for d in range(self.dp_size)]

    def use_device(self) -> None:
        """Bring this group's state onto its GPUs (and colocated groups that offload theirs off them) before it
        runs its model."""
        if self.residency is not None:
            self.residency.use(self)

    def offload(self) -> None:
        """Every rank's state to the host (as is: the residency bookkeeping calls it)."""
        self._on_every_rank(lambda a: a.offload.remote(), "offload")

    def onload(self) -> None:
        self._on_every_rank(lambda a: a.onload.remote(), "onload")

    def ping(self) -> list[dict[str, Any]]:
        """Rank, pid and time of every rank (no model work)."""
        return self._on_every_rank(lambda a: a.ping.remote(), "ping")

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


class ScoringGroup(WorkerGroup):
    """A model that scores rollouts: a teacher, a reference (and the student, for ``ℓ_old``)."""

    def score(
        self, samples: list[Sample], request: ScoreRequest, ids: dict[int, Tensor] | None = None
    ) -> dict[int, TokenScores]:
        """Every sample scored as ``request`` asks (balanced over the DP ranks), by uid. ``ids``: by uid, the ids
        to score each sample at (``request.at_ids``)."""
        if not samples:
            return {}
        self.use_device()
        parts = split_for_data_parallel(samples, self.dp_size)

        def call(actor: Any, part: list[Sample]) -> Any:
            return actor.score.remote(part, request, None if ids is None else {s.uid: ids[s.uid] for s in part})

        merged: dict[int, TokenScores] = {}
        for result in self._on_output_ranks(call, parts, "score"):
            merged.update(result or {})
        return merged


class StudentGroup(ScoringGroup):
    """The student: it also trains, checkpoints and hands its weights to the rollout engine."""

    def train_step(self, samples: list[Sample]) -> TrainMetrics:
        """One optimizer step per mini-batch on the scored ``samples`` (balanced over the DP ranks)."""
        self.use_device()
        parts = split_for_data_parallel(samples, self.dp_size)
        return self._on_output_ranks(lambda a, part: a.train_step.remote(part), parts, "train_step")[0]

    def save_checkpoint(self, path: str, iteration: int) -> None:
        self.use_device()
        self._on_every_rank(lambda a: a.save_checkpoint.remote(path, iteration), "save_checkpoint")

    def load_checkpoint(self, path: str) -> None:
        self.use_device()
        self._on_every_rank(lambda a: a.load_checkpoint.remote(path), "load_checkpoint")

    def export_hf_tensors(self) -> list[tuple[str, Tensor]]:
        """The full model in HF naming, gathered to the driver."""
        self.use_device()
        return self._on_every_rank(lambda a: a.export_hf_tensors.remote(), "export_hf_tensors")[0]

    def save_hf_weights(self, out_dir: str, tokenizer_dir: str) -> int:
        """Rank 0 writes the full model as an HF directory on its host; the bytes written."""
        self.use_device()
        return self._on_every_rank(lambda a: a.save_hf_weights.remote(out_dir, tokenizer_dir), "save_hf_weights")[0]

    # SGLang's distributed weight sync (the driver's StudentWeightSender)

    def weight_sync_rendezvous(self, master_address: str | None, master_port: int) -> tuple[str, int]:
        return self._on_every_rank(
            lambda a: a.weight_sync_rendezvous.remote(master_address, master_port), "weight_sync_rendezvous"
        )[0]

    def join_weight_sync(
        self, address: str, port: int, world_size: int, group_name: str, backend: str, timeout_s: float
    ) -> None:
        self._on_every_rank(
            lambda a: a.join_weight_sync.remote(address, port, world_size, group_name, backend, timeout_s),
            "join_weight_sync",
        )

    def weight_specs(self) -> list[Any]:
        return self._on_every_rank(lambda a: a.weight_specs.remote(), "weight_specs")[0]

    def broadcast_weights(self, group_name: str, bucket_bytes: int) -> int:
        self.use_device()
        return self._on_every_rank(lambda a: a.broadcast_weights.remote(group_name, bucket_bytes), "broadcast_weights")[
            0
        ]

    def leave_weight_sync(self, group_name: str) -> None:
        self._on_every_rank(lambda a: a.leave_weight_sync.remote(group_name), "leave_weight_sync")
