"""Reading Hugging Face model directories: config, and safetensors tensors one at a time.

:class:`HFCheckpointReader` opens ``model.safetensors`` or the shards named by
``model.safetensors.index.json`` lazily and reads single tensors or slices of them, so no caller
ever holds more than the tensors it asked for. Missing or truncated shards are reported by name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


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
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


class HFCheckpointReader:
    """Lazy, read-only access to the tensors of an HF safetensors checkpoint."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE_FILE).is_file():
            self.weight_map = {}
            with self._open_file(SINGLE_FILE) as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
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
        self._handles: dict[str, Any] = {}

    def _open_file(self, shard: str) -> Any:
        try:
            return safe_open(str(self.dir / shard), framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(
                f"{self.dir / shard}: not a readable safetensors file ({e}); the file may be truncated or corrupt"
            ) from e

    def _handle(self, name: str) -> Any:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is not in the checkpoint")
        shard = self.weight_map[name]
        if shard not in self._handles:
            self._handles[shard] = self._open_file(shard)
        return self._handles[shard]

    def keys(self) -> list[str]:
        return sorted(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"{self.dir / self.weight_map[name]}: reading {name!r} failed ({e}); the file may be truncated"
            ) from e

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (dim 0) of a tensor, read without loading the rest."""
        return self._handle(name).get_slice(name)[start:stop]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.keys():
            yield name, self.get(name)
