"""The base class every plugin derives from, and its config model."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # pragma: no cover
    from aiohttp import web

    from .config import LoadedConfig
    from .runtime import Runtime


@dataclass(frozen=True)
class Command:
    """A ``sluice`` sub-command a plugin adds (``name`` may be two words: ``"eval pii"``).

    ``configure`` adds arguments to its argparse parser; ``run`` gets the parsed
    arguments and the loaded config (``-c FILE``, ``$SLUICE_CONFIG`` or the
    defaults) and returns the exit status.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, LoadedConfig], int | Awaitable[int]]


@dataclass(frozen=True)
class AdminRoute:
    """An admin API endpoint a plugin adds, under ``/admin/``; the core checks the admin token.

    ``handler(request, runtime)`` returns an aiohttp response.
    """

    method: str
    path: str
    handler: Callable[[web.Request, Runtime], Awaitable[web.StreamResponse]]


class PluginConfig(BaseModel):
    """Base of every plugin's config model: unknown keys are errors.

    Subclass it as ``Plugin.Config`` and give every field a description and bounds.
    ``id`` and ``on_error`` are common to all plugins.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(
        None,
        description="A name for this instance in logs and metrics; needed only when a plugin appears twice in one chain.",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
    )
    on_error: Literal["closed", "open"] | None = Field(
        None,
        description="What a failure of this plugin does: 'closed' answers the client with an error, "
        "'open' logs and counts it and carries on. Defaults to closed for guards, open for observers.",
    )


class Plugin:
    """A Sluice plugin. Subclass, set ``name``, mark hook methods with ``@hookimpl``.

    One instance is built per chain entry at config load, with its validated
    ``config`` and the process's :class:`~proxy.runtime.Runtime`. Keep no
    per-request state on the instance: use ``ctx.stash``.
    """

    #: the YAML key of the plugin
    name: ClassVar[str] = ""
    #: guards fail closed by default, observers and transforms open
    kind: ClassVar[Literal["guard", "observer", "transform"]] = "observer"
    #: the plugin's config model (a :class:`PluginConfig` subclass)
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    #: ask the core to obtain usage on streams even when the client did not ask
    #: (it adds ``stream_options.include_usage`` upstream and hides that event)
    needs_usage: ClassVar[bool] = False
    #: this plugin's ``on_done`` must run even when the background queue is full
    #: (ledgers, lease releases); ``None`` means "if the plugin is a guard"
    done_required: ClassVar[bool | None] = None
    #: ask the core to time every hook of this plugin's route into ``ctx.timings.plugins``
    #: (two clock reads per hook call; off unless some plugin of the route wants them)
    wants_plugin_timings: bool = False
    #: names of plugins whose results this one reads, so it belongs after them in a chain (on_done
    #: and on_request run in chain order, on_response in reverse); loading a config whose route
    #: puts one of them later logs a warning. An instance may narrow it from its config.
    follows: tuple[str, ...] = ()

    def __init__(self, config: PluginConfig, runtime: Runtime) -> None:
        self.config = config
        self.runtime = runtime
        #: the instance's label: the config ``id``, else the plugin name
        self.id: str = config.id or self.name

    @property
    def must_finish(self) -> bool:
        return self.done_required if self.done_required is not None else self.kind == "guard"

    @property
    def fail_closed(self) -> bool:
        policy = self.config.on_error or ("closed" if self.kind == "guard" else "open")
        return policy == "closed"

    @classmethod
    def commands(cls) -> list[Command]:
        """``sluice`` sub-commands this plugin offers (keys, usage, eval, ...)."""
        return []

    @classmethod
    def check(cls, config: Any, sluice: Any) -> None:
        """Check this plugin's validated ``config`` against the whole config ``sluice`` (the
        upstreams it names, the files it reads), when the config is loaded: by ``sluice check``,
        at start and on reload alike. Raise ``ValueError`` whose message begins with the field's
        path in this plugin's config (``aliases.chat.targets: ...``)."""

    @classmethod
    def admin_routes(cls) -> list[AdminRoute]:
        """Admin API endpoints this plugin offers, whether or not a chain uses it."""
        return []

    async def start(self) -> None:
        """Open resources (connections, files, background tasks) after the chain is built."""

    async def stop(self) -> None:
        """Release resources when the chain is retired (after in-flight requests finished)."""

    def __repr__(self) -> str:  # pragma: no cover
        return f"<{type(self).__name__} {self.id}>"
