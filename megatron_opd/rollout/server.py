"""``opd serve --model HF_DIR --port P``: the ``hf`` engine behind SGLang's native HTTP API.

It lets the ``sglang`` client path (batching over servers, retries, weight sync) run end to end on
machines where SGLang cannot be installed. Endpoints (schemas in
:mod:`megatron_opd.rollout.sglang.protocol`):

- ``GET /health``: 200 while the engine is loaded; ``GET /health_generate``: 200 after generating
  one token (SGLang's deep health check).
- ``GET /get_model_info``, ``GET /get_weight_version``, ``GET|POST /flush_cache`` (no cache: 200).
- ``POST|PUT /generate``: input ids (or text, when the model directory has a tokenizer), batched.
- ``POST /update_weights_from_disk``: load HF safetensors from ``model_path`` in place.
- ``POST /init_weights_update_group``, ``/update_weights_from_distributed``,
  ``/destroy_weights_update_group``: weights broadcast from the trainer (any torch backend; gloo
  on CPU). This server has one rank: ``rank_offset``.
- ``POST /release_memory_occupation``, ``/resume_memory_occupation`` (``tags``: ``weights``,
  ``kv_cache``; none: all): as SGLang with ``--enable-memory-saver`` and no CPU backup, released
  weights lose their values (they come back as zeros) and must be updated after resuming; while
  anything is released, ``/generate`` is refused, and while the weights are, so are updates.

Generation requests are served one at a time (the engine batches the prompts inside a request).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch

from megatron_opd.rollout.base import MAX_SEED, MEMORY_TAGS, RolloutError
from megatron_opd.rollout.hf_engine import HFEngine, RowRequest
from megatron_opd.rollout.sglang import protocol

logger = logging.getLogger(__name__)


class ServerState:
    """The engine, its weight version, the tokenizer (if any) and the weight-update groups."""

    def __init__(self, engine: HFEngine, model_dir: str, seed: int) -> None:
        self.engine, self.model_dir = engine, model_dir
        self.weight_version = "default"
        self.tokenizer = self._load_tokenizer(model_dir)
        self.groups: dict[str, Any] = {}
        self.released: set[str] = set()
        self._weight_shapes: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()

    @staticmethod
    def _load_tokenizer(model_dir: str) -> Any:
        from megatron_opd.data.tokenizer import TokenizerError, load_tokenizer

        try:
            return load_tokenizer(model_dir)
        except TokenizerError:
            logger.info("%s has no tokenizer: /generate takes input_ids only and returns no text", model_dir)
            return None

    def generate(self, body: Any) -> Any:
        if self.released:
            raise protocol.ProtocolError(
                f"memory {sorted(self.released)} is released; call /resume_memory_occupation first."
            )
        req = protocol.parse_generate_request(body, self.engine.vocab_size)
        if req.prompts is None:
            if self.tokenizer is None:
                raise protocol.ProtocolError("this model directory has no tokenizer; send input_ids instead of text.")
            req.prompts = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in req.texts or []]
        with self._rng_lock:
            seeds = [s if s is not None else int(self._rng.integers(0, MAX_SEED)) for s in req.seeds]
        start = time.perf_counter()
        outputs = self.engine.generate_rows(
            [RowRequest(p, sp, s) for p, sp, s in zip(req.prompts, req.sampling, seeds)]
        )
        latency = time.perf_counter() - start
        items = [
            protocol.generate_response_item(
                out.completion,
                rid=rid or uuid.uuid4().hex,
                matched=out.matched_stop,
                last_prompt_logprob=out.last_prompt_logprob,
                return_logprob=want_lp,
                weight_version=self.weight_version,
                latency_s=latency,
                text=None if self.tokenizer is None else self.tokenizer.decode(out.completion.token_ids),
            )
            for out, rid, want_lp in zip(outputs, req.rids, req.return_logprob)
        ]
        return items if req.batched else items[0]

    def health_generate(self) -> None:
        """SGLang's deep health check: generate one token."""
        self.generate({"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0}})

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_dir,
            "tokenizer_path": self.model_dir if self.tokenizer is not None else None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
        }

    def release_memory(self, body: dict[str, Any]) -> None:
        tags = _memory_tags(body)
        if "weights" in tags and "weights" not in self.released:
            for name, param in self.engine.model.named_parameters():  # tied weights appear once
                self._weight_shapes[name] = (param.shape, param.dtype, param.device)
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self.released |= tags

    def resume_memory(self, body: dict[str, Any]) -> None:
        tags = _memory_tags(body)
        if "weights" in tags & self.released:
            for name, param in self.engine.model.named_parameters():
                shape, dtype, device = self._weight_shapes[name]
                param.data = torch.zeros(shape, dtype=dtype, device=device)  # the values are gone
        self.released -= tags

    def _check_weights_held(self) -> None:
        if "weights" in self.released:
            raise protocol.ProtocolError("the weights are released; call /resume_memory_occupation first.")

    def update_from_disk(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_weights_held()
        self.engine.update_weights_from_dir(_field(body, "model_path", str))
        return self._updated(body, f"Succeeded to update model weights from {body['model_path']}.")

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

    def update_from_distributed(self, body: dict[str, Any]) -> dict[str, Any]:
        from megatron_opd.rollout.weight_group import receive_weights

        group = self._group(body)
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


def _memory_tags(body: dict[str, Any]) -> set[str]:
    tags = body.get("tags")
    if tags is None:
        return set(MEMORY_TAGS)
    if not isinstance(tags, list) or not set(tags) <= set(MEMORY_TAGS):
        raise protocol.ProtocolError(f"tags must be null or a list of {list(MEMORY_TAGS)}, got {tags!r}.")
    return set(tags)


def _field(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise protocol.ProtocolError(f"field {key!r} must be a {kind.__name__}, got {value!r}.")
    return value


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
        routes = {
            "/health": lambda: None,
            "/health_generate": state.health_generate,
            "/get_model_info": state.model_info,
            "/get_weight_version": lambda: {"weight_version": state.weight_version},
            "/flush_cache": lambda: None,
        }
        self._dispatch(routes)

    def do_POST(self) -> None:
        state = self.server.state
        routes = {
            "/generate": lambda: state.generate(self._body()),
            "/update_weights_from_disk": lambda: state.update_from_disk(self._json_object()),
            "/init_weights_update_group": lambda: state.init_group(self._json_object()),
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
        is_update = path.startswith(("/update_weights", "/init_weights", "/destroy_weights"))
        try:
            self._send(HTTPStatus.OK, routes[path]())
        except (protocol.ProtocolError, ValueError, RolloutError) as e:
            payload = {"success": False, "message": str(e)} if is_update else {"error": {"message": str(e)}}
            self._send(HTTPStatus.BAD_REQUEST, payload)
        except Exception as e:
            logger.exception("%s %s failed", self.command, path)
            payload = {"success": False, "message": repr(e)} if is_update else {"error": {"message": repr(e)}}
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, payload)


class OPDServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: ServerState) -> None:
        super().__init__(address, Handler)
        self.state = state

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


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
    parser.add_argument("--seed", type=int, default=1, help="seeds of requests that send no sampling_seed")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megatron_opd.convert.hf_io import CheckpointError

    try:
        engine = HFEngine(args.model, batch_size=args.batch_size, dtype=args.dtype, device=args.device, seed=args.seed)
        server = OPDServer((args.host, args.port), ServerState(engine, args.model, args.seed))
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
