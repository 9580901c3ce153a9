"""YAML files + ``key=value`` overrides -> a typed :class:`OPDConfig`.

- A YAML file may name others to start from: ``base: [../presets/qwen3_1p7b.yaml]`` (paths
  relative to the file, merged in order, then the file itself).
- Overrides are verl/Hydra dotlists: ``objective.lambda=1.25 teachers.0.path=/ckpt/t``; values
  are parsed as YAML (``[a,b]``, ``null``, numbers).
- Unknown keys, wrong types and malformed YAML are :class:`ConfigError`s naming the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_opd.config.errors import ConfigError
from megatron_opd.config.schema import OPDConfig

T = TypeVar("T")

# YAML spellings of fields whose natural name is a Python keyword.
KEY_ALIASES = {"lambda": "lambda_"}


def _alias(node: Any) -> Any:
    if isinstance(node, dict):
        return {KEY_ALIASES.get(k, k): _alias(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_alias(v) for v in node]
    return node


def _alias_key(dotted: str) -> str:
    return ".".join(KEY_ALIASES.get(p, p) for p in dotted.split("."))


def _unalias_key(dotted: str) -> str:
    back = {v: k for k, v in KEY_ALIASES.items()}
    return ".".join(back.get(p, p) for p in dotted.split("."))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """One YAML file with its ``base:`` chain resolved (plain dict)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            "", path, f"config file {path} not found.", "pass the path of a YAML file, e.g. configs/demo/cpu.yaml."
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(
            "", str(path), f"malformed YAML{where}: {getattr(e, 'problem', e)}.", "fix the YAML syntax."
        ) from e
    if not isinstance(data, dict):
        raise ConfigError("", str(path), "the top level of a config must be a mapping.", "write key: value pairs.")
    bases = data.pop("base", []) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _deep_merge(merged, read_yaml(path.parent / base))
    return _deep_merge(merged, data)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _error_from_omegaconf(e: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = _unalias_key(prefix + (getattr(e, "full_key", "") or ""))
    msg = (getattr(e, "msg", None) or str(e)).split("\n")[0]
    if "not in" in msg:
        return ConfigError(
            key, None, f"unknown key. {msg}", "remove it or correct its spelling (see configs/ for examples)."
        )
    return ConfigError(key, None, msg, "give a value of the type the schema declares.")


def build(schema: type[T], data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Merge ``data`` and ``overrides`` onto the dataclass ``schema``'s defaults."""
    cfg = OmegaConf.structured(schema)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(_alias(data)))
    except OmegaConfBaseException as e:
        raise _error_from_omegaconf(e) from e
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, None, "an override must look like key=value.", "e.g. trainer.steps=10.")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("+")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(key, raw, f"value is not valid YAML ({e}).", "quote it.") from e
        try:
            _check_key_exists(cfg, _alias_key(key))
            OmegaConf.update(cfg, _alias_key(key), _alias(value), merge=True)
        except OmegaConfBaseException as e:
            raise _error_from_omegaconf(e, "") from e
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _error_from_omegaconf(e) from e
    assert dataclasses.is_dataclass(obj)
    return obj  # type: ignore[return-value]


def _check_key_exists(cfg: DictConfig, dotted: str) -> None:
    node: Any = cfg
    walked: list[str] = []
    for part in dotted.split("."):
        walked.append(part)
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    _unalias_key(".".join(walked)),
                    None,
                    f"list index out of range (the list has {len(node)} entries).",
                    "define the entry in the YAML file first.",
                )
            node = node[int(part)]
        elif isinstance(node, DictConfig):
            if part not in node:
                import difflib

                close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1)
                hint = f" Did you mean {_unalias_key(close[0])!r}?" if close else ""
                raise ConfigError(
                    _unalias_key(".".join(walked)), None, f"unknown key.{hint}", "remove it or correct its spelling."
                )
            node = node[part]
        else:
            return


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> OPDConfig:
    """The run config from a YAML file (or none: defaults) and overrides, not yet validated."""
    data = read_yaml(path) if path is not None else {}
    return build(OPDConfig, data, overrides)


def to_yaml(cfg: Any) -> str:
    """The config as YAML with the user-facing key spellings (written to RUN_DIR/config.yaml)."""
    plain = OmegaConf.to_container(OmegaConf.structured(cfg))
    back = {v: k for k, v in KEY_ALIASES.items()}

    def unalias(node: Any) -> Any:
        if isinstance(node, dict):
            return {back.get(k, k): unalias(v) for k, v in node.items()}
        if isinstance(node, list):
            return [unalias(v) for v in node]
        return node

    return yaml.safe_dump(unalias(plain), sort_keys=False)
