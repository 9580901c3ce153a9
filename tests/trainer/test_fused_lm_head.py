"""The student's step on the fused LM head (``trainer.fused_lm_head``: the loss from the output layer's input and
weight, no logits tensor) equals the step through megatron's logits: at TP = 1 and TP = 2 with sequence parallelism
(untied and tied embeddings each) and PP = 2 with tied embeddings, the loss, the gradient of every parameter (the LM
head / tied embedding included) after megatron's schedule, and a whole train step's metrics; and the student's
scores (its log-probs, top-K and log-probs at given ids) agree."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_opd.config.schema import ParallelConfig
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world
from megatron_opd.scoring.contract import ScoreRequest, TokenScores
from tests.tolerance import FORWARD_ULPS, metric_atol, ulps
from tests.trainer.conftest import VOCAB, hf_scores, make_samples, worker_spec

TOP_K = 6
OBJECTIVES = {"opd": {"name": "opd"}, "lsm": {"name": "lsm", "top_k": TOP_K, "support": "teacher_topk+sampled"}}
LAYOUTS = {  # name: (world size, parallel layout, tied embeddings)
    "tp1": (1, ParallelConfig(), False),
    "tp1_tied": (1, ParallelConfig(), True),
    "tp2_sp": (2, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), False),
    "tp2_sp_tied": (2, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), True),
    "pp2_tied": (2, ParallelConfig(pipeline_model_parallel_size=2), True),
}


def _steps(path: str, parallel: ParallelConfig, samples: list, objectives: dict[str, dict]) -> dict:
    """Per objective and path (fused or not): the first mini-batch's loss and gradients by parameter name, the
    metrics of a whole train step, and the student's scores."""
    from megatron_opd.trainer.train_step import accumulate_gradients
    from megatron_opd.trainer.worker import ModelWorker

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out: dict = {}
    for name, kw in objectives.items():
        for fused in (False, True):
            spec = worker_spec(path, trainable=True, **kw)
            spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, parallel=parallel))
            worker = ModelWorker(dataclasses.replace(spec, fused_lm_head=fused), rank, world)
            info = worker.setup("127.0.0.1", 0)
            state = worker.student
            g = torch.Generator().manual_seed(5)
            at = {s.uid: torch.randint(0, VOCAB, (s.response_len, 3), generator=g) for s in samples}
            scores = worker.score(samples, ScoreRequest(top_k=TOP_K, at_ids=True), at)
            step, _ = accumulate_gradients(state, samples, "cpu")
            # by value (numpy): shared-memory tensors would not outlive this process
            grads = {n: p.main_grad.detach().double().numpy().copy() for n, p in state.module.named_parameters()}
            metrics = worker.train_step(samples)
            scores = None if scores is None else {u: _arrays(t) for u, t in scores.items()}
            out[name, fused] = (info, float(step.loss), grads, None if metrics is None else metrics.as_dict(), scores)
    return out


def _arrays(scores: TokenScores) -> dict[str, np.ndarray]:
    return {f.name: getattr(scores, f.name).numpy().copy() for f in dataclasses.fields(scores)}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[bool, str], list]:
    root = tmp_path_factory.mktemp("fused_lm_head")
    paths = {tied: str(root / f"student_tied{tied}") for tied in (False, True)}
    for tied, path in paths.items():
        save_tiny_model(path, tiny_config(vocab_size=VOCAB, tie_word_embeddings=tied), seed=1, init_std=0.1)
    teacher = str(root / "teacher")
    save_tiny_model(teacher, tiny_config(vocab_size=VOCAB), seed=2, init_std=0.1)
    samples = make_samples(5, seed=13)
    scores = hf_scores(teacher, samples, TOP_K)
    for s in samples:
        t = scores[s.uid]
        s.scores.teacher = TokenScores(t.logp.float(), t.topk_ids, t.topk_logp.float())
    return paths, samples


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_lm_head_step_equals_logits(models: tuple[dict[bool, str], list], layout: str) -> None:
    paths, samples = models
    world, parallel, tied = LAYOUTS[layout]
    results = spawn_world(_steps, world, paths[tied], parallel, samples, OBJECTIVES)
    for rank_result in results:
        for name in OBJECTIVES:
            info, loss, grads, metrics, scores = rank_result[name, False]
            _, f_loss, f_grads, f_metrics, f_scores = rank_result[name, True]
            assert f_loss == pytest.approx(loss, rel=0, abs=metric_atol(loss, 2 * FORWARD_ULPS)), (layout, name)
            assert sorted(f_grads) == sorted(grads)
            head = [n for n in grads if "output_layer" in n or "word_embeddings" in n]
            assert head, sorted(grads)
            for n, g in grads.items():
                # fp32 gradients of the same loss, the LM head's matmuls chunked differently: rounding at the
                # parameter's largest gradient entry, times the forward's and the backward's roundings
                atol = ulps(torch.float32, max(float(np.abs(g).max()), 1e-6), 4 * FORWARD_ULPS)
                np.testing.assert_allclose(f_grads[n], g, atol=atol, rtol=0, err_msg=f"{layout} {name} {n}")
            if info.is_output_rank:
                for key, value in metrics.items():
                    tol = metric_atol(value, 2 * FORWARD_ULPS)
                    assert f_metrics[key] == pytest.approx(value, rel=0, abs=tol), (layout, name, key)
                for uid, s in scores.items():
                    f = f_scores[uid]
                    tol = metric_atol(float(np.abs(s["logp"]).max()), FORWARD_ULPS)
                    for key in ("logp", "topk_logp", "ids_logp"):
                        np.testing.assert_allclose(f[key], s[key], atol=tol, rtol=0, err_msg=f"{layout} {key}")
                    np.testing.assert_array_equal(f["topk_ids"], s["topk_ids"])
