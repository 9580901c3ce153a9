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

Weights. ``update_weights`` writes HF safetensors and calls ``/update_weights_from_disk`` on every
server (``sglang.weight_sync=disk``), or broadcasts over a process group announced with
``/init_weights_update_group`` + ``/update_weights_from_distributed`` (``distributed``): from this
process, or with ``update_weights_from_sender`` from another (the trainer's student rank 0). An
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
import tempfile
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
from megatron_opd.rollout.sglang import protocol
from megatron_opd.rollout.sglang.launcher import ServerProcesses, check_gpus, sglang_server_commands
from megatron_opd.rollout.sglang.weight_sync import DistributedWeightSync, LocalWeightSender, WeightSender

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0


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


def healthy(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    try:
        return requests.get(url + "/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


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
        processes: ServerProcesses | None = None,
    ) -> None:
        """``processes``: servers already started for ``model_dir``, handed over to the engine
        (restarted on failure, stopped at shutdown) instead of launching ``sglang.num_servers``."""
        self.cfg, self.model_dir = cfg, str(model_dir)
        self.stop_token_ids = tuple(eos_token_ids)  # sent with every request besides the sampling's own
        s = cfg.sglang
        self.processes = processes
        if self.processes is None and not s.urls:
            check_gpus(s)
            commands = sglang_server_commands(s, self.model_dir, seed=cfg.seed, memory_saver=cfg.offload_when_idle)
            self.processes = ServerProcesses(commands, s.log_dir).start(s.startup_timeout_s)
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
        """Ask ``servers`` for ``GET /health``; mark them up or (with a recorded failure) down."""
        timeout = min(HEALTH_TIMEOUT_S, self.cfg.request_timeout_s)
        for sv in servers:
            ok = healthy(sv.url, timeout)
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
        try:
            from megatron_opd.convert.export import save_hf_checkpoint
            from megatron_opd.convert.hf_io import load_hf_config

            config = load_hf_config(self.model_dir)
            save_hf_checkpoint(named_tensors, out, config, tokenizer_dir=self.model_dir, overwrite=True)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        self.update_weights_from_dir(out)

    def weights_dir(self) -> str | None:
        """Disk sync: a fresh directory under ``sglang.weight_sync_dir`` for the next weights (the
        trainer may write them there itself, then call :meth:`update_weights_from_dir`)."""
        if self.cfg.sglang.weight_sync != "disk":
            return None
        root = self.cfg.sglang.weight_sync_dir
        base = Path(root) if root else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"opd_weights_v{self.weight_version + 1}_", dir=base)

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
        errors = self._post_all(servers, "/update_weights_from_disk", body)
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

    def _post_all(
        self, servers: list[Server], path: str, body: dict[str, Any], *, confirms: bool = True
    ) -> dict[Server, str]:
        """POST ``body`` to every server at once; the servers that failed, with their errors.
        ``confirms``: the answer must say ``"success": true`` (weight updates); SGLang's memory
        endpoints answer ``null`` and fail only with an HTTP error."""
        with ThreadPoolExecutor(len(servers)) as pool:
            futures = {sv: pool.submit(post_json, sv.url, path, body, self.cfg.request_timeout_s) for sv in servers}
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
        self._dist.update(version)

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
        """``/release_memory_occupation`` (every region) on every server in use. Servers need
        ``--enable-memory-saver`` (added to launched servers when ``rollout.offload_when_idle``)."""
        self._memory("/release_memory_occupation", None)

    def resume_memory(self, tags: tuple[str, ...] | None = None) -> None:
        self._memory("/resume_memory_occupation", tags)

    def _memory(self, path: str, tags: tuple[str, ...] | None) -> None:
        """Release (``tags=None``) on every server in use, or resume ``tags`` where they were released.
        A server that fails is marked down (a launched one restarts: awake, on the latest weights)."""
        self.wait_for_restarts()
        release = path == "/release_memory_occupation"
        wanted = set(MEMORY_TAGS if tags is None else tags)
        servers = [sv for sv in self.servers if sv.up and not sv.retired and (release or sv.released & wanted)]
        if not servers:
            return
        errors = self._post_all(servers, path, protocol.memory_occupation_body(tags), confirms=False)
        for sv in servers:
            if sv in errors:
                self._mark_down(sv, f"{path}: {errors[sv]}", 0)
            else:
                sv.released = sv.released | wanted if release else sv.released - wanted
        if len(errors) == len(servers):
            raise RolloutError(
                f"{path} failed on every rollout server: {self._failure_report()}. Fix: launch SGLang with "
                "--enable-memory-saver (rollout.sglang.extra_args), or set rollout.offload_when_idle=false."
            )

    # -- lifecycle ----------------------------------------------------------------------------------------
    def health(self) -> bool:
        """True when every server still in use answers ``GET /health``."""
        in_use = [sv for sv in self.servers if not sv.retired]
        return bool(in_use) and all(healthy(sv.url) for sv in in_use)

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
