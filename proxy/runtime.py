"""What a plugin gets from the process: state, metrics, an executor, background tasks, upstreams."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import contextvars
import functools
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, TypeVar

from .config import SluiceConfig

if TYPE_CHECKING:  # pragma: no cover
    from prometheus_client import CollectorRegistry

    from .state import StateHub
    from .upstream import UpstreamPool

T = TypeVar("T")
log = logging.getLogger("sluice")


class TaskGroup:
    """Named, referenced background tasks: no bare ``create_task`` fire-and-forget."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background task %s failed: %s", task.get_name(), type(exc).__name__)

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout: float | None = None) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def cancel(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class Runtime:
    """Shared by every plugin instance of a process; survives config reloads.

    * ``state``: the :class:`~proxy.state.StateHub` (counters, KV, records);
    * ``metrics``: the Prometheus registry plugins add their collectors to;
    * ``run_cpu(fn, *args)``: CPU-heavy work in a bounded thread pool, off the loop;
    * ``spawn(coro, name)``: a named, referenced background task;
    * ``upstreams``: the pooled upstream clients (for shadow calls, health probes);
    * ``config``: the current :class:`SluiceConfig` (replaced on reload).
    """

    def __init__(
        self,
        config: SluiceConfig,
        state: StateHub,
        metrics: CollectorRegistry,
        upstreams: UpstreamPool,
        executor_threads: int = 2,
    ) -> None:
        self.config = config
        self.state = state
        self.metrics = metrics
        self.upstreams = upstreams
        self.tasks = TaskGroup()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=executor_threads, thread_name_prefix="sluice-cpu")
        #: named singletons shared between plugin instances (and across reloads): see ``shared``
        self._shared: dict[str, Any] = {}
        #: called with (plugin_id, phase) when a plugin fails open, to count it
        self.on_plugin_error: Callable[[str, str], None] = lambda plugin_id, phase: None
        self.worker_id = 0
        #: the plugin instances of the generation now serving (set by the server)
        self._live: Callable[[], list[Any]] = lambda: []

    def view(self, config: SluiceConfig, upstreams: UpstreamPool) -> Runtime:
        """The same process resources seen with one generation's config and upstreams.

        Each loaded config gets its own view, so plugins of a new generation see
        its upstreams while they start, and an old generation finishing its
        in-flight requests keeps seeing its own.
        """
        v = copy.copy(self)
        v.config = config
        v.upstreams = upstreams
        return v

    def instances(self, cls: type[T]) -> list[T]:
        """The live instances of a plugin class in the serving generation (for admin endpoints)."""
        return [p for p in self._live() if isinstance(p, cls)]

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        return self.tasks.spawn(coro, name)

    async def run_cpu(self, fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any) -> T:
        """Run ``fn`` in the bounded thread pool; ``timeout`` raises ``TimeoutError`` after that long.

        A thread cannot be stopped: on a timeout the job still finishes in the
        background and its slot is busy until then, which is what bounds the pool.
        """
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        fut = loop.run_in_executor(self._executor, call)
        if timeout is None:
            return await fut
        async with asyncio.timeout(timeout):
            return await fut

    def shared(self, name: str, factory: Callable[[], T]) -> T:
        """One object per process under ``name``, built on first use (metric families, caches)."""
        try:
            return self._shared[name]
        except KeyError:
            obj = self._shared[name] = factory()
            return obj

    async def close(self) -> None:
        await self.tasks.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


AsyncFn = Callable[..., Awaitable[Any]]
