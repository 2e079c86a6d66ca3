"""The plugin contract: every hook Sluice calls, in one place.

A plugin is a class deriving from :class:`proxy.Plugin` whose methods carry
``@proxy.hookimpl``. Hooks may be ``async def`` or plain ``def``; the chain awaits
coroutines one by one in the order below. The hook names and argument names are
checked when a plugin class is registered (``sluice check`` included), so a
misspelt hook or argument fails the config load rather than being silently ignored.

Order (the "onion"):

* ``on_request`` runs in chain order (the YAML order) and stops at the first
  plugin that answers early (``ctx.reply(...)`` or ``raise ProxyError``).
* ``on_response``, ``on_chunk`` and ``on_stream_end`` run in reverse chain order,
  and only for the plugins whose ``on_request`` phase the request passed
  through (a plugin that answered early sees its own answer go out).
* ``on_done`` runs for every plugin of the route, answered early or not, after
  the client has its answer.

Every request hook should begin by checking ``ctx.answered``: an earlier plugin
may already have answered (an early answer still passes back outwards).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context
    from .sse import Event

PROJECT = "sluice"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_plugins(register: Callable[[type], None]) -> None:
    """Load time: call ``register(PluginClass)`` for each plugin class a package offers.

    Installed packages expose this through the ``sluice.plugins`` entry point
    group; the built-in plugins use the same door. Plugin classes are keyed by
    their ``name`` attribute (the YAML key); registering two classes under one
    name is a load error.
    """


@hookspec
def on_request(ctx: Context) -> None:
    """Before any upstream call, in chain order.

    May read or change ``ctx.body`` (assign ``ctx.body = ...`` after changing
    it, so the new body is serialised), ``ctx.headers``, ``ctx.targets``; may set
    ``ctx.identity``, ``ctx.annotations``, ``ctx.stash``; may add a callable to
    ``ctx.on_attempt`` (a list, ``None`` until the first), which is called as
    ``fn(ctx, attempt, headers)`` before each upstream attempt is sent, to set
    headers of that attempt only (tracing's ``traceparent``); may answer early with
    ``ctx.reply(...)`` or by raising :class:`proxy.ProxyError`. The return value
    is ignored: ``None`` means carry on.
    """


@hookspec
def on_response(ctx: Context) -> None:
    """A buffered answer is in hand (from the upstream, or an early reply).

    Buffered answers are JSON ones, errors of any type, and early replies. A successful
    answer that is neither JSON nor SSE (speech audio, a file's content, NDJSON) is relayed
    as it arrives and no hook sees it; SSE events go to ``on_chunk``.

    Runs in reverse chain order over the plugins the request passed through.
    May read or change ``ctx.response`` (``status``, ``headers``, ``body`` bytes,
    or ``ctx.response.json`` then ``ctx.response.set_json(...)``) and add
    ``ctx.response_headers``. Raising :class:`ProxyError` replaces the answer
    with that error. The return value is ignored.
    """


@hookspec
def on_chunk(ctx: Context, event: Event) -> Iterable[Event] | None:
    """One server-sent event of a streamed answer, in reverse chain order.

    Return ``None`` to pass the event on unchanged (after changing it in place if
    you like: ``event.json = ...`` or ``event.data = ...``); return a list
    (or any iterable) of events to emit instead: ``[]`` drops or holds it,
    several events split it or release what was held. What a plugin returns is
    handed to the next plugin outwards. The terminal ``data: [DONE]`` is not an
    event here: it is written after every ``on_stream_end``.
    Declaring this hook makes the route parse streams into events; without any
    ``on_chunk`` in the route streams are relayed as raw bytes.
    """


@hookspec
def on_stream_end(ctx: Context) -> Iterable[Event] | None:
    """The upstream stream ended (normally or not), innermost plugin first.

    Return the events to emit that the plugin held back (they pass through the
    outer plugins' ``on_chunk``), or ``None`` when there is nothing to add.
    ``ctx.outcome`` says whether the stream completed.
    """


@hookspec
def on_done(ctx: Context) -> None:
    """The client has its answer, or went away: record what happened.

    Runs for every plugin of the route in chain order, even after an early
    answer, and never delays the client. When every ``on_done`` of the route is
    a plain function, they run in the request's own task right after the answer
    was written to the client (no queue; keep them cheap, since the connection's
    next request waits for them, and hand heavy work to ``runtime.run_cpu`` or
    ``runtime.spawn``). When one is a coroutine, the route's ``on_done`` work goes
    to a bounded background queue instead (a full queue drops and counts, except
    for plugins with ``done_required``, whose work waits for room). A plain
    ``on_done`` that must wait for one request (metering counting a big prompt in
    the executor) may return a coroutine instead of ``None``: the core then awaits
    it in that queue (not dropped when the queue is full), and runs the route's
    later ``on_done`` hooks after it; other return values are ignored. ``ctx.outcome``, ``ctx.usage``, ``ctx.timings``,
    ``ctx.attempts``, ``ctx.answered_by`` and ``ctx.answer_reason`` are final, but for one thing:
    metering's ``on_done`` puts its estimate in ``ctx.usage`` when the upstream gave none.
    ``ctx.answer`` gives what the answer said of itself (model, id, finish reasons,
    refusal), buffered or streamed, read once for every plugin. What one plugin's ``on_done`` records (``ctx.cost`` from metering, say) is
    seen by the plugins after it in the chain, so put producers before consumers.
    One exception to chain order: with ``server.done_batch_ms`` (the default), on a route whose ``on_done``
    hooks are all plain functions, the observers' (``kind = "observer"``) wait for the server's batch while
    the other plugins' run at once, so a guard or transform runs its ``on_done`` before an observer's that
    comes earlier in the chain. A plugin that reads what an observer records (``ctx.cost``) should be an
    observer itself.
    Exceptions are logged and counted, never raised to anyone.
    """


REQUEST_HOOKS = ("on_request", "on_response", "on_chunk", "on_stream_end", "on_done")


def hook_reference() -> list[dict[str, Any]]:
    """The documented hooks, for the generated reference and its drift test."""
    import inspect

    out = []
    for name in ("register_plugins", *REQUEST_HOOKS):
        fn = globals()[name]
        out.append(
            {
                "name": name,
                "signature": f"{name}{inspect.signature(fn)}",
                "doc": inspect.getdoc(fn) or "",
            }
        )
    return out
