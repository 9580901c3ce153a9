"""Training checkpoints, the driver's side: atomic, resumable, Megatron-LM layout.

``RUN_DIR/checkpoints/`` holds ``iter_0000010/`` directories, ``latest_checkpointed_iteration.txt``
and ``hf/`` (the student's config and tokenizer), like a checkpoint of ``opd convert hf-to-mcore``. A
checkpoint is written into ``iter_0000010.tmp-<pid>/`` (model + optimizer as a ``torch_dist`` checkpoint,
per-rank RNG states and the LR schedule from every student rank: ``trainer.student_checkpoint``; then
``trainer_state.json`` — step, data position — from the driver), marked complete (``COMPLETE``), and only
then renamed into place and named in the tracker file. A directory without the marker (a run killed
mid-save) is ignored with a warning and removed at the next save; the last ``keep_last`` complete
checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from megatron_opd.config.errors import ConfigError
from megatron_opd.convert.mcore_io import HF_SUBDIR, TRACKER_FILE, iter_dir_name

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
