"""``SGLangEngine``: rollouts from SGLang servers (launched here or attached by URL) over HTTP.

Dispatch. ``generate`` cuts the prompts into requests of ``rollout.batch_size`` prompts (token
ids, one ``sampling_params`` with its own ``sampling_seed`` per prompt) and keeps up to
``sglang.concurrency_per_server`` requests in flight per server, always sending the next request
to the up server with the fewest in flight (ties: the one given the fewest so far).

Failures. A connection error, a timeout (``rollout.request_timeout_s``), a 5xx/408/429 answer or
a garbled body marks the server down, records a :class:`ServerFailure` (logged, and kept in
``engine.failures``) and re-sends the request to another server after a backoff
(``retry_backoff_s``, doubling), at most ``max_retries`` times per request. A 4xx answer is the
request's fault and raises at once. Nothing waits without a timeout.

- A server launched here is restarted in the background (SIGKILL, the same command on the latest
  weights, ``sglang.startup_timeout_s`` to come up), at most ``sglang.max_restarts`` times, then
  dropped. While every server is down but one is restarting, ``generate`` waits for it.
- An attached server (``sglang.urls``) is dropped from dispatch; down servers are probed with
  ``GET /health`` at the start of each ``generate`` (and when no server is up) and revived if they
  answer.
- When no server is up or restarting, or a request has used its retries, ``generate`` raises
  :class:`RolloutError` naming every failed server. ``server_stats()`` counts failures and restarts
  for the step metrics.

Servers. At start every server's ``/server_info`` must show ``enable_deterministic_inference`` when
``sglang.deterministic_inference`` asks for it (SGLang ignores ``sampling_seed`` otherwise), and
its log-probs must be those at the request's temperature (:func:`check_logprob_convention`):
SGLang under ``SGLANG_RETURN_ORIGINAL_LOGPROB`` reports temperature-1 values, which rollout
correction must not compare with the trainer's. ``GET /health`` generates a token and may take
SGLang's 20 s: probes wait ``sglang.health_timeout_s``.

Weights. ``update_weights`` writes HF safetensors and calls ``/update_weights_from_disk`` on every
server (``sglang.weight_sync=disk``), or broadcasts over a process group announced with
``/init_weights_update_group`` + ``/update_weights_from_distributed`` inside a
``/begin_weight_update`` ... ``/end_weight_update`` session (``distributed``): from this process, or
with ``update_weights_from_sender`` from another (the trainer's student rank 0). An
attached server that misses an update is retired for good (it would serve stale weights). With disk
sync the latest weights directory is kept while servers are launched here, so a restarted server
comes up on it; with distributed sync a restarted server holds the base weights, serves nothing
until the next update, and that update rebuilds the process group with it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch

from megatron_opd.rollout.base import MEMORY_TAGS, Completion, RolloutError, SamplingParams, row_seeds
from megatron_opd.rollout.config import RolloutConfig
from megatron_opd.rollout.disk_sync import new_weights_dir, write_hf_weights
from megatron_opd.rollout.sglang import protocol
from megatron_opd.rollout.sglang.cluster import launch_servers
from megatron_opd.rollout.sglang.launcher import LaunchedServers
from megatron_opd.rollout.sglang.weight_sync import DistributedWeightSync, LocalWeightSender, WeightSender

logger = logging.getLogger(__name__)

PROBE_TEMPERATURE = 0.5  # check_logprob_convention: a temperature whose log-probs differ from T=1's
PROBE_TOP_P = 1e-9  # keeps only the most probable token, so the probe follows the greedy path
PROBE_TOKENS = 8


class RetryableError(RuntimeError):
    """The server failed (not the request): try another server."""


class RequestError(RuntimeError):
    """The request itself was refused (4xx): retrying cannot help."""


@dataclasses.dataclass
class ServerFailure:
    url: str
    error: str
    sequences: int  # prompts of the failed request (re-sent elsewhere)
    time: float


@dataclasses.dataclass(eq=False)
class Server:
    url: str
    up: bool = True
    retired: bool = False  # missed a weight update: never used again
    inflight: int = 0
    assigned: int = 0  # requests given to it so far
    completed: int = 0  # requests it answered
    process: int | None = None  # index in ``engine.processes`` when launched here
    restarting: bool = False
    restarts: int = 0
    stale: bool = False  # restarted on older weights than the trainer's: idle until the next update
    released: set[str] = dataclasses.field(default_factory=set)  # memory regions given back (MEMORY_TAGS)


def post_json(url: str, path: str, body: dict[str, Any], timeout_s: float) -> Any:
    """POST ``body`` to ``url + path``; the JSON answer, or RetryableError / RequestError."""
    try:
        r = requests.post(url + path, json=body, timeout=(min(10.0, timeout_s), timeout_s))
    except (requests.ConnectionError, requests.Timeout) as e:
        raise RetryableError(f"{type(e).__name__}: {e}") from e
    if r.status_code >= 500 or r.status_code in (408, 429):
        raise RetryableError(f"HTTP {r.status_code}: {r.text[:300]}")
    if r.status_code != 200:
        raise RequestError(f"HTTP {r.status_code} from {url}{path}: {r.text[:500]}")
    if not r.content:  # e.g. the memory endpoints: 200 and nothing to say
        return None
    try:
        return r.json()
    except ValueError as e:
        raise RetryableError(f"answer is not JSON: {r.text[:200]!r}") from e


def healthy(url: str, timeout_s: float) -> bool:
    """``GET /health``: SGLang generates one token and answers within its 20 s health timeout."""
    try:
        return requests.get(url + "/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def get_json(url: str, path: str, timeout_s: float) -> Any:
    """GET ``url + path``; the JSON answer, or ``None`` when the server has no such endpoint."""
    r = requests.get(url + path, timeout=timeout_s)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return r.json()


def check_logprob_convention(url: str, timeout_s: float) -> None:
    """RolloutError when the server reports temperature-1 log-probs for sampled tokens.

    Greedy decoding reports ``log_softmax(z)``; a row at temperature 0.5 whose tiny ``top_p`` keeps
    only the most probable token follows the same tokens and must report ``log_softmax(2 z)``, which
    is larger wherever the top token is not certain (ties aside). Equal values at every such
    position mean ``SGLANG_RETURN_ORIGINAL_LOGPROB`` (sampler.py) is set on the server."""
    rows = []
    for sampling in ({"temperature": 0.0}, {"temperature": PROBE_TEMPERATURE, "top_p": PROBE_TOP_P}):
        body = {
            "input_ids": [0],
            "sampling_params": {**sampling, "max_new_tokens": PROBE_TOKENS},
            "return_logprob": True,
        }
        rows.append(protocol.parse_generate_response([post_json(url, "/generate", body, timeout_s)], [[0]])[0])
    greedy, tempered = rows
    pairs = [
        (g, t)
        for g, t, a, b in zip(greedy.logprobs, tempered.logprobs, greedy.token_ids, tempered.token_ids)
        if a == b and g < -0.01  # the same token, not (nearly) certain
    ]
    if pairs and all(abs(t - g) <= 1e-3 * max(1.0, abs(g)) for g, t in pairs):
        raise RolloutError(
            f"{url} reports log-probs at temperature 1 for a row sampled at temperature {PROBE_TEMPERATURE} "
            f"(greedy {pairs[0][0]:.4f}, tempered {pairs[0][1]:.4f}): rollout correction needs "
            "log_softmax(logits / T). Fix: unset SGLANG_RETURN_ORIGINAL_LOGPROB on that server."
        )


@dataclasses.dataclass
class _Job:
    rows: list[int]  # indices into the generate call's prompts
    attempts: int = 0
    not_before: float = 0.0


class SGLangEngine:
    """A :class:`~megatron_opd.rollout.base.RolloutEngine` over SGLang's HTTP API."""

    def __init__(
        self,
        cfg: RolloutConfig,
        model_dir: str,
        *,
        eos_token_ids: Iterable[int] = (),
        processes: LaunchedServers | None = None,
    ) -> None:
        """``processes``: servers already started for ``model_dir`` (:class:`ServerProcesses` on
        this node, ``ClusterServers`` over several), handed over to the engine (restarted on
        failure, stopped at shutdown) instead of launching ``sglang.num_servers``."""
        self.cfg, self.model_dir = cfg, str(model_dir)
        self.stop_token_ids = tuple(eos_token_ids)  # sent with every request besides the sampling's own
        s = cfg.sglang
        self.processes = processes
        if self.processes is None and not s.urls:  # on this node, or over the Ray cluster's GPU nodes
            self.processes = launch_servers(s, self.model_dir, seed=cfg.seed, memory_saver=cfg.offload_when_idle)
        if self.processes is not None:
            self.servers = [Server(u, process=i) for i, u in enumerate(self.processes.urls)]
        else:
            self.servers = [Server(u.rstrip("/")) for u in s.urls]
        self.gpus_per_server = [s.tp_size * s.dp_size] * len(self.servers)
        self.failures: list[ServerFailure] = []
        self.weight_version = 0
        self._rng = np.random.default_rng(cfg.seed)
        self._dist: DistributedWeightSync | None = None
        self._local_sender = LocalWeightSender()  # update_weights with distributed sync: this process sends
        self._weights_dir: Path | None = None  # disk sync, launched servers: the latest weights (restarts load it)
        self._restart_threads: list[threading.Thread] = []
        urls = [sv.url for sv in self.servers]
        self._probe(self.servers)
        if not any(sv.up for sv in self.servers):
            self.shutdown()
            raise RolloutError(f"no SGLang server answers GET /health: {urls}. Fix: start them or check the URLs.")
        try:
            for sv in self.servers:
                if sv.up:
                    self._check_server(sv)
        except BaseException:
            self.shutdown()
            raise

    def _check_server(self, server: Server) -> None:
        """The server honours the row seeds when the config relies on them, and reports the
        log-probs rollout correction needs (RolloutError otherwise); one that fails to answer is
        marked down."""
        try:
            self._check_settings(server.url)
        except (RetryableError, RequestError, protocol.ProtocolError, requests.RequestException) as e:
            self._mark_down(server, f"{e} (start-up check)", 0)

    def _check_settings(self, url: str) -> None:
        timeout = self.cfg.request_timeout_s
        if self.cfg.sglang.deterministic_inference:
            info = get_json(url, "/server_info", timeout) or get_json(url, "/get_server_info", timeout)
            if protocol.server_arg(info, "enable_deterministic_inference") is not True:
                raise RolloutError(
                    f"{url} does not report enable_deterministic_inference in /server_info, so SGLang ignores "
                    "the per-row sampling_seed that rollout.sglang.deterministic_inference=true relies on. Fix: "
                    "start it with --enable-deterministic-inference, or set rollout.sglang.deterministic_inference=false."
                )
        check_logprob_convention(url, timeout)

    # -- server state -------------------------------------------------------------------------------
    def _usable(self) -> list[Server]:
        return [sv for sv in self.servers if sv.up and not sv.retired and not sv.stale]

    def _mark_down(self, server: Server, error: str, sequences: int) -> None:
        server.up = False
        self.failures.append(ServerFailure(server.url, error, sequences, time.time()))
        others = [sv.url for sv in self._usable()]
        logger.warning(
            "rollout server %s failed (%s); its request of %d prompts goes to %s",
            server.url,
            error,
            sequences,
            ", ".join(others) or "a revived or restarted server (if any)",
        )
        if server.process is not None:
            self._restart_in_background(server)

    def _restart_in_background(self, server: Server) -> None:
        if server.restarting or server.retired:
            return
        if server.restarts >= self.cfg.sglang.max_restarts:
            server.retired = True
            logger.error(
                "rollout server %s failed after %d restart(s) (rollout.sglang.max_restarts): dropped",
                server.url,
                server.restarts,
            )
            return
        server.restarting = True
        thread = threading.Thread(target=self._restart, args=(server,), name=f"restart {server.url}", daemon=True)
        self._restart_threads.append(thread)
        thread.start()

    def _restart(self, server: Server) -> None:
        """Relaunch a launched server on the latest weights on disk (the base model before any update)."""
        assert self.processes is not None and server.process is not None
        version = self.weight_version
        model = str(self._weights_dir or self.model_dir)
        try:
            self.processes.restart(server.process, self.cfg.sglang.startup_timeout_s, model_path=model)
        except Exception as e:  # any failure to come back drops the server, reported
            self.processes.kill(server.process)
            server.retired = True
            self.failures.append(ServerFailure(server.url, f"restart failed: {e}", 0, time.time()))
            logger.error("rollout server %s did not come back (%s): dropped", server.url, e)
        else:
            server.restarts += 1
            server.released = set()  # a fresh process holds all its memory
            server.stale = version > 0 and self._weights_dir is None  # distributed sync: base weights
            server.up = True
            logger.warning(
                "rollout server %s restarted on %s%s",
                server.url,
                model,
                " (base weights: idle until the next weight update)" if server.stale else "",
            )
        finally:
            server.restarting = False

    def wait_for_restarts(self) -> None:
        """Block until every restart in progress has ended (each is bounded by ``startup_timeout_s``)."""
        while self._restart_threads:
            self._restart_threads.pop().join()

    def server_stats(self) -> dict[str, float]:
        return {
            "rollout/server_failures": float(len(self.failures)),
            "rollout/server_restarts": float(sum(sv.restarts for sv in self.servers)),
            "rollout/servers_up": float(len(self._usable())),
        }

    def _probe(self, servers: list[Server]) -> None:
        """Ask ``servers`` for ``GET /health`` (at once); mark them up or (with a recorded failure) down."""
        if not servers:
            return
        with ThreadPoolExecutor(len(servers)) as pool:
            answers = list(pool.map(lambda sv: healthy(sv.url, self.cfg.sglang.health_timeout_s), servers))
        for sv, ok in zip(servers, answers):
            if ok and not sv.up:
                logger.info("rollout server %s answers /health again", sv.url)
            elif not ok and sv.up:
                self.failures.append(ServerFailure(sv.url, "GET /health failed", 0, time.time()))
            sv.up = ok

    def _revive(self) -> None:
        """Probe the attached servers that are down (launched ones come back by restarting)."""
        self._probe([sv for sv in self.servers if not sv.up and not sv.retired and sv.process is None])

    def _pick(self) -> Server | None:
        free = [sv for sv in self._usable() if sv.inflight < self.cfg.sglang.concurrency_per_server]
        return min(free, key=lambda sv: (sv.inflight, sv.assigned)) if free else None

    def _failure_report(self) -> str:
        return "; ".join(f"{f.url}: {f.error}" for f in self.failures[-2 * len(self.servers) :])

    # -- generation ----------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        seeds = row_seeds(sampling, len(prompts), self._rng)
        if self.stop_token_ids:
            stops = tuple(sorted(set(sampling.stop_token_ids) | set(self.stop_token_ids)))
            sampling = dataclasses.replace(sampling, stop_token_ids=stops)
        bs = self.cfg.batch_size
        queue = collections.deque(_Job(list(range(i, min(i + bs, len(prompts))))) for i in range(0, len(prompts), bs))
        results: list[Completion | None] = [None] * len(prompts)
        self._revive()
        pool = ThreadPoolExecutor(max_workers=len(self.servers) * self.cfg.sglang.concurrency_per_server)
        inflight: dict[Future, tuple[_Job, Server]] = {}
        try:
            while queue or inflight:
                self._dispatch(queue, inflight, pool, prompts, sampling, seeds)
                if not inflight:  # backing off, or waiting for a restart
                    time.sleep(max(0.05, min(j.not_before for j in queue) - time.monotonic()))
                    continue
                done, _ = wait(list(inflight), timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    job, server = inflight.pop(fut)
                    server.inflight -= 1
                    try:
                        completions = fut.result()
                    except RetryableError as e:
                        self._mark_down(server, str(e), len(job.rows))
                        job.attempts += 1
                        if job.attempts > self.cfg.max_retries:
                            raise RolloutError(
                                f"a request of {len(job.rows)} prompts failed {job.attempts} times; server failures: "
                                f"{self._failure_report()}. Fix: check the servers' logs, raise rollout.max_retries "
                                "or rollout.request_timeout_s."
                            ) from e
                        job.not_before = time.monotonic() + self.cfg.retry_backoff_s * 2 ** (job.attempts - 1)
                        queue.append(job)
                    except (RequestError, protocol.ProtocolError) as e:
                        raise RolloutError(f"{server.url} refused a /generate request: {e}") from e
                    else:
                        server.completed += 1
                        for i, c in zip(job.rows, completions):
                            results[i] = c
        finally:
            for _job, server in inflight.values():
                server.inflight -= 1
            pool.shutdown(wait=False, cancel_futures=True)
        return results  # type: ignore[return-value]

    def _dispatch(
        self,
        queue: collections.deque[_Job],
        inflight: dict[Future, tuple[_Job, Server]],
        pool: ThreadPoolExecutor,
        prompts: list[list[int]],
        sampling: SamplingParams,
        seeds: list[int],
    ) -> None:
        now = time.monotonic()
        for _ in range(len(queue)):
            job = queue.popleft()
            if job.not_before > now:
                queue.append(job)
                continue
            server = self._pick()
            if server is None and not self._usable():
                self._revive()
                server = self._pick()
                if server is None and not self._usable():
                    if any(sv.restarting for sv in self.servers):
                        queue.appendleft(job)
                        return
                    raise RolloutError(self._all_down_message())
            if server is None:  # every server is at its concurrency limit
                queue.appendleft(job)
                return
            server.inflight += 1
            server.assigned += 1
            fut = pool.submit(
                self._request, server.url, [prompts[i] for i in job.rows], sampling, [seeds[i] for i in job.rows]
            )
            inflight[fut] = (job, server)

    def _all_down_message(self) -> str:
        stale = [sv.url for sv in self.servers if sv.stale and not sv.retired]
        msg = f"no rollout server of {len(self.servers)} can serve: {self._failure_report()}."
        if stale:
            msg += (
                f" Restarted on the base weights, waiting for the next weight update: {stale}."
                " Fix: use rollout.sglang.weight_sync=disk (restarts load the latest weights) or more servers."
            )
        return msg + " Fix: check the servers' logs (rollout.sglang.log_dir)."

    def _request(
        self, url: str, prompts: list[list[int]], sampling: SamplingParams, seeds: list[int]
    ) -> list[Completion]:
        body = post_json(url, "/generate", protocol.generate_body(prompts, sampling, seeds), self.cfg.request_timeout_s)
        try:
            return protocol.parse_generate_response(body, prompts)
        except protocol.ProtocolError as e:
            raise RetryableError(f"bad /generate answer: {e}") from e

    # -- weights ---------------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send new weights (HF names) to every server; servers that miss the update are retired.
        Restarts in progress are waited for first (they load the latest weights)."""
        out = self.weights_dir()
        if out is None:
            self._local_sender.set_tensors(named_tensors)
            try:
                self.update_weights_from_sender(self._local_sender)
            finally:
                self._local_sender.set_tensors([])
            return
        write_hf_weights(named_tensors, out, self.model_dir)
        self.update_weights_from_dir(out)

    def weights_dir(self) -> str | None:
        """Disk sync: a fresh directory under ``sglang.weight_sync_dir`` for the next weights (the
        trainer may write them there itself, then call :meth:`update_weights_from_dir`)."""
        if self.cfg.sglang.weight_sync != "disk":
            return None
        return new_weights_dir(self.cfg.sglang.weight_sync_dir, f"opd_weights_v{self.weight_version + 1}_")

    def update_weights_from_dir(self, path: str) -> None:
        """``/update_weights_from_disk`` of the HF directory ``path`` on every server. The engine
        owns ``path`` from here: it is removed, or kept as the latest weights for restarts."""
        try:
            self._update(lambda version, servers: self._post_from_disk(Path(path), version, servers))
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise

    def _update(self, send: Callable[[str, list[Server]], None]) -> None:
        """Bump the weight version, retire attached servers that are down, ``send`` to the rest."""
        self.wait_for_restarts()
        self.weight_version += 1
        version = str(self.weight_version)
        for sv in self.servers:
            if not sv.up and not sv.retired:
                sv.retired = True
                logger.error("rollout server %s is down during weight update %s: retired", sv.url, version)
        servers = [sv for sv in self.servers if sv.up and not sv.retired]  # stale ones catch up here
        if not servers:
            raise RolloutError(f"no rollout server is up to receive weights: {self._failure_report()}.")
        send(version, servers)
        for sv in servers:
            sv.stale = False

    def _post_from_disk(self, out: Path, version: str, servers: list[Server]) -> None:
        body = protocol.update_weights_from_disk_body(str(out), version)
        errors = self._post_all({sv: body for sv in servers}, "/update_weights_from_disk")
        for sv, err in errors.items():
            sv.retired = True
            self.failures.append(ServerFailure(sv.url, f"weight update {version}: {err}", 0, time.time()))
            logger.error("rollout server %s failed weight update %s (%s): retired", sv.url, version, err)
        if len(errors) == len(servers):
            raise RolloutError(f"weight update {version} failed on every server: {self._failure_report()}")
        if self.processes is not None:  # kept for restarts; the previous one is no longer needed
            out, self._weights_dir = self._weights_dir, out  # type: ignore[assignment]
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)

    def _post_all(self, bodies: dict[Server, dict[str, Any]], path: str, *, confirms: bool = True) -> dict[Server, str]:
        """POST each server its body, all at once; the servers that failed, with their errors.
        ``confirms``: the answer must say ``"success": true`` (weight updates); SGLang's memory
        endpoints answer ``null`` and fail only with an HTTP error."""
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = {
                sv: pool.submit(post_json, sv.url, path, body, self.cfg.request_timeout_s)
                for sv, body in bodies.items()
            }
        errors = {}
        for sv, fut in futures.items():
            try:
                answer = fut.result()
                if confirms and not (isinstance(answer, dict) and answer.get("success")):
                    errors[sv] = answer.get("message", "success=false") if isinstance(answer, dict) else repr(answer)
            except (RetryableError, RequestError) as e:
                errors[sv] = str(e)
        return errors

    def update_weights_from_sender(self, sender: WeightSender) -> None:
        """Distributed sync with ``sender`` as rank 0 of the group: it hosts the group's TCP store on
        its node and broadcasts its tensors, this process announces them to the servers."""
        self._update(lambda version, servers: self._update_distributed(sender, version, servers))

    def _update_distributed(self, sender: WeightSender, version: str, servers: list[Server]) -> None:
        """Broadcast over the group of ``sender`` and ``servers``; a group whose members changed (a
        server dropped, or restarted and so out of the old group; another sender) is rebuilt first."""
        s = self.cfg.sglang
        urls = [sv.url for sv in servers]
        if self._dist is not None and (
            self._dist.urls != urls or self._dist.sender != sender or any(sv.stale for sv in servers)
        ):
            logger.warning("rebuilding the weight update group over %s", urls)
            self._destroy_group()
        if self._dist is None:
            self._dist = DistributedWeightSync(
                urls,
                [self.gpus_per_server[self.servers.index(sv)] for sv in servers],
                post_json,
                sender,
                master_address=s.weight_sync_master_addr,
                master_port=s.weight_sync_master_port,
                backend=s.weight_sync_backend,
                bucket_mb=self.cfg.weight_sync_bucket_mb,
                timeout_s=self.cfg.request_timeout_s,
            )
        self._post_checked(servers, "/begin_weight_update", protocol.begin_weight_update_body(), version)
        try:
            self._dist.update(version)
        finally:
            self._post_checked(servers, "/end_weight_update", {}, version)

    def _post_checked(self, servers: list[Server], path: str, body: dict[str, Any], version: str) -> None:
        """POST to every server of a weight update; any failure fails the update."""
        errors = self._post_all({sv: body for sv in servers}, path)
        if errors:
            raise RolloutError(
                f"weight update {version}: {path} failed on "
                + "; ".join(f"{sv.url}: {err}" for sv, err in errors.items())
            )

    def _destroy_group(self) -> None:
        if self._dist is None:
            return
        try:
            self._dist.destroy()
        except Exception as e:  # a member that died or restarted no longer knows the group
            logger.warning("destroying the weight update group: %s", e)
        self._dist = None

    # -- memory -------------------------------------------------------------------------------------------
    def release_memory(self) -> None:
        """``/release_memory_occupation`` of every region (:data:`MEMORY_TAGS`, SGLang's
        ``GPU_MEMORY_ALL_TYPES``) on every server in use that holds them; called between rollouts,
        when no request is in flight (SGLang asserts an idle server). Servers need
        ``--enable-memory-saver`` (added to launched servers when ``rollout.offload_when_idle``)."""
        self._memory("/release_memory_occupation", MEMORY_TAGS)

    def resume_memory(self, tags: tuple[str, ...] | None = None) -> None:
        """``/resume_memory_occupation`` of the regions of ``tags`` (``None``: all) that each server
        has released, named explicitly: SGLang expands ``null`` to every region and crashes on one
        that is not released (a weight sync resumes ``weights`` first, the next rollout the rest)."""
        self._memory("/resume_memory_occupation", MEMORY_TAGS if tags is None else tags)

    def _memory(self, path: str, tags: tuple[str, ...]) -> None:
        """Release ``tags`` where they are held, or resume them where they are released, on every
        server in use. A server that fails is marked down (a launched one restarts: awake, on the
        latest weights)."""
        self.wait_for_restarts()
        release = path == "/release_memory_occupation"
        bodies = {}
        for sv in self.servers:
            regions = [t for t in MEMORY_TAGS if t in tags and (t in sv.released) != release]
            if sv.up and not sv.retired and regions:
                bodies[sv] = protocol.memory_occupation_body(regions)
        if not bodies:
            return
        errors = self._post_all(bodies, path, confirms=False)
        for sv, body in bodies.items():
            if sv in errors:
                self._mark_down(sv, f"{path}: {errors[sv]}", 0)
            else:
                changed = set(body["tags"])
                sv.released = sv.released | changed if release else sv.released - changed
        if len(errors) == len(bodies):
            raise RolloutError(
                f"{path} failed on every rollout server: {self._failure_report()}. Fix: launch SGLang with "
                "--enable-memory-saver (rollout.sglang.extra_args), or set rollout.offload_when_idle=false."
            )

    def abort(self) -> None:
        """``/abort_request`` with ``abort_all`` on every server in use: the generations running there return
        their tokens so far (``finish_reason="abort"``). A server that cannot be reached is left to the retries
        of the request it runs."""
        in_use = [sv for sv in self.servers if sv.up and not sv.retired]
        if in_use:
            errors = self._post_all({sv: {"abort_all": True} for sv in in_use}, "/abort_request", confirms=False)
            for sv, err in errors.items():
                logger.warning("rollout server %s did not take /abort_request: %s", sv.url, err)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def health(self) -> bool:
        """True when every server still in use answers ``GET /health``."""
        in_use = [sv for sv in self.servers if not sv.retired]
        return bool(in_use) and all(healthy(sv.url, self.cfg.sglang.health_timeout_s) for sv in in_use)

    def shutdown(self) -> None:
        """Tear down the weight-update group, stop the servers launched here, remove kept weights
        (the servers are stopped even when the teardown fails)."""
        try:
            self.wait_for_restarts()
            self._destroy_group()
        finally:
            if self.processes is not None:
                self.processes.stop()
                self.processes = None
            if self._weights_dir is not None:
                shutil.rmtree(self._weights_dir, ignore_errors=True)
                self._weights_dir = None
