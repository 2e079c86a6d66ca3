"""Sluice: the public face for plugin authors.

Everything a plugin needs is importable from here::

    from proxy import Plugin, PluginConfig, Context, ProxyError, hookimpl, Event
"""

from __future__ import annotations

from .context import Attempt, Context, Identity, Response, StashKey, StreamEnd, Target, Usage
from .errors import ConfigError, ProxyError, StateUnavailable
from .hookspecs import hookimpl
from .plugin import AdminRoute, Command, Plugin, PluginConfig
from .sse import Event

__version__ = "0.1.0"

__all__ = [
    "AdminRoute", "Attempt", "Command", "ConfigError", "Context", "Event", "Identity", "Plugin", "PluginConfig", "ProxyError",
    "Response", "StashKey", "StateUnavailable", "StreamEnd", "Target", "Usage", "hookimpl", "__version__",
]
