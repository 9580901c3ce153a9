"""Training checkpoints: atomic, resumable, Megatron-LM layout.

``RUN_DIR/checkpoints/`` holds ``iter_0000010/`` directories, ``latest_checkpointed_iteration.txt``
and ``hf/`` (the student's config and tokenizer), like a checkpoint of ``opd convert hf-to-mcore``. A checkpoint is written into ``iter_0000010.tmp-<pid>/``
(model + optimizer as a ``torch_dist`` checkpoint via ``megatron.core.dist_checkpointing`` from
every student rank, per-rank RNG states, then ``trainer_state.json`` — step, LR schedule, data
position — from the driver), marked complete (``COMPLETE``), and only then renamed into place and
named in the tracker file. A directory without the marker (a run killed mid-save) is ignored with
a warning and removed at the next save; the last ``keep_last`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_opd.convert.mcore_io import CHECKPOINT_VERSION, HF_SUBDIR, TRACKER_FILE, iter_dir_name

if TYPE_CHECKING:
    from megatron_opd.trainer.worker import ModelWorker

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE = "trainer_state.json"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, a rank died); the complete ones are intact."""


class CheckpointManager:
    """Directory bookkeeping for one run's checkpoints (driver side). ``hf_source``: the student's
    HF directory, whose config and tokenizer are copied to ``hf/`` so the checkpoints are
    self-describing (``opd convert mcore-to-hf --mcore-dir RUN_DIR/checkpoints``)."""

    def __init__(self, root: str | Path, keep_last: int, hf_source: str | None = None, dtype: Any = None) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.hf_source, self.dtype = hf_source, dtype

    def complete_steps(self) -> list[int]:
        steps = []
        if not self.root.is_dir():
            return steps
        for d in self.root.iterdir():
            m = _ITER_RE.match(d.name)
            if not m:
                continue
            if (d / MARKER).is_file():
                steps.append(int(m.group(1)))
            else:
                log.warning("ignoring incomplete checkpoint %s (no %s marker)", d, MARKER)
        return sorted(steps)

    def latest(self) -> Path | None:
        steps = self.complete_steps()
        return self.root / iter_dir_name(steps[-1]) if steps else None

    def begin(self, step: int) -> Path:
        """A fresh temporary directory for the checkpoint of ``step`` (stale temporaries removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for d in self.root.glob("iter_*.tmp-*"):
            shutil.rmtree(d, ignore_errors=True)
        tmp = self.root / f"{iter_dir_name(step)}.tmp-{os.getpid()}"
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, step: int, state: dict[str, Any]) -> Path:
        """Write the driver state and the marker, rename into place, update the tracker, prune."""
        _write_atomic(tmp / STATE, json.dumps(state, indent=1, sort_keys=True))
        _write_atomic(tmp / MARKER, "")
        _fsync_dir(tmp)
        final = self.root / iter_dir_name(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if self.hf_source is not None and not (self.root / HF_SUBDIR / "config.json").is_file():
            from megatron_opd.convert.hf_io import load_hf_config, write_hf_metadata

            write_hf_metadata(
                self.root / HF_SUBDIR, load_hf_config(self.hf_source), source_dir=self.hf_source, dtype=self.dtype
            )
        _write_atomic(self.root / TRACKER_FILE, str(step))
        _fsync_dir(self.root)
        self.prune()
        return final

    def failed(self, tmp: Path | None, step: int, error: BaseException) -> CheckpointSaveError:
        """Remove the partial checkpoint ``tmp``; the error to raise, naming the cause and what survives.
        A full disk is named as such (writers may report it as a short write, not ENOSPC)."""
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = lines[-1] if lines else type(error).__name__
        latest = self.latest()
        if latest is not None and self.root.is_dir():
            need = sum(f.stat().st_size for f in latest.rglob("*") if f.is_file())
            free = shutil.disk_usage(self.root).free
            if free < need:
                cause += f"; the disk is full: {free >> 10} KiB free, a checkpoint takes {need >> 10} KiB"
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the last complete checkpoint, {latest}, is intact" if latest else "no checkpoint is complete yet"
        return CheckpointSaveError(
            f"step {step}: the checkpoint could not be written into {self.root} ({cause}); the partial "
            f"checkpoint was removed and {kept}. Fix the cause (a full disk: free space or lower "
            "trainer.keep_last), then run again with resume: auto."
        )

    def prune(self) -> None:
        steps = self.complete_steps()
        for step in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(self.root / iter_dir_name(step), ignore_errors=True)

    @staticmethod
    def read_state(ckpt: Path) -> dict[str, Any]:
        return json.loads((ckpt / STATE).read_text())


def resolve_resume(resume: str, manager: CheckpointManager) -> Path | None:
    """``auto``: the latest complete checkpoint of this run (None for a fresh run); ``never``: None;
    a path: that checkpoint (an ``iter_*`` directory or a checkpoints root)."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = manager.latest()
    elif (Path(resume) / MARKER).is_file():
        latest = Path(resume)
    else:
        latest = CheckpointManager(resume, keep_last=1 << 30).latest()
        if latest is None:
            raise FileNotFoundError(f"resume={resume!r}: no complete checkpoint there (missing {MARKER} marker)")
    if latest is not None and manager.hf_source is not None:
        check_same_model(latest, manager.hf_source, resume)
    return latest


# Fields of an HF config that fix the shapes of the weights.
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "moe_intermediate_size",
    "tie_word_embeddings",
)


def check_same_model(ckpt: Path, hf_dir: str, resume: str) -> None:
    """Refuse, before any worker starts, a checkpoint whose ``hf/config.json`` (written beside every
    training checkpoint) describes another architecture than the student's."""
    from megatron_opd.config.errors import ConfigError

    saved = ckpt.parent / HF_SUBDIR / "config.json"
    if not saved.is_file():
        return
    theirs, ours = json.loads(saved.read_text()), json.loads((Path(hf_dir) / "config.json").read_text())
    diff = [f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in ARCHITECTURE_KEYS if theirs.get(k) != ours.get(k)]
    if diff:
        raise ConfigError(
            "resume",
            resume,
            f"{ckpt} is a checkpoint of another model than student.path ({', '.join(diff)}).",
            "resume from a checkpoint of this student, or start afresh (resume=never or a new run_dir).",
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- worker side: model + optimizer through dist_checkpointing ----


# Optimizer state in model space (one tensor per parameter): loadable at any TP/PP/EP/DP layout.
# Memory-efficient: only DP rank 0 of each model-parallel group gathers (over Gloo, in host memory) the
# fp32 parameters and Adam moments of its part of the model; without it every DP rank would allocate
# them, 12 bytes per parameter of its TP/PP/EP part (about 48 GB for an 8B model at TP=2), at every save.
OPTIMIZER_SHARDING = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


def _sharded_state(worker: ModelWorker, is_loading: bool) -> dict[str, Any]:
    from megatron_opd.convert.mcore_io import model_sharded_state_dict

    model_sd = model_sharded_state_dict(worker._unwrapped())
    optimizer_sd = worker.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_SHARDING)
    return {"model": model_sd, "optimizer": optimizer_sd}


def _common_state(worker: ModelWorker, iteration: int) -> dict[str, Any]:
    """What Megatron-LM's loader reads besides the model (its checkpoint version, iteration, args)."""
    from megatron_opd.convert.mcore_io import megatron_args

    return {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "args": megatron_args(worker._unwrapped(), worker.hf_config),
    }


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def save_training_state(worker: ModelWorker, path: str, iteration: int) -> None:
    """Every student rank: its shards of model + optimizer, its RNG, and (rank 0) the LR schedule."""
    from megatron.core import dist_checkpointing

    _fill_empty_adam_state(worker.optimizer)  # no update yet (every step so far skipped): a fresh Adam's state
    dist_checkpointing.save({**_sharded_state(worker, is_loading=False), **_common_state(worker, iteration)}, path)
    rng_dir = Path(path) / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save(_rng_state(), rng_dir / f"rank_{worker.rank:05d}.pt")
    if worker.rank == 0:
        torch.save({"scheduler": worker.scheduler.state_dict()}, Path(path) / "scheduler.pt")
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


def load_training_state(worker: ModelWorker, path: str) -> None:
    """Restore what :func:`save_training_state` wrote; the checkpoint may have been written at
    another TP/PP/EP layout (dist_checkpointing reshards) and with the other spec (local or TE)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_opd.convert.mcore_io import load_sharded, load_state_into

    _prepare_optimizer_for_load(worker.optimizer)
    # A checkpoint of the other spec: Transformer Engine's `_extra_state` (of the norms) may be absent
    state = load_sharded(_sharded_state(worker, is_loading=True), path)
    load_state_into(worker._unwrapped(), state["model"], path)
    worker.optimizer.load_state_dict(state["optimizer"])
    worker.scheduler.load_state_dict(torch.load(Path(path) / "scheduler.pt", weights_only=False)["scheduler"])
    rng_file = Path(path) / "rng" / f"rank_{worker.rank:05d}.pt"
    if rng_file.is_file():  # same world size: restore this rank's generators exactly
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
