"""A real ``redis-server`` for tests and demos: free loopback port, own temp dir, no persistence.

::

    async with RedisServer() as rs:      # or: with RedisServer() as rs:
        client = redis.asyncio.Redis.from_url(rs.url)
        rs.stop(); rs.restart()          # fault tests: the same port comes back, empty

Only the process this object started is ever signalled, by its PID.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too.

    The kernel's ephemeral ports reach 60999, and a node on a port above 55535
    has no bus port: redis-server refuses to start there.
    """
    for _ in range(100):
        port = random.randint(20000, 45000)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def _ping(port: int, timeout: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """Start ``redis-server`` (``$SLUICE_REDIS_SERVER`` or on ``PATH``, else /usr/bin/redis-server)."""

    def __init__(self, port: int | None = None, *, start_timeout: float = 10.0, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = os.environ.get("SLUICE_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = port or 0
        self.start_timeout = start_timeout
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        if self.running:
            return self
        if not Path(self.binary).exists():
            raise FileNotFoundError(f"redis-server not found ({self.binary}); install it (apt-get install redis-server)")
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sluice-redis-")
        fixed = bool(self.port)
        for _ in range(1 if fixed else 5):
            if not fixed:
                self.port = _free_cluster_port() if "--cluster-enabled" in self.extra_args else _free_port()
            if self._spawn():
                return self
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}")

    def _spawn(self) -> bool:
        assert self._tmp is not None
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self._tmp.name, "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
            *self.extra_args,
        ]
        log = open(Path(self._tmp.name) / "redis.log", "ab")
        try:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # exited: port taken, bad args
                self.proc = None
                return False
            if _ping(self.port, 0.2):
                return True
            # a condition wait: the server is polled until it answers or the deadline passes
            time.sleep(0.02)
        self._kill()
        return False

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        """Stop the server (the port stays reserved for :meth:`restart`)."""
        self._kill()

    def restart(self) -> None:
        """Start again on the same port (data is gone: there is no persistence)."""
        self._kill()
        if not self._spawn():
            raise RuntimeError(f"redis-server did not come back on port {self.port}")

    async def astop(self) -> None:
        """:meth:`stop` off the event loop."""
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> None:
        """:meth:`restart` off the event loop (it waits for PING)."""
        await asyncio.to_thread(self.restart)

    def close(self) -> None:
        self._kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> RedisServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.to_thread(self.close)
