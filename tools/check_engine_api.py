"""Check that an SGLang or vLLM release still has what megatron_opd's rollout engines use.

    python tools/check_engine_api.py SOURCE [SOURCE ...]
    python tools/check_engine_api.py --download DIR     # pip download the pinned wheels, then check them

SOURCE is a wheel (``sglang-*.whl``, ``vllm-*.whl``), an unpacked wheel or site-packages directory
holding ``sglang/`` or ``vllm/``, or the package directory itself; ``--download`` reuses pinned
wheels already in DIR. Nothing is imported from the packages (their imports need CUDA): the script
parses their source with ``ast`` and reports each request field, server flag, endpoint, signature
and source-level behaviour the project relies on that moved, with the file and the project code
that depends on it. The names the project sends are
taken from the project's own code (request bodies, launch commands, ``vllm.LLM`` arguments), so a
change on either side shows. Exit status: 0 all present, 1 something moved, 2 bad input, 3 the
download failed (no access to the package index).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

PINNED = {"sglang": "0.5.23", "vllm": "0.34.0"}  # the versions docs/rollout.md was checked against


class SourceError(ValueError):
    """A SOURCE that is neither a wheel nor a directory holding sglang/ or vllm/."""


class SourceTree:
    """Read-only access to one package's files (``sglang/...``) in a wheel or a directory."""

    def __init__(self, name: str, root: Path, wheel: zipfile.ZipFile | None = None) -> None:
        self.name, self.root, self.wheel = name, root, wheel

    def read(self, path: str) -> str | None:
        member = f"{self.name}/{path}"
        if self.wheel is not None:
            try:
                return self.wheel.read(member).decode()
            except KeyError:
                return None
        file = self.root / member
        return file.read_text() if file.is_file() else None

    def listdir(self, path: str) -> list[str]:
        prefix = f"{self.name}/{path.rstrip('/')}/"
        if self.wheel is not None:
            names = [n[len(prefix) :] for n in self.wheel.namelist() if n.startswith(prefix)]
            return sorted(n for n in names if "/" not in n)
        folder = self.root / prefix
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    def version(self) -> str:
        if self.wheel is not None:
            return Path(self.wheel.filename or "").name.split("-")[1]
        for info in sorted(self.root.glob(f"{self.name}-*.dist-info")):
            return info.name.removesuffix(".dist-info").split("-")[1]
        return "unknown"


def open_sources(paths: Iterable[Path]) -> list[SourceTree]:
    """The packages found in ``paths`` (wheels or directories)."""
    trees = []
    for path in paths:
        if path.is_file() and path.suffix == ".whl":
            name = path.name.split("-")[0]
            trees.append(SourceTree(name, path.parent, zipfile.ZipFile(path)))
            continue
        if not path.is_dir():
            raise SourceError(f"check_engine_api: {path} is neither a wheel nor a directory")
        if path.name in PINNED and (path / "__init__.py").is_file():  # the package directory itself
            trees.append(SourceTree(path.name, path.parent))
            continue
        found = [SourceTree(n, path) for n in PINNED if (path / n / "__init__.py").is_file()]
        if not found:
            raise SourceError(f"check_engine_api: no sglang/ or vllm/ package in {path}")
        trees += found
    return trees


# -- reading source -----------------------------------------------------------------------------
def _find(tree: ast.Module, dotted: str) -> ast.AST | None:
    """The class or function ``A`` or ``A.b`` defined in ``tree``."""
    node: ast.AST = tree
    for part in dotted.split("."):
        body = getattr(node, "body", [])
        match = [
            n for n in body if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and n.name == part
        ]
        if not match:
            return None
        node = match[-1]
    return node


def class_fields(node: ast.AST) -> set[str]:
    """Annotated attributes of a class body (dataclass / msgspec.Struct fields)."""
    body = getattr(node, "body", [])
    return {n.target.id for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def parameters(node: ast.AST) -> set[str]:
    a = node.args  # type: ignore[attr-defined]
    return {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]}


def routes(tree: ast.Module) -> set[str]:
    """Paths of ``@app.get("/x")``, ``@app.post(...)``, ``@app.api_route(...)`` decorators."""
    found = set()
    for node in ast.walk(tree):
        for deco in getattr(node, "decorator_list", []):
            if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.args:
                first = deco.args[0]
                if deco.func.attr in ("get", "post", "put", "api_route") and isinstance(first, ast.Constant):
                    found.add(str(first.value))
    return found


@dataclasses.dataclass(frozen=True)
class Check:
    """Something of ``file`` the project needs: ``kind`` fields | params | routes | contains | cli_flags."""

    file: str  # relative to the package
    kind: str
    target: str  # class / function (``Class.method``); "" for the whole module
    expected: tuple[str, ...]
    used_by: str  # the project code that depends on it


def missing(tree: SourceTree, check: Check) -> list[str]:
    """The expected items ``check`` does not find (all of them when the file or target is gone)."""
    if check.kind == "cli_flags":
        fields: set[str] = set()
        for name in tree.listdir(check.file):
            text = tree.read(f"{check.file}/{name}") if name.endswith(".py") else None
            for node in ast.walk(ast.parse(text)) if text else ():
                if isinstance(node, ast.ClassDef):
                    fields |= class_fields(node)
        return [f for f in check.expected if f.removeprefix("--").replace("-", "_") not in fields]
    text = tree.read(check.file)
    if text is None:
        return [f"{check.file} (file gone)"]
    module = ast.parse(text)
    node = _find(module, check.target) if check.target else module
    if node is None:
        return [f"{check.target} (gone)"]
    if check.kind == "fields":
        have = class_fields(node)
    elif check.kind == "params":
        have = parameters(node)
    elif check.kind == "routes":
        have = routes(module)
    elif check.kind == "contains":
        source = ast.get_source_segment(text, node) if check.target else text
        return [snippet for snippet in check.expected if snippet not in (source or "")]
    else:
        raise ValueError(f"unknown check kind {check.kind!r}")
    return [f for f in check.expected if f not in have]


# -- what the project uses (taken from its own code) --------------------------------------------
def sglang_checks() -> list[Check]:
    from megatron_opd.rollout.base import SamplingParams
    from megatron_opd.rollout.config import SGLangConfig
    from megatron_opd.rollout.sglang import protocol
    from megatron_opd.rollout.sglang.launcher import sglang_server_commands
    from megatron_opd.rollout.sglang.weight_sync import DistributedWeightSync, LocalWeightSender

    io = "srt/managers/io_struct.py"
    prompt = protocol.generate_body([[1]], SamplingParams(), [0])
    sync = DistributedWeightSync(
        ["http://h:1"], [1], post=lambda *a: {}, sender=LocalWeightSender(), master_address="h", master_port=1
    )
    command = sglang_server_commands(
        SGLangConfig(deterministic_inference=True), "/m", seed=0, python="python", memory_saver=True
    )[0].command
    flags = tuple(a for a in command if a.startswith("--"))
    sampling_keys = (
        *protocol.SUPPORTED_SAMPLING_KEYS,
        *protocol.NEUTRAL_SAMPLING_DEFAULTS,
        *protocol.TEXT_ONLY_SAMPLING_KEYS,
    )
    weights = "srt/managers/scheduler_components/weight_updater.py"
    return [
        Check(io, "fields", "GenerateReqInput", (*prompt, "text", "rid", "stream", "logprob_start_len", "top_logprobs_num"), "sglang/protocol.py generate_body, opd serve"),
        Check(io, "fields", "UpdateWeightFromDiskReqInput", tuple(protocol.update_weights_from_disk_body("/w", "1")), "update_weights_from_disk_body"),
        Check(io, "fields", "InitWeightsUpdateGroupReqInput", tuple(sync.init_bodies("h", 1)[0]), "weight_sync.py init_bodies"),
        Check(io, "fields", "UpdateWeightsFromDistributedReqInput", tuple(protocol.update_weights_from_distributed_body([], [], [], "g", "1")), "update_weights_from_distributed_body"),
        Check(io, "fields", "DestroyWeightsUpdateGroupReqInput", ("group_name",), "weight_sync.py destroy"),
        Check(io, "fields", "BeginWeightUpdateReqInput", tuple(protocol.begin_weight_update_body()), "client.py _update_distributed"),
        Check(io, "fields", "EndWeightUpdateReqInput", (), "client.py _update_distributed"),
        Check(io, "fields", "ReleaseMemoryOccupationReqInput", tuple(protocol.memory_occupation_body([])), "client.py release_memory"),
        Check(io, "fields", "ResumeMemoryOccupationReqInput", tuple(protocol.memory_occupation_body([])), "client.py resume_memory"),
        Check("srt/sampling/sampling_params.py", "fields", "SamplingParams", sampling_keys, "protocol.py sampling_params_json / parse_sampling_params"),
        Check("srt/sampling/sampling_params.py", "contains", "SamplingParams.__post_init__", ("self.top_k = 1",), "config.py: top_k=1 is greedy in SGLang"),
        Check("srt/sampling/sampling_batch_info.py", "contains", "", ("is_all_greedy=all(r.sampling_params.top_k <= 1", "else 42", "if enable_deterministic"), "seeds only with --enable-deterministic-inference (opd serve _row_seeds)"),
        Check("srt/entrypoints/http_server.py", "routes", "", (
            "/generate", "/health", "/health_generate", "/model_info", "/get_model_info", "/server_info", "/get_server_info",
            "/flush_cache", "/update_weights_from_disk", "/init_weights_update_group", "/begin_weight_update",
            "/update_weights_from_distributed", "/end_weight_update", "/destroy_weights_update_group",
            "/release_memory_occupation", "/resume_memory_occupation",
        ), "client.py, opd serve"),
        Check("srt/entrypoints/http_server.py", "contains", "", ('HEALTH_CHECK_TIMEOUT = int(os.getenv("SGLANG_HEALTH_CHECK_TIMEOUT", 20))',), "rollout.sglang.health_timeout_s > 20 s"),
        Check("srt/entrypoints/http_server.py", "contains", "health_generate", ("input_ids=[0]", '"max_new_tokens": 1', "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"), "opd serve healthy()"),
        Check("srt/environ.py", "contains", "", ("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION = EnvBool(True)",), "/health generates by default"),
        Check("srt/constants.py", "contains", "", ('GPU_MEMORY_TYPE_KV_CACHE = "kv_cache"', 'GPU_MEMORY_TYPE_WEIGHTS = "weights"', 'GPU_MEMORY_TYPE_CUDA_GRAPH = "cuda_graph"'), "base.py MEMORY_TAGS"),
        Check(weights, "contains", "SchedulerWeightUpdaterManager.release_memory_occupation", ("assert self.is_fully_idle(", "tags = GPU_MEMORY_ALL_TYPES"), "release only when idle (opd serve release_memory)"),
        Check(weights, "contains", "SchedulerWeightUpdaterManager.resume_memory_occupation", ("tags = GPU_MEMORY_ALL_TYPES", "self.offload_tags.remove(tag)"), "resume names its regions (client.py resume_memory)"),
        Check(weights, "contains", "SchedulerWeightUpdaterManager.update_weights_from_distributed", ("if self._session is None:",), "begin/end session (client.py _update_distributed)"),
        Check("srt/layers/sampler.py", "contains", "", ('SGLANG_RETURN_ORIGINAL_LOGPROB = get_bool_env_var("SGLANG_RETURN_ORIGINAL_LOGPROB")',), "launcher.py SERVER_ENV, client.py check_logprob_convention"),
        Check("srt/layers/sampler.py", "contains", "Sampler.forward", ("logits.div_(sampling_info.temperatures)", "else torch.log(probs)", "original_logprobs = logprobs = torch.nn.functional.log_softmax("), "log-probs = log_softmax(logits / T) before top-k/top-p (base.py)"),
        Check("srt/arg_groups/fields", "cli_flags", "", flags, "launcher.py sglang_server_commands"),
        Check("srt/arg_groups/arg_utils.py", "contains", "_field_to_cli_name", ('"--" + name.replace("_", "-")',), "flags are the field names"),
    ]  # fmt: skip


def vllm_checks() -> list[Check]:
    from megatron_opd.rollout.base import SamplingParams
    from megatron_opd.rollout.config import RolloutConfig
    from megatron_opd.rollout.vllm_engine import llm_kwargs, sampling_kwargs

    cfg = RolloutConfig(engine="vllm")
    cfg.vllm.max_model_len = 1
    llm_args = tuple(llm_kwargs(cfg, "/m"))
    return [
        Check("entrypoints/llm.py", "params", "LLM.__init__", ("model", "tensor_parallel_size", "gpu_memory_utilization", "enforce_eager", "dtype", "seed"), "vllm_engine.py llm_kwargs"),
        Check("engine/arg_utils.py", "fields", "EngineArgs", llm_args, "vllm_engine.py llm_kwargs (LLM passes **kwargs to EngineArgs)"),
        Check("entrypoints/llm.py", "params", "LLM.generate", ("prompts", "sampling_params", "use_tqdm"), "VLLMEngine.generate"),
        Check("entrypoints/llm.py", "params", "LLM.collective_rpc", ("method", "kwargs"), "VLLMEngine.update_weights_from_dir"),
        Check("entrypoints/llm.py", "params", "LLM.sleep", ("level",), "VLLMEngine.release_memory"),
        Check("entrypoints/llm.py", "params", "LLM.wake_up", ("tags",), "VLLMEngine.resume_memory"),
        Check("entrypoints/llm.py", "params", "LLM.reset_prefix_cache", (), "VLLMEngine.update_weights_from_dir"),
        Check("sampling_params.py", "fields", "SamplingParams", tuple(sampling_kwargs(SamplingParams(), 0)), "vllm_engine.py sampling_kwargs"),
        Check("sampling_params.py", "contains", "SamplingParams.__post_init__", ("self.top_p = 1.0", "self.top_k = 0"), "exact_logprobs: greedy rows are untruncated"),
        Check("outputs.py", "fields", "CompletionOutput", ("token_ids", "logprobs", "finish_reason"), "completion_from_output"),
        Check("logprobs.py", "fields", "Logprob", ("logprob",), "completion_from_output"),
        Check("config/model.py", "contains", "", ('"raw_logprobs"', '"processed_logprobs"', "Processed means the values after applying all processors, including\n    temperature and top_k/top_p."), "vllm_engine.py logprobs_mode / exact_logprobs"),
        Check("v1/worker/gpu/sample/sampler.py", "contains", "Sampler.__call__", ("if self.logprobs_mode in PROCESSED_LOGPROBS_MODES:\n                logits = processed_logits",), "processed log-probs come from the processed logits"),
        Check("v1/worker/gpu/sample/sampler.py", "contains", "Sampler._sample_random", ("processed_logits = apply_top_k_top_p(",), "processed logits are after top-k/top-p"),
        Check("v1/worker/gpu_worker.py", "params", "Worker.reload_weights", ("weights_path", "is_checkpoint_format"), "VLLMEngine.update_weights_from_dir"),
        Check("v1/serial_utils.py", "contains", "MsgpackEncoder.enc_hook", ("if not envs.VLLM_ALLOW_INSECURE_SERIALIZATION:", "FunctionType"), "why no function goes through collective_rpc"),
        Check("v1/executor/abstract.py", "contains", "Executor.wake_up", ("if tag not in self.sleeping_tags:",), "resume of a region awake is a warning (VLLMEngine.resume_memory)"),
    ]  # fmt: skip


CHECKS: dict[str, Callable[[], list[Check]]] = {"sglang": sglang_checks, "vllm": vllm_checks}


def check(tree: SourceTree) -> list[str]:
    """Lines describing what moved in ``tree`` (empty: nothing)."""
    problems = []
    for c in CHECKS[tree.name]():
        gone = missing(tree, c)
        if gone:
            where = f"{c.file}" + (f" {c.target}" if c.target else "")
            problems.append(f"{tree.name} {tree.version()}: {where}: missing {gone} (used by {c.used_by})")
    return problems


def pinned_wheels(folder: Path) -> list[Path]:
    return sorted(w for name, version in PINNED.items() for w in folder.glob(f"{name}-{version}-*.whl"))


def download(dest: Path) -> list[Path]:
    """The pinned wheels in ``dest``, fetched with ``pip download --no-deps`` unless already there."""
    if len(pinned_wheels(dest)) == len(PINNED):
        return pinned_wheels(dest)
    dest.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}=={version}" for name, version in PINNED.items()]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest)]
    platforms = ["--platform", "manylinux_2_34_x86_64", "--platform", "manylinux_2_28_x86_64"]  # sglang's, vllm's
    subprocess.run([*cmd, "--python-version", "3.11", *platforms, *specs], check=True, timeout=900)
    return pinned_wheels(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", type=Path, help="wheels or directories holding sglang/ or vllm/")
    parser.add_argument("--download", type=Path, metavar="DIR", help=f"pip download {PINNED} into DIR and check them")
    args = parser.parse_args(argv)
    try:
        sources = list(args.sources) + (download(args.download) if args.download else [])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"check_engine_api: pip download failed: {e}", file=sys.stderr)
        return 3
    if not sources:
        parser.error("give wheels or package directories, or --download DIR")
    try:
        trees = open_sources(sources)
    except SourceError as e:
        print(e, file=sys.stderr)
        return 2
    problems = [line for tree in trees for line in check(tree)]
    for tree in trees:
        print(f"{tree.name} {tree.version()}: {len(CHECKS[tree.name]())} checks")
    for line in problems:
        print("MOVED " + line)
    print("all present" if not problems else f"{len(problems)} moved")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
