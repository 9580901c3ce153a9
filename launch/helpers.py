"""The Python parts of the launchers (run inside the job's environment by launch/node.sh and launch/local.sh).

helpers.py wait-ray --address IP:PORT --nodes N --timeout S
    return once N Ray nodes are alive; exit 1 with the list of joined nodes after S seconds
helpers.py rollout --host IP --urls-file F --server sglang|opd --gpus G --tp T ... -- CONFIG [key=value ...]
    rollout servers on this node for the config's student, G/T of them (SGLang) or one per GPU
    (`opd serve`, one on a CPU node); writes their URLs to F (one a line) once all answer /health,
    then blocks until SIGTERM/SIGINT (stops them) or until one exits (exit 1)
helpers.py free-port
    print a TCP port that is free on this machine now
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import socket
import sys
import time
from pathlib import Path


def wait_ray(address: str, nodes: int, timeout_s: float) -> int:
    import ray

    deadline = time.monotonic() + timeout_s
    alive: list[dict] = []
    while True:
        try:
            if not ray.is_initialized():
                ray.init(address=address, logging_level="error", log_to_driver=False)
            alive = [n for n in ray.nodes() if n["Alive"]]
        except ConnectionError as e:
            print(f"wait-ray: cannot reach the Ray head at {address} yet: {e}", file=sys.stderr, flush=True)
        if len(alive) >= nodes:
            print(f"wait-ray: {len(alive)} Ray node(s) alive at {address}", flush=True)
            ray.shutdown()
            return 0
        if time.monotonic() > deadline:
            joined = ", ".join(sorted(f"{n['NodeManagerHostname']} ({n['NodeManagerAddress']})" for n in alive))
            print(
                f"wait-ray: only {len(alive)} of {nodes} Ray nodes joined {address} within {timeout_s:.0f} s "
                f"(joined: {joined or 'none'}). Read the ray-*.log files of the nodes that are missing; raise "
                "OPD_RAY_JOIN_TIMEOUT if they are only slow.",
                file=sys.stderr,
                flush=True,
            )
            return 1
        time.sleep(2.0)


def rollout_commands(args: argparse.Namespace) -> list:
    """The server commands of this node for the config's student (``args.config`` + overrides)."""
    from megatron_opd.config.loader import load_config
    from megatron_opd.config.schema import model_hf_dir
    from megatron_opd.rollout.base import RolloutError
    from megatron_opd.rollout.sglang.launcher import PORT_STRIDE, ServerCommand, find_free_ports, sglang_server_commands

    cfg = load_config(args.config, args.overrides)
    model = model_hf_dir(cfg.student.path)
    if args.server == "sglang":
        if args.gpus < args.tp or args.gpus % args.tp:
            raise RolloutError(
                f"{args.gpus} GPU(s) per node cannot hold SGLang servers of TP={args.tp}. Fix: set OPD_ROLLOUT_TP "
                "to a divisor of OPD_GPUS_PER_NODE (or use OPD_ROLLOUT_SERVER=opd on CPU nodes)."
            )
        sglang = dataclasses.replace(
            cfg.rollout.sglang,
            urls=[],
            num_servers=args.gpus // args.tp,
            tp_size=args.tp,
            dp_size=1,
            mem_fraction_static=args.mem_fraction,
            host=args.host,
            base_port=args.base_port,
            base_gpu_id=0,
        )
        return sglang_server_commands(sglang, model, seed=cfg.rollout.seed)
    commands, taken = [], set()
    for i in range(max(1, args.gpus)):
        (port,) = find_free_ports(args.host, args.base_port + i * PORT_STRIDE, 1, avoid=taken)
        taken.add(port)
        device = f"cuda:{i}" if args.gpus else "cpu"
        command = [sys.executable, "-m", "megatron_opd.cli", "serve", "--model", model, "--host", args.host]
        command += ["--port", str(port), "--device", device, "--seed", str(cfg.rollout.seed + i)]
        commands.append(ServerCommand(f"http://{args.host}:{port}", command, name=f"opd{i}"))
    return commands


def rollout(args: argparse.Namespace) -> int:
    from megatron_opd.config.loader import load_config
    from megatron_opd.rollout.sglang.launcher import ServerProcesses

    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    urls_file = Path(args.urls_file)
    timeout_s = load_config(args.config, args.overrides).rollout.sglang.startup_timeout_s
    with ServerProcesses(rollout_commands(args), log_dir=urls_file.with_suffix("")) as servers:
        servers.start(timeout_s)
        tmp = urls_file.with_name(urls_file.name + ".tmp")
        tmp.write_text("".join(url + "\n" for url in servers.urls))
        tmp.rename(urls_file)  # atomic: a reader sees every URL or no file
        print(f"rollout: {len(servers.urls)} server(s) healthy: {' '.join(servers.urls)}", flush=True)
        while not stop:
            dead = [(c, p.returncode) for c, p in zip(servers.commands, servers.procs) if p.poll() is not None]
            if dead:
                for command, code in dead:
                    print(f"rollout: {command.name} ({command.url}) exited with code {code}", file=sys.stderr)
                return 1
            time.sleep(1.0)
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        print(s.getsockname()[1])
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="helpers.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wait-ray", help="wait until N Ray nodes are alive")
    p.add_argument("--address", required=True, help="the Ray head, IP:PORT")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--timeout", type=float, required=True, help="seconds")
    p = sub.add_parser("rollout", help="rollout servers on this node until stopped")
    p.add_argument("--host", required=True, help="address the servers listen on and are reached at")
    p.add_argument("--urls-file", required=True, help="written once all are healthy; logs go to its stem dir")
    p.add_argument("--server", choices=("sglang", "opd"), default="sglang", help="opd: `opd serve` (CPU, tests)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs of this node")
    p.add_argument("--tp", type=int, default=1, help="SGLang tensor parallel size (one server per TP group)")
    p.add_argument("--mem-fraction", type=float, default=0.85, help="SGLang --mem-fraction-static")
    p.add_argument("--base-port", type=int, default=30000, help="server i listens from base + 10*i on")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    sub.add_parser("free-port", help="print a free TCP port")
    args = parser.parse_args(argv)
    if args.command == "wait-ray":
        return wait_ray(args.address, args.nodes, args.timeout)
    if args.command == "rollout":
        return rollout(args)
    return free_port()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
