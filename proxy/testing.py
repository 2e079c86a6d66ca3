"""A kit for plugin authors (and Sluice's own tests).

* :class:`FakeUpstream`: a real OpenAI-compatible server on 127.0.0.1 with fault knobs.
* :class:`SluiceServer`: a real Sluice server in this process, from a config dict.
* :class:`SluiceProcess`: ``sluice serve`` in a subprocess, for signals and replicas.
* :func:`make_context`, :func:`configure_plugin`, :func:`register_plugin`: unit-test a plugin
  through the real config validation, without a server.
* :class:`RedisServer`: a real ``redis-server`` on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping

import orjson
import yaml
from aiohttp import web
from multidict import CIMultiDict

from .config import SluiceConfig, StateConfig, load_config
from .context import Context, Identity
from .demo import DemoUpstream
from .plugin import Plugin, PluginConfig
from .registry import register_plugin as _register
from .runtime import Runtime
from .state.redis_server import RedisServer
from .upstream import UpstreamPool

__all__ = [
    "FakeUpstream", "RedisServer", "SluiceProcess", "SluiceServer", "configure_plugin", "make_context",
    "make_runtime", "register_plugin", "wait_for",
]


class FakeUpstream(DemoUpstream):
    """The demo model server as a test double: see :class:`proxy.demo.DemoUpstream` for knobs.

    ``async with FakeUpstream() as up:`` then point an upstream at ``up.url``;
    ``up.requests`` lists what reached it, ``await up.wait_for(pred)`` waits on its state.
    """


async def wait_for(cond: Callable[[], Awaitable[bool] | bool], timeout: float = 30.0, what: str = "condition",
                   every: float = 0.05) -> None:
    """Poll ``cond`` (a function, or a coroutine function) every ``every`` seconds until it holds;
    an ``AssertionError`` naming ``what`` after ``timeout`` seconds. A condition with a deadline,
    for state no event announces (another process, a clock), never a fixed wait."""
    deadline = time.monotonic() + timeout
    while True:
        ok = cond()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp ``app`` on 127.0.0.1 at a free port: its origin (``http://127.0.0.1:PORT``) while open."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def held_answer(first: bytes, content_type: str, content_length: int | None = None) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """An upstream whose ``POST /v1/chat/completions`` answer is ``first`` and then nothing, its end held
    until the event is set (on leaving, at the latest): its base URL and that event. For what a proxy
    does while an upstream stalls, or after a client left before the upstream's end."""
    release = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        r = web.StreamResponse(headers={"content-type": content_type})
        if content_length is not None:
            r.content_length = content_length
        await r.prepare(request)
        await r.write(first)
        await release.wait()
        return r  # aiohttp ends the body

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    async with serve_app(app) as origin:
        try:
            yield f"{origin}/v1", release
        finally:
            release.set()


@contextlib.contextmanager
def register_plugin(cls: type[Plugin]) -> Iterator[type[Plugin]]:
    """Make ``cls`` available by its ``name`` in configs for the duration of a ``with`` block."""
    undo = _register(cls)
    try:
        yield cls
    finally:
        undo()


def make_context(
    body: Any = None,
    *,
    path: str = "/v1/chat/completions",
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
    identity: Identity | None = None,
    runtime: Runtime | None = None,
    client_ip: str = "127.0.0.1",
) -> Context:
    """A context as the handler would build it (no route): for unit tests of hooks."""
    raw = body if isinstance(body, bytes) else (orjson.dumps(body) if body is not None else b"")
    ctx = Context(request_id="req_test", method=method, path=path, headers=CIMultiDict(headers or {}), raw=raw, client_ip=client_ip)
    ctx.identity = identity
    ctx.runtime = runtime
    return ctx


async def make_runtime(state_dir: str | os.PathLike[str] | None = None, *, redis_url: str | None = None, config: dict[str, Any] | None = None) -> Runtime:
    """A started runtime (state under ``state_dir``) for unit tests; close it with ``await rt.close_all()``."""
    from .metrics import make_registry
    from .state import StateHub

    data = dict(config or {})
    state: dict[str, Any] = dict(data.get("state") or {})
    state["dir"] = str(state_dir or tempfile.mkdtemp(prefix="sluice-test-"))
    if redis_url:
        state["redis"] = {"url": redis_url}
    data["state"] = state
    cfg = SluiceConfig.model_validate(data)
    hub = StateHub(StateConfig.model_validate(state))
    await hub.start()
    pool = UpstreamPool(cfg.upstreams)
    await pool.start()
    rt = Runtime(cfg, hub, make_registry(), pool)

    async def close_all() -> None:
        await rt.close()
        await pool.close()
        await hub.close()

    rt.close_all = close_all  # type: ignore[attr-defined]
    return rt


async def configure_plugin(cls: type[Plugin], config: Mapping[str, Any] | None = None, *, runtime: Runtime | None = None) -> Plugin:
    """Build and start a plugin through its real config validation (errors as pydantic raises them)."""
    model: PluginConfig = cls.Config.model_validate(dict(config or {}))
    rt = runtime or await make_runtime()
    plugin = cls(model, rt)
    await plugin.start()
    return plugin


class SluiceServer:
    """A Sluice server in this process on 127.0.0.1, port 0.

    ``config`` is a dict as the YAML file would hold; ``state.dir`` defaults to
    ``tmp_path``. The admin listener gets a free port and the token ``"admin-token"``
    unless the config says otherwise.
    """

    def __init__(self, config: Mapping[str, Any] | None = None, tmp_path: str | os.PathLike[str] | None = None) -> None:
        self.data = _test_config(config or {}, tmp_path)
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.server.admin_port}"

    @property
    def admin_token(self) -> str | None:
        return self.data.get("admin", {}).get("token")

    @property
    def runtime(self) -> Runtime:
        return self.server.runtime

    async def reload(self, config: Mapping[str, Any]) -> tuple[bool, str]:
        self.data = _test_config(config, self.data["state"]["dir"], keep=self.data)
        return await self.server.reload(data=self.data)

    async def __aenter__(self) -> SluiceServer:
        from .server import Server

        loaded = load_config(data=self.data)
        self.server = Server(loaded)
        try:
            await self.server.start()
            await self.server.listen(host="127.0.0.1", port=0)
        except BaseException:
            await self.server.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.drain()

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request is in flight and every on_done has run."""
        async with asyncio.timeout(timeout):
            await self.server.generation.wait_idle(None)
            if self.server._queue is not None:
                await self.server._queue.join()


def _test_config(config: Mapping[str, Any], tmp_path: Any, keep: Mapping[str, Any] | None = None) -> dict[str, Any]:
    data = json.loads(json.dumps(config, default=str))
    state = data.setdefault("state", {})
    state.setdefault("dir", str(tmp_path or tempfile.mkdtemp(prefix="sluice-test-")))
    server = data.setdefault("server", {})
    server.setdefault("host", "127.0.0.1")
    server.setdefault("port", 0)
    server.setdefault("drain_seconds", 10)
    admin = data.setdefault("admin", {})
    admin.setdefault("port", 0)
    admin.setdefault("token", "admin-token")
    return data


class SluiceProcess:
    """``sluice serve -c FILE`` in a subprocess; ``.url``, ``.admin_url``, ``.pid``; signals by PID.

    ``config`` is a dict (written to ``tmp_path/sluice.yaml``) or a path.
    """

    def __init__(self, config: Mapping[str, Any] | str | os.PathLike[str], tmp_path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None, timeout: float = 30.0) -> None:
        self.tmp = Path(tmp_path)
        self.tmp.mkdir(parents=True, exist_ok=True)
        if isinstance(config, Mapping):
            data = _test_config(config, self.tmp / "state")
            self.config_path = self.tmp / f"sluice-{os.urandom(3).hex()}.yaml"
            self.config_path.write_text(yaml.safe_dump(data))
        else:
            self.config_path = Path(config)
        self.env = {**os.environ, **(env or {})}
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.log_path = self.tmp / f"sluice-{os.urandom(3).hex()}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.info['port']}/v1"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.info['admin_port']}"

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    #: the working directory of the child (``None``: this process's)
    cwd: Path | None = None

    def command(self, ready: Path) -> list[str]:
        """The child's argv: ``sluice serve`` on the config, writing ``ready`` once listening.

        Override to serve through another entry point (a profiler, another source tree).
        """
        return [sys.executable, "-m", "proxy.cli", "serve", "-c", str(self.config_path), "--ready-file", str(ready)]

    async def start(self) -> SluiceProcess:
        ready = self.tmp / f"ready-{os.urandom(4).hex()}.json"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(ready), env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            async with asyncio.timeout(self.timeout):
                while not ready.exists():
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"sluice exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
                    await asyncio.sleep(0.02)  # polling a file the child writes; no event to wait on across processes
            self.info = json.loads(ready.read_text())
        except BaseException:
            # a start that failed or timed out leaves no child running and no log file open (__aexit__ will not run)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._log.close()
            raise
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            while self.proc.poll() is None:
                await asyncio.sleep(0.02)
        return self.proc.returncode

    async def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return await self.wait(timeout)
        except TimeoutError:
            self.proc.kill()
            self.proc.wait()
            raise

    async def __aenter__(self) -> SluiceProcess:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop()
        finally:
            self._log.close()
