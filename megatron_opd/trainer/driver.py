"""The OPD driver: one controller that runs the whole loop, readable top to bottom.

    prompts -> rollouts (engine; it then frees its GPU memory when rollout.offload_when_idle) ->
    scores (student ℓ_old, teachers, references) -> objective + optimizer step (student group) ->
    weight sync (engine) -> metrics, checkpoint, eval

Everything heavy runs in worker groups (Ray actors, one torch.distributed world per model); the
driver holds the data loader, the rollout engine client, the objective (built once: it says what
scoring computes, its ``ScoringPlan``, and travels to the student's ranks) and the bookkeeping.
``run_training`` is the whole job; each phase is one function below it.

With ``trainer.max_staleness = k >= 1`` the rollouts come from a :class:`~megatron_opd.trainer.pipeline.RolloutPipeline`
that generates the next steps' batches while the student trains (weights at most ``k`` versions old), and scores
them with the teachers ahead when those have their own GPUs; the learner recomputes the student's log-probs and
the token-level rollout correction covers the staleness (docs/async.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import signal
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_opd.config.loader import to_yaml
from megatron_opd.config.schema import OPDConfig, model_hf_dir
from megatron_opd.objectives.base import Objective
from megatron_opd.rollout.base import RolloutEngine, SamplingParams
from megatron_opd.rollout.offload import OffloadedEngine
from megatron_opd.rollout.versioned import EngineStats, VersionedEngine
from megatron_opd.scoring.contract import ScoringPlan
from megatron_opd.trainer.batch import Sample
from megatron_opd.trainer.checkpoint import CheckpointManager, resolve_resume
from megatron_opd.trainer.faults import fault_point
from megatron_opd.trainer.metrics import MetricsLogger, summary_line
from megatron_opd.trainer.pipeline import RolloutBatch, RolloutPipeline
from megatron_opd.trainer.worker import WorkerSpec, resolve_dtype
from megatron_opd.trainer.worker_group import (
    Placement,
    Residency,
    ScoringGroup,
    StudentGroup,
    WorkerGroup,
    WorkerGroupError,
    ensure_ray,
    make_placement_group,
)

log = logging.getLogger("megatron_opd.train")


class NonFiniteScores(RuntimeError):
    pass


@dataclasses.dataclass
class Groups:
    student: StudentGroup
    teachers: dict[str, ScoringGroup]
    references: dict[str, ScoringGroup]  # by teacher name, or "student_base" shared by all

    def all(self) -> list[WorkerGroup]:
        return [self.student, *self.teachers.values(), *self.references.values()]

    def reference_for(self, teacher: str) -> ScoringGroup:
        return self.references.get(teacher) or self.references["student_base"]


class StopRequested:
    """SIGTERM/SIGINT (e.g. ``scancel``) asks the loop to checkpoint and stop after this step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d: finishing this step, saving a checkpoint, then stopping", signum)

    def __bool__(self) -> bool:
        return self.signum is not None


# ---------------------------------------------------------------- the job


def run_training(cfg: OPDConfig) -> dict[str, Any]:
    """``opd train``: validate, build everything, loop, summarize. Returns the summary dict."""
    t_start = time.time()
    stop = StopRequested()  # before the (slow) start-up: a signal during it still ends the run cleanly
    if cfg.demo_assets:
        from megatron_opd.demo.build import build_demo_assets

        build_demo_assets(cfg.demo_assets)
    cfg.validate()  # every config error before any process group or GPU is touched
    from megatron_opd.data import PromptDataset, PromptLoader, check_tokenizers, load_tokenizer
    from megatron_opd.objectives.registry import build_objective
    from megatron_opd.rollout import build_engine

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    tokenizer = load_tokenizer(model_hf_dir(cfg.student.path))
    teacher_names = [t.name for t in cfg.teachers]
    check_tokenizers(
        tokenizer,
        {t.name: load_tokenizer(model_hf_dir(t.path)) for t in cfg.teachers},
        allow_mismatch=cfg.data.allow_tokenizer_mismatch,
    )
    dataset = PromptDataset(cfg.data.train_files, tokenizer, cfg.data, teacher_names or None)
    loader = PromptLoader(dataset, cfg.data.train_batch_size, cfg.data.seed, cfg.data.shuffle)
    objective = build_objective(
        cfg.objective,
        mini_batches_per_step=cfg.trainer.mini_batches_per_step,
        temperature=cfg.rollout.temperature,
        teacher_names=teacher_names,
        tokenizer=tokenizer,
    )
    plan = objective.requirements.scoring_plan(cfg.trainer.metrics_top_k)
    ckpts = CheckpointManager(
        run_dir / "checkpoints",
        cfg.trainer.keep_last,
        hf_source=model_hf_dir(cfg.student.path),
        dtype=resolve_dtype(cfg.student.dtype),
    )
    resume_from = resolve_resume(cfg.resume, ckpts)

    ensure_ray()
    groups = build_groups(cfg, tokenizer, objective)
    engine = build_engine(cfg.rollout, model_hf_dir(cfg.student.path), tokenizer=tokenizer)
    # SFT / SeqKD (docs/objectives.md §7) learns from the teachers' responses: they write them, the student's engine
    # only evaluates.
    writers = None
    if not objective.on_policy:
        writers = {t.name: build_engine(cfg.rollout, model_hf_dir(t.path), tokenizer=tokenizer) for t in cfg.teachers}
    if cfg.rollout.offload_when_idle:  # the engine frees its GPU memory after each rollout
        engine = OffloadedEngine(engine, lambda e: sync_weights(cfg, groups.student, e))
    k = cfg.trainer.max_staleness
    # synchronous: one request per batch, as the engine batches it; asynchronous: a weight update waits for (or,
    # rollout.partial, aborts) at most one request of rollout.batch_size rows
    engine = VersionedEngine(engine, request_rows=cfg.rollout.batch_size if k else None, partial=cfg.rollout.partial)
    pipeline: RolloutPipeline | None = None
    metrics_log = MetricsLogger(run_dir, cfg.logging, json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    state: dict[str, Any] = {"step": 0, "eval_before": None, "bad_steps": 0}
    try:
        if resume_from is not None:
            log.info("resuming from %s", resume_from)
            groups.student.load_checkpoint(str(resume_from))
            state = CheckpointManager.read_state(resume_from)
            loader.load_state_dict(state["data"])
            metrics_log.truncate_after(state["step"])  # steps logged after that checkpoint are redone
            engine.update(lambda e: sync_weights(cfg, groups.student, e), version=state["step"])
        evaluator = Evaluator(cfg, tokenizer)
        if state["eval_before"] is None and cfg.trainer.eval_before and evaluator.enabled:
            state["eval_before"] = evaluator.run(engine, run_dir / "eval" / "step_0")["accuracy"]
            log.info("eval before training: %s", state["eval_before"])
        total = cfg.trainer.steps
        progress = Progress(cfg.logging.progress_bar, state["step"], total)
        if k:
            score_ahead = not cfg.trainer.colocate and not plan.teacher.at_ids

            def produce(step: int, prompts: list[Any]) -> list[Sample]:
                samples = rollout(cfg, step, prompts, engine, tokenizer, writers)
                if score_ahead:  # the teachers have their own GPUs and need nothing of the student
                    score_teachers(samples, groups, plan)
                return samples

            pipeline = RolloutPipeline(engine, loader, produce, k, state["step"] + 1, total)
        for step in range(state["step"] + 1, total + 1):
            if stop:  # signalled during start-up or while saving: nothing of this step ran yet
                break
            if pipeline is None:
                metrics = train_one_step(cfg, step, loader, engine, groups, plan, tokenizer, writers)
                data_state = loader.state_dict()
            else:
                metrics, data_state = train_async_step(cfg, step, pipeline, engine, groups, plan)
            if metrics.pop("skipped_nonfinite", False):
                state["bad_steps"] += 1
                if state["bad_steps"] > cfg.trainer.max_bad_steps:
                    raise NonFiniteScores(
                        f"{state['bad_steps']} steps had non-finite scores or losses, or no unmasked response "
                        f"token (trainer.max_bad_steps={cfg.trainer.max_bad_steps}); stopping"
                    )
            metrics["train/bad_steps"] = state["bad_steps"]
            state["step"] = step
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < total and evaluator.enabled:
                metrics.update(
                    {f"eval/{k}": v for k, v in evaluator.run(engine, run_dir / "eval" / f"step_{step}").items()}
                )
            metrics_log.log(step, metrics)
            progress.update(step, summary_line(step, total, metrics))
            if (cfg.trainer.save_every and step % cfg.trainer.save_every == 0) or step == total or stop:
                save_checkpoint(ckpts, groups.student, step, data_state, state)
            if stop:
                break
        progress.close()
        finished = state["step"] == total and not stop  # a signalled run exits promptly, without final evals
        summary = {
            "steps": state["step"],
            "eval_before": state["eval_before"],
            "eval_after": evaluator.run(engine, run_dir / "eval" / "final")["accuracy"]
            if evaluator.enabled and finished
            else None,
            "teacher_eval": evaluator.run_teachers(cfg)
            if evaluator.enabled and cfg.eval.teacher and finished
            else None,
            "wall_s": round(time.time() - t_start, 1),
            "interrupted_by_signal": stop.signum,
            "checkpoint": str(ckpts.latest()) if ckpts.latest() else None,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    finally:
        if pipeline is not None:
            pipeline.close(cfg.rollout.request_timeout_s)
        metrics_log.close()
        engine.shutdown()
        for writer in (writers or {}).values():
            writer.shutdown()
        for g in groups.all():
            g.shutdown()


# ---------------------------------------------------------------- setup


def build_groups(cfg: OPDConfig, tokenizer: Any, objective: Objective) -> Groups:
    """Student (training ``objective``), teachers and the references the objective needs, each its own
    worker group."""
    common = dict(
        seed=cfg.seed,
        timeout_s=cfg.trainer.group_timeout_s,
        max_tokens_per_microbatch=cfg.trainer.max_tokens_per_microbatch,
        sequence_packing=cfg.trainer.sequence_packing,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        temperature=cfg.rollout.temperature,
        fused_lm_head=cfg.trainer.fused_lm_head,
    )
    specs: list[WorkerSpec] = [
        WorkerSpec(
            group="student",
            model=cfg.student,
            load_from=cfg.student.path,
            trainable=True,
            optim=cfg.optim,
            objective=objective,
            total_steps=cfg.trainer.steps,
            mini_batches_per_step=cfg.trainer.mini_batches_per_step,
            **common,
        )
    ]
    for t in cfg.teachers:
        specs.append(WorkerSpec(group=f"teacher/{t.name}", model=t, load_from=t.path, **common))
    reference = objective.requirements.reference
    if reference == "student_base":
        ref = dataclasses.replace(cfg.student, parallel=dataclasses.replace(cfg.student.parallel))
        specs.append(WorkerSpec(group="reference/student_base", model=ref, load_from=cfg.student.path, **common))
    elif reference == "teacher_base":
        for t in cfg.teachers:
            base = t.base_model
            specs.append(WorkerSpec(group=f"reference/{t.name}", model=base, load_from=base.path, **common))
    placements = place(cfg, specs)
    residency = Residency() if cfg.trainer.colocate else None
    timeout = cfg.trainer.group_timeout_s
    student = StudentGroup(specs[0], placements[0], timeout, residency)
    by_name = {s.group: ScoringGroup(s, p, timeout, residency) for s, p in zip(specs[1:], placements[1:])}
    return Groups(
        student=student,
        teachers={t.name: by_name[f"teacher/{t.name}"] for t in cfg.teachers},
        references={name.split("/", 1)[1]: g for name, g in by_name.items() if name.startswith("reference/")},
    )


def place(cfg: OPDConfig, specs: list[WorkerSpec]) -> list[Placement]:
    """Colocated: every group starts at GPU 0 and shares GPUs; separate: consecutive GPU ranges."""
    sizes = [s.model.parallel.world_size for s in specs]
    total = max(sizes) if cfg.trainer.colocate else sum(sizes)
    pg = make_placement_group(total if torch.cuda.is_available() or _cluster_has_gpus() else 0)
    if cfg.trainer.colocate:
        return [Placement(pg, 0, len(specs)) for _ in specs]
    offsets = [sum(sizes[:i]) for i in range(len(specs))]
    return [Placement(pg, o, 1) for o in offsets]


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


# ---------------------------------------------------------------- one step


def train_one_step(
    cfg: OPDConfig,
    step: int,
    loader: Any,
    engine: VersionedEngine,
    groups: Groups,
    plan: ScoringPlan,
    tokenizer: Any,
    writers: dict[str, RolloutEngine] | None = None,
) -> dict[str, Any]:
    """The synchronous step: rollout, scoring, update, weight sync."""
    timer = PhaseTimer()
    before = dataclasses.replace(engine.stats)
    with timer("rollout"):
        prompts = loader.next_batch()
        samples = rollout(cfg, step, prompts, engine, tokenizer, writers)
        if cfg.rollout.offload_when_idle:
            engine.release_memory()  # until the weight sync (weights) and the next rollout (KV cache)
    fault_point("rollout", step, groups.all())
    return learn(cfg, step, samples, engine, groups, plan, timer, before)


def train_async_step(
    cfg: OPDConfig, step: int, pipeline: RolloutPipeline, engine: VersionedEngine, groups: Groups, plan: ScoringPlan
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The asynchronous step: this step's batch from the pipeline (generated while earlier steps trained), then
    scoring, update and weight sync as in :func:`train_one_step`. Also returns the loader state to checkpoint."""
    timer = PhaseTimer()
    before = dataclasses.replace(engine.stats)
    with timer("wait_rollout"):
        batch: RolloutBatch = pipeline.take(step)
    fault_point("rollout", step, groups.all())
    metrics = learn(cfg, step, batch.samples, engine, groups, plan, timer, before)
    metrics["time/rollout_s"] = batch.produce_s  # overlapped with earlier steps; not part of time/step_s
    metrics["time/rollout_bound_wait_s"] = batch.bound_wait_s
    return metrics, batch.data_state


def learn(
    cfg: OPDConfig,
    step: int,
    samples: list[Sample],
    engine: VersionedEngine,
    groups: Groups,
    plan: ScoringPlan,
    timer: PhaseTimer,
    before: EngineStats,
) -> dict[str, Any]:
    """Score ``samples`` (the teachers' scores already there when the pipeline scored ahead), update the student
    (version ``step - 1`` before, ``step`` after) and send it to the engine."""
    with timer("score"):
        if any(s.scores.teacher is None for s in samples):
            score(samples, groups, plan)
        elif plan.student is not None:  # the teachers scored ahead
            score_student(samples, groups, plan)
    fault_point("score", step, groups.all())
    metrics = {**rollout_metrics(samples), **staleness_metrics(samples, step - 1), **engine.server_stats()}
    if not scores_finite(samples):
        log.warning("step %d: non-finite teacher/reference scores; skipping the update", step)
        metrics.update(timer.metrics(), skipped_nonfinite=True)
        return metrics
    with timer("train"):
        train = groups.student.train_step(samples)
    fault_point("train", step, groups.all())
    with timer("sync"):
        engine.update(lambda e: sync_weights(cfg, groups.student, e), version=step)
    metrics.update(train.as_dict())
    metrics.update(timer.metrics())
    waits = engine.stats.minus(before)
    metrics["time/sync_wait_s"] = waits["update_wait_s"]  # the update waited for requests in flight
    if cfg.trainer.max_staleness:
        metrics["rollout/resumed_rows"] = waits["resumed_rows"]
    tokens = sum(s.num_tokens for s in samples)
    metrics["perf/tokens_per_s"] = tokens / max(timer.total, 1e-9)
    metrics["perf/tokens"] = float(tokens)
    if not math.isfinite(train.loss) or train.skipped_updates:
        log.warning(
            "step %d: update skipped (a non-finite loss or gradient norm, or every response token masked)", step
        )
        metrics["skipped_nonfinite"] = True
    return metrics


def rollout(
    cfg: OPDConfig,
    step: int,
    prompts: list[Any],
    engine: RolloutEngine,
    tokenizer: Any,
    writers: dict[str, RolloutEngine] | None = None,
) -> list[Sample]:
    """``rollout.n`` samples per prompt from the engine, or with ``writers`` (SeqKD) from each prompt's own
    teacher's engine; outcome rewards for metrics (and AOPD's accuracy filter)."""
    from megatron_opd.rewards import compute_score

    r = cfg.rollout
    stop_ids = tuple(dict.fromkeys([*r.stop_token_ids, tokenizer.eos_token_id]))
    sampling = SamplingParams(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop_token_ids=stop_ids,
        seed=cfg.seed * 1_000_003 + step,
    )
    expanded = [p for p in prompts for _ in range(r.n)]
    default_teacher = cfg.teachers[0].name if len(cfg.teachers) == 1 else None
    routed = [p.teacher or default_teacher or "" for p in expanded]
    if writers is None:
        completions = engine.generate([p.prompt_ids for p in expanded], sampling)
    else:
        completions = [None] * len(expanded)
        for name in dict.fromkeys(routed):
            if name not in writers:
                raise KeyError(f"sample routed to unknown teacher {name!r}; configured: {sorted(writers)}")
            rows = [i for i, t in enumerate(routed) if t == name]
            for i, c in zip(rows, writers[name].generate([expanded[i].prompt_ids for i in rows], sampling)):
                completions[i] = c
    samples = []
    for uid, (p, c, teacher) in enumerate(zip(expanded, completions, routed)):
        text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        samples.append(
            Sample(
                uid=uid,
                prompt_ids=list(p.prompt_ids),
                response_ids=list(c.token_ids),
                rollout_logp=list(c.logprobs),
                weight_versions=c.weight_versions,
                finish_reason=c.finish_reason,
                teacher=teacher,
                data_source=p.data_source,
                ground_truth=p.ground_truth,
                outcome_reward=float(compute_score(p.data_source, text, p.ground_truth, p.extra_info)),
            )
        )
    return samples


def score(samples: list[Sample], groups: Groups, plan: ScoringPlan) -> None:
    """Run the scoring ``plan`` (what the objective needs, nothing more): the student under the rollout weights
    (ℓ_old, its top-K), each sample's own teacher (ℓ_T, its top-K, its log-probs at the student's top-K), each
    sample's reference (ℓ_R). Every sample keeps what each source returned in ``sample.scores``."""
    if plan.student is not None:
        score_student(samples, groups, plan)
    score_teachers(samples, groups, plan)


def score_student(samples: list[Sample], groups: Groups, plan: ScoringPlan) -> None:
    """The student's part of ``plan``, under its current weights (in an asynchronous run: recomputed at learner
    time, not those that sampled the rollout)."""
    got = groups.student.score(samples, plan.student)
    for s in samples:
        s.scores.student = got[s.uid]


def score_teachers(samples: list[Sample], groups: Groups, plan: ScoringPlan) -> None:
    """The teachers' and references' part of ``plan``; after :func:`score_student` when the teachers score at the
    student's top-K ids."""
    by_teacher: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_teacher[s.teacher].append(s)
    for name, subset in by_teacher.items():
        if name not in groups.teachers:
            raise KeyError(f"sample routed to unknown teacher {name!r}; configured: {sorted(groups.teachers)}")
        ids = {s.uid: s.scores.student.topk_ids for s in subset} if plan.teacher.at_ids else None
        got = groups.teachers[name].score(subset, plan.teacher, ids)
        for s in subset:
            s.scores.teacher = got[s.uid]
        if plan.reference is not None:
            got = groups.reference_for(name).score(subset, plan.reference)
            for s in subset:
                s.scores.reference = got[s.uid]


def scores_finite(samples: list[Sample]) -> bool:
    """No score is NaN or +inf, and no teacher gives a sampled token probability 0 (``-inf`` is a legitimate
    entry of a top-K list)."""
    for s in samples:
        sources = (s.scores.teacher, s.scores.reference, s.scores.student)
        for t in (t for src in sources if src is not None for t in src.tensors()):
            if t.numel() and not torch.isfinite(t[~torch.isneginf(t)]).all():  # NaN too
                return False
        if s.scores.teacher is not None and torch.isneginf(s.scores.teacher.logp).any():
            return False
    return True


def rollout_metrics(samples: list[Sample]) -> dict[str, float]:
    """Response length, truncation, outcome reward and sample count; with several teachers also the
    samples routed to each (``rollout/num_samples/<teacher>``)."""
    n = max(len(samples), 1)
    metrics = {
        "rollout/response_len": sum(s.response_len for s in samples) / n,
        "rollout/truncated_frac": sum(s.finish_reason == "length" for s in samples) / n,
        "rollout/reward": sum(s.outcome_reward for s in samples) / n,
        "rollout/num_samples": float(len(samples)),
    }
    routed = Counter(s.teacher for s in samples)
    if len(routed) > 1:
        metrics.update({f"rollout/num_samples/{name}": float(count) for name, count in sorted(routed.items())})
    return metrics


def staleness_metrics(samples: list[Sample], learner_version: int) -> dict[str, float]:
    """How many versions older than the learning student (``learner_version``) the sampled tokens' weights are:
    ``async/staleness_mean`` / ``_max`` over response tokens, and ``async/mixed_version_frac``, the share of
    samples whose tokens span several versions (``rollout.partial``)."""
    lags = [learner_version - v for s in samples for v in (s.weight_versions or [])]
    mixed = sum(len(set(s.weight_versions or [])) > 1 for s in samples)
    return {
        "async/staleness_mean": sum(lags) / max(len(lags), 1),
        "async/staleness_max": float(max(lags, default=0)),
        "async/mixed_version_frac": mixed / max(len(samples), 1),
    }


@dataclasses.dataclass(frozen=True)
class StudentWeightSender:
    """The student group as the sender of SGLang's distributed weight sync
    (:class:`~megatron_opd.rollout.sglang.weight_sync.WeightSender`): its rank 0 hosts the
    weight-update group's TCP store on its node and broadcasts; every rank takes part in gathering
    the tensors. Equal for the same group (the engine keeps the weight-update group across syncs)."""

    student: StudentGroup

    def rendezvous(self, master_address: str | None, master_port: int) -> tuple[str, int]:
        return self.student.weight_sync_rendezvous(master_address, master_port)

    def join(self, address: str, port: int, world_size: int, group_name: str, backend: str, timeout_s: float) -> None:
        self.student.join_weight_sync(address, port, world_size, group_name, backend, timeout_s)

    def tensor_specs(self) -> list[Any]:
        return self.student.weight_specs()

    def send(self, group_name: str, bucket_bytes: int) -> int:
        return self.student.broadcast_weights(group_name, bucket_bytes)

    def leave(self, group_name: str) -> None:
        self.student.leave_weight_sync(group_name)


def sync_weights(cfg: OPDConfig, student: StudentGroup, engine: RolloutEngine) -> None:
    """Student weights (HF naming, gathered from all TP/PP/EP shards) into the rollout engine.

    SGLang's distributed sync: student rank 0 broadcasts them to the servers over a process group it
    hosts on its node (:class:`StudentWeightSender`); the driver only announces them over HTTP.
    When the engine takes a directory (SGLang's disk sync), rank 0 of the student writes the HF
    safetensors there itself, streaming; that needs the directory on its host: the driver's, or a
    shared ``rollout.sglang.weight_sync_dir``. Otherwise the whole model comes to the driver."""
    if cfg.rollout.engine == "sglang" and cfg.rollout.sglang.weight_sync == "distributed":
        engine.update_weights_from_sender(StudentWeightSender(student))  # type: ignore[attr-defined]
        return
    shared = cfg.rollout.sglang.weight_sync_dir is not None or student.ranks[0].hostname == socket.gethostname()
    out = engine.weights_dir() if shared else None
    if out is None:
        engine.update_weights(student.export_hf_tensors())
        return
    try:
        student.save_hf_weights(out, model_hf_dir(cfg.student.path))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    log.debug("student rank 0 wrote the weights to %s", out)
    engine.update_weights_from_dir(out)


def save_checkpoint(
    ckpts: CheckpointManager, student: StudentGroup, step: int, data_state: dict[str, Any], state: dict
) -> None:
    """The student after ``step`` and ``data_state``, the prompt loader's state once the prompts of ``step`` were
    drawn (an asynchronous run's loader has drawn further; those batches are generated again on resume)."""
    tmp = None
    try:
        tmp = ckpts.begin(step)
        student.save_checkpoint(str(tmp), step)
        fault_point("checkpoint", step, [student])
        final = ckpts.commit(tmp, step, {**state, "step": step, "data": data_state})
    except (OSError, WorkerGroupError) as e:  # e.g. disk full
        raise ckpts.failed(tmp, step, e) from e
    log.info("saved checkpoint %s", final)


# ---------------------------------------------------------------- evaluation


class Evaluator:
    """Held-out evaluation through the rollout engine (``megatron_opd.eval.evaluate``)."""

    def __init__(self, cfg: OPDConfig, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.enabled = bool(cfg.eval.files)

    def run(self, engine: RolloutEngine, out_dir: Path) -> dict[str, float]:
        """All metrics of ``evaluate``; ``accuracy`` is the mean avg@n over benchmarks."""
        from megatron_opd.eval import evaluate

        return evaluate(
            engine, self.tokenizer, self.cfg.eval.files, self.cfg.eval, out_dir=out_dir, data_cfg=self.cfg.data
        )

    def run_teachers(self, cfg: OPDConfig) -> dict[str, float] | float:
        from megatron_opd.rollout import build_engine

        scores = {}
        for t in cfg.teachers:
            engine = build_engine(cfg.rollout, model_hf_dir(t.path), tokenizer=self.tokenizer)
            try:
                scores[t.name] = self.run(engine, Path(cfg.run_dir) / "eval" / f"teacher_{t.name}")["accuracy"]
            finally:
                engine.shutdown()
        return next(iter(scores.values())) if len(scores) == 1 else scores


# ---------------------------------------------------------------- small helpers


class PhaseTimer:
    """Wall time of each phase of a step (``with timer("rollout"): ...``)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    @property
    def total(self) -> float:
        return sum(self.times.values())

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}_s": v for k, v in self.times.items()} | {"time/step_s": self.total}


class Progress:
    """A tqdm bar with one summary line per step (plain lines without the bar)."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="opd train", unit="step", dynamic_ncols=True)

    def update(self, step: int, line: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
