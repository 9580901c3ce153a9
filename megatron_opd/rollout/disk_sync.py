"""Weight updates through an HF safetensors directory on disk (SGLang's ``/update_weights_from_disk``,
vLLM's ``reload_weights``): a fresh directory per update, written from (HF name, tensor) pairs."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch


def new_weights_dir(root: str | None, prefix: str) -> str:
    """A fresh directory under ``root`` (the system's temporary directory when ``None``)."""
    base = Path(root) if root else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def write_hf_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], out: str, model_dir: str) -> None:
    """``named_tensors`` as an HF checkpoint in ``out`` (shards, index, ``model_dir``'s config and
    tokenizer files); ``out`` is removed when writing fails."""
    from megatron_opd.convert.export import save_hf_checkpoint
    from megatron_opd.convert.hf_io import load_hf_config

    try:
        save_hf_checkpoint(named_tensors, out, load_hf_config(model_dir), tokenizer_dir=model_dir, overwrite=True)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
