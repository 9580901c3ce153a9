"""``rollout:`` section of the run config: which engine serves the student's samples, and how."""

from __future__ import annotations

import dataclasses
import ipaddress
from urllib.parse import urlsplit

from megatron_opd.config.errors import ConfigError, check_choice, check_positive


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass
class SGLangConfig:
    """SGLang servers: attached (``urls``) or launched by the driver, on its node's GPUs or, when they
    need more, over the GPU nodes of the run's Ray cluster (one Ray actor per node starts that
    node's servers; docs/rollout.md)."""

    urls: list[str] = dataclasses.field(default_factory=list)  # attach to running servers
    # launched when urls is empty; server i uses the GPUs base_gpu_id + i*tp*dp ..., numbered over the Ray
    # cluster's GPU nodes (the driver's first; global GPU g: local GPU g % N of node g // N), never two nodes
    num_servers: int = 1
    tp_size: int = 1
    dp_size: int = 1
    mem_fraction_static: float = 0.7
    # where launched servers listen; over several nodes a loopback host means each node's Ray address and
    # 0.0.0.0 every interface (URLs: the node's address); another address is refused there
    host: str = "127.0.0.1"
    base_port: int = 30000  # first HTTP port tried (server i from base_port + 10*i, on its node); taken ones skipped
    base_gpu_id: int = 0  # first GPU of server 0 (a global GPU number over several nodes)
    extra_args: list[str] = dataclasses.field(default_factory=list)  # appended to sglang.launch_server
    # SGLang honours the per-row sampling_seed only with --enable-deterministic-inference (batch-invariant
    # kernels, slower): launched servers get the flag, attached ones must report it in /server_info.
    deterministic_inference: bool = False
    health_timeout_s: float = 30.0  # GET /health runs a one-token generate; SGLang gives it up to 20 s
    log_dir: str | None = None  # server logs, on each server's node (default: a temporary directory, printed at launch)
    startup_timeout_s: float = 900.0  # launch and each restart
    max_restarts: int = 2  # launched servers: restarts per server after a crash or hang before it is dropped
    concurrency_per_server: int = 4  # HTTP requests in flight per server (each of rollout.batch_size prompts)
    weight_sync: str = "disk"  # disk | distributed
    # disk: where the HF safetensors go; a filesystem every server's node sees (required for a launch over nodes)
    weight_sync_dir: str | None = None
    weight_sync_backend: str = "nccl"  # distributed: process-group backend (gloo for CPU tests)
    # distributed: where the broadcasting rank (the student's rank 0) hosts the group's TCP store;
    # None: the address of that rank's node, which every server must reach
    weight_sync_master_addr: str | None = None
    weight_sync_master_port: int = 0  # 0: a free port on that node


@dataclasses.dataclass
class VLLMConfig:
    """In-process ``vllm.LLM`` (GPU only)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.6
    max_model_len: int | None = None
    enforce_eager: bool = False
    weight_sync_dir: str | None = None  # where weight updates are written for LLM reload_weights (temp dir)


@dataclasses.dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | sglang | vllm
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    max_new_tokens: int = 512
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)  # besides the model's EOS
    seed: int = 1  # per-sequence sampling seeds are drawn from it
    batch_size: int = 64  # sequences per forward batch (hf) or per HTTP request (sglang)
    dtype: str = "auto"  # hf: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    device: str = "auto"  # hf: auto | cpu | cuda | cuda:N
    request_timeout_s: float = 600.0  # sglang: one HTTP request, connect to last byte
    max_retries: int = 3  # sglang: re-sends of a failed request (to another server when one is up)
    retry_backoff_s: float = 1.0  # sglang: first wait before a re-send, doubled each time
    weight_sync_bucket_mb: int = 1024  # sglang distributed: tensors sent per call
    # Colocated runs: free the engine's GPU memory (weights, KV cache) between rollouts; the trainer
    # re-sends the weights before the next one. sglang: launched with --enable-memory-saver.
    offload_when_idle: bool = False
    # Asynchronous runs (trainer.max_staleness >= 1): a weight update aborts the generations in flight and
    # resumes them under the new weights (hf, sglang); false: it waits for the requests in flight
    partial: bool = False
    sglang: SGLangConfig = dataclasses.field(default_factory=SGLangConfig)
    vllm: VLLMConfig = dataclasses.field(default_factory=VLLMConfig)

    def validate(self) -> None:
        check_choice("rollout.engine", self.engine, ("hf", "sglang", "vllm"))
        check_positive("rollout.n", self.n)
        check_positive("rollout.temperature", self.temperature, allow_zero=True)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("rollout.top_p", self.top_p, "must lie in (0, 1].", "LSM paper uses 0.9; 1.0 disables.")
        if self.top_k != -1 and self.top_k < 1:
            raise ConfigError("rollout.top_k", self.top_k, "must be -1 (off) or >= 1.", "set rollout.top_k=-1.")
        check_positive("rollout.max_new_tokens", self.max_new_tokens)
        check_positive("rollout.batch_size", self.batch_size)
        check_positive("rollout.request_timeout_s", self.request_timeout_s)
        check_positive("rollout.max_retries", self.max_retries, allow_zero=True)
        check_positive("rollout.retry_backoff_s", self.retry_backoff_s, allow_zero=True)
        check_choice("rollout.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        s = self.sglang
        check_choice("rollout.sglang.weight_sync", s.weight_sync, ("disk", "distributed"))
        check_choice("rollout.sglang.weight_sync_backend", s.weight_sync_backend, ("nccl", "gloo"))
        check_positive("rollout.weight_sync_bucket_mb", self.weight_sync_bucket_mb)
        for key in ("num_servers", "tp_size", "dp_size", "concurrency_per_server"):
            check_positive(f"rollout.sglang.{key}", getattr(s, key))
        check_positive("rollout.sglang.max_restarts", s.max_restarts, allow_zero=True)
        if not 0.0 < s.mem_fraction_static < 1.0:
            raise ConfigError(
                "rollout.sglang.mem_fraction_static",
                s.mem_fraction_static,
                "must lie in (0, 1).",
                "leave room for the trainer when colocated, e.g. 0.5.",
            )
        if s.weight_sync == "distributed" and s.dp_size > 1:
            raise ConfigError(
                "rollout.sglang.dp_size",
                s.dp_size,
                "SGLang joins the weight-update group at rank_offset + tp_rank, so DP replicas inside one server "
                "would collide.",
                "use dp_size=1 and more servers (num_servers), or weight_sync=disk.",
            )
        bad = [u for u in s.urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ConfigError("rollout.sglang.urls", bad, "URLs need a scheme.", "write them as http://host:port.")
        check_positive("rollout.sglang.health_timeout_s", s.health_timeout_s)
        if s.weight_sync == "distributed" and s.weight_sync_master_addr and is_loopback(s.weight_sync_master_addr):
            remote = [u for u in s.urls if not is_loopback(urlsplit(u).hostname or "")]
            if remote:
                raise ConfigError(
                    "rollout.sglang.weight_sync_master_addr",
                    s.weight_sync_master_addr,
                    f"a loopback address, but the servers {remote} are not on this node: they would look for "
                    "the weight-update group's TCP store on their own node and wait until their timeout.",
                    "leave it unset (null: the address of the student rank 0's node) or give an address of that "
                    "node every server reaches.",
                )
        check_positive("rollout.vllm.tensor_parallel_size", self.vllm.tensor_parallel_size)
        if self.partial and self.engine == "vllm":
            raise ConfigError(
                "rollout.partial",
                True,
                "the in-process vLLM engine cannot abort a running generate call.",
                "use rollout.engine=sglang (or hf), or rollout.partial=false.",
            )
        self._check_logprob_convention()

    def _check_logprob_convention(self) -> None:
        """Rollout log-probs must be ``log_softmax(logits / T)`` before truncation (base.py), the
        trainer's convention; refuse the samplings for which the engine cannot report them."""
        tempered = self.temperature not in (0.0, 1.0)
        if self.engine == "sglang" and self.top_k == 1 and tempered:
            raise ConfigError(
                "rollout.top_k",
                self.top_k,
                f"SGLang treats top_k=1 as greedy and then reports temperature-1 log-probs, not those at "
                f"rollout.temperature={self.temperature} that the trainer compares them with.",
                "use rollout.temperature=0 for greedy rollouts, or top_k >= 2.",
            )
        truncated = self.top_p < 1.0 or self.top_k != -1
        if self.engine == "vllm" and truncated and tempered:
            raise ConfigError(
                "rollout.engine",
                self.engine,
                f"vLLM reports log-probs either at temperature 1 (raw_logprobs) or after top-k/top-p "
                f"(processed_logprobs), never log_softmax(logits / {self.temperature}) over the whole vocabulary "
                "that the trainer compares them with, when top_p < 1 or top_k is set.",
                "set rollout.top_p=1 and rollout.top_k=-1, or rollout.temperature=1, or use rollout.engine=sglang.",
            )
