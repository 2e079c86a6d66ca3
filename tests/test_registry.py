"""Plugin discovery: entry points (built-ins and packages) and $SLUICE_PLUGINS modules."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

import plugins
from proxy.registry import plugin_registry, register_plugin
from proxy import Plugin, hookimpl
from proxy.testing import SluiceProcess

FIXTURES = Path(__file__).parent / "fixtures" / "plugins"


def test_builtins_arrive_through_the_entry_point_like_any_package():
    reg = plugin_registry(refresh=True)
    for cls in plugins.builtin_classes():
        assert reg[cls.name] is cls
    assert "token_cap" in reg  # contrib/example-plugin, installed as its own package


def test_hooks_must_be_marked():
    class Sloppy(Plugin):
        name = "sloppy"

        def on_request(self, ctx):  # no @hookimpl
            return None

    with pytest.raises(TypeError, match=r"Sloppy.on_request is not marked @hookimpl"):
        register_plugin(Sloppy)


def test_misspelt_hook_argument_fails_at_chain_build():
    from proxy.registry import hook_functions
    from proxy.testing import make_context  # noqa: F401

    class Wrong(Plugin):
        name = "wrong"

        @hookimpl
        def on_request(self, context):  # the spec's argument is ctx
            return None

    with pytest.raises(Exception, match="context"):
        hook_functions(Wrong(Wrong.Config(), None))  # type: ignore[arg-type]


@pytest.mark.slow
async def test_sluice_plugins_env_loads_a_module_in_the_serving_process(upstream, tmp_path):
    env = {"SLUICE_PLUGINS": "sluice_env_plugin", "PYTHONPATH": f"{FIXTURES}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cfg = {"upstreams": {"u": {"url": upstream.url}}, "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"env_tag": {}}]}]}
    async with SluiceProcess(cfg, tmp_path, env=env) as p, httpx.AsyncClient() as http:
        r = await http.get(f"{p.url}/models")
    assert r.headers["x-env-plugin"] == "yes"
