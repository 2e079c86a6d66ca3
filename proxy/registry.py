"""The plugin registry: built-ins and third-party packages, both through entry points."""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Callable

import pluggy

from . import hookspecs
from .errors import ConfigError
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
    marker = hookspecs.PROJECT + "_impl"
    for attr in dir(cls):
        fn = getattr(cls, attr, None)
        opts = getattr(fn, marker, None) if fn is not None else None
        if attr in REQUEST_HOOKS and fn is not None and opts is None:
            raise TypeError(f"{cls.__qualname__}.{attr} is not marked @hookimpl")
        if opts is None:
            continue
        hook = opts.get("specname") or attr
        if hook not in REQUEST_HOOKS:
            # a misspelt hook would never run (a guard that never guards)
            raise TypeError(f"{cls.__qualname__}.{attr} is marked @hookimpl but no hook is named {hook!r} "
                            f"(hooks: {', '.join(REQUEST_HOOKS)})")
        # the arguments too (pluggy's rule: a hook may take fewer than its spec passes, never others)
        spec = set(inspect.signature(getattr(hookspecs, hook)).parameters)
        if unknown := [a for a in inspect.signature(fn).parameters if a != "self" and a not in spec]:
            raise TypeError(f"{cls.__qualname__}.{attr} takes {', '.join(unknown)}: {hook} passes only "
                            f"{', '.join(sorted(spec))}")
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
        try:
            _cache = _discover()
        except Exception as e:  # a plugin package that fails to import or to register: one line, not a traceback
            raise ConfigError(f"plugins could not be loaded: {type(e).__name__}: {e}") from None
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
    """The plugin's request hooks as (bound function, is_coroutine), its class's hook names and arguments
    checked as registration checks them (a class made outside the registry too)."""
    _check_class(type(plugin))
    out = {}
    for hook in REQUEST_HOOKS:
        fn = getattr(plugin, hook, None)
        if fn is not None:
            out[hook] = (fn, inspect.iscoroutinefunction(fn))
    return out
