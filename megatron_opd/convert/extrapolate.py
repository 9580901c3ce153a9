"""ExPO, model extrapolation (Zheng et al. 2025; OBJECTIVES.md §7): from a student and teachers of
the same architecture, ``θ = θ_avg + α (θ_avg − θ_student)`` with ``θ_avg`` the teachers' mean.

HF in, HF out, one tensor at a time: each output tensor is computed in float32 from the student's
and every teacher's tensor of that name and cast back to the student's dtype. Config, generation
config and tokenizer are the first teacher's (``θ_avg`` is the point extrapolated from).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from megatron_opd.convert.export import DEFAULT_MAX_SHARD_BYTES, save_hf_checkpoint
from megatron_opd.convert.hf_io import CheckpointError, HFCheckpointReader, load_hf_config
from megatron_opd.convert.mapping import hf_order_key
from megatron_opd.convert.outdir import check_output
from megatron_opd.convert.progress import ConversionReport, peak_rss_bytes


def extrapolate_tensor(student: torch.Tensor, teachers: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """``avg + alpha * (avg - student)``, ``avg`` the teachers' mean, computed in float32 and
    returned in the student's dtype."""
    avg = torch.stack([t.float() for t in teachers]).mean(dim=0)
    return (avg + alpha * (avg - student.float())).to(student.dtype)


def _check_compatible(student: HFCheckpointReader, teachers: Sequence[HFCheckpointReader]) -> list[str]:
    """The common tensor names (HF order); raises unless every teacher has the student's names and shapes."""
    names = sorted(student.keys(), key=hf_order_key)
    for teacher in teachers:
        if set(teacher.keys()) != set(names):
            diff = sorted(set(teacher.keys()) ^ set(names))
            raise CheckpointError(
                f"{teacher.dir} and {student.dir} hold different tensors (e.g. {diff[:3]}); "
                "ExPO needs models of one architecture"
            )
        for name in names:
            if teacher.shape(name) != student.shape(name):
                raise CheckpointError(
                    f"{name}: {teacher.dir} has shape {teacher.shape(name)}, {student.dir} {student.shape(name)}; "
                    "ExPO needs models of one architecture"
                )
    return names


def iter_extrapolated(
    student: HFCheckpointReader, teachers: Sequence[HFCheckpointReader], alpha: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """The extrapolated tensors, one at a time, in HF order."""
    for name in _check_compatible(student, teachers):
        yield name, extrapolate_tensor(student.get(name), [t.get(name) for t in teachers], alpha)


def extrapolate(
    student_dir: str | Path,
    teacher_dirs: Sequence[str | Path],
    alpha: float,
    out: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Write the ExPO model of ``student_dir`` and ``teacher_dirs`` with ``alpha`` to ``out``
    (atomically; an existing ``out`` only with ``overwrite``)."""
    start = time.monotonic()
    if not teacher_dirs:
        raise CheckpointError("ExPO needs at least one teacher (--teachers DIR [DIR ...])")
    check_output(out, overwrite=overwrite, inputs=(student_dir, *teacher_dirs))
    student = HFCheckpointReader(student_dir)
    teachers = [HFCheckpointReader(d) for d in teacher_dirs]
    for reader in (student, *teachers):
        reader.validate()
    names = _check_compatible(student, teachers)
    written = save_hf_checkpoint(
        iter_extrapolated(student, teachers, alpha),
        out,
        load_hf_config(teacher_dirs[0]),
        tokenizer_dir=teacher_dirs[0],
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        expected=names,
        total=len(names),
        progress=progress,
    )
    return ConversionReport(
        tensors=len(names), bytes=written, seconds=time.monotonic() - start, peak_rss={"main": peak_rss_bytes()}
    )
