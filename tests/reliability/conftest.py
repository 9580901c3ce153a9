"""Shared pieces of the reliability suite (docs/reliability.md).

- ``assets``: tiny models (student, teacher, and broken variants), the demo tokenizer and task data.
- ``ray_address``: a Ray cluster hosted by this process; in-process runs use it and subprocess
  drivers join it (``RAY_ADDRESS``), so only the first killed driver pays for starting Ray.
- ``opd_subprocess`` / ``opd_in_process``: one ``opd train``, as a process that may be SIGKILLed, or
  as ``run_training`` here (its exception and log records kept).
- Leftover-process checks: processes tagged with a run's ``OPD_TEST_RUN`` environment variable (a
  driver's own Ray cluster inherits it), and ``ModelWorker`` actors of the hosted cluster.
- The fault table: every test marked ``@pytest.mark.fault(FAULT, PROMISE)`` is a row, printed with
  its outcome and a summary line at the end of the session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.tiny_runs import save_model, tokenizer_config, write_task_data

TAG_ENV = "OPD_TEST_RUN"
FAULTS: list[tuple[str, str, str]] = []  # (fault, promise, outcome) in test order

CONFIG = """
student:
  path: {root}/student
  parallel: {{tensor_model_parallel_size: 2}}
teachers:
  - name: default
    path: {root}/teacher
objective:
  name: opd
data:
  train_files: [{root}/data/train.parquet]
  train_batch_size: 4
  max_prompt_length: 32
rollout:
  max_new_tokens: 6
  batch_size: 4
optim:
  lr: 1.0e-3
trainer:
  steps: 3
  save_every: 1
  keep_last: 5
  max_tokens_per_microbatch: 64
  eval_before: false
  group_timeout_s: 120
logging:
  progress_bar: false
  tensorboard: false
"""


# ---------------------------------------------------------------- the fault table


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault(fault, promise): the fault a reliability test injects and the promise")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("fault")
    if marker is None or not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    result = "skipped" if report.skipped else "held" if report.passed else "FAILED"
    FAULTS.append((marker.args[0], marker.args[1], result))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FAULTS:
        return
    tr = terminalreporter
    tr.section("reliability: faults tried")
    rows: dict[tuple[str, str], list[str]] = {}
    for fault, promise, result in FAULTS:
        rows.setdefault((fault, promise), []).append(result)
    width = max(len(f) for f, _ in rows)
    for (fault, promise), results in rows.items():
        status = "FAILED" if "FAILED" in results else "skipped" if "held" not in results else "held"
        tr.write_line(f"{status:<7} {f'{results.count(status)}/{len(results)}':>5}  {fault:<{width}}  -> {promise}")
    counts = {r: sum(1 for *_, x in FAULTS if x == r) for r in ("held", "FAILED", "skipped")}
    tr.write_line(
        f"reliability: {len(rows)} faults, {len(FAULTS)} tests: {counts['held']} held, {counts['FAILED']} failed, "
        f"{counts['skipped']} skipped"
    )


# ---------------------------------------------------------------- assets


def swap_tokens(tokenizer_dir: Path, a: str, b: str) -> None:
    """Give tokens ``a`` and ``b`` each other's ids (same vocabulary size, different tokenizer)."""
    path = tokenizer_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``student``, ``teacher`` and the broken variants ``teacher_nan`` (NaN LM head),
    ``teacher_vocab`` (8 more tokens), ``teacher_tokens`` (two token ids swapped), ``student_other``
    (another architecture); ``data/{train,val,test}.parquet``; ``config.yaml`` (``CONFIG``)."""
    import torch

    root = tmp_path_factory.mktemp("reliability")
    models = {
        "student": (tokenizer_config(), 1),
        "teacher": (tokenizer_config(), 2),
        "teacher_nan": (tokenizer_config(), 2),
        "teacher_vocab": (tokenizer_config(vocab_size=tokenizer_config().vocab_size + 8), 2),
        "teacher_tokens": (tokenizer_config(), 2),
        "student_other": (tokenizer_config(hidden_size=32), 1),
    }
    for name, (config, seed) in models.items():
        model = save_model(root / name, config, seed)
        if name == "teacher_nan":
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))
            model.save_pretrained(str(root / name))
    swap_tokens(root / "teacher_tokens", "a", "b")
    write_task_data(root)
    (root / "config.yaml").write_text(CONFIG.format(root=root))
    return root


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A Ray cluster owned by this process (stopped at the end of the session)."""
    import ray

    from megatron_opd.trainer.worker_group import ensure_ray

    ensure_ray()
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def model_workers() -> list[psutil.Process]:
    """The ``ModelWorker`` actor processes of the Ray cluster this process hosts."""
    out = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "ModelWorker" in " ".join(p.cmdline()):
                out.append(p)
    return out


def tagged(tag: str, command: str = "") -> list[psutil.Process]:
    """Live processes whose environment carries ``OPD_TEST_RUN=tag`` (a driver and all it started),
    optionally only those whose command line contains ``command``."""
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.status() == psutil.STATUS_ZOMBIE or p.environ().get(TAG_ENV) != tag:
                continue
            if command in " ".join(p.cmdline()):
                out.append(p)
    return out


def still_alive(procs: list[psutil.Process], timeout_s: float) -> list[str]:
    """Wait up to ``timeout_s`` for ``procs`` to exit; describe those still running."""
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    names = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
    return names


# ---------------------------------------------------------------- running opd train


def tripwire(*args: object, **kwargs: object) -> None:
    """Stands in for ``driver.ensure_ray`` where a run must fail before it starts any worker."""
    raise AssertionError("bad input got past validation to the worker groups")


@dataclasses.dataclass
class RunResult:
    rc: int | None  # subprocess exit status (-9: SIGKILL); None in-process
    output: str  # stdout+stderr, or the log records of an in-process run
    seconds: float
    metrics: dict[int, dict[str, Any]]  # the records this run appended to metrics.jsonl, by step
    error: BaseException | None = None  # in-process: what run_training raised
    error_time: float | None = None  # time.time() when it raised
    summary: dict[str, Any] | None = None

    def record_time(self, text: str) -> float:
        """In-process: ``created`` of the first log record containing ``text``."""
        for line in self.output.splitlines():
            stamp, _, message = line.partition(" ")
            if text in message:
                return float(stamp)
        raise AssertionError(f"no log record with {text!r}:\n{self.output[-3000:]}")


def _metrics_since(run_dir: Path, since: float) -> dict[int, dict[str, Any]]:
    """The records of ``metrics.jsonl`` logged at or after ``since`` (a resumed run may truncate the file)."""
    path = run_dir / "metrics.jsonl"
    records = map(json.loads, path.read_text().splitlines()) if path.is_file() else []
    return {r["step"]: r for r in records if r["time"] >= since}


def opd_subprocess(
    config: Path, run_dir: Path, *overrides: str, env: dict[str, str], tag: str, timeout_s: float = 400
) -> RunResult:
    """``opd train`` as a subprocess (output to ``run_dir/../<tag>.log``: a killed driver's Ray
    processes may hold pipes open, a file they cannot block)."""
    since = time.time()
    log_path = run_dir.parent / f"{tag}.log"
    full_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OPD_FAULT")}
    full_env.update(env, **{TAG_ENV: tag})
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_opd", "train", str(config), f"run_dir={run_dir}", *overrides],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            proc.wait()
            raise AssertionError(f"opd train ({tag}) still running after {timeout_s} s") from e
    return RunResult(rc, log_path.read_text(), time.monotonic() - t0, _metrics_since(run_dir, since))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.created} {record.levelname} {record.name}: {record.getMessage()}")


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def opd_in_process(config: Path, run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> RunResult:
    """``run_training`` in this process (on the hosted Ray cluster); an exception is returned, not raised."""
    from megatron_opd.config.loader import load_config
    from megatron_opd.trainer.driver import run_training

    since = time.time()
    handler = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    result = RunResult(None, "", 0.0, {})
    t0 = time.monotonic()
    try:
        with environment(**(env or {})):
            result.summary = run_training(load_config(config, [f"run_dir={run_dir}", *overrides]))
    except Exception as e:
        result.error, result.error_time = e, time.time()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for s, h in handlers.items():
            signal.signal(s, h)
    result.seconds = time.monotonic() - t0
    result.output = "\n".join(handler.lines)
    result.metrics = _metrics_since(run_dir, since)
    return result
