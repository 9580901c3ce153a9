"""The full demo build: the teacher solves the task, the student is weak in the intended way.

Uses the session's build of the default recipe (``tests/conftest.py``: about 1.5 minutes on 2 cores, once,
where ``configs/demo/cpu.yaml`` expects it).
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.demo.build import DemoAssets
from megatron_opd.demo.evaluate import measure_accuracy, read_split
from megatron_opd.demo.sampling import encode_prompts, sample
from megatron_opd.demo.task import carryless_sum

N = 128  # test problems per check: enough to tell 0.95 from 0.3, quick to generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(demo_assets: DemoAssets) -> DemoAssets:
    return demo_assets


def test_teacher_solves_the_test_split(assets: DemoAssets) -> None:
    assert measure_accuracy(assets.teacher, assets.test_file, n=N, temperature=0.0) >= 0.95
    assert measure_accuracy(assets.teacher, assets.test_file, n=N, temperature=1.0) >= 0.9


def test_student_answers_in_format_but_mostly_drops_the_carry(assets: DemoAssets) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert measure_accuracy(assets.student, assets.test_file, n=N, temperature=0.0) <= 0.35
    tok = AutoTokenizer.from_pretrained(str(assets.student))
    model = AutoModelForCausalLM.from_pretrained(str(assets.student)).eval()
    messages, answers = read_split(assets.test_file, N)
    torch.manual_seed(0)
    texts = sample(model, tok, encode_prompts(tok, messages), max_new_tokens=16, temperature=1.0).texts
    given = [t[len("\\boxed{") : -1] if t.startswith("\\boxed{") and t.endswith("}") else None for t in texts]
    assert sum(g is not None for g in given) >= 0.95 * N  # rewards are meaningful: the format is there
    operands = [map(int, m[-1]["content"].rstrip("=").split("+")) for m in messages]
    carryless = [str(carryless_sum(*ab)) for ab in operands]
    right = sum(g == a for g, a in zip(given, answers))
    forgot = sum(g == c for g, c in zip(given, carryless))
    assert 0.1 * N <= right <= 0.5 * N
    assert forgot >= 0.6 * (N - right)  # the typical error is a forgotten carry
