"""All-or-nothing output directories: a conversion writes into a temporary sibling of its output
and renames it into place only when everything is written, so a failure leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from megatron_opd.convert.hf_io import CheckpointError


class OutputExistsError(CheckpointError):
    """The output directory exists and replacing it was not asked for."""


def check_output(out: str | Path, *, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """``out`` as a Path; raises if it exists without ``overwrite`` or if it is one of ``inputs``."""
    out = Path(out)
    for src in inputs:
        if out.resolve() == Path(src).resolve():
            raise CheckpointError(f"--out {out} is also an input; write to another directory")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``out``; on success it becomes ``out`` (an old
    ``out`` is removed only after the new one is in place), on any error it is deleted."""
    out = check_output(out, overwrite=overwrite, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output gets the usual mode
    try:
        yield tmp
        check_output(out, overwrite=overwrite)  # nobody created it meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
