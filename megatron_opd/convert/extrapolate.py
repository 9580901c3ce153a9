"""ExPO, model extrapolation (Zheng et al. 2025; docs/objectives.md §7): from a student and teachers of
the same architecture, ``θ = θ_avg + α (θ_avg − θ_student)`` with ``θ_avg`` the teachers' mean.

HF in, HF out, one tensor name at a time and, within it, blocks of rows: the teachers' rows are read
one after the other and accumulated in float32, and the result is cast back to the student's dtype.
Memory holds one output tensor, one block and the output shard being filled. Config, generation
config and tokenizer are the first teacher's (``θ_avg`` is the point extrapolated from).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from megatron_opd.convert.export import DEFAULT_MAX_SHARD_BYTES, save_hf_checkpoint
from megatron_opd.convert.hf_io import CheckpointError, HFCheckpointReader, load_hf_config
from megatron_opd.convert.mapping import hf_order_key
from megatron_opd.convert.outdir import check_output
from megatron_opd.convert.progress import ConversionReport, peak_rss_bytes

DEFAULT_BLOCK_BYTES = 64 * 2**20


def extrapolate_tensor(student: torch.Tensor, teachers: Iterable[torch.Tensor], alpha: float) -> torch.Tensor:
    """``avg + alpha * (avg - student)`` as ``(1 + alpha) * avg - alpha * student``, ``avg`` the
    teachers' mean, accumulated in float32 one teacher at a time (``teachers`` may be lazy), in
    place; returned in the student's dtype."""
    avg, n = None, 0
    for teacher in teachers:
        avg = teacher.float() if avg is None else avg.add_(teacher)
        n += 1
    if avg is None:
        raise ValueError("ExPO needs at least one teacher")
    return avg.div_(n).mul_(1.0 + alpha).sub_(student, alpha=alpha).to(student.dtype)


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
    student: HFCheckpointReader,
    teachers: Sequence[HFCheckpointReader],
    alpha: float,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The extrapolated tensors, one at a time, in HF order; matrices are computed in blocks of rows
    of at most ``block_bytes`` (in float32), so only the output tensor is ever held whole."""
    for name in _check_compatible(student, teachers):
        shape = student.shape(name)
        if len(shape) < 2:  # norms: small
            yield name, extrapolate_tensor(student.get(name), (t.get(name) for t in teachers), alpha)
            continue
        out = torch.empty(shape, dtype=student.dtype(name))
        step = max(1, block_bytes // (4 * math.prod(shape[1:])))
        for a in range(0, shape[0], step):
            b = min(a + step, shape[0])
            rows = (t.get_rows(name, a, b) for t in teachers)
            out[a:b] = extrapolate_tensor(student.get_rows(name, a, b), rows, alpha)
        yield name, out


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
