"""Build the CPU demo's assets: tokenizer, teacher and student HF Qwen3 models, verl-schema data splits.

``build_demo_assets(out_dir)`` writes::

    out_dir/
      teacher/   HF Qwen3 model + tokenizer: SFT on correct answers (solves the task)
      student/   HF Qwen3 model + tokenizer: same architecture, SFT on a sloppy tutor's answers
      data/      train.parquet, val.parquet, test.parquet (disjoint problems, verl schema)
      manifest.json   the recipe, its hash, library versions, build time and measured accuracies

Deterministic: fixed seeds, one CPU thread, ``torch.use_deterministic_algorithms``; the same recipe on the
same library versions and the same kind of CPU gives byte-identical files (the vector instructions torch's and
MKL's kernels use, recorded in the manifest, change the last bits and so the models). A second call with a
matching manifest does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_opd.demo.evaluate import greedy_and_sampled
from megatron_opd.demo.sft import SFTRecipe, sft_train
from megatron_opd.demo.task import Problem, TaskSpec, split_problems, tutor, write_split
from megatron_opd.demo.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RECIPE_VERSION = 1  # bump when the build code changes what a recipe produces


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """One tiny Qwen3 model and how it is trained. ``carry_drop``: share of training answers written by the
    sloppy tutor (carries dropped); 0 for the teacher."""

    sft: SFTRecipe
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 192
    init_seed: int = 0
    carry_drop: float = 0.0


@dataclasses.dataclass(frozen=True)
class DemoRecipe:
    """Everything that determines the assets; its hash is stored in the manifest."""

    task: TaskSpec = dataclasses.field(default_factory=TaskSpec)
    teacher: ModelRecipe = dataclasses.field(
        default_factory=lambda: ModelRecipe(sft=SFTRecipe(steps=600, seed=0), init_seed=0)
    )
    student: ModelRecipe = dataclasses.field(
        default_factory=lambda: ModelRecipe(sft=SFTRecipe(steps=600, seed=1), init_seed=1, carry_drop=0.7)
    )
    version: int = RECIPE_VERSION

    def digest(self) -> str:
        """A stable hash of the recipe."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class DemoAssets:
    """Paths of the built assets."""

    root: Path
    teacher: Path
    student: Path
    train_file: Path
    val_file: Path
    test_file: Path
    manifest: Path

    @classmethod
    def at(cls, root: str | Path) -> DemoAssets:
        r = Path(root)
        data = r / "data"
        return cls(
            r,
            r / "teacher",
            r / "student",
            data / "train.parquet",
            data / "val.parquet",
            data / "test.parquet",
            r / MANIFEST,
        )

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when the assets are missing or incomplete."""
        if not self.manifest.is_file():
            return None
        return json.loads(self.manifest.read_text())


@contextlib.contextmanager
def deterministic_cpu() -> Iterator[None]:
    """One thread and deterministic kernels for the duration (previous settings restored)."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def model_config(recipe: ModelRecipe, tokenizer: Any) -> Any:
    """The ``Qwen3Config`` of a demo model: vocabulary = the tokenizer, ``<|im_end|>`` EOS."""
    from megatron_opd.models.tiny import tiny_config

    return tiny_config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.head_dim,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=128,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def train_model(recipe: ModelRecipe, tokenizer: Any, problems: list[Problem]) -> Any:
    """A freshly initialized model (seed ``init_seed``) after SFT on ``problems`` answered by the tutor."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.init_seed)
    model = AutoModelForCausalLM.from_config(model_config(recipe, tokenizer))
    sft_train(model, tokenizer, [p.question for p in problems], tutor(problems, recipe.carry_drop), recipe.sft)
    return model.eval()


def build_demo_assets(
    out_dir: str | Path, seed: int = 0, force: bool = False, recipe: DemoRecipe | None = None
) -> DemoAssets:
    """Build (or reuse) the demo assets under ``out_dir``; the paths.

    ``seed`` shifts every seed of the recipe (0 = the documented build). Existing assets whose manifest
    matches the recipe are reused unless ``force``. ``recipe`` overrides the default (tests use tiny ones).
    """
    recipe = with_seed(recipe or DemoRecipe(), seed)
    assets = DemoAssets.at(out_dir)
    manifest = assets.read_manifest()
    if not force and manifest is not None and manifest.get("recipe_hash") == recipe.digest():
        return assets
    logger.info("building the demo assets in %s (recipe %s, about 1.5 minutes)", assets.root, recipe.digest())
    start = time.perf_counter()
    for stale in (assets.manifest, assets.teacher, assets.student, assets.root / "data"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    assets.train_file.parent.mkdir(parents=True, exist_ok=True)

    splits = split_problems(recipe.task)
    for name, path in (("train", assets.train_file), ("val", assets.val_file), ("test", assets.test_file)):
        write_split(path, splits[name], name)

    tokenizer = build_tokenizer()
    measured: dict[str, Any] = {}
    with deterministic_cpu():
        for name, model_recipe, path in (
            ("teacher", recipe.teacher, assets.teacher),
            ("student", recipe.student, assets.student),
        ):
            t0 = time.perf_counter()
            model = train_model(model_recipe, tokenizer, splits["train"])
            measured[f"{name}_train_s"] = round(time.perf_counter() - t0, 1)
            logger.info("trained the %s in %.1f s", name, measured[f"{name}_train_s"])
            model.save_pretrained(str(path))
            tokenizer.save_pretrained(str(path))
            val = splits["val"]
            messages = [[{"role": "user", "content": p.question}] for p in val]
            for mode, acc in greedy_and_sampled(model, tokenizer, messages, [p.answer for p in val], 0).items():
                measured[f"{name}_val_{mode}"] = acc

    import transformers

    manifest = {
        "recipe_hash": recipe.digest(),
        "recipe": dataclasses.asdict(recipe),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        # the vector instructions torch's kernels used: the bytes depend on them (other CPUs, other models)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "build_s": round(time.perf_counter() - start, 1),
        "measured": measured,
    }
    partial = assets.manifest.with_suffix(".partial")
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(partial, assets.manifest)  # the manifest appears last, whole: its presence means complete
    logger.info("built the demo assets in %.1f s: %s", manifest["build_s"], measured)
    return assets


def with_seed(recipe: DemoRecipe, seed: int) -> DemoRecipe:
    """``recipe`` with ``seed`` added to every model's init and SFT seeds (the data split is unchanged)."""
    if seed == 0:
        return recipe

    def shift(m: ModelRecipe) -> ModelRecipe:
        return dataclasses.replace(
            m, init_seed=m.init_seed + seed, sft=dataclasses.replace(m.sft, seed=m.sft.seed + seed)
        )

    return dataclasses.replace(recipe, teacher=shift(recipe.teacher), student=shift(recipe.student))
