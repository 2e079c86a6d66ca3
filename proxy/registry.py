"""The plugin registry: built-ins and third-party packages, both through entry points."""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Callable

import pluggy

from . import hookspecs
from .hookspecs import REQUEST_HOOKS
from .plugin import Plugin

ENTRY_POINT_GROUP = "sluice.plugins"
PLUGINS_ENV = "SLUICE_PLUGINS"

# plugins registered programmatically (proxy.testing.register_plugin); they win over entry points
_extra: dict[str, type[Plugin]] = {}
_cache: dict[str, type[Plugin]] | None = None


def _check_class(cls: type) -> type[Plugin]:
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise TypeError(f"{cls!r} is not a proxy.Plugin subclass")
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no 'name'")
    for hook in REQUEST_HOOKS:
        fn = getattr(cls, hook, None)
        if fn is not None and not hasattr(fn, hookspecs.PROJECT + "_impl"):
            raise TypeError(f"{cls.__qualname__}.{hook} is not marked @hookimpl")
    return cls


def _discover() -> dict[str, type[Plugin]]:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    # modules named in $SLUICE_PLUGINS (comma-separated) are loaded like entry points:
    # a plugin under development, or one registered in code, reaches every worker process
    for name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        module = importlib.import_module(name)
        if not pm.is_registered(module):
            pm.register(module, name=f"env:{name}")
    found: dict[str, type[Plugin]] = {}
    origin: dict[str, str] = {}

    def register(cls: type) -> None:
        cls = _check_class(cls)
        where = f"{cls.__module__}.{cls.__qualname__}"
        if cls.name in found and found[cls.name] is not cls:
            raise TypeError(f"plugin name {cls.name!r} registered twice: {origin[cls.name]} and {where}")
        found[cls.name] = cls
        origin[cls.name] = where

    pm.hook.register_plugins(register=register)
    return found


def plugin_registry(refresh: bool = False) -> dict[str, type[Plugin]]:
    """Name -> plugin class, from entry points plus programmatic registrations."""
    global _cache
    if _cache is None or refresh:
        _cache = _discover()
    return {**_cache, **_extra}


def register_plugin(cls: type) -> Callable[[], None]:
    """Register a plugin class in this process; returns a function that unregisters it."""
    cls = _check_class(cls)
    prev = _extra.get(cls.name)
    _extra[cls.name] = cls

    def undo() -> None:
        if prev is None:
            _extra.pop(cls.name, None)
        else:
            _extra[cls.name] = prev

    return undo


def hook_functions(plugin: Plugin) -> dict[str, tuple[Callable, bool]]:
    """The plugin's request hooks as (bound function, is_coroutine), validated by pluggy."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin, name=f"{plugin.id}@{id(plugin)}")  # validates names and arguments
    out = {}
    for hook in REQUEST_HOOKS:
        fn = getattr(plugin, hook, None)
        if fn is not None:
            out[hook] = (fn, inspect.iscoroutinefunction(fn))
    return out
