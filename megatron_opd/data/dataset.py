"""Prompt datasets in verl's parquet schema.

One row per prompt::

    prompt:        [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]   (data.prompt_key)
    data_source:   str                      which reward / benchmark the row belongs to
    reward_model:  {"ground_truth": ...}    optional; answer for math-verify, tests for code
    extra_info:    {...}                    optional; ``opd_teacher`` routes the row to a named teacher

Files are ``.parquet`` (verl) or ``.jsonl`` (one JSON object per line), concatenated in the given
order. Every row is validated and templated when the dataset is built, before any model is
touched: a bad row is a :class:`DataError` naming the file, the row and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from megatron_opd.data.config import DataConfig
from megatron_opd.data.templates import encode_prompts, render_chat, resolve_chat_template

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad data: which file and row, what is wrong, and the fix."""


@dataclasses.dataclass
class PromptSample:
    """One templated prompt. ``index`` is its position in the dataset (stable across epochs)."""

    index: int
    prompt_ids: list[int]
    data_source: str
    ground_truth: Any  # reward_model.ground_truth (None when the row has none)
    teacher: str | None  # extra_info.opd_teacher, resolved against the configured teachers
    extra_info: dict[str, Any]
    messages: list[dict[str, Any]]
    file: str
    row: int  # row number inside ``file``

    @property
    def origin(self) -> str:
        return f"{self.file} row {self.row}"


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of one ``.parquet`` or ``.jsonl`` file as plain Python dicts."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found. Fix: check data.train_files / data.val_files.")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several error types for unreadable files
            raise DataError(f"{p}: not a readable parquet file ({e}).") from e
    if p.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(p.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p} line {n + 1}: not valid JSON ({e.msg}). Fix: one JSON object per line.") from e
        return rows
    raise DataError(f"{p}: unsupported file type {p.suffix!r}. Fix: use .parquet (verl schema) or .jsonl.")


def _check_messages(value: Any, key: str, where: str) -> list[dict[str, Any]]:
    if value is None:
        raise DataError(f"{where}: missing field {key!r}. Fix: every row needs {key!r} as a list of chat messages.")
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: field {key!r} must be a non-empty list of {{'role', 'content'}} messages, "
            f"got {type(value).__name__} {str(value)[:80]!r}."
        )
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: {key}[{i}] must be a dict with string 'role' and 'content', got {str(m)[:80]!r}."
            )
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role={m['role']!r} is not one of {', '.join(ROLES)}.")
        messages.append({k: v for k, v in m.items() if v is not None})
    return messages


def _resolve_teacher(extra_info: dict[str, Any], teacher_names: list[str] | None, where: str) -> str | None:
    name = extra_info.get("opd_teacher")
    if name is not None and not isinstance(name, str):
        raise DataError(f"{where}: extra_info.opd_teacher must be a string, got {type(name).__name__}.")
    if teacher_names is None:
        return name
    if name is None:
        if len(teacher_names) == 1:
            return teacher_names[0]
        raise DataError(
            f"{where}: no extra_info.opd_teacher, but {len(teacher_names)} teachers are configured "
            f"({', '.join(teacher_names)}). Fix: name the teacher of every row."
        )
    if name not in teacher_names:
        raise DataError(
            f"{where}: extra_info.opd_teacher={name!r} is not a configured teacher. "
            f"Fix: use one of {', '.join(teacher_names)} or add a teacher with that name."
        )
    return name


class PromptDataset:
    """All rows of ``files``, validated and templated with the student's ``tokenizer``.

    ``teacher_names``: the configured teachers; each row's ``extra_info.opd_teacher`` must name one
    (a single teacher is the default for rows that name none). ``None`` skips routing checks
    (evaluation datasets).
    """

    def __init__(
        self,
        files: list[str] | str,
        tokenizer: Any,
        cfg: DataConfig,
        teacher_names: list[str] | None = None,
    ) -> None:
        files = [files] if isinstance(files, str) else list(files)
        if not files:
            raise DataError("no data files given. Fix: set data.train_files (or data.val_files).")
        template = resolve_chat_template(tokenizer, cfg.chat_template)
        pending: list[tuple[dict[str, Any], str]] = []  # (fields, text), in file order
        for file in files:
            rows = read_rows(file)
            if not rows:
                raise DataError(f"{file}: the file has no rows. Fix: remove it from the data files.")
            for r, row in enumerate(rows):
                fields = self._check_row(row, cfg.prompt_key, teacher_names, f"{file} row {r}")
                fields.update(file=str(file), row=r)
                pending.append((fields, render_chat(tokenizer, fields["messages"], template, cfg.enable_thinking)))
        all_ids = encode_prompts(tokenizer, [text for _, text in pending])
        self.samples: list[PromptSample] = []
        self.num_filtered = 0
        for (fields, _), ids in zip(pending, all_ids):
            if len(ids) > cfg.max_prompt_length:
                where = f"{fields['file']} row {fields['row']}"
                if cfg.filter_overlong_prompts:
                    self.num_filtered += 1
                    continue
                if cfg.truncation == "error":
                    raise DataError(
                        f"{where}: the templated prompt has {len(ids)} tokens > data.max_prompt_length="
                        f"{cfg.max_prompt_length}. Fix: raise data.max_prompt_length, set "
                        "data.filter_overlong_prompts=true, or data.truncation=left|right."
                    )
                ids = ids[-cfg.max_prompt_length :] if cfg.truncation == "left" else ids[: cfg.max_prompt_length]
            self.samples.append(PromptSample(index=len(self.samples), prompt_ids=ids, **fields))
        if self.num_filtered:
            logger.info(
                "filtered %d of %d prompts longer than %d tokens",
                self.num_filtered,
                len(pending),
                cfg.max_prompt_length,
            )
        if not self.samples:
            raise DataError(
                f"no prompts left in {files}: all {len(pending)} rows are longer than data.max_prompt_length="
                f"{cfg.max_prompt_length}. Fix: raise data.max_prompt_length or use truncation instead of filtering."
            )

    @staticmethod
    def _check_row(row: Any, prompt_key: str, teacher_names: list[str] | None, where: str) -> dict[str, Any]:
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be a mapping of fields, got {type(row).__name__}.")
        messages = _check_messages(row.get(prompt_key), prompt_key, where)
        data_source = row.get("data_source")
        if not isinstance(data_source, str) or not data_source:
            raise DataError(
                f"{where}: field 'data_source' must be a non-empty string (e.g. 'math' or 'aime24'), "
                f"got {data_source!r}. Fix: name the reward/benchmark family of every row."
            )
        reward_model = row.get("reward_model") or {}
        if not isinstance(reward_model, dict):
            raise DataError(
                f"{where}: field 'reward_model' must be a mapping like {{'ground_truth': ...}}, "
                f"got {type(reward_model).__name__}."
            )
        extra_info = row.get("extra_info") or {}
        if not isinstance(extra_info, dict):
            raise DataError(f"{where}: field 'extra_info' must be a mapping, got {type(extra_info).__name__}.")
        extra_info = {k: v for k, v in extra_info.items() if v is not None}  # parquet fills absent struct keys
        return dict(
            messages=messages,
            data_source=data_source,
            ground_truth=reward_model.get("ground_truth"),
            teacher=_resolve_teacher(extra_info, teacher_names, where),
            extra_info=extra_info,
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> PromptSample:
        return self.samples[i]
