"""The driver asks each sample's own teacher (``extra_info.opd_teacher``) and reference, and only
for what the objective needs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from megatron_opd.objectives.inputs import Requirements
from megatron_opd.scoring.contract import ScoreRequest, TokenScores
from megatron_opd.trainer import driver
from megatron_opd.trainer.worker_group import ScoringGroup
from tests.trainer.conftest import make_samples


class FakeGroup:
    """Scores every token of a sample with a constant that names the group; records calls."""

    def __init__(self, name: str, value: float) -> None:
        self.name, self.value = name, value
        self.calls: list[dict[str, Any]] = []

    def score(self, samples: list[Any], request: ScoreRequest, ids: dict[int, Any] | None = None) -> dict:
        self.calls.append({"uids": sorted(s.uid for s in samples), "top_k": request.top_k, "ids": ids})
        scores = {}
        for s in samples:
            r, k = s.response_len, request.top_k
            got = TokenScores(torch.full((r,), self.value))
            if k:
                got.topk_ids, got.topk_logp = torch.zeros(r, k, dtype=torch.long), torch.full((r, k), self.value)
            if ids is not None:
                got.ids_logp = torch.full(ids[s.uid].shape, self.value)
            scores[s.uid] = got
        return scores


def test_each_sample_scored_by_its_teacher_and_reference() -> None:
    samples = make_samples(9, seed=0, teachers=("math", "code", "math"))
    groups = driver.Groups(
        student=FakeGroup("student", -9.0),
        teachers={"math": FakeGroup("math", -1.0), "code": FakeGroup("code", -2.0)},
        references={"math": FakeGroup("ref-math", -3.0), "code": FakeGroup("ref-code", -4.0)},
    )
    needs = Requirements(teacher_logp=True, reference="teacher_base", old_logp=True, support="teacher_topk", top_k=4)
    driver.score(samples, groups, needs.scoring_plan(metrics_top_k=5))
    expected = {"math": (-1.0, -3.0), "code": (-2.0, -4.0)}
    for s in samples:
        t, r = expected[s.teacher]
        assert torch.all(s.scores.teacher.logp == t) and torch.all(s.scores.reference.logp == r)
        assert torch.all(s.scores.teacher.topk_logp == t) and s.scores.teacher.topk_ids.shape == (s.response_len, 4)
        assert torch.all(s.scores.student.logp == -9.0)
    math_uids = sorted(s.uid for s in samples if s.teacher == "math")
    assert [c["uids"] for c in groups.teachers["math"].calls] == [math_uids]
    assert groups.teachers["code"].calls[0]["top_k"] == 4
    assert groups.student.calls[0]["top_k"] == 0  # ℓ_old only; no student top-K without student_topk support


def test_nothing_extra_is_computed() -> None:
    samples = make_samples(4, seed=1)
    student, teacher = FakeGroup("student", -9.0), FakeGroup("default", -1.0)
    groups = driver.Groups(student=student, teachers={"default": teacher}, references={})
    driver.score(samples, groups, Requirements(teacher_logp=True).scoring_plan())
    assert student.calls == [] and teacher.calls[0]["top_k"] == 0 and teacher.calls[0]["ids"] is None
    driver.score(samples, groups, Requirements(teacher_logp=True).scoring_plan(metrics_top_k=3))  # overlap metric
    assert teacher.calls[1]["top_k"] == 3 and student.calls == []
    assert all(s.scores.reference is None and s.scores.student is None for s in samples)


def test_student_topk_support_round_trip() -> None:
    samples = make_samples(4, seed=2)
    student, teacher = FakeGroup("student", -9.0), FakeGroup("default", -1.0)
    groups = driver.Groups(student=student, teachers={"default": teacher}, references={})
    needs = Requirements(teacher_logp=True, support="student_topk", top_k=3)
    driver.score(samples, groups, needs.scoring_plan(metrics_top_k=5))
    assert student.calls[0]["top_k"] == 3  # the student's top-K first ...
    at = teacher.calls[0]["ids"]  # ... then the teacher scores at those ids
    assert sorted(at) == [s.uid for s in samples] and all(at[s.uid] is s.scores.student.topk_ids for s in samples)
    assert teacher.calls[0]["top_k"] == 3  # and gives its own top-K, for the overlap metric
    assert all(s.scores.teacher.ids_logp is not None and s.scores.student.topk_ids is not None for s in samples)
    assert all(s.scores.teacher.topk_ids.shape == (s.response_len, 3) for s in samples)


class FakeActor:
    """A rank's actor whose ``score.remote`` answers at once: constant scores of the samples it was given."""

    def __init__(self, dp_rank: int, seen: list) -> None:
        self.dp_rank, self.seen = dp_rank, seen
        self.score = self

    def remote(self, part: list[Any], request: ScoreRequest, ids: dict | None) -> dict:
        self.seen.append((self.dp_rank, [s.uid for s in part], None if ids is None else sorted(ids)))
        return {s.uid: TokenScores(torch.full((s.response_len,), float(self.dp_rank))) for s in part}


def test_scoring_group_balances_over_dp_ranks_and_merges() -> None:
    """``ScoringGroup.score`` gives each DP rank its share (with the ids of its own samples only) and merges the
    output ranks' results by uid."""
    from megatron_opd.trainer.batch import split_for_data_parallel

    seen: list = []
    group = ScoringGroup.__new__(ScoringGroup)
    group.name, group.residency, group.dp_size = "teacher/code", None, 3
    group.actors = [FakeActor(d, seen) for d in range(3)]
    group.ranks = [SimpleNamespace(dp_rank=d) for d in range(3)]
    group.output_rank = {d: d for d in range(3)}
    group._get = lambda refs, method: refs
    samples = make_samples(8, seed=4)
    ids = {s.uid: torch.zeros(s.response_len, 2, dtype=torch.long) for s in samples}
    got = group.score(samples, ScoreRequest(at_ids=True), ids)
    parts = split_for_data_parallel(samples, 3)
    assert seen == [(d, [s.uid for s in parts[d]], sorted(s.uid for s in parts[d])) for d in range(3)]
    assert sorted(got) == [s.uid for s in samples]
    assert all(torch.all(got[s.uid].logp == d) for d in range(3) for s in parts[d])
    assert group.score([], ScoreRequest()) == {} and len(seen) == 3  # nothing to score: no call


class RecordingGroup:
    """Stands in for a WorkerGroup in the residency bookkeeping: records what it was told to do."""

    def __init__(self, name: str, offload_when_idle: bool, log: list[str]) -> None:
        self.name, self.offload_when_idle, self.log = name, offload_when_idle, log

    def offload(self) -> None:
        self.log.append(f"{self.name}.offload")

    def onload(self) -> None:
        self.log.append(f"{self.name}.onload")


def test_colocated_groups_take_turns_on_the_gpus() -> None:
    from megatron_opd.trainer.worker_group import Residency

    log: list[str] = []
    residency = Residency()
    student, teacher, ref = (
        RecordingGroup(n, o, log) for n, o in (("student", True), ("teacher", True), ("ref", False))
    )
    for g in (student, teacher, ref):
        residency.register(g)  # type: ignore[arg-type]
    assert log == ["student.offload", "teacher.offload"]  # offloadable groups leave the GPU after setup
    log.clear()
    residency.use(teacher)  # type: ignore[arg-type]
    residency.use(teacher)  # type: ignore[arg-type]  # already resident: nothing moves
    residency.use(ref)  # type: ignore[arg-type]  # the reference is never offloaded, the teacher leaves
    residency.use(student)  # type: ignore[arg-type]
    assert log == ["teacher.onload", "teacher.offload", "student.onload"]
    assert residency.resident == {"student", "ref"}


class FakeEngine:
    """A rollout engine whose responses name it: every token id is ``token``; records the prompts it got."""

    def __init__(self, token: int) -> None:
        self.token, self.prompts = token, []

    def generate(self, prompts: list[list[int]], sampling: Any) -> list[Any]:
        from megatron_opd.rollout.base import Completion

        self.prompts.extend(prompts)
        return [Completion(list(p), [self.token] * 3, [-0.5] * 3, "stop") for p in prompts]


def test_seqkd_responses_come_from_each_prompts_teacher() -> None:
    """SFT (docs/objectives.md §7) trains on teacher-written responses: with ``writers`` each prompt's own teacher
    generates, the student's engine does not."""
    from megatron_opd.config.schema import OPDConfig, TeacherConfig
    from megatron_opd.data.dataset import PromptSample
    from megatron_opd.demo.tokenizer import build_tokenizer

    cfg = OPDConfig(teachers=[TeacherConfig(name="math"), TeacherConfig(name="code")])
    cfg.rollout.n = 2
    prompts = [
        PromptSample(i, [5, 6, 7 + i], "demo_arith", "1", name, {}, [], "f", i)
        for i, name in enumerate(["math", "code", "math"])
    ]
    student, math_t, code_t = FakeEngine(10), FakeEngine(11), FakeEngine(12)
    tok = build_tokenizer()
    samples = driver.rollout(cfg, 1, prompts, student, tok, {"math": math_t, "code": code_t})
    assert student.prompts == []
    assert [s.teacher for s in samples] == ["math", "math", "code", "code", "math", "math"]
    assert all(s.response_ids == [11 if s.teacher == "math" else 12] * 3 for s in samples)
    assert math_t.prompts == [[5, 6, 7]] * 2 + [[5, 6, 9]] * 2 and code_t.prompts == [[5, 6, 8]] * 2
    on_policy = driver.rollout(cfg, 1, prompts, student, tok)  # without writers: the student's own samples
    assert all(s.response_ids == [10] * 3 for s in on_policy) and len(student.prompts) == 6
