"""``opd serve --model HF_DIR --port P``: the ``hf`` engine behind SGLang's native HTTP API.

It lets the ``sglang`` client path (batching over servers, retries, weight sync, memory release)
run end to end on machines where SGLang cannot be installed, and it behaves as SGLang 0.5.23 does
wherever the project depends on it (docs/rollout.md lists each behaviour with its source).
Endpoints (schemas in :mod:`megatron_opd.rollout.sglang.protocol`):

- ``GET /health``, ``GET /health_generate``: generate one token (SGLang's default, see
  :class:`ServerFlags`), 503 when the engine stays busy with a weight update longer than the health
  timeout; a server busy generating is healthy at once (SGLang skips the check then).
- ``GET /model_info`` (``/get_model_info``), ``GET /server_info`` (``/get_server_info``),
  ``GET /get_weight_version``, ``GET|POST /flush_cache`` (no cache: 200).
- ``POST|PUT /generate``: input ids (or text, when the model directory has a tokenizer), batched.
  ``sampling_seed`` is honoured only with ``--enable-deterministic-inference`` (rows without one
  then use 42); otherwise every row draws from the server's generator. Log-probs are
  ``log_softmax(logits / T)`` before truncation, at temperature 1 under ``SGLANG_RETURN_ORIGINAL_LOGPROB``.
- ``POST /abort_request`` (``{"abort_all": true}``, or ``{"rid": ...}`` of a running request): the running
  generation stops after its current decoding step; its unfinished rows answer with the tokens sampled so far
  and ``finish_reason`` ``{"type": "abort"}`` (how ``rollout.partial`` resumes them after a weight update).
- ``POST /update_weights_from_disk``: load HF safetensors from ``model_path`` in place.
- ``POST /init_weights_update_group``, ``/begin_weight_update``, ``/update_weights_from_distributed``
  (only inside a begin/end session), ``/end_weight_update``, ``/destroy_weights_update_group``:
  weights broadcast from the trainer (any torch backend; gloo on CPU). This server has one rank:
  ``rank_offset``.
- ``POST /release_memory_occupation``, ``/resume_memory_occupation`` (``tags``: ``kv_cache``,
  ``weights``, ``cuda_graph``; null or empty: all three): as SGLang with ``--enable-memory-saver``
  and no CPU backup, released weights lose their values (they come back as zeros) and must be
  updated after resuming; while anything is released, ``/generate`` is refused, and while the
  weights are, so are updates. Releasing while a generation runs or waits, or resuming a region
  that is not released, crashes SGLang's scheduler: this server then answers 500 and exits (code 1).

Generation requests are served one at a time (the engine batches the prompts inside a request).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch

from megatron_opd.rollout.base import MAX_SEED, MEMORY_TAGS, RolloutError, SamplingParams
from megatron_opd.rollout.hf_engine import HFEngine, RowRequest
from megatron_opd.rollout.sglang import protocol

logger = logging.getLogger(__name__)

DETERMINISTIC_DEFAULT_SEED = 42  # sampling_batch_info.py: rows without a sampling_seed in deterministic mode
HEALTH_INPUT_IDS = [0]  # http_server.py health_generate: GenerateReqInput(input_ids=[0], max_new_tokens=1)


def _env_bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    """SGLang's reading of a boolean environment variable (``true``/``1``, case-insensitive)."""
    value = environ.get(name)
    return default if value is None else value.lower() in ("true", "1", "yes", "y")


@dataclasses.dataclass(frozen=True)
class ServerFlags:
    """The SGLang server settings ``opd serve`` reproduces (flags, then environment variables)."""

    deterministic_inference: bool = False  # --enable-deterministic-inference: honour sampling_seed
    original_logprobs: bool = False  # SGLANG_RETURN_ORIGINAL_LOGPROB: temperature-1 log-probs
    health_generation: bool = True  # SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION: /health generates too
    health_timeout_s: float = 20.0  # SGLANG_HEALTH_CHECK_TIMEOUT

    @classmethod
    def from_env(cls, deterministic_inference: bool, environ: Mapping[str, str] = os.environ) -> ServerFlags:
        return cls(
            deterministic_inference=deterministic_inference,
            original_logprobs=_env_bool(environ, "SGLANG_RETURN_ORIGINAL_LOGPROB", False),
            health_generation=_env_bool(environ, "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", True),
            health_timeout_s=float(environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", 20)),
        )


class SchedulerCrash(RuntimeError):
    """What kills SGLang's scheduler process (and with it the server)."""


class ServerState:
    """The engine, its weight version, the tokenizer (if any), the weight-update groups and session,
    and the released memory regions."""

    def __init__(self, engine: HFEngine, model_dir: str, seed: int, flags: ServerFlags | None = None) -> None:
        self.engine, self.model_dir = engine, model_dir
        self.flags = flags or ServerFlags()
        self.seed = seed
        self.weight_version = "default"
        self.tokenizer = self._load_tokenizer(model_dir)
        self.groups: dict[str, Any] = {}
        self.session_open = False  # between /begin_weight_update and /end_weight_update
        self.released: set[str] = set()
        self._weight_shapes: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self._work = threading.Lock()  # one generation or weight change at a time
        self._generations = 0  # /generate requests running or waiting
        self._count_lock = threading.Lock()
        self._running_rids: set[str] = set()  # request ids of the generation running now

    @staticmethod
    def _load_tokenizer(model_dir: str) -> Any:
        from megatron_opd.data.tokenizer import TokenizerError, load_tokenizer

        try:
            return load_tokenizer(model_dir)
        except TokenizerError:
            logger.info("%s has no tokenizer: /generate takes input_ids only and returns no text", model_dir)
            return None

    # -- generation -----------------------------------------------------------------------------
    def generate(self, body: Any) -> Any:
        req = protocol.parse_generate_request(body, self.engine.vocab_size)
        if req.prompts is None:
            if self.tokenizer is None:
                raise protocol.ProtocolError("this model directory has no tokenizer; send input_ids instead of text.")
            req.prompts = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in req.texts or []]
        seeds = self._row_seeds(req.seeds)
        rids = [rid or uuid.uuid4().hex for rid in req.rids]
        with self._count_lock:
            self._generations += 1
        try:
            with self._work:
                self._check_not_released()
                start = time.perf_counter()
                with self._count_lock:
                    self._running_rids = set(rids)
                try:
                    outputs = self.engine.generate_rows(
                        [RowRequest(p, sp, s) for p, sp, s in zip(req.prompts, req.sampling, seeds)],
                        original_logprobs=self.flags.original_logprobs,
                    )
                finally:
                    with self._count_lock:
                        self._running_rids = set()
        finally:
            with self._count_lock:
                self._generations -= 1
        latency = time.perf_counter() - start
        items = [
            protocol.generate_response_item(
                out.completion,
                rid=rid,
                matched=out.matched_stop,
                last_prompt_logprob=out.last_prompt_logprob,
                return_logprob=want_lp,
                weight_version=self.weight_version,
                latency_s=latency,
                text=None if self.tokenizer is None else self.tokenizer.decode(out.completion.token_ids),
            )
            for out, rid, want_lp in zip(outputs, rids, req.return_logprob)
        ]
        return items if req.batched else items[0]

    def abort(self, body: dict[str, Any]) -> None:
        """SGLang's ``/abort_request``: with ``abort_all``, or the ``rid`` of a row of the running generation,
        that generation stops after its current decoding step (this server runs one at a time). Requests waiting
        for their turn are not aborted; an unknown rid is ignored, as SGLang does."""
        rid = body.get("rid") or ""
        with self._count_lock:
            if self._running_rids and (body.get("abort_all") or rid in self._running_rids):
                self.engine.abort()

    def _row_seeds(self, requested: list[int | None]) -> list[int]:
        """The requests' ``sampling_seed`` under ``--enable-deterministic-inference``; otherwise
        ignored, as SGLang ignores it: every row draws from the server's generator."""
        if self.flags.deterministic_inference:
            return [DETERMINISTIC_DEFAULT_SEED if s is None else s for s in requested]
        with self._rng_lock:
            return [int(self._rng.integers(0, MAX_SEED)) for _ in requested]

    def _check_not_released(self) -> None:
        if self.released:
            raise protocol.ProtocolError(
                f"memory {sorted(self.released)} is released; call /resume_memory_occupation first."
            )

    def healthy(self, path: str) -> bool:
        """SGLang's ``/health`` (= ``/health_generate`` by default): generate one token within the
        health timeout; a server already generating is healthy (its requests carry the answer)."""
        if path == "/health" and not self.flags.health_generation:
            return True
        if self._generations > 0:
            return True
        if not self._work.acquire(timeout=self.flags.health_timeout_s):
            logger.error("Health check failed: the engine stayed busy for %s s", self.flags.health_timeout_s)
            return False
        try:
            if self.released:
                return False
            greedy = SamplingParams(temperature=0.0, max_new_tokens=1)
            self.engine.generate_rows([RowRequest(HEALTH_INPUT_IDS, greedy, 0)])
            return True
        finally:
            self._work.release()

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_dir,
            "tokenizer_path": self.model_dir if self.tokenizer is not None else None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
        }

    def server_info(self) -> dict[str, Any]:
        """The resolved server arguments a client may check (SGLang's ``/server_info`` has all of them)."""
        return {
            "model_path": self.model_dir,
            "random_seed": self.seed,
            "enable_deterministic_inference": self.flags.deterministic_inference,
            "enable_memory_saver": True,
            "version": "opd-serve",
        }

    # -- memory ---------------------------------------------------------------------------------
    def release_memory(self, body: dict[str, Any]) -> None:
        """SGLang's ``release_memory_occupation``: asserts an idle server, then frees the regions."""
        tags = _memory_tags(body)
        if self._generations > 0:
            raise SchedulerCrash("AssertionError: release_memory_occupation should be called only when server is idle.")
        with self._work:
            if "weights" in tags and "weights" not in self.released:
                for name, param in self.engine.model.named_parameters():  # tied weights appear once
                    self._weight_shapes[name] = (param.shape, param.dtype, param.device)
                    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            self.released |= set(tags)

    def resume_memory(self, body: dict[str, Any]) -> None:
        """SGLang's ``resume_memory_occupation``: ``offload_tags.remove(tag)`` for each tag, so a
        region that is not released raises ``KeyError`` in the scheduler."""
        tags = _memory_tags(body)
        with self._work:
            for tag in tags:
                if tag not in self.released:
                    raise SchedulerCrash(f"KeyError: {tag!r} (resume_memory_occupation of a region not released)")
                self.released.discard(tag)
            if "weights" in tags:
                for name, param in self.engine.model.named_parameters():
                    shape, dtype, device = self._weight_shapes[name]
                    param.data = torch.zeros(shape, dtype=dtype, device=device)  # the values are gone

    # -- weights --------------------------------------------------------------------------------
    def _check_weights_held(self) -> None:
        if "weights" in self.released:
            raise protocol.ProtocolError("the weights are released; call /resume_memory_occupation first.")

    def update_from_disk(self, body: dict[str, Any]) -> dict[str, Any]:
        path = _field(body, "model_path", str)
        with self._work:
            self._check_weights_held()
            self.engine.update_weights_from_dir(path)
        return self._updated(body, f"Succeeded to update model weights from {path}.")

    def init_group(self, body: dict[str, Any]) -> dict[str, Any]:
        from megatron_opd.rollout.weight_group import init_weight_update_group

        name = body.get("group_name") or protocol.DEFAULT_GROUP_NAME
        if name in self.groups:
            raise protocol.ProtocolError(f"weight update group {name!r} exists; destroy it first.")
        self.groups[name] = init_weight_update_group(
            _field(body, "master_address", str),
            _field(body, "master_port", int),
            _field(body, "rank_offset", int),
            _field(body, "world_size", int),
            name,
            body.get("backend") or "nccl",
        )
        return {"success": True, "message": f"Succeeded to initialize weight update group {name}."}

    def begin_weight_update(self) -> dict[str, Any]:
        if self.session_open:
            raise protocol.ProtocolError("a weight-update session is already open; call end_weight_update() first")
        self.session_open = True
        return {"success": True, "message": "Success"}

    def end_weight_update(self) -> dict[str, Any]:
        if not self.session_open:
            raise protocol.ProtocolError("no weight-update session is open; call begin_weight_update() first")
        self.session_open = False
        return {"success": True, "message": "Success"}

    def update_from_distributed(self, body: dict[str, Any]) -> dict[str, Any]:
        from megatron_opd.rollout.weight_group import receive_weights

        if not self.session_open:  # checked first, as SGLang's scheduler does
            raise protocol.ProtocolError(
                "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
            )
        group = self._group(body)
        with self._work:
            self._check_weights_held()
            tensors = receive_weights(
                group,
                _field(body, "names", list),
                _field(body, "dtypes", list),
                _field(body, "shapes", list),
                self.engine.device,
            )
            self.engine.update_weights(tensors)
        return self._updated(body, "Succeeded to update parameter online.")

    def destroy_group(self, body: dict[str, Any]) -> dict[str, Any]:
        from megatron_opd.rollout.weight_group import destroy_weight_update_group

        group = self._group(body)
        self.groups = {k: v for k, v in self.groups.items() if v is not group}
        destroy_weight_update_group(group)
        return {"success": True, "message": "Succeeded to destroy the weight update group."}

    def _group(self, body: dict[str, Any]) -> Any:
        name = body.get("group_name") or protocol.DEFAULT_GROUP_NAME
        if name not in self.groups:
            raise protocol.ProtocolError(f"no weight update group {name!r}; call /init_weights_update_group first.")
        return self.groups[name]

    def _updated(self, body: dict[str, Any], message: str) -> dict[str, Any]:
        version = body.get("weight_version")
        if version is not None:
            self.weight_version = str(version)
            message += f" Weight version updated to {version}."
        return {"success": True, "message": message}


def _memory_tags(body: dict[str, Any]) -> list[str]:
    """The request's regions; ``null`` or ``[]`` is every region (SGLang's ``GPU_MEMORY_ALL_TYPES``)."""
    tags = body.get("tags")
    if not tags:
        return list(MEMORY_TAGS)
    if not isinstance(tags, list) or not set(tags) <= set(MEMORY_TAGS):
        raise protocol.ProtocolError(f"tags must be null or a list of {list(MEMORY_TAGS)}, got {tags!r}.")
    return list(tags)


def _field(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise protocol.ProtocolError(f"field {key!r} must be a {kind.__name__}, got {value!r}.")
    return value


_SUCCESS_SHAPED = ("/update_weights", "/init_weights", "/destroy_weights", "/begin_weight", "/end_weight")


class Handler(BaseHTTPRequestHandler):
    server: OPDServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: route to debug logging
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, payload: Any = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise protocol.ProtocolError(f"the body is not JSON ({e.msg}).") from e

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        if path in ("/health", "/health_generate"):
            self._send(HTTPStatus.OK if state.healthy(path) else HTTPStatus.SERVICE_UNAVAILABLE)
            return
        routes = {
            "/model_info": state.model_info,
            "/get_model_info": state.model_info,
            "/server_info": state.server_info,
            "/get_server_info": state.server_info,
            "/get_weight_version": lambda: {"weight_version": state.weight_version},
            "/flush_cache": lambda: None,
        }
        self._dispatch(routes)

    def do_POST(self) -> None:
        state = self.server.state
        routes = {
            "/generate": lambda: state.generate(self._body()),
            "/abort_request": lambda: state.abort(self._json_object()),
            "/update_weights_from_disk": lambda: state.update_from_disk(self._json_object()),
            "/init_weights_update_group": lambda: state.init_group(self._json_object()),
            "/begin_weight_update": state.begin_weight_update,
            "/end_weight_update": state.end_weight_update,
            "/update_weights_from_distributed": lambda: state.update_from_distributed(self._json_object()),
            "/destroy_weights_update_group": lambda: state.destroy_group(self._json_object()),
            "/release_memory_occupation": lambda: state.release_memory(self._json_object()),
            "/resume_memory_occupation": lambda: state.resume_memory(self._json_object()),
            "/flush_cache": lambda: None,
        }
        self._dispatch(routes)

    do_PUT = do_POST

    def _json_object(self) -> dict[str, Any]:
        body = self._body()
        if not isinstance(body, dict):
            raise protocol.ProtocolError("the body must be a JSON object.")
        return body

    def _dispatch(self, routes: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0]
        if path not in routes:
            self._send(HTTPStatus.NOT_FOUND, {"error": {"message": f"no endpoint {self.command} {path}"}})
            return
        success_shaped = path.startswith(_SUCCESS_SHAPED)
        try:
            self._send(HTTPStatus.OK, routes[path]())
        except SchedulerCrash as e:
            logger.error("Scheduler hit an exception: %s", e)
            self.server.crash(str(e))  # stops accepting; this answer still goes out
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {"message": f"the scheduler crashed: {e}"}})
        except (protocol.ProtocolError, ValueError, RolloutError) as e:
            payload = {"success": False, "message": str(e)} if success_shaped else {"error": {"message": str(e)}}
            self._send(HTTPStatus.BAD_REQUEST, payload)
        except Exception as e:
            logger.exception("%s %s failed", self.command, path)
            payload = {"success": False, "message": repr(e)} if success_shaped else {"error": {"message": repr(e)}}
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, payload)


class OPDServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: ServerState) -> None:
        super().__init__(address, Handler)
        self.state = state
        self.crashed: str | None = None  # why the server went down, as SGLang's would

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def crash(self, reason: str) -> None:
        """Stop serving and close the socket (``serve_forever`` returns; ``opd serve`` exits with code 1)."""
        self.crashed = reason

        def stop() -> None:
            self.shutdown()
            self.server_close()

        threading.Thread(target=stop, daemon=True).start()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="opd serve", description="Serve an HF model behind SGLang's HTTP API.")
    parser.add_argument(
        "--model", "--model-path", dest="model", required=True, help="local Hugging Face model directory"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000, help="0 picks a free port (printed at start)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward batch")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--seed", "--random-seed", dest="seed", type=int, default=1, help="the server's generator")
    parser.add_argument(
        "--enable-deterministic-inference",
        action="store_true",
        help="honour each request's sampling_seed (SGLang ignores it without this flag)",
    )
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megatron_opd.convert.hf_io import CheckpointError

    try:
        engine = HFEngine(args.model, batch_size=args.batch_size, dtype=args.dtype, device=args.device, seed=args.seed)
        flags = ServerFlags.from_env(args.enable_deterministic_inference)
        server = OPDServer((args.host, args.port), ServerState(engine, args.model, args.seed, flags))
    except (CheckpointError, OSError, ValueError) as e:
        print(f"opd serve: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"opd serve: listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    if server.crashed is not None:
        print(f"opd serve: the scheduler crashed ({server.crashed}); exiting", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
