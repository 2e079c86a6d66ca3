#!/usr/bin/env python3
"""Start, health-check and stop real CPU vLLM servers to use as Sluice upstreams.

As a command (from the repository root)::

    python -m contrib.vllm.launch --servers 2            # set up, build the model, serve
    python contrib/vllm/launch.py --servers 2 --config sluice-vllm.yaml

It prepares the vLLM virtualenv (``setup_env.sh``, cached), builds the tiny
model (``build_tiny_model.py``, cached), starts the servers on free loopback
ports, waits for ``/health``, prints one JSON line with their URLs (and writes
a Sluice config routing to them with ``--config``), then runs until SIGINT or
SIGTERM and stops them.

As a library (the end-to-end tests)::

    with VllmFleet.start(2, model_dir, python=vllm_python) as fleet:
        fleet.servers[0].url  # "http://127.0.0.1:PORT/v1"

Each server runs in its own session (process group), so stopping it also ends
the engine-core child process vLLM spawns; nothing is ever matched by name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

HERE = Path(__file__).resolve().parent
SETUP_SCRIPT = HERE / "setup_env.sh"
BUILD_SCRIPT = HERE / "build_tiny_model.py"

#: what the e2e tests and the docs rely on; see the issue for why each is needed on CPU
DEFAULT_ARGS = (
    "--dtype", "float32",
    "--kv-cache-memory-bytes", str(64 * 1024 * 1024),
    "--enforce-eager",
)
#: the tiny model's KV cache is ~1 KiB a token, so 64 MiB holds 64k tokens: room for longer contexts if a test needs them
DEFAULT_MAX_MODEL_LEN = 512
DEFAULT_MODEL_NAME = "tiny-llama"


def cache_home() -> Path:
    return Path(os.environ.get("SLUICE_VLLM_HOME") or Path.home() / ".cache" / "sluice-vllm")


def setup_env(*, quiet: bool = False) -> Path:
    """Run ``setup_env.sh`` (a no-op once cached) and return the vLLM venv's python."""
    # quiet: keep pip's output for the error (CalledProcessError.stderr) instead of printing it
    proc = subprocess.run(
        ["bash", str(SETUP_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if quiet else None,
        text=True,
        check=True,
    )
    return Path(proc.stdout.strip().splitlines()[-1])


def build_model(python: Path | str, out: Path | None = None, seed: int = 0) -> Path:
    """Build (or reuse) the tiny model with the vLLM venv's interpreter; returns its directory."""
    out = out or cache_home() / "models" / f"tiny-llama-s{seed}"
    proc = subprocess.run(
        [str(python), str(BUILD_SCRIPT), str(out), "--seed", str(seed)],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"},
    )
    return Path(proc.stdout.strip().splitlines()[-1])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def vllm_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            # The model is local; any hub lookup would hang on this network.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            # The CPU backend pins OpenMP threads to cores by default; two
            # servers on one small machine would then fight over core 0.
            "VLLM_CPU_OMP_THREADS_BIND": env.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    # Sluice's settings must not leak into vLLM (it ignores them, but a
    # SLUICE_CONFIG pointing at a test file would confuse anyone reading logs).
    for k in [k for k in env if k.startswith("SLUICE__")]:
        del env[k]
    return env


class StartError(RuntimeError):
    """A vLLM server exited or did not become healthy in time; the message ends with its log tail."""


@dataclass
class VllmServer:
    """One vLLM OpenAI server process that this module started."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    model_name: str
    log_path: Path
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    ready_after: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL, as a Sluice upstream ``url``."""
        return self.base + "/v1"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, TimeoutError):
            return False

    def wait_healthy(self, timeout: float = 300.0, interval: float = 0.5) -> float:
        """Poll ``/health`` until it answers 200; returns seconds since start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise StartError(f"vLLM on port {self.port} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                self.ready_after = time.monotonic() - self.started_at
                return self.ready_after
            time.sleep(interval)
        raise StartError(f"vLLM on port {self.port} not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def metrics(self, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=timeout) as r:
            return r.read().decode()

    def pids(self) -> list[int]:
        """This server's process and its descendants (vLLM's engine core runs in a child)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses: parse after the last ')'.
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(children.get(p, ()))
        return out

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children, from /proc."""
        total = 0
        for p in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def respawn(self) -> None:
        """Start the same command again on the same port (after ``kill`` or a crash); then ``wait_healthy``."""
        if self.alive():
            raise RuntimeError(f"vLLM on port {self.port} is still running")
        self.stop()
        self.proc = _spawn(self.cmd, self.env, self.log_path)
        self.started_at = time.monotonic()
        self.ready_after = None

    def kill(self) -> None:
        """Kill it now (SIGKILL to its process group): a crash, for failover tests."""
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to its process group, then SIGKILL after ``timeout``."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        # The engine core may outlive a parent that died first; its group id is still ours.
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        # start_new_session made the server its own group leader: pgid == pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def start_server(
    model_dir: Path | str,
    *,
    python: Path | str,
    host: str = "127.0.0.1",
    port: int | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    log_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    threads: int | None = 1,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
) -> VllmServer:
    """Spawn one vLLM server (not yet healthy: call ``wait_healthy``)."""
    port = port or free_port(host)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="sluice-vllm-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"vllm-{port}.log"
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", model_name,
        "--host", host,
        "--port", str(port),
        "--max-model-len", str(max_model_len),
        *DEFAULT_ARGS,
        *extra_args,
    ]
    env = vllm_env(threads)
    proc = _spawn(cmd, env, log_path)
    return VllmServer(proc=proc, host=host, port=port, model_name=model_name, log_path=log_path, cmd=cmd, env=env)


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        # A session of its own: the server and the engine-core processes it
        # forks share one process group that stop() and kill() can signal.
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@dataclass
class VllmFleet:
    """Several vLLM servers serving the same model, started together, stopped together."""

    servers: list[VllmServer]

    @classmethod
    @contextlib.contextmanager
    def start(
        cls,
        n: int,
        model_dir: Path | str,
        *,
        python: Path | str,
        timeout: float = 600.0,
        **kwargs,
    ) -> Iterator[VllmFleet]:
        fleet = cls(servers=[])
        try:
            for _ in range(n):
                fleet.servers.append(start_server(model_dir, python=python, **kwargs))
            errors: list[BaseException] = []

            def wait(s: VllmServer) -> None:
                try:
                    s.wait_healthy(timeout)
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    errors.append(e)

            # Wait in parallel: the servers load at the same time, so the fleet
            # is ready after the slowest one, not after their sum.
            threads = [threading.Thread(target=wait, args=(s,), daemon=True) for s in fleet.servers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            yield fleet
        finally:
            fleet.stop()

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def ensure_alive(self, timeout: float = 600.0) -> list[VllmServer]:
        """Respawn the servers that died (or were killed by a test) and wait until they are healthy."""
        dead = [s for s in self.servers if not s.alive()]
        for s in dead:
            s.respawn()
        for s in dead:
            s.wait_healthy(timeout)
        return dead

    def sluice_config(self, *, chain: list | None = None, port: int = 4000) -> dict:
        """A Sluice config routing ``/v1/`` to these servers, in order of fallback (the CLI's ``--config``)."""
        names = [f"vllm-{i}" for i in range(len(self.servers))]
        return {
            "server": {"host": "127.0.0.1", "port": port},
            "upstreams": {
                name: {"url": s.url, "kind": "vllm", "models": [s.model_name], "health_path": "/health"}
                for name, s in zip(names, self.servers)
            },
            "routes": [{"match": {"path": "/v1/"}, "upstream": names, "chain": chain or []}],
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m contrib.vllm.launch", description="Run CPU vLLM servers as Sluice upstreams.")
    p.add_argument("--servers", "-n", type=int, default=1, help="how many servers (default 1)")
    p.add_argument("--model", type=Path, help="model directory (default: build the tiny model into the cache)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="name clients send as 'model'")
    p.add_argument("--python", type=Path, help="the vLLM venv's python (default: run setup_env.sh)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ports", type=int, nargs="*", help="fixed ports (default: free ones)")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per server")
    p.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN, help="context length served (default 512)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for /health")
    p.add_argument("--log-dir", type=Path, help="where server logs go (default: a temp dir)")
    p.add_argument("--config", type=Path, help="also write a Sluice config routing to the servers here")
    p.add_argument("--once", action="store_true", help="exit (stopping the servers) as soon as they are healthy")
    p.add_argument("extra", nargs="*", help="extra vLLM arguments, after '--'")
    args = p.parse_args(argv)
    if args.ports and len(args.ports) != args.servers:
        p.error("--ports needs one port per server")

    t0 = time.monotonic()
    python = args.python or setup_env()
    model = args.model or build_model(python)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    servers = []
    try:
        for i in range(args.servers):
            servers.append(
                start_server(
                    model, python=python, host=args.host, port=args.ports[i] if args.ports else None,
                    model_name=args.model_name, log_dir=args.log_dir, extra_args=args.extra, threads=args.threads,
                    max_model_len=args.max_model_len,
                )
            )
        for s in servers:
            s.wait_healthy(args.timeout)
        fleet = VllmFleet(servers)
        if args.config:
            import yaml

            args.config.write_text(yaml.safe_dump(fleet.sluice_config(), sort_keys=False))
        print(json.dumps({
            "urls": [s.url for s in servers],
            "pids": [s.pid for s in servers],
            "model": args.model_name,
            "ready_seconds": round(time.monotonic() - t0, 1),
            "rss_mib": [round(s.rss_bytes() / 2**20) for s in servers],
            "logs": [str(s.log_path) for s in servers],
        }), flush=True)
        while not args.once and not stop.is_set():
            if not all(s.alive() for s in servers):
                dead = [s for s in servers if not s.alive()][0]
                print(f"vLLM on port {dead.port} exited:\n{dead.log_tail()}", file=sys.stderr)
                return 1
            stop.wait(1.0)
        return 0
    except StartError as e:
        print(str(e), file=sys.stderr)
        return 1
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    sys.exit(main())
