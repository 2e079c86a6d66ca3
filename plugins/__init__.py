"""Sluice's built-in plugins, registered through the same entry point as any third-party package.

Every public module here (no leading underscore) holds one plugin class; it is
found and registered at load time. Modules must import heavy dependencies
(Presidio, spaCy, ...) lazily, in ``Plugin.start``, not at import.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from proxy import Plugin, hookimpl


def builtin_classes() -> list[type[Plugin]]:
    out = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Plugin) and obj.__module__ == module.__name__ and obj.name:
                out.append(obj)
    return out


@hookimpl
def register_plugins(register):
    for cls in builtin_classes():
        register(cls)
