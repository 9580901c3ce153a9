"""Hugging Face model directories: config, safetensors tensors one at a time, written in shards.

:class:`HFCheckpointReader` opens ``model.safetensors`` or the shards named by
``model.safetensors.index.json`` lazily and reads single tensors or slices of them (plain file
reads, no memory map), so no caller ever holds more than the tensors it asked for. Missing or truncated shards are reported by name.
:class:`HFShardWriter` writes tensors as they come into ``model-0000i-of-0000n.safetensors`` shards
of bounded size plus the index; :func:`write_hf_metadata` writes ``config.json``,
``generation_config.json`` and copies the tokenizer files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
# Files a tokenizer (and its chat template) may consist of; those present are copied.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A model directory that cannot be read, with what is wrong and what to do."""


def load_hf_config(model_dir: str | Path) -> Any:
    """``transformers.AutoConfig`` of a local HF model directory (never downloads)."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: no config.json; expected a Hugging Face model directory (config.json + *.safetensors)"
        )
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{path}/config.json: not a config transformers can read ({e})") from e


@dataclasses.dataclass(frozen=True)
class _Entry:
    """Where one tensor lies in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def _read_header(path: Path) -> dict[str, _Entry]:
    """The tensors of one safetensors file, checked against the file's size."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file ({why}); the file may be truncated or corrupt")

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than a header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise bad(f"header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise bad(f"header is not JSON: {e}") from e
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise bad(f"{name}: unknown dtype {info.get('dtype')!r}")
        dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = (8 + n + o for o in info["data_offsets"])
        if end > size:
            raise bad(f"{name} ends at byte {end}, the file has {size}")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"{name}: {end - begin} bytes for shape {list(shape)} {info['dtype']}")
        entries[name] = _Entry(path, dtype, shape, begin, end)
    return entries


def _read_into(path: Path, offset: int, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (contiguous, CPU) with the bytes of ``path`` from ``offset``."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    with path.open("rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{path}: ended early while reading; the file may be truncated")
            done += n
    return out


class HFCheckpointReader:
    """Lazy, read-only access to the tensors of an HF safetensors checkpoint.

    Tensors are read with plain file reads into fresh tensors (no memory map), so a process's
    resident memory is what it holds, not the files it has read.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        self._entries: dict[str, dict[str, _Entry]] = {}  # shard -> its tensors
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE_FILE).is_file():
            self.weight_map = dict.fromkeys(self._shard(SINGLE_FILE), SINGLE_FILE)
        else:
            raise CheckpointError(
                f"{self.dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found; only safetensors checkpoints are supported"
            )
        for shard in sorted(set(self.weight_map.values())):
            if not (self.dir / shard).is_file():
                raise CheckpointError(
                    f"{self.dir}: shard {shard} named in {INDEX_FILE} is missing; "
                    "re-download or re-export the checkpoint"
                )

    def _shard(self, shard: str) -> dict[str, _Entry]:
        if shard not in self._entries:
            self._entries[shard] = _read_header(self.dir / shard)
        return self._entries[shard]

    def _entry(self, name: str) -> _Entry:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is not in the checkpoint")
        shard = self.weight_map[name]
        entries = self._shard(shard)
        if name not in entries:
            raise CheckpointError(f"{self.dir / shard}: has no tensor {name!r} although {INDEX_FILE} says so")
        return entries[name]

    def keys(self) -> list[str]:
        return sorted(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        e = self._entry(name)
        return _read_into(e.path, e.begin, torch.empty(e.shape, dtype=e.dtype))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (dim 0) of a tensor, read without loading the rest."""
        e = self._entry(name)
        start, stop, _ = slice(start, stop).indices(e.shape[0])
        row = math.prod(e.shape[1:]) * e.dtype.itemsize
        out = torch.empty((max(stop - start, 0), *e.shape[1:]), dtype=e.dtype)
        return _read_into(e.path, e.begin + start * row, out)

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def validate(self, expected: Iterable[str] | None = None) -> None:
        """Open every shard (a truncated or corrupt one raises here, before any work is done) and,
        given ``expected`` tensor names, check that exactly those are present."""
        for shard in sorted(set(self.weight_map.values())):
            self._shard(shard)
        if expected is not None:
            expected = set(expected)
            missing, extra = sorted(expected - set(self.weight_map)), sorted(set(self.weight_map) - expected)
            if missing or extra:
                raise CheckpointError(
                    f"{self.dir}: the tensors do not match config.json "
                    f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}); "
                    "is this a complete Qwen3 / Qwen3-MoE checkpoint?"
                )

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.keys():
            yield name, self.get(name)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` on CPU, contiguous, in a storage of its own (safetensors refuses shared storage)."""
    t = t.detach().to("cpu").contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


class HFShardWriter:
    """Writes named tensors, as they come, into safetensors shards of at most ``max_shard_bytes``
    (a larger tensor gets a shard of its own) and, on :meth:`close`, the index.

    At most one shard's tensors are held in memory. Shards are named
    ``model-0000i-of-0000n.safetensors`` once their number is known, at :meth:`close`.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # tensor names of each shard written
        self.total_bytes = 0
        self.dtypes: set[torch.dtype] = set()
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise CheckpointError(f"tensor {name!r} was produced twice")
        self._names.add(name)
        tensor = _own_storage(tensor)
        if self._pending and self._pending_bytes + tensor.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += tensor.nbytes
        self.total_bytes += tensor.nbytes
        self.dtypes.add(tensor.dtype)

    def _flush(self) -> None:
        save_file(self._pending, str(self.dir / f".shard-{len(self._shards):05d}.safetensors"), {"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    @property
    def names(self) -> set[str]:
        return set(self._names)

    def close(self) -> None:
        """Write the last shard, give the shards their final names and write the index."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f".shard-{i:05d}.safetensors", self.dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_hf_metadata(
    out_dir: str | Path, hf_config: Any, *, source_dir: str | Path | None = None, dtype: torch.dtype | None = None
) -> None:
    """``config.json`` (with ``dtype`` set when given), ``generation_config.json`` (copied from
    ``source_dir`` or derived from the config) and the tokenizer files found in ``source_dir``."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    config = copy.deepcopy(hf_config)
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(str(out))
    source = Path(source_dir) if source_dir is not None else None
    if source is not None and (source / GENERATION_CONFIG_FILE).is_file():
        shutil.copyfile(source / GENERATION_CONFIG_FILE, out / GENERATION_CONFIG_FILE)
    else:
        GenerationConfig.from_model_config(config).save_pretrained(str(out))
    for name in TOKENIZER_FILES if source is not None else ():
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
