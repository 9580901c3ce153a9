"""The typed run configuration: ``opd train CONFIG [key=value ...]``.

Sections owned by a subsystem are defined beside it (``objective`` in ``objectives/config.py``,
``data``, ``rollout``, ``eval``); model layout, optimizer, trainer and logging are here. Parallel
sizes use Megatron's names. Validation (``OPDConfig.validate``) runs before any process group or
GPU is touched and names the key and the fix in every error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megatron_opd.config.errors import ConfigError, check_choice, check_positive
from megatron_opd.data.config import DataConfig
from megatron_opd.eval.config import EvalConfig
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.rollout.config import RolloutConfig


@dataclasses.dataclass
class ParallelConfig:
    """One worker group's layout. World size = TP x PP x DP; EP splits experts inside DP x TP."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    data_parallel_size: int = 1
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.data_parallel_size

    def validate(self, key: str, hf_config: Any | None = None) -> None:
        for f in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "expert_model_parallel_size",
            "data_parallel_size",
        ):
            check_positive(f"{key}.{f}", getattr(self, f))
        if hf_config is not None:
            self._validate_for_model(key, hf_config)
        tp, ep = self.tensor_model_parallel_size, self.expert_model_parallel_size
        etp = self.expert_tensor_parallel_size or tp
        if (tp * self.data_parallel_size) % (ep * etp):
            raise ConfigError(
                f"{key}.expert_model_parallel_size",
                ep,
                f"EP x ETP = {ep * etp} must divide TP x DP = {tp * self.data_parallel_size}.",
                "raise data_parallel_size or lower expert_model_parallel_size.",
            )

    def _validate_for_model(self, key: str, hf_config: Any) -> None:
        from megatron_opd.models.qwen3 import num_experts

        tp, pp, ep = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.expert_model_parallel_size
        heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
        if groups % tp:
            raise ConfigError(
                f"{key}.tensor_model_parallel_size",
                tp,
                f"does not divide num_query_groups={groups} (num_key_value_heads).",
                f"use a TP size that divides {groups}.",
            )
        if heads % tp:
            raise ConfigError(
                f"{key}.tensor_model_parallel_size",
                tp,
                f"does not divide num_attention_heads={heads}.",
                f"use a TP size that divides {heads}.",
            )
        if hf_config.vocab_size % tp:
            raise ConfigError(
                f"{key}.tensor_model_parallel_size",
                tp,
                f"does not divide vocab_size={hf_config.vocab_size}.",
                "use a TP size that divides the vocabulary size.",
            )
        if hf_config.num_hidden_layers % pp:
            raise ConfigError(
                f"{key}.pipeline_model_parallel_size",
                pp,
                f"does not divide num_hidden_layers={hf_config.num_hidden_layers}.",
                f"use a PP size that divides {hf_config.num_hidden_layers}.",
            )
        experts = num_experts(hf_config)
        if ep > 1 and not experts:
            raise ConfigError(
                f"{key}.expert_model_parallel_size", ep, "the model is dense (no experts).", "set it to 1."
            )
        if experts and experts % ep:
            raise ConfigError(
                f"{key}.expert_model_parallel_size",
                ep,
                f"does not divide num_experts={experts}.",
                f"use an EP size that divides {experts}.",
            )


@dataclasses.dataclass
class ModelConfig:
    """A model and its worker group: HF directory (or Megatron checkpoint with an ``hf/`` copy of
    the config) and layout."""

    path: str = ""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    spec: str = "auto"  # auto | te | local
    recompute_granularity: str | None = None  # None | selective | full
    offload_when_idle: bool = False  # params to CPU while another group uses the GPUs
    # the local spec's compiled RMSNorm / RoPE / SwiGLU (models/fusion.py): auto (on where CUDA is present) | true
    # | false; the TE spec has its own fused kernels
    fusion: str = "auto"

    @property
    def fusion_enabled(self) -> bool | None:
        """``fusion`` as ``build_gpt_model`` takes it (None: auto)."""
        return {"auto": None, "true": True, "false": False}[str(self.fusion).lower()]

    def validate(self, key: str) -> Any:
        """Checks and returns the model's HF config."""
        from megatron_opd.convert.hf_io import CheckpointError, load_hf_config
        from megatron_opd.models.qwen3 import ModelConfigError, check_supported

        if not self.path:
            raise ConfigError(f"{key}.path", self.path, "no model given.", f"set {key}.path=/path/to/hf_model_dir.")
        if not Path(self.path).exists():
            raise ConfigError(f"{key}.path", self.path, "does not exist.", "give a local Hugging Face model directory.")
        check_choice(f"{key}.dtype", self.dtype, ("auto", "bf16", "fp32"))
        check_choice(f"{key}.spec", self.spec, ("auto", "te", "local"))
        check_choice(f"{key}.recompute_granularity", self.recompute_granularity, (None, "selective", "full"))
        check_choice(f"{key}.fusion", str(self.fusion).lower(), ("auto", "true", "false"))
        try:
            hf_config = load_hf_config(model_hf_dir(self.path))
            check_supported(hf_config)
        except (CheckpointError, ModelConfigError) as e:
            raise ConfigError(f"{key}.path", self.path, str(e)) from e
        self.parallel.validate(f"{key}.parallel", hf_config)
        return hf_config


def model_hf_dir(path: str) -> str:
    """The HF directory of a model path: itself, or the ``hf/`` copy inside a Megatron checkpoint."""
    p = Path(path)
    return str(p / "hf") if (p / "hf" / "config.json").is_file() and not (p / "config.json").is_file() else str(p)


@dataclasses.dataclass
class TeacherConfig(ModelConfig):
    """A frozen teacher. ``name`` is what ``extra_info.opd_teacher`` routes to; ``base_path`` is
    the teacher's pre-RL base model, the reference for reward correction (docs/objectives.md §2)."""

    name: str = "default"
    base_path: str | None = None
    base_parallel: ParallelConfig | None = None

    @property
    def base_model(self) -> ModelConfig:
        """The base as a worker group's model: the teacher's own settings (``dtype``, ``spec``, ``fusion``,
        ``offload_when_idle``) on ``base_path``, laid out by ``base_parallel`` (default: the teacher's layout)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{**own, "path": self.base_path or "", "parallel": self.base_parallel or self.parallel})


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine
    use_distributed_optimizer: bool = True

    def validate(self) -> None:
        check_positive("optim.lr", self.lr)
        check_positive("optim.clip_grad", self.clip_grad, allow_zero=True)
        check_positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        check_choice("optim.lr_decay_style", self.lr_decay_style, ("constant", "linear", "cosine"))


@dataclasses.dataclass
class TrainerConfig:
    steps: int = 100
    mini_batches_per_step: int = 1  # >1: PPO-clip updates on the same rollouts
    max_tokens_per_microbatch: int = 8192
    sequence_packing: bool = True  # THD micro-batches (no padding compute); false: right-padded rows
    metrics_top_k: int = 8  # teacher top-K fetched for the overlap metric when the objective needs none (0: off)
    # the student's loss and every model's scores from the output layer's input and weight, chunked, without a
    # [tokens, V/TP] logits tensor or its gradient (kernels/linear*.py); false: through megatron's logits
    fused_lm_head: bool = True
    save_every: int = 50
    keep_last: int = 2
    eval_every: int = 0  # 0: only before and after training
    eval_before: bool = True
    log_every: int = 1
    max_bad_steps: int = 3  # non-finite steps skipped before the run stops
    colocate: bool = True  # all groups share the GPUs (offload idle models) vs separate GPUs
    group_timeout_s: float = 1800.0  # bound on every collective inside a worker group
    # 0: synchronous (rollout, score, update, sync). k >= 1: the rollouts of the next steps are generated while
    # the student updates, under weights at most k versions older than the student's (docs/async.md)
    max_staleness: int = 0

    def validate(self) -> None:
        check_positive("trainer.steps", self.steps)
        check_choice("trainer.max_staleness", self.max_staleness, (0, 1, 2))
        check_positive("trainer.mini_batches_per_step", self.mini_batches_per_step)
        check_positive("trainer.max_tokens_per_microbatch", self.max_tokens_per_microbatch)
        check_positive("trainer.save_every", self.save_every, allow_zero=True)
        check_positive("trainer.keep_last", self.keep_last)


@dataclasses.dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    progress_bar: bool = True


@dataclasses.dataclass
class OPDConfig:
    run_dir: str = "runs/default"
    seed: int = 1
    resume: str = "auto"  # auto | never | PATH
    # Build (once; reused when up to date) the CPU demo's tiny teacher, student and data into this
    # directory before anything else (megatron_opd.demo); paths may refer to it as ${demo_assets}.
    demo_assets: str | None = None
    student: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    teachers: list[TeacherConfig] = dataclasses.field(default_factory=list)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def validate(self) -> dict[str, Any]:
        """Check every section and their cross-constraints; returns the HF configs by group
        (``student``, ``teachers[name]``). Reads only ``config.json`` files."""
        from megatron_opd.objectives.registry import validate_objective

        hf = {"student": self.student.validate("student")}
        if not self.teachers:
            raise ConfigError(
                "teachers",
                [],
                f"objective {self.objective.name!r} needs a teacher (sft: the teacher writes the responses).",
                "add teachers: [{name: ..., path: ...}].",
            )
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ConfigError("teachers", names, "teacher names must be unique.", "give each teacher its own name.")
        for i, t in enumerate(self.teachers):
            hf[f"teachers[{t.name}]"] = t.validate(f"teachers.{i}")
            if t.base_path:
                t.base_model.validate(f"teachers.{i}.base_path")
            if hf[f"teachers[{t.name}]"].vocab_size != hf["student"].vocab_size:
                raise ConfigError(
                    f"teachers.{i}.path",
                    t.path,
                    f"vocab_size {hf[f'teachers[{t.name}]'].vocab_size} differs from the student's {hf['student'].vocab_size}.",
                    "teacher and student must share a tokenizer (token-level distillation).",
                )
        if self.student.offload_when_idle and self.student.dtype == "fp32" and self.optim.use_distributed_optimizer:
            raise ConfigError(
                "student.offload_when_idle",
                True,
                "fp32 parameters with the distributed optimizer cannot be offloaded: its fp32 shards are views "
                "of the parameter buffer, whose GPU storage megatron frees before moving the optimizer state.",
                "use student.dtype=bf16 (or auto), student.offload_when_idle=false, or "
                "optim.use_distributed_optimizer=false.",
            )
        self._check_async()
        validate_objective(self.objective, has_teacher_base=all(t.base_path for t in self.teachers))
        self.objective.validate_vocab(hf["student"].vocab_size)
        self.data.validate()
        self.rollout.validate()
        self.optim.validate()
        self.trainer.validate()
        self.eval.validate()
        if self.resume not in ("auto", "never") and not Path(self.resume).exists():
            raise ConfigError(
                "resume", self.resume, "is neither auto, never nor an existing checkpoint.", "use resume=auto."
            )
        return hf

    def _check_async(self) -> None:
        """An asynchronous run needs an engine that keeps its GPUs while the student trains."""
        k = self.trainer.max_staleness
        if k and self.rollout.offload_when_idle:
            raise ConfigError(
                "trainer.max_staleness",
                k,
                "overlaps rollouts with the student's update, but rollout.offload_when_idle=true colocates the "
                "engine with the trainer: it gives its GPU memory back while the student trains.",
                "put the engine on its own GPUs (rollout nodes, or a split of the node's GPUs) and set "
                "rollout.offload_when_idle=false, or set trainer.max_staleness=0.",
            )
        if self.rollout.partial and not k:
            raise ConfigError(
                "rollout.partial",
                True,
                "resumes generations a weight update interrupts; with trainer.max_staleness=0 no update arrives "
                "during a rollout.",
                "set trainer.max_staleness=1 (or 2), or rollout.partial=false.",
            )
