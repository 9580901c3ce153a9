"""Bad input is refused with an error that names the key, file or row and the fix, before any
worker, process group or GPU is touched: every case runs ``run_training`` with ``ensure_ray``
replaced by a tripwire, and the CLI turns these errors into one line and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opd.config.errors import ConfigError
from megatron_opd.data import DataError, TokenizerError
from tests.reliability.conftest import tripwire

USER = [{"role": "user", "content": "1+1=?"}]
GOOD_ROW = {"prompt": USER, "data_source": "math", "reward_model": {"ground_truth": "2"}}


def write_rows(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# name -> (how to break the run: YAML text appended, overrides, data rows or None), error type, message parts
CASES: dict[str, tuple[str, list[str], list[object] | None, type[Exception], tuple[str, ...]]] = {
    "malformed YAML": ("  bad: [unclosed\n", [], None, ConfigError, ("malformed YAML at line", "Fix:")),
    "unknown key in the file": ("  progres_bar: true\n", [], None, ConfigError, ("logging.progres_bar", "unknown key")),
    "mistyped override": ("", ["trainer.stpes=3"], None, ConfigError, ("Did you mean 'steps'?",)),
    "wrong type": ("", ["trainer.steps=three"], None, ConfigError, ("trainer.steps",)),
    "TP that does not divide the heads": (
        "",
        ["student.parallel.tensor_model_parallel_size=3"],
        None,
        ConfigError,
        ("student.parallel.tensor_model_parallel_size=3", "num_query_groups=2"),
    ),
    "EP on a dense teacher": (
        "",
        ["teachers.0.parallel.expert_model_parallel_size=2", "teachers.0.parallel.data_parallel_size=2"],
        None,
        ConfigError,
        ("teachers.0.parallel.expert_model_parallel_size=2", "dense"),
    ),
    "teacher with another vocabulary": (
        "",
        ["teachers.0.path={root}/teacher_vocab"],
        None,
        ConfigError,
        ("teachers.0.path", "vocab_size 64 differs from the student's 56"),
    ),
    "teacher with another tokenizer": (
        "",
        ["teachers.0.path={root}/teacher_tokens"],
        None,
        TokenizerError,
        ("['default'] do not match", "2 shared tokens with different ids", "Fix:"),
    ),
    "row missing a field": ("", [], [GOOD_ROW, {"data_source": "math"}], DataError, ("row 1: missing field 'prompt'",)),
    "row with a wrong type": (
        "",
        [],
        [GOOD_ROW, GOOD_ROW, {**GOOD_ROW, "data_source": 7}],
        DataError,
        ("row 2: field 'data_source' must be a non-empty string",),
    ),
    "empty dataset": ("", [], [], DataError, ("the file has no rows",)),
    "prompt longer than allowed": (
        "",
        ["data.max_prompt_length=8"],
        None,
        DataError,
        ("row 0: the templated prompt has", "> data.max_prompt_length=8", "Fix:"),
    ),
}


@pytest.mark.fault("bad input (config, layout, models, tokenizers, data)", "clear error before any worker starts")
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_heavy_work(
    case: str, assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megatron_opd.config.loader import load_config
    from megatron_opd.trainer import driver

    yaml_tail, overrides, rows, error, parts = CASES[case]
    monkeypatch.setattr(driver, "ensure_ray", tripwire)
    config = tmp_path / "config.yaml"
    config.write_text((assets / "config.yaml").read_text() + yaml_tail)
    overrides = [o.format(root=assets) for o in overrides] + [f"run_dir={tmp_path / 'run'}"]
    if rows is not None:
        overrides.append(f"data.train_files=[{write_rows(tmp_path / 'train.jsonl', rows)}]")
    with pytest.raises(error) as info:
        driver.run_training(load_config(config, overrides))
    for part in parts:
        assert part in str(info.value), str(info.value)


@pytest.mark.fault("bad input at the command line", "one line naming the problem, exit status 2")
@pytest.mark.parametrize("case", ["malformed YAML", "row missing a field"])
def test_cli_reports_bad_input_in_one_line(case: str, assets: Path, tmp_path: Path) -> None:
    yaml_tail, _, rows, _, parts = CASES[case]
    config = tmp_path / "config.yaml"
    config.write_text((assets / "config.yaml").read_text() + yaml_tail)
    args = [f"run_dir={tmp_path / 'run'}"]
    if rows is not None:
        args.append(f"data.train_files=[{write_rows(tmp_path / 'train.jsonl', rows)}]")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_opd", "train", str(config), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(("config error: ", "input error: ")) and all(p in error for p in parts), proc.stderr
